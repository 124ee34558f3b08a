"""Chaos, bounded in time: hostile traffic, killed clients, a killed daemon, stalls, a full disk."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import trims
from trims import protocol, transport

from .conftest import ROOT, DaemonProcess, start_python, wait_for
from .hostile import send_hostile
from .models import build


def push_small(client: trims.Client, tmp_path, name: str = "chaos/model", floats: int = 32 * 1024) -> None:
    save_file({"w": torch.randn(floats)}, tmp_path / "small.safetensors")
    client.push(tmp_path / "small.safetensors", name)


def settled(client: trims.Client, baseline: dict) -> bool:
    stats = client.stats()
    return (stats["leases"] == baseline["leases"] and stats["connections"] == baseline["connections"]
            and stats["daemon"]["open_fds"] == baseline["daemon"]["open_fds"])


def test_ten_thousand_hostile_frames_leave_the_daemon_serving(daemon, tmp_path):
    client = daemon.client()
    push_small(client, tmp_path)
    client.open("chaos/model").close()  # resident from here on: its memfd is part of the baseline
    baseline = client.stats()
    send_hostile(daemon.socket, random.Random(0), 10_000)
    wait_for(lambda: settled(client, baseline), timeout=30, message="connections and descriptors back to baseline")
    with client.open("chaos/model") as view:
        assert view["w"].shape == (32 * 1024,)
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()  # every bad frame was a typed refusal, none a crash
    assert not list((daemon.store / "tmp").iterdir())


def test_two_hundred_clients_killed_at_random_points_leak_nothing(daemon, tmp_path):
    client = daemon.client()
    push_small(client, tmp_path)
    client.open("chaos/model").close()
    baseline = client.stats()
    subprocess.run([sys.executable, str(ROOT / "tests" / "chaos_clients.py"), "200", str(tmp_path / "small.safetensors"), "1"],
                   env={**daemon.env, "PYTHONPATH": str(ROOT / "src")}, check=True, timeout=300)
    wait_for(lambda: settled(client, baseline), timeout=30, message="leases, connections and descriptors back to baseline")
    assert client.stats()["tiers"]["host"]["used_bytes"] <= client.stats()["tiers"]["host"]["capacity_bytes"]
    assert not list((daemon.store / "tmp").iterdir())
    for model in client.list():  # whatever pushes completed are whole: every byte verifies
        if "host" in model.tiers:
            client.evict(model.name)  # so the open below reads it back from disk
        with client.open(model.name):
            pass
    assert "Traceback" not in daemon.log()


INFERENCE = """
import json, sys, threading, torch, trims.torch
from tests.models import tiny_gpt2, output_of
factory = tiny_gpt2()
model = trims.torch.load_model("chaos/gpt2", factory)
reference = output_of(model, "gpt2")
print("ready", flush=True)
back = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), back.set()), daemon=True).start()
runs, same = 0, True
while not back.is_set() or runs < 10:          # inference goes on while the daemon dies and returns
    same &= torch.equal(output_of(model, "gpt2"), reference)
    runs += 1
again = trims.torch.load_model("chaos/gpt2", factory)  # the shared client reconnects
print(json.dumps({"runs": runs, "same": same, "again": torch.equal(output_of(again, "gpt2"), reference)}))
"""


def test_a_daemon_killed_under_load_breaks_no_client(tmp_path):
    build("gpt2", tmp_path / "gpt2")
    daemon = DaemonProcess(tmp_path / "d").start()
    daemon.client().push(tmp_path / "gpt2", "chaos/gpt2")
    env = {**daemon.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    clients = [start_python(INFERENCE, env) for _ in range(4)]
    try:
        for process in clients:
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
        time.sleep(0.3)
        daemon.kill()  # SIGKILL, mid-inference
        time.sleep(0.3)
        daemon = DaemonProcess(tmp_path / "d").start()
        results = []
        for process in clients:
            process.stdin.write("\n")
            process.stdin.flush()
        for process in clients:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        assert all(r["same"] and r["again"] and r["runs"] >= 10 for r in results), results
    finally:
        for process in clients:
            process.kill()
        daemon.kill()


def test_a_stalled_client_is_cut_off_and_others_are_served(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", extra=("--frame-timeout", "1")).start()
    try:
        stalled = socket.socket(socket.AF_UNIX)
        stalled.connect(str(daemon.socket))
        stalled.sendall(protocol.encode(protocol.Ping(id=1))[:7])  # half a header, then nothing
        client = daemon.client()
        client.ping()  # served meanwhile
        stalled.settimeout(10)
        started = time.monotonic()
        assert stalled.recv(100) == b""  # the daemon hung up
        assert 0.5 < time.monotonic() - started < 8
        assert "peer stalled: no complete frame within 1 s; closing it" in daemon.log()
        wait_for(lambda: client.stats()["connections"] == 1, message="the stalled connection to be gone")
    finally:
        daemon.kill()


def test_a_client_trickling_a_frame_is_cut_off_at_the_frame_timeout_and_big_requests_are_refused(tmp_path):
    """Each byte within the timeout does not keep a frame's buffer for ever: the frame as a
    whole must arrive within it. A request frame over 1 MiB is refused from its header."""
    daemon = DaemonProcess(tmp_path / "d", extra=("--frame-timeout", "1")).start()
    try:
        trickling = socket.socket(socket.AF_UNIX)
        trickling.connect(str(daemon.socket))
        frame = protocol.encode(protocol.Open(name="x" * 4000))
        started = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in frame:
                trickling.send(bytes([byte]))
                time.sleep(0.25)
        assert 0.9 < time.monotonic() - started < 6
        big = socket.socket(socket.AF_UNIX)
        big.connect(str(daemon.socket))
        big.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 0, 0, 2 << 20))
        big.settimeout(10)
        assert b"exceeds the 1048576-byte cap" in big.recv(4096)
        daemon.client().ping()
    finally:
        daemon.kill()


def test_too_many_connections_get_a_clear_refusal(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", extra=("--max-connections", "3")).start()
    try:
        held = [_served_connection(daemon) for _ in range(3)]
        with pytest.raises(trims.RequestError, match="already serves 3 connections") as info:
            trims.connect(daemon.socket)
        assert info.value.code == "too_many_connections"
        held.pop().close()
        wait_for(lambda: _connects(daemon), message="a free slot")
        for channel in held:
            channel.close()
    finally:
        daemon.kill()


def test_a_connection_whose_thread_cannot_start_is_refused_and_the_daemon_serves_on(tmp_path, monkeypatch):
    """At the process's thread limit (a container's pids cap) the new connection is refused
    with the reason; the daemon keeps serving those it has, and takes new ones once it can."""
    from trims.server import Server
    from trims.store import Store

    start, limited = threading.Thread.start, threading.Event()

    def start_unless_limited(thread):
        if limited.is_set() and thread.name.startswith("trims-conn-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_unless_limited)
    store = Store(tmp_path / "store", host_capacity=1 << 26)
    server = Server(store, transport.listen(tmp_path / "s.sock"), max_connections=16, describe=dict)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        first = trims.connect(tmp_path / "s.sock")
        limited.set()
        with pytest.raises(trims.RequestError, match="cannot start a thread") as info:
            trims.connect(tmp_path / "s.sock")
        assert info.value.code == "too_many_connections" and serving.is_alive()
        assert first.list() == [] and server.connection_count() == 1
        limited.clear()
        trims.connect(tmp_path / "s.sock").close()
        first.close()
    finally:
        server.shutdown()
        serving.join(10)
        store.close()


def test_an_admin_connects_past_the_cap_that_tenants_filled(tmp_path):
    """A tenant holding every connection must not lock the operator out: where some tenants
    are not admins, an admin may connect past --max-connections, by as many again at most."""
    from trims.acl import AccessPolicy, Tenant
    from trims.server import Server
    from trims.store import Store

    store = Store(tmp_path / "store", host_capacity=1 << 26)
    for admin, served in ((True, 2), (False, 1)):
        policy = AccessPolicy((Tenant("me", uids=frozenset({os.getuid()}), admin=admin),
                               Tenant("others", uids=frozenset({os.getuid() + 12345}))))
        path = tmp_path / f"admin-{admin}.sock"
        server = Server(store, transport.listen(path), max_connections=1, describe=dict, access=policy)
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        clients = []
        try:
            for _ in range(3):
                try:
                    clients.append(trims.connect(path))
                except trims.RequestError as refused:
                    assert refused.code == "too_many_connections"
            assert len(clients) == served
        finally:
            for client in clients:
                client.close()
            server.shutdown()
            serving.join(10)
    store.close()


def test_a_tenant_at_its_connection_cap_is_refused_and_others_still_connect(tmp_path):
    """A tenant's max_connections keeps it from taking the daemon's whole --max-connections:
    its next connection is refused with why, one it closes frees its slot, and another tenant
    still connects meanwhile."""
    from trims.acl import AccessPolicy, Tenant
    from trims.server import Server
    from trims.store import Store

    store = Store(tmp_path / "store", host_capacity=1 << 26)
    capped = AccessPolicy((Tenant("team-a", uids=frozenset({os.getuid()}), max_connections=2),))
    uncapped = AccessPolicy((Tenant("team-b", uids=frozenset({os.getuid()})),))
    servers = {name: Server(store, transport.listen(tmp_path / f"{name}.sock"), max_connections=8, describe=dict,
                            access=policy) for name, policy in (("a", capped), ("b", uncapped))}
    serving = [threading.Thread(target=server.serve_forever) for server in servers.values()]
    for thread in serving:
        thread.start()
    try:
        held = [trims.connect(tmp_path / "a.sock") for _ in range(2)]
        with pytest.raises(trims.RequestError, match="tenant team-a already has 2 connections open") as info:
            trims.connect(tmp_path / "a.sock")
        assert info.value.code == "too_many_connections"
        others = [trims.connect(tmp_path / "b.sock") for _ in range(3)]  # no cap of its own
        held.pop().close()
        deadline = time.monotonic() + 10
        while servers["a"].connection_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        held.append(trims.connect(tmp_path / "a.sock"))
        assert held[-1].list() == []
        for client in held + others:
            client.close()
    finally:
        for server in servers.values():
            server.shutdown()
        for thread in serving:
            thread.join(10)
        store.close()


def _served_connection(daemon: DaemonProcess) -> transport.Channel:
    """A raw connection the daemon answers. A slot a client just closed frees a moment later
    (when the daemon reads its end), so the start-up check's may still be taken: retry."""
    deadline = time.monotonic() + 10
    while True:
        channel = transport.connect(daemon.socket)
        try:
            channel.send(protocol.Ping(id=1))
        except trims.errors.ConnectionLost:  # refused and closed already: the reason is still to read
            pass
        reply = channel.receive(5.0)
        if isinstance(reply, protocol.Pong):
            return channel
        channel.close()
        assert getattr(reply, "code", None) == "too_many_connections" and time.monotonic() < deadline, reply
        time.sleep(0.05)


def _connects(daemon: DaemonProcess) -> bool:
    try:
        trims.connect(daemon.socket).close()
        return True
    except trims.RequestError:
        return False


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_gives_a_clear_error_and_loses_nothing(tmp_path, small_disk):
    daemon = DaemonProcess(tmp_path / "d")
    daemon.store = small_disk / "store"
    daemon.start()
    try:
        client = daemon.client()
        push_small(client, tmp_path, "chaos/fits", floats=16 * 1024)  # 64 KiB
        save_file({"w": torch.randn(512 * 1024)}, tmp_path / "big.safetensors")  # 2 MiB
        with pytest.raises(trims.StorageError, match="disk is full"):
            client.push(tmp_path / "big.safetensors", "chaos/big")
        assert [m.name for m in client.list()] == ["chaos/fits:latest"]
        assert not list((daemon.store / "tmp").iterdir())
        with client.open("chaos/fits") as view:
            assert view["w"].shape == (16 * 1024,)
        # A re-push needs no room: with the filesystem full it is hashed first, and stored as
        # the bytes the store holds already
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - 16 * 1024))
        assert client.push(tmp_path / "small.safetensors", "chaos/again").new_bytes == 0
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()


def test_a_full_disk_during_a_fetch_falls_back_to_memory(tmp_path, small_disk, s3):
    bucket = s3.new_bucket()
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "600K"))
    daemon.store = small_disk / "store"
    daemon.start()
    try:
        client = daemon.client()
        for name in "abc":
            save_file({"w": torch.randn(64 * 1024)}, tmp_path / f"{name}.safetensors")  # 256 KiB each
        client.push(tmp_path / "a.safetensors", "chaos/a", to=f"s3://{bucket}/trims")
        client.push(tmp_path / "b.safetensors", "chaos/b")
        client.push(tmp_path / "c.safetensors", "chaos/c")  # the cap makes a leave the disk...
        client.remove("chaos/c")  # ...and leaves room under the cap to stage it back
        assert client.info("chaos/a").tiers == ("cloud",)
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - 4096))  # now the disk really is full
        with client.open("chaos/a") as view:  # from the cloud straight into memory
            assert view["w"].shape == (64 * 1024,)
        assert "could not stage segment" in daemon.log()
        assert client.stats()["fetches"]["cloud->host"]["count"] == 1
        assert not list((daemon.store / "tmp").iterdir())
    finally:
        daemon.kill()


def test_a_push_cut_by_a_daemon_kill_leaves_nothing_partial(tmp_path):
    save_file({f"w{i}": torch.randn(4 * 1024 * 1024) for i in range(8)}, tmp_path / "big.safetensors")  # 128 MiB
    daemon = DaemonProcess(tmp_path / "d").start()
    errors = []

    def push() -> None:
        try:
            daemon.client().push(tmp_path / "big.safetensors", "chaos/big")
        except trims.TrimsError as exc:
            errors.append(exc)

    pusher = threading.Thread(target=push)
    pusher.start()
    wait_for(lambda: list((daemon.store / "tmp").iterdir()), message="the push to be under way")
    daemon.kill()
    pusher.join()
    assert errors and isinstance(errors[0], trims.DaemonUnavailable)
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        assert client.list() == [] and not list((daemon.store / "tmp").iterdir())
        assert not list((daemon.store / "disk").iterdir()) and not list((daemon.store / "segments").iterdir())
        client.push(tmp_path / "big.safetensors", "chaos/big")  # and it can be pushed again
        assert client.info("chaos/big").tensors == 8
    finally:
        daemon.kill()


def _park(path, count: int, devnull: int) -> socket.socket:
    """A connection that begins a frame carrying ``count`` descriptors and never ends it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    body = json.dumps({"type": "ping", "id": 1}).encode()
    header = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, count, 0, len(body) + 100)
    socket.send_fds(sock, [header + body], [devnull] * count)
    return sock


def test_descriptors_parked_in_unfinished_frames_are_bounded_across_connections(tmp_path):
    """Each frame may carry 250 descriptors: without a bound across connections a few dozen
    frames begun and never ended take every descriptor the daemon may have. Past its budget
    the next such frame is refused; other clients are served, and a closed one gives back."""
    from trims.server import Server
    from trims.store import Store

    store = Store(tmp_path / "store", host_capacity=1 << 26)
    server = Server(store, transport.listen(tmp_path / "s.sock"), max_connections=16, describe=dict)
    server._descriptors.limit = 600
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    devnull = os.open(os.devnull, os.O_RDONLY)
    parked = []
    try:
        parked = [_park(tmp_path / "s.sock", 250, devnull) for _ in range(2)]
        wait_for(lambda: server._descriptors._held == 500, message="both frames' descriptors held")
        refused = transport.Channel(_park(tmp_path / "s.sock", 250, devnull))
        reply = refused.receive(5.0)
        assert reply.code == "protocol_error" and "holds as many descriptors in unfinished frames" in reply.message
        refused.close()
        assert trims.connect(tmp_path / "s.sock").list() == []
        parked.pop().close()
        wait_for(lambda: server._descriptors._held == 250, message="a closed connection's descriptors given back")
        parked.append(_park(tmp_path / "s.sock", 250, devnull))
        wait_for(lambda: server._descriptors._held == 500, message="room for another")
    finally:
        for sock in parked:
            sock.close()
        os.close(devnull)
        server.shutdown()
        serving.join(10)
        store.close()


def test_a_daemon_out_of_descriptors_refuses_connections_without_spinning(tmp_path):
    """At its RLIMIT_NOFILE, accept fails at once for as long as the listener is readable: the
    daemon refuses the waiting connection with a spare descriptor, logs it once, and serves
    again when connections close."""
    socket_path, log_path = tmp_path / "run" / "s.sock", tmp_path / "daemon.log"
    command = (f"ulimit -n 40 && exec {sys.executable} -m trims serve --socket {socket_path} "
               f"--store {tmp_path / 'store'} --host-memory 64M")
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT)
    held = []
    try:
        wait_for(lambda: socket_path.exists(), message="the daemon's socket")
        refused = None
        for _ in range(60):
            try:
                held.append(trims.connect(socket_path))
            except trims.RequestError as exc:
                refused = exc
                break
        assert refused is not None and refused.code == "too_many_connections"
        assert "run out of file descriptors" in str(refused)

        def cpu_seconds() -> float:
            fields = open(f"/proc/{daemon.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        waiting = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        for sock in waiting:
            sock.connect(str(socket_path))  # each one waits in the backlog while the daemon is out
        before = cpu_seconds()
        time.sleep(1.0)
        assert cpu_seconds() - before < 0.5  # not a loop around a failing accept
        for sock in waiting:
            sock.close()
        for client in held:
            client.close()
        held.clear()
        wait_for(lambda: _connects_at(socket_path), message="the daemon to serve again")
        assert log_path.read_text().count("out of file descriptors") == 1
    finally:
        for client in held:
            client.close()
        daemon.kill()
        daemon.wait(10)


def _connects_at(path) -> bool:
    try:
        trims.connect(path).close()
        return True
    except trims.TrimsError:
        return False
