"""Soak: the chaos suite's hostile traffic and client kills, at a scale CI has no time for.

    python bench/soak.py                          # 1,000,000 hostile frames, 2,000 killed clients
    python bench/soak.py --frames 50000 --kills 200

Starts a daemon, pushes a model, then alternates rounds of hostile frames and of clients
killed at random points. After each round it checks the daemon is alive and that its
leases, connections and descriptors are back to where they were, and prints one line.
Exits non-zero at the first round that breaks that.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import trims  # noqa: E402
from tests.hostile import send_hostile  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--kills", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trims-soak-"))
    socket_path = work / "trims.sock"
    daemon = start_daemon_process(socket_path, work / "store", "1G", work / "daemon.log")
    os.environ["TRIMS_SOCKET"] = str(socket_path)
    try:
        save_file({"w": np.random.default_rng(0).standard_normal(64 * 1024, dtype=np.float32)}, str(work / "m.safetensors"))
        client = trims.connect(socket_path)
        client.push(work / "m.safetensors", "chaos/model")
        client.open("chaos/model").close()
        baseline = _counts(client)
        rng = random.Random(0)
        for round_ in range(1, args.rounds + 1):
            started = time.monotonic()
            send_hostile(socket_path, rng, args.frames // args.rounds)
            subprocess.run([sys.executable, str(ROOT / "tests" / "chaos_clients.py"), str(args.kills // args.rounds),
                            str(work / "m.safetensors"), str(rng.randrange(2**31))], check=True)
            counts = _settle(client, baseline)
            print(f"round {round_}/{args.rounds}: {args.frames // args.rounds} frames, {args.kills // args.rounds} kills "
                  f"in {time.monotonic() - started:.0f} s; leases/connections/fds {counts} (baseline {baseline})",
                  flush=True)
            if daemon.poll() is not None or counts != baseline:
                print(f"FAILED: the daemon {'died' if daemon.poll() is not None else 'did not return to baseline'}; "
                      f"log: {work / 'daemon.log'}")
                return 1
        tracebacks = (work / "daemon.log").read_text(errors="replace").count("Traceback")
        print(f"done: daemon alive, every round back to baseline, {tracebacks} tracebacks in its log")
        return 1 if tracebacks else 0
    finally:
        daemon.terminate()
        daemon.wait()


def _counts(client: trims.Client) -> tuple[int, int, int]:
    stats = client.stats()
    return stats["leases"], stats["connections"], stats["daemon"]["open_fds"]


def _settle(client: trims.Client, baseline: tuple[int, int, int], timeout: float = 60) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while (counts := _counts(client)) != baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    return counts


if __name__ == "__main__":
    raise SystemExit(main())
