"""Checking a segment's bytes against its layout while they land.

A tier that reads stored bytes (disk, cloud) writes them into a destination descriptor and
tells a :class:`Verifier` each time one tensor's bytes are complete; the verifier hashes it
on a thread pool, overlapping the copy. :meth:`Verifier.finish` then checks that the
padding is zero and raises :class:`~trims.errors.DamagedCopy` if anything differs. The
destination is read through a read-only shared mapping, which does not stop a memfd from
being sealed.
"""

from __future__ import annotations

import mmap
from concurrent.futures import Future, ThreadPoolExecutor, wait

from . import digest as digests
from .errors import DamagedCopy
from .records import SegmentEntry, SegmentLayout


class Verifier:
    def __init__(self, destination: int, layout: SegmentLayout, pool: ThreadPoolExecutor, source: str) -> None:
        self._layout = layout
        self._pool = pool
        self._source = source  # where the bytes came from, for the error message
        self._map = mmap.mmap(destination, layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self._view = memoryview(self._map)
        self._checks: list[Future] = []

    def landed(self, entry: SegmentEntry) -> None:
        """``entry``'s bytes are all in the destination: hash them."""
        self._checks.append(self._pool.submit(self._check_entry, entry))

    def finish(self) -> None:
        """Wait for every hash and check the padding; raises DamagedCopy."""
        self._checks.append(self._pool.submit(self._check_padding))
        for check in self._checks:
            check.result()

    def close(self) -> None:
        """Stop pending hashes and unmap; safe after an error."""
        for check in self._checks:
            check.cancel()
        wait(self._checks)  # no hash may still read the mapping when it closes
        self._view.release()
        self._map.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_entry(self, entry: SegmentEntry) -> None:
        actual = digests.of_bytes(self._view[entry.offset : entry.offset + entry.nbytes])
        if actual != entry.digest:
            raise DamagedCopy(
                f"bytes at offset {entry.offset} of segment {self._layout.id[:19]} from {self._source} hash to "
                f"{actual[:19]}…, expected {entry.digest[:19]}…: that copy is corrupt and was not served"
            )

    def _check_padding(self) -> None:
        position = 0
        for entry in sorted(self._layout.entries, key=lambda e: e.offset):
            self._check_zero(position, entry.offset)
            position = max(position, entry.offset + entry.nbytes)
        self._check_zero(position, self._layout.size)

    def _check_zero(self, start: int, end: int) -> None:
        if end > start and bytes(self._view[start:end]).count(0) != end - start:
            raise DamagedCopy(
                f"padding bytes {start}..{end} of segment {self._layout.id[:19]} from {self._source} are not zero"
            )
