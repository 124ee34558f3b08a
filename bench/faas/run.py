"""The FaaS evaluation: the paper's latency (Fig. 7) and throughput (Fig. 10) experiments on trims.

    python bench/faas/run.py                  # the full zoo (26 models, 10.8 GiB); about 75 minutes on 2 CPUs
    python bench/faas/run.py --zoo small      # no model over 600 MB: for machines under 16 GB
    python bench/faas/run.py --quick          # a 3 x 3 grid instead of 6 x 6
    python bench/faas/run.py --keep-alive 0 --warm-node --quick --phases none --out bench/results/faas/paper
    python bench/faas/run.py --no-grid --phases beyond --at 0.8,1 --out bench/results/faas/beyond
    python bench/faas/run.py --zoo tiny --requests 8 --concurrency 1,2 --fractions 0.5,1 --runs 1 --repeats 1 --pool 3
    python bench/faas/run.py --device cuda --zoo small --quick   # a GPU node (bench/faas/device-check.sh)

One node: a trims daemon whose host memory is the node's model budget (40 % of the zoo, as
the paper's zoo was twice its capped GPU memory), a pool of pre-warmed function instances
(separate processes) with keep-alive, and closed-loop clients sending requests drawn from
the paper's Pareto stream. Every cell of the grid runs both ways, one run right after the
other: instances that load their own copy (the baseline), and instances that map the daemon's;
three times (``--repeats``), each repeat with its own request stream, pooled. Then, at the
grid's best point (or ``--at``), Zipf and uniform streams, and the cost-aware policy beside
LRU and the baseline, with the node's budget and with half of it.
Writes faas.json, faas.md, latency.png, throughput.png and memory.png to bench/results/faas.

With ``--device cuda``, the paper's own setting: instances run models on the GPU, the budget
is device memory (the daemon's GPU tier, with the whole zoo allowed in its host memory as the
paper's hosts held it), a baseline instance copies the model into device memory of its own,
and a trims instance maps the daemon's one copy there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent / "src")]

import measure  # noqa: E402
import report  # noqa: E402
import streams  # noqa: E402
import zoo  # noqa: E402
from node import Pool  # noqa: E402

from trims import connect  # noqa: E402
from trims.config import format_size  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402


def main() -> None:
    args = _arguments()
    # A stop (^C, SIGTERM, a time limit) interrupts once: the report of what was measured and
    # the daemon's shutdown then run to the end. `timeout` signals the child and then its whole
    # process group, so the same stop arrives twice.
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # cuda:N is NVML's (nvidia-smi's) N
    models = zoo.zoo(args.zoo)
    directories = zoo.ensure_built(models, args.cache)
    names = sorted((m.name for m in models), key=lambda name: zoo.weight_bytes(directories[name]))  # small to large
    workdir = Path(tempfile.mkdtemp(prefix="trims-faas-"))
    results: dict = {"machine": _machine(), "command": " ".join(sys.argv), "settings": vars(args) | {
        "cache": str(args.cache), "out": str(args.out), "phases": sorted(args.phases)}}
    if args.device != "cpu":
        results["machine"]["device"] = _device_name(args.device)
    files = {name: zoo.weight_bytes(directories[name]) for name in names}
    budget = max(int(args.budget * sum(files.values())), int(1.05 * max(files.values())))
    tight = max(int(args.budget / 2 * sum(files.values())), int(1.05 * max(files.values())))
    print(f"{len(names)} models, {format_size(sum(files.values()))}; node budget {format_size(budget)}", flush=True)

    pool = Pool(args.pool, workdir / "trims.sock", names, args.device)
    try:
        with _daemon(workdir, budget, "lru", args.device, files) as client:
            for name in names:
                client.push(directories[name], f"zoo/{name}")
            sizes = {name: client.info(f"zoo/{name}").nbytes for name in names}
            results |= {"zoo": [{"name": n, "bytes": sizes[n]} for n in names], "budget": budget, "tight_budget": tight}
            host = client.stats()["tiers"]["host"]
            results["machine"] |= {"host_tier_pages": "2 MiB" if host["huge_pages"] else "4 KiB",
                                   "shmem_enabled": host["shmem_enabled"]}
            bench = measure.Bench(pool, client, workdir / "store", directories, sizes, args.keep_alive)
            if args.device != "cpu":
                bench.warm_instances()
            if "latency" in args.phases:
                _latency(bench, names, args.runs, results, args.out)
                report.write(results, args.out)
            if not args.no_grid:
                _grid(bench, budget, names, args, results)
                report.write(results, args.out)
            if "streams" in args.phases:
                point = _point(args, results)
                results["streams"] = [_pair(bench, budget, names, point["concurrency"], point["fraction"], args, stream)
                                      for stream in ("zipf", "uniform")]
        if "beyond" in args.phases:
            results["beyond"] = _beyond(pool, workdir, directories, sizes, names, _point(args, results), budget,
                                        tight, args, files)
    except BaseException:
        _keep_daemon_log(workdir, args.out)
        if "zoo" in results:
            report.write(results, args.out)  # what was measured before the failure or the interrupt
        raise
    finally:
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report.write(results, args.out)
    print((args.out / "faas.md").read_text())


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=zoo.SCALES, default="full", help="which models (see bench/faas/zoo.py)")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4,8 x fractions 0.1,0.4,1")
    parser.add_argument("--concurrency", type=_numbers(int), default=None, help="clients, e.g. 1,2,4,6,8,10")
    parser.add_argument("--fractions", type=_numbers(float), default=None, help="of the zoo in play, e.g. 0.1,0.4,1")
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per cell and mode, each with its own request stream (seeds 0, 1, …), pooled")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per latency measurement (median)")
    parser.add_argument("--pool", type=int, default=10, help="function instances on the node")
    parser.add_argument("--budget", type=float, default=0.4, help="node memory for models, as a fraction of the zoo")
    parser.add_argument("--keep-alive", type=float, default=60.0, help="seconds an idle instance keeps its model")
    parser.add_argument("--device", default="cpu",
                        help="where instances run models: cpu, or cuda[:N] (the budget then caps that GPU's "
                             "memory for models, and the host tier holds the whole zoo)")
    parser.add_argument("--warm-node", action="store_true",
                        help="start each run with the node's cache warm (steady state) rather than cold")
    parser.add_argument("--phases", type=lambda text: set(text.split(",")), default={"latency", "streams", "beyond"},
                        help="besides the grid, any of latency,streams,beyond, or none (default: all three)")
    parser.add_argument("--no-grid", action="store_true", help="skip the grid (with --phases latency: Fig. 7 alone)")
    parser.add_argument("--at", type=_point_argument, default=None, metavar="FRACTION,CONCURRENCY",
                        help="where the streams and beyond phases run, e.g. 0.8,1 (default: the grid's best point)")
    parser.add_argument("--cache", type=Path, default=HERE.parent / "results" / "cache" / "faas",
                        help="where the zoo is built")
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "faas")
    args = parser.parse_args()
    unknown = args.phases - {"latency", "streams", "beyond", "none"}
    if unknown:
        parser.error(f"unknown phases {', '.join(sorted(unknown))}; choose from latency, streams, beyond (or none)")
    if args.no_grid and args.phases & {"streams", "beyond"} and args.at is None:
        parser.error("without the grid there is no best point for the streams and beyond phases: give --at")
    args.concurrency = args.concurrency or ([1, 4, 8] if args.quick else [1, 2, 4, 6, 8, 10])
    args.fractions = args.fractions or ([0.1, 0.4, 1.0] if args.quick else [0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    return args


def _latency(bench: measure.Bench, names: list[str], runs: int, results: dict, out: Path) -> None:
    """Each model's row into ``results["latency"]``, saved to faas.json as soon as it is measured."""
    latency = results["latency"] = {}
    for name in names:
        latency[name] = measure.model_latency(bench, name, runs)
        print(f"latency {name}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in latency[name].items()), flush=True)
        report.save(results, out)


def _grid(bench: measure.Bench, budget: int, names: list[str], args: argparse.Namespace, results: dict) -> None:
    """Every cell into ``results["grid"]``, saved to faas.json as soon as it is measured, so a
    failed run keeps them."""
    grid = results["grid"] = []
    for fraction in args.fractions:
        for concurrency in args.concurrency:
            grid.append(_pair(bench, budget, names, concurrency, fraction, args))
            report.save(results, args.out)


def _pair(bench: measure.Bench, budget: int, names: list[str], concurrency: int, fraction: float,
          args: argparse.Namespace, stream: str = "pareto", sources: tuple[str, ...] = measure.SOURCES) -> dict:
    """One cell: each repeat's request stream (seed 0, 1, …) served each way, one right after
    the other; the repeats pooled, and the throughput ratio of each repeat kept for its spread."""
    playing = streams.in_play(names, fraction)
    runs: dict[str, list[dict]] = {source: [] for source in sources}
    for seed in range(args.repeats):
        for source in _alternated(sources, seed):
            runs[source].append(measure.load_run(bench, source, budget, playing, concurrency, args.requests, stream,
                                                 args.warm_node, seed))
    cell = {"concurrency": concurrency, "fraction": fraction, "stream": stream}
    cell |= {source: measure.pooled(source_runs) for source, source_runs in runs.items()}
    if set(measure.SOURCES) <= set(cell):
        cell["throughput_ratio"] = cell["trims"]["throughput"] / cell["own"]["throughput"]
        cell["repeat_ratios"] = [shared["throughput"] / own["throughput"] for own, shared in zip(runs["own"], runs["trims"])]
    print(report.cell_line(cell), flush=True)
    return cell


def _beyond(pool: Pool, workdir: Path, directories: dict, sizes: dict, names: list[str], point: dict,
            budget: int, tight: int, args: argparse.Namespace, files: dict[str, int]) -> list[dict]:
    """At the point's concurrency, with its fraction of the zoo and with all of it, with the
    node's budget and with half of it: the cost-aware policy beside LRU, and both beside the
    baseline. Each repeat's stream is served three ways back to back, trims on a fresh daemon of
    each policy, so the policies meet the same disk and page cache (a cell of the grid ran up
    to an hour earlier, and these VMs' disks are not that steady)."""
    cells = []
    for label, memory in (("budget", budget), ("half budget", tight)):
        for fraction in sorted({point["fraction"], 1.0}):
            playing = streams.in_play(names, fraction)
            runs: dict[str, list[dict]] = {"own": [], "lru": [], "cost": []}
            for seed in range(args.repeats):
                for policy in _alternated(("lru", "cost"), seed):
                    with _daemon(workdir, memory, policy, args.device, files) as client:
                        bench = measure.Bench(pool, client, workdir / "store", directories, sizes, args.keep_alive)
                        for source in _alternated(measure.SOURCES, seed) if policy == "lru" else ("trims",):
                            runs[policy if source == "trims" else source].append(measure.load_run(
                                bench, source, memory, playing, point["concurrency"], args.requests, "pareto",
                                args.warm_node, seed))
            cells += _policy_cells(runs, label, fraction, point["concurrency"])
    return cells


def _alternated(order: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """``order``, reversed for every other repeat: whatever the first run after another pays
    (an architecture's first run in an instance, a cache another run left) falls on each way
    alike, not always on the baseline."""
    return order if seed % 2 == 0 else tuple(reversed(order))


def _policy_cells(runs: dict[str, list[dict]], label: str, fraction: float, concurrency: int) -> list[dict]:
    """LRU's cell (the baseline and trims, with their ratio) and the cost-aware policy's (trims,
    with its ratio to LRU's, pooled and per repeat)."""
    common = {"concurrency": concurrency, "fraction": fraction, "stream": "pareto", "memory": label}
    pooled = {name: measure.pooled(name_runs) for name, name_runs in runs.items()}
    lru = common | {"policy": "lru", "own": pooled["own"], "trims": pooled["lru"],
                    "throughput_ratio": pooled["lru"]["throughput"] / pooled["own"]["throughput"],
                    "repeat_ratios": [t["throughput"] / o["throughput"] for o, t in zip(runs["own"], runs["lru"])]}
    cost = common | {"policy": "cost", "trims": pooled["cost"],
                     "policy_ratio": pooled["cost"]["throughput"] / pooled["lru"]["throughput"],
                     "repeat_policy_ratios": [c["throughput"] / t["throughput"] for t, c in zip(runs["lru"], runs["cost"])]}
    for cell in (lru, cost):
        print(report.cell_line(cell), flush=True)
    return [lru, cost]


@contextlib.contextmanager
def _daemon(workdir: Path, budget: int, policy: str, device: str, files: dict[str, int]):
    """A daemon whose memory for models is the node's budget: its host memory on a CPU node; on
    a GPU node its GPU tier (allocations are rounded up to 2 MiB granules), above a host tier
    that holds the whole zoo."""
    socket_path = workdir / "trims.sock"
    # An open that finds memory held by leases waits for them: an instance's release reaches
    # the daemon just after it drops a model, and a freshly placed one may be faster.
    extra = ["--policy", policy, "--busy-timeout", "30"]
    host_memory = int(budget * 1.01) + (1 << 20)
    if device != "cpu":
        extra += ["--gpu-memory", str(host_memory + len(files) * (2 << 20))]
        host_memory = int(sum(files.values()) * 1.05) + (64 << 20)
    process = start_daemon_process(socket_path, workdir / "store", host_memory, workdir / "daemon.log",
                                   extra=tuple(extra), timeout=120)
    try:
        with connect(socket_path) as client:
            yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # under a time limit, the partial results matter more
            process.kill()
            process.wait()
        time.sleep(0.2)


def _interrupt_once(signum: int, frame: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _keep_daemon_log(workdir: Path, out: Path) -> None:
    """A failed run's daemon log, kept beside its results (the work directory goes)."""
    if (workdir / "daemon.log").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(workdir / "daemon.log", out / "daemon.log")
        print(f"the daemon's log is kept in {out / 'daemon.log'}", file=sys.stderr)


def _point(args: argparse.Namespace, results: dict) -> dict:
    """Where the streams and beyond phases run: ``--at``, else the grid's best point."""
    return args.at or report.best_cell(results["grid"])


def _point_argument(text: str) -> dict:
    fraction, concurrency = text.split(",")
    return {"fraction": float(fraction), "concurrency": int(concurrency)}


def _numbers(kind):
    return lambda text: [kind(part) for part in text.split(",")]


def _device_name(device: str) -> str:
    """The GPU's name, as nvidia-smi gives it (the controller makes no CUDA context)."""
    from device_memory import nvml_device

    index = nvml_device(int(device.partition(":")[2] or 0))
    query = ["nvidia-smi", "-i", index, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()


def _machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


if __name__ == "__main__":
    main()
