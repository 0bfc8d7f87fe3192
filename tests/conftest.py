"""Test-wide set-up: CPU only, eight simulated devices, repository root importable; the `mock_tfds` fixture."""
import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def mock_tfds():
    """TFDS mocked for a whole test module (64 random examples of any dataset); a module asks for it with
    `pytestmark = pytest.mark.usefixtures("mock_tfds")`, so module-scoped fixtures train under it too."""
    import tensorflow_datasets as tfds  # only the modules that ask for it pay for the import

    with tfds.testing.mock_data(num_examples=64):
        yield
