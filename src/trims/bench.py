"""``trims bench NAME``: what getting a pushed model costs a fresh process on this node.

Starts function processes the way a FaaS node starts instances: one after another, or with
``burst`` all at once (a scale-out from nothing). Each imports what it needs off the clock,
then times getting the model's weights from the running daemon (connect, open, map) and the
first touch of every page of them; all stay alive until the last is measured, so that their
memory together shows how many copies they hold. With ``plain`` files, the same number of
processes load those safetensors files the usual way (a copy each, from a warm page cache:
plain loading's best case), side by side. The daemon's counters before and after say how
many opens found the model in memory and what it brought up from disk or the cloud.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import errors
from ._report import format_table, pss_bytes
from .client import Client
from .config import format_size
from .errors import ConfigError, TrimsError

FRAMEWORKS = ("numpy", "torch")


@dataclass
class _Function:
    """One function process, between its ``ready`` and its exit."""

    process: subprocess.Popen

    def go(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        try:
            self.process.stdin.close()  # at end of input it drops the weights and exits, wherever it was
        except BrokenPipeError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_bench(client: Client, name: str, *, processes: int = 4, burst: bool = False, framework: str = "numpy",
              plain: Path | None = None, evict_first: bool = False) -> dict[str, Any]:
    """Measure ``processes`` fresh processes getting ``name`` through ``client``'s daemon, and
    loading ``plain`` (a ``.safetensors`` file or a directory of them) too if given.

    Raises :class:`~trims.errors.ModelNotFound` for an unknown name, :class:`ConfigError` for
    arguments that cannot be run, and a function process's own error if one fails.
    """
    if framework not in FRAMEWORKS:
        raise ConfigError(f"unknown framework {framework!r}: choose {' or '.join(FRAMEWORKS)}")
    if processes < 1:
        raise ConfigError(f"needs at least one process, not {processes}")
    model = client.info(name)
    files = _safetensors_files(plain) if plain is not None else []
    if evict_first:
        client.evict(name, tier="host")
    base = {"framework": framework, "socket": str(client.socket_path), "name": name}
    runs = {"trims": _run_mode(client, {**base, "files": []}, processes, burst)}
    if files:
        _read_through(files)
        runs["plain"] = _run_mode(client, {**base, "files": [str(f) for f in files]}, processes, burst)
    return {"name": model.name, "digest": model.digest, "nbytes": model.nbytes, "processes": processes,
            "burst": burst, "framework": framework, "evicted_first": evict_first,
            "plain_files": [str(f) for f in files], "plain_nbytes": sum(f.stat().st_size for f in files),
            "runs": runs}


def _run_mode(client: Client, spec: dict[str, Any], count: int, burst: bool) -> dict[str, Any]:
    """Every process of one mode, with the daemon's counters around them (and around each,
    one after another, to tell which opens hit)."""
    before = client.stats()
    functions: list[_Function] = []
    samples = []
    try:
        if burst:
            for _ in range(count):
                functions.append(_Function(_spawn(spec)))  # their imports run side by side
            for function in functions:
                _read_report(function.process)  # its imports are done
            for function in functions:
                function.go()
            for function in functions:
                samples.append(_result(function))
        else:
            for _ in range(count):
                ahead = client.stats()
                functions.append(_start(spec))
                functions[-1].go()
                samples.append(_result(functions[-1]))
                if not spec["files"]:
                    samples[-1]["open"] = _open_result(ahead, client.stats())
        weights_pss = _memory_of_weights(functions)
    finally:
        for function in functions:
            function.finish()
    after = client.stats()
    return {"samples": samples, "weights_pss": weights_pss, "daemon": _daemon_delta(before, after)}


def _spawn(spec: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trims._bench_function", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _start(spec: dict[str, Any]) -> _Function:
    function = _Function(_spawn(spec))
    _read_report(function.process)  # its imports are done
    return function


def _result(function: _Function) -> dict[str, Any]:
    report = _read_report(function.process)
    return {"open": None, **{key: report[key] for key in ("ready_s", "touch_s", "tensors", "pages")}}


def _memory_of_weights(functions: list[_Function]) -> int:
    """The PSS of every process holding the weights less that of every one after dropping them.
    Both are read with all of them alive, so that what they share besides (the interpreter's
    and the frameworks' libraries) is split alike in both."""
    holding = sum(pss_bytes(f.process.pid) for f in functions)
    for function in functions:
        function.go()
    for function in functions:
        _read_report(function.process)
    return holding - sum(pss_bytes(f.process.pid) for f in functions)


def _read_report(process: subprocess.Popen) -> dict[str, Any]:
    line = process.stdout.readline()
    if not line:
        raise TrimsError(f"a function process of trims bench exited (status {process.wait()}) before it reported; "
                         "its error is above")
    report = json.loads(line)
    if "error" in report:
        process.kill()
        process.wait()
        kind = getattr(errors, report["type"], None)
        raise (kind if isinstance(kind, type) and issubclass(kind, TrimsError) else TrimsError)(report["error"])
    return report


def _open_result(before: dict, after: dict) -> str | None:
    """"hit" or "miss" where the daemon saw exactly this process's open, else None (other
    processes of the node opened models meanwhile)."""
    hits = after["opens"]["hits"] - before["opens"]["hits"]
    misses = after["opens"]["misses"] - before["opens"]["misses"]
    if hits + misses != 1:
        return None
    return "hit" if hits else "miss"


def _daemon_delta(before: dict, after: dict) -> dict[str, Any]:
    fetched = {}
    for route, now in after["fetches"].items():
        was = before["fetches"].get(route, {"count": 0, "bytes": 0, "seconds": 0.0})
        if now["count"] > was["count"]:
            fetched[route] = {key: now[key] - was[key] for key in ("count", "bytes", "seconds")}
    return {"opens": after["opens"]["total"] - before["opens"]["total"],
            "hits": after["opens"]["hits"] - before["opens"]["hits"],
            "misses": after["opens"]["misses"] - before["opens"]["misses"], "fetched": fetched}


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() and f.suffix == ".safetensors" for f in files):
        raise ConfigError(f"--plain {path}: not a .safetensors file nor a directory holding some; give the file(s) "
                          "the model was pushed from, to compare loading them without trims")
    return files


def _read_through(files: list[Path]) -> None:
    """Bring ``files`` into the page cache, the best case for loading them without trims."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def format_results(results: dict[str, Any]) -> str:
    """The table ``trims bench`` prints, and a line or two of what it means."""
    n = results["processes"]
    header = ["function processes", "n", "weights ready p50", "max", "first touch p50",
              f"weights' memory, {n} alive"]
    rows = []
    trims_runs = results["runs"]["trims"]
    samples = trims_runs["samples"]
    if n == 1:
        rows.append(_row(f"trims ({samples[0]['open'] or 'hit or miss'})", samples, trims_runs["weights_pss"]))
    elif results["burst"]:
        rows.append(_row("trims, all at once", samples, trims_runs["weights_pss"]))
    else:
        rows.append(_row(f"trims, first ({samples[0]['open'] or 'hit or miss'})", samples[:1], None))
        rows.append(_row("trims, the rest", samples[1:], trims_runs["weights_pss"]))
    plain = results["runs"].get("plain")
    if plain:
        rows.append(_row(f"plain load_file{', all at once' if results['burst'] else ''}", plain["samples"],
                         plain["weights_pss"]))
    lines = [f"{results['name']} ({format_size(results['nbytes'])}, {results['framework']}): "
             f"{n} fresh process{'es' if n > 1 else ''}, {'all at once' if results['burst'] else 'one after another'}",
             "", format_table(header, rows), ""]
    daemon = trims_runs["daemon"]
    fetched = ", ".join(f"{route} {format_size(f['bytes'])} in {f['seconds']:.2f} s"
                        for route, f in daemon["fetched"].items()) or "nothing fetched"
    lines.append(f"daemon: {_count(daemon['opens'], 'open')}, {_count(daemon['hits'], 'hit')}, "
                 f"{_count(daemon['misses'], 'miss', 'misses')}; {fetched}")
    if plain:
        warm = [s["ready_s"] for s in (samples if results["burst"] or n == 1 else samples[1:])]
        ratio = statistics.median(s["ready_s"] for s in plain["samples"]) / max(statistics.median(warm), 1e-9)
        speed = f"{ratio:.1f}x sooner than" if ratio >= 1 else f"{1 / ratio:.1f}x later than"
        lines.append(f"trims: weights ready {speed} load_file's (p50), in "
                     f"{format_size(max(trims_runs['weights_pss'], 0))} of memory against "
                     f"{format_size(max(plain['weights_pss'], 0))}")
    return "\n".join(lines)


def _count(number: float, word: str, plural: str = "") -> str:
    return f"{number:g} {word if number == 1 else plural or word + 's'}"


def _row(label: str, samples: list[dict], weights_pss: int | None) -> list[str]:
    ready = [s["ready_s"] * 1e3 for s in samples]
    touch = [s["touch_s"] * 1e3 for s in samples]
    memory = "(below)" if weights_pss is None else format_size(max(weights_pss, 0))
    return [label, str(len(samples)), f"{statistics.median(ready):.1f} ms", f"{max(ready):.1f} ms",
            f"{statistics.median(touch):.1f} ms", memory]
