"""Cold-start benchmark: time to a ready model in a fresh process, and memory of 4 holders.

    python bench/coldstart.py                     # ResNet-50, BERT-base, GPT-2 large, Llama 1B
    python bench/coldstart.py --small --runs 3    # a few minutes on a small machine

Models are built from their configs with random weights (nothing downloaded) and cached in
bench/results/cache. Each measurement is a fresh Python process; modes run interleaved, run
after run, so that machine noise hits them alike. "evicted" runs start with the weight files
dropped from the page cache (posix_fadvise DONTNEED); the others start right after reading
them, because this kind of VM evicts page cache left unused for about a minute. Writes coldstart.json, coldstart.md and
coldstart.png to bench/results (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every child (daemon, function processes) runs the trims next to this script.
sys.path.insert(0, str(HERE.parent / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

from trims import connect  # noqa: E402
from trims.config import format_size  # noqa: E402
from trims.demo import drop_page_cache  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402

FULL = ["resnet50", "bert-base", "gpt2-large", "llama-1b"]
SMALL = ["resnet50", "bert-base", "gpt2"]
# label, worker mode, weights evicted from page cache first (else read into it first)
MODES = [
    ("naive", "naive", False),
    ("naive, evicted", "naive", True),
    ("best", "best", False),
    ("best, evicted", "best", True),
    ("trims", "trims", None),
]
HOLDERS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated, from: {', '.join(FULL + ['gpt2'])}")
    parser.add_argument("--small", action="store_true", help=f"models sized for a small machine: {', '.join(SMALL)}")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per mode and model (median reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else (SMALL if args.small else FULL)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"

    workdir = Path(tempfile.mkdtemp(prefix="trims-bench-"))
    socket_path = workdir / "trims.sock"
    env = {**os.environ, "TRIMS_SOCKET": str(socket_path)}
    results = {"machine": _machine(), "runs": args.runs, "holders": HOLDERS, "models": {}}
    for model in models:
        directory = _build(model, cache / model, env)
        nbytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        daemon = start_daemon_process(socket_path, workdir / "store", 2 * nbytes + 2**30, workdir / "daemon.log")
        try:
            results["models"][model] = _measure(model, directory, nbytes, args.runs, env)
        finally:
            daemon.terminate()
            daemon.wait()
        _write(results, args.out)  # after every model: a long run keeps what it measured
    print((args.out / "coldstart.md").read_text())


def _build(model: str, directory: Path, env: dict) -> Path:
    """The model's Hugging Face directory plus a pytorch_model.bin for the naive path."""
    if (directory / "pytorch_model.bin").exists():
        return directory
    print(f"building {model} in {directory} ...", flush=True)
    code = (
        "import sys, torch; from pathlib import Path; from trims.examples import EXAMPLES\n"
        "d = Path(sys.argv[2]); e = EXAMPLES[sys.argv[1]]; torch.manual_seed(0); m = e.factory()().eval()\n"
        "m.save_pretrained(d); torch.save(m.state_dict(), d / 'pytorch_model.bin')\n"
    )
    subprocess.run([sys.executable, "-c", code, model, str(directory)], env=env, check=True)
    return directory


def _measure(model: str, directory: Path, nbytes: int, runs: int, env: dict) -> dict:
    client = connect(Path(env["TRIMS_SOCKET"]))
    name = f"bench/{model}"
    client.push(directory, name)
    client.open(name).close()  # (c) is a warm hit: the model is already in host memory
    weights = sorted(directory.glob("*.safetensors")) + [directory / "pytorch_model.bin"]
    samples: dict[str, list[dict]] = {label: [] for label, _, _ in MODES}
    for run in range(runs):
        for label, mode, evict in MODES:
            # This VM drops page cache unused for about a minute, so "warm" must be made so.
            if evict is True:
                drop_page_cache(weights)
            elif evict is False:
                _read_into_page_cache(weights)
            report = _function(mode, model, directory, name, env)
            samples[label].append(report)
            print(f"{model} run {run + 1}/{runs} {label:15} ready {report['ready_s'] * 1e3:9.1f} ms  "
                  f"first inference {report['first_inference_s'] * 1e3:8.1f} ms", flush=True)
    memory = {mode: _memory_of_holders(mode, model, directory, name, env) for mode in ("best", "trims")}
    client.evict(name)
    client.close()
    return {"nbytes": nbytes, "samples": samples, "summary": _summarise(samples), "memory": memory}


def _read_into_page_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def _function(mode: str, model: str, directory: Path, name: str, env: dict, hold: bool = False):
    command = [sys.executable, str(HERE / "_function.py"), mode, model, str(directory), name] + (["--hold"] if hold else [])
    if hold:
        return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _memory_of_holders(mode: str, model: str, directory: Path, name: str, env: dict) -> dict:
    """PSS of HOLDERS processes that each hold the model and have run it once, all alive."""
    holders = []
    try:
        for _ in range(HOLDERS):
            process = _function(mode, model, directory, name, env, hold=True)
            holders.append(process)
            json.loads(process.stdout.readline())
        pss = [_pss(p.pid, directory) for p in holders]
    finally:
        for process in holders:
            process.stdin.write("\n")
            process.stdin.flush()
            process.wait()
    return {"total_pss": sum(p["total"] for p in pss), "weights_pss": sum(p["weights"] for p in pss)}


def _pss(pid: int, directory: Path) -> dict:
    """Whole-process PSS, and the PSS of mappings of the weights (store memfd or model file)."""
    total = weights = 0
    is_weights = False
    for line in open(f"/proc/{pid}/smaps"):
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
            path = fields[5] if len(fields) > 5 else ""
            is_weights = "memfd:trims" in path or path.startswith(str(directory))
        elif fields[0] == "Pss:":
            kib = int(fields[1]) * 1024
            total += kib
            weights += kib if is_weights else 0
    return {"total": total, "weights": weights}


def _summarise(samples: dict[str, list[dict]]) -> dict:
    summary = {}
    for label, reports in samples.items():
        summary[label] = {
            key: statistics.median(r[key] for r in reports)
            for key in ("ready_s", "first_inference_s", "torch_import_s")
        }
    return summary


def _write(results: dict, out: Path) -> None:
    (out / "coldstart.json").write_text(json.dumps(results, indent=2))
    (out / "coldstart.md").write_text(_table(results))
    _plot(results, out / "coldstart.png")


def _table(results: dict) -> str:
    labels = [label for label, _, _ in MODES]
    lines = [
        f"Median of {results['runs']} fresh processes per cell; ms to a ready model (+ first inference). "
        f"{results['machine']['summary']}.",
        "",
        "| model | size | " + " | ".join(labels) + " | trims vs naive | trims vs best | "
        f"PSS of {HOLDERS} holders (weights), best / trims |",
        "|---" * (len(labels) + 5) + "|",
    ]
    for model, data in results["models"].items():
        s = data["summary"]
        cells = [f"{s[label]['ready_s'] * 1e3:.1f} (+{s[label]['first_inference_s'] * 1e3:.0f})" for label in labels]
        trims_ready = s["trims"]["ready_s"]
        memory = data["memory"]
        copies = [memory[m]["weights_pss"] / data["nbytes"] for m in ("best", "trims")]
        lines.append(
            f"| {model} | {format_size(data['nbytes'])} | " + " | ".join(cells)
            + f" | {s['naive']['ready_s'] / trims_ready:.0f}x | {s['best']['ready_s'] / trims_ready:.2f}x"
            + f" | {copies[0]:.2f} / {copies[1]:.2f} copies "
            + f"({format_size(memory['best']['total_pss'])} / {format_size(memory['trims']['total_pss'])} in all) |"
        )
    torch_import = statistics.median(
        d["summary"][label]["torch_import_s"] for d in results["models"].values() for label in labels
    )
    lines += ["", f"`import torch` took {torch_import:.2f} s (median) in every process, before the clock starts."]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install 'trims[bench]')")
        return
    models = list(results["models"])
    labels = [label for label, _, _ in MODES]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(labels)
    for ax, key, title in ((axes[0], "ready_s", "model ready"), (axes[1], None, "ready + first inference")):
        for i, label in enumerate(labels):
            values = []
            for m in models:
                s = results["models"][m]["summary"][label]
                values.append((s["ready_s"] + (0 if key else s["first_inference_s"])) * 1e3)
            ax.bar([x + i * width for x in range(len(models))], values, width, label=label)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], models)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log scale)")
        ax.set_title(f"Fresh process: {title}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _machine() -> dict:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    summary = f"{os.cpu_count()} CPUs, {format_size(memory)}, Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    return {"summary": summary, "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
