"""Tier benchmark: how fast segments move up the hierarchy, and how well each policy caches.

    python bench/tiers.py            # about 5 minutes
    python bench/tiers.py --quick    # smaller sizes, fewer requests

1. disk -> host: a daemon loading a segment into host memory (copy + SHA-256 of every
   tensor) against a plain sequential read of the same file into a buffer, both with the
   file in page cache and with it evicted (posix_fadvise DONTNEED).
2. S3 -> host: the daemon fetching a segment from an S3 endpoint (moto's server on loopback,
   started here) against boto3's multi-threaded download_fileobj of the same object.
3. a bucket across a network: a first push straight from it (read, hash, write to disk) of
   a model that is one large tensor, as a language model's embedding nearly is, and a
   later fetch of it into host memory once the disk has given it up, both against boto3's
   download of the same object. The bucket is bench/wan_store.py, which answers with a
   first-byte latency and a rate per connection as a real one across a network does (moto
   reads the whole object for every ranged GET, which no real store does).
4. policies: a zoo of models larger than host memory, requested in the paper's Pareto stream
   (x_m = 1, alpha = 1); hit rate and mean open latency for LRU, LFU, FIFO and cost-aware.

Each comparison runs side by side in one run; results go to tiers.json and tiers.md.
"""

from __future__ import annotations

import argparse
import io
import json
import mmap
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402

import trims  # noqa: E402
from trims.config import format_size  # noqa: E402
from trims.demo import drop_page_cache  # noqa: E402
from trims.policy import POLICIES  # noqa: E402
from trims.spawn import start_daemon_process  # noqa: E402

GiB = 2**30
MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer requests")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--wan-first-byte-ms", type=float, default=50.0,
                        help="the emulated bucket's first-byte latency per request (default 50)")
    parser.add_argument("--wan-mbps", type=float, default=80.0,
                        help="the emulated bucket's rate per connection, MB/s (default 80)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size = 256 * MiB if args.quick else GiB
    work = Path(tempfile.mkdtemp(prefix="trims-tiers-"))
    results = {"disk_to_host": disk_to_host(work / "disk", size, runs=3 if args.quick else 5)}
    with S3Server(work / "moto.log") as s3:
        results["s3_to_host"] = s3_to_host(work / "s3", s3, size // 2, runs=2 if args.quick else 3)
    results["bucket_across_network"] = bucket_across_network(
        work / "wan", size // 2, runs=2 if args.quick else 3,
        first_byte_s=args.wan_first_byte_ms / 1e3, bytes_per_s=args.wan_mbps * 1e6)
    results["policies"] = policies(work / "policies", requests=300 if args.quick else 1500)
    (args.out / "tiers.json").write_text(json.dumps(results, indent=2))
    (args.out / "tiers.md").write_text(table(results))
    print((args.out / "tiers.md").read_text())


def write_model(path: Path, nbytes: int, seed: int = 0, tensors: int = 8) -> None:
    """A safetensors file of ``tensors`` float32 tensors, ``nbytes`` in all, random values."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    each = max(1, nbytes // 4 // tensors)
    save_file({f"layer{i}.weight": rng.standard_normal(each, dtype=np.float32) for i in range(tensors)}, str(path))


class Daemon:
    """A daemon in a child process (``env``: its environment, else this one's), and a client of it."""

    def __init__(self, workdir: Path, *extra: str, host_memory: int = 8 * GiB, env: dict[str, str] | None = None) -> None:
        self.socket = workdir / "trims.sock"
        self.proc = start_daemon_process(self.socket, workdir / "store", host_memory, workdir / "daemon.log", extra,
                                         env=env)
        self.client = trims.connect(self.socket)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait()

    def fetch_seconds(self, route: str) -> float:
        return self.client.stats()["fetches"].get(route, {}).get("seconds", 0.0)


def disk_to_host(work: Path, nbytes: int, runs: int) -> dict:
    work.mkdir(parents=True)
    write_model(work / "m.safetensors", nbytes)
    rows = {cache: {"trims": [], "raw": [], "raw_fresh": []} for cache in ("warm", "evicted")}
    with Daemon(work) as d:
        d.client.push(work / "m.safetensors", "m")
        (segment,) = (work / "store" / "disk").glob("*.bin")
        size = segment.stat().st_size
        for _ in range(runs):
            for cache in ("warm", "evicted"):
                prepare = (lambda: drop_page_cache([segment])) if cache == "evicted" else (lambda: read_raw(segment))
                prepare()
                rows[cache]["raw"].append(size / timed(lambda: read_raw(segment)))
                prepare()
                rows[cache]["raw_fresh"].append(size / timed(lambda: read_into_fresh_memory(segment)))
                prepare()
                if "host" in d.client.info("m").tiers:
                    d.client.evict("m")
                before = d.fetch_seconds("disk->host")
                d.client.pull("m")
                rows[cache]["trims"].append(size / (d.fetch_seconds("disk->host") - before))
    return {cache: {k: statistics.median(v) for k, v in r.items()} | {"bytes": size} for cache, r in rows.items()}


def read_raw(path: Path) -> None:
    buffer = bytearray(64 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def read_into_fresh_memory(path: Path) -> None:
    """A read that ends with the bytes resident in new memory, as any loader's must."""
    size = path.stat().st_size
    buffer = mmap.mmap(-1, size)
    with open(path, "rb", buffering=0) as f, memoryview(buffer) as view:
        done = 0
        while done < size:
            done += f.readinto(view[done : done + 64 * MiB])
    buffer.close()


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def use_endpoint(url: str) -> None:
    """Point boto3, here and in daemons started from now on, at the S3 endpoint ``url``."""
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})


class S3Server:
    def __init__(self, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        use_endpoint(self.url)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


def s3_to_host(work: Path, s3: S3Server, nbytes: int, runs: int) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig

    work.mkdir(parents=True)
    write_model(work / "m.safetensors", nbytes, tensors=16)
    boto = boto3.client("s3")
    boto.create_bucket(Bucket="bench")
    rows = {"trims": [], "boto3": []}
    with Daemon(work, "--disk", str(int(nbytes * 1.2))) as d:  # room for one model
        d.client.push(work / "m.safetensors", "m", to="s3://bench/trims")
        key = next(o["Key"] for o in boto.list_objects_v2(Bucket="bench")["Contents"] if o["Key"].endswith(".bin"))
        size = boto.head_object(Bucket="bench", Key=key)["ContentLength"]
        # A model with no cloud copy takes the disk: m, which has one, must come from S3 straight to memory.
        write_model(work / "filler.safetensors", nbytes, seed=1)
        d.client.push(work / "filler.safetensors", "filler")
        assert d.client.info("m").tiers == ("cloud",)
        config = TransferConfig(max_concurrency=16, multipart_chunksize=16 * MiB)
        for _ in range(runs):
            rows["boto3"].append(size / timed(lambda: boto.download_fileobj("bench", key, io.BytesIO(), Config=config)))
            if "host" in d.client.info("m").tiers:
                d.client.evict("m")
            before = d.fetch_seconds("cloud->host")
            d.client.pull("m")
            rows["trims"].append(size / (d.fetch_seconds("cloud->host") - before))
    return {k: statistics.median(v) for k, v in rows.items()} | {"bytes": size}


def bucket_across_network(work: Path, nbytes: int, runs: int, first_byte_s: float, bytes_per_s: float) -> dict:
    """A model in a bucket across a network (bench/wan_store.py): its first push (read, hash,
    write to disk), then, once the disk has given it up, its fetch from the bucket straight
    into host memory (the original object is its cloud copy); boto3's download for scale."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    (work / "objects" / "models").mkdir(parents=True)
    write_model(work / "objects" / "models" / "m.safetensors", nbytes, tensors=1)
    write_model(work / "filler.safetensors", nbytes, seed=1)
    size = (work / "objects" / "models" / "m.safetensors").stat().st_size
    config = TransferConfig(max_concurrency=16, multipart_chunksize=16 * MiB)
    rows = {"push": [], "fetch": [], "boto3": []}
    with WanServer(work / "objects", first_byte_s, bytes_per_s) as url:
        use_endpoint(url)
        boto = boto3.client("s3")
        with Daemon(work, "--disk", str(int(size * 1.2))) as d:  # room for one model
            for _ in range(runs):
                rows["boto3"].append(size / timed(lambda: boto.download_fileobj("models", "m.safetensors",
                                                                                io.BytesIO(), Config=config)))
                rows["push"].append(size / timed(lambda: d.client.push("s3://models/m.safetensors", "m")))
                d.client.push(work / "filler.safetensors", "filler")  # takes the disk; m has a cloud copy
                d.client.evict("m", "host")
                assert d.client.info("m").tiers == ("cloud",)
                before = d.fetch_seconds("cloud->host")
                d.client.pull("m")
                rows["fetch"].append(size / (d.fetch_seconds("cloud->host") - before))
                d.client.remove("m")
                d.client.remove("filler")
    return {k: statistics.median(v) for k, v in rows.items()} | {
        "bytes": size, "first_byte_ms": 1e3 * first_byte_s, "connection_bytes_per_s": bytes_per_s}


class WanServer:
    """bench/wan_store.py in a process of its own; ``with WanServer(...) as url``."""

    def __init__(self, root: Path, first_byte_s: float, bytes_per_s: float) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "wan_store.py"), str(root), str(first_byte_s),
                                      str(bytes_per_s)], stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> str:
        return self.proc.stdout.readline().strip()

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


# Image classifiers of the paper (MB of fp32 weights), scaled down 10x so the zoo fits here.
ZOO_MB = [4.8, 27, 92, 98, 231, 391, 96, 528, 264, 88, 238, 549, 44, 61, 102, 170, 13, 20, 33, 55]


def policies(work: Path, requests: int) -> dict:
    work.mkdir(parents=True)
    sizes = [int(mb * MiB / 10) for mb in ZOO_MB]
    for i, nbytes in enumerate(sizes):
        write_model(work / f"z{i}.safetensors", nbytes, seed=i, tensors=4)
    capacity = int(sum(sizes) * 0.4)
    rng = random.Random(0)
    # Pareto(x_m = 1, alpha = 1) over model ranks, as in the paper's throughput experiment
    order = list(range(len(sizes)))
    rng.shuffle(order)
    stream = [order[min(int(rng.paretovariate(1.0)) - 1, len(sizes) - 1)] for _ in range(requests)]
    results = {}
    for policy in POLICIES:
        with Daemon(work / policy, "--policy", policy, host_memory=capacity) as d:
            for i in range(len(sizes)):
                d.client.push(work / f"z{i}.safetensors", f"z{i}")
                d.client.evict(f"z{i}")
            latencies = []
            for model in stream:
                started = time.perf_counter()
                d.client.open(f"z{model}").close()
                latencies.append(time.perf_counter() - started)
            opens = d.client.stats()["opens"]
            results[policy] = {"hit_rate": opens["hits"] / opens["total"], "mean_open_ms": 1e3 * statistics.mean(latencies),
                               "p99_open_ms": 1e3 * float(np.percentile(latencies, 99))}
    return {"zoo_bytes": sum(sizes), "host_bytes": capacity, "requests": requests, "by_policy": results}


def table(results: dict) -> str:
    d2h, s3 = results["disk_to_host"], results["s3_to_host"]
    lines = [
        "| move | trims | baseline | ratio |",
        "|---|---|---|---|",
    ]
    for cache in ("warm", "evicted"):
        r = d2h[cache]
        where = f"file {'in page cache' if cache == 'warm' else 'evicted'} ({format_size(r['bytes'])})"
        lines.append(f"| disk -> host, {where} | {r['trims'] / 1e9:.2f} GB/s | {r['raw'] / 1e9:.2f} GB/s raw read "
                     f"into a reused buffer | {r['trims'] / r['raw']:.2f}x |")
        lines.append(f"| disk -> host, {where} | {r['trims'] / 1e9:.2f} GB/s | {r['raw_fresh'] / 1e9:.2f} GB/s raw read "
                     f"into fresh memory | {r['trims'] / r['raw_fresh']:.2f}x |")
    lines.append(f"| S3 (moto, loopback) -> host ({format_size(s3['bytes'])}) | {s3['trims'] / 1e6:.0f} MB/s "
                 f"| {s3['boto3'] / 1e6:.0f} MB/s boto3, 16 threads | {s3['trims'] / s3['boto3']:.2f}x |")
    wan = results["bucket_across_network"]
    where = (f"bucket across a network (emulated: {wan['first_byte_ms']:.0f} ms first byte, "
             f"{wan['connection_bytes_per_s'] / 1e6:.0f} MB/s per connection), one tensor ({format_size(wan['bytes'])})")
    for move, what in (("push", "first push -> disk"), ("fetch", "-> host")):
        lines.append(f"| {where}, {what} | {wan[move] / 1e6:.0f} MB/s | {wan['boto3'] / 1e6:.0f} MB/s boto3 download, "
                     f"16 threads | {wan[move] / wan['boto3']:.2f}x |")
    p = results["policies"]
    lines += [
        "",
        f"Pareto (alpha = 1) stream of {p['requests']} opens over {len(ZOO_MB)} models "
        f"({format_size(p['zoo_bytes'])}) with {format_size(p['host_bytes'])} of host memory (40%):",
        "",
        "| policy | hit rate | mean open | p99 open |",
        "|---|---|---|---|",
    ]
    for policy, r in p["by_policy"].items():
        lines.append(f"| {policy} | {r['hit_rate']:.1%} | {r['mean_open_ms']:.1f} ms | {r['p99_open_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
