"""The element types safetensors knows, and how wide each is.

Frameworks map these names to their own types in their adapters; this table is the one
place that knows sizes, so the daemon can check ``shape × width == byte length``.
"""

from __future__ import annotations

import math

# Bits per element. Sub-byte types (F4, F6_*) are packed; a tensor's total bits must be a
# whole number of bytes.
BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of ``dtype`` and ``shape`` takes, or None if not a whole number."""
    bits = BITS[dtype] * math.prod(shape)
    return bits // 8 if bits % 8 == 0 else None
