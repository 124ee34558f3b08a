"""``trims demo``: the whole story on one machine in about a minute.

Starts a daemon, builds an example model from its config (random weights, nothing
downloaded), pushes it, then serves it to fresh "function" processes the way a FaaS node
would: each loading its own copy with ``from_pretrained``, and through trims, cold (the
first open loads it from the store's disk) and warm. Prints a table of what each took and
how much memory the processes held together.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import connect
from ._report import format_table, pss_bytes
from .config import format_size
from .examples import EXAMPLES
from .spawn import start_daemon_process

FUNCTION = """
import hashlib, json, os, sys, time
started = time.perf_counter()
import torch
torch_seconds = time.perf_counter() - started
from trims.examples import EXAMPLES
example = EXAMPLES[{example!r}]
factory, inputs = example.factory(), example.example_input()
import_seconds = time.perf_counter() - started
begin = time.perf_counter()
if {mode!r} == "own":
    from trims.examples import _attribute
    model = _attribute(example.model_class).from_pretrained({directory!r}).eval()
else:
    import trims.torch
    model = trims.torch.load_model({name!r}, factory)
ready = time.perf_counter() - begin
with torch.no_grad():
    out = model(**inputs)
first = time.perf_counter() - begin - ready
result = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
print(json.dumps({{"torch_s": torch_seconds, "imports_s": import_seconds, "ready_s": ready, "first_s": first,
                  "output": hashlib.sha256(result.float().numpy().tobytes()).hexdigest()}}), flush=True)
sys.stdin.readline()
"""


@dataclass
class Function:
    process: subprocess.Popen
    report: dict

    def finish(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)


def run_demo(model: str = "gpt2", processes: int = 4, workdir: Path | None = None) -> int:
    if model not in EXAMPLES:
        print(f"trims demo: unknown model {model!r}; choose from {', '.join(EXAMPLES)}", file=sys.stderr)
        return 2
    if processes < 2:
        print("trims demo: needs at least 2 processes per mode (the first trims open is not warm)", file=sys.stderr)
        return 2
    example = EXAMPLES[model]
    keep = workdir is not None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="trims-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = workdir / "run" / "trims.sock"
    # One thread per function, as a container with one CPU: and on several threads PyTorch gives
    # some fresh processes last-bit different logits, which the "outputs" line would report.
    env = {**os.environ, "TRIMS_SOCKET": str(socket_path), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    daemon = None
    try:
        model_dir = workdir / model
        if not (model_dir / "config.json").exists():
            _say(f"building {example.description} from its config (random weights) ...")
            example.build(model_dir)
        weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        daemon = start_daemon_process(socket_path, workdir / "store", max(2**30, 3 * weights), workdir / "daemon.log")
        _say(f"daemon {daemon.pid} serving {socket_path}")
        client = connect(socket_path)
        pushed = client.push(model_dir, f"demo/{model}")
        _say(f"pushed {pushed.name}: {pushed.tensors} tensors, {format_size(pushed.nbytes)}, {pushed.digest[:19]}")

        weight_files = list(model_dir.glob("*.safetensors"))
        store_files = list((workdir / "store" / "disk").glob("*.bin"))
        run = functools.partial(_run_functions, example.name, processes, model_dir, pushed.name, env)
        own_disk = run("own", before_each=lambda i: drop_page_cache(weight_files))
        own_cached = run("own", before_each=lambda i: None)
        shared = run("trims", before_each=lambda i: drop_page_cache(store_files) if i == 0 else None)
        rows = [
            _row("from_pretrained, weights on disk", own_disk),
            _row("from_pretrained, weights in page cache", own_cached),
            _row("trims, first open (disk -> memory)", shared[:1], pss_of=[]),
            _row("trims, warm", shared[1:], pss_of=shared),
        ]
        outputs = {f.report["output"] for f in own_disk + own_cached + shared}
        _print_table(rows, processes)
        _print_summary(own_disk, own_cached, shared, outputs, client.stats())
        return 0 if len(outputs) == 1 else 1
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=30)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def drop_page_cache(paths: list[Path]) -> None:
    """Make the next read of ``paths`` come from disk, as on a node that has not read them lately."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_functions(example: str, count: int, directory: Path, name: str, env: dict, mode: str,
                   before_each: Callable[[int], None]) -> list[Function]:
    """Start ``count`` fresh processes one after another; keep all alive, then read PSS."""
    functions = []
    try:
        for i in range(count):
            before_each(i)
            code = FUNCTION.format(example=example, mode=mode, directory=str(directory), name=name)
            process = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"function process {i} ({mode}) failed; exit code {process.wait()}")
            functions.append(Function(process, json.loads(line)))
            _say(f"  {mode:5} function {i + 1}/{count}: model ready in {functions[-1].report['ready_s'] * 1e3:.0f} ms")
        for f in functions:
            f.report["pss"] = pss_bytes(f.process.pid)
        return functions
    finally:
        for f in functions:
            f.finish()


def _row(label: str, functions: list[Function], pss_of: list[Function] | None = None) -> list[str]:
    """Medians over ``functions``; memory summed over ``pss_of`` (default: the same processes)."""
    if not functions:
        return [label, "0", "-", "-", "-", "-"]
    median = lambda key: statistics.median(f.report[key] for f in functions)  # noqa: E731
    pss = functions if pss_of is None else pss_of
    return [
        label,
        str(len(functions)),
        f"{median('imports_s'):.2f} s",
        f"{median('ready_s') * 1e3:.1f} ms",
        f"{median('first_s') * 1e3:.1f} ms",
        format_size(sum(f.report["pss"] for f in pss)) if pss else "(below)",
    ]


def _print_table(rows: list[list[str]], processes: int) -> None:
    header = ["function processes", "n", "imports", "model ready", "1st inference", f"PSS, {processes} alive"]
    print(f"\n{format_table(header, rows)}\n")


def _print_summary(own_disk: list[Function], own_cached: list[Function], shared: list[Function],
                   outputs: set[str], stats: dict) -> None:
    def ready(functions: list[Function]) -> float:
        return statistics.median(f.report["ready_s"] for f in functions)

    warm = ready(shared[1:])
    print(f"warm trims: model ready in {warm * 1e3:.1f} ms, {ready(own_disk) / warm:.0f}x sooner than "
          f"from_pretrained from disk and {ready(own_cached) / warm:.1f}x sooner than from page cache")
    print(f"(import torch alone: {statistics.median(f.report['torch_s'] for f in shared):.2f} s in every process)")
    print(f"outputs: {'identical in all ' + str(len(own_disk + own_cached + shared)) + ' processes' if len(outputs) == 1 else 'DIFFERENT: ' + str(outputs)}")
    loads = stats["fetches"].get("disk->host", {}).get("count", 0)
    print(f"daemon: {stats['opens']['total']:g} opens, {stats['opens']['hits']:g} hits, {loads:g} load(s) from disk, "
          f"host memory {format_size(stats['tiers']['host']['used_bytes'])}")


def _say(message: str) -> None:
    print(textwrap.shorten(message, 160), flush=True)
