"""One function process of ``trims bench``: ``python -m trims._bench_function SPEC``.

Imports what it needs, says ``ready``, and waits for a line on stdin; then gets the
model's weights (through the daemon, or with ``safetensors`` from files when ``SPEC`` names
them), touches every page of them once, prints a JSON report and holds the weights until
its stdin gives another line, so that the parent can read the memory of all at once; then
drops them, says so, and exits at the next line (the parent reads the memory again between).
A failure is a report too (``{"error": ...}``), so the parent can say what went wrong.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import time
from typing import Any, Callable

PAGE = 4096


def main(spec: dict[str, Any]) -> None:
    try:
        load, touch = _loader(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
        _report(_failure(exc))
        return
    _report({"ready": True})
    if not sys.stdin.readline():  # end of input: the parent gave up before telling this one to go
        return
    weights: dict = {}  # held until the parent lets this process go
    try:
        started = time.perf_counter()
        weights = load()
        ready = time.perf_counter()
        touched = sum(touch(tensor) for tensor in weights.values())
        finished = time.perf_counter()
        report = {"ready_s": ready - started, "touch_s": finished - ready, "tensors": len(weights),
                  "pages": touched}
    except Exception as exc:  # noqa: BLE001 - as above
        report = _failure(exc)
    _report(report)
    sys.stdin.readline()
    weights.clear()  # what this process holds with them, less what it holds without, is their memory
    _give_heap_back()
    _report({"dropped": True})
    sys.stdin.readline()


def _loader(spec: dict[str, Any]) -> tuple[Callable[[], dict], Callable[[Any], int]]:
    """What to time, with every import done beforehand, as a warm function runtime has them."""
    torch_tensors = spec["framework"] == "torch"
    if torch_tensors:
        import torch

        torch.set_num_threads(1)  # a function with one CPU, and no pool of threads to start mid-measurement
    touch = _touch_tensor if torch_tensors else _touch_array
    if spec.get("files"):
        if torch_tensors:
            from safetensors.torch import load_file
        else:
            from safetensors.numpy import load_file

        def load() -> dict:
            weights: dict = {}
            for path in spec["files"]:
                weights.update(load_file(path))
            return weights
        return load, touch

    import trims

    if torch_tensors:
        import trims.torch
    else:
        import trims.numpy  # noqa: F401 - numpy and the array views, as a function using them imports them

    def load() -> dict:
        client = trims.connect(spec["socket"])
        if torch_tensors:  # a PyTorch checkpoint's state dict too
            return trims.torch.load_state_dict(spec["name"], client=client)
        return dict(client.open(spec["name"]))  # the neutral form: every stored tensor, whatever the format
    return load, touch


def _touch_array(array: Any) -> int:
    """Read one byte of every page, as the first pass of an inference would fault them in."""
    import numpy as np

    pages = np.ascontiguousarray(array).reshape(-1).view(np.uint8)[::PAGE]
    pages.sum(dtype=np.uint64)  # the read is the point
    return pages.size


def _touch_tensor(tensor: Any) -> int:
    import torch

    pages = tensor.contiguous().reshape(-1).view(torch.uint8)[::PAGE]
    pages.sum(dtype=torch.int64)  # the read is the point
    return pages.numel()


def _give_heap_back() -> None:
    """Collect what the weights left and return freed heap to the kernel, as a process that
    dropped them for good would (glibc keeps small freed blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its freed heap counts as held, which only overstates
        pass


def _failure(exc: BaseException) -> dict[str, str]:
    return {"error": str(exc) or repr(exc), "type": type(exc).__name__}


def _report(report: dict[str, Any]) -> None:
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
