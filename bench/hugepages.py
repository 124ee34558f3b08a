"""Huge pages for the host tier: a warm trims hit with segments in 2 MiB pages against 4 KiB ones.

    sudo python bench/hugepages.py              # BERT-base, GPT-2 large, Llama 1B (about 25 minutes)
    sudo python bench/hugepages.py --small      # ResNet-50, BERT-base, GPT-2

Needs root: it switches the kernel's /sys/kernel/mm/transparent_hugepage/shmem_enabled between
``never`` and ``advise`` (and puts back what it found). Two daemons run side by side, one
started under each setting, so one holds its segments in 4 KiB pages and the other in 2 MiB
pages; runs alternate between them, the setting switched before each, so machine noise hits
both alike. Per model and setting: fresh processes time a warm hit (ms to a ready module, and
its first inference, which faults the mapped weights in), this process times touching every
page of the mapped model, and the daemon times bringing the model from its disk (the file in
page cache) into host memory. Each round's order alternates (4 KiB first, then 2 MiB first),
after one unmeasured round. Writes hugepages.json, hugepages.md and hugepages.png to
bench/results (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import coldstart  # noqa: E402  (also puts this checkout's trims first on the path, for children too)

from trims import connect  # noqa: E402
from trims.config import format_size  # noqa: E402
from trims.hugepages import shmem_setting  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402

SETTING = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
SETTINGS = ("never", "advise")  # 4 KiB pages; 2 MiB pages for trims alone
FULL = ["bert-base", "gpt2-large", "llama-1b"]
SMALL = ["resnet50", "bert-base", "gpt2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated names of trims.examples")
    parser.add_argument("--small", action="store_true", help=f"models sized for a small machine: {', '.join(SMALL)}")
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per model and setting (median reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not os.access(SETTING, os.W_OK):
        sys.exit(f"bench/hugepages.py switches {SETTING}: run it as root on a kernel with transparent huge pages")
    models = args.models.split(",") if args.models else (SMALL if args.small else FULL)
    args.out.mkdir(parents=True, exist_ok=True)
    original = shmem_setting()
    results: dict = {"machine": coldstart._machine(), "runs": args.runs, "original_setting": original, "models": {}}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below puts the setting back
    try:
        for model in models:
            directory = coldstart._build(model, args.out / "cache" / model, dict(os.environ))
            results["models"][model] = _measure(model, directory, args.runs)
            _write(results, args.out)
    finally:
        _switch(original)
    print((args.out / "hugepages.md").read_text())


def _measure(model: str, directory: Path, runs: int) -> dict:
    name = f"bench/{model}"
    nbytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    samples: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    with contextlib.ExitStack() as stack:
        daemons = {setting: stack.enter_context(_daemon(setting, directory, name, nbytes)) for setting in SETTINGS}
        for run in range(-1, runs):  # round -1 is not kept: the first processes after a build run cold
            for setting in SETTINGS if run % 2 else reversed(SETTINGS):
                env, client, store = daemons[setting]
                _switch(setting)
                sample = coldstart._function("trims", model, directory, name, env)
                sample |= _touch(client, name) | _load(client, name, store)
                sample["excess_s"] = sample["first_inference_s"] - sample["second_inference_s"]  # the faults' cost
                if run < 0:
                    continue
                samples[setting].append(sample)
                print(f"{model} run {run + 1}/{runs} {setting:6} ready {sample['ready_s'] * 1e3:7.1f} ms  inference "
                      f"{sample['first_inference_s'] * 1e3:7.1f} ms, again {sample['second_inference_s'] * 1e3:7.1f} ms  "
                      f"touch {sample['touch_gbps']:6.1f} GB/s  disk->host {sample['load_gbps']:5.2f} GB/s", flush=True)
    keys = ("ready_s", "first_inference_s", "second_inference_s", "excess_s", "touch_gbps", "load_gbps")
    return {"nbytes": nbytes, "samples": samples,
            "summary": {s: {k: statistics.median(r[k] for r in samples[s]) for k in keys} for s in SETTINGS}}


@contextlib.contextmanager
def _daemon(setting: str, directory: Path, name: str, nbytes: int):
    """A daemon started under ``setting`` (its host tier reads it once), the model pushed and
    in its host memory; yields its clients' environment, a client and its store."""
    _switch(setting)
    with tempfile.TemporaryDirectory(prefix=f"trims-hugepages-{setting}-") as temp:
        workdir = Path(temp)
        socket_path = workdir / "trims.sock"
        process = start_daemon_process(socket_path, workdir / "store", 2 * nbytes + (1 << 30), workdir / "daemon.log")
        try:
            with connect(socket_path) as client:
                if client.stats()["tiers"]["host"]["huge_pages"] != (setting != "never"):
                    raise RuntimeError(f"under shmem_enabled={setting} the daemon's host tier does not get the pages "
                                       "it should; this kernel cannot be measured both ways")
                client.push(directory, name)
                client.pull(name, "host")
                yield {**os.environ, "TRIMS_SOCKET": str(socket_path)}, client, workdir / "store"
        except BaseException:
            log = Path(tempfile.gettempdir()) / f"trims-hugepages-{setting}-daemon.log"
            log.write_bytes((workdir / "daemon.log").read_bytes())  # the work directory goes
            print(f"the {setting} daemon's log is kept in {log}", file=sys.stderr)
            raise
        finally:
            process.terminate()
            process.wait()


def _touch(client, name: str) -> dict:
    """Read one byte of every 4 KiB page of the mapped model, here: the page faults of a first use."""
    with client.open(name) as view:
        started = time.perf_counter()
        nbytes = 0
        for segment in view.segments:
            int(np.frombuffer(segment, dtype=np.uint8)[::4096].sum())
            nbytes += len(segment)
        return {"touch_gbps": nbytes / (time.perf_counter() - started) / 1e9}


def _load(client, name: str, store: Path) -> dict:
    """The daemon's disk -> host move of the model, its segment files in page cache: evict it
    from host memory, then time a pull (copy and verification)."""
    client.evict(name)
    coldstart._read_into_page_cache(sorted((store / "disk").glob("*.bin")))
    started = time.perf_counter()
    client.pull(name, "host")
    seconds = time.perf_counter() - started
    return {"load_gbps": client.info(name).nbytes / seconds / 1e9}


def _switch(setting: str) -> None:
    SETTING.write_text(setting)
    if shmem_setting() != setting:
        raise RuntimeError(f"{SETTING} did not take {setting!r}")


def _write(results: dict, out: Path) -> None:
    (out / "hugepages.json").write_text(json.dumps(results, indent=2))
    (out / "hugepages.md").write_text(_table(results))
    _plot(results, out / "hugepages.png")


def _table(results: dict) -> str:
    machine = results["machine"]
    lines = [f"Warm trims hits with host segments in 4 KiB pages (shmem_enabled=never) and 2 MiB pages "
             f"(shmem_enabled=advise); medians of {results['runs']} fresh processes per cell, interleaved; "
             f"{machine['summary']}, {machine['date']}.", "",
             "| model | size | ready ms | first inference ms | its excess over a second, ms | page touch GB/s "
             "| disk -> host GB/s |", "|---|---|---|---|---|---|---|"]
    for model, row in results["models"].items():
        small, huge = row["summary"]["never"], row["summary"]["advise"]
        cells = [f"{small[key] * scale:.{digits}f} / {huge[key] * scale:.{digits}f}" for key, scale, digits in (
            ("ready_s", 1e3, 1), ("first_inference_s", 1e3, 0), ("excess_s", 1e3, 0), ("touch_gbps", 1, 1),
            ("load_gbps", 1, 2))]
        lines.append(f"| {model} | {format_size(row['nbytes'])} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: 4 KiB pages / 2 MiB pages, the median over the runs. A second inference in the same "
              "process has nothing left to fault in: the first's excess over it (per process, then the median) is "
              "the cost of first touching the weights."]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    figure, axes = plt.subplots(figsize=(8, 4))
    for k, (setting, label) in enumerate((("never", "4 KiB pages"), ("advise", "2 MiB pages"))):
        values = [results["models"][m]["summary"][setting]["excess_s"] * 1e3 for m in models]
        axes.bar([i + 0.4 * k for i in range(len(models))], values, width=0.4, label=label)
    axes.set_xticks([i + 0.2 for i in range(len(models))], models)
    axes.set_ylabel("first minus second inference, ms")
    axes.set_title("first touch of the weights after a warm hit")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
