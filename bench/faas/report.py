"""faas.json, faas.md and the plots, from what run.py measured (rewritten after each phase)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from measure import LATENCY_COLUMNS, percentile

from trims.config import format_size


def write(results: dict, out: Path) -> None:
    save(results, out)
    (out / "faas.md").write_text(markdown(results))
    _plots(results, out)


def save(results: dict, out: Path) -> None:
    """faas.json alone: what has been measured so far."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "faas.json").write_text(json.dumps(results, indent=1) + "\n")


def best_cell(grid: list[dict]) -> dict:
    """The paper's "best point": where trims' throughput gains most over the baseline."""
    return max(grid, key=lambda cell: cell["throughput_ratio"])


def cell_line(cell: dict) -> str:
    parts = [f"{cell['stream']} c={cell['concurrency']} {cell['fraction']:.0%} of zoo:"]
    for source in ("own", "trims"):
        if source in cell:
            run = cell[source]
            parts.append(f"{source} {run['throughput']:.2f} req/s p99 {run['p99_s']:.2f} s warm {run['warm_fraction']:.0%}")
    if "throughput_ratio" in cell:
        parts.append(f"ratio {ratio_text(cell)}")
    return "  ".join(parts)


def ratio_text(cell: dict) -> str:
    """The pooled throughput ratio, and the lowest and highest of its repeats when there are several."""
    ratios = cell.get("repeat_ratios", [])
    spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{cell['throughput_ratio']:.2f}x{spread}"


def markdown(results: dict) -> str:
    machine = results["machine"]
    gpu = f", GPU {machine['device']}" if "device" in machine else ""
    pages = (f"; the daemon's host memory in {machine['host_tier_pages']} pages (shmem_enabled: "
             f"{machine['shmem_enabled']})") if "host_tier_pages" in machine else ""
    lines = [f"`{results['command']}` on {machine['cpus']} CPUs, {format_size(machine['memory'])} memory{gpu}, "
             f"{machine['platform']}{pages}", ""]
    if "zoo" in results:
        total = sum(m["bytes"] for m in results["zoo"])
        settings = results["settings"]
        where = " (device memory)" if settings.get("device", "cpu") != "cpu" else ""
        load = (f"; {settings['repeats']} x {settings['requests']} requests per cell and mode (one request stream "
                "per repeat, the same in both modes)") if "grid" in results else ""
        lines += [f"Zoo: {len(results['zoo'])} models, {format_size(total)}; node budget for models{where} "
                  f"{format_size(results['budget'])} ({results['budget'] / total:.0%} of the zoo); "
                  f"{settings['pool']} function instances, keep-alive {settings['keep_alive']:g} s{load}.", ""]
    if results.get("latency"):  # empty when the run failed on its first model
        lines += _latency_table(results)
    if results.get("grid"):
        lines += _grid_tables(results["grid"]) + _acquisition_table(results["grid"])
        lines += _first_inference_table(results["grid"])
    if results.get("streams"):
        lines += [f"### Request streams at {_point_text(results['streams'][0])}", ""]
        lines += _cells_table(results["streams"], ("stream",))
    if results.get("beyond"):
        lines += _beyond_text(results["beyond"])
    return "\n".join(lines) + "\n"


def _latency_table(results: dict) -> list[str]:
    sizes = {m["name"]: m["bytes"] for m in results["zoo"]}
    latency = results["latency"]
    header = ["model", "size", *(f"{c} ms" for c in LATENCY_COLUMNS), "cold / trims warm", "trims warm / ideal",
              "trims miss / cold"]
    rows = [[name, format_size(sizes[name]), *(f"{row[c] * 1000:.0f}" for c in LATENCY_COLUMNS),
             f"{row['cold'] / row['trims warm']:.1f}x", f"{row['trims warm'] / row['ideal']:.2f}x",
             f"{row['trims miss'] / row['cold']:.2f}x"] for name, row in latency.items()]
    speedups = [row["cold"] / row["trims warm"] for row in latency.values()]
    worse = [name for name, row in latency.items() if row["trims miss"] > row["cold"]]
    return ["### End-to-end latency per model (cf. the paper's Fig. 7)", "",
            "One request on an idle instance, median of the runs: `cold` reads the model from disk into the",
            "instance's own memory, `page-cached` the same with the file cached, `trims miss` maps a copy the",
            "daemon first brings from its disk tier, `trims warm` one already in its memory (on a GPU node,",
            "in its GPU tier), `ideal` runs a model already in the process.", "", *_table(header, rows), "",
            f"A warm trims hit is {min(speedups):.1f}x to {max(speedups):.1f}x faster than a cold start; a full "
            f"miss (both from disk) is slower than a cold start for {len(worse)} of {len(latency)} models.",
            ""]


def _grid_tables(grid: list[dict]) -> list[str]:
    fractions = sorted({c["fraction"] for c in grid})
    concurrencies = sorted({c["concurrency"] for c in grid})
    at = {(c["fraction"], c["concurrency"]): c for c in grid if c["stream"] == "pareto"}
    header = ["models in play", *(f"c={c}" for c in concurrencies)]
    ratio = [[f"{f:.0%}", *(ratio_text(at[f, c]) if (f, c) in at else "not run" for c in concurrencies)]
             for f in fractions]  # a run cut short leaves cells out
    best = best_cell(grid)
    own, shared = best["own"], best["trims"]
    return ["### Throughput, trims / baseline, Pareto stream (cf. the paper's Fig. 10)", "",
            "All repeats of a cell pooled; in brackets, the lowest and highest ratio of a single repeat.", "",
            *_table(header, ratio), "",
            f"Best point: {best['fraction']:.0%} of the zoo, concurrency {best['concurrency']}: "
            f"{shared['throughput']:.2f} vs {own['throughput']:.2f} requests/s, {ratio_text(best)}; "
            f"p99 latency {shared['p99_s']:.2f} s vs {own['p99_s']:.2f} s; p99 against ideal (the same requests' "
            f"inference alone) {shared['p99_s'] / shared['ideal_p99_s']:.2f}x with trims, "
            f"{own['p99_s'] / own['ideal_p99_s']:.2f}x without; peak node memory {_peak_text(shared)} "
            f"vs {_peak_text(own)}{_device_text(shared, own)}.", "", *_free_weights_text(grid, best), ""]


def free_weights_gain(run: dict) -> float:
    """How much less time the baseline's requests would have taken with their weights free (the
    module still built, the model still run, as the baseline did): what sharing weights gains
    on the same acquisitions (at concurrency 1 exactly, with the cores saturated about). trims
    gains more where holding each model once keeps more of them warm (a keep-alive pool), or
    where it happens to build or run the models faster than the baseline did."""
    infer = sum(r["infer_s"] for r in run["records"])
    return (run["acquire_s"] + infer) / (run["acquire_s"] - run["weights_s"] + infer)


def _free_weights_text(grid: list[dict], best: dict) -> list[str]:
    highest = max(grid, key=lambda cell: free_weights_gain(cell["own"]))
    return [f"Free weights alone (the baseline's requests with their weights for nothing: module still "
            f"built, model still run, as the baseline did) would have gained {free_weights_gain(best['own']):.2f}x "
            f"at the best point, where trims reached {best['throughput_ratio']:.2f}x; the most in the grid, "
            f"{free_weights_gain(highest['own']):.2f}x at {highest['fraction']:.0%} of the zoo, concurrency "
            f"{highest['concurrency']}, where trims reached {highest['throughput_ratio']:.2f}x."]


def _device_text(shared: dict, own: dict) -> str:
    if not shared.get("peak_device") and not own.get("peak_device"):
        return ""
    return (f"; peak device memory above the idle node {format_size(shared['peak_device'])} "
            f"vs {format_size(own['peak_device'])}")


def _peak_text(run: dict) -> str:
    """Peak node memory, split into the processes' private memory and the daemon's shared memory."""
    if not run.get("peak_shared"):
        return format_size(run["peak_memory"])
    return (f"{format_size(run['peak_memory'])} ({format_size(run['peak_private'])} private + "
            f"{format_size(run['peak_shared'])} shared)")


def _acquisition_table(grid: list[dict]) -> list[str]:
    """Where cold starts' time went, at the best and the worst cell: getting the weights
    (reading one's own copy, or the daemon's answer to an open) and building the module."""
    daemon = [("daemon open misses", "daemon_host_misses", "{:.0f}"), ("daemon disk->host s", "daemon_fetch_s", "{:.2f}")]
    if "daemon_gpu_misses" in grid[0]["trims"]:
        daemon += [("daemon GPU misses (segments)", "daemon_gpu_misses", "{:.0f}"),
                   ("daemon host->GPU s", "daemon_gpu_fetch_s", "{:.2f}")]
    header = ["cell", "source", "acquisitions", "weights s (mean)", "build s (mean)", "acquire p99 s",
              *(title for title, _, _ in daemon)]
    rows = []
    for label, source, run, cold in _cold_starts(grid):
        acquire = sorted(r["acquire_s"] for r in cold)
        weights = sum(r["weights_s"] for r in cold) / max(1, len(cold))
        rows.append([label, _source_name(source), str(len(cold)), f"{weights:.3f}",
                     f"{sum(acquire) / max(1, len(cold)) - weights:.3f}", f"{percentile(acquire, 99):.2f}",
                     *(form.format(run[key]) if source == "trims" else "" for _, key, form in daemon)])
    return ["### Where cold starts' time went", "",
            "Per acquisition (a request that found no instance holding its model): getting the weights (the",
            "baseline reads its own copy; trims opens the daemon's, which waits while the daemon brings a",
            "missed model up from its disk and verifies it) and building the module around them.", "",
            *_table(header, rows), ""]


def _first_inference_table(grid: list[dict]) -> list[str]:
    """Where cold starts' first inference spent its time, as the instance's thread counted it
    (runs from before replies counted it have no such table)."""
    rows = []
    for label, source, _, cold in _cold_starts(grid):
        used = [r for r in cold if r.get("infer_usage")]
        if used:
            usage = {key: sum(r["infer_usage"][key] for r in used) / len(used)
                     for key in ("cpu_s", "system_s", "minor_faults")}
            wall = sum(r["infer_s"] for r in used) / len(used)
            off = sum(max(0.0, r["infer_s"] - r["infer_usage"]["cpu_s"]) for r in used) / len(used)
            rows.append([label, _source_name(source), str(len(used)), f"{wall * 1000:.0f}",
                         f"{usage['cpu_s'] * 1000:.0f}", f"{usage['system_s'] * 1000:.0f}", f"{off * 1000:.0f}",
                         f"{usage['minor_faults']:.0f}"])
    if not rows:
        return []
    header = ["cell", "source", "first inferences", "ms (mean)", "on a core ms", "of it in the kernel ms",
              "off a core ms", "page faults"]
    return ["### Where cold starts' first inference went", "",
            "The first inference after an acquisition, as the instance's one torch thread counted it: time on",
            "a core, of it in the kernel (page faults, chiefly a freshly mapped model's first touch, which",
            "the baseline paid while copying its weights), and time off a core (waiting for one, or for",
            "I/O; a GPU's synchronize mostly spins on a core).", "",
            *_table(header, rows), ""]


def _cold_starts(grid: list[dict]):
    """(cell label, source, run, the run's acquisitions) at the best cell and at the worst."""
    best, worst = best_cell(grid), min(grid, key=lambda cell: cell["throughput_ratio"])
    for name, cell in (("best", best), ("worst", worst))[: 1 if worst is best else 2]:
        for source in ("own", "trims"):
            cold = [r for r in cell[source]["records"] if not r["warm"]]
            yield f"{name}: {cell['fraction']:.0%}, c={cell['concurrency']}", source, cell[source], cold


def _source_name(source: str) -> str:
    return "baseline" if source == "own" else "trims"


def _point_text(cell: dict) -> str:
    return f"{cell['fraction']:.0%} of the zoo, concurrency {cell['concurrency']}"


def _beyond_text(cells: list[dict]) -> list[str]:
    """The policies and budgets table, and the cost-aware policy against LRU, which ran beside it."""
    against = [f"{c['memory']}, {c['fraction']:.0%} of the zoo: {c['policy_ratio']:.2f}x"
               + (f" ({min(r):.2f}–{max(r):.2f})" if len(r := c["repeat_policy_ratios"]) > 1 else "")
               for c in cells if "policy_ratio" in c]
    return [f"### Eviction policy and host memory at concurrency {cells[0]['concurrency']}", "",
            "Each repeat's stream served by the baseline, trims with LRU and trims with the cost-aware policy,",
            "back to back, each trims run on a fresh daemon of its policy.", "",
            *_cells_table(cells, ("memory", "policy", "fraction")),
            "Throughput of the cost-aware policy / LRU's (in brackets, single repeats): " + "; ".join(against) + ".", ""]


def _cells_table(cells: list[dict], keys: tuple[str, ...]) -> list[str]:
    header = [*keys, "c", "source", "req/s", "p50 s", "p99 s", "p99 / ideal", "warm", "daemon fetch s",
              "daemon fetch GB", "peak memory"]
    rows = []
    for cell in cells:
        for source in ("own", "trims"):
            if source in cell:
                run = cell[source]
                label = [f"{cell[k]:.0%}" if k == "fraction" else str(cell[k]) for k in keys]
                rows.append([*label, str(cell["concurrency"]), _source_name(source),
                             f"{run['throughput']:.2f}", f"{run['p50_s']:.2f}", f"{run['p99_s']:.2f}",
                             f"{run['p99_s'] / run['ideal_p99_s']:.2f}x", f"{run['warm_fraction']:.0%}",
                             *([f"{run['daemon_fetch_s']:.2f}", f"{run['daemon_fetch_bytes'] / 1e9:.1f}"]
                               if source == "trims" else ["", ""]), format_size(run["peak_memory"])])
    return [*_table(header, rows), ""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _plots(results: dict, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the tables and faas.json still come
        print("matplotlib is not installed; skipping the plots (pip install 'trims[bench]')", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "latency" in results:
        _latency_plot(plt, results["latency"], out / "latency.png")
    if results.get("grid"):
        _throughput_plot(plt, results["grid"], out / "throughput.png")
        _memory_plot(plt, best_cell(results["grid"]), out / "memory.png")


def _latency_plot(plt, latency: dict, path: Path) -> None:
    models = list(latency)
    figure, axes = plt.subplots(figsize=(10, 0.32 * len(models) + 1.5))
    height = 0.8 / len(LATENCY_COLUMNS)
    for k, column in enumerate(LATENCY_COLUMNS):
        axes.barh([i + k * height for i in range(len(models))], [latency[m][column] * 1000 for m in models],
                  height=height, label=column)
    axes.set_yticks([i + 0.4 - height / 2 for i in range(len(models))], models)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("end-to-end latency of one request, ms (log)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _throughput_plot(plt, grid: list[dict], path: Path) -> None:
    fractions = sorted({c["fraction"] for c in grid})
    concurrencies = sorted({c["concurrency"] for c in grid})
    at = {(c["fraction"], c["concurrency"]): c for c in grid}
    panels = [("throughput, trims / baseline (repeats' range)", lambda c: c["throughput_ratio"],
               lambda c: ratio_text(c).replace("x (", "\n(")),
              ("p99 latency, trims / ideal", lambda c: c["trims"]["p99_s"] / c["trims"]["ideal_p99_s"],
               lambda c: f"{c['trims']['p99_s'] / c['trims']['ideal_p99_s']:.2f}")]
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, (title, value, label) in zip(axes, panels):
        image = axis.imshow([[value(at[f, c]) if (f, c) in at else float("nan") for c in concurrencies]
                             for f in fractions], origin="lower",
                            cmap="viridis", aspect="auto")
        for i, f in enumerate(fractions):
            for j, c in enumerate(concurrencies):
                if (f, c) in at:
                    axis.text(j, i, label(at[f, c]), ha="center", va="center", color="white", fontsize=7)
        axis.set_xticks(range(len(concurrencies)), concurrencies)
        axis.set_yticks(range(len(fractions)), [f"{f:.0%}" for f in fractions])
        axis.set_xlabel("concurrency")
        axis.set_ylabel("models in play")
        axis.set_title(title)
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _memory_plot(plt, cell: dict, path: Path) -> None:
    panels = [(1, "node memory (PSS of instances + daemon), GiB")]
    if cell["trims"].get("peak_device") or cell["own"].get("peak_device"):
        panels.append((3, "device memory above the idle node, GiB"))
    figure, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4), squeeze=False)
    for axis, (column, label) in zip(axes[0], panels):
        for source, name in (("own", "baseline"), ("trims", "trims")):
            samples = cell[source]["memory"]
            axis.plot([s[0] for s in samples], [s[column] / 2**30 for s in samples], label=name)
        axis.set_xlabel("seconds into the run")
        axis.set_ylabel(label)
        axis.set_title(f"{cell['fraction']:.0%} of the zoo, concurrency {cell['concurrency']}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
