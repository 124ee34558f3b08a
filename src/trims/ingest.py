"""Turning files a client sent (as descriptors) into a manifest and a new segment.

One pass over the client's bytes: each tensor is read, hashed and written into a new
segment file in the store's ``tmp/``. What is hashed is exactly what is written, so a
client that rewrites its file during the push cannot make the store hold bytes that do not
match their digest. Tensors the store already holds (by digest) are dropped from the new
segment afterwards; a push of bytes the store already has writes no segment at all.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import digest as digests
from .catalog import storage_error
from .errors import InvalidModel
from .records import Manifest, SegmentEntry, SegmentLayout, TensorRecord
from .safetensors_format import Header, TensorSpec, read_header

WEIGHTS_SUFFIX = ".safetensors"
MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024
_LABEL = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


@dataclass(frozen=True)
class SourceFile:
    """A file the client opened and sent; ``label`` is its path relative to the model."""

    label: str
    fd: int


@dataclass
class Ingested:
    manifest: Manifest
    segment: SegmentLayout | None  # None when the store already holds every tensor
    segment_path: Path | None  # the segment's bytes, fsynced, in the store's tmp/
    side_files: dict[str, bytes]  # content digest -> bytes

    def discard(self) -> None:
        if self.segment_path is not None:
            self.segment_path.unlink(missing_ok=True)


def ingest(
    files: list[SourceFile],
    temp_dir: Path,
    is_stored: Callable[[str], bool],
    workers: int,
) -> Ingested:
    """Validate, hash and copy a model. Raises InvalidModel or StorageError; leaves no temp file."""
    weights, side = _split(files)
    headers = [(f, read_header(_regular(f), f.label)) for f in weights]
    specs = _unique_specs(headers)
    metadata = _merged_metadata(h for _, h in headers)
    side_files = {f.label: _read_side_file(f) for f in side}

    candidate = SegmentLayout.pack([(str(i), spec.nbytes) for i, (_, spec) in enumerate(specs)])
    path = _new_temp(temp_dir, candidate.size)
    try:
        tensor_digests = _copy_and_hash(specs, candidate, path, workers)
        records = tuple(
            TensorRecord(spec.name, spec.dtype, spec.shape, d, spec.nbytes)
            for (_, spec), d in zip(specs, tensor_digests)
        )
        manifest = Manifest(
            tensors=records,
            metadata=metadata,
            files={label: digests.of_bytes(data) for label, data in side_files.items()},
        )
        segment, path = _keep_new_tensors(candidate, tensor_digests, path, is_stored)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    by_digest = {digests.of_bytes(data): data for data in side_files.values()}
    return Ingested(manifest=manifest, segment=segment, segment_path=path, side_files=by_digest)


def _split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    labels = [f.label for f in files]
    for label in labels:
        if not _LABEL.fullmatch(label) or ".." in label.split("/") or len(label) > 255:
            raise InvalidModel(f"file name {label[:80]!r} is not a plain relative path")
    if len(set(labels)) != len(labels):
        raise InvalidModel("the same file name was sent twice")
    weights = [f for f in files if f.label.endswith(WEIGHTS_SUFFIX)]
    if not weights:
        raise InvalidModel(f"no {WEIGHTS_SUFFIX} file among {labels[:5]}")
    return weights, [f for f in files if not f.label.endswith(WEIGHTS_SUFFIX)]


def _regular(source: SourceFile) -> int:
    try:
        mode = os.fstat(source.fd).st_mode
    except OSError as exc:
        raise InvalidModel(f"{source.label}: cannot stat: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InvalidModel(f"{source.label}: not a regular file")
    return source.fd


def _unique_specs(headers: list[tuple[SourceFile, Header]]) -> list[tuple[int, TensorSpec]]:
    specs: list[tuple[int, TensorSpec]] = []
    owner: dict[str, str] = {}
    for source, header in headers:
        for spec in sorted(header.tensors, key=lambda s: s.start):
            if spec.name in owner:
                raise InvalidModel(
                    f"tensor {spec.name!r} appears in both {owner[spec.name]} and {source.label}"
                )
            owner[spec.name] = source.label
            specs.append((source.fd, spec))
    return specs


def _merged_metadata(headers) -> dict[str, str]:
    merged: dict[str, str] = {}
    for header in headers:
        for key, value in header.metadata.items():
            merged.setdefault(key, value)
    return merged


def _read_side_file(source: SourceFile) -> bytes:
    size = os.fstat(_regular(source)).st_size
    if size > MAX_SIDE_FILE_BYTES:
        raise InvalidModel(
            f"{source.label}: {size} bytes is more than a side file may have ({MAX_SIDE_FILE_BYTES})"
        )
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(source.fd, size - len(data), len(data))
        if not chunk:
            raise InvalidModel(f"{source.label}: truncated while reading")
        data += chunk
    return bytes(data)


def _new_temp(temp_dir: Path, size: int) -> Path:
    fd, name = tempfile.mkstemp(dir=temp_dir, prefix="push-", suffix=".bin")
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        raise storage_error(exc, f"reserving {size} bytes for a new model") from None
    os.close(fd)
    return Path(name)


def _copy_and_hash(
    specs: list[tuple[int, TensorSpec]], layout: SegmentLayout, path: Path, workers: int
) -> list[str]:
    out = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    buffers = threading.local()

    def one(job: tuple[tuple[int, TensorSpec], int]) -> str:
        (fd, spec), offset = job
        if not hasattr(buffers, "view"):
            buffers.view = memoryview(bytearray(_CHUNK))
        return _copy_range(fd, spec, out, offset, buffers.view)

    try:
        jobs = list(zip(specs, (e.offset for e in layout.entries)))
        # Large tensors first so the pool does not end on one long straggler.
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0][1].nbytes)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trims-ingest") as pool:
            results = dict(zip(order, pool.map(one, [jobs[i] for i in order])))
        os.fsync(out)
    finally:
        os.close(out)
    return [results[i] for i in range(len(jobs))]


def _copy_range(fd: int, spec: TensorSpec, out: int, offset: int, view: memoryview) -> str:
    h = digests.hasher()
    done = 0
    while done < spec.nbytes:
        want = min(len(view), spec.nbytes - done)
        try:
            got = os.preadv(fd, [view[:want]], spec.start + done)
        except OSError as exc:
            raise InvalidModel(f"cannot read tensor {spec.name!r}: {exc.strerror}") from None
        if got == 0:
            raise InvalidModel(f"file ended inside tensor {spec.name!r} (truncated while pushing)")
        h.update(view[:got])
        _pwrite_all(out, view[:got], offset + done)
        done += got
    return digests.finish(h)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise storage_error(exc, "writing a new model") from None
        data, offset = data[written:], offset + written


def _keep_new_tensors(
    candidate: SegmentLayout, tensor_digests: list[str], path: Path, is_stored: Callable[[str], bool]
) -> tuple[SegmentLayout | None, Path | None]:
    """The segment this push adds: only tensors the store lacks, each once."""
    first: dict[str, int] = {}
    for i, d in enumerate(tensor_digests):
        if not is_stored(d):
            first.setdefault(d, i)
    if not first:
        path.unlink()
        return None, None
    if len(first) == len(tensor_digests):
        entries = [SegmentEntry(d, e.offset, e.nbytes) for e, d in zip(candidate.entries, tensor_digests)]
        return SegmentLayout(size=candidate.size, entries=tuple(entries)), path
    layout = SegmentLayout.pack([(d, candidate.entries[i].nbytes) for d, i in first.items()])
    compacted = _new_temp(path.parent, layout.size)
    try:
        _copy_entries(path, compacted, [(candidate.entries[i].offset, e) for i, e in zip(first.values(), layout.entries)])
    except BaseException:
        compacted.unlink(missing_ok=True)
        raise
    finally:
        path.unlink()
    return layout, compacted


def _copy_entries(source: Path, target: Path, moves) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for src_offset, entry in moves:
            done = 0
            while done < entry.nbytes:
                try:
                    n = os.copy_file_range(src, dst, entry.nbytes - done, src_offset + done, entry.offset + done)
                except OSError as exc:
                    raise storage_error(exc, "compacting a new model") from None
                if n == 0:
                    raise InvalidModel("segment copy ended early")  # pragma: no cover - our own file
                done += n
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
