"""What the store knows about a model, independent of where its bytes are.

A :class:`Manifest` lists a model's tensors by name, type, shape and content digest; it
says nothing about where bytes live. A :class:`SegmentLayout` says where: a segment is
one immutable blob holding the bytes of some tensors at aligned offsets. The store maps
each tensor digest to one place in one segment, so a tensor shared by two models (a base
model and its fine-tune) is stored once, and a model costs as many descriptors as the
segments it draws from (usually one), not one per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from . import digest as digests

ALIGNMENT = 64  # bytes; enough for any element type and for cache-line/AVX-512 loads


def align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """A model: its tensors, its safetensors metadata and its side files (config, tokenizer)."""

    tensors: tuple[TensorRecord, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative name -> content digest

    @cached_property
    def digest(self) -> str:
        return digests.of_json(self._identity())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def _identity(self) -> dict[str, Any]:
        tensors = sorted(
            ([t.name, t.dtype, list(t.shape), t.digest] for t in self.tensors), key=lambda r: r[0]
        )
        return {"tensors": tensors, "metadata": self.metadata, "files": self.files}

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "digest": t.digest, "nbytes": t.nbytes}
                for t in self.tensors
            ],
            "metadata": self.metadata,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        tensors = tuple(
            TensorRecord(t["name"], t["dtype"], tuple(t["shape"]), t["digest"], t["nbytes"])
            for t in doc["tensors"]
        )
        return cls(tensors=tensors, metadata=dict(doc["metadata"]), files=dict(doc["files"]))


@dataclass(frozen=True)
class SegmentEntry:
    digest: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SegmentLayout:
    """An immutable blob: each entry's bytes at its offset, zeros everywhere else."""

    size: int
    entries: tuple[SegmentEntry, ...]

    @cached_property
    def id(self) -> str:
        return digests.of_json(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "entries": [[e.digest, e.offset, e.nbytes] for e in self.entries]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SegmentLayout:
        entries = tuple(SegmentEntry(d, o, n) for d, o, n in doc["entries"])
        return cls(size=doc["size"], entries=entries)

    @classmethod
    def pack(cls, sizes: list[tuple[str, int]]) -> SegmentLayout:
        """Lay out ``(digest, nbytes)`` pairs one after another at aligned offsets."""
        entries, offset = [], 0
        for digest, nbytes in sizes:
            entries.append(SegmentEntry(digest, offset, nbytes))
            offset = align(offset + nbytes)
        # mmap cannot map zero bytes, so even a segment of empty tensors has a size.
        return cls(size=max(offset, ALIGNMENT), entries=tuple(entries))
