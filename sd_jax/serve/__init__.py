"""Serving trained SD models."""
