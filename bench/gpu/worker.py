"""One fresh process of the GPU benchmark: get a model onto the GPU one way, serve requests.

    python bench/gpu/worker.py MODE MODEL_DIR NAME [--hold]

MODE is ``torch`` (``torch.load`` of the pickled module, then ``.cuda()``), ``safetensors``
(tensors read straight to CUDA, module built on meta and given them) or ``trims`` (the
daemon's GPU copy, mapped read-only). The clock starts after the imports (the
architecture's module too), the CUDA context and a warm-up of the math libraries, which
every process pays whatever it loads: what is timed is the model alone. Prints one JSON line; with ``--hold`` it then waits for stdin to
close, holding the model (the memory measurement).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

started = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402

import trims.client  # noqa: E402
import trims.torch  # noqa: E402

WARM_REQUESTS = 5
PHASES: dict[str, float] = {}  # where a trims load's time went


def factory(directory: Path):
    config = transformers.AutoConfig.from_pretrained(directory)
    architecture = getattr(transformers, config.architectures[0])
    return lambda: architecture(config)


def request_inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if config.model_type == "resnet":
        return {"pixel_values": torch.rand(1, 3, 224, 224, generator=generator).cuda()}
    return {"input_ids": torch.randint(0, config.vocab_size, (1, 128), generator=generator).cuda()}


def load(mode: str, directory: Path, name: str, build) -> torch.nn.Module:
    if mode == "torch":
        return torch.load(directory / "model.pt", weights_only=False).cuda().eval()
    if mode == "safetensors":
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors", device="cuda")
        return trims.torch.assemble(build, state).to("cuda")
    if mode == "trims":  # what trims.torch.load_model(name, build, device="cuda") does, phase by phase
        marks = [time.perf_counter()]
        view = trims.client.shared_client().open(name, device=torch.cuda.current_device())
        marks.append(time.perf_counter())
        state = trims.torch.state_dict_from_view(view)
        marks.append(time.perf_counter())
        model = trims.torch.assemble(build, state, source=name)
        marks.append(time.perf_counter())
        model = model.to("cuda")
        marks.append(time.perf_counter())
        PHASES.update(zip(("open_and_map_s", "tensors_s", "build_and_assign_s", "buffers_to_cuda_s"),
                          (b - a for a, b in zip(marks, marks[1:]))))
        return model
    raise SystemExit(f"unknown mode {mode!r}")


def serve(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    begun = time.perf_counter()
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    torch.cuda.synchronize()
    return time.perf_counter() - begun, logits


def warm_up_libraries() -> None:
    """CUDA context, cuBLAS and cuDNN handles: every process's cost, whatever model it serves."""
    a = torch.randn(256, 256, device="cuda")
    (a @ a).sum().item()
    torch.nn.functional.conv2d(torch.randn(1, 3, 32, 32, device="cuda"), torch.randn(8, 3, 3, 3, device="cuda")).sum().item()


def main() -> None:
    mode, directory, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    build = factory(directory)  # imports the architecture's module: every mode needs it, even unpickling
    imported = time.perf_counter()
    warm_up_libraries()
    ready_to_start = time.perf_counter()
    if mode == "none":  # a process holding nothing: what a CUDA context alone takes
        print(json.dumps({"mode": mode}), flush=True)
        sys.stdin.read()
        return
    model = load(mode, directory, name, build)
    torch.cuda.synchronize()
    ready = time.perf_counter()
    inputs = request_inputs(model.config)
    first, logits = serve(model, inputs)
    warm = statistics.median(serve(model, inputs)[0] for _ in range(WARM_REQUESTS))
    print(json.dumps({
        "mode": mode, "model": name, "import_s": imported - started, "cuda_init_s": ready_to_start - imported,
        "ready_s": ready - ready_to_start, "first_request_s": first, "warm_request_s": warm,
        "checksum": float(logits.double().sum()), "torch_allocated_bytes": torch.cuda.memory_allocated(),
        **PHASES,
    }), flush=True)
    if "--hold" in sys.argv:
        sys.stdin.read()


if __name__ == "__main__":
    main()
