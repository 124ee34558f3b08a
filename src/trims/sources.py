"""Where a push reads model files from: a descriptor a client sent, or an object in a bucket."""

from __future__ import annotations

import fcntl
import os
import stat
from abc import ABC, abstractmethod

from .errors import InvalidModel


class Source(ABC):
    """A read-only file of a model being pushed; ``label`` is its name relative to the model."""

    label: str
    parallel_reads = 1  # reads worth having in flight at once whatever the CPUs (a bucket's: many)

    @abstractmethod
    def size(self) -> int:
        """The file's length in bytes."""

    @abstractmethod
    def read_into(self, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset``; 0 means end of file."""

    def read(self, offset: int, count: int) -> bytes:
        """Exactly ``count`` bytes at ``offset``; InvalidModel if the file is shorter."""
        buffer = bytearray(count)
        view, done = memoryview(buffer), 0
        while done < count:
            got = self.read_into(offset + done, view[done:])
            if got == 0:
                raise InvalidModel(f"{self.label}: truncated while reading")
            done += got
        return bytes(buffer)

    def read_many(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """``read(offset, count)`` for each span, in order; a remote source overlaps them."""
        return [self.read(offset, count) for offset, count in spans]


class Slice(Source):
    """A stretch of another source, as a file of its own (a record inside a checkpoint)."""

    def __init__(self, label: str, whole: Source, start: int, length: int) -> None:
        self.label, self._whole, self._start, self._length = label, whole, start, length
        self.parallel_reads = whole.parallel_reads

    def size(self) -> int:
        return self._length

    def read_into(self, offset: int, view: memoryview) -> int:
        count = max(0, min(len(view), self._length - offset))
        return self._whole.read_into(self._start + offset, view[:count]) if count else 0


class FileSource(Source):
    """A file the client opened and passed as a descriptor: the daemon never opens its path."""

    def __init__(self, label: str, fd: int) -> None:
        self.label = label
        self._fd = fd
        try:
            info = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            raise InvalidModel(f"{label}: cannot stat: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidModel(f"{label}: not a regular file")
        # An O_PATH descriptor lets a client name a file it may not read: it must not count.
        if flags & getattr(os, "O_PATH", 0) or flags & os.O_ACCMODE == os.O_WRONLY:
            raise InvalidModel(f"{label}: the descriptor is not open for reading")

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def identity(self) -> tuple[int, int, int, int, int]:
        """What stays the same while the file's bytes do: a write changes the change time,
        which no one can set back."""
        info = os.fstat(self._fd)
        return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns

    def read_into(self, offset: int, view: memoryview) -> int:
        try:
            return os.preadv(self._fd, [view], offset)
        except OSError as exc:
            raise InvalidModel(f"{self.label}: cannot read: {exc.strerror}") from None
