import jax
import numpy as np
import pytest

from sd_jax.core.decompose import Decomposition, DecomposeOptions
from sd_jax.core.network import decompose_network
from sd_jax.core import report


def _params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.1
    return {
        "stem": {"conv": {"kernel": normal(7, 7, 3, 8)}},
        "block0": {"conv1": {"kernel": normal(3, 3, 8, 8)}, "conv2": {"kernel": normal(3, 3, 8, 8)},
                   "bn": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}},
        "proj": {"kernel": normal(1, 1, 8, 16)},
        "head": {"kernel": normal(16, 10), "bias": np.zeros(10, np.float32)},
    }


def test_every_kernel_is_decomposed_by_default_except_wide_stems():
    params = _params()
    result = decompose_network(params, threshold=1e-3)
    names = [r.name for r in result.reports]
    assert names == ["block0/conv1/kernel", "block0/conv2/kernel", "head/kernel", "proj/kernel"]
    assert isinstance(result.tree["block0"]["conv1"]["kernel"], Decomposition)
    assert isinstance(result.tree["stem"]["conv"]["kernel"], np.ndarray)
    assert result.dense_params == 7 * 7 * 3 * 8 + 16 + 10
    rebuilt = result.reconstruct()
    assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
    for r in result.reports:
        assert r.rel_error < 0.3


def test_a_plan_chooses_kind_and_options_per_kernel():
    sparse = DecomposeOptions(threshold=0.05)
    plans = {"block0/conv1/kernel": ("conv", sparse), "stem/conv/kernel": ("conv", DecomposeOptions()),
             "proj/kernel": ("conv", DecomposeOptions())}
    result = decompose_network(_params(), lambda path, shape: plans.get(path))
    by_name = {r.name: r for r in result.reports}
    assert sorted(by_name) == sorted(plans)  # kernels the plan leaves out stay dense
    assert by_name["block0/conv1/kernel"].density < by_name["proj/kernel"].density
    assert result.tree["block0"]["conv1"]["kernel"].options.threshold == 0.05
    with pytest.raises(ValueError, match="beside a plan"):
        decompose_network(_params(), lambda path, shape: None, threshold=0.05)


def test_network_result_equals_per_tensor_results():
    from sd_jax import decompose

    params = _params()
    result = decompose_network(params, threshold=2e-3)
    single = decompose(params["block0"]["conv2"]["kernel"], kind="conv", threshold=2e-3)
    np.testing.assert_array_equal(result.tree["block0"]["conv2"]["kernel"].coeff, single.coeff)


def test_table_and_json_report():
    result = decompose_network(_params())
    table = report.format_table(result.reports, result.dense_params)
    assert "block0/conv1/kernel" in table and "total" in table
    import json

    data = json.loads(report.to_json(result.reports, result.dense_params))
    assert len(data["layers"]) == 4
    assert data["total"]["dense_params"] == result.dense_params
    assert data["total"]["compression"] > 1


def test_bad_options_raise_naming_the_kernel():
    with pytest.raises(ValueError, match="block0/conv1/kernel: threshold=-1"):
        decompose_network(_params(), lambda path, shape: ("conv", DecomposeOptions(threshold=-1)) if "conv1" in path
                          else None)
    with pytest.raises(ValueError, match="unknown decomposition option"):
        decompose_network(_params(), thresh=1e-3)


def test_tree_without_kernels_raises():
    with pytest.raises(ValueError, match="no kernel"):
        decompose_network({"bn": {"scale": np.ones(3, np.float32)}})
