"""One function instance: ``python worker.py [--device cuda:N] MODEL...``, driven by JSON lines on
stdin, one reply each.

A pre-warmed runtime (Python, torch and transformers imported, the models' code loaded and, on
a GPU, its CUDA context made, as a FaaS platform keeps "stem cell" containers), specialised to a
model by its first request. Requests:

  {"op": "serve", "model": M, "dir": D, "source": "own"|"trims"}  acquire M unless held, run it
                                                    ("then_drop": true: and forget it)
  {"op": "drop"}                                                    forget the held model
  {"op": "quit"}

``own``: the instance reads the model into memory of its own (on a GPU, a copy in device memory
of its own), as every framework does without trims (the paper's baseline). ``trims``: it maps
the node's shared copy from the daemon (on a GPU, the daemon's copy in device memory). Replies
carry the seconds spent acquiring and running, measured here.
"""

import argparse
import ctypes
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # instances share the node's cores, as containers with a CPU quota of one do

import trims.torch  # noqa: E402
import zoo  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trims.client import shared_client  # noqa: E402

_LIBC = ctypes.CDLL("libc.so.6")


class Held:
    """The model an instance holds, ready to run, and the daemon's view of its weights (trims)."""

    def __init__(self, name: str, source: str, model: torch.nn.Module, inputs: dict, view) -> None:
        self.name, self.source, self.model, self.inputs, self.view = name, source, model, inputs, view


def acquire(name: str, directory: Path, source: str, device: torch.device, reply: dict) -> Held:
    """The ready module; ``reply["weights_s"]``: the part spent getting the weights (the
    rest builds the module around them)."""
    started = time.perf_counter()
    view = None
    if source == "trims":
        view = shared_client().open(f"zoo/{name}", device=trims.torch.cuda_index(device))
        state = trims.torch.state_dict_from_view(view)
    else:  # a copy of our own: off the page cache (clone), or in device memory
        state = {}
        for path in zoo.weight_files(directory):
            tensors = load_file(path, device=str(device)).items()
            state.update((key, tensor.clone() if device.type == "cpu" else tensor) for key, tensor in tensors)
    reply["weights_s"] = time.perf_counter() - started
    model = trims.torch.assemble(zoo.BY_NAME[name].factory(), state, source=name)
    if device.type != "cpu":
        model.to(device)  # the buffers the model computes; its weights are there already
    inputs = {key: value.to(device) for key, value in zoo.BY_NAME[name].example_input().items()}
    return Held(name, source, model, inputs, view)


def store_spans(view) -> list[tuple[int, int]]:
    """Address ranges of the daemon's memory mapped here: memfd mappings (host), or the
    view's mapped device allocations (GPU)."""
    if view.device is not None:
        return [(segment.pointer, segment.pointer + segment.size) for segment in view.segments]
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:trims" in line:
                low, high = line.split()[0].split("-")
                spans.append((int(low, 16), int(high, 16)))
    return spans


def from_store(held: Held) -> bool:
    """Whether the stored tensors (parameters, persistent buffers) lie in the daemon's shared
    memory, but for copies of tensors equal to another (the daemon keeps those once and hands
    each out as its own): the check that a run measured what it says (made after the clock stops)."""
    if held.view is None:
        return False
    spans = store_spans(held.view)
    stored = [t for t in held.model.state_dict().values() if t.numel()]
    copied = sum(t.nbytes for t in stored if not any(low <= t.data_ptr() < high for low, high in spans))
    return copied <= sum(held.view.index[name].nbytes for name in held.view.repeats)


def serve(request: dict, held: Held | None, device: torch.device, reply: dict) -> Held:
    if held is None:
        started = time.perf_counter()
        held = acquire(request["model"], Path(request["dir"]), request["source"], device, reply)
        reply["acquire_s"] = time.perf_counter() - started
        reply["from_store"] = from_store(held)
    before, started = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
    with torch.inference_mode():
        held.model(**held.inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reply["infer_s"] = time.perf_counter() - started
    reply["infer_usage"] = usage_since(before)
    return held


def usage_since(before) -> dict:
    """Where this thread's time went since ``before`` (torch runs on it, one thread): seconds on
    a core (exact; the kernel's share of it is sampled at timer ticks, so only sums over many
    requests are), page faults (minor: a page mapped or zeroed; major: read from disk) and how
    often the kernel took the core away. The rest of the wall time was spent off a core:
    waiting for one, or for I/O (a GPU's synchronize mostly spins, on a core)."""
    now = resource.getrusage(resource.RUSAGE_THREAD)
    return {"cpu_s": round(now.ru_utime + now.ru_stime - before.ru_utime - before.ru_stime, 6),
            "system_s": round(now.ru_stime - before.ru_stime, 6),
            "minor_faults": now.ru_minflt - before.ru_minflt, "major_faults": now.ru_majflt - before.ru_majflt,
            "preempted": now.ru_nivcsw - before.ru_nivcsw}


def forget(device: torch.device) -> None:
    """Give the dropped model's memory back now, as a stopped instance's would be: glibc keeps
    freed heap (where it puts tensors below its mmap threshold, which grows to 32 MiB) for
    reuse, and an instance of the pool would carry one run's models into the next run's memory
    figures; on a GPU the allocator's cache returns to the device."""
    gc.collect()
    _LIBC.malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(device: torch.device, models: list[str]) -> None:
    """What a pre-warmed instance has done before any request: the functions' code imported, as
    in a built image; on a GPU, its CUDA context made and trims' driver binding loaded (the
    controller then runs every model once on each instance, so that no measured request pays
    for loading kernels or creating cuBLAS and cuDNN handles)."""
    for name in models:
        zoo.BY_NAME[name].factory()
    if device.type == "cuda":
        torch.zeros(1, device=device)
        from trims import cuda_driver

        cuda_driver.driver()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    device = args.device
    warm_up(device, args.models)
    # The runtime's own objects stay for good: frozen, forget()'s collection walks only those
    # made since (a dropped model's) instead of all ~350,000 (220 ms of a core per request).
    # Collected first, so that no garbage of the imports is frozen with them.
    gc.collect()
    gc.freeze()
    held: Held | None = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        if request["op"] == "drop" or (held and (held.name, held.source) != (request["model"], request["source"])):
            held = None
            forget(device)
        reply: dict = {"acquire_s": 0.0, "warm": held is not None}
        try:
            if request["op"] == "serve":
                held = serve(request, held, device, reply)
        except Exception as exc:  # the controller decides what a failed request means
            held = None
            reply["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(reply), flush=True)
            # after the reply: a CUDA error is sticky, and forget() would raise it again
            forget(device)
            continue
        print(json.dumps(reply), flush=True)
        if request.get("then_drop"):  # no keep-alive: torn down after answering, before the next request
            held = None
            forget(device)


if __name__ == "__main__":
    main()
