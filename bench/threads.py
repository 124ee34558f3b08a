"""One client, many threads: a threaded function process (gunicorn's gthread workers, a Ray
replica with threads) sharing one trims client, against one client per thread.

    python bench/threads.py            # about 2.5 minutes
    python bench/threads.py --quick    # about a minute

A daemon with --models models on disk (safetensors, --model-mib each, random weights) and a
function process (a child, as a server's worker would be) of --threads threads, each serving
requests back to back for --seconds: pick a model (uniformly), open it, read every weight
(numpy sums: inference's memory traffic, outside the GIL), close it. Per request: the open's
latency and the whole request's; requests per second are over the run's whole length, the
tail of its last requests (up to the busy timeout) included.

1. warm: host memory holds every model. One thread; then every thread sharing one client
   (what trims.shared_client() and the adapters give a process), and one client per thread.
   A ping's round trip, measured in the same process, is the floor under an open.
2. pressure: host memory holds --resident models, fewer than the threads, and the daemon
   waits up to --busy-timeout for room, so opens wait for other threads' releases. The shared
   client and a client per thread. Requests served per second, latency, requests that ran
   out of time, and the most opens seen waiting for room at once (the daemon's stats,
   sampled every 50 ms).

Both phases also run trims as it was before replies were matched to requests by id (revision
9ab59b5, client and daemon, taken from this checkout's history with git archive; left out
where the history lacks it): one request at a time per connection, the client shared by every
thread.

Every run is a fresh function process; the modes of a phase run one after the other against
one daemon per revision, the host tier emptied before each. Writes threads.json, threads.md and
threads.png to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

MiB = 2**20
IN_ORDER_REVISION = "9ab59b595964bec6ab6dae268170acae3072fbd9"  # the last to carry one request at a time


class Mode(NamedTuple):
    label: str
    one_thread: bool  # else --threads threads
    client_per_thread: bool  # else one client shared by the process's threads
    in_order: bool  # the client and daemon of IN_ORDER_REVISION, else this checkout's


MODES = {
    "one thread": Mode("one client, one thread", True, False, False),
    "one thread, in order": Mode("one client, one thread (9ab59b5, client and daemon)", True, False, True),
    "shared": Mode("one client shared by every thread", False, False, False),
    "per-thread": Mode("one client per thread", False, True, False),
    "in order": Mode("one client shared by every thread (9ab59b5, client and daemon)", False, False, True),
}
PHASES = {"warm": ["one thread", "one thread, in order", "shared", "per-thread", "in order"],
          "pressure": ["shared", "per-thread", "in order"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and shorter runs")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--model-mib", type=int, default=None, help="each model's size (default 32, quick 8)")
    parser.add_argument("--resident", type=int, default=3, help="models host memory holds under pressure")
    parser.add_argument("--seconds", type=float, default=None, help="each run's length (default 15, quick 5)")
    parser.add_argument("--busy-timeout", type=float, default=5.0, help="the daemon's wait for room, seconds")
    parser.add_argument("--phases", default="warm,pressure", help="which of warm,pressure to run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--function", default=None, help=argparse.SUPPRESS)  # the child's own entry
    args = parser.parse_args()
    if args.function is not None:
        print(json.dumps(serve(json.loads(args.function))))
        return
    model_bytes = (args.model_mib or (8 if args.quick else 32)) * MiB
    seconds = args.seconds or (5.0 if args.quick else 15.0)
    with tempfile.TemporaryDirectory(prefix="trims-threads-") as work:
        results = measure(Path(work), threads=args.threads, models=args.models, model_bytes=model_bytes,
                          resident=args.resident, seconds=seconds, busy_timeout=args.busy_timeout,
                          phases=args.phases.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(results, indent=1))
    (args.out / "threads.md").write_text(table(results))
    plot(results, args.out / "threads.png")
    print((args.out / "threads.md").read_text())


def measure(work: Path, *, threads: int, models: int, model_bytes: int, resident: int, seconds: float,
            busy_timeout: float, phases: list[str]) -> dict:
    """The phases' runs' summaries, keyed by phase and mode."""
    names = write_models(work / "models", models, model_bytes)
    settings = {"threads": threads, "models": models, "model_bytes": model_bytes, "resident": resident,
                "seconds": seconds, "busy_timeout": busy_timeout}
    warm_budget = (models + 1) * model_bytes
    pressure_budget = resident * model_bytes + model_bytes // 2  # room for `resident`, never one more
    in_order_src = _source_of_revision(IN_ORDER_REVISION, work / "in-order")
    results: dict = {"settings": settings}
    for phase in phases:
        results[phase] = {}
        revisions = [(None, False)] + ([(in_order_src, True)] if in_order_src else [])
        for src, in_order in revisions:
            modes = [mode for mode in PHASES[phase] if MODES[mode].in_order == in_order]
            budget = warm_budget if phase == "warm" else pressure_budget
            with start_daemon(work / phase / ("in-order" if src else "now"), budget, busy_timeout, src) as daemon:
                push_all(daemon.client, work / "models", names)
                for mode in modes:
                    results[phase][mode] = run_mode(daemon, phase, mode, names, threads, seconds, src)
    return results


def run_mode(daemon, phase: str, mode: str, names: list[str], threads: int, seconds: float,
             src: Path | None) -> dict:
    """One fresh function process's run against ``daemon``, from an empty (or, warm, a full) host tier."""
    how = MODES[mode]
    for name in names:
        daemon.client.evict(name, "host")
        if phase == "warm":
            daemon.client.pull(name, "host")
    spec = {"socket": str(daemon.socket), "names": names, "threads": 1 if how.one_thread else threads,
            "client_per_thread": how.client_per_thread, "seconds": seconds, "src": str(src) if src else None,
            "ping": phase == "warm" and mode == "one thread"}
    with _PeakWaiters(daemon.socket) as peak:
        run = run_function(spec)
    summary = summarize(run, peak.value)
    print(f"{phase:9} {mode:21} {summary['requests_per_s']:8.1f} requests/s", flush=True)
    return summary


def write_models(directory: Path, count: int, nbytes: int) -> list[str]:
    from tiers import write_model

    directory.mkdir(parents=True)
    names = [f"model{index}" for index in range(count)]
    for index, name in enumerate(names):
        write_model(directory / f"{name}.safetensors", nbytes, seed=index)
    return names


def start_daemon(workdir: Path, host_memory: int, busy_timeout: float, src: Path | None):
    """A daemon of this checkout, or of the trims source at ``src``.
    (bench/tiers.py is imported here, in the parent alone: it imports this checkout's trims,
    which a function process of another revision must not.)"""
    from tiers import Daemon

    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    return Daemon(workdir, "--busy-timeout", str(busy_timeout), host_memory=host_memory, env=env)


def push_all(client, directory: Path, names: list[str]) -> None:
    for name in names:
        client.push(directory / f"{name}.safetensors", name)


class _PeakWaiters:
    """The most requests the daemon had waiting for room at once, sampled while the block runs
    (a client of its own, so its stats requests never queue behind the function's); None from
    a daemon that does not count them (9ab59b5)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path, self.value = socket_path, None
        self._stop = threading.Event()

    def __enter__(self) -> _PeakWaiters:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import trims

        with trims.connect(self.socket_path) as client:
            while not self._stop.wait(0.05):
                waiting = client.stats().get("waiting_for_room")
                self.value = None if waiting is None else max(self.value or 0, waiting)


def _source_of_revision(revision: str, directory: Path) -> Path | None:
    """trims' source at ``revision``, from this checkout's history; None if it lacks it."""
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", revision, "src/trims"], capture_output=True)
    if archive.returncode != 0:
        print(f"left out the in-order runs: no revision {revision[:7]} here ({archive.stderr.decode().strip()})")
        return None
    directory.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory / "src"


def run_function(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--function", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the function process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# --- the function process ---------------------------------------------------------------------


def serve(spec: dict) -> dict:
    """Run the spec's threads for its seconds; every request's timings, relative to the start."""
    if spec["src"]:
        sys.path.insert(0, spec["src"])  # another revision's client
    import trims

    socket_path, names, count = spec["socket"], spec["names"], spec["threads"]
    shared = trims.connect(socket_path)
    clients = [trims.connect(socket_path) if spec["client_per_thread"] else shared for _ in range(count)]
    ping = _ping_round_trips(shared, 200) if spec["ping"] else []
    start = threading.Barrier(count + 1)
    records: list[list] = [[] for _ in range(count)]
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_serve_requests,
                                args=(clients[i], names, start, spec["seconds"], records[i], i, failures))
               for i in range(count)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for client in set(clients):
        client.close()
    if failures:  # a run that lost a thread measured fewer requests than it served: no result
        raise failures[0]
    return {"elapsed": elapsed, "ping": ping, "requests": [r for rows in records for r in rows]}


def _ping_round_trips(client, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - started)
    return times


def _serve_requests(client, names: list[str], start: threading.Barrier, seconds: float, records: list,
                    seed: int, failures: list[BaseException]) -> None:
    """Requests back to back until ``seconds`` have passed: (open s, request s, ok); anything
    but running out of time ends the thread, into ``failures``."""
    start.wait()
    try:
        _requests_until(client, names, time.perf_counter() + seconds, random.Random(seed).choice, records)
    except BaseException as exc:  # noqa: BLE001 -- the process reports it
        failures.append(exc)


def _requests_until(client, names: list[str], end: float, choose, records: list) -> None:
    from trims.errors import CapacityError

    while (began := time.perf_counter()) < end:
        name = choose(names)
        try:
            view = client.open(name)
        except CapacityError:
            records.append((time.perf_counter() - began, time.perf_counter() - began, False))
            continue
        opened = time.perf_counter()
        for key in view:
            view[key].sum()
        view.close()
        records.append((opened - began, time.perf_counter() - began, True))


# --- report -----------------------------------------------------------------------------------


def summarize(run: dict, peak_waiting: int | None) -> dict:
    served = [r for r in run["requests"] if r[2]]
    opens = sorted(r[0] for r in served)
    whole = sorted(r[1] for r in served)
    summary = {
        "requests": len(served),
        "ran_out_of_time": len(run["requests"]) - len(served),
        "requests_per_s": len(served) / run["elapsed"],
        "open_ms": _percentiles(opens),
        "request_ms": _percentiles(whole),
        "peak_waiting_for_room": peak_waiting,
        "open_cdf_ms": _every_percentile(opens),
    }
    if run["ping"]:
        summary["ping_ms"] = _percentiles(sorted(run["ping"]))
    return summary


def _every_percentile(sorted_seconds: list[float]) -> list[float]:
    """Milliseconds at 0, 1, ... 100 %: the distribution's shape, in a fixed size."""
    if not sorted_seconds:
        return []
    last = len(sorted_seconds) - 1
    return [round(sorted_seconds[min(last, len(sorted_seconds) * q // 100)] * 1e3, 4) for q in range(101)]


def _percentiles(sorted_seconds: list[float]) -> dict:
    if not sorted_seconds:
        return {"p50": None, "p99": None, "mean": None}
    at = lambda q: sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))] * 1e3  # noqa: E731
    return {"p50": at(0.50), "p99": at(0.99), "mean": statistics.fmean(sorted_seconds) * 1e3}


def table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"{s['threads']} threads, {s['models']} models of {s['model_bytes'] // MiB} MiB, {s['seconds']:g} s a run; "
        f"under pressure host memory holds {s['resident']} and the daemon waits up to {s['busy_timeout']:g} s "
        "for room.",
        "",
        "| phase | client | requests/s | open p50 ms | open p99 ms | request p50 ms | request p99 ms "
        "| ran out of time | most waiting for room |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in [phase for phase in PHASES if phase in results]:
        for mode, row in results[phase].items():
            lines.append(
                f"| {phase} | {MODES[mode].label} | {row['requests_per_s']:.1f} | {_ms(row['open_ms']['p50'])} "
                f"| {_ms(row['open_ms']['p99'])} | {_ms(row['request_ms']['p50'])} | {_ms(row['request_ms']['p99'])} "
                f"| {row['ran_out_of_time']} | {_or_dash(row['peak_waiting_for_room'])} |")
    lines += ["", *_findings(results)]
    return "\n".join(lines) + "\n"


def _findings(results: dict) -> list[str]:
    """The side-by-side ratios, in words."""
    found = []
    warm, pressure = results.get("warm", {}), results.get("pressure", {})
    if warm:
        ping, alone = warm["one thread"]["ping_ms"], warm["one thread"]["open_ms"]
        found.append(f"- A ping's round trip: p50 {_ms(ping['p50'])} ms; a warm open, one thread: p50 "
                     f"{_ms(alone['p50'])} ms, p99 {_ms(alone['p99'])} ms.")
        if "one thread, in order" in warm:
            before = warm["one thread, in order"]["open_ms"]
            found.append(f"- One thread's warm open takes {alone['p50'] / before['p50']:.2f}x (p50) and "
                         f"{alone['p99'] / before['p99']:.2f}x (p99) the time it took with 9ab59b5 (client and daemon).")
        shared, apart = warm["shared"], warm["per-thread"]
        found.append(f"- Warm, {results['settings']['threads']} threads: the shared client serves "
                     f"{shared['requests_per_s'] / apart['requests_per_s']:.2f}x the requests of a client per thread, "
                     f"its open p50 {shared['open_ms']['p50'] / apart['open_ms']['p50']:.2f}x, its request p50 "
                     f"{shared['request_ms']['p50'] / apart['request_ms']['p50']:.2f}x.")
    if "in order" in pressure:
        shared, before = pressure["shared"], pressure["in order"]
        ratio = shared["requests_per_s"] / before["requests_per_s"]
        found.append(f"- Under pressure the shared client serves {ratio:.1f}x "
                     f"the requests 9ab59b5 did; {before['ran_out_of_time']} of that client's opens ran out of time "
                     f"(a release queued behind an open waiting for the memory it would free), "
                     f"{shared['ran_out_of_time']} of this one's.")
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [phase for phase in PHASES if phase in results]
    figure, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
    for phase, ax in zip(present, axes[0]):
        (_plot_warm if phase == "warm" else _plot_pressure)(results[phase], ax)
    figure.tight_layout()
    figure.savefig(path, dpi=120)



def _plot_warm(runs: dict, ax) -> None:
    for mode, row in runs.items():
        ax.plot(row["open_cdf_ms"], [q / 100 for q in range(len(row["open_cdf_ms"]))], label=MODES[mode].label)
    ax.axvline(runs["one thread"]["ping_ms"]["p50"], color="grey", linestyle=":", label="ping p50")
    ax.set_xscale("log")
    ax.set_xlabel("warm open latency, ms")
    ax.set_ylabel("fraction of opens")
    ax.legend(fontsize=8)


def _plot_pressure(runs: dict, ax) -> None:
    modes = list(runs)
    bars = ax.bar(range(len(modes)), [runs[mode]["requests_per_s"] for mode in modes])
    for bar, mode in zip(bars, modes):
        ax.annotate(f"{runs[mode]['ran_out_of_time']} ran out of time", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(modes)), [MODES[mode].label for mode in modes], rotation=12, ha="right", fontsize=8)
    ax.set_ylabel("requests/s under memory pressure")


if __name__ == "__main__":
    main()
