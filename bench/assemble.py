"""What building a module around shared weights costs in a fresh process, and what trims'
one-pass assignment saves against torch's ``load_state_dict(assign=True)``.

    python bench/assemble.py               # about 20 minutes
    python bench/assemble.py --runs 3 --models resnet152 bert-base

For each model of the FaaS zoo (bench/faas/zoo.py, full sizes), fresh processes, the two ways
interleaved: one ``trims.torch.assemble`` of the model around a state of the stored tensors'
shapes (uninitialised memory: assignment never reads it; tied weights stored once, as
safetensors stores them), timed whole and in its assignment step; then a second assemble in
the same process (Python's caches warm). Median of --runs. Writes assemble.json,
assemble.md and assemble.png to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "faas"))

import zoo  # noqa: E402

MODELS = ["squeezenet1.1", "mobilenet-v2", "efficientnet-b0", "resnet50", "convnext-tiny", "resnet152",
          "efficientnet-b7", "distilbert", "bert-base", "gpt2", "vgg16", "llama-1b"]
WAYS = ("one-pass", "torch-loader")

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import zoo, trims.torch
from trims import _torch_assign

name, way = sys.argv[1], sys.argv[2]
factory = zoo.BY_NAME[name].factory()
with trims.torch._parameters_on_meta(), trims.torch._SkipFillsOnMeta():
    shapes = factory()
state, seen = {}, set()
for key, tensor in shapes.state_dict(keep_vars=True).items():
    if id(tensor) not in seen:  # a tied weight once, as stored
        seen.add(id(tensor))
        state[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
del shapes
factory = zoo.BY_NAME[name].factory()  # a fresh factory: nothing of the shape pass cached in it

assigning = []
def timed(assign):
    def wrapper(model, state, source):
        started = time.perf_counter()
        try:
            return assign(model, state, source)
        finally:
            assigning.append(time.perf_counter() - started)
    return wrapper

if way == "torch-loader":
    trims.torch.assign_state = timed(_torch_assign._torch_loader)
else:
    trims.torch.assign_state = timed(_torch_assign.assign_state)
times = []
for _ in range(2):
    started = time.perf_counter()
    trims.torch.assemble(factory, state, source=name)
    times.append(time.perf_counter() - started)
print(json.dumps({"first_s": times[0], "first_assign_s": assigning[0], "second_s": times[1],
                  "second_assign_s": assigning[1], "tensors": len(state)}))
"""


def run_once(name: str, way: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, name, way], env=zoo.child_env(), check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(models: list[str], runs: int) -> dict:
    samples: dict[str, dict[str, list[dict]]] = {name: {way: [] for way in WAYS} for name in models}
    for run in range(runs):
        for name in models:
            for way in (WAYS if run % 2 == 0 else WAYS[::-1]):  # alternate which way goes first
                samples[name][way].append(run_once(name, way))
        print(f"run {run + 1}/{runs} done", flush=True)
    return {name: {way: {key: statistics.median(s[key] for s in runs_) for key in runs_[0]}
                   for way, runs_ in ways.items()} for name, ways in samples.items()}


def report(results: dict, runs: int) -> str:
    lines = [f"Median of {runs} fresh processes per cell; ms. `assemble` = the whole build, `assign` its "
             "assignment step.", "",
             "| model | tensors | assemble, torch's loader | assemble, one pass | assign, torch's loader "
             "| assign, one pass | assign: torch / one pass | second assemble, torch / one pass |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ways in results.items():
        torch_way, ours = ways["torch-loader"], ways["one-pass"]
        lines.append(
            f"| {name} | {int(ours['tensors'])} | {torch_way['first_s'] * 1e3:.1f} | {ours['first_s'] * 1e3:.1f} "
            f"| {torch_way['first_assign_s'] * 1e3:.1f} | {ours['first_assign_s'] * 1e3:.1f} "
            f"| {torch_way['first_assign_s'] / ours['first_assign_s']:.1f}x "
            f"| {torch_way['second_s'] * 1e3:.1f} / {ours['second_s'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    for offset, (way, label) in enumerate((("torch-loader", "torch's loader"), ("one-pass", "one pass"))):
        builds = [results[name][way]["first_s"] * 1e3 for name in names]
        assigns = [results[name][way]["first_assign_s"] * 1e3 for name in names]
        positions = [i + (offset - 0.5) * 0.4 for i in range(len(names))]
        axes.bar(positions, builds, 0.4, label=f"assemble, {label}", alpha=0.5)
        axes.bar(positions, assigns, 0.4, label=f"of which assignment, {label}")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_ylabel("ms, first build in a fresh process")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=sorted(zoo.BY_NAME))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    results = measure(args.models, args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "assemble.json").write_text(json.dumps({"runs": args.runs, "models": results}, indent=1))
    table = report(results, args.runs)
    (args.out / "assemble.md").write_text(table)
    plot(results, args.out / "assemble.png")
    print(table)


if __name__ == "__main__":
    main()
