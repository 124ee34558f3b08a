"""Content digests: the identity of every tensor, segment, side file and model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

PREFIX = "sha256:"
HEX_CHARS = 64


def of_bytes(data: bytes | memoryview) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


def of_json(value: Any) -> str:
    """Digest of a JSON document in canonical form (sorted keys, no spaces)."""
    return of_bytes(canonical_json(value))


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def hasher() -> "hashlib._Hash":
    return hashlib.sha256()


def finish(h: "hashlib._Hash") -> str:
    return PREFIX + h.hexdigest()


def is_digest(text: str) -> bool:
    hex_part = text[len(PREFIX) :]
    return (
        text.startswith(PREFIX)
        and len(hex_part) == HEX_CHARS
        and all(c in "0123456789abcdef" for c in hex_part)
    )


def hex_of(digest: str) -> str:
    """The hex part of a digest, used as a file name in the store."""
    if not is_digest(digest):
        raise ValueError(f"not a trims digest: {digest!r}")
    return digest[len(PREFIX) :]
