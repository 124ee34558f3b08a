"""The ``trims`` command: ``serve`` runs the daemon; the other commands talk to it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .client import Client, connect
from .config import Settings, default_host_memory, default_socket_path, default_store_dir, format_size, parse_size
from .errors import TrimsError

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trims", description="Share deep-learning models across processes on this node.")
    parser.add_argument("--version", action="version", version=f"trims {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", type=Path, default=None,
        help="the daemon's socket (default: $TRIMS_SOCKET, else a per-user runtime path)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    commands.add_parser = functools.partial(commands.add_parser, parents=[common])

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--store", type=Path, default=None, help="store directory (default: $TRIMS_STORE or ~/.local/share/trims)")
    serve.add_argument("--host-memory", type=_size, default=None, help=f"host memory cap; {_SIZE_HELP} (default: half of RAM)")
    serve.add_argument("--max-connections", type=int, default=1024, help="refuse connections beyond this many")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)

    push = commands.add_parser("push", help="register a .safetensors file or a model directory")
    push.add_argument("path", type=Path)
    push.add_argument("--name", required=True, help="NAME[:TAG] to tag it with (tag defaults to 'latest')")
    push.set_defaults(run=_push)

    ls = commands.add_parser("ls", help="list models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_ls)

    info = commands.add_parser("info", help="show one model")
    info.add_argument("name")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    evict = commands.add_parser("evict", help="drop a model from host memory (it stays on disk)")
    evict.add_argument("name")
    evict.set_defaults(run=_evict)

    rm = commands.add_parser("rm", help="delete a model name, and its bytes once nothing uses them")
    rm.add_argument("name")
    rm.set_defaults(run=_rm)

    stats = commands.add_parser("stats", help="daemon counters and memory use")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=_stats)

    demo = commands.add_parser("demo", help="start a daemon, share an example model with fresh processes, print a table")
    demo.add_argument("--model", default="gpt2", help="example architecture: gpt2 (124M), gpt2-tiny, bert, resnet50")
    demo.add_argument("--processes", type=int, default=4, help="function processes per mode")
    demo.add_argument("--workdir", type=Path, default=None, help="keep the example model and store here")
    demo.set_defaults(run=_demo)
    return parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except TrimsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _client(args: argparse.Namespace) -> Client:
    return connect(args.socket)


def _serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings(
        socket_path=args.socket or default_socket_path(),
        store_dir=args.store or default_store_dir(),
        host_memory=args.host_memory if args.host_memory is not None else default_host_memory(),
        max_connections=args.max_connections,
    )
    Daemon(settings).serve_forever()
    return 0


def _push(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.push(args.path, args.name)
    new = format_size(result.new_bytes) + " new" if result.new_bytes else "already stored"
    print(f"{result.name} {result.digest} ({result.tensors} tensors, {format_size(result.nbytes)}; {new})")
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
    print(f"leases:   {model.leases}")
    if model.files:
        print(f"files:    {', '.join(model.files)}")
    for key, value in sorted(model.metadata.items()):
        print(f"metadata: {key} = {value}")
    return 0


def _evict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        freed = client.evict(args.name)
    print(f"{args.name}: freed {format_size(freed)} of host memory")
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
    host, disk, opens = stats["host"], stats["disk"], stats["opens"]
    print(f"host memory: {format_size(host['used_bytes'])} of {format_size(host['capacity_bytes'])} "
          f"({host['resident_segments']} segments resident)")
    print(f"disk:        {format_size(disk['used_bytes'])} ({disk['segments']} segments)")
    print(f"models:      {stats['models']} ({stats['tags']} names)")
    print(f"leases:      {stats['leases']} over {stats['connections']} connections")
    print(f"opens:       {opens['total']} ({opens['hits']} hits, {opens['misses']} misses)")
    print(f"evictions:   {sum(stats['evictions'].values())} {stats['evictions'] or ''}".rstrip())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, processes=args.processes, workdir=args.workdir)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    print()
