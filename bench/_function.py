"""One cold-start measurement in a fresh process: ``python bench/_function.py MODE MODEL DIR NAME``.

Modes:
  naive   random-init build + torch.load(pytorch_model.bin) + load_state_dict (copies)
  best    meta build + safetensors.torch.load_file (mmap) + assign: the best plain practice
  trims   meta build + trims.torch.load_state_dict (shared memfd) + assign

``best`` and ``trims`` build the module the same way (trims.torch.assemble); they differ
only in where the tensors come from. Prints one JSON line (seconds to a ready model, of a first
and of a second inference); with --hold, then waits for a
line on stdin so the parent can read this process's memory while others are alive.
"""

import json
import sys
import time

started = time.perf_counter()
import torch  # noqa: E402

torch_seconds = time.perf_counter() - started


def main() -> None:
    mode, example_name, directory, name = sys.argv[1:5]
    from pathlib import Path

    from trims.examples import EXAMPLES

    example = EXAMPLES[example_name]
    factory, inputs = example.factory(), example.example_input()
    begin = time.perf_counter()
    model = LOADERS[mode](factory, Path(directory), name)
    ready = time.perf_counter() - begin
    with torch.no_grad():
        model(**inputs)
    first = time.perf_counter() - begin - ready
    second = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    second = time.perf_counter() - second  # what the first would take with nothing left to fault in
    print(json.dumps({"torch_import_s": torch_seconds, "ready_s": ready, "first_inference_s": first,
                      "second_inference_s": second}), flush=True)
    if "--hold" in sys.argv:
        sys.stdin.readline()


def naive(factory, directory, name):
    model = factory()
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def best(factory, directory, name):
    from safetensors.torch import load_file

    import trims.torch

    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    return trims.torch.assemble(factory, state)


def shared(factory, directory, name):
    import trims.torch

    return trims.torch.load_model(name, factory)


LOADERS = {"naive": naive, "best": best, "trims": shared}

if __name__ == "__main__":
    main()
