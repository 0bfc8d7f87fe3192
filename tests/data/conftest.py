"""Shared fixtures of the data tests."""
import pytest
import tensorflow_datasets as tfds


@pytest.fixture
def mock():
    """The built-in TFDS names served by `tfds.testing.mock_data` (200 examples a split, no files)."""
    with tfds.testing.mock_data(num_examples=200):
        yield
