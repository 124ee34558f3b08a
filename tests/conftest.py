"""Real daemons in real processes, tiny real models, fresh client processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

# PyTorch on several threads gives a few percent of fresh processes last-bit different outputs
# (seen without trims: ~1 run in 10 of a tiny GPT-2 on 2 cores), and the tests compare outputs
# across processes bit for bit. One thread gives the same order of sums everywhere; the children
# inherit it. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

import trims
from trims.spawn import start_daemon_process

ROOT = Path(__file__).resolve().parent.parent


class DaemonProcess:
    """A ``trims serve`` subprocess on its own socket and store."""

    def __init__(self, workdir: Path, host_memory: str = "256M", extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.daemon_env = env  # the daemon's environment (default: this process's)
        self.socket = workdir / "run" / "trims.sock"
        self.store = workdir / "store"
        self.host_memory = host_memory
        self.extra = extra
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "TRIMS_SOCKET": str(self.socket)}

    def start(self) -> DaemonProcess:
        try:
            self.proc = start_daemon_process(self.socket, self.store, self.host_memory, self.log_path,
                                             ("--log-level", "debug", *self.extra), env=self.daemon_env)
        except trims.DaemonUnavailable as exc:
            raise RuntimeError(str(exc)) from None
        return self

    def client(self) -> trims.Client:
        return trims.connect(self.socket)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=20)
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def daemon(tmp_path: Path):
    """A fresh daemon per test, for tests whose state matters."""
    process = DaemonProcess(tmp_path).start()
    yield process
    process.kill()


class S3Endpoint:
    """A real S3-compatible HTTP endpoint (moto's server mode) on loopback."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=30, message="the S3 endpoint to start")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.url, timeout=1).close()
            return True
        except OSError:
            return self.proc.poll() is not None  # fail fast below if it died

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"bucket-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_directory(self, directory: Path, bucket: str, prefix: str) -> None:
        """Every file of ``directory`` as an object under ``prefix``, as a model directory in a bucket."""
        client = self.client()
        for path in directory.iterdir():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")

    def gets(self, key_fragment: str) -> int:
        """GET requests the endpoint has served for keys containing ``key_fragment``."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if "GET /" in line and key_fragment in line)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    endpoint = S3Endpoint(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in endpoint.env}
    os.environ.update(endpoint.env)  # daemons started by the tests inherit the endpoint
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    endpoint.proc.kill()
    endpoint.proc.wait()


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory):
    """One daemon for tests that only add models under names of their own."""
    process = DaemonProcess(tmp_path_factory.mktemp("shared-daemon")).start()
    yield process
    process.kill()


def run_python(code: str, env: dict[str, str], *, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; the result's stdout is text."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_python(code: str, env: dict[str, str]) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter with pipes for stdin and stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def make_models(directory: Path, seeds) -> dict:
    """``m<seed>.safetensors`` in ``directory``: one tensor ``w`` of 256 KiB each; their arrays by seed."""
    import torch  # loaded by the tests that make models, not by every test run
    from safetensors.torch import save_file

    weights = {}
    for seed in seeds:
        w = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(seed))
        save_file({"w": w}, directory / f"m{seed}.safetensors")
        weights[seed] = w.numpy()
    return weights


def wait_for(predicate, timeout: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.02)


def open_concurrently(clients: list[trims.Client], name: str) -> list[trims.ModelView]:
    """Open ``name`` from every client at the same moment; raises the first error."""
    barrier = threading.Barrier(len(clients))
    views, errors = [], []

    def open_it(client: trims.Client) -> None:
        barrier.wait()
        try:
            views.append(client.open(name))
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=open_it, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return views

