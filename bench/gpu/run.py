"""The GPU tier's evidence, in one run on a machine with a CUDA GPU.

    python bench/gpu/run.py [--out bench/results/gpu] [--repeats 2]

For ResNet-50, BERT-base and GPT-2 large (random weights, real sizes):
- time to a ready CUDA module in a fresh process, three ways: (a) ``torch.load`` of the
  pickled module + ``.cuda()``, (b) safetensors straight to CUDA, (c) a trims GPU-tier hit;
  plus the first trims open (disk -> host -> GPU) and the request time of a warm process;
- device memory taken by 4 processes holding the model, privately (b) and through trims;
- a process that writes to a shared weight: it must fault, and others keep their outputs.

Writes gpu.json, gpu.md and gpu.png to --out (and gpu-partial.json after each model). About
10 minutes on a fresh H200 machine, where a process's first imports alone take 11-16 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import trims  # noqa: E402
import trims.torch  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402

WORKER = Path(__file__).resolve().parent / "worker.py"
MODES = ("torch", "safetensors", "trims")
PHASES = ("open_and_map_s", "tensors_s", "build_and_assign_s", "buffers_to_cuda_s")  # see worker.load
HOLDERS = 4


def configs() -> dict[str, transformers.PretrainedConfig]:
    return {  # the largest first: its figures matter most if a run is cut short
        "gpt2-large": transformers.GPT2Config(n_embd=1280, n_layer=36, n_head=20, architectures=["GPT2LMHeadModel"]),
        "bert-base": transformers.BertConfig(architectures=["BertModel"]),
        "resnet50": transformers.ResNetConfig(architectures=["ResNetForImageClassification"]),
    }


def build(name: str, config, directory: Path) -> int:
    """Random weights, saved both ways; returns the model's bytes."""
    if not (directory / "model.pt").exists():
        with torch.device("cuda"):
            model = getattr(transformers, config.architectures[0])(config).eval()
        model.save_pretrained(directory)
        torch.save(model.cpu(), directory / "model.pt")
        del model
        torch.cuda.empty_cache()
    return (directory / "model.safetensors").stat().st_size


def run_worker(mode: str, directory: Path, name: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, str(WORKER), mode, str(directory), name], env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} worker for {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def held_memory(mode: str, directory: Path, name: str, env: dict) -> int:
    """Device memory that HOLDERS processes holding the model add to the node."""
    before = device_used()
    holders = [subprocess.Popen([sys.executable, str(WORKER), mode, str(directory), name, "--hold"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(HOLDERS)]
    try:
        for holder in holders:
            if not holder.stdout.readline():
                raise RuntimeError(f"a {mode} holder of {name} died")
        time.sleep(0.5)
        return device_used() - before
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(timeout=120)


WRITER = """
import sys, torch, transformers, trims.torch
sys.path.insert(0, {worker_dir!r})
from worker import factory
from pathlib import Path
model = trims.torch.load_model({name!r}, factory(Path({directory!r})), device="cuda")
try:
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    torch.cuda.synchronize()
    print("wrote")
except RuntimeError as exc:
    print("faulted:", str(exc).splitlines()[0])
"""


def write_check(directory: Path, name: str, env: dict) -> dict:
    """A client writing to a shared weight faults; this process's outputs stay bit for bit."""
    sys.path.insert(0, str(WORKER.parent))
    from worker import factory, request_inputs, serve

    model = trims.torch.load_model(name, factory(directory), device="cuda")
    inputs = request_inputs(model.config)
    before = serve(model, inputs)[1].cpu()
    code = WRITER.format(worker_dir=str(WORKER.parent), name=name, directory=str(directory))
    writer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    after = serve(model, inputs)[1].cpu()
    fresh = run_worker("trims", directory, name, env)
    outcome = (writer.stdout.strip() or f"exit {writer.returncode}: {writer.stderr.strip().splitlines()[-1:]}")
    return {"model": name, "writer": outcome, "writer_exit": writer.returncode,
            "holder_unchanged": bool(torch.equal(before, after)),
            "fresh_process_checksum_matches": abs(fresh["checksum"] - float(before.double().sum())) <= 1e-6 * max(1.0, abs(fresh["checksum"]))}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(name: str, nbytes: int, runs: list[dict], cold: dict, memory: dict) -> dict:
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    ready = {mode: median_of(rs, "ready_s") for mode, rs in by_mode.items()}
    first = {mode: median_of(rs, "first_request_s") for mode, rs in by_mode.items()}
    ideal = median_of(runs, "warm_request_s")
    return {
        "model": name, "bytes": nbytes, "ready_s": ready, "first_request_s": first, "ideal_request_s": ideal,
        "trims_cold_ready_s": cold["ready_s"],
        "e2e_trims_over_ideal": (ready["trims"] + first["trims"]) / ideal,
        "acquire_trims_plus_warm_over_ideal": (ready["trims"] + ideal) / ideal,
        "torch_over_trims_ready": ready["torch"] / ready["trims"],
        "safetensors_over_trims_ready": ready["safetensors"] / ready["trims"],
        "held_by_4_processes_bytes": memory,
        "trims_phases_s": {phase: median_of(by_mode["trims"], phase) for phase in PHASES},
        "runs": runs,
    }


def markdown(results: dict) -> str:
    lines = [
        f"GPU: {results['gpu']}; torch {results['torch']}; {results['repeats']} fresh processes per cell (median).",
        "",
        "| model | size | (a) torch.load + .cuda() | (b) safetensors -> CUDA | (c) trims GPU hit | (a)/(c) | (b)/(c) "
        "| trims first open (disk->GPU) | request, warm (ideal) | first request after (c) | (c)+first / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        r = m["ready_s"]
        lines.append(
            f"| {m['model']} | {m['bytes'] / 1e6:.0f} MB | {r['torch'] * 1e3:.0f} ms | {r['safetensors'] * 1e3:.0f} ms "
            f"| {r['trims'] * 1e3:.1f} ms | {m['torch_over_trims_ready']:.0f}x | {m['safetensors_over_trims_ready']:.1f}x "
            f"| {m['trims_cold_ready_s'] * 1e3:.0f} ms | {m['ideal_request_s'] * 1e3:.1f} ms "
            f"| {m['first_request_s']['trims'] * 1e3:.0f} ms | {m['e2e_trims_over_ideal']:.1f}x |")
    lines += ["", f"Device memory added by {HOLDERS} processes holding the model (minus {HOLDERS} processes holding "
              "nothing, i.e. CUDA contexts):", "",
              "| model | size | private copies (safetensors) | trims (one shared copy) |", "|---|---|---|---|"]
    for m in results["models"]:
        held = m["held_by_4_processes_bytes"]
        lines.append(f"| {m['model']} | {m['bytes'] / 1e9:.2f} GB | {held['safetensors'] / 1e9:.2f} GB "
                     f"| {held['trims'] / 1e9:.2f} GB |")
    lines += ["", "Where a trims hit's time went (median, ms):", "",
              "| model | open + map | tensors | build + assign | buffers to CUDA |", "|---|---|---|---|---|"]
    for m in results["models"]:
        lines.append(f"| {m['model']} | " + " | ".join(f"{m['trims_phases_s'][p] * 1e3:.1f}" for p in PHASES) + " |")
    w = results["write_check"]
    lines += ["", f"Write to a shared weight ({w['model']}): writer -> `{w['writer']}`; holder's outputs unchanged: "
              f"{w['holder_unchanged']}; a fresh process's outputs match: {w['fresh_process_checksum_matches']}.",
              f"GPU tier: {results['gpu_tier']}; host->GPU upload: {results['upload_rate_gb_s']:.1f} GB/s."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["model"] for m in results["models"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    series = [("torch.load + .cuda()", lambda m: m["ready_s"]["torch"]),
              ("safetensors -> CUDA", lambda m: m["ready_s"]["safetensors"]),
              ("trims GPU hit", lambda m: m["ready_s"]["trims"]),
              ("one warm request (ideal)", lambda m: m["ideal_request_s"])]
    for i, (label, value) in enumerate(series):
        ax.bar([x + (i - 1.5) * width for x in range(len(models))], [value(m) * 1e3 for m in results["models"]],
               width, label=label)
    ax.set_xticks(range(len(models)), models)
    ax.set_yscale("log")
    ax.set_ylabel("ms to a ready CUDA module (fresh process)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trims-gpu-bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="gpt2-large,bert-base,resnet50")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.cuda.init()
    wanted = {n: c for n, c in configs().items() if n in args.models.split(",")}
    sizes = {name: build(name, config, args.work / name) for name, config in wanted.items()}
    socket = args.work / "trims.sock"
    daemon = start_daemon_process(socket, args.work / "store", "32G", args.work / "daemon.log",
                                  ("--gpu-memory", "32G"), timeout=120)
    env = {**os.environ, "TRIMS_SOCKET": str(socket), "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    try:
        client = trims.connect(socket)
        for name in wanted:
            client.push(args.work / name, name)
        nothing = held_memory("none", args.work / next(iter(wanted)), "-", env)  # CUDA contexts alone
        models = []
        for name in wanted:
            directory = args.work / name
            cold = run_worker("trims", directory, name, env)
            runs = []
            for repeat in range(args.repeats):
                for mode in MODES[repeat % 3:] + MODES[:repeat % 3]:
                    runs.append(run_worker(mode, directory, name, env))
                    print(json.dumps(runs[-1]), flush=True)
            private = held_memory("safetensors", directory, name, env) - nothing
            client.evict(name)  # the daemon's copy counts in the trims measurement
            shared = held_memory("trims", directory, name, env) - nothing
            models.append(summarize(name, sizes[name], runs, cold, {"safetensors": private, "trims": shared}))
            (args.out / "gpu-partial.json").write_text(json.dumps(models, indent=2) + "\n")  # kept if cut short
        smallest = min(wanted, key=sizes.get)
        check = write_check(args.work / smallest, smallest, env)
        stats = client.stats()
        tier = stats["tiers"]["gpu:0"]
        upload = stats["fetches"].get("host->gpu:0", {"bytes": 0, "seconds": 0})
        results = {
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeats": args.repeats,
            "command": "python bench/gpu/run.py " + " ".join(sys.argv[1:]), "models": models, "write_check": check,
            "gpu_tier": f"{tier['sharing']}, read-only mapping {'supported' if tier['read_only_mapping'] else 'REFUSED'}",
            "upload_rate_gb_s": upload["bytes"] / upload["seconds"] / 1e9 if upload["seconds"] else 0.0,
        }
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(results))
    plot(results, args.out / "gpu.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
