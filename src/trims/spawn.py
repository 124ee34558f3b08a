"""Starting a daemon as a child process and waiting until it answers (demo, benchmarks, tests)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .client import connect
from .errors import DaemonUnavailable


def start_daemon_process(socket_path: Path, store: Path, host_memory: int | str, log_path: Path,
                         extra: tuple[str, ...] = (), timeout: float = 30.0,
                         env: dict[str, str] | None = None) -> subprocess.Popen:
    """``trims serve`` in a child process (environment ``env``, else this one's), logging to
    ``log_path``; returns once it answers.

    Raises :class:`DaemonUnavailable` (with the log's tail) if it exits or does not answer.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trims", "serve", "--socket", str(socket_path), "--store", str(store),
             "--host-memory", str(host_memory), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(socket_path).close()
            return process
        except DaemonUnavailable:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise DaemonUnavailable(f"the daemon did not start (exit {process.wait()}):\n{tail}") from None
            time.sleep(0.05)
