"""Pure jax.numpy numerics of SmartDeal: no Flax, no global state."""
