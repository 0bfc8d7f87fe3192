"""Flax linen layers for SmartDeal and dense <-> SD conversion of variables."""
