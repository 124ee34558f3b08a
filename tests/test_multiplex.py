"""One client, many threads: replies matched to requests by id, so no thread waits behind
another's request. The multiplexer against a scripted peer on a real socket pair, then a
real daemon."""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading

import pytest

import trims
from trims import protocol
from trims.errors import ConnectionLost, PeerStalled
from trims.multiplex import Multiplexer
from trims.server import MAX_WAITING_REQUESTS
from trims.transport import Channel

from .conftest import DaemonProcess, make_models, wait_for


class ScriptedDaemon:
    """The far end of a socket pair, answering as a test tells it to."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = Channel(ours)
        self.orphans: list[protocol.Message] = []
        self.client = Multiplexer(Channel(theirs), self.orphans.append)

    def requests(self, count: int) -> list[protocol.Message]:
        return [self.channel.receive(5, 5) for _ in range(count)]


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``function`` in a thread of its own; the list gets its result or its exception."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(function(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 -- the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def call_in_thread(client: Multiplexer, message: protocol.Message, **kwargs) -> tuple[threading.Thread, list]:
    return in_thread(client.call, message, **kwargs)


def answer(request: protocol.Message) -> protocol.Error:
    """A reply that names the request it answers (any final frame will do)."""
    return protocol.Error(id=request.id, code="test", message=getattr(request, "name", request.TYPE))


def test_replies_reach_their_threads_in_any_order():
    peer = ScriptedDaemon()
    first, first_outcome = call_in_thread(peer.client, protocol.Info(name="first"))
    first_request, = peer.requests(1)
    second, second_outcome = call_in_thread(peer.client, protocol.Info(name="second"))
    second_request, = peer.requests(1)
    seen = []
    peer.channel.send(protocol.Progress(id=second_request.id, stage="load", done=1, total=2))
    peer.channel.send(answer(second_request))  # the later request is answered first
    second.join(5)
    assert second_outcome[0].message == "second" and first.is_alive()
    third, third_outcome = call_in_thread(peer.client, protocol.Info(name="third"),
                                          progress=lambda *update: seen.append(update))
    third_request, = peer.requests(1)
    peer.channel.send(protocol.Progress(id=third_request.id, stage="load", done=1, total=2))
    peer.channel.send(answer(first_request))
    peer.channel.send(answer(third_request))
    first.join(5)
    third.join(5)
    assert first_outcome[0].message == "first" and third_outcome[0].message == "third"
    assert seen == [("load", 1, 2)]  # its own progress only
    assert not peer.orphans and not peer.client.broken


def test_a_reply_whose_caller_gave_up_goes_to_the_orphan_handler():
    peer = ScriptedDaemon()

    def give_up(*update) -> None:
        raise KeyboardInterrupt

    caller, outcome = call_in_thread(peer.client, protocol.Info(name="abandoned"), progress=give_up)
    request, = peer.requests(1)
    peer.channel.send(protocol.Progress(id=request.id, stage="load", done=0, total=1))
    caller.join(5)
    assert isinstance(outcome[0], KeyboardInterrupt)
    read_end, write_end = os.pipe()
    peer.channel.send(protocol.Progress(id=request.id, stage="load", done=1, total=1))
    peer.channel.send(protocol.Files(id=request.id, names=("late",), fds=(read_end,)))
    os.close(read_end)
    # The connection outlives the abandoned request: the next call reads the late reply on the way.
    later, later_outcome = call_in_thread(peer.client, protocol.Info(name="later"))
    peer.channel.send(answer(peer.requests(1)[0]))
    later.join(5)
    assert later_outcome[0].message == "later" and not peer.client.broken
    orphan, = peer.orphans
    assert isinstance(orphan, protocol.Files) and orphan.names == ("late",)
    os.write(write_end, b"x")  # the descriptor came across: the orphan handler is the one to close it
    assert os.read(orphan.fds[0], 1) == b"x"
    os.close(orphan.fds[0])
    os.close(write_end)


def test_an_error_about_the_connection_answers_every_waiting_thread():
    peer = ScriptedDaemon()
    calls = [call_in_thread(peer.client, protocol.Info(name=str(i))) for i in range(3)]
    peer.requests(3)
    peer.channel.send(protocol.Error(code="too_many_connections", message="refused"))
    for thread, outcome in calls:
        thread.join(5)
        assert outcome[0].code == "too_many_connections"
    assert peer.client.broken
    with pytest.raises(ConnectionLost, match="refused"):
        peer.client.call(protocol.Info(name="after"))


def test_a_daemon_that_hangs_up_fails_every_waiting_thread():
    peer = ScriptedDaemon()
    calls = [call_in_thread(peer.client, protocol.Info(name=str(i))) for i in range(3)]
    peer.requests(3)
    peer.channel.close()
    for thread, outcome in calls:
        thread.join(5)
        assert isinstance(outcome[0], ConnectionLost)


def test_a_reply_timeout_costs_only_its_own_call():
    """Whether the thread that times out reads for all or waits while another reads, the
    connection lives on: the other call gets its reply, the late ones go to the orphan handler."""
    peer = ScriptedDaemon()
    with pytest.raises(PeerStalled, match="no answer within 0.2 s"):
        peer.client.call(protocol.Ping(), timeout=0.2)  # alone: it was the reader
    patient, outcome = call_in_thread(peer.client, protocol.Info(name="patient"))
    wait_for(lambda: peer.client._reading, message="the patient call to read for all")
    with pytest.raises(PeerStalled, match="no answer within 0.2 s"):
        peer.client.call(protocol.Ping(), timeout=0.2)  # waiting on the patient call's read
    requests = peer.requests(3)
    for request in sorted(requests, key=lambda r: isinstance(r, protocol.Info)):  # the patient call's last
        peer.channel.send(answer(request))
    patient.join(5)
    assert outcome[0].message == "patient" and not peer.client.broken
    pings = [request.id for request in requests if isinstance(request, protocol.Ping)]
    assert sorted(orphan.id for orphan in peer.orphans) == sorted(pings)


def test_a_frame_half_read_when_its_call_times_out_is_finished_by_the_next_reader():
    peer = ScriptedDaemon()
    caller, outcome = call_in_thread(peer.client, protocol.Info(name="slow"), timeout=0.3)
    request, = peer.requests(1)
    frame = protocol.encode(answer(request))
    peer.channel.sock.sendall(frame[:5])  # then nothing, past the call's limit
    caller.join(5)
    assert isinstance(outcome[0], PeerStalled)
    later, later_outcome = call_in_thread(peer.client, protocol.Info(name="later"))
    peer.channel.sock.sendall(frame[5:])
    peer.channel.send(answer(peer.requests(1)[0]))
    later.join(5)
    assert later_outcome[0].message == "later" and not peer.client.broken
    orphan, = peer.orphans
    assert orphan.id == request.id and orphan.message == "slow"


def test_a_reply_to_no_request_is_a_protocol_error():
    peer = ScriptedDaemon()
    caller, outcome = call_in_thread(peer.client, protocol.Info(name="x"))
    peer.requests(1)
    peer.channel.send(protocol.Done(id=999))
    caller.join(5)
    assert isinstance(outcome[0], trims.errors.RemoteProtocolError) and "999" in str(outcome[0])


# --- a real daemon ------------------------------------------------------------------------------

@pytest.fixture
def tight_daemon(tmp_path):
    """Room for one of two 256 KiB models; an open waits up to 30 s for room."""
    make_models(tmp_path, range(2))
    daemon = DaemonProcess(tmp_path / "d", host_memory="300K", extra=("--busy-timeout", "30")).start()
    client = daemon.client()
    for seed in range(2):
        client.push(tmp_path / f"m{seed}.safetensors", f"m{seed}")
    client.close()
    yield daemon
    daemon.kill()


def open_in_thread(client: trims.Client, name: str) -> tuple[threading.Thread, list]:
    return in_thread(client.open, name)


def test_a_release_overtakes_an_open_waiting_on_the_same_client(tight_daemon):
    client = tight_daemon.client()
    held = client.open("m0")
    waiter, outcome = open_in_thread(client, "m1")  # waits for m0's room
    wait_for(lambda: client.stats()["waiting_for_room"] == 1 or not waiter.is_alive(), message="the open to wait")
    assert waiter.is_alive()
    held.close()  # one connection: before, this waited behind the open for the whole 30 s
    waiter.join(25)
    view, = outcome
    assert isinstance(view, trims.ModelView) and view["w"].shape == (64 * 1024,)
    assert client.stats()["leases"] == 1
    view.close()


def test_a_progress_callback_that_raises_costs_only_its_own_request(tmp_path, daemon):
    make_models(tmp_path, range(2))
    client = daemon.client()
    client.push(tmp_path / "m0.safetensors", "m0")
    held = client.open("m0")

    def interrupt(*update) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.push(tmp_path / "m1.safetensors", "m1", progress=interrupt)
    wait_for(lambda: "m1:latest" in {m.name for m in client.list()}, message="the abandoned push to finish")
    assert client.stats()["leases"] == 1  # the same connection: m0 is still leased
    assert held["w"].shape == (64 * 1024,)
    held.close()
    assert client.stats()["leases"] == 0


def test_an_open_waiting_for_memory_gives_up_when_its_connection_ends(tight_daemon):
    """The open waits for room its own connection's lease holds. When the connection ends, the
    wait ends with it, and so does the lease: no busy timeout sat out, no model evicted and
    another loaded for a client gone."""
    leaver, other = tight_daemon.client(), tight_daemon.client()
    held = leaver.open("m0")
    waiter, outcome = open_in_thread(leaver, "m1")
    wait_for(lambda: other.stats()["waiting_for_room"] == 1, message="the open to wait")
    leaver.close()
    waiter.join(5)
    assert isinstance(outcome[0], ConnectionLost)
    wait_for(lambda: other.stats()["waiting_for_room"] == 0 and other.stats()["leases"] == 0,
             message="the wait and the lease to end (else: 30 s, the busy timeout)")
    assert other.info("m0").tiers[0] == "host" and other.info("m1").tiers[0] != "host"
    view = other.open("m1")  # m0 is no one's now: evicted for it at once
    assert view["w"].shape == (64 * 1024,)
    view.close()
    del held


def test_a_ping_that_times_out_keeps_the_connections_leases(tmp_path, daemon):
    """A health check through the process's shared client, against a daemon that stops
    answering for a while: the ping fails, the models the other threads hold stay leased."""
    make_models(tmp_path, range(1))
    client = daemon.client()
    client.push(tmp_path / "m0.safetensors", "m0")
    view = client.open("m0")
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(trims.DaemonUnavailable, match="no answer within 0.5 s"):
            client.ping(timeout=0.5)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert client.info("m0").leases == 1  # the same connection: its lease lives
    assert view["w"].shape == (64 * 1024,)
    view.close()
    assert client.stats()["leases"] == 0


def test_a_timed_ping_does_not_wait_behind_the_releases_it_would_carry(tmp_path, daemon, monkeypatch):
    """A request sends the releases of garbage-collected views first; a ping with a limit must
    not, or a stalled daemon's silence about a release would hold it past its limit."""
    make_models(tmp_path, range(1))
    client = daemon.client()
    client.push(tmp_path / "m0.safetensors", "m0")
    dropped, kept = client.open("m0"), client.open("m0")
    monkeypatch.setattr(client._release_flusher, "wake", lambda: None)  # its release stays pending
    del dropped
    gc.collect()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        pinger, outcome = in_thread(client.ping, timeout=0.5)
        pinger.join(5)
        assert not pinger.is_alive() and isinstance(outcome[0], trims.DaemonUnavailable)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        pinger.join(5)
    assert client.info("m0").leases == 1  # the next request without a limit carried the release
    kept.close()


def test_a_connect_whose_ping_times_out_closes_its_connection(tmp_path):
    """A socket that accepts and never answers: connect() fails, and its connection goes with
    it at once (a daemon counts connections against --max-connections)."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    with pytest.raises(trims.DaemonUnavailable, match="no answer within 0.2 s"):
        trims.connect(path, timeout=0.2)
    peer, _ = listener.accept()
    peer.settimeout(5)
    received = b""
    while chunk := peer.recv(4096):  # the ping, then the end of the connection
        received += chunk
    assert received
    peer.close()
    listener.close()


def test_a_connection_may_hold_only_so_many_waiting_requests(tight_daemon):
    client = tight_daemon.client()
    held = client.open("m0")
    waiting = [open_in_thread(client, "m1") for _ in range(MAX_WAITING_REQUESTS)]
    wait_for(lambda: client.stats()["waiting_for_room"] == MAX_WAITING_REQUESTS, message="every open to wait")
    with pytest.raises(trims.errors.RequestError, match=f"already has {MAX_WAITING_REQUESTS} requests waiting"):
        client.open("m1")
    assert client.info("m0").leases == 1  # the reader still answers what never waits
    held.close()
    for thread, outcome in waiting:
        thread.join(25)
        assert isinstance(outcome[0], trims.ModelView)
        outcome[0].close()
    assert client.stats()["leases"] == 0
