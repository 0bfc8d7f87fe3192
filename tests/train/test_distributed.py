import pytest

from sd_jax.train import distributed


def test_single_process_needs_nothing():
    assert distributed.initialize() is False


def test_partial_cluster_arguments_name_what_is_missing():
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        distributed.initialize("localhost:1234")
