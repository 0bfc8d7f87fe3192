"""Training: state, optax transformations, steps, loop and checkpoints."""
