"""Processes share one physical copy, read-only: what the kernel enforces, checked for real."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import signal

import pytest

from trims import protocol, transport

from .conftest import run_python, start_python, wait_for
from .models import build

HOLDER = """
    import hashlib, json, sys, trims, trims.torch
    client = trims.connect()
    state = trims.torch.load_state_dict("{name}", client=client)
    def report():
        inodes = sorted({{l.split()[4] for l in open("/proc/self/maps") if "memfd:trims" in l}})
        digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
        print(json.dumps({{"inodes": inodes, "sha": digest}}), flush=True)
    report()
    for command in sys.stdin:
        if command.strip() == "write":
            state["transformer.wte.weight"].add_(1.0)   # in place, through the shared mapping
        report()
"""


@pytest.fixture(scope="module")
def gpt2_model(shared_daemon, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    build("gpt2", directory)
    shared_daemon.client().push(directory, "sharing/gpt2")
    return "sharing/gpt2"


def _ask(process, command: str = "") -> dict:
    if command:
        process.stdin.write(command + "\n")
        process.stdin.flush()
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return json.loads(line)


def test_two_processes_map_the_same_memfd_and_a_write_stays_private(shared_daemon, gpt2_model):
    a = start_python(HOLDER.format(name=gpt2_model), shared_daemon.env)
    b = start_python(HOLDER.format(name=gpt2_model), shared_daemon.env)
    try:
        first_a, first_b = _ask(a), _ask(b)
        assert first_a["inodes"] and first_a["inodes"] == first_b["inodes"]  # one copy on the node
        assert first_a["sha"] == first_b["sha"]
        after_write_a = _ask(a, "write")
        after_write_b = _ask(b, "check")
        assert after_write_a["sha"] != first_a["sha"]  # the writer sees its own change
        assert after_write_b["sha"] == first_b["sha"]  # nobody else does
        # a third process, opening after the write, gets the original bytes too
        third = run_python(HOLDER.format(name=gpt2_model), shared_daemon.env).stdout
        assert json.loads(third)["sha"] == first_a["sha"]
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_received_descriptors_cannot_write_or_unseal(shared_daemon, gpt2_model):
    channel = transport.connect(shared_daemon.socket)
    try:
        channel.send(protocol.Open(id=1, name=gpt2_model))
        reply = channel.receive()
        assert isinstance(reply, protocol.Opened)
        fd, size = reply.fds[0], reply.segment_sizes[0]
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", 0)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)
        # reopening through /proc for writing gives a writable descriptor, but the seals hold
        writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(writable, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(writable, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
            with pytest.raises(OSError):
                os.ftruncate(writable, size + 4096)
            with pytest.raises(OSError):
                os.posix_fallocate(writable, size, 4096)
        finally:
            os.close(writable)
        # a private writable mapping works and changes nothing for anyone else
        private = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        original = os.pread(fd, 16, 0)
        private[:16] = b"\xff" * 16
        assert os.pread(fd, 16, 0) == original
        private.close()
        for received in reply.fds:
            os.close(received)
    finally:
        channel.close()


def test_an_open_model_costs_no_descriptor_and_one_mapping_per_segment(shared_daemon, gpt2_model):
    client = shared_daemon.client()
    client.open(gpt2_model).close()  # the client's own descriptors (connection, release pipe) are open now
    fds_before = len(os.listdir("/proc/self/fd"))
    view = client.open(gpt2_model)
    arrays = [view[name] for name in view]
    assert len(os.listdir("/proc/self/fd")) == fds_before
    segments = client.info(gpt2_model).segments
    maps = [line for line in open("/proc/self/maps") if "memfd:trims" in line]
    assert len(maps) == segments == 1
    assert all(not a.flags.writeable for a in arrays)
    view.close()
    client.close()


def test_sigkill_of_a_holder_releases_its_lease(shared_daemon, gpt2_model):
    client = shared_daemon.client()
    baseline = client.stats()
    child = start_python(
        f"""
        import trims, time
        view = trims.connect().open("{gpt2_model}")
        print("ready", flush=True)
        time.sleep(60)
        """,
        shared_daemon.env,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert client.stats()["leases"] == baseline["leases"] + 1
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_for(lambda: client.stats()["leases"] == baseline["leases"], message="the lease to be released")
        wait_for(lambda: client.stats()["daemon"]["open_fds"] == baseline["daemon"]["open_fds"], message="fds back to baseline")
    finally:
        child.kill()
        child.wait()
    client.close()


def test_lease_lasts_while_tensors_live_and_ends_when_they_go(shared_daemon, gpt2_model):
    import gc

    import trims.torch

    client = shared_daemon.client()
    leases = client.stats()["leases"]
    state = trims.torch.load_state_dict(gpt2_model, client=client)
    gc.collect()
    assert client.stats()["leases"] == leases + 1  # the view is gone; the tensors hold the lease
    weight = state["transformer.wte.weight"]
    del state
    gc.collect()
    assert client.stats()["leases"] == leases + 1  # one tensor is enough
    assert float(weight.sum()) == float(weight.sum())  # still readable
    del weight
    gc.collect()
    wait_for(lambda: client.stats()["leases"] == leases, message="the release, sent without another request")
    client.close()


def test_a_process_that_drops_a_model_and_idles_does_not_keep_it_leased(shared_daemon, gpt2_model):
    """A function instance that lets go of its model and waits for work must not pin the
    model in the daemon's memory: the release goes out without a request to carry it."""
    client = shared_daemon.client()
    baseline = client.stats()["leases"]
    child = start_python(
        f"""
        import gc, sys, time
        import trims.torch
        state = trims.torch.load_state_dict("{gpt2_model}")
        print("holding", flush=True)
        sys.stdin.readline()
        del state
        gc.collect()
        print("dropped", flush=True)
        time.sleep(60)
        """,
        shared_daemon.env,
    )
    try:
        assert child.stdout.readline().strip() == "holding"
        assert client.stats()["leases"] == baseline + 1
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "dropped"
        wait_for(lambda: client.stats()["leases"] == baseline, message="the idle process's release")
        assert child.poll() is None  # still alive: the lease ended, not the connection
    finally:
        child.kill()
        child.wait()
    client.close()


def test_explicit_close_ends_the_lease_now_or_with_the_last_array_taken(shared_daemon, gpt2_model):
    """Arrays taken from a view map the daemon's memory: they stay readable after the close,
    and the lease stays until they go, so the daemon never counts their memory free."""
    client, observer = shared_daemon.client(), shared_daemon.client()  # the observer sends nothing of client's
    leases = observer.stats()["leases"]
    with client.open(gpt2_model) as view:
        pass
    assert observer.stats()["leases"] == leases  # nothing taken: ended at once
    with client.open(gpt2_model) as view:
        array = view["transformer.wte.weight"]
        assert client.stats()["leases"] == leases + 1
        expected = array.sum()
    assert client.stats()["leases"] == leases + 1 and array.sum() == expected
    with pytest.raises(ValueError, match="closed"):
        view["transformer.wte.weight"]
    del array
    wait_for(lambda: observer.stats()["leases"] == leases, message="the release of the last array's lease")
    client.close()
    observer.close()


def test_a_forked_child_uses_its_own_connection(shared_daemon, gpt2_model):
    client = shared_daemon.client()
    view = client.open(gpt2_model)
    expected = view["transformer.wte.weight"].sum()
    pid = os.fork()
    if pid == 0:  # child: inherited mapping still valid, and the client reconnects
        ok = view["transformer.wte.weight"].sum() == expected
        ok = ok and client.open(gpt2_model)["transformer.wte.weight"].sum() == expected
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.ping().pid > 0  # the parent's connection was not disturbed
    view.close()
    client.close()
