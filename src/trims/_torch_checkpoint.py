"""``torch.load`` over a PyTorch checkpoint the daemon holds, and ``torch.export.load`` over a
``.pt2`` archive (see torch_format.py).

PyTorch's own ``torch.load`` does the work (``weights_only``, ``map_location``, byte order,
its error messages): while it runs in this thread, the archive reader it opens is replaced
by one that answers from the shared copy, the pickle and small records from the model's side
files and each storage a copy-on-write view of the mapped segment. Nothing is read from the
checkpoint's file but its first four bytes. The reader is the duck type of
``torch._C.PyTorchFileReader`` that ``torch.serialization._load`` uses; a PyTorch that reads
its archives otherwise fails loudly here, in the tests, not silently. ``torch.export.load``
reads its archive through ``PT2ArchiveReader``, whose ``archive_file`` is that same duck type.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import zipfile
from typing import Any, Iterator

import torch
import torch.serialization

from .client import ModelView
from .errors import InvalidModel, UnsupportedFormat
from .onnx_format import GRAPH_FILE
from .torch_format import EXPORT_FORMAT, EXPORT_MARK, FORMAT, FORMAT_KEY, MAGIC, PICKLE, TORCHSCRIPT_RECORD

_serving = threading.local()  # .records: what the next archive opened in this thread reads
_hook_lock = threading.Lock()


def needs_file_offsets(map_location: Any) -> bool:
    """Whether this ``torch.load`` would ask where each storage lies in the file, which a
    shared copy cannot say: onto ``meta``, under a FakeTensorMode, with TORCH_SERIALIZATION_DEBUG=1."""
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "meta":
        return True
    guards = getattr(torch, "_guards", None)
    fake = guards is not None and guards.detect_fake_mode(None) is not None
    return fake or os.environ.get("TORCH_SERIALIZATION_DEBUG", "0") == "1"


def load_over(view: ModelView, records: dict[str, bytes], f: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``torch.load(f, *args, **kwargs)`` with every record read from ``view`` and ``records``
    (the model's side files); ``f`` only has to start as a zip does (default: nothing else)."""
    if view.metadata.get(FORMAT_KEY) == EXPORT_FORMAT:
        raise InvalidModel(f"{view.name} is a torch.export archive (.pt2): load it with trims.torch.load_exported")
    if view.metadata.get(FORMAT_KEY) != FORMAT or PICKLE not in records:
        raise InvalidModel(f"{view.name} is not a PyTorch checkpoint: "
                           f"{_how_to_load(records, 'trims.torch.load_state_dict')}")
    if TORCHSCRIPT_RECORD in records:  # pushed by a daemon from before TorchScript was refused
        raise UnsupportedFormat(f"{view.name} is a TorchScript archive, which trims does not share: "
                                "load its file with torch.jit.load")
    _install_reader_hook()
    kwargs["mmap"] = False  # the storages are mapped already, from shared memory
    with _serving_from("records", _SharedRecords(view, records)):
        return _real("torch.serialization.load", torch.serialization.load)(
            io.BytesIO(MAGIC) if f is None else f, *args, **kwargs)


def _how_to_load(records: dict[str, bytes], otherwise: str) -> str:
    if GRAPH_FILE in records:
        return "it is an ONNX model; run it with trims.onnxruntime.InferenceSession"
    return f"load it with {otherwise}"


def load_exported_over(view: ModelView, records: dict[str, bytes], f: Any = None, **kwargs: Any) -> Any:
    """``torch.export.load(f, **kwargs)`` with every record read from ``view`` and ``records``."""
    if view.metadata.get(FORMAT_KEY) != EXPORT_FORMAT or EXPORT_MARK not in records:
        raise InvalidModel(f"{view.name} is not a torch.export archive (.pt2): "
                           f"{_how_to_load(records, 'trims.torch.load_checkpoint or load_state_dict')}")
    try:
        _install_export_reader_hook()
    except (ImportError, AttributeError) as exc:  # a PyTorch that reads .pt2 archives some other way
        raise UnsupportedFormat(f"this PyTorch ({torch.__version__}) reads torch.export archives in a way trims "
                                f"does not know ({exc}): torch.export.load the file itself") from None
    with _serving_from("export", _SharedRecords(view, records)):
        try:
            return _real("torch.export.load", torch.export.load)(io.BytesIO(MAGIC) if f is None else f, **kwargs)
        except zipfile.BadZipFile:  # torch.export.load retries a failed archive as its old format, on our MAGIC
            raise InvalidModel(f"{view.name}: torch.export.load could not deserialize the shared copy (its "
                               "warning above says why): push the file torch.export.save wrote again") from None


@contextlib.contextmanager
def _serving_from(kind: str, records: _SharedRecords) -> Iterator[None]:
    """While the body runs, the next archive of ``kind`` this thread opens reads ``records``."""
    setattr(_serving, kind, records)
    try:
        yield
    finally:
        setattr(_serving, kind, None)


def _real(name: str, default: Any) -> Any:
    """A loader as PyTorch defines it (transparent mode may have replaced the name)."""
    from . import transparent

    return transparent.original(name) or default


class _SharedRecords:
    """What ``torch.serialization._load`` (or ``PT2ArchiveReader``) asks of an open archive,
    answered from the daemon's copy."""

    def __init__(self, view: ModelView, records: dict[str, bytes]) -> None:
        self._view = view
        self._records = records
        self.name = view.name
        # Equal storages are stored once; each key must still be its own, as in the file. Copied
        # now, before torch may change the first in place (a byte swap of a big-endian archive).
        self._copies = {name: self._shared_storage(view.index[name]).clone() for name in view.repeats
                        if view.index[name].nbytes}

    def has_record(self, name: str) -> bool:
        return name in self._records or name in self._view.index

    def get_record(self, name: str) -> bytes:
        if name in self._records:
            return self._records[name]
        if name in self._view.index:  # a payload torch reads as bytes (a pickled tensor subclass): a copy
            return self._view[name].tobytes()
        raise InvalidModel(f"{self._view.name} has no record {name!r}")

    def get_all_records(self) -> list[str]:
        return sorted([*self._records, *self._view.index])

    def serialization_id(self) -> str:
        return self._records.get(".data/serialization_id", b"").decode(errors="replace")

    def get_record_size(self, name: str) -> int:
        entry = self._view.index.get(name)
        return entry.nbytes if entry is not None else len(self.get_record(name))

    def get_storage_from_record(self, name: str, numel: int, kind: Any) -> torch.Tensor:
        """Bytes of storage ``name``: ``numel`` bytes (torch.load asks for an untyped storage)
        or ``numel`` elements of the dtype ``kind`` (torch.export.load)."""
        nbytes = numel * kind.itemsize if isinstance(kind, torch.dtype) else numel
        entry = self._view.index.get(name)
        if entry is None or entry.nbytes != nbytes:
            raise InvalidModel(f"{self._view.name} asks for storage {name!r} of {nbytes} bytes, "
                               f"which the archive does not hold")
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        copy = self._copies.get(name)
        return copy if copy is not None else self._shared_storage(entry)

    def _shared_storage(self, entry: Any) -> torch.Tensor:
        segment = memoryview(self._view.segments[entry.segment]).cast("B")
        return torch.frombuffer(segment[entry.offset : entry.offset + entry.nbytes], dtype=torch.uint8)

    def get_record_offset(self, name: str, *_: Any) -> int:  # callers check needs_file_offsets first
        raise InvalidModel(f"{self._view.name} is shared by trims and has no file offsets (asked for {name!r}): "
                           "a load that needs them (onto meta, under a FakeTensorMode) must torch.load the file itself")

    get_record_offset_no_read = get_record_header_offset = get_record_offset


def _install_reader_hook() -> None:
    """Make torch.load's archive reader ours in a thread that has set ``_serving.records``."""
    with _hook_lock:
        original = torch.serialization._open_zipfile_reader
        if getattr(original, "trims_original", None) is not None:
            return

        def open_archive(name_or_buffer: Any) -> Any:
            records = getattr(_serving, "records", None)
            if records is None:
                return original(name_or_buffer)
            _serving.records = None  # one archive per load: anything it opens itself is read as usual
            return contextlib.nullcontext(records)

        open_archive.trims_original = original
        torch.serialization._open_zipfile_reader = open_archive


def _install_export_reader_hook() -> None:
    """Make the next ``PT2ArchiveReader`` opened in a thread that has set ``_serving.export``
    read from it (only that one: any archive opened while it loads is read as usual)."""
    from torch.export.pt2_archive import _package

    with _hook_lock:
        original = _package.PT2ArchiveReader.__init__
        if getattr(original, "trims_original", None) is not None:
            return

        def open_archive(reader: Any, archive: Any) -> None:
            records = getattr(_serving, "export", None)
            if records is None:
                return original(reader, archive)
            _serving.export = None
            reader.archive_file = records
            if reader.read_string(_package.ARCHIVE_FORMAT_PATH) != _package.ARCHIVE_FORMAT_VALUE:
                raise InvalidModel(f"{records.name}: its archive_format record does not say pt2, so it is not a "
                                   "torch.export.save archive: push the file torch.export.save wrote")

        open_archive.trims_original = original
        _package.PT2ArchiveReader.__init__ = open_archive
