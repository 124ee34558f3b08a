"""The local-disk tier: one file per segment under ``<store>/disk``, written atomically.

A segment file appears only complete: it is written to the store's ``tmp/``, fsynced, then
renamed into place. Every read back out is verified against the segment's digests, since
disks rot and files can be edited underneath the daemon; a file that fails is set aside in
the store's ``corrupt/`` (kept for whoever looks into it, never served again).
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from . import digest as digests
from .catalog import rename_durably, storage_error
from .errors import IntegrityError
from .records import SegmentLayout
from .tier import UNBOUNDED, Fill, Tier
from .verify import Verifier

log = logging.getLogger("trims.disk")

_COPY_CHUNK = 64 * 1024 * 1024


class DiskTier(Tier):
    name = "disk"

    def __init__(self, directory: Path, temp_dir: Path, corrupt_dir: Path, pool: ThreadPoolExecutor,
                 capacity: int = UNBOUNDED) -> None:
        super().__init__(capacity)
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
        return sum(list(self._sizes.values()))  # a snapshot: puts run outside the store lock

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
        try:
            source = os.open(self.path(layout.id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise IntegrityError(f"segment {layout.id[:19]} is missing from the disk tier: {exc.strerror}") from None
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

    def evict(self, segment_id: str) -> int:
        self.path(segment_id).unlink(missing_ok=True)
        return self._sizes.pop(segment_id)

    def set_aside(self, segment_id: str) -> Path:
        """Take a segment whose file failed its digests out of the tier, keeping the file in
        ``corrupt/``; returns where it went. Readers that have it open read on undisturbed."""
        self._corrupt_dir.mkdir(mode=0o700, exist_ok=True)
        kept = self._corrupt_dir / self.path(segment_id).name
        try:
            os.replace(self.path(segment_id), kept)
        except FileNotFoundError:
            pass  # gone already (edited away underneath the daemon): nothing to keep
        except OSError as exc:
            log.warning("could not move corrupt segment file %s aside (%s); deleting it", kept.name, exc)
            self.path(segment_id).unlink(missing_ok=True)
        self._sizes.pop(segment_id, None)
        return kept


def new_temp_file(temp_dir: Path, size: int) -> tuple[int, str]:
    """A temp file in the store with ``size`` bytes allocated, so a full disk fails here."""
    fd, name = tempfile.mkstemp(dir=temp_dir, prefix="segment-", suffix=".bin")
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        raise storage_error(exc, f"reserving {size} bytes on the store's disk") from None
    return fd, name


def _copy_until(source: int, destination: int, copied: int, end: int, size: int) -> int:
    while copied < end:
        try:
            n = os.sendfile(destination, source, copied, min(_COPY_CHUNK, size - copied))
        except OSError as exc:
            raise storage_error(exc, "copying a segment from the disk tier") from None
        if n == 0:
            raise IntegrityError(f"a segment file on the disk tier ended at byte {copied} of {size}")
        copied += n
    return copied
