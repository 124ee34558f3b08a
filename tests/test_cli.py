"""The ``trims`` command as a user runs it."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import trims
from trims.config import parse_size
from trims.errors import ConfigError
from trims.hugepages import shmem_setting
from trims.names import canonical


def trims_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trims", *args], env=env, capture_output=True, text=True, timeout=120)


def test_commands_against_a_running_daemon(daemon, tmp_path):
    save_file({"w": torch.randn(8, 8), "b": torch.zeros(8, dtype=torch.bfloat16)}, tmp_path / "m.safetensors", metadata={"format": "pt"})
    env = daemon.env
    pushed = trims_cli("push", str(tmp_path / "m.safetensors"), "--name", "demo/m:1", env=env)
    assert pushed.returncode == 0 and pushed.stdout.startswith("demo/m:1 blake3:")
    again = trims_cli("push", str(tmp_path / "m.safetensors"), "--name", "demo/m:2", env=env)
    assert "already stored" in again.stdout

    listing = trims_cli("ls", env=env)
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split() == ["NAME", "DIGEST", "SIZE", "TENSORS", "TIERS", "LEASES"]
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:]] == ["demo/m:1", "demo/m:2"]
    models = json.loads(trims_cli("ls", "--json", env=env).stdout)
    assert {m["name"] for m in models} == {"demo/m:1", "demo/m:2"}

    info = trims_cli("info", "demo/m:1", env=env)
    assert "aliases:  demo/m:2" in info.stdout and "tensors:  2 (1 BF16, 1 F32)" in info.stdout
    assert json.loads(trims_cli("info", "demo/m:1", "--json", env=env).stdout)["tensors"] == 2

    with daemon.client().open("demo/m:1"):  # warm it
        pass
    evicted = trims_cli("evict", "demo/m:1", env=env)
    assert evicted.returncode == 0 and "freed" in evicted.stdout

    stats = json.loads(trims_cli("stats", "--json", env=env).stdout)
    assert stats["tags"] == 2 and stats["opens"]["total"] == 1 and stats["tiers"]["host"]["evictions"] == {"requested": 1}
    assert trims_cli("stats", env=env).stdout.startswith("host ")
    assert stats["tiers"]["host"]["shmem_enabled"] == shmem_setting()  # the kernel's setting, as found
    assert f"(the kernel's shmem_enabled: {shmem_setting()})" in trims_cli("stats", env=env).stdout

    assert trims_cli("rm", "demo/m:1", env=env).returncode == 0
    assert trims_cli("rm", "demo/m:2", env=env).returncode == 0
    assert json.loads(trims_cli("ls", "--json", env=env).stdout) == []


def test_pull_pin_and_unpin(daemon, tmp_path):
    save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
    env = daemon.env
    assert trims_cli("push", str(tmp_path / "m.safetensors"), "--name", "m", env=env).returncode == 0
    assert trims_cli("evict", "m", env=env).returncode == 0
    pulled = trims_cli("pull", "m", env=env)
    assert pulled.returncode == 0 and "m: in host" in pulled.stdout
    assert "already in host" in trims_cli("pull", "m", env=env).stdout
    assert trims_cli("pin", "m", "--tier", "host", env=env).stdout.strip() == "m: pinned in host"
    assert json.loads(trims_cli("info", "m", "--json", env=env).stdout)["pinned"] == "host"
    assert "pinned:   host" in trims_cli("info", "m", env=env).stdout
    assert trims_cli("unpin", "m", env=env).returncode == 0
    assert "pinned:" not in trims_cli("info", "m", env=env).stdout
    assert json.loads(trims_cli("info", "m", "--json", env=env).stdout)["pinned"] == ""
    evicted = trims_cli("evict", "m", "--tier", "host", env=env)
    assert evicted.returncode == 0 and evicted.stdout.strip() == "m: freed 3.9 KiB of host memory"
    on_disk = trims_cli("evict", "m", "--tier", "disk", env=env)
    assert on_disk.returncode == 1 and "trims rm" in on_disk.stderr
    bad = trims_cli("pull", "m", "--tier", "gpu", env=env)
    assert bad.returncode == 1 and "not one of host, disk or gpu:N" in bad.stderr
    no_gpu = trims_cli("pull", "m", "--tier", "gpu:0", env=env)  # a daemon started without --gpu-memory
    assert no_gpu.returncode == 1 and "--gpu-memory" in no_gpu.stderr


def test_socket_flag_overrides_the_environment(daemon):
    env = {**os.environ, "TRIMS_SOCKET": "/nonexistent/trims.sock"}
    assert trims_cli("ls", "--socket", str(daemon.socket), env=env).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("info", "nope"), "no model named nope:latest"),
        (("evict", "bad name"), "not a valid model name"),
        (("push", "/nonexistent", "--name", "x"), "/nonexistent does not exist"),
    ],
)
def test_errors_are_one_clear_line(daemon, args, message):
    result = trims_cli(*args, env=daemon.env)
    assert result.returncode == 1
    assert result.stderr.startswith("trims: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_daemon_that_is_not_running_is_named(tmp_path):
    env = {**os.environ, "TRIMS_SOCKET": str(tmp_path / "none.sock")}
    result = trims_cli("ls", env=env)
    assert result.returncode == 1
    assert f"no trims daemon at {tmp_path / 'none.sock'}" in result.stderr and "trims serve" in result.stderr


def test_bad_sizes_are_refused_before_starting(tmp_path):
    result = trims_cli("serve", "--host-memory", "lots", "--store", str(tmp_path), env=dict(os.environ))
    assert result.returncode == 2 and "--host-memory" in result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [("1048576", 2**20), ("512M", 512 * 2**20), ("4G", 4 * 2**30), ("1.5GiB", int(1.5 * 2**30)),
     ("2GB", 2 * 10**9), ("64k", 64 * 1024), ("10Mi", 10 * 2**20), ("3 T", 3 * 2**40)],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1G", "1.2.3G", "4X", "i", "1iB"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize(
    "reference, expected",
    [("resnet50", "resnet50:latest"), ("resnet50:1", "resnet50:1"), ("team-a/bert.base_v2:x-1", "team-a/bert.base_v2:x-1"),
     ("Meta/Llama-3.2-1B", "Meta/Llama-3.2-1B:latest"), ("blake3:" + "a" * 64, "blake3:" + "a" * 64)],
)
def test_names(reference, expected):
    assert canonical(reference) == expected


def test_public_api_is_small_and_explicit():
    assert sorted(trims.__all__) == sorted([
        "__version__", "connect", "Client", "ModelView", "ModelSummary", "PushResult", "TensorEntry",
        "TrimsError", "ConfigError", "ModelMismatch", "ProtocolError", "LocalProtocolError",
        "RemoteProtocolError", "DaemonUnavailable", "ConnectionLost", "PeerStalled", "RequestError", "PermissionDenied",
        "InvalidName", "ModelNotFound", "InvalidModel", "UnsupportedFormat", "ModelBusy", "CapacityError", "QuotaExceeded",
        "IntegrityError", "StorageError", "GpuError", "InternalError",
    ])
    assert all(hasattr(trims, name) for name in trims.__all__)


def test_importing_trims_imports_no_framework():
    code = "import sys, trims; print(sorted(m for m in ('torch', 'numpy', 'transformers', 'safetensors') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_health_for_probes(daemon, tmp_path):
    healthy = trims_cli("health", env=daemon.env)
    assert healthy.returncode == 0 and healthy.stdout.startswith("ok: trims daemon")
    gone = trims_cli("health", "--timeout", "1", env={**os.environ, "TRIMS_SOCKET": str(tmp_path / "none.sock")})
    assert gone.returncode == 1 and "no trims daemon" in gone.stderr


def test_the_http_side_says_what_is_warm_on_this_node(tmp_path):
    import time
    import urllib.request

    from .conftest import DaemonProcess, wait_for

    daemon = DaemonProcess(tmp_path, extra=("--metrics-port", "0")).start()
    try:
        save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
        client = daemon.client()
        client.push(tmp_path / "m.safetensors", "team-a/m:1")
        save_file({"mine": torch.randn(10)}, tmp_path / "private.safetensors")
        client.adopt(tmp_path / "private.safetensors")  # a tenant's own registration: not for the network
        port = client.stats()["daemon"]["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            assert reply.status == 200 and reply.read() == b"ok\n"
        with client.open("team-a/m:1"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=5) as reply:
                (model,) = json.load(reply)
        assert model["name"] == "team-a/m:1" and model["tiers"] == ["host", "disk"] and model["leases"] == 1
        listed = json.loads(trims_cli("ls", "--json", env=daemon.env).stdout)
        assert ("team-a/m:1", ["host", "disk"], 0) in [(m["name"], m["tiers"], m["leases"]) for m in listed]
        assert any(m["name"].startswith("auto/") for m in listed)  # its owner still sees it
        # Idle connections take at most 16 of the daemon's threads (those to its socket are
        # what matters), and the port answers again once they go
        import socket as socket_module

        idle = [socket_module.create_connection(("127.0.0.1", port)) for _ in range(40)]
        time.sleep(0.5)
        assert len(os.listdir(f"/proc/{daemon.proc.pid}/task")) < 40
        client.ping()
        for connection in idle:
            connection.close()
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), message="the port to answer again")
    finally:
        daemon.kill()


def test_a_scrape_that_trickles_its_request_is_cut_off_at_the_deadline(monkeypatch, capsys):
    """A byte every few seconds would keep each read inside its timeout and a slot for good:
    the whole connection has a deadline, and the port answers a proper scrape meanwhile."""
    import socket as socket_module
    import time

    from trims.exporter import MetricsServer, _Handler
    from trims.metrics import Metrics

    monkeypatch.setattr(_Handler, "deadline", 1.0)
    server = MetricsServer(Metrics(), list, "127.0.0.1", 0)
    try:
        slow = socket_module.create_connection(("127.0.0.1", server.port))
        slow.settimeout(5)
        started, cut = time.monotonic(), False
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 40:
            try:
                slow.send(bytes([byte]))
                time.sleep(0.1)
                if not slow.recv(1, socket_module.MSG_DONTWAIT | socket_module.MSG_PEEK):
                    cut = True
                    break
            except BlockingIOError:
                continue
            except OSError:
                cut = True
                break
        assert cut and time.monotonic() - started < 3
        assert _answers(f"http://127.0.0.1:{server.port}/healthz")
        slow.close()
    finally:
        server.close()
    assert "Traceback" not in capsys.readouterr().err  # what it had sent was not served


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_systemd_socket_activation(tmp_path):
    """systemd creates and listens on the socket, passes it as fd 3 (LISTEN_FDS), and keeps
    it across restarts: the daemon serves it, and leaves it in place when it stops."""
    import signal
    import socket as socket_module

    from .conftest import wait_for

    path = tmp_path / "trims.sock"
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    command = (f'LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m trims serve --socket {path} '
               f'--store {tmp_path / "store"} --host-memory 64M')
    process = subprocess.Popen(["sh", "-c", command], pass_fds=(3,),
                               preexec_fn=lambda: os.dup2(listener.fileno(), 3),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        env = {**os.environ, "TRIMS_SOCKET": str(path)}
        wait_for(lambda: trims_cli("health", env=env).returncode == 0, timeout=30, message="the activated daemon")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "serving the socket systemd passed in" in process.stderr.read()
        assert path.is_socket()  # systemd's socket, still there for the next start
    finally:
        process.kill()
        listener.close()


@pytest.mark.parametrize("passed", ["tcp", "unix-not-listening", "count"])
def test_socket_activation_refuses_what_is_not_a_listening_unix_socket(tmp_path, passed):
    """A TCP socket would report every peer's uid as -1, an unlistened socket never accepts;
    either is a config error that says what to fix, not a daemon that serves it."""
    import socket as socket_module

    family = socket_module.AF_INET if passed == "tcp" else socket_module.AF_UNIX
    sock = socket_module.socket(family, socket_module.SOCK_STREAM)
    if passed == "tcp":
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
    count = "one" if passed == "count" else "1"
    command = (f'LISTEN_PID=$$ LISTEN_FDS={count} exec {sys.executable} -m trims serve --socket {tmp_path / "s.sock"} '
               f'--store {tmp_path / "store"} --host-memory 64M')
    try:
        result = subprocess.run(["sh", "-c", command], pass_fds=(3,), preexec_fn=lambda: os.dup2(sock.fileno(), 3),
                                capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    assert result.returncode != 0
    expected = "is not a number of descriptors" if passed == "count" else "is not a listening Unix stream socket"
    assert expected in result.stderr


def test_health_fails_on_a_daemon_that_accepts_but_never_answers(tmp_path):
    import socket as socket_module

    path = tmp_path / "wedged.sock"
    wedged = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    wedged.bind(str(path))
    wedged.listen(8)  # the kernel accepts connections; nobody reads them
    try:
        result = trims_cli("health", "--timeout", "1", env={**os.environ, "TRIMS_SOCKET": str(path)})
    finally:
        wedged.close()
    assert result.returncode == 1 and "did not answer: peer stalled: no answer within 1 s" in result.stderr


@pytest.mark.parametrize("flags, said", [
    (["--frame-timeout", "nan"], "frame_timeout must be a number of at least 0.001"),
    (["--frame-timeout", "-1"], "frame_timeout must be a number"),
    (["--max-connections", "0"], "max_connections must be a number of at least 1"),
    (["--metrics-port", "99999"], "metrics_port must be a number from 0 to 65535"),
    (["--metrics-port", "0", "--metrics-address", "no.such.host.invalid"], "cannot serve metrics on no.such.host"),
    (["--store", "/proc/trims-nowhere"], "cannot use /proc/trims-nowhere as a directory"),
    (["--cloud", "bogus"], "cloud: 'bogus' is not a URL like s3://bucket/prefix"),
    (["--cloud", "s3://"], "names no bucket"),
    (["--socket", "/proc/trims-nowhere.sock"], "cannot listen on /proc/trims-nowhere.sock"),
])
def test_serve_refuses_unusable_settings_in_one_line(tmp_path, flags, said):
    done = subprocess.run([sys.executable, "-m", "trims", "serve", "--socket", str(tmp_path / "s.sock"),
                           "--store", str(tmp_path / "store"), *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("trims: error: ") and said in done.stderr


@pytest.mark.parametrize("flags, said", [
    (["--processes", "1"], "at least 2 (the first trims open is not warm)"),
    (["--model", "bert"], "invalid choice"),
])
def test_demo_refuses_arguments_it_cannot_show_honestly(flags, said):
    done = subprocess.run([sys.executable, "-m", "trims", "demo", *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr


def test_output_cut_short_by_its_reader_ends_quietly(daemon, tmp_path):
    for i in range(300):
        save_file({"w": torch.full((4,), float(i))}, tmp_path / "m.safetensors")
        daemon.client().push(tmp_path / "m.safetensors", f"pipe/m{i}")
    listing = subprocess.Popen([sys.executable, "-m", "trims", "ls", "--json"], env=daemon.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    listing.stdout.readline()
    listing.stdout.close()  # as `| head -1` does
    assert "Traceback" not in listing.stderr.read().decode() and listing.wait(timeout=60) == 1


def test_clients_find_the_daemons_socket_in_its_config_file(daemon, tmp_path):
    """One file for the node, as the systemd unit's: a client with no TRIMS_SOCKET reads its
    socket; TRIMS_SOCKET still wins, and a file named by TRIMS_CONFIG must be readable."""
    config = tmp_path / "trims.toml"
    config.write_text(f'socket = "{daemon.socket}"\nhost_memory = "1G"\n')
    env = {k: v for k, v in daemon.env.items() if k != "TRIMS_SOCKET"} | {"TRIMS_CONFIG": str(config)}
    assert trims_cli("health", env=env).returncode == 0
    assert trims_cli("health", env=env | {"TRIMS_SOCKET": str(tmp_path / "none.sock")}).returncode == 1
    config.write_text("socket = 3\n")
    assert "has the wrong type" in trims_cli("health", env=env).stderr


@pytest.mark.parametrize("body, said", [
    ('host_memory = "lots"', "host_memory: 'lots' is not a size"),
    ("socket_mode = 0o660", 'socket_mode = 432 has the wrong type: a quoted octal string, like "0660"'),
    ('[tenants.a]\nuids = [1]\nmax_leased_bytes = "much"', "tenants.a.max_leased_bytes: 'much' is not a size"),
])
def test_a_config_files_bad_value_is_named_with_its_key(tmp_path, body, said):
    from trims.config import Settings
    from trims.errors import ConfigError

    (tmp_path / "trims.toml").write_text(body + "\n")
    with pytest.raises(ConfigError, match=re.escape(said)):
        Settings.load({}, tmp_path / "trims.toml")


def test_a_command_line_that_does_not_parse_is_one_line():
    done = subprocess.run([sys.executable, "-m", "trims", "serve", "--host-memory", "abc"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("trims serve: error: argument --host-memory: 'abc' is not a size")
