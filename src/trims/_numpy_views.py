"""NumPy arrays over mapped segment bytes, for every safetensors dtype.

NumPy lacks bf16 and the fp8 types; ``ml_dtypes`` (the types JAX uses) provides them.
Packed sub-byte types (F4, F6_*) have no element type NumPy can view in place, so they come
back as their raw bytes: ``uint8`` with the last dimension measured in bytes.
"""

from __future__ import annotations

import math

import numpy as np

from .protocol import TensorEntry

_NATIVE = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
    "I64": np.int64, "F64": np.float64, "C64": np.complex64,
}
_ML_DTYPES = {
    "BF16": "bfloat16", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def numpy_dtype(dtype: str) -> np.dtype | None:
    """The NumPy type for a safetensors dtype, or None for packed sub-byte types."""
    if dtype in _NATIVE:
        return np.dtype(_NATIVE[dtype]).newbyteorder("<")
    if dtype in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[dtype]))
    return None


def as_array(buffer, entry: TensorEntry) -> np.ndarray:
    """A read-only view of ``entry``'s bytes in ``buffer``; no copy."""
    raw = np.frombuffer(buffer, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
    dtype = numpy_dtype(entry.dtype)
    array = raw.view(dtype).reshape(entry.shape) if dtype is not None else raw.reshape(packed_shape(entry.shape, entry.nbytes))
    array.flags.writeable = False
    return array


def packed_shape(shape: tuple[int, ...], nbytes: int) -> tuple[int, ...]:
    """Shape in bytes of a packed sub-byte tensor: the last dimension shrinks to bytes."""
    if not shape:
        return (nbytes,)
    lead = math.prod(shape[:-1])
    if lead == 0:
        return (*shape[:-1], 0)
    if nbytes % lead == 0:
        return (*shape[:-1], nbytes // lead)
    return (nbytes,)
