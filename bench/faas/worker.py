"""One function instance: ``python worker.py MODEL...``, driven by JSON lines on stdin, one reply each.

A pre-warmed runtime (Python, torch and transformers imported, as a FaaS platform keeps
"stem cell" containers), specialised to a model by its first request. Requests:

  {"op": "serve", "model": M, "dir": D, "source": "own"|"trims"}  acquire M unless held, run it
                                                    ("then_drop": true: and forget it)
  {"op": "drop"}                                                    forget the held model
  {"op": "quit"}

``own``: the instance reads the model into memory of its own, as every framework does without
trims (the paper's baseline). ``trims``: it maps the node's shared copy from the daemon.
Replies carry the seconds spent acquiring and running, measured here.
"""

import gc
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # instances share the node's cores, as containers with a CPU quota of one do

import trims.torch  # noqa: E402
import zoo  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def acquire(name: str, directory: Path, source: str, reply: dict) -> torch.nn.Module:
    """The ready module; ``reply["weights_s"]``: the part spent getting the weights (the
    rest builds the module around them)."""
    started = time.perf_counter()
    if source == "trims":
        state = trims.torch.load_state_dict(f"zoo/{name}")
    else:
        state = {}
        for path in zoo.weight_files(directory):
            state.update((key, tensor.clone()) for key, tensor in load_file(path).items())  # off the page cache: our own copy
    reply["weights_s"] = time.perf_counter() - started
    return trims.torch.assemble(zoo.BY_NAME[name].factory(), state, source=name)


def from_store(model: torch.nn.Module) -> bool:
    """Whether every parameter lies in the daemon's shared memory (a memfd mapping): the
    check that a run measured what it says it measured."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:trims" in line:
                low, high = line.split()[0].split("-")
                spans.append((int(low, 16), int(high, 16)))
    return all(any(low <= p.data_ptr() < high for low, high in spans) for p in model.parameters())


def main() -> None:
    for name in sys.argv[1:]:  # the functions' code, imported before any clock starts, as in a built image
        zoo.BY_NAME[name].factory()
    held: tuple[str, str, torch.nn.Module, dict] | None = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        if request["op"] == "drop" or (held and held[:2] != (request["model"], request["source"])):
            held = None
            gc.collect()  # large tensors are their own mappings: their memory goes back now
        reply: dict = {"acquire_s": 0.0, "warm": held is not None}
        try:
            if request["op"] == "serve":
                held = serve(request, held, reply)
        except Exception as exc:  # the controller decides what a failed request means
            held = None
            reply["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(reply), flush=True)
        if request.get("then_drop"):  # no keep-alive: torn down after answering, before the next request
            held = None
            gc.collect()


def serve(request: dict, held: tuple | None, reply: dict) -> tuple:
    if held is None:
        started = time.perf_counter()
        model = acquire(request["model"], Path(request["dir"]), request["source"], reply)
        held = (request["model"], request["source"], model, zoo.BY_NAME[request["model"]].example_input())
        reply["acquire_s"] = time.perf_counter() - started
        reply["from_store"] = from_store(model)
    started = time.perf_counter()
    with torch.inference_mode():
        held[2](**held[3])
    reply["infer_s"] = time.perf_counter() - started
    return held


if __name__ == "__main__":
    main()
