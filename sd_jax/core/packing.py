"""The packed SD format: one file, bit-packed coefficients, no pickle (docs/method.md 1.5).

File layout (little-endian):
    magic b"SDPACK\\0\\0" | format version (uint32) | header length (uint64) | header (UTF-8 JSON)
    | payload | CRC-32 of everything before it (uint32)
The header lists the tensors in payload order with their byte offsets and, from version 2, a
`metadata` object the writer chose (`sd_jax.serve` keeps there what rebuilds the model). Version 1
files (no metadata) are still read, with empty metadata; newer versions are refused. An SD tensor's
payload is a bit stream, then B, then the optional row scale:
    occupancy bitmap, one bit per entry of C (n, m, k) in C order, 1 = non-zero
    one code per non-zero, in bitmap order: a sign bit (1 = negative), then the index of its exponent
        in the tensor's sorted exponent list (ceil(log2(distinct exponents)) bits, MSB first)
    zero bits up to a byte; B (n, k, k) as float16 or float32; row scale (n, m, 1) float32
so it holds exactly `report.storage_bits` bits (B at 32) rounded up to whole bytes. Any other array
is stored raw with its dtype and shape. Unpacking gives back C (zeros outside the bitmap), B and
the spec, so kernels rebuilt from it are bit-identical to the ones the SD layers compute from the
same C (masked) and B (float32).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from sd_jax.core import blocking
from sd_jax.core.decompose import Decomposition
from sd_jax.core.report import coefficient_bits

MAGIC = b"SDPACK\0\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: the same layout without metadata
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_CHECKSUM = struct.Struct("<I")
BASIS_DTYPES = ("float32", "float16")


class PackingError(ValueError):
    """A packed file is corrupt, truncated, of another format version, or the input cannot be packed."""


class Packed(NamedTuple):
    """A packed file's contents: its named tensors, the writer's metadata ({} in version 1) and version."""

    tensors: dict[str, "SDTensor | np.ndarray"]
    metadata: dict[str, Any]
    version: int


@dataclasses.dataclass(frozen=True)
class SDTensor:
    """One SD kernel: C (n, m, k) with entries 0 or ±2^e, B (n, k, k), its blocking, optional row scale."""

    coeff: np.ndarray
    basis: np.ndarray
    spec: blocking.BlockSpec
    row_scale: np.ndarray | None = None

    @classmethod
    def from_decomposition(cls, decomposition: Decomposition) -> "SDTensor":
        """The packable form of a `Decomposition` (C masked by its mask)."""
        coeff = np.where(np.asarray(decomposition.mask), np.asarray(decomposition.coeff), np.float32(0))
        scale = None if decomposition.row_scale is None else np.asarray(decomposition.row_scale, np.float32)
        return cls(coeff.astype(np.float32), np.asarray(decomposition.basis, np.float32), decomposition.spec, scale)

    def kernel(self) -> np.ndarray:
        """The kernel from_blocks((scale *) C @ B) in its layer shape, as the SD layers rebuild it."""
        coeff = jnp.asarray(self.coeff) if self.row_scale is None else jnp.asarray(self.coeff) * self.row_scale
        return np.asarray(blocking.from_blocks(jnp.einsum("nmk,nkj->nmj", coeff, jnp.asarray(self.basis)), self.spec))


def _check_sd(name: str, tensor: SDTensor) -> None:
    spec = tensor.spec
    expected = {"coeff": spec.block_shape, "basis": (spec.num_blocks, spec.k, spec.k)}
    if tensor.row_scale is not None:
        expected["row_scale"] = spec.block_shape[:2] + (1,)
    for field, shape in expected.items():
        value = getattr(tensor, field)
        if tuple(value.shape) != shape or value.dtype != np.float32:
            raise PackingError(f"'{name}': {field} is {value.dtype}{tuple(value.shape)}, expected float32{shape} "
                               f"for the block spec of a {spec.kind} kernel {spec.shape}")
        if not np.isfinite(value).all():
            raise PackingError(f"'{name}': {field} holds NaN or inf; fix the weights before packing")
    nonzero = tensor.coeff[tensor.coeff != 0]
    if nonzero.size and not np.all(np.abs(np.frexp(nonzero)[0]) == 0.5):
        raise PackingError(f"'{name}': C has entries that are not 0 or ±2^e; quantize it first "
                           "(sd_jax.core.pow2.quantize_pow2, as a 'latent'-mode layer does)")


def _pack_sd(tensor: SDTensor, basis_dtype: str) -> tuple[dict[str, Any], bytes]:
    coeff = tensor.coeff.reshape(-1)
    occupied = coeff != 0
    nonzero = coeff[occupied]
    mantissa, exponent = np.frexp(nonzero)
    exponents = np.unique(exponent)
    code_bits = coefficient_bits(exponents.size)
    index = np.searchsorted(exponents, exponent)
    shifts = np.arange(code_bits - 2, -1, -1)
    codes = np.concatenate([(mantissa < 0)[:, None], (index[:, None] >> shifts) & 1], axis=1).astype(bool)
    bits = np.packbits(np.concatenate([occupied, codes.reshape(-1)]))
    parts = [bits.tobytes(), tensor.basis.astype(basis_dtype).astype("<" + np.dtype(basis_dtype).str[1:]).tobytes()]
    if tensor.row_scale is not None:
        parts.append(tensor.row_scale.astype("<f4").tobytes())
    entry = dict(type="sd", spec=dataclasses.asdict(tensor.spec), nonzeros=int(nonzero.size),
                 exponents=[int(e) - 1 for e in exponents], row_scale=tensor.row_scale is not None)
    return entry, b"".join(parts)


def _unpack_sd(name: str, entry: Mapping[str, Any], data: memoryview, basis_dtype: str) -> SDTensor:
    spec_fields = dict(entry["spec"], shape=tuple(entry["spec"]["shape"]))
    spec = blocking.BlockSpec(**spec_fields)
    entries, nonzeros = math.prod(spec.block_shape), int(entry["nonzeros"])
    exponents = np.asarray(entry["exponents"], np.int32)
    code_bits = coefficient_bits(exponents.size)
    stream_bytes = -(-(entries + nonzeros * code_bits) // 8)
    bits = np.unpackbits(np.frombuffer(data[:stream_bytes], np.uint8), count=entries + nonzeros * code_bits)
    occupied = bits[:entries].astype(bool)
    if int(occupied.sum()) != nonzeros:
        raise PackingError(f"'{name}': the occupancy bitmap has {int(occupied.sum())} ones but the header says "
                           f"{nonzeros} non-zeros; the file is corrupt, re-export it")
    codes = bits[entries:].reshape(nonzeros, code_bits).astype(np.int64)
    index = (codes[:, 1:] << np.arange(code_bits - 2, -1, -1)).sum(axis=1)
    coeff = np.zeros(entries, np.float32)
    if nonzeros:
        sign = np.where(codes[:, 0] == 1, np.float32(-1), np.float32(1))
        coeff[occupied] = np.ldexp(np.float32(1), exponents[index]) * sign
    basis_count = spec.num_blocks * spec.k * spec.k
    basis_bytes = basis_count * np.dtype(basis_dtype).itemsize
    basis = np.frombuffer(data[stream_bytes:stream_bytes + basis_bytes], "<" + np.dtype(basis_dtype).str[1:])
    scale = None
    if entry["row_scale"]:
        rows = spec.num_blocks * spec.rows
        scale = np.frombuffer(data[stream_bytes + basis_bytes:stream_bytes + basis_bytes + 4 * rows], "<f4")
        scale = scale.reshape(spec.num_blocks, spec.rows, 1).copy()
    basis = basis.astype(np.float32).reshape(spec.num_blocks, spec.k, spec.k)
    return SDTensor(coeff.reshape(spec.block_shape), basis, spec, scale)


def pack(tensors: Mapping[str, SDTensor | Any], *, basis_dtype: str = "float32",
         metadata: Mapping[str, Any] | None = None) -> bytes:
    """The packed file's bytes for named tensors (`SDTensor`s bit-packed, anything else raw) and a
    JSON-serialisable `metadata` mapping kept in the header."""
    if basis_dtype not in BASIS_DTYPES:
        raise PackingError(f"basis_dtype {basis_dtype!r} is not one of {BASIS_DTYPES}")
    entries, payload, offset = [], [], 0
    for name, tensor in tensors.items():
        if isinstance(tensor, SDTensor):
            _check_sd(name, tensor)
            entry, data = _pack_sd(tensor, basis_dtype)
        else:
            array = np.asarray(tensor)
            if array.dtype == object or array.dtype.kind not in "biuf":
                raise PackingError(f"'{name}': dtype {array.dtype} cannot be packed; pass numeric arrays")
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            entry = dict(type="array", dtype=array.dtype.str.lstrip("<>|="), shape=list(array.shape))
        entries.append(dict(entry, name=name, offset=offset, length=len(data)))
        payload.append(data)
        offset += len(data)
    try:
        header = json.dumps(dict(basis_dtype=basis_dtype, tensors=entries, metadata=dict(metadata or {}))).encode()
    except TypeError as error:
        raise PackingError(f"metadata cannot be written as JSON ({error}); pass strings, numbers, lists and "
                           "dicts") from None
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(payload)
    return body + _CHECKSUM.pack(zlib.crc32(body))


def header_bytes(data: bytes) -> int:
    """Bytes of a packed file that are not payload: prefix, header and checksum."""
    return _PREFIX.size + _PREFIX.unpack_from(data)[2] + _CHECKSUM.size


def decode(data: bytes, source: str = "packed data") -> Packed:
    """Tensors, metadata and version of a packed file; raises PackingError naming `source` on any damage,
    on a newer format version, or on a version this reader does not know."""
    if len(data) < _PREFIX.size + _CHECKSUM.size or data[:8] != MAGIC:
        raise PackingError(f"{source}: not an SD packed file (no {MAGIC!r} magic); pass a file written by pack/save")
    _, version, header_length = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise PackingError(f"{source}: format version {version} is newer than this reader's version "
                           f"{FORMAT_VERSION}; update sd_jax to read it")
    if version not in READABLE_VERSIONS:
        raise PackingError(f"{source}: format version {version} is not one this reader reads {READABLE_VERSIONS}; "
                           "the file is corrupt or not from sd_jax: export the model again")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + header_length]))
        payload_length = sum(entry["length"] for entry in header["tensors"])
    except (ValueError, KeyError, TypeError) as error:
        raise PackingError(f"{source}: the header is unreadable ({error}); the file is corrupt or truncated") from None
    expected = _PREFIX.size + header_length + payload_length + _CHECKSUM.size
    if len(data) != expected:
        raise PackingError(f"{source}: {len(data)} bytes, but the header describes {expected}; the file is "
                           "truncated or has trailing data: copy or export it again")
    (checksum,) = _CHECKSUM.unpack_from(data, len(data) - _CHECKSUM.size)
    if zlib.crc32(data[:-_CHECKSUM.size]) != checksum:
        raise PackingError(f"{source}: checksum mismatch; the file is corrupt: copy or export it again")
    view = memoryview(data)[_PREFIX.size + header_length:]
    tensors: dict[str, SDTensor | np.ndarray] = {}
    for entry in header["tensors"]:
        chunk = view[entry["offset"]:entry["offset"] + entry["length"]]
        if entry["type"] == "sd":
            tensors[entry["name"]] = _unpack_sd(entry["name"], entry, chunk, header["basis_dtype"])
        else:
            dtype = np.dtype(entry["dtype"]).newbyteorder("<")
            tensors[entry["name"]] = np.frombuffer(chunk, dtype).reshape(entry["shape"]).astype(dtype.newbyteorder("="))
    return Packed(tensors, dict(header.get("metadata", {})), version)


def unpack(data: bytes, source: str = "packed data") -> dict[str, SDTensor | np.ndarray]:
    """The named tensors of a packed file (`decode` without the metadata)."""
    return decode(data, source).tensors


def save(path: str, tensors: Mapping[str, SDTensor | Any], *, basis_dtype: str = "float32",
         metadata: Mapping[str, Any] | None = None) -> int:
    """Write `pack(tensors, ...)` to `path`; returns the file size in bytes."""
    data = pack(tensors, basis_dtype=basis_dtype, metadata=metadata)
    with open(path, "wb") as stream:
        stream.write(data)
    return len(data)


def read(path: str) -> Packed:
    """Tensors, metadata and version of the packed file at `path` (`decode` of its bytes)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise PackingError(f"{path}: cannot read ({error}); pass the path of a packed SD file") from None
    return decode(data, source=path)


def load(path: str) -> dict[str, SDTensor | np.ndarray]:
    """The named tensors of a packed file written by `save`."""
    return read(path).tensors
