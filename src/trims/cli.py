"""The ``trims`` command: ``serve`` runs the daemon; the other commands talk to it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .bench import FRAMEWORKS
from .client import Client, connect
from .config import Settings, default_socket_path, format_size, parse_size
from .errors import ConfigError, TrimsError
from .examples import EXAMPLES
from .policy import POLICIES
from .tier import PIN_TIERS

_TIER_HELP = f"{', '.join(PIN_TIERS)}, or gpu:N for CUDA device N's memory (default: host)"

_SIZE_HELP = "bytes, or with a unit: 512M, 4G, 1.5GiB (K/M/G/T = 1024^n; KB/MB/GB = 1000^n)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except TrimsError as exc:
        print(f"trims: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (trims ls | head): no traceback, nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at the interpreter's flush
        return 1


class _OneLineErrors(argparse.ArgumentParser):
    """A wrong command line is one line on stderr, as every other error of trims is."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="trims", description="Share deep-learning models across processes on this node.")
    parser.add_argument("--version", action="version", version=f"trims {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", type=Path, default=None,
        help="the daemon's socket (default: $TRIMS_SOCKET, else a per-user runtime path)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    commands.add_parser = functools.partial(commands.add_parser, parents=[common])

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML settings file (default: $TRIMS_CONFIG, /etc/trims/trims.toml for root, "
                            "~/.config/trims/trims.toml); flags win over it")
    serve.add_argument("--store", type=Path, default=None, help="store directory (default: $TRIMS_STORE or ~/.local/share/trims)")
    serve.add_argument("--host-memory", type=_size, default=None, help=f"host memory cap; {_SIZE_HELP} (default: half of RAM)")
    serve.add_argument("--disk", type=_size, default=None, help="disk tier cap (default: unbounded)")
    serve.add_argument("--gpu-memory", type=_size, default=None,
                       help="GPU tier cap per CUDA device, for clients that open models on a GPU (default: 0, no GPU tier)")
    serve.add_argument("--policy", choices=sorted(POLICIES), default=None, help="eviction order in every tier (default: lru)")
    serve.add_argument("--cloud", default=None, help="upload every pushed model here too, e.g. s3://bucket/trims, so the disk tier can give any up")
    serve.add_argument("--busy-timeout", type=float, default=None,
                       help="seconds an open waits for a release when memory is full of leased models (default: 0)")
    serve.add_argument("--max-connections", type=int, default=None, help="refuse connections beyond this many (default: 1024)")
    serve.add_argument("--frame-timeout", type=float, default=None,
                       help="seconds a client may take to send a frame it has begun (default: 10)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    serve.add_argument("--metrics-address", default=None, help="address for --metrics-port (default: 127.0.0.1)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)

    push = commands.add_parser("push", help="register a .safetensors file, a model directory or a PyTorch "
                                            "checkpoint, local or in a bucket")
    push.add_argument("path", help="a file, a directory, or a URL such as s3://bucket/model-dir")
    push.add_argument("--name", required=True, help="NAME[:TAG] to tag it with (tag defaults to 'latest')")
    push.add_argument("--to", default=None, help="also upload it to object storage, e.g. s3://bucket/trims")
    push.set_defaults(run=_push)

    pull = commands.add_parser("pull", help="bring a model into host memory (or --tier disk, gpu:N) without opening it")
    pull.add_argument("name")
    pull.add_argument("--tier", default="host", help=_TIER_HELP)
    pull.set_defaults(run=_pull)

    pin = commands.add_parser("pin", help="keep a model in a tier under pressure and across restarts")
    pin.add_argument("name")
    pin.add_argument("--tier", default="host", help=_TIER_HELP)
    pin.set_defaults(run=_pin)

    unpin = commands.add_parser("unpin", help="let a pinned model be evicted again")
    unpin.add_argument("name")
    unpin.set_defaults(run=_unpin)

    ls = commands.add_parser("ls", help="list models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_ls)

    info = commands.add_parser("info", help="show one model")
    info.add_argument("name")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    evict = commands.add_parser("evict", help="drop a model from host and GPU memory (it stays on disk)")
    evict.add_argument("name")
    evict.add_argument("--tier", default=None, help="host or gpu:N, to drop it from that tier alone (default: all)")
    evict.set_defaults(run=_evict)

    rm = commands.add_parser("rm", help="delete a model name, and its bytes once nothing uses them")
    rm.add_argument("name")
    rm.set_defaults(run=_rm)

    health = commands.add_parser("health", help="exit 0 if the daemon answers (for container and Kubernetes probes)")
    health.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for an answer")
    health.set_defaults(run=_health)

    stats = commands.add_parser("stats", help="daemon counters and memory use")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_stats)

    run = commands.add_parser("run", help="run a command with transparent mode on: its safetensors loads use the daemon")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(run=_run)

    hook = commands.add_parser("hook", help="install the hook that honours TRIMS_TRANSPARENT=1 in this Python environment")
    hook.add_argument("action", choices=["install", "uninstall"])
    hook.set_defaults(run=_hook)

    bench = commands.add_parser("bench", help="time fresh processes getting a pushed model from the daemon "
                                              "(and loading its files without trims, side by side)")
    bench.add_argument("name")
    bench.add_argument("-n", "--processes", type=_whole_number(1), default=4,
                       help="function processes to start (default: 4)")
    bench.add_argument("--burst", action="store_true",
                       help="start them all at once, as a scale-out from nothing (default: one after another)")
    bench.add_argument("--framework", choices=FRAMEWORKS, default="numpy",
                       help="get the weights as NumPy arrays or torch tensors (default: numpy)")
    bench.add_argument("--plain", type=Path, default=None,
                       help="the .safetensors file (or directory of them) the model came from: also time loading it "
                            "with safetensors' load_file, from a warm page cache")
    bench.add_argument("--evict-first", action="store_true",
                       help="drop the model from host memory first, so the first open brings it up (admins only)")
    bench.add_argument("--json", action="store_true", help="every process's timings, as JSON")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="start a daemon, share an example model with fresh processes, print a table")
    demo.add_argument("--model", default="gpt2", choices=sorted(EXAMPLES),
                      help="example architecture (default: gpt2, 124M parameters)")
    demo.add_argument("--processes", type=_whole_number(2, " (the first trims open is not warm)"), default=4,
                      help="function processes per mode (at least 2: trims's first open loads, the rest are warm)")
    demo.add_argument("--workdir", type=Path, default=None, help="keep the example model and store here")
    demo.set_defaults(run=_demo)
    return parser


def _whole_number(minimum: int, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"needs a whole number of at least {minimum}{why}, not {text!r}")
        return number
    return parse


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except TrimsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _client(args: argparse.Namespace) -> Client:
    return connect(args.socket)


def _serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    flags = {
        "socket": args.socket, "store": args.store, "host_memory": args.host_memory, "disk": args.disk,
        "gpu_memory": args.gpu_memory,
        "policy": args.policy, "cloud": args.cloud, "busy_timeout": args.busy_timeout,
        "max_connections": args.max_connections, "metrics_port": args.metrics_port,
        "metrics_address": args.metrics_address, "frame_timeout": args.frame_timeout,
    }
    Daemon(Settings.load(flags, args.config)).serve_forever()
    return 0


def _push(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.push(args.path, args.name, to=args.to, progress=_progress_bar())
    new = format_size(result.new_bytes) + " new" if result.new_bytes else "already stored"
    print(f"{result.name} {result.digest} ({result.tensors} tensors, {format_size(result.nbytes)}; {new})")
    if args.to and result.uploaded_bytes is not None:
        print(f"uploaded {format_size(result.uploaded_bytes)} to {args.to}" if result.uploaded_bytes else
              f"nothing uploaded to {args.to}: the daemon's cloud tier holds its segments already, where an "
              "earlier push put them")
    return 0


def _pull(args: argparse.Namespace) -> int:
    with _client(args) as client:
        moved = client.pull(args.name, args.tier, progress=_progress_bar())
    print(f"{args.name}: in {args.tier} ({format_size(moved)} moved)" if moved else f"{args.name}: already in {args.tier}")
    return 0


def _pin(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.pin(args.name, args.tier, progress=_progress_bar())
    print(f"{args.name}: pinned in {args.tier}")
    return 0


def _unpin(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unpin(args.name)
    print(f"{args.name}: unpinned")
    return 0


def _progress_bar() -> Callable[[str, int, int], None] | None:
    """A one-line progress bar on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()

    def show(stage: str, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        rate = done / max(time.monotonic() - started, 1e-6)
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{stage:5} [{bar:<30}] {fraction:4.0%} {format_size(done)} of {format_size(total)}, "
                         f"{format_size(rate)}/s ")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _health(args: argparse.Namespace) -> int:
    with Client(args.socket or default_socket_path(), timeout=args.timeout) as client:
        pong = client.ping(args.timeout)
    print(f"ok: trims daemon {pong.daemon_version}, pid {pong.pid}, protocol {pong.protocol_version}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list()
    if args.json:
        _print_json([dataclasses.asdict(m) for m in models])
        return 0
    rows = [("NAME", "DIGEST", "SIZE", "TENSORS", "TIERS", "LEASES")]
    rows += [
        (m.name, m.digest[7:19], format_size(m.nbytes), str(m.tensors), ",".join(m.tiers), str(m.leases))
        for m in models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.info(args.name)
        on_gpu = [t for t in model.tiers if t.startswith("gpu:")]
        tiers = client.stats()["tiers"] if on_gpu else {}  # how each GPU shares its memory
    if args.json:
        _print_json(dataclasses.asdict(model))
        return 0
    print(f"name:     {model.name}")
    if model.aliases:
        print(f"aliases:  {', '.join(model.aliases)}")
    print(f"digest:   {model.digest}")
    print(f"size:     {format_size(model.nbytes)} ({model.nbytes} bytes)")
    print(f"tensors:  {model.tensors} ({', '.join(f'{n} {d}' for d, n in sorted(model.dtypes.items()))})")
    print(f"segments: {model.segments}")
    print(f"tiers:    {', '.join(model.tiers)}")
    if model.pinned:
        print(f"pinned:   {model.pinned} (kept there until `trims unpin`)")
    for name in on_gpu:
        print(f"{name}:    {_gpu_path(tiers[name])}")
    print(f"leases:   {model.leases}")
    if model.files:
        print(f"files:    {', '.join(model.files)}")
    for key, value in sorted(model.metadata.items()):
        print(f"metadata: {key} = {value}")
    return 0


def _gpu_path(tier: dict) -> str:
    protection = "read-only" if tier["read_only_mapping"] else "WRITABLE (the driver refused read-only mappings)"
    return f"{tier['uuid']}, shared as {tier['sharing']}, mapped {protection} by clients"


def _evict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        freed = client.evict(args.name, args.tier)
    print(f"{args.name}: freed {format_size(freed)} of {args.tier or 'host and GPU'} memory")
    return 0


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.remove(args.name)
    print(f"{args.name}: removed; {format_size(deleted)} deleted from disk")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        _print_json(stats)
        return 0
    if "tiers" not in stats:  # what a tenant that is not an admin sees: its own
        _print_usage(stats)
        return 0
    for name, tier in stats["tiers"].items():
        capacity = "unbounded" if tier["capacity_bytes"] is None else format_size(tier["capacity_bytes"])
        evictions = ", ".join(f"{n:g} {reason}" for reason, n in tier["evictions"].items()) or "none"
        print(f"{name:6} {format_size(tier['used_bytes'])} of {capacity} in {tier['segments']} segments; "
              f"{tier['hits']:g} hits, {tier['misses']:g} misses; evictions: {evictions}")
        if "sharing" in tier:
            print(f"{'':6} {_gpu_path(tier)}")
        if "huge_pages" in tier:
            pages = "2 MiB" if tier["huge_pages"] else "4 KiB"
            print(f"{'':6} segments in {pages} pages (the kernel's shmem_enabled: {tier['shmem_enabled']})")
    opens = stats["opens"]
    print(f"policy {stats['policy']}; {stats['models']} models ({stats['tags']} names, {stats['pins']} pinned); "
          f"{stats['leases']} leases over {stats['connections']} connections; "
          f"{stats['waiting_for_room']} requests waiting for memory")
    print(f"opens  {opens['total']:g} ({opens['hits']:g} hits, {opens['misses']:g} misses), "
          f"mean {opens['mean_seconds'] * 1e3:.1f} ms")
    for route, fetch in stats["fetches"].items():
        rate = fetch["bytes"] / fetch["seconds"] if fetch["seconds"] else 0
        print(f"fetch  {route}: {fetch['count']:g} segments, {format_size(fetch['bytes'])} at {format_size(rate)}/s")
    for tier, count in stats["corrupt_copies"].items():
        kept = "; their files are kept in the store's corrupt/" if tier == "disk" else ""
        print(f"damaged copies dropped from {tier}: {count:g} (the daemon's log names them{kept})")
    return 0


def _print_usage(usage: dict) -> None:
    def of(used: int, cap: int | None) -> str:
        return format_size(used) + ("" if cap is None else f" of {format_size(cap)}")

    print(f"tenant {usage['tenant']}: {usage['models']} models it may open")
    print(f"leases {usage['leases']} on {of(usage['leased_bytes'], usage['max_leased_bytes'])}")
    print(f"pushed {of(usage['pushed_bytes'], usage['max_pushed_bytes'])}")


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("trims run needs a command: trims run -- python app.py")
    boot = str(Path(__file__).resolve().parent / "_boot")
    env = {**os.environ, "TRIMS_TRANSPARENT": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [boot, os.environ.get("PYTHONPATH")]))}
    if args.socket is not None:
        env["TRIMS_SOCKET"] = str(args.socket)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise ConfigError(f"cannot run {command[0]}: {exc.strerror}") from None


_PTH = "trims-transparent.pth"


def _hook(args: argparse.Namespace) -> int:
    """A .pth file runs at every interpreter start in this environment; it imports a module
    that turns transparent mode on only when TRIMS_TRANSPARENT=1."""
    path = Path(sysconfig.get_paths()["purelib"]) / _PTH
    try:
        if args.action == "install":
            # The check stays in the .pth line: without TRIMS_TRANSPARENT, starting Python costs nothing more.
            path.write_text('import os; os.environ.get("TRIMS_TRANSPARENT") == "1" and __import__("trims._pth_hook")\n')
            print(f"installed {path}: Python programs here run in transparent mode when TRIMS_TRANSPARENT=1")
        else:
            path.unlink(missing_ok=True)
            print(f"removed {path}")
    except OSError as exc:
        raise ConfigError(f"cannot {args.action} the hook {path}: {exc.strerror or exc}; run it as a user who may "
                          "write to this Python environment") from None
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_results, run_bench

    with _client(args) as client:
        results = run_bench(client, args.name, processes=args.processes, burst=args.burst,
                            framework=args.framework, plain=args.plain, evict_first=args.evict_first)
    if args.json:
        _print_json(results)
    else:
        print(format_results(results))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, processes=args.processes, workdir=args.workdir)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    print()
