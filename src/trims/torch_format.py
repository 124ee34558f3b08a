"""Reading and checking a PyTorch checkpoint (``torch.save``'s zip format) or ``torch.export``
archive (``.pt2``), every byte hostile.

The format: a zip archive whose records, all stored uncompressed, lie under one top-level
directory: ``data.pkl`` (the pickled object; its tensors name their storages by key),
``data/<key>`` (each storage's bytes) and a few small records (``byteorder``, ``version``,
``.format_version``, ...). The daemon never unpickles anything: it stores each storage as a
tensor of bytes named ``data/<key>`` and every other record as a side file of that name, and
the client's ``torch.load`` (see ``transparent.py``) unpickles ``data.pkl`` over them.

A ``torch.export.save`` archive is the same kind of zip: the program (``models/<name>.json``)
and ``archive_format`` among the small records, each weight's and constant's bytes at
``data/weights/<file>`` and ``data/constants/<file>``, described by a JSON config beside them.
Those are stored as tensors of bytes too, and the client's ``torch.export.load`` deserializes
the program over them. AOTInductor packages (compiled code, ``data/aotinductor/``) are refused.

Only the standard library is used, and the zip's central directory is read through a reader
that refuses large reads: a hostile archive cannot make the daemon hold much memory.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from dataclasses import dataclass

from .errors import InvalidModel, UnsupportedFormat
from .safetensors_format import TensorSpec
from .sources import Source

SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # what torch.save's files are usually called
EXPORT_SUFFIX = ".pt2"  # torch.export.save's
PUSHABLE = (*SUFFIXES, EXPORT_SUFFIX)
MAGIC = b"PK\x03\x04"
PICKLE = "data.pkl"
TORCHSCRIPT_RECORD = "constants.pkl"
FORMAT_KEY, FORMAT = "trims.format", "torch-checkpoint"  # in the manifest's metadata
EXPORT_FORMAT = "torch-export"
EXPORT_MARK = "archive_format"  # the record only a .pt2 archive has
_EXPORT_PAYLOAD = re.compile(r"data/(weights|constants)/[A-Za-z0-9_]+")  # its configs end in .json
AOTI_DIR = "data/aotinductor/"
_OLD_EXPORT_STATE = re.compile(r"data/(weights|constants)/[^/]+\.pt")
MAX_DIRECTORY_BYTES = 16 * 1024 * 1024  # a checkpoint of 100,000 tensors has ~8 MB of it
_STORAGE = re.compile(r"data/[A-Za-z0-9_]+")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra field lengths
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch.serialization.MAGIC_NUMBER


def refuse_as_tensors(name: str, metadata: dict[str, str]) -> None:
    """Refuse a checkpoint or export archive to an adapter that would hand out its stored
    tensors as they are: they are its storages' raw bytes, not its tensors."""
    kind = metadata.get(FORMAT_KEY)
    if kind == FORMAT:
        raise InvalidModel(f"{name} is a PyTorch checkpoint, whose stored tensors are its storages' bytes: load it "
                           "with trims.torch.load_checkpoint (or trims.torch.load_state_dict, for a state dict)")
    if kind == EXPORT_FORMAT:
        raise InvalidModel(f"{name} is a torch.export archive: load it with trims.torch.load_exported")


@dataclass(frozen=True)
class Checkpoint:
    storages: tuple[TensorSpec, ...]  # each ``data/<key>`` as bytes ("U8", one dimension)
    records: dict[str, tuple[int, int]]  # every other record: name -> (start, length) in the file
    format: str = FORMAT  # or EXPORT_FORMAT


def _check_kind(source: Source) -> None:
    """Refuse, from its first bytes, a file torch.load would not read as a zip checkpoint: a
    legacy one (before PyTorch 1.6) is a pickle whose first object is torch's magic number,
    which any pickle protocol puts within the first 32 bytes."""
    head = source.read(0, min(32, source.size()))
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        raise UnsupportedFormat(f"{source.label}: a checkpoint of torch.save's legacy format (before PyTorch 1.6), "
                                "which trims does not share: save it again with torch.save, or as safetensors")
    if not head.startswith(MAGIC):
        raise InvalidModel(f"{source.label}: not a PyTorch checkpoint (torch.save writes a zip archive)")


def read_checkpoint(source: Source) -> Checkpoint:
    """Locate every record of a checkpoint, checked against the file. Raises InvalidModel."""
    label, size = source.label, source.size()
    _check_kind(source)
    try:
        with zipfile.ZipFile(_BoundedReader(source)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error,
            NotImplementedError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{label}: not a PyTorch checkpoint (its zip directory is unreadable: {exc})") from None
    prefix = _common_prefix(label, infos)
    if any(info.filename == prefix + TORCHSCRIPT_RECORD for info in infos):  # code, what torch.jit.load runs
        raise UnsupportedFormat(f"{label}: a TorchScript archive (torch.jit.save), which trims does not share: "
                                "load it with torch.jit.load, or push its weights (torch.save of its state_dict, or safetensors)")
    files = [info for info in infos if not info.is_dir()]
    exported = any(info.filename == prefix + EXPORT_MARK for info in files)
    if exported and any(info.filename.startswith(prefix + AOTI_DIR) for info in files):
        raise UnsupportedFormat(f"{label}: an AOTInductor package (compiled code), which trims does not share: load "
                                "it with torch._inductor.aoti_load_package, or push the torch.export.save archive")
    storages: list[TensorSpec] = []
    records: dict[str, tuple[int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    for info, start in zip(files, _data_starts(source, files, label)):
        name = info.filename[len(prefix):]
        if start + info.file_size > size:
            raise InvalidModel(f"{label}: record {name!r} runs past the end of the file (truncated?)")
        spans.append((start, info.file_size, name))
        if (_EXPORT_PAYLOAD if exported else _STORAGE).fullmatch(name):
            storages.append(TensorSpec(name, "U8", (info.file_size,), start, info.file_size))
        elif name.startswith("data/") and not exported:
            raise InvalidModel(f"{label}: storage record {name!r} has a name torch.save does not write")
        else:  # the small records: ingest reads them, with the side files' limits
            records[name] = (start, info.file_size)
    if exported:
        _check_export_records(label, records)
    if not exported and PICKLE not in records:
        raise InvalidModel(f"{label}: a zip archive without {PICKLE}: not a torch.save checkpoint")
    _check_apart(spans, label)
    return Checkpoint(tuple(storages), records, EXPORT_FORMAT if exported else FORMAT)


def _check_export_records(label: str, records: dict[str, tuple[int, int]]) -> None:
    """Every program with the records torch.export.load reads for it, in today's layout."""
    if any(_OLD_EXPORT_STATE.fullmatch(name) for name in records):
        raise UnsupportedFormat(f"{label}: a torch.export archive of an older layout (a whole state dict in one "
                                "data/weights/*.pt), which trims does not share: torch.export.load it and "
                                "torch.export.save it again")
    programs = [name[len("models/"):-len(".json")] for name in records
                if name.startswith("models/") and name.endswith(".json")]
    if not programs:
        raise InvalidModel(f"{label}: a torch.export archive without a program (models/*.json)")
    for program in programs:
        for needed in (f"data/weights/{program}_weights_config.json", f"data/constants/{program}_constants_config.json",
                       f"data/sample_inputs/{program}.pt", "archive_version"):
            if needed not in records:
                raise InvalidModel(f"{label}: a torch.export archive without {needed}, which torch.export.load "
                                   "reads: push the file torch.export.save wrote")


def _common_prefix(label: str, infos: list[zipfile.ZipInfo]) -> str:
    """The one top-level directory every record lies under, with its slash."""
    if not infos:
        raise InvalidModel(f"{label}: an empty zip archive, not a PyTorch checkpoint")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    if any(not info.filename.startswith(prefix) for info in infos):
        raise InvalidModel(f"{label}: records under more than one top-level directory: not a torch.save checkpoint")
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise InvalidModel(f"{label}: a record name appears twice")
    if len({name.lower() for name in names}) != len(names):  # PyTorch's zip reader may find either
        raise InvalidModel(f"{label}: two record names differ only in case")
    return prefix


def _data_starts(source: Source, infos: list[zipfile.ZipInfo], label: str) -> list[int]:
    """Where each record's bytes begin: after its local header, which the directory does not
    size. The headers are read together: from a bucket, each read is a round trip."""
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise InvalidModel(f"{label}: record {info.filename!r} is compressed; torch.save stores every record as is")
        if info.flag_bits & 0x1:
            raise InvalidModel(f"{label}: record {info.filename!r} is encrypted")
        # The directory's offsets are relative to where it says it starts: a false one puts a
        # header before the file's start, or 2**64 bytes away.
        if not 0 <= info.header_offset <= source.size() - _LOCAL_HEADER.size:
            raise InvalidModel(f"{label}: record {info.filename!r}'s header lies outside the file")
    headers = source.read_many([(info.header_offset, _LOCAL_HEADER.size) for info in infos])
    starts = []
    for info, header in zip(infos, headers):
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != MAGIC:
            raise InvalidModel(f"{label}: record {info.filename!r} has no local header where the directory says")
        starts.append(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    return starts


def _check_apart(spans: list[tuple[int, int, str]], label: str) -> None:
    """No two records share bytes: otherwise a small file could claim many times its size."""
    spans.sort()
    for (start, length, name), (next_start, _, next_name) in zip(spans, spans[1:]):
        if start + length > next_start:
            raise InvalidModel(f"{label}: records {name!r} and {next_name!r} overlap")


class _BoundedReader(io.RawIOBase):
    """A seekable file over a Source for ``zipfile``, which reads only the directory: a read
    larger than the largest directory allowed is refused, so a hostile one costs little memory."""

    def __init__(self, source: Source) -> None:
        self._source, self._size, self._position = source, source.size(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, count: int = -1) -> bytes:
        remaining = max(0, self._size - self._position)
        count = remaining if count is None or count < 0 else min(count, remaining)
        if count > MAX_DIRECTORY_BYTES:
            raise ValueError(f"a zip directory larger than {MAX_DIRECTORY_BYTES} bytes")
        data = self._source.read(self._position, count)
        self._position += count
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
