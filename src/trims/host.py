"""The host-memory tier: each resident segment is a sealed memfd.

A segment is copied from the store's disk into a fresh memfd, checked against its digests,
then sealed (no write, grow, shrink, or further seals) and reopened read-only. Only the
read-only descriptor is kept and handed to clients: the kernel, not the client's good
manners, keeps the bytes intact. The daemon never keeps the bytes mapped, so they count
in the PSS of the processes that use them and nowhere else.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from . import digest as digests
from .catalog import storage_error
from .errors import IntegrityError
from .records import SegmentEntry, SegmentLayout

log = logging.getLogger("trims.host")

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_COPY_CHUNK = 64 * 1024 * 1024


@dataclass
class HostSegment:
    id: str
    size: int
    fd: int  # read-only descriptor of the sealed memfd

    def close(self) -> None:
        os.close(self.fd)


class HostTier:
    """Resident segments and the bytes they (and loads in flight) take, under a hard cap."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resident: dict[str, HostSegment] = {}
        self.reserved = 0  # bytes promised to loads in flight

    @property
    def used(self) -> int:
        return self.reserved + sum(s.size for s in self.resident.values())

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.capacity

    def add(self, segment: HostSegment) -> None:
        self.resident[segment.id] = segment

    def drop(self, segment_id: str) -> int:
        segment = self.resident.pop(segment_id)
        segment.close()
        return segment.size

    def close(self) -> None:
        for segment_id in list(self.resident):
            self.drop(segment_id)


def load_segment(layout: SegmentLayout, source: Path, pool: ThreadPoolExecutor) -> HostSegment:
    """Copy a segment file into a sealed memfd, verifying every byte against its layout.

    Copying is sequential; each tensor is hashed on ``pool`` as soon as its bytes have
    landed, so hashing overlaps the copy. Raises IntegrityError or StorageError.
    """
    name = f"trims:{digests.hex_of(layout.id)[:16]}"
    memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, layout.size)
        _fill_and_verify(memfd, layout, source, pool)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
        return HostSegment(id=layout.id, size=layout.size, fd=_read_only(memfd))
    finally:
        os.close(memfd)


def _fill_and_verify(memfd: int, layout: SegmentLayout, source: Path, pool: ThreadPoolExecutor) -> None:
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise IntegrityError(f"segment {layout.id} is missing from the store's disk: {exc.strerror}") from None
    # A read-only shared mapping does not block sealing later; the daemon drops it at return.
    view = mmap.mmap(memfd, layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    checks: list[Future] = []
    try:
        with memoryview(view) as data:
            try:
                copied = 0
                for entry in sorted(layout.entries, key=lambda e: e.offset):
                    copied = _copy_until(src, memfd, copied, entry.offset + entry.nbytes, layout.size)
                    checks.append(pool.submit(_check_entry, data, entry))
                _copy_until(src, memfd, copied, layout.size, layout.size)
                checks.append(pool.submit(_check_padding, data, layout))
                for check in checks:
                    check.result()
            finally:
                for check in checks:
                    check.cancel()
                wait(checks)  # no hash may still read the mapping when it closes
    finally:
        view.close()
        os.close(src)


def _copy_until(src: int, memfd: int, copied: int, end: int, size: int) -> int:
    while copied < end:
        try:
            n = os.sendfile(memfd, src, copied, min(_COPY_CHUNK, size - copied))
        except OSError as exc:
            raise storage_error(exc, "loading a segment into host memory") from None
        if n == 0:
            raise IntegrityError(f"segment file ended at byte {copied} of {size}")
        copied += n
    return copied


def _check_entry(data: memoryview, entry: SegmentEntry) -> None:
    actual = digests.PREFIX + hashlib.sha256(data[entry.offset : entry.offset + entry.nbytes]).hexdigest()
    if actual != entry.digest:
        raise IntegrityError(
            f"stored bytes at offset {entry.offset} hash to {actual}, expected {entry.digest}: "
            "the store's disk copy is corrupt; push the model again"
        )


def _check_padding(data: memoryview, layout: SegmentLayout) -> None:
    position = 0
    for entry in sorted(layout.entries, key=lambda e: e.offset):
        _check_zero(data, position, entry.offset)
        position = max(position, entry.offset + entry.nbytes)
    _check_zero(data, position, layout.size)


def _check_zero(data: memoryview, start: int, end: int) -> None:
    if end > start and bytes(data[start:end]).count(0) != end - start:
        raise IntegrityError(f"padding bytes {start}..{end} of a stored segment are not zero")


def _read_only(memfd: int) -> int:
    """A read-only descriptor of the same memfd, so no receiver even holds write access."""
    try:
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:  # no /proc: the seals alone still forbid every write
        log.warning("cannot reopen memfd read-only (%s); handing out the sealed descriptor", exc)
        return os.dup(memfd)
