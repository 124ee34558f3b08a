"""Transparent mode vs the explicit API vs plain loading, in fresh processes.

    python bench/transparent.py            # a few minutes
    python bench/transparent.py --runs 3

- Hugging Face: GPT-2 (124M) from a local directory. plain: ``from_pretrained(dir)``;
  transparent: the same code under ``trims run``; explicit: ``trims.transformers.from_pretrained(tag)``.
- PyTorch checkpoint: the same GPT-2's state dict as ``torch.save`` writes it
  (``pytorch_model.bin``). plain: ``torch.load(path)``; mmap: ``torch.load(path, mmap=True)``
  (the page cache shared, unchecked); transparent: plain under ``trims run``; explicit:
  ``trims.torch.load_checkpoint(tag)``. Also the PSS of 4 processes holding it.
- JAX: the same GPT-2's ``model.safetensors``. plain: ``safetensors.flax.load_file(path)``;
  transparent: plain under ``trims run``; explicit: ``trims.jax.load_state_dict(tag)``. Also
  the PSS of 4 processes holding the arrays.
- torch.export: ResNet-50 as ``torch.export.save`` writes it (``.pt2``). plain:
  ``torch.export.load(path).module()``; transparent: plain under ``trims run``; explicit:
  ``trims.torch.load_exported(tag).module()``.
- ONNX: an MLP of about 100 MB of fp32 weights (MatMuls), ResNet-50 (convolutions) as
  torch.onnx exports it, and that ResNet-50 quantized to int8 by ``quantize_static`` (QDQ form). plain: ``onnxruntime.InferenceSession(path)``; explicit:
  ``trims.onnxruntime.InferenceSession(tag)`` (transparent mode covers safetensors loaders and
  torch.load only). Also each session's steady inference (the median of 10 runs after the
  first: what sharing costs per request), and the PSS of 4 MLP sessions held at once.

Median of --runs fresh processes per cell, modes interleaved; the weights are read into page
cache before each plain run. Writes transparent.json and transparent.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402

import trims  # noqa: E402
from trims.config import format_size  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402

WORKER = """
import json, sys, time
started = time.perf_counter()
mode, target = sys.argv[1], sys.argv[2]
steady = None
if mode.startswith(("onnx", "cnn", "qcnn")):
    import statistics
    import numpy as np, onnxruntime as ort
    if mode.endswith("-explicit"):
        import trims.onnxruntime
    imports = time.perf_counter() - started
    begin = time.perf_counter()
    if mode.endswith("-plain"):
        session = ort.InferenceSession(target, providers=["CPUExecutionProvider"])
    else:
        session = trims.onnxruntime.InferenceSession(target)
    ready = time.perf_counter() - begin
    (spec,) = session.get_inputs()
    feed = {spec.name: np.ones([d if isinstance(d, int) else 1 for d in spec.shape], dtype=np.float32)}
    session.run(None, feed)
    first = time.perf_counter() - begin - ready
    runs = []
    for _ in range(10):
        tick = time.perf_counter()
        session.run(None, feed)
        runs.append(time.perf_counter() - tick)
    steady = statistics.median(runs)
elif mode.startswith("jax"):
    import jax, jax.numpy as jnp
    from safetensors.flax import load_file
    if mode == "jax-explicit":
        import trims.jax
    imports = time.perf_counter() - started
    begin = time.perf_counter()
    if mode == "jax-explicit":
        arrays = trims.jax.load_state_dict(target)
    elif mode == "jax-none":  # the floor of the PSS rows: Python and JAX, no weights
        arrays = {"none": jnp.zeros(1)}
    else:
        arrays = load_file(target)
    jax.block_until_ready(arrays)  # device_put may return before its copies are done
    ready = time.perf_counter() - begin
    float(sum(jnp.sum(a) for a in arrays.values()))  # every weight read once
elif mode.startswith("export"):
    import torch
    if mode == "export-explicit":
        import trims.torch
    imports = time.perf_counter() - started
    begin = time.perf_counter()
    program = trims.torch.load_exported(target) if mode == "export-explicit" else torch.export.load(target)
    module = program.module()
    ready = time.perf_counter() - begin
    with torch.no_grad():
        module(torch.ones(1, 3, 224, 224))
elif mode.startswith("pt"):
    import torch
    if mode == "pt-explicit":
        import trims.torch
    imports = time.perf_counter() - started
    begin = time.perf_counter()
    if mode == "pt-explicit":
        state = trims.torch.load_checkpoint(target)
    elif mode == "pt-none":  # the floor of the PSS rows: Python and torch, no weights
        state = {}
    else:
        state = torch.load(target, map_location="cpu", mmap=mode == "pt-mmap")
    ready = time.perf_counter() - begin
    float(sum(t.float().sum() for t in state.values()))  # every weight read once
else:
    import torch, transformers
    import transformers.models.gpt2.modeling_gpt2  # transformers imports model code lazily: not on the clock
    if mode == "hf-explicit":
        import trims.transformers  # imported before the clock, as `trims run` imports trims before the script
    imports = time.perf_counter() - started
    begin = time.perf_counter()
    if mode == "hf-explicit":
        model = trims.transformers.from_pretrained(target)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(target)
    ready = time.perf_counter() - begin
    with torch.no_grad():
        model(input_ids=torch.arange(16).unsqueeze(0))
if steady is None:
    first = time.perf_counter() - begin - ready
print(json.dumps({"imports_s": imports, "ready_s": ready, "first_s": first, "steady_s": steady}), flush=True)
if "--hold" in sys.argv:
    sys.stdin.readline()
"""

MODES = [  # label, worker mode, target is the tag (else the path), run under `trims run`
    ("HF plain", "hf-plain", False, False),
    ("HF transparent", "hf-plain", False, True),
    ("HF explicit", "hf-explicit", True, False),
    ("torch.load plain", "pt-plain", False, False),
    ("torch.load mmap", "pt-mmap", False, False),
    ("torch.load transparent", "pt-plain", False, True),
    ("torch.load explicit", "pt-explicit", True, False),
    ("JAX plain", "jax-plain", False, False),
    ("JAX transparent", "jax-plain", False, True),
    ("JAX explicit", "jax-explicit", True, False),
    ("torch.export plain", "export-plain", False, False),
    ("torch.export transparent", "export-plain", False, True),
    ("torch.export explicit", "export-explicit", True, False),
    ("ONNX plain", "onnx-plain", False, False),
    ("ONNX explicit", "onnx-explicit", True, False),
    ("ONNX CNN plain", "cnn-plain", False, False),
    ("ONNX CNN explicit", "cnn-explicit", True, False),
    ("ONNX QDQ CNN plain", "qcnn-plain", False, False),
    ("ONNX QDQ CNN explicit", "qcnn-explicit", True, False),
]
TAGS = {"hf": "bench/gpt2", "pt": "bench/gpt2-checkpoint", "jax": "bench/gpt2", "onnx": "bench/mlp",
        "cnn": "bench/resnet50-onnx", "qcnn": "bench/resnet50-qdq", "export": "bench/resnet50-export"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trims-transparent-"))
    files = _models(args.out / "cache")
    socket_path = work / "trims.sock"
    daemon = start_daemon_process(socket_path, work / "store", "4G", work / "daemon.log")
    env = {**os.environ, "TRIMS_SOCKET": str(socket_path)}
    try:
        client = trims.connect(socket_path)
        for kind, tag in TAGS.items():
            if kind != "jax":  # the same model as "hf"
                client.push(files[kind], tag)
        for kind in ("hf", "pt", "jax", "export"):
            _function(f"{kind}-plain", files[kind], env, transparent=True)  # the transparent mode's first sight of the files
        targets = {False: files, True: TAGS}
        samples: dict[str, list[dict]] = {label: [] for label, *_ in MODES}
        for _ in range(args.runs):
            for label, mode, by_tag, transparent in MODES:
                target = targets[by_tag][mode.split("-")[0]]
                if not by_tag:
                    _read(Path(target))
                samples[label].append(_function(mode, target, env, transparent))
                print(label, samples[label][-1], flush=True)
        memory = {label: _pss_of_holders(mode, targets[by_tag][mode.split("-")[0]], env, transparent)
                  for label, mode, by_tag, transparent in MODES if mode.startswith(("onnx", "pt", "jax", "export"))}
        memory["torch, no weights"] = _pss_of_holders("pt-none", files["pt"], env, transparent=False)
        memory["JAX, no weights"] = _pss_of_holders("jax-none", files["pt"], env, transparent=False)
    finally:
        daemon.terminate()
        daemon.wait()
    summary = {label: {k: statistics.median(s[k] for s in runs) for k in ("imports_s", "ready_s", "first_s", "steady_s")
                       if runs[0][k] is not None}
               for label, runs in samples.items()}
    results = {"runs": args.runs, "summary": summary, "samples": samples, "pss_4_holders": memory,
               "onnx_weights_bytes": files["onnx"].stat().st_size, "cnn_bytes": files["cnn"].stat().st_size,
               "qcnn_bytes": files["qcnn"].stat().st_size, "checkpoint_bytes": files["pt"].stat().st_size,
               "safetensors_bytes": files["jax"].stat().st_size, "program_bytes": files["export"].stat().st_size}
    (args.out / "transparent.json").write_text(json.dumps(results, indent=2))
    (args.out / "transparent.md").write_text(_table(results))
    print((args.out / "transparent.md").read_text())


def _models(cache: Path) -> dict[str, Path]:
    """Each kind of model's file (or directory), built into ``cache`` once."""
    from trims.examples import EXAMPLES

    files = {"hf": cache / "gpt2", "pt": cache / "gpt2-checkpoint" / "pytorch_model.bin",
             "onnx": cache / "mlp" / "mlp.onnx", "cnn": cache / "resnet50-onnx" / "resnet50.onnx",
             "qcnn": cache / "resnet50-qdq" / "resnet50-qdq.onnx", "export": cache / "resnet50-export" / "resnet50.pt2"}
    files["jax"] = files["hf"] / "model.safetensors"
    makers = {"hf": lambda path: EXAMPLES["gpt2"].build(path), "pt": lambda path: _save_checkpoint(files["jax"], path),
              "onnx": _write_mlp, "cnn": _write_resnet50, "qcnn": lambda path: _quantize(files["cnn"], path),
              "export": _export_resnet50}
    for kind, make in makers.items():  # in this order: the checkpoint is GPT-2's, the QDQ model the ResNet's
        done = files[kind] / "config.json" if kind == "hf" else files[kind]
        if not done.exists():
            (files[kind] if kind == "hf" else files[kind].parent).mkdir(parents=True, exist_ok=True)
            make(files[kind])
    return files


def _save_checkpoint(safetensors_file: Path, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(safetensors_file), path)


def _quantize(float_model: Path, path: Path) -> None:
    """The float ResNet-50 in int8, as ``quantize_static`` writes it by default (QDQ form),
    calibrated on a few random batches."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": np.random.default_rng(i).standard_normal((1, 3, 224, 224),
                                                                                         dtype=np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_model), str(path), Calibration())


def _write_mlp(path: Path, width: int = 2048, layers: int = 6) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        weight = (rng.standard_normal((width, width), dtype=np.float32) / width**0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        current = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _write_resnet50(path: Path) -> None:
    """ResNet-50's shape (transformers' ResNetConfig defaults), random weights, exported by
    torch.onnx's TorchScript exporter at opset 17."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig()).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["pixel_values"],
                      opset_version=17, dynamo=False)


def _export_resnet50(path: Path) -> None:
    """The same ResNet-50 as a torch.export.save archive, returning its feature map: transformers'
    output classes are pytrees that torch.export.load cannot rebuild."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet = ResNetModel(ResNetConfig())

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.resnet(pixel_values).last_hidden_state

    torch.manual_seed(0)
    torch.export.save(torch.export.export(Features().eval(), (torch.randn(1, 3, 224, 224),)), str(path))


def _function(mode: str, target, env: dict, transparent: bool, hold: bool = False):
    command = [sys.executable, "-c", WORKER, mode, str(target)] + (["--hold"] if hold else [])
    if transparent:
        command = [sys.executable, "-m", "trims", "run", "--", *command]
    if hold:
        return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _read(path: Path) -> None:
    for file in ([path] if path.is_file() else list(path.glob("*.safetensors"))):
        file.read_bytes()


def _pss_of_holders(mode: str, target, env: dict, transparent: bool, holders: int = 4) -> int:
    processes = []
    try:
        for _ in range(holders):
            processes.append(_function(mode, target, env, transparent=transparent, hold=True))
            processes[-1].stdout.readline()
        total = 0
        for process in processes:
            for line in open(f"/proc/{process.pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        return total
    finally:
        for process in processes:
            process.stdin.write("\n")
            process.stdin.flush()
            process.wait()


def _table(results: dict) -> str:
    s = results["summary"]
    lines = [
        f"Median of {results['runs']} fresh processes; imports are timed apart from loading.",
        "",
        "| model | plain | transparent (`trims run`) | explicit API | ready: plain / explicit |",
        "|---|---|---|---|---|",
    ]

    def cell(label: str) -> str:
        return f"{s[label]['ready_s'] * 1e3:.1f} ms (+{s[label]['first_s'] * 1e3:.0f} ms first run)"

    lines.append(f"| GPT-2 124M, HF directory | {cell('HF plain')} | {cell('HF transparent')} | {cell('HF explicit')} "
                 f"| {s['HF plain']['ready_s'] / s['HF explicit']['ready_s']:.1f}x |")
    lines.append(f"| GPT-2 124M, `torch.load` of {format_size(results['checkpoint_bytes'])} (mmap: {cell('torch.load mmap')}) "
                 f"| {cell('torch.load plain')} | {cell('torch.load transparent')} | {cell('torch.load explicit')} "
                 f"| {s['torch.load plain']['ready_s'] / s['torch.load explicit']['ready_s']:.1f}x |")
    lines.append(f"| GPT-2 124M, `safetensors.flax.load_file` of {format_size(results['safetensors_bytes'])} (JAX) "
                 f"| {cell('JAX plain')} | {cell('JAX transparent')} | {cell('JAX explicit')} "
                 f"| {s['JAX plain']['ready_s'] / s['JAX explicit']['ready_s']:.1f}x |")
    lines.append(f"| ResNet-50, `torch.export.load` of {format_size(results['program_bytes'])} and `.module()` "
                 f"| {cell('torch.export plain')} | {cell('torch.export transparent')} | {cell('torch.export explicit')} "
                 f"| {s['torch.export plain']['ready_s'] / s['torch.export explicit']['ready_s']:.1f}x |")
    lines.append(f"| MLP {format_size(results['onnx_weights_bytes'])}, ONNX | {cell('ONNX plain')} | n/a (no ONNX loader) "
                 f"| {cell('ONNX explicit')} | {s['ONNX plain']['ready_s'] / s['ONNX explicit']['ready_s']:.1f}x |")
    lines.append(f"| ResNet-50 {format_size(results['cnn_bytes'])}, ONNX | {cell('ONNX CNN plain')} | n/a (no ONNX loader) "
                 f"| {cell('ONNX CNN explicit')} | {s['ONNX CNN plain']['ready_s'] / s['ONNX CNN explicit']['ready_s']:.1f}x |")
    lines.append(f"| ResNet-50 int8 (QDQ) {format_size(results['qcnn_bytes'])}, ONNX | {cell('ONNX QDQ CNN plain')} "
                 f"| n/a (no ONNX loader) | {cell('ONNX QDQ CNN explicit')} "
                 f"| {s['ONNX QDQ CNN plain']['ready_s'] / s['ONNX QDQ CNN explicit']['ready_s']:.1f}x |")
    lines += ["", "Steady inference of the same sessions (median of 10 runs after the first, per process):", "",
              "| ONNX model | plain | trims | trims / plain |", "|---|---|---|---|"]
    for model, prefix in (("MLP (MatMuls)", "ONNX"), ("ResNet-50 (convolutions)", "ONNX CNN"),
                          ("ResNet-50 int8 (QDQ)", "ONNX QDQ CNN")):
        plain, shared = s[f"{prefix} plain"]["steady_s"], s[f"{prefix} explicit"]["steady_s"]
        lines.append(f"| {model} | {plain * 1e3:.1f} ms | {shared * 1e3:.1f} ms | {shared / plain:.2f}x |")
    pss = results["pss_4_holders"]
    lines += ["", f"PSS of 4 processes holding the checkpoint's tensors (every weight read once), "
                  f"{format_size(results['checkpoint_bytes'])}: plain {format_size(pss['torch.load plain'])}, "
                  f"mmap {format_size(pss['torch.load mmap'])}, transparent {format_size(pss['torch.load transparent'])}, "
                  f"explicit {format_size(pss['torch.load explicit'])}; 4 processes with torch and no weights: "
                  f"{format_size(pss['torch, no weights'])}.",
              "", f"PSS of 4 JAX processes holding GPT-2's arrays from `model.safetensors` "
                  f"({format_size(results['safetensors_bytes'])}, every weight read once): plain "
                  f"{format_size(pss['JAX plain'])}, transparent {format_size(pss['JAX transparent'])}, explicit "
                  f"{format_size(pss['JAX explicit'])}; 4 processes with JAX and no weights: "
                  f"{format_size(pss['JAX, no weights'])}.",
              "", f"PSS of 4 processes holding ResNet-50's `torch.export` module ({format_size(results['program_bytes'])}"
                  f" archive): plain {format_size(pss['torch.export plain'])}, transparent "
                  f"{format_size(pss['torch.export transparent'])}, explicit {format_size(pss['torch.export explicit'])}.",
              "", f"PSS of 4 ONNX sessions held at once: plain {format_size(pss['ONNX plain'])}, "
                  f"trims {format_size(pss['ONNX explicit'])} (weights {format_size(results['onnx_weights_bytes'])})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
