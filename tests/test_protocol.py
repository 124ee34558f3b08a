"""The sans-IO protocol: no sockets, bytes fed in every possible way, and fuzzed."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trims import protocol
from trims.errors import LocalProtocolError, RemoteProtocolError

TABLE = protocol.TensorTable.of([
    protocol.TensorEntry("w", "BF16", (2, 3), 0, 64, 12),
    protocol.TensorEntry("s", "F32", (), 0, 128, 4),
])
SUMMARY = protocol.ModelSummary(
    name="a/b:1", digest="blake3:" + "0" * 64, nbytes=10, tensors=1, tiers=("host", "disk"), leases=2,
    dtypes={"F32": 1}, metadata={"format": "pt"}, files=("config.json",), aliases=("a/b:latest",),
)
EXAMPLES = [
    protocol.Ping(id=1),
    protocol.Open(id=2, name="resnet50:1"),
    protocol.Release(id=3, lease=7),
    protocol.Push(id=4, name="m", files=("a.safetensors", "config.json"), fds=(10, 11)),
    protocol.ListModels(id=5),
    protocol.Info(id=6, name="m"),
    protocol.Evict(id=7, name="m"),
    protocol.Remove(id=8, name="m"),
    protocol.Stats(id=9),
    protocol.Pong(id=1, daemon_version="0.1.0", protocol_version=1, pid=42),
    protocol.Opened(id=2, lease=1, name="m:latest", digest="blake3:" + "1" * 64, nbytes=12,
                    segment_sizes=(192,), tensors=TABLE, metadata={"k": "v"}, fds=(12,)),
    protocol.Open(id=10, name="resnet50:1", device="GPU-5a1e0c8f-3b7d-4e21-9c4a-0123456789ab"),
    protocol.Opened(id=10, lease=2, name="m:latest", digest="blake3:" + "1" * 64, nbytes=12,
                    segment_sizes=(2 << 20,), tensors=TABLE,
                    device="GPU-5a1e0c8f-3b7d-4e21-9c4a-0123456789ab", fds=(13,)),
    protocol.Done(id=3),
    protocol.Pushed(id=4, result=protocol.PushResult(name="m:latest", digest="blake3:" + "2" * 64, nbytes=1, tensors=1, new_bytes=0)),
    protocol.ModelList(id=5, models=(SUMMARY,)),
    protocol.ModelDetails(id=6, model=SUMMARY),
    protocol.Evicted(id=7, name="m", freed_bytes=3),
    protocol.Removed(id=8, name="m", deleted_bytes=0),
    protocol.StatsReply(id=9, stats={"host": {"used_bytes": 1}, "list": [1, "x", None, 2.5]}),
    protocol.Error(id=9, code="model_not_found", message="no model named x"),
]


def frame(body: dict | bytes, *, nfds: int = 0, version: int = protocol.PROTOCOL_VERSION,
          magic: bytes = protocol.MAGIC, flags: int = 0) -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return protocol.HEADER.pack(magic, version, nfds, flags, len(payload)) + payload


def decode_all(data: bytes, fds=()) -> list[protocol.Message]:
    decoder = protocol.Decoder()
    decoder.feed(data, fds)
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    return messages


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(message):
    assert decode_all(protocol.encode(message), message.fds) == [message]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_byte_at_a_time(message):
    data = protocol.encode(message)
    decoder = protocol.Decoder()
    decoded = []
    for i in range(len(data)):
        # descriptors arrive with the first byte of their frame, as SCM_RIGHTS delivers them
        decoder.feed(data[i : i + 1], message.fds if i == 0 else ())
        if (m := decoder.next_message()) is not None:
            decoded.append(m)
    assert decoded == [message]
    assert decoder.buffered == 0


def test_frames_back_to_back_share_out_descriptors_in_order():
    first = protocol.Push(id=1, name="a", files=("a.safetensors",), fds=(5,))
    second = protocol.Push(id=2, name="b", files=("b.safetensors", "c.json"), fds=(6, 7))
    data = protocol.encode(first) + protocol.encode(protocol.Ping(id=3)) + protocol.encode(second)
    assert decode_all(data, [5, 6, 7]) == [first, protocol.Ping(id=3), second]


def test_wire_format_is_documented_header_and_named_json_fields():
    data = protocol.encode(protocol.Open(id=7, name="x"))
    magic, version, nfds, flags, length = struct.unpack("!4sBBHI", data[:12])
    assert (magic, version, nfds, flags, length) == (b"TRIM", 1, 0, 0, len(data) - 12)
    assert json.loads(data[12:]) == {"type": "open", "id": 7, "name": "x", "device": None}


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert decode_all(frame({"type": "open", "id": 1, "name": "x", "priority": 3})) == [protocol.Open(id=1, name="x")]


@pytest.mark.parametrize(
    "data, fds, fragment",
    [
        (frame({"type": "ping"}, magic=b"HTTP"), (), "not a trims frame"),
        (frame({"type": "ping"}, version=9), (), "version 9"),
        (frame({"type": "ping"}, flags=1), (), "flags"),
        (frame({"type": "ping"}, nfds=251), (), "descriptors"),
        (protocol.HEADER.pack(b"TRIM", 1, 0, 0, protocol.MAX_FRAME_BYTES), (), "cap"),
        (frame(b"\xff\xfe"), (), "UTF-8 JSON"),
        (frame(b"[1, 2]"), (), "not a JSON object"),
        (frame(b"{" * 100000), (), "JSON"),
        (frame(b'{"type": "open", "id": 1, "name": NaN}'), (), "JSON"),
        (frame({"type": "launch_missiles"}), (), "unknown message type"),
        (frame({"type": 3}), (), "unknown message type"),
        (frame({"type": "open", "id": 1}), (), "lacks field 'name'"),
        (frame({"type": "open", "id": 1, "name": 5}), (), "expected str"),
        (frame({"type": "open", "id": 1, "name": "x", "device": 0}), (), "expected str"),  # a UUID, not an ordinal
        (frame({"type": "release", "id": 1, "lease": True}), (), "expected int"),
        (frame({"type": "release", "id": 1, "lease": 2**70}), (), "out of range"),
        (frame({"type": "open", "id": "1", "name": "x"}), (), "expected int"),
        (frame({"type": "push", "id": 1, "name": "x", "files": ["a"]}, nfds=1), (), "arrived"),
        (frame({"type": "push", "id": 1, "name": "x", "files": ["a", "b"]}, nfds=1), (9,), "expected 2"),
        (frame({"type": "ping", "id": 1}, nfds=1), (9,), "expected 0"),
        (frame({"type": "opened", "id": 1, "lease": 1, "name": "x", "digest": "d", "nbytes": 1,
                "segment_sizes": [1], "tensors": {"names": ["w"]}}, nfds=1), (3,), "lacks field"),
        (frame({"type": "opened", "id": 1, "lease": 1, "name": "x", "digest": "d", "nbytes": 1,
                "segment_sizes": [1], "tensors": {"names": ["w"], "dtypes": [1], "shapes": [], "segments": [],
                                                  "offsets": [], "nbytes": []}}, nfds=1), (3,), "expected str"),
        (frame({"type": "opened", "id": 1, "lease": 1, "name": "x", "digest": "d", "nbytes": 1,
                "segment_sizes": [1], "tensors": {"names": [], "dtypes": [], "shapes": [[True]], "segments": [],
                                                  "offsets": [], "nbytes": []}}, nfds=1), (3,), "expected int"),
    ],
)
def test_invalid_frames_raise_remote_protocol_error(data, fds, fragment):
    decoder = protocol.Decoder()
    decoder.feed(data, fds)
    with pytest.raises(RemoteProtocolError, match=fragment):
        decoder.next_message()
    # the stream cannot be trusted any more, and unused descriptors go back to the caller
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
    assert decoder.take_fds() == list(fds)


def test_tensor_table_rows_must_line_up():
    ragged = protocol.TensorTable(names=("a", "b"), dtypes=("F32",), shapes=((),), segments=(0,), offsets=(0,), nbytes=(4,))
    with pytest.raises(RemoteProtocolError, match="differ in length"):
        ragged.entries()
    assert TABLE.entries()[1] == protocol.TensorEntry("s", "F32", (), 0, 128, 4)


def test_descriptors_cannot_be_parked_in_the_decoder():
    decoder = protocol.Decoder()
    with pytest.raises(RemoteProtocolError, match="ahead of their frames"):
        for i in range(300):  # one byte at a time, each with a descriptor, no frame ever completes
            decoder.feed(b"T" if i == 0 else b"", [1000 + i])
    assert len(decoder.take_fds()) == 251  # every one handed back to be closed


def test_descriptors_a_frame_did_not_declare_are_refused():
    decoder = protocol.Decoder()
    decoder.feed(protocol.encode(protocol.Ping(id=1)), [7, 8])
    with pytest.raises(RemoteProtocolError, match="declared 0"):
        decoder.next_message()
    assert decoder.take_fds() == [7, 8]
    # More than it declared: none is handed out in a message the error then drops
    decoder = protocol.Decoder()
    decoder.feed(protocol.encode(protocol.Adopt(id=1, files=("x.safetensors",), fds=(7,))), [7, 8])
    with pytest.raises(RemoteProtocolError, match="2 descriptors came with a frame that declared 1"):
        decoder.next_message()
    assert decoder.take_fds() == [7, 8]


def test_oversized_frame_is_refused_from_its_header_alone():
    decoder = protocol.Decoder(max_frame_bytes=1024)
    decoder.feed(protocol.HEADER.pack(b"TRIM", 1, 0, 0, 2000))
    with pytest.raises(RemoteProtocolError, match="cap"):
        decoder.next_message()


def test_encoder_refuses_what_a_peer_could_not_decode():
    with pytest.raises(LocalProtocolError, match="descriptors"):
        protocol.encode(protocol.Push(name="x", files=("a", "b"), fds=(1,)))
    with pytest.raises(LocalProtocolError, match="cap"):
        protocol.encode(protocol.Open(name="x" * protocol.MAX_FRAME_BYTES))
    with pytest.raises(LocalProtocolError, match="expected str"):
        protocol.encode(protocol.Open(name=3))
    with pytest.raises(LocalProtocolError):
        protocol.encode(protocol.StatsReply(stats={"x": float("nan")}))
    with pytest.raises(LocalProtocolError, match="at most"):
        files = tuple(f"{i}.safetensors" for i in range(300))
        protocol.encode(protocol.Push(name="x", files=files, fds=tuple(range(300))))


def _feed_and_drain(decoder: protocol.Decoder, data: bytes, fds=()) -> None:
    """Feed, then decode all there is; a RemoteProtocolError is the one allowed way out."""
    try:
        decoder.feed(data, fds)
        while decoder.next_message() is not None:
            pass
    except RemoteProtocolError:
        pass


FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512), st.lists(st.integers(0, 1000), max_size=4))
def test_fuzz_random_bytes_only_raise_protocol_errors(data, fds):
    _feed_and_drain(protocol.Decoder(max_frame_bytes=4096), data, fds)


@FUZZ
@given(
    st.sampled_from(EXAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 64),
    st.integers(1, 64),
)
def test_fuzz_mutated_valid_frames_only_raise_protocol_errors(message, flips, cut, chunk):
    data = bytearray(protocol.encode(message))
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(0, len(data) - cut)] if cut % 3 == 0 else data)
    decoder = protocol.Decoder()
    for i in range(0, len(data), chunk):
        _feed_and_drain(decoder, data[i : i + chunk], message.fds if i == 0 else ())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(sorted(protocol._MESSAGE_TYPES)), st.dictionaries(st.text(max_size=10), json_values, max_size=6), st.integers(0, 3))
def test_fuzz_well_framed_random_json_only_raises_protocol_errors(type_name, fields, nfds):
    _feed_and_drain(protocol.Decoder(), frame({**fields, "type": type_name}, nfds=nfds), range(100, 100 + nfds))


def test_a_full_listen_backlog_is_waited_out_not_a_failure(tmp_path):
    """A burst of function processes can fill the daemon's backlog for a moment: a client
    with a timeout retries until the daemon accepts, or the timeout passes."""
    import socket
    import threading

    from trims import transport
    from trims.errors import DaemonUnavailable

    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    waiting = []
    try:
        while True:  # fill the backlog
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.setblocking(False)
            try:
                extra.connect(str(path))
            except BlockingIOError:
                extra.close()
                break
            waiting.append(extra)
        with pytest.raises(DaemonUnavailable, match="accepted no connection within 0.2 s"):
            transport.connect(path, timeout=0.2)
        accepting = threading.Timer(0.3, lambda: [listener.accept() for _ in range(len(waiting) + 1)])
        accepting.start()
        transport.connect(path, timeout=10).close()
        accepting.join()
    finally:
        for extra in waiting:
            extra.close()
        listener.close()
