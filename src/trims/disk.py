"""The local-disk tier: one file per segment under ``<store>/disk``, written atomically.

A segment file appears only complete: it is written to the store's ``tmp/``, fsynced, then
renamed into place. Every read back out is verified against the segment's digests, since
disks rot and files can be edited underneath the daemon; the store sets aside a file that
fails (:meth:`DiskTier.set_aside`) in ``corrupt/``, kept for whoever looks into it.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from . import digest as digests
from .catalog import rename_durably, storage_error
from .errors import DamagedCopy
from .records import SegmentLayout
from .tier import UNBOUNDED, Fill, Tier
from .verify import Verifier

log = logging.getLogger("trims.disk")

_COPY_CHUNK = 64 * 1024 * 1024


class DiskTier(Tier):
    name = "disk"

    def __init__(self, directory: Path, temp_dir: Path, corrupt_dir: Path, pool: ThreadPoolExecutor,
                 capacity: int = UNBOUNDED, also_used: Callable[[], int] = lambda: 0) -> None:
        super().__init__(capacity)
        self._also_used = also_used  # the store's other files on this disk (side files), under the same cap
        self.directory = directory
        self._temp_dir = temp_dir
        self._corrupt_dir = corrupt_dir
        self._pool = pool
        self._sizes: dict[str, int] = {}
        directory.mkdir(mode=0o700, exist_ok=True)

    def index(self, layouts: dict[str, SegmentLayout]) -> None:
        """Take stock of the segment files after a restart; delete what is stray or partial."""
        known = {digests.hex_of(s): layout for s, layout in layouts.items()}
        for path in self.directory.iterdir():
            layout = known.get(path.stem) if path.suffix == ".bin" else None
            if layout is not None and path.stat().st_size == layout.size:
                self._sizes[layout.id] = layout.size
            else:
                log.warning("removing %s: no segment of that id and size is known", path.name)
                path.unlink()

    def path(self, segment_id: str) -> Path:
        return self.directory / f"{digests.hex_of(segment_id)}.bin"

    def has(self, segment_id: str) -> bool:
        return segment_id in self._sizes

    def segment_ids(self) -> Iterable[str]:
        return list(self._sizes)

    def bytes_used(self) -> int:
        return sum(list(self._sizes.values())) + self._also_used()  # a snapshot: puts run outside the store lock

    def put(self, layout: SegmentLayout, fill: Fill) -> None:
        fd, temp = new_temp_file(self._temp_dir, layout.size)
        try:
            fill(fd)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            Path(temp).unlink(missing_ok=True)
            raise
        os.close(fd)
        self.adopt(layout, Path(temp))

    def adopt(self, layout: SegmentLayout, complete_file: Path) -> None:
        """Move a complete, fsynced file of the segment's bytes into place (a push's output)."""
        rename_durably(complete_file, self.path(layout.id))
        self._sizes[layout.id] = layout.size

    def fetch(self, layout: SegmentLayout, destination: int) -> None:
        source = self._open(layout)
        try:
            with Verifier(destination, layout, self._pool, source="the disk tier") as verifier:
                copied = 0
                for entry in sorted(layout.entries, key=lambda e: e.offset):
                    copied = _copy_until(source, destination, copied, entry.offset + entry.nbytes, layout.size)
                    verifier.landed(entry)
                _copy_until(source, destination, copied, layout.size, layout.size)
                verifier.finish()
        finally:
            os.close(source)

    def verify(self, layout: SegmentLayout, path: Path | None = None) -> None:
        """Check a segment's file (or a new one at ``path``, not yet in the tier) against its
        digests where it lies, before it is copied elsewhere without a check of its own, as an
        upload is; raises DamagedCopy."""
        source = self._open(layout, path)
        try:
            if os.fstat(source).st_size < layout.size:  # reading a mapping past the end would be SIGBUS
                raise DamagedCopy(f"segment {layout.id[:19]}'s file on the disk tier is shorter than the segment")
            with Verifier(source, layout, self._pool, source="the disk tier") as verifier:
                for entry in layout.entries:
                    verifier.landed(entry)
                verifier.finish()
        finally:
            os.close(source)

    def evict(self, segment_id: str) -> int:
        self.path(segment_id).unlink(missing_ok=True)
        return self._sizes.pop(segment_id)

    def set_aside(self, segment_id: str) -> Path | None:
        """Take a damaged copy out of the tier, its file kept in ``corrupt/`` for a look;
        returns where, or None if there was no file to keep (or it could not be moved, and
        then a restart finds it again, and checks it again)."""
        self._sizes.pop(segment_id, None)
        try:
            self._corrupt_dir.mkdir(mode=0o700, exist_ok=True)
            stem = f"{self.path(segment_id).stem}-{time.strftime('%Y%m%dT%H%M%S')}"
            kept = next(p for n in itertools.count() if not (p := self._corrupt_dir / f"{stem}-{n}.bin").exists())
            os.replace(self.path(segment_id), kept)
            return kept
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("could not move the damaged segment file %s aside: %s", self.path(segment_id).name, exc)
            return None

    def _open(self, layout: SegmentLayout, path: Path | None = None) -> int:
        try:
            return os.open(path or self.path(layout.id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DamagedCopy(f"segment {layout.id[:19]}'s file is missing from the disk tier") from None
        except OSError as exc:
            raise storage_error(exc, f"opening segment {layout.id[:19]} on the disk tier") from None


def new_temp_file(temp_dir: Path, size: int) -> tuple[int, str]:
    """A temp file in the store with ``size`` bytes allocated, so a full disk fails here."""
    fd, name = tempfile.mkstemp(dir=temp_dir, prefix="segment-", suffix=".bin")
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        raise storage_error(exc, f"reserving {size} bytes for a segment") from None
    return fd, name


def _copy_until(source: int, destination: int, copied: int, end: int, size: int) -> int:
    while copied < end:
        try:
            n = os.sendfile(destination, source, copied, min(_COPY_CHUNK, size - copied))
        except OSError as exc:
            raise storage_error(exc, "copying a segment from the disk tier") from None
        if n == 0:
            raise DamagedCopy(f"a segment file on the disk tier ended at byte {copied} of {size}")
        copied += n
    return copied
