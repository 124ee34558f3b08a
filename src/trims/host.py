"""The host-memory tier: each resident segment is a sealed memfd.

A segment is written into a fresh memfd (by another tier's verified ``fetch``), then sealed
(no write, grow, shrink, or further seals) and reopened read-only. Only the read-only
descriptor is kept and handed to clients: the kernel, not the client's good manners, keeps
the bytes intact. The daemon never keeps the bytes mapped, so they count in the PSS of the
processes that use them and nowhere else.

Where the kernel allows shared memory in 2 MiB pages, segments are made of them (see
:mod:`trims.hugepages`): clients then fault a model's weights in far fewer, larger pages.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from typing import Iterable

from . import digest as digests
from . import hugepages
from .catalog import storage_error
from .records import SegmentLayout
from .tier import Fill, Tier

log = logging.getLogger("trims.host")

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_COPY_CHUNK = 64 * 1024 * 1024


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

    def __init__(self, capacity: int, huge_pages: bool | None = None) -> None:
        """``huge_pages``: whether to allocate segments in 2 MiB pages; by default, whether the
        kernel gives them (``shmem_enabled``, tried once)."""
        super().__init__(capacity)
        self._segments: dict[str, HostSegment] = {}
        self.shmem_enabled = hugepages.shmem_setting()
        self.huge_pages = hugepages.available(self.shmem_enabled) if huge_pages is None else huge_pages

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
            if self.huge_pages:
                self._allocate_huge_pages(memfd, layout.size)
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

    def _allocate_huge_pages(self, memfd: int, size: int) -> None:
        """Best effort. The kernel falls back to 4 KiB pages where it finds no free 2 MiB ones; it
        refuses outright only when memory runs out, and then the fill fails on its own."""
        try:
            hugepages.allocate(memfd, size)
        except OSError as exc:
            log.warning("a %d-byte segment gets 4 KiB pages, not 2 MiB ones: %s", size, exc)


def _read_only(memfd: int) -> int:
    """A read-only descriptor of the same memfd, so no receiver even holds write access."""
    try:
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:  # no /proc: the seals alone still forbid every write
        log.warning("cannot reopen memfd read-only (%s); handing out the sealed descriptor", exc)
        return os.dup(memfd)
