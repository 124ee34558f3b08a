"""The trims wire protocol, sans-IO: bytes and file descriptors in, typed messages out.

A frame is a 12-byte header followed by a UTF-8 JSON object::

    offset  size  field
    0       4     magic, b"TRIM"
    4       1     protocol version (PROTOCOL_VERSION)
    5       1     number of file descriptors sent with the frame (0..MAX_FDS_PER_FRAME)
    6       2     flags, big-endian; must be 0
    8       4     payload length n, big-endian; 12 + n <= the decoder's frame cap
    12      n     payload: {"type": "<message type>", "id": <request id>, ...named fields}

File descriptors travel beside the bytes (``SCM_RIGHTS``) and arrive no later than the
first byte of their frame; the decoder hands them, in order, to the frame that declares
them. Unknown payload fields are ignored (a newer peer may add optional ones); missing or
mistyped ones are a :class:`~trims.errors.RemoteProtocolError`, and nothing else may escape
:meth:`Decoder.feed` or :meth:`Decoder.next_message`. A peer cannot park descriptors in the
decoder: more than one frame's worth pending, or any a frame did not declare, is an error.

This module does no I/O: :mod:`trims.transport` moves the bytes and descriptors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import types
import typing
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, Union

from .errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 1
MAGIC = b"TRIM"
HEADER = struct.Struct("!4sBBHI")
MAX_FRAME_BYTES = 16 * 1024 * 1024
# What the daemon buffers of a request: requests are names, labels and small numbers (a push of
# 250 files is tens of KiB), and 1024 connections with a frame each begun stay under a GiB.
MAX_REQUEST_BYTES = 1024 * 1024
# The kernel refuses more than 253 descriptors in one sendmsg (SCM_MAX_FD).
MAX_FDS_PER_FRAME = 250
_INT_RANGE = (-(2**63), 2**64)

_MESSAGE_TYPES: dict[str, type[Message]] = {}


def _message(type_name: str):
    def register(cls):
        cls = dataclass(frozen=True, kw_only=True)(cls)
        cls.TYPE = type_name
        _MESSAGE_TYPES[type_name] = cls
        return cls

    return register


def _fds_field():
    """A field filled from the descriptors beside the frame, never from its JSON."""
    return field(default=(), metadata={"wire": False})


@dataclass(frozen=True, kw_only=True)
class Message:
    """A frame's content. ``id`` pairs a reply with its request."""

    TYPE: ClassVar[str] = ""
    id: int = 0

    @property
    def fds(self) -> tuple[int, ...]:
        return ()

    def expected_fds(self) -> int:
        """How many descriptors a valid frame of this message carries."""
        return 0


# --- records nested inside messages -------------------------------------------------


class TensorEntry(NamedTuple):
    """Where one tensor of an opened model lives: ``offset`` bytes into ``segment``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segment: int
    offset: int
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class TensorTable:
    """An opened model's tensors, one named column per field.

    Columns rather than one object per tensor keep a model of thousands of tensors cheap
    to encode and check: a few long lists of plain values.
    """

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    segments: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]

    @classmethod
    def of(cls, entries: Iterable[TensorEntry]) -> TensorTable:
        columns = tuple(zip(*entries)) or ((),) * 6
        return cls(names=columns[0], dtypes=columns[1], shapes=columns[2], segments=columns[3],
                   offsets=columns[4], nbytes=columns[5])

    def entries(self) -> list[TensorEntry]:
        """The rows; raises RemoteProtocolError if the columns differ in length."""
        columns = (self.names, self.dtypes, self.shapes, self.segments, self.offsets, self.nbytes)
        if len({len(c) for c in columns}) > 1:
            raise RemoteProtocolError("tensor table columns differ in length")
        return [TensorEntry._make(row) for row in zip(*columns)]


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    name: str
    digest: str
    nbytes: int
    tensors: int
    tiers: tuple[str, ...]
    leases: int
    segments: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    pinned: str = ""  # the tier it is pinned in, if any


@dataclass(frozen=True, kw_only=True)
class PushResult:
    """What a push stored: ``new_bytes`` is 0 when the store already held every tensor;
    ``uploaded_bytes``, what it uploaded to object storage (``to``, ``--cloud``): segments the
    cloud tier holds already, wherever, are not uploaded again (None from a daemon that does
    not say)."""

    name: str
    digest: str
    nbytes: int
    tensors: int
    new_bytes: int
    uploaded_bytes: int | None = None


# --- requests -----------------------------------------------------------------------


@_message("ping")
class Ping(Message):
    pass


@_message("open")
class Open(Message):
    """Lease a model; ``device`` asks for its copy in the memory of the CUDA device of that
    UUID (``GPU-...``): an ordinal means a different device in each container."""

    name: str
    device: str | None = None


@_message("release")
class Release(Message):
    lease: int


@_message("push")
class Push(Message):
    """Register a model from open files (``files[i]`` names the file sent as ``fds[i]``), or
    from a bucket (``url``, no files); ``to`` also uploads its segments to object storage."""

    name: str
    files: tuple[str, ...] = ()
    url: str | None = None
    to: str | None = None
    fds: tuple[int, ...] = _fds_field()

    def expected_fds(self) -> int:
        return len(self.files)


@_message("adopt")
class Adopt(Message):
    """Register open files by their content, under no name of the client's choosing (the
    transparent mode's way in); ``files[i]`` names the file sent as ``fds[i]``."""

    files: tuple[str, ...]
    fds: tuple[int, ...] = _fds_field()

    def expected_fds(self) -> int:
        return len(self.files)


@_message("get_files")
class GetFiles(Message):
    """A model's side files (config, tokenizer, ONNX graph), as read-only descriptors."""

    name: str


@_message("list")
class ListModels(Message):
    pass


@_message("info")
class Info(Message):
    name: str


@_message("evict")
class Evict(Message):
    """Drop a model from ``tier`` (``host`` or ``gpu:N``), or from host and every GPU."""

    name: str
    tier: str | None = None


@_message("remove")
class Remove(Message):
    name: str


@_message("stats")
class Stats(Message):
    pass


@_message("pull")
class Pull(Message):
    """Bring a model into a tier (``host``, ``disk`` or ``gpu:N``) without leasing it."""

    name: str
    tier: str = "host"


@_message("pin")
class Pin(Message):
    name: str
    tier: str = "host"


@_message("unpin")
class Unpin(Message):
    name: str


# --- replies ------------------------------------------------------------------------


@_message("pong")
class Pong(Message):
    daemon_version: str
    protocol_version: int
    pid: int


@_message("opened")
class Opened(Message):
    """A leased model: ``fds[i]`` is a read-only, sealed segment of ``segment_sizes[i]`` bytes,
    or, when ``device`` (the UUID asked for) is set, an exported allocation of that many
    bytes of its memory."""

    lease: int
    name: str
    digest: str
    nbytes: int
    segment_sizes: tuple[int, ...]
    tensors: TensorTable
    metadata: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    fds: tuple[int, ...] = _fds_field()

    def expected_fds(self) -> int:
        return len(self.segment_sizes)


@_message("done")
class Done(Message):
    pass


@_message("pushed")
class Pushed(Message):
    result: PushResult


@_message("models")
class ModelList(Message):
    models: tuple[ModelSummary, ...]


@_message("model")
class ModelDetails(Message):
    model: ModelSummary


@_message("evicted")
class Evicted(Message):
    name: str
    freed_bytes: int


@_message("removed")
class Removed(Message):
    name: str
    deleted_bytes: int


@_message("stats_reply")
class StatsReply(Message):
    stats: dict[str, object]


@_message("files")
class Files(Message):
    names: tuple[str, ...]
    fds: tuple[int, ...] = _fds_field()

    def expected_fds(self) -> int:
        return len(self.names)


@_message("pulled")
class Pulled(Message):
    name: str
    tier: str
    moved_bytes: int


ProgressCallback = Callable[[str, int, int], None]  # (stage, bytes done, bytes in all), from a Progress frame


@_message("progress")
class Progress(Message):
    """Sent before the reply to a long request: ``done`` of ``total`` bytes of ``stage``."""

    stage: str
    done: int
    total: int


@_message("error")
class Error(Message):
    code: str
    message: str


# --- encoding -----------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """The frame for ``message``; its descriptors (``message.fds``) travel beside it.

    Raises :class:`LocalProtocolError` if the message could not be decoded by a peer.
    """
    if type(message).TYPE not in _MESSAGE_TYPES:
        raise LocalProtocolError(f"{type(message).__name__} is not a protocol message")
    fds = message.fds
    if len(fds) != message.expected_fds():
        raise LocalProtocolError(
            f"{message.TYPE} carries {len(fds)} descriptors, expected {message.expected_fds()}"
        )
    if len(fds) > MAX_FDS_PER_FRAME:
        raise LocalProtocolError(
            f"{message.TYPE} needs {len(fds)} descriptors; one frame carries at most "
            f"{MAX_FDS_PER_FRAME}"
        )
    try:
        body = {"type": message.TYPE, **_encode_record(message, "")}
    except RemoteProtocolError as exc:  # the checks a peer would make, made here first
        raise LocalProtocolError(str(exc)) from None
    try:
        payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"{message.TYPE} is not JSON-encodable: {exc}") from None
    if HEADER.size + len(payload) > MAX_FRAME_BYTES:
        raise LocalProtocolError(
            f"{message.TYPE} frame of {HEADER.size + len(payload)} bytes exceeds the "
            f"{MAX_FRAME_BYTES}-byte cap"
        )
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, len(fds), 0, len(payload)) + payload


# --- decoding -----------------------------------------------------------------------


class Decoder:
    """Turns a byte stream and the descriptors received with it into messages.

    Feed it whatever the socket gave, in any pieces; call :meth:`next_message` until it
    returns ``None``. After the first error the decoder stays broken: the stream cannot be
    resynchronised. Descriptors not handed out in a message are the caller's to close
    (:meth:`take_fds`).
    """

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._error: RemoteProtocolError | None = None

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Take what the socket gave. Descriptors are kept even when this raises, so that
        :meth:`take_fds` hands them back to be closed."""
        self._buffer += data
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS_PER_FRAME and self._error is None:
            # More than any one frame may carry: a peer parking descriptors in the daemon.
            self._error = RemoteProtocolError(f"{len(self._fds)} descriptors arrived ahead of their frames")
        if self._error is not None:
            raise self._error

    def take_fds(self) -> list[int]:
        """Descriptors received but not yet handed out; the decoder forgets them."""
        taken = list(self._fds)
        self._fds.clear()
        return taken

    @property
    def pending_fds(self) -> int:
        """Descriptors received and not yet handed out in a message."""
        return len(self._fds)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded: non-zero at EOF means a truncated frame."""
        return len(self._buffer)

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Message | None:
        if len(self._buffer) < HEADER.size:
            return None
        magic, version, nfds, flags, length = HEADER.unpack_from(self._buffer)
        if magic != MAGIC:
            raise RemoteProtocolError(f"not a trims frame (magic {bytes(magic)!r})")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {version} is not supported (this side speaks "
                f"{PROTOCOL_VERSION}); upgrade the older of client and daemon"
            )
        if flags != 0:
            raise RemoteProtocolError(f"unknown frame flags {flags:#06x}")
        if nfds > MAX_FDS_PER_FRAME:
            raise RemoteProtocolError(f"frame declares {nfds} descriptors (max {MAX_FDS_PER_FRAME})")
        if HEADER.size + length > self._max_frame_bytes:
            raise RemoteProtocolError(
                f"frame of {HEADER.size + length} bytes exceeds the "
                f"{self._max_frame_bytes}-byte cap"
            )
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        if nfds > len(self._fds):
            raise RemoteProtocolError(
                f"frame declares {nfds} descriptors but {len(self._fds)} arrived"
            )
        if len(self._fds) > nfds and len(self._buffer) == end:
            # Descriptors come with the first byte of the frame that declares them; any more
            # with no next frame begun came with this one. Raised before any is handed out, so
            # that all stay the caller's to close.
            raise RemoteProtocolError(f"{len(self._fds)} descriptors came with a frame that declared {nfds}")
        payload = bytes(self._buffer[HEADER.size : end])
        fds = tuple(self._fds[i] for i in range(nfds))
        message = _decode_payload(payload, fds)
        del self._buffer[:end]
        for _ in range(nfds):
            self._fds.popleft()
        return message


def _decode_payload(payload: bytes, fds: tuple[int, ...]) -> Message:
    try:
        body = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"frame payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("frame payload is not a JSON object")
    type_name = body.get("type")
    cls = _MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {type_name!r}")
    values = _fields_from_wire(cls, body)
    if "fds" in {f.name for f in dataclasses.fields(cls)}:
        values["fds"] = fds
    message = cls(**values)
    if message.expected_fds() != len(fds):
        raise RemoteProtocolError(
            f"{cls.TYPE} frame carries {len(fds)} descriptors, expected {message.expected_fds()}"
        )
    return message


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


# Both directions check every value against its field's type. The checks are compiled once
# per type into closures, so a reply with thousands of tensors stays cheap. Decoding turns
# JSON lists into tuples and objects into records; encoding does the reverse.

_Converter = Callable[[Any, str], Any]
_RECORDS: dict[type, list[tuple[str, bool, _Converter, _Converter]]] = {}
_CONVERTERS: dict[Any, tuple[_Converter, _Converter]] = {}


def _fields_from_wire(cls: type, body: dict[str, Any], path: str = "") -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, required, decode, _ in _record(cls):
        if name in body:
            values[name] = decode(body[name], f"{path}{name}")
        elif required:
            raise RemoteProtocolError(f"{cls.__name__} lacks field {path + name!r}")
    return values


def _encode_record(record: Any, path: str) -> dict[str, Any]:
    return {name: encode(getattr(record, name), f"{path}{name}") for name, _, _, encode in _record(type(record))}


def _record(cls: type) -> list[tuple[str, bool, _Converter, _Converter]]:
    if cls not in _RECORDS:
        hints = typing.get_type_hints(cls)
        _RECORDS[cls] = [
            (f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
             *_converters(hints[f.name]))
            for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("wire", True)
        ]
    return _RECORDS[cls]


def _converters(hint: Any) -> tuple[_Converter, _Converter]:
    """(decode, encode) for values of type ``hint``."""
    if hint not in _CONVERTERS:
        _CONVERTERS[hint] = _build_converters(hint)
    return _CONVERTERS[hint]


def _build_converters(hint: Any) -> tuple[_Converter, _Converter]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return tuple(_optional(c) for c in _converters(inner))
    if hint is object:
        return _as_is, _as_is
    if hint in _SCALARS:
        return _SCALARS[hint], _SCALARS[hint]
    if origin in (tuple, list):
        if args[0] in _SCALARS:
            return _column(args[0], origin), _column(args[0], list)
        if typing.get_origin(args[0]) is tuple and typing.get_args(args[0])[0] is int:
            return _int_rows(origin, tuple), _int_rows(list, list)
        decode_item, encode_item = _converters(args[0])
        return _sequence(decode_item, origin), _sequence(encode_item, list)
    if origin is dict:
        return tuple(_mapping(c) for c in _converters(args[1]))
    if dataclasses.is_dataclass(hint):
        return _record_decoder(hint), _record_encoder(hint)
    raise TypeError(f"protocol field type {hint!r} has no wire form")  # a bug in a message definition


def _as_is(value: Any, path: str) -> Any:
    return value


def _optional(convert: _Converter) -> _Converter:
    return lambda value, path: None if value is None else convert(value, path)


def _sequence(item: _Converter, make: type) -> _Converter:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _mistyped(path, "list", value)
        return make(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return convert


def _column(item_type: type, make: type) -> _Converter:
    """A list of plain values, checked in one pass with no call per item."""
    kinds = _SCALAR_TYPES[item_type]

    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _mistyped(path, "list", value)
        if not all(type(v) in kinds for v in value):
            raise _mistyped(f"{path}[]", item_type.__name__, next(v for v in value if type(v) not in kinds))
        if item_type is int and value and not (_INT_RANGE[0] <= min(value) and max(value) < _INT_RANGE[1]):
            raise RemoteProtocolError(f"{path}: integer out of range")
        if item_type is float and not all(math.isfinite(v) for v in value):
            raise RemoteProtocolError(f"{path}: non-finite number")
        return make(value)

    return convert


def _int_rows(make: type, make_row: type) -> _Converter:
    """A list of lists of ints (tensor shapes), checked in one pass over every number."""

    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in value):
            raise _mistyped(path, "list of lists", value)
        numbers = [n for row in value for n in row]
        if not all(type(n) is int for n in numbers):
            raise _mistyped(f"{path}[][]", "int", next(n for n in numbers if type(n) is not int))
        if numbers and not (_INT_RANGE[0] <= min(numbers) and max(numbers) < _INT_RANGE[1]):
            raise RemoteProtocolError(f"{path}: integer out of range")
        return make(make_row(row) for row in value)

    return convert


def _mapping(item: _Converter) -> _Converter:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _mistyped(path, "dict", value)
        return {k: item(v, f"{path}.{k}") for k, v in value.items()}

    return convert


def _record_decoder(cls: type) -> _Converter:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _mistyped(path, cls.__name__, value)
        return cls(**_fields_from_wire(cls, value, f"{path}."))

    return convert


def _record_encoder(cls: type) -> _Converter:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, cls):
            raise _mistyped(path, cls.__name__, value)
        return _encode_record(value, f"{path}.")

    return convert


def _scalar(expected: type) -> _Converter:
    kinds = _SCALAR_TYPES[expected]

    def convert(value: Any, path: str) -> Any:
        if type(value) not in kinds:
            raise _mistyped(path, expected.__name__, value)
        if expected is int and not _INT_RANGE[0] <= value < _INT_RANGE[1]:
            raise RemoteProtocolError(f"{path}: integer {value} out of range")
        if expected is float:
            if not math.isfinite(value):
                raise RemoteProtocolError(f"{path}: non-finite number")
            return float(value)
        return value

    return convert


# Exact types: on the wire a bool is not an int, and an int is a fine float.
_SCALAR_TYPES: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
_SCALARS: dict[type, _Converter] = {t: _scalar(t) for t in _SCALAR_TYPES}


def _mistyped(path: str, expected: str, value: Any) -> RemoteProtocolError:
    return RemoteProtocolError(f"{path}: expected {expected}, got {type(value).__name__}")
