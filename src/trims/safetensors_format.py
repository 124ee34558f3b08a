"""Reading and checking a safetensors header, treating every byte as hostile.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
length N, N bytes of UTF-8 JSON mapping tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the byte after the header) plus an
optional ``"__metadata__"`` of string to string, then the tensor bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from .dtypes import BITS, nbytes_of
from .errors import InvalidModel
from .sources import Source

# safetensors itself allows 100 MB; real headers of the largest sharded models stay
# under a few MB, and a parsed header costs the daemon ~10x its size in memory.
MAX_HEADER_BYTES = 32 * 1024 * 1024
MAX_RANK = 64
MAX_NAME_CHARS = 1024
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its bytes are ``[start, start + nbytes)`` in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str]
    nbytes: int = 0  # of the JSON header itself


def read_header(source: Source) -> Header:
    """Read and validate the header of a safetensors file. Raises :class:`InvalidModel`."""
    label, size = source.label, source.size()
    if size < 8:
        raise InvalidModel(f"{label}: truncated: {size} bytes is shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", source.read(0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise InvalidModel(
            f"{label}: header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if 8 + header_len > size:
        raise InvalidModel(
            f"{label}: truncated: header claims {header_len} bytes, file has {size - 8} after "
            "the length"
        )
    raw = source.read(8, header_len)
    return parse_header(raw, data_start=8 + header_len, data_len=size - 8 - header_len, label=label)


def parse_header(raw: bytes, *, data_start: int, data_len: int, label: str) -> Header:
    """Validate the JSON header ``raw`` against a data section of ``data_len`` bytes."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise InvalidModel(f"{label}: header is not valid UTF-8") from None
    except RecursionError:
        raise InvalidModel(f"{label}: header JSON is nested too deeply") from None
    except _DuplicateKey as exc:
        raise InvalidModel(f"{label}: header names {exc} twice") from None
    except ValueError as exc:
        raise InvalidModel(f"{label}: header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidModel(f"{label}: header is not a JSON object")
    metadata = _metadata(doc.pop(METADATA_KEY, {}), label)
    tensors = [_tensor(name, entry, data_start, data_len, label) for name, entry in doc.items()]
    _check_contiguous(tensors, data_start, data_len, label)
    return Header(tensors=tuple(tensors), metadata=metadata, nbytes=len(raw))


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(repr(duplicate[:80]))
    return result


def _metadata(value: object, label: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidModel(f"{label}: {METADATA_KEY} must map strings to strings")
    return value


def _tensor(name: str, entry: object, data_start: int, data_len: int, label: str) -> TensorSpec:
    where = f"{label}: tensor {name[:80]!r}"
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidModel(f"{where}: a tensor name must have 1 to {MAX_NAME_CHARS} characters")
    if not isinstance(entry, dict):
        raise InvalidModel(f"{where}: entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in BITS:
        raise InvalidModel(f"{where}: unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_size(d) for d in shape):
        raise InvalidModel(f"{where}: shape must be a list of at most {MAX_RANK} sizes >= 0")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise InvalidModel(f"{where}: data_offsets must be [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise InvalidModel(
            f"{where}: data_offsets [{begin}, {end}] fall outside the {data_len}-byte data "
            "section (truncated or corrupt file)"
        )
    expected = nbytes_of(dtype, tuple(shape))
    if expected != end - begin:
        raise InvalidModel(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes, data_offsets give "
            f"{end - begin}"
        )
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), start=data_start + begin, nbytes=end - begin)


def _is_size(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**63


def _check_contiguous(tensors: list[TensorSpec], data_start: int, data_len: int, label: str) -> None:
    """Tensors tile the data section exactly, as the format requires: no overlap, no holes."""
    position = data_start
    previous: TensorSpec | None = None
    for spec in sorted(tensors, key=lambda t: (t.start, t.nbytes)):
        if spec.start < position:
            raise InvalidModel(f"{label}: tensors {previous.name!r} and {spec.name!r} overlap")
        if spec.start > position:
            raise InvalidModel(f"{label}: {spec.start - position} bytes before tensor {spec.name!r} belong to no tensor")
        position, previous = spec.start + spec.nbytes, spec
    if position != data_start + data_len:
        raise InvalidModel(f"{label}: {data_start + data_len - position} bytes after the last tensor belong to no tensor")
