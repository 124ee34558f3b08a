"""The two experiments: per-model latency (the paper's Fig. 7) and a node under load (Fig. 10)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from device_memory import DeviceMemory
from node import Node, Pool
from streams import requests
from zoo import weight_files

from trims import Client
from trims.demo import drop_page_cache

SOURCES = ("own", "trims")  # the baseline (each instance loads its own copy), and trims
LATENCY_COLUMNS = ("cold", "page-cached", "trims miss", "trims warm", "ideal")


class Bench:
    """What every experiment shares: the pool, the daemon's client and store, the zoo on disk;
    on a GPU node, the daemon's tier for the pool's device and a reader of its memory."""

    def __init__(self, pool: Pool, client: Client, store: Path, directories: dict[str, Path],
                 sizes: dict[str, int], keep_alive: float) -> None:
        self.pool, self.client, self.store = pool, client, store
        self.directories, self.sizes, self.keep_alive = directories, sizes, keep_alive
        self.gpu_tier, self.device_memory, self.idle_device_bytes = None, None, 0
        if pool.device.startswith("cuda"):
            index = int(pool.device.partition(":")[2] or 0)
            self.gpu_tier, self.device_memory = f"gpu:{index}", DeviceMemory.of_cuda_device(index)
            # The daemon makes its CUDA context with its first GPU copy: make it now, so that the
            # idle level every run measures from includes it.
            client.pull(f"zoo/{min(sizes, key=sizes.get)}", self.gpu_tier)

    def warm_instances(self) -> None:
        """Run every model once on every instance, unmeasured, all instances at once: on a GPU
        a process's first run of an architecture loads its kernels and makes cuBLAS and cuDNN
        handles (150-230 ms on an H200), which would land on whichever mode ran first. The
        smallest model then goes the baseline's way too, so that the first read of a file into
        device memory of the process's own is not measured either."""
        smallest = min(self.sizes, key=self.sizes.get)

        def warm(instance) -> None:
            for model, source in [(model, "trims") for model in self.sizes] + [(smallest, "own")]:
                reply = instance.call({"op": "serve", "model": model, "dir": str(self.directories[model]),
                                       "source": source, "then_drop": True})
                if "error" in reply:
                    raise RuntimeError(f"warming {model} ({source}) on instance {instance.process.pid}: "
                                       f"{reply['error']}")

        with ThreadPoolExecutor(len(self.pool.instances)) as executor:
            list(executor.map(warm, self.pool.instances))  # list(): a failed warm-up raises here

    def cold_node(self) -> None:
        """As a node that has served nothing lately: no instance holds a model, the daemon's
        memory (host and GPU) is empty, and no model file is in the page cache. On a GPU, the
        device memory then in use (the instances' and the daemon's CUDA contexts) is the idle
        level runs measure from."""
        self.pool.reset()
        self.evict(*self.sizes)
        drop_page_cache([p for d in self.directories.values() for p in weight_files(d)] + _files(self.store))
        if self.device_memory is not None:
            self.idle_device_bytes = self.device_memory.used()

    def warm_node(self, source: str, stream: list[str]) -> None:
        """As a node in steady state: no instance holds a model, but the node's cache holds
        what the stream asks for most, the least popular brought first so the most popular
        stay: the daemon's memory with trims (its GPU tier on a GPU node), the page cache without."""
        self.cold_node()
        by_popularity = sorted(set(stream), key=stream.count)
        for name in by_popularity:
            if source == "trims":
                self.client.pull(f"zoo/{name}", self.gpu_tier or "host")
            else:
                _read(weight_files(self.directories[name]))

    def evict(self, *models: str) -> None:
        """Take models out of the daemon's memory (host and GPU), once instances that dropped them have
        released them (a release arrives just after the drop)."""
        deadline = time.monotonic() + 30
        while self.client.stats()["leases"] and time.monotonic() < deadline:
            time.sleep(0.01)
        for name in models:
            self.client.evict(f"zoo/{name}")


def model_latency(bench: Bench, model: str, runs: int) -> dict[str, float]:
    """Median seconds from request to answer for one model on an instance of the pool:
    ``cold`` reads the files from disk into memory of its own, ``page-cached`` the same with
    the files in the page cache; ``trims miss`` maps a copy the daemon must first bring from
    its disk tier; ``trims warm`` one already in its memory (host, or the GPU's on a GPU node);
    ``ideal`` runs a model already in the process (inference only)."""
    instance = bench.pool.instances[0]
    weights = weight_files(bench.directories[model])
    samples: dict[str, list[float]] = {column: [] for column in LATENCY_COLUMNS}

    def request(source: str) -> float:
        reply = instance.call({"op": "serve", "model": model, "dir": str(bench.directories[model]), "source": source})
        if "error" in reply:
            raise RuntimeError(f"{model}: {reply['error']}")
        if reply.get("from_store", source == "trims") != (source == "trims"):
            raise RuntimeError(f"{model}: acquired with {source}, but its weights are not where that puts them")
        return reply["acquire_s"] + reply["infer_s"]

    request("trims")  # once unmeasured: one-time costs of a first run in a process land in no column
    for _ in range(runs):
        instance.call({"op": "drop"})
        drop_page_cache(weights)
        samples["cold"].append(request("own"))
        instance.call({"op": "drop"})
        _read(weights)
        samples["page-cached"].append(request("own"))
        instance.call({"op": "drop"})
        bench.evict(model)
        drop_page_cache(_files(bench.store))
        samples["trims miss"].append(request("trims"))
        instance.call({"op": "drop"})
        samples["trims warm"].append(request("trims"))
        samples["ideal"].append(request("trims"))
    instance.call({"op": "drop"})
    return {column: statistics.median(values) for column, values in samples.items()}


def load_run(bench: Bench, source: str, budget: int, models: list[str], concurrency: int, count: int,
             stream: str = "pareto", warm: bool = False, seed: int = 0) -> dict:
    """``count`` requests from ``concurrency`` closed-loop clients (each sends its next request
    when its last is answered) on a cold node (or a ``warm`` one); throughput, latencies,
    memory over time."""
    asked = requests(stream, models, count, seed)
    if warm:
        bench.warm_node(source, asked)
    else:
        bench.cold_node()
    queue = iter(asked)
    lock = threading.Lock()
    records: list[dict] = []
    failures: list[BaseException] = []
    node = Node(bench.pool, source, budget, bench.sizes, bench.directories, bench.keep_alive)

    def client() -> None:
        while True:
            with lock:
                model = next(queue, None)
            if model is None or failures:
                return
            try:
                record = node.serve(model)
            except BaseException as exc:  # noqa: BLE001 -- reported below, in the main thread
                failures.append(exc)
                return
            with lock:
                records.append(record)

    daemon_before = _daemon_counts(bench.client, bench.gpu_tier)
    sampler = _MemorySampler(bench.pool.pids() + [_daemon_pid(bench.client)], bench.client, bench.device_memory,
                             bench.idle_device_bytes)
    started = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in clients:
        thread.start()
    try:
        for thread in clients:
            thread.join()
    except BaseException as interrupt:  # an interrupt: the clients stop after their current request
        failures.append(interrupt)
        raise
    elapsed = time.perf_counter() - started
    node.close()
    memory = sampler.stop()
    if failures:
        raise failures[0]
    _check_where_weights_came_from(source, records)
    daemon = {key: after - daemon_before[key] for key, after in _daemon_counts(bench.client, bench.gpu_tier).items()}
    return _summary(records, elapsed, memory) | {"source": source, "concurrency": concurrency, "models": len(models),
                                                  "stream": stream, "budget": budget, "seed": seed, **daemon}


def pooled(runs: list[dict]) -> dict:
    """Repeats of one run (other seeds, same settings) as one: their requests together, their
    seconds added up, the highest peak; the memory trace is the first repeat's."""
    records = [record | {"repeat": k} for k, run in enumerate(runs) for record in run["records"]]
    summary = _summary(records, sum(run["seconds"] for run in runs), runs[0]["memory"])
    return runs[0] | summary | {
        **_peak(max(runs, key=lambda run: run["peak_memory"])["memory"]),
        "peak_device": max(run["peak_device"] for run in runs), "seed": [run["seed"] for run in runs],
        **{key: sum(run[key] for run in runs) for key in _DAEMON_COUNTS if key in runs[0]},
        "repeats": [{key: run[key] for key in ("seed", "seconds", "throughput", "p99_s", "peak_memory")} for run in runs],
    }


def _check_where_weights_came_from(source: str, records: list[dict]) -> None:
    """Fail a run that did not measure what it says: trims instances must have mapped the
    daemon's copy, baseline instances read their own."""
    acquired = [r for r in records if not r["warm"]]
    from_store = sum(bool(r["from_store"]) for r in acquired)
    if from_store != (len(acquired) if source == "trims" else 0):
        raise RuntimeError(f"{source}: {from_store} of {len(acquired)} acquisitions had every weight in trims' memory")


def _summary(records: list[dict], elapsed: float, memory: list[tuple]) -> dict:
    totals = sorted(r["total_s"] for r in records)
    ideal = sorted(r["infer_s"] for r in records)
    return {
        "requests": len(records), "seconds": elapsed, "throughput": len(records) / elapsed,
        "p50_s": percentile(totals, 50), "p99_s": percentile(totals, 99),
        "ideal_p50_s": percentile(ideal, 50), "ideal_p99_s": percentile(ideal, 99),
        "warm_fraction": sum(r["warm"] for r in records) / len(records),
        "acquisitions": sum(not r["warm"] for r in records),
        "from_store": sum(bool(r["from_store"]) for r in records if not r["warm"]),
        "acquire_s": sum(r["acquire_s"] for r in records), "weights_s": sum(r["weights_s"] for r in records),
        "queue_s": sum(r["queue_s"] for r in records),
        **_peak(memory), "memory": memory,
        "records": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records],
    }


def _peak(memory: list[tuple]) -> dict[str, int]:
    """The node's highest sample, how much of it was the daemon's shared memory, and the
    highest device memory above the idle node (0 without a GPU)."""
    top = max(memory, key=lambda sample: sample[1], default=(0.0, 0, 0))
    shared = top[2] if len(top) > 2 else 0  # traces from before the split have no shared column
    device = max((sample[3] for sample in memory if len(sample) > 3), default=0)
    return {"peak_memory": top[1], "peak_private": top[1] - shared, "peak_shared": shared, "peak_device": device}


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class _MemorySampler:
    """The node's memory every quarter second, as (seconds, total, shared, device): the private
    memory of its processes (PSS of anonymous pages: an instance's own copy of a model, its
    activations) plus the daemon's host memory (its memfds, counted once whether no instance
    or ten map them, those a warm node starts with included; as the daemon counts them, so
    that no other process's shared memory on the machine counts). Page cache is left out in
    both modes: it can be reclaimed. ``device``: on a GPU node, its memory in use above the idle node's (no
    model anywhere, every CUDA context made): instances' copies, activations and allocator
    caches, and the daemon's GPU copies, including those a warm node starts with (unlike
    host shared memory, GPU memory is what the budget caps); else 0. Device memory is read
    every 10 ms and each sample carries the highest reading since the last: with no
    keep-alive a baseline instance's own copy on a GPU lives for tens of milliseconds, which
    quarter-second samples would mostly miss (the daemon's copy, always there, they would not)."""

    DEVICE_INTERVAL = 0.01

    def __init__(self, pids: list[int], client: Client, device_memory=None, idle_device_bytes: int = 0,
                 interval: float = 0.25) -> None:
        self.pids, self.interval, self.samples = pids, interval, []
        self._client = client
        self._device_memory, self._idle_device_bytes = device_memory, idle_device_bytes
        self._device_peak, self._device_lock = 0, threading.Lock()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, args=(self._sample,), daemon=True)]
        if device_memory is not None:
            self._threads.append(threading.Thread(target=self._run, args=(self._poll_device,), daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise RuntimeError(f"the memory sampler failed: {self._error}") from self._error
        return self.samples

    def _run(self, loop) -> None:
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 -- raised by stop(), in the run's thread
            self._error = exc
            self._stop.set()

    def _poll_device(self) -> None:
        while not self._stop.is_set():
            self._device_reading()
            self._stop.wait(self.DEVICE_INTERVAL)

    def _device_reading(self) -> None:
        used = max(0, self._device_memory.used() - self._idle_device_bytes)
        with self._device_lock:
            self._device_peak = max(self._device_peak, used)

    def _device_peak_since_last(self) -> int:
        """The highest device reading since the last sample, this moment's included."""
        if self._device_memory is None:
            return 0
        self._device_reading()
        with self._device_lock:
            peak, self._device_peak = self._device_peak, 0
        return peak

    def _sample(self) -> None:
        """Every interval, and once more at the stop: a run shorter than one interval still
        shows what it left in memory."""
        while True:
            stopping = self._stop.is_set()
            shared = self._client.stats()["tiers"]["host"]["used_bytes"]
            node = sum(map(private_bytes, self.pids)) + shared
            self.samples.append((round(time.perf_counter() - self._started, 2), node, shared,
                                 self._device_peak_since_last()))
            if stopping:
                return
            self._stop.wait(self.interval)


def private_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


_DAEMON_COUNTS = ("daemon_host_hits", "daemon_host_misses", "daemon_fetch_s", "daemon_fetch_bytes",
                  "daemon_gpu_hits", "daemon_gpu_misses", "daemon_gpu_fetch_s")


def _daemon_counts(client: Client, gpu_tier: str | None) -> dict[str, float]:
    """Opens the daemon served from host memory and those it first had to bring there; the
    seconds and bytes it spent bringing segments up from disk (copy and verification). With a
    GPU tier, its hits and misses (segments) and the seconds of copies from host memory to it."""
    stats = client.stats()
    fetched = stats["fetches"].get("disk->host", {})
    values = [stats["opens"]["hits"], stats["opens"]["misses"], fetched.get("seconds", 0.0), fetched.get("bytes", 0)]
    if gpu_tier is not None:
        tier = stats["tiers"].get(gpu_tier, {})
        uploads = stats["fetches"].get(f"host->{gpu_tier}", {})
        values += [tier.get("hits", 0.0), tier.get("misses", 0.0), uploads.get("seconds", 0.0)]
    return dict(zip(_DAEMON_COUNTS, values))


def _daemon_pid(client: Client) -> int:
    return client.stats()["daemon"]["pid"]


def _files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(root) for f in names if (Path(d) / f).is_file()]


def _read(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass
