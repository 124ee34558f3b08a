"""The host-memory tier: each resident segment is a sealed memfd.

A segment is written into a fresh memfd (by another tier's verified ``fetch``), then sealed
(no write, grow, shrink, or further seals) and reopened read-only. Only the read-only
descriptor is kept and handed to clients: the kernel, not the client's good manners, keeps
the bytes intact. The daemon never keeps the bytes mapped, so they count in the PSS of the
processes that use them and nowhere else.

Where the kernel allows shared memory in 2 MiB pages, segments are made of them: a client then
maps them a page-table entry per 2 MiB instead of per 4 KiB, and its first touch of a model's
weights is an order of magnitude faster. With ``shmem_enabled`` at ``within_size`` or
``always`` the kernel does so for every write; with ``advise``, only for memory a mapping asked
for (``MADV_HUGEPAGE``), so the tier allocates each segment's pages through such a mapping
before filling it.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import digest as digests
from .catalog import storage_error
from .records import SegmentLayout
from .tier import Fill, Tier

log = logging.getLogger("trims.host")

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_COPY_CHUNK = 64 * 1024 * 1024
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python 3.11's mmap has no constant for it
_THP = Path("/sys/kernel/mm/transparent_hugepage")
_HUGE = frozenset({"always", "within_size", "advise", "force"})  # shmem_enabled values that give 2 MiB pages


@dataclass
class HostSegment:
    id: str
    size: int
    fd: int  # read-only descriptor of the sealed memfd

    @property
    def mapped_size(self) -> int:
        return self.size

    def close(self) -> None:
        os.close(self.fd)


class HostTier(Tier):
    name = "host"

    def __init__(self, capacity: int, shmem_enabled: str | None = None) -> None:
        """``shmem_enabled``: the kernel's huge-page setting for shared memory, read from sysfs
        unless given."""
        super().__init__(capacity)
        self._segments: dict[str, HostSegment] = {}
        self.shmem_enabled = shmem_huge_pages() if shmem_enabled is None else shmem_enabled

    @property
    def huge_pages(self) -> bool:
        """Whether segments are made of 2 MiB pages."""
        return self.shmem_enabled in _HUGE

    def has(self, segment_id: str) -> bool:
        return segment_id in self._segments

    def get(self, segment_id: str) -> HostSegment | None:
        return self._segments.get(segment_id)

    def segment_ids(self) -> Iterable[str]:
        return list(self._segments)

    def bytes_used(self) -> int:
        return sum(s.size for s in list(self._segments.values()))  # a snapshot: puts run outside the store lock

    def put(self, layout: SegmentLayout, fill: Fill) -> None:
        name = f"trims:{digests.hex_of(layout.id)[:16]}"
        memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, layout.size)
            if self.shmem_enabled == "advise":
                _allocate_huge_pages(memfd, layout.size)
            fill(memfd)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
            self._segments[layout.id] = HostSegment(id=layout.id, size=layout.size, fd=_read_only(memfd))
        finally:
            os.close(memfd)

    def fetch(self, layout: SegmentLayout, destination: int) -> None:
        """Copy out a resident segment. Not re-verified: sealed bytes were verified on the way in."""
        source = self._segments[layout.id].fd
        copied = 0
        while copied < layout.size:
            try:
                n = os.sendfile(destination, source, copied, min(_COPY_CHUNK, layout.size - copied))
            except OSError as exc:
                raise storage_error(exc, "copying a segment out of host memory") from None
            copied += n

    def evict(self, segment_id: str) -> int:
        segment = self._segments.pop(segment_id)
        segment.close()
        return segment.size

    def close(self) -> None:
        for segment_id in list(self._segments):
            self.evict(segment_id)


def shmem_huge_pages(root: Path = _THP) -> str:
    """The kernel's setting for shared memory in PMD-sized (2 MiB) pages: ``always``,
    ``within_size``, ``advise``, ``never``, ``deny`` or ``force``; ``unsupported`` where the
    kernel has no transparent huge pages (or does not say)."""
    try:
        size_kb = int((root / "hpage_pmd_size").read_text()) // 1024
        mode = _selected(root / f"hugepages-{size_kb}kB" / "shmem_enabled")  # per page size, Linux 6.11
    except (OSError, ValueError):
        mode = "inherit"
    try:
        return _selected(root / "shmem_enabled") if mode == "inherit" else mode
    except (OSError, ValueError):
        return "unsupported"


def _selected(path: Path) -> str:
    text = path.read_text()  # "always within_size [advise] never deny force"
    return text[text.index("[") + 1 : text.index("]")]


def _allocate_huge_pages(memfd: int, size: int) -> None:
    """Give the memfd its pages now, 2 MiB ones, through a mapping that asks for them: writes
    (sendfile) then fill pages already there. Best effort: on failure the segment is made of
    4 KiB pages, the same bytes. The mapping is gone before the memfd is sealed."""
    if size == 0:
        return
    try:
        with mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            mapping.madvise(mmap.MADV_HUGEPAGE)
            mapping.madvise(_MADV_POPULATE_WRITE)
    except OSError as exc:
        log.debug("no huge pages for a %d-byte segment: %s", size, exc)


def _read_only(memfd: int) -> int:
    """A read-only descriptor of the same memfd, so no receiver even holds write access."""
    try:
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:  # no /proc: the seals alone still forbid every write
        log.warning("cannot reopen memfd read-only (%s); handing out the sealed descriptor", exc)
        return os.dup(memfd)
