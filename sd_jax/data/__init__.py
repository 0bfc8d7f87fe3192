"""TFDS-based input pipelines."""
