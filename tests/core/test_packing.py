"""Tests for sd_jax/core/packing.py: the packed SD format."""
import functools
import json
import math
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sd_jax import models
from sd_jax.core import blocking, packing
from sd_jax.core.network import decompose_network
from sd_jax.cost.layers import sd_stats
from sd_jax.nn import SDConv, SDDense
from sd_jax.nn.layers import rebuild_kernel


def _random_sd(spec, rng, density=0.4):
    n, m, k = spec.block_shape
    coeff = np.ldexp(1.0, rng.integers(-8, 6, (n, m, k))) * rng.choice([-1.0, 1.0], (n, m, k))
    coeff = np.where(rng.random((n, m, k)) < density, coeff, 0.0).astype(np.float32)
    basis = rng.standard_normal((n, k, k)).astype(np.float32)
    return packing.SDTensor(coeff, basis, spec)


def _sd_model_tensors(name, rng):
    """Random SD variables for every SD layer of zoo model `name`, from traced shapes (no init compute)."""
    imagenet = name.endswith("_imagenet")
    model = models.get(name, num_classes=10, conv=functools.partial(SDConv, mode="pow2"), dense=SDDense)
    shape = (1, 224, 224, 3) if imagenet else models.probe_shape(model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    tensors = {}
    for path, leaf in traverse_util.flatten_dict(shapes["sd_coeff"]).items():
        n, m, k = leaf.shape
        spec = blocking.BlockSpec("dense", "dense_rows", (m * k, n), n, 1, m, k, m * k)  # n blocks of (m, k)
        tensors["/".join(path[:-1])] = _random_sd(spec, rng)
    return tensors


def _assert_same(tensors, back):
    assert list(back) == list(tensors)
    for name, tensor in tensors.items():
        if isinstance(tensor, packing.SDTensor):
            np.testing.assert_array_equal(back[name].coeff, tensor.coeff)
            np.testing.assert_array_equal(back[name].basis, tensor.basis)
            mask = jnp.asarray(tensor.coeff != 0)
            spec = tensor.spec
            expected = rebuild_kernel(jnp.asarray(tensor.coeff), jnp.asarray(tensor.basis), mask, spec,
                                      mode="pow2", threshold=0.0, max_coeff=32.0)
            got = rebuild_kernel(jnp.asarray(back[name].coeff), jnp.asarray(back[name].basis),
                                 jnp.asarray(back[name].coeff != 0), spec, mode="pow2", threshold=0.0, max_coeff=32.0)
            assert np.asarray(got).tobytes() == np.asarray(expected).tobytes()
        else:
            assert back[name].dtype == tensor.dtype
            np.testing.assert_array_equal(back[name], tensor)


FAST_MODELS = [name for name in models.names() if not name.endswith("_imagenet") and name not in
               ("resnet110", "resnet164", "resnet50", "resnet34", "transformer_lm")]


@pytest.mark.parametrize("name", FAST_MODELS)
def test_pack_unpack_is_bit_exact_for_zoo_models(name):
    tensors = _sd_model_tensors(name, np.random.default_rng(0))
    _assert_same(tensors, packing.unpack(packing.pack(tensors)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(models.names()) - set(FAST_MODELS)))
def test_pack_unpack_is_bit_exact_for_large_zoo_models(name):
    tensors = _sd_model_tensors(name, np.random.default_rng(0))
    _assert_same(tensors, packing.unpack(packing.pack(tensors)))


def test_packed_sd_model_computes_the_same_outputs():
    model = models.get("lenet5", num_classes=10, conv=functools.partial(SDConv, mode="pow2"),
                       dense=functools.partial(SDDense, mode="pow2"))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    flat = traverse_util.flatten_dict(variables)
    tensors, arrays = {}, {}
    for (collection, *path), value in flat.items():
        if collection == "sd_coeff":
            layer = tuple(path[:-1])
            coeff = np.where(flat[("sd_mask", *layer, "mask")], value, np.float32(0))
            n, m, k = coeff.shape
            spec = blocking.BlockSpec("dense", "dense_rows", (m * k, n), n, 1, m, k, m * k)
            tensors["::".join(layer)] = packing.SDTensor(coeff, np.asarray(flat[("sd_basis", *layer, "basis")]), spec)
        elif collection == "params":
            arrays["::".join(("params", *path))] = np.asarray(value)
    back = packing.unpack(packing.pack({**tensors, **arrays}))
    restored = {tuple(name.split("::")): back[name] for name in arrays}
    for name in tensors:
        layer = tuple(name.split("::"))
        restored[("sd_coeff", *layer, "coeff")] = back[name].coeff
        restored[("sd_basis", *layer, "basis")] = back[name].basis
        restored[("sd_mask", *layer, "mask")] = back[name].coeff != 0
    restored = traverse_util.unflatten_dict({key: jnp.asarray(value) for key, value in restored.items()})
    apply = jax.jit(functools.partial(model.apply, train=False))
    assert np.asarray(apply(restored, x)).tobytes() == np.asarray(apply(variables, x)).tobytes()


def test_payload_equals_the_storage_count_up_to_the_header():
    params = {"conv": {"kernel": np.random.default_rng(0).standard_normal((3, 3, 16, 8)).astype(np.float32),
                       "bias": np.zeros(8, np.float32)},
              "fc": {"kernel": np.random.default_rng(1).standard_normal((100, 10)).astype(np.float32)}}
    result = decompose_network(params, threshold=0.05)
    tensors = {name: packing.SDTensor.from_decomposition(d)
               for name, d in (("conv", result.tree["conv"]["kernel"]), ("fc", result.tree["fc"]["kernel"]))}
    tensors["bias"] = params["conv"]["bias"]
    data = packing.pack(tensors)
    bits = [sd_stats(t.coeff, t.basis.shape).storage_bits for t in tensors.values() if isinstance(t, packing.SDTensor)]
    assert bits == [r.storage_bits for r in result.reports]  # the analyzer's count is the report's
    assert len(data) - packing.header_bytes(data) == sum(math.ceil(b / 8) for b in bits) + 4 * 8
    back = packing.unpack(data)
    for name in ("conv", "fc"):
        expected = np.asarray(result.tree[name]["kernel"].reconstruct())
        assert back[name].kernel().tobytes() == expected.tobytes()


def test_float16_basis_halves_basis_bytes():
    spec = blocking.block_spec((3, 3, 8, 4), "conv")
    tensor = _random_sd(spec, np.random.default_rng(0))
    full, half = packing.pack({"w": tensor}), packing.pack({"w": tensor}, basis_dtype="float16")
    assert (len(full) - packing.header_bytes(full)) - (len(half) - packing.header_bytes(half)) == 2 * tensor.basis.size
    np.testing.assert_array_equal(packing.unpack(half)["w"].basis, tensor.basis.astype(np.float16).astype(np.float32))


@pytest.fixture
def packed():
    return packing.pack({"w": _random_sd(blocking.block_spec((3, 3, 8, 4), "conv"), np.random.default_rng(0)),
                         "b": np.arange(4, dtype=np.float32)})


def test_corrupt_file_raises(packed):
    damaged = bytearray(packed)
    damaged[-20] ^= 0xFF  # a payload byte
    with pytest.raises(packing.PackingError, match="checksum"):
        packing.unpack(bytes(damaged))


def test_truncated_file_raises(packed):
    with pytest.raises(packing.PackingError, match="truncated"):
        packing.unpack(packed[:-10])


def test_wrong_version_raises(packed):
    damaged = bytearray(packed)
    damaged[8] = 99
    with pytest.raises(packing.PackingError, match="format version 99 is newer than this reader's version 2"):
        packing.unpack(bytes(damaged))
    damaged[8] = 0
    with pytest.raises(packing.PackingError, match=r"format version 0 is not one this reader reads \(1, 2\)"):
        packing.unpack(bytes(damaged))


def version_1(data: bytes) -> bytes:
    """A packed file as format version 1 wrote it: the same layout without metadata in the header."""
    _, _, length = struct.unpack_from("<8sIQ", data)
    header = json.loads(data[20:20 + length])
    del header["metadata"]
    encoded = json.dumps(header).encode()
    body = struct.pack("<8sIQ", packing.MAGIC, 1, len(encoded)) + encoded + data[20 + length:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_metadata_travels_in_the_header_and_version_1_files_are_read(packed):
    data = packing.pack({"b": np.arange(4, dtype=np.float32)}, metadata={"model": {"name": "mlp", "shape": [1, 2]}})
    assert packing.decode(data) == ({"b": pytest.approx(np.arange(4))}, {"model": {"name": "mlp", "shape": [1, 2]}}, 2)
    old = packing.decode(version_1(packed))
    assert old.version == 1 and old.metadata == {} and old.tensors.keys() == {"w", "b"}
    with pytest.raises(packing.PackingError, match="metadata cannot be written as JSON"):
        packing.pack({}, metadata={"dtype": np.float32})


def test_not_a_packed_file_raises(tmp_path):
    path = tmp_path / "x.sdpack"
    path.write_bytes(b"PK\x03\x04 something else entirely")
    with pytest.raises(packing.PackingError, match="not an SD packed file"):
        packing.load(str(path))


def test_non_power_of_two_coefficients_raise():
    tensor = _random_sd(blocking.block_spec((3, 3, 8, 4), "conv"), np.random.default_rng(0))
    bad = packing.SDTensor(tensor.coeff * np.float32(1.5), tensor.basis, tensor.spec)
    with pytest.raises(packing.PackingError, match="not 0 or"):
        packing.pack({"w": bad})
