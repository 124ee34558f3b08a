"""``torch.load`` over a PyTorch checkpoint the daemon holds (see torch_format.py).

PyTorch's own ``torch.load`` does the work (``weights_only``, ``map_location``, byte order,
its error messages): while it runs in this thread, the archive reader it opens is replaced
by one that answers from the shared copy, the pickle and small records from the model's side
files and each storage a copy-on-write view of the mapped segment. Nothing is read from the
checkpoint's file but its first four bytes. The reader is the duck type of
``torch._C.PyTorchFileReader`` that ``torch.serialization._load`` uses; a PyTorch that reads
its archives otherwise fails loudly here, in the tests, not silently.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Any

import torch
import torch.serialization

from .client import ModelView
from .errors import InvalidModel, UnsupportedFormat
from .torch_format import FORMAT, FORMAT_KEY, MAGIC, PICKLE, TORCHSCRIPT_RECORD

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
    if view.metadata.get(FORMAT_KEY) != FORMAT or PICKLE not in records:
        raise InvalidModel(f"{view.name} is not a PyTorch checkpoint: load it with trims.torch.load_state_dict")
    if TORCHSCRIPT_RECORD in records:  # pushed by a daemon from before TorchScript was refused
        raise UnsupportedFormat(f"{view.name} is a TorchScript archive, which trims does not share: "
                                "load its file with torch.jit.load")
    _install_reader_hook()
    kwargs["mmap"] = False  # the storages are mapped already, from shared memory
    _serving.records = _SharedRecords(view, records)
    try:
        return _real_load()(io.BytesIO(MAGIC) if f is None else f, *args, **kwargs)
    finally:
        _serving.records = None


def _real_load() -> Any:
    """torch.load as PyTorch defines it (transparent mode may have replaced the name)."""
    from . import transparent

    return transparent.original("torch.serialization.load") or torch.serialization.load


class _SharedRecords:
    """What ``torch.serialization._load`` asks of an open archive, answered from the daemon's copy."""

    def __init__(self, view: ModelView, records: dict[str, bytes]) -> None:
        self._view = view
        self._records = records

    def has_record(self, name: str) -> bool:
        return name in self._records or name in self._view.index

    def get_record(self, name: str) -> bytes:
        try:
            return self._records[name]
        except KeyError:
            raise InvalidModel(f"{self._view.name} has no record {name!r}") from None

    def get_all_records(self) -> list[str]:
        return sorted([*self._records, *self._view.index])

    def serialization_id(self) -> str:
        return self._records.get(".data/serialization_id", b"").decode(errors="replace")

    def get_storage_from_record(self, name: str, nbytes: int, _storage_type: Any) -> torch.Tensor:
        entry = self._view.index.get(name)
        if entry is None or entry.nbytes != nbytes:
            raise InvalidModel(f"{self._view.name}'s pickle asks for storage {name!r} of {nbytes} bytes, "
                               f"which the checkpoint does not hold")
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        segment = memoryview(self._view.segments[entry.segment]).cast("B")
        storage = torch.frombuffer(segment[entry.offset : entry.offset + nbytes], dtype=torch.uint8)
        # Equal storages are stored once; each key must still be its own, as in the file.
        return storage.clone() if name in self._view.repeats else storage

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
