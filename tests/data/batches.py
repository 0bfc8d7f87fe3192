"""Helpers of the data tests: batches taken as numpy and compared whole."""
import numpy as np


def take(pipeline, n: int) -> list[dict[str, np.ndarray]]:
    """The next `n` batches of `pipeline`, as numpy arrays (host and device batches alike)."""
    return [{key: np.asarray(value) for key, value in next(pipeline).items()} for _ in range(n)]


def assert_same(first: list[dict], second: list[dict]) -> None:
    """Two lists of batches equal key by key, bit for bit."""
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
