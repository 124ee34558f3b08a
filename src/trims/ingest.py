"""Turning a model's files (descriptors a client sent, or objects in a bucket) into a manifest
and a new segment.

In two steps, so the store can reserve disk space in between: :func:`plan` reads and checks
every header and reads the small side files; :func:`write` then makes one pass over the
tensor bytes, reading, hashing and writing each tensor into a new segment file in the
store's ``tmp/``. What is hashed is exactly what is written, so a client that rewrites its
file during the push cannot make the store hold bytes that do not match their digest.
Tensors the store already holds (by digest) are dropped from the new segment afterwards; a
push of bytes the store already has writes no segment at all.

When the disk has no room for the whole model, the store hashes first (:func:`digest`) and
then writes only the tensors it lacks (:func:`only_new`, :func:`write_new`): two reads of
those, but a re-push, or a fine-tune that shares most of its tensors, needs room for its new
bytes alone.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import digest as digests
from . import protocol, torch_format
from .catalog import MAX_SEGMENTS_PER_MODEL, storage_error
from .disk import new_temp_file
from .errors import IntegrityError, InvalidModel, LocalProtocolError
from .records import Manifest, SegmentEntry, SegmentLayout, TensorRecord
from .safetensors_format import MAX_HEADER_BYTES, TensorSpec, read_header
from .protocol import MAX_FDS_PER_FRAME
from .sources import Slice, Source

WEIGHTS_SUFFIX = ".safetensors"
MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024
MAX_SIDE_FILES = MAX_FDS_PER_FRAME  # a client gets every side file as a descriptor, all in one reply
MAX_SIDE_BYTES = 256 * 1024 * 1024  # all of them together: the daemon holds them in memory while it pushes
_CHUNK = 8 * 1024 * 1024
LABEL = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")  # a side file's name: a plain relative path

Progress = Callable[[int, int], None]  # (bytes done, bytes in all); called from any thread


@dataclass
class Plan:
    """A checked model, not yet copied: its tensors in file order and a segment to hold them."""

    specs: list[tuple[Source, TensorSpec]]
    metadata: dict[str, str]
    side_files: dict[str, bytes]  # label -> bytes
    candidate: SegmentLayout  # every tensor, before deduplication

    @property
    def size(self) -> int:
        return self.candidate.size

    @property
    def side_bytes(self) -> int:
        return sum(len(data) for data in self.side_files.values())

    @functools.cached_property
    def side_digests(self) -> dict[str, str]:
        """label -> content digest of each side file, hashed once for the manifest, the
        commit and the disk reservation."""
        return {label: digests.of_bytes(data) for label, data in self.side_files.items()}


@dataclass
class Ingested:
    manifest: Manifest
    segment: SegmentLayout | None  # None when the store already holds every tensor
    segment_path: Path | None  # the segment's bytes, fsynced, in the store's tmp/
    side_files: dict[str, bytes]  # content digest -> bytes
    sources: dict[str, tuple[str, int]] = field(default_factory=dict)  # tensor digest -> (file label, offset)

    def discard(self) -> None:
        if self.segment_path is not None:
            self.segment_path.unlink(missing_ok=True)


def plan(files: list[Source]) -> Plan:
    """Check every header and read the side files. Raises InvalidModel."""
    weights, side = _split(files)
    if weights[0].label.endswith(torch_format.PUSHABLE):
        return _plan_checkpoint(weights[0], side)
    specs: list[tuple[Source, TensorSpec]] = []
    owner: dict[str, str] = {}
    metadata: dict[str, str] = {}
    header_bytes = 0
    for source in weights:  # one header at a time: the same file sent 250 times fails at its second
        header = read_header(source)
        header_bytes += header.nbytes
        if header_bytes > MAX_HEADER_BYTES:
            raise InvalidModel(f"the model's safetensors headers hold more than {MAX_HEADER_BYTES} bytes together, "
                               "as much as one file's may: that many tensors are more than trims serves as one model")
        for spec in sorted(header.tensors, key=lambda s: s.start):
            if spec.name in owner:
                raise InvalidModel(f"tensor {spec.name!r} appears in both {owner[spec.name]} and {source.label}")
            owner[spec.name] = source.label
            specs.append((source, spec))
        for key, value in header.metadata.items():
            metadata.setdefault(key, value)
    _check_reply_fits(specs, metadata)
    return Plan(specs, metadata, _read_side_files(side), _candidate(specs))


def _check_reply_fits(specs: list[tuple[Source, TensorSpec]], metadata: dict[str, str]) -> None:
    """Refuse a model whose open could not be answered: the reply lists every tensor and the
    metadata in one frame (say, tens of megabytes of ``__metadata__``)."""
    table = protocol.TensorTable(names=tuple(spec.name for _, spec in specs), dtypes=tuple(s.dtype for _, s in specs),
                                 shapes=tuple(tuple(s.shape) for _, s in specs), segments=(0,) * len(specs),
                                 offsets=(2**40,) * len(specs), nbytes=tuple(s.nbytes for _, s in specs))
    reply = protocol.Opened(lease=2**40, name="n" * 256, digest="blake3:" + "0" * 64, nbytes=2**40,
                            segment_sizes=(2**40,) * MAX_SEGMENTS_PER_MODEL, tensors=table, metadata=metadata,
                            fds=(0,) * MAX_SEGMENTS_PER_MODEL)
    try:
        protocol.encode(reply)
    except LocalProtocolError:
        raise InvalidModel(f"the model's {len(specs)} tensors and {len(json.dumps(metadata))} bytes of __metadata__ "
                           f"are more than one open's reply can carry ({protocol.MAX_FRAME_BYTES} bytes): split it "
                           "into models of fewer tensors, or move metadata into a side file") from None


def _plan_checkpoint(source: Source, side: list[Source]) -> Plan:
    """A PyTorch checkpoint: its storages as tensors of bytes, its other records (the pickle
    among them) as side files beside any others (see torch_format.py)."""
    checkpoint = torch_format.read_checkpoint(source)
    labels = {f.label for f in side}
    for name in checkpoint.records:
        _check_label(name)
        if name in labels:
            raise InvalidModel(f"{source.label}: its record {name!r} has the name of a file pushed beside it")
    records = [Slice(name, source, start, length) for name, (start, length) in checkpoint.records.items()]
    side_files = _read_side_files([*side, *records])
    if checkpoint.format == torch_format.EXPORT_FORMAT and side_files[torch_format.EXPORT_MARK] != b"pt2":
        raise InvalidModel(f"{source.label}: its {torch_format.EXPORT_MARK} record does not say pt2, so it is not a "
                           "torch.export.save archive: push the file torch.export.save wrote")
    specs = [(source, spec) for spec in sorted(checkpoint.storages, key=lambda s: s.start)]
    metadata = {torch_format.FORMAT_KEY: checkpoint.format}
    _check_reply_fits(specs, metadata)
    return Plan(specs, metadata, side_files, _candidate(specs))


def _candidate(specs: list[tuple[Source, TensorSpec]]) -> SegmentLayout:
    """Every tensor's place in the segment a push writes, before equal ones are dropped."""
    return SegmentLayout.pack([(str(i), spec.nbytes) for i, (_, spec) in enumerate(specs)])


def write(planned: Plan, temp_dir: Path, covered: Callable[[Manifest], set[str]], workers: int,
          progress: Progress | None = None) -> Ingested:
    """Copy and hash every tensor; keep those not already in segments the model may be read
    from (``covered`` says which, given its manifest). Leaves no temp file on error."""
    path, tensor_digests = _write_file(planned, temp_dir, workers, progress)
    try:
        manifest = _manifest(planned, tensor_digests)
        segment, path = _keep_new_tensors(planned.candidate, tensor_digests, path, covered(manifest))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return _ingested(planned, manifest, segment, path)


def digest(planned: Plan, workers: int, progress: Progress | None = None) -> Manifest:
    """The model's manifest, from reading and hashing every tensor; writes nothing (the first
    pass of a push the disk has no room for whole: see :func:`only_new`)."""
    return _manifest(planned, _copy_and_hash(planned, None, workers, progress))


def only_new(planned: Plan, manifest: Manifest, stored: set[str]) -> Plan:
    """What a second pass must write: each tensor not ``stored``, once, in the segment the
    one-pass :func:`write` would have kept (its candidate's entries carry their digests)."""
    first = _first_of_each_new([record.digest for record in manifest.tensors], stored)
    candidate = SegmentLayout.pack([(d, planned.specs[i][1].nbytes) for d, i in first.items()])
    return Plan([planned.specs[i] for i in first.values()], planned.metadata, planned.side_files, candidate)


def write_new(planned: Plan, new: Plan, manifest: Manifest, temp_dir: Path, workers: int,
              progress: Progress | None = None) -> Ingested:
    """The second pass: copy ``new``'s tensors (:func:`only_new`) into a segment, each hashed
    again as it is written, so the store never holds bytes other than those it hashed; a file
    rewritten between the passes fails the push."""
    if not new.specs:
        return _ingested(planned, manifest, None, None)
    path, written = _write_file(new, temp_dir, workers, progress)
    if written != [entry.digest for entry in new.candidate.entries]:
        path.unlink()
        raise InvalidModel("the model's files changed while they were pushed (its tensors hashed differently on "
                           "a second read); push it again once they are complete")
    return _ingested(planned, manifest, new.candidate, path)


def _write_file(planned: Plan, temp_dir: Path, workers: int, progress: Progress | None) -> tuple[Path, list[str]]:
    """``planned``'s candidate segment as a new, fsynced file in ``temp_dir``, and each tensor's
    digest; leaves no file on error."""
    fd, name = new_temp_file(temp_dir, planned.size)
    try:
        try:
            tensor_digests = _copy_and_hash(planned, fd, workers, progress)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), tensor_digests


def _manifest(planned: Plan, tensor_digests: list[str]) -> Manifest:
    records = tuple(
        TensorRecord(spec.name, spec.dtype, spec.shape, d, spec.nbytes)
        for (_, spec), d in zip(planned.specs, tensor_digests)
    )
    return Manifest(tensors=records, metadata=planned.metadata, files=planned.side_digests)


def _ingested(planned: Plan, manifest: Manifest, segment: SegmentLayout | None, path: Path | None) -> Ingested:
    sources = {r.digest: (source.label, spec.start) for (source, spec), r in zip(planned.specs, manifest.tensors)}
    by_digest = {planned.side_digests[label]: data for label, data in planned.side_files.items()}
    return Ingested(manifest=manifest, segment=segment, segment_path=path, side_files=by_digest, sources=sources)


def _split(files: list[Source]) -> tuple[list[Source], list[Source]]:
    """The weights (safetensors files, or one PyTorch checkpoint) and the side files."""
    labels = [f.label for f in files]
    for label in labels:
        _check_label(label)
    if len(set(labels)) != len(labels):
        raise InvalidModel("the same file name was sent twice")
    weights = [f for f in files if f.label.endswith(WEIGHTS_SUFFIX)]
    checkpoints = [f for f in files if f.label.endswith(torch_format.PUSHABLE)]
    if checkpoints and (weights or len(checkpoints) > 1):
        raise InvalidModel(f"a model's weights are {WEIGHTS_SUFFIX} files or one PyTorch checkpoint, not "
                           f"{', '.join(f.label for f in [*weights, *checkpoints][:3])}: push them as separate models")
    weights = weights or checkpoints
    if not weights:
        raise InvalidModel(f"no {WEIGHTS_SUFFIX} file or PyTorch checkpoint ({', '.join(torch_format.PUSHABLE)}) "
                           f"among {labels[:5]}")
    return weights, [f for f in files if f not in weights]


def plain_label(label: str) -> bool:
    """A side file's name as a path relative to the model's directory, each file one way:
    no ``.`` or ``..`` parts (``./config.json`` and ``config.json`` would be two files that
    one directory holds as one)."""
    return bool(LABEL.fullmatch(label)) and not {".", ".."} & set(label.split("/")) and len(label) <= 255


def _check_label(label: str) -> None:
    if not plain_label(label):
        raise InvalidModel(f"file name {label[:80]!r} is not a plain relative path")


def _read_side_files(side: list[Source]) -> dict[str, bytes]:
    """Label -> bytes of every side file, each size checked before anything is read."""
    if len(side) > MAX_SIDE_FILES:
        raise InvalidModel(f"{len(side)} side files (config, tokenizer, a checkpoint's small records) are more than "
                           f"a model may have ({MAX_SIDE_FILES}): push only the files the model needs")
    sizes = [source.size() for source in side]
    for source, size in zip(side, sizes):
        if size > MAX_SIDE_FILE_BYTES:
            raise InvalidModel(f"{source.label}: {size} bytes is more than a side file may have ({MAX_SIDE_FILE_BYTES})")
    if sum(sizes) > MAX_SIDE_BYTES:
        raise InvalidModel(f"the side files come to {sum(sizes)} bytes, more than a model's may ({MAX_SIDE_BYTES}): "
                           "store large data as tensors, in a safetensors file")
    parallel = max([1, *(source.parallel_reads for source in side)])  # from a bucket: each a round trip
    with ThreadPoolExecutor(min(parallel, max(1, len(side))), thread_name_prefix="trims-push") as io:
        contents = list(io.map(lambda source, size: source.read(0, size), side, sizes))
    return {source.label: data for source, data in zip(side, contents)}


def _copy_and_hash(planned: Plan, out: int | None, workers: int, progress: Progress | None) -> list[str]:
    """Each tensor's digest, in ``planned``'s order; with ``out``, each also written at its
    offset in the candidate segment.

    The work is cut into chunks, not tensors, so one large tensor (an embedding, a language
    model's head) is read by many threads at once: from a bucket each ranged read waits a
    round trip, and a tensor read one chunk after another would be the push's straggler. A
    tensor's chunks are hashed in order, each by the thread that read it, so every thread
    keeps a single chunk buffer and memory stays ``workers`` chunks whatever the model.
    """
    hashes = [_OrderedHash() for _ in planned.specs]
    errors: list[BaseException] = []  # in the order they happened; the first is the one raised
    buffers = threading.local()
    done, total = [0], sum(spec.nbytes for _, spec in planned.specs)
    lock = threading.Lock()

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        for h in hashes:  # no chunk may go on waiting for one that will never be hashed
            h.stop()

    def one(piece: tuple[int, int, int, int]) -> None:
        if errors:  # start no further reads
            return
        index, number, at, length = piece
        source, spec = planned.specs[index]
        try:
            if not hasattr(buffers, "view"):
                buffers.view = memoryview(bytearray(_CHUNK))
            view = buffers.view[:length]
            _read_exactly(source, spec, at, view)
            if not hashes[index].add(number, view):
                return
            if out is not None:
                _pwrite_all(out, view, planned.candidate.entries[index].offset + at)
            if progress is not None:
                with lock:
                    done[0] += length
                    progress(done[0], total)
        except BaseException as exc:
            fail(exc)

    workers = max([workers, *(source.parallel_reads for source in {source for source, _ in planned.specs})])
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trims-ingest") as pool:
        try:
            for _ in pool.map(one, _pieces(planned)):
                pass
        except BaseException as exc:  # interrupted: chunks not yet run are cancelled
            fail(exc)
            raise
    if errors:
        raise errors[0]
    return [digests.finish(h.hasher) for h in hashes]


def _pieces(planned: Plan) -> list[tuple[int, int, int, int]]:
    """(tensor index, chunk number, offset in the tensor, length) for every chunk, large
    tensors first so the pool does not end on one long straggler, each tensor's in order:
    the pool starts tasks in this order, so a chunk's predecessor has always started."""
    order = sorted(range(len(planned.specs)), key=lambda i: -planned.specs[i][1].nbytes)
    return [(index, number, at, min(_CHUNK, planned.specs[index][1].nbytes - at))
            for index in order
            for number, at in enumerate(range(0, planned.specs[index][1].nbytes, _CHUNK))]


class _OrderedHash:
    """A tensor's hasher, fed its chunks in order by whichever threads read them."""

    def __init__(self) -> None:
        self.hasher = digests.hasher()
        self._next = 0  # the chunk the hasher waits for
        self._stopped = False  # a chunk failed somewhere: the push is over
        self._turn = threading.Condition()

    def add(self, number: int, data: memoryview) -> bool:
        """Hash chunk ``number`` once the ones before it are; False if the push stopped."""
        with self._turn:
            self._turn.wait_for(lambda: self._next == number or self._stopped)
            if self._stopped:
                return False
            self.hasher.update(data)
            self._next += 1
            self._turn.notify_all()
            return True

    def stop(self) -> None:
        with self._turn:
            self._stopped = True
            self._turn.notify_all()


def _read_exactly(source: Source, spec: TensorSpec, at: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = source.read_into(spec.start + at + done, view[done:])
        if got == 0:
            raise InvalidModel(f"{source.label}: file ended inside tensor {spec.name!r} (truncated while pushing)")
        done += got


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise storage_error(exc, "writing a new model") from None
        data, offset = data[written:], offset + written


def _keep_new_tensors(
    candidate: SegmentLayout, tensor_digests: list[str], path: Path, stored: set[str]
) -> tuple[SegmentLayout | None, Path | None]:
    """The segment this push adds: only tensors not ``stored`` already, each once."""
    first = _first_of_each_new(tensor_digests, stored)
    if not first:
        path.unlink()
        return None, None
    if len(first) == len(tensor_digests):
        entries = [SegmentEntry(d, e.offset, e.nbytes) for e, d in zip(candidate.entries, tensor_digests)]
        return SegmentLayout(size=candidate.size, entries=tuple(entries)), path
    keep = [SegmentEntry(d, candidate.entries[i].offset, candidate.entries[i].nbytes) for d, i in first.items()]
    layout = SegmentLayout.pack([(e.digest, e.nbytes) for e in keep])
    try:
        return layout, repack(path, keep, layout, path.parent)
    finally:
        path.unlink()


def _first_of_each_new(tensor_digests: list[str], stored: set[str]) -> dict[str, int]:
    """Digest -> index of its first tensor, for the digests not ``stored``, in tensor order."""
    first: dict[str, int] = {}
    for i, d in enumerate(tensor_digests):
        if d not in stored:
            first.setdefault(d, i)
    return first


def repack(source: Path, keep: list[SegmentEntry], layout: SegmentLayout, temp_dir: Path) -> Path:
    """A new segment file in ``temp_dir`` laid out as ``layout`` (``SegmentLayout.pack`` of
    ``keep``), holding the tensors ``keep`` locates in ``source``; copied in the kernel."""
    fd, target = new_temp_file(temp_dir, layout.size)
    os.close(fd)
    try:
        _copy_entries(source, Path(target), [(e.offset, placed) for e, placed in zip(keep, layout.entries)])
    except BaseException:
        Path(target).unlink(missing_ok=True)
        raise
    return Path(target)


def _copy_entries(source: Path, target: Path, moves: list[tuple[int, SegmentEntry]]) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for src_offset, entry in moves:
            done = 0
            while done < entry.nbytes:
                try:
                    n = os.copy_file_range(src, dst, entry.nbytes - done, src_offset + done, entry.offset + done)
                except OSError as exc:
                    raise storage_error(exc, "packing tensors into a segment") from None
                if n == 0:
                    raise IntegrityError(f"{source.name} ended before the tensors it should hold")
                done += n
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
