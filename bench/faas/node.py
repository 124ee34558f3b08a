"""A FaaS node: a pool of function instances under a memory budget, with keep-alive.

A request for model M goes to an idle instance already holding M (a warm start: inference
only); else to an idle empty instance, or the idle instance used least recently, which drops
what it held and acquires M (a cold start: the instance fetches the model, from its own read
of the files or from the trims daemon). Models held by instances count against the node's
memory budget: each instance's own copy without trims, each distinct model once with trims
(they all map the daemon's copy, which is capped at the same budget). An acquisition that
would go over the budget first takes models away from idle instances, least recently used
first; if busy instances hold the memory, the request waits. On a GPU node the budget is device
memory, where the models are run. An instance idle for longer
than the keep-alive drops its model, as platforms scale idle functions to zero; with a
keep-alive of 0 it drops it after every request (the paper's baseline: every request a
cold start).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from zoo import HERE, child_env


@dataclass
class Instance:
    process: subprocess.Popen
    model: str | None = None
    busy: bool = False
    last_used: float = 0.0

    def call(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"function instance {self.process.pid} died (exit {self.process.wait()})")
        return json.loads(line)


@dataclass
class Pool:
    """Pre-warmed instances (torch imported), reused across runs; stopped by :meth:`close`."""

    size: int
    socket: Path
    models: list[str]  # whose code every instance imports up front
    device: str = "cpu"  # where instances run models: "cpu", or a CUDA device ("cuda:0")
    instances: list[Instance] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {**child_env(), "TRIMS_SOCKET": str(self.socket)}
        command = [sys.executable, str(HERE / "worker.py"), "--device", self.device, *self.models]
        for _ in range(self.size):
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                       bufsize=1)
            self.instances.append(Instance(process))
        self.reset()  # answers once every runtime is ready, before any clock starts

    def reset(self) -> None:
        for instance in self.instances:
            instance.call({"op": "drop"})
            instance.model, instance.busy = None, False

    def pids(self) -> list[int]:
        return [instance.process.pid for instance in self.instances]

    def close(self) -> None:
        for instance in self.instances:
            try:
                instance.call({"op": "quit"})
            except (BrokenPipeError, RuntimeError, ValueError):
                pass
            instance.process.wait(timeout=30)


class Node:
    """Routes requests to a pool's instances; ``source`` says how instances get models."""

    def __init__(self, pool: Pool, source: str, budget: int, sizes: dict[str, int], directories: dict[str, Path],
                 keep_alive: float) -> None:
        self.pool, self.source, self.budget = pool, source, budget
        self.sizes, self.directories, self.keep_alive = sizes, directories, keep_alive
        self._changed = threading.Condition()
        self._stopping = False
        self._reaper = threading.Thread(target=self._reap_idle, daemon=True)
        self._reaper.start()

    def serve(self, model: str) -> dict:
        """One request, end to end; returns its timings (queue, acquire and the weights' part of it,
        inference, total)."""
        arrived = time.perf_counter()
        instance, victims = self._claim(model)
        for victim in victims:
            self._finish(victim, self._call(victim, {"op": "drop"}))
        reply = self._call(instance, {"op": "serve", "model": model, "dir": str(self.directories[model]),
                                      "source": self.source, "then_drop": self.keep_alive <= 0})
        self._finish(instance, reply)
        if "error" in reply:
            raise RuntimeError(f"{model} on instance {instance.process.pid}: {reply['error']}")
        total = time.perf_counter() - arrived
        return {"model": model, "warm": reply["warm"], "acquire_s": reply["acquire_s"],
                "weights_s": reply.get("weights_s", 0.0), "infer_s": reply["infer_s"], "total_s": total,
                "queue_s": max(0.0, total - reply["acquire_s"] - reply["infer_s"]),
                "from_store": reply.get("from_store"), "infer_usage": reply.get("infer_usage")}

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._reaper.join()

    def _call(self, instance: Instance, request: dict) -> dict:
        """An instance's reply; a dead instance's request fails the run, not hangs it."""
        try:
            return instance.call(request)
        except (OSError, RuntimeError, ValueError) as exc:
            with self._changed:
                self._stopping = True  # requests waiting for room would wait for ever
                self._changed.notify_all()
            return {"error": f"{type(exc).__name__}: {exc}"}

    # --- placement, under the lock ----------------------------------------------------------

    def _claim(self, model: str) -> tuple[Instance, list[Instance]]:
        with self._changed:
            while True:
                placed = self._place_locked(model)
                if placed is not None:
                    instance, victims = placed
                    for claimed in (instance, *victims):
                        claimed.busy = True
                    for victim in victims:
                        victim.model = None
                    instance.model = model
                    return instance, victims
                if self._stopping:
                    raise RuntimeError("the node stopped: an instance failed")
                self._changed.wait()

    def _place_locked(self, model: str) -> tuple[Instance, list[Instance]] | None:
        idle = [i for i in self.pool.instances if not i.busy]
        for instance in idle:
            if instance.model == model:
                return instance, []
        if not idle:
            return None
        instance = min(idle, key=lambda i: (i.model is not None, i.last_used))  # empty first, then LRU
        victims: list[Instance] = []
        candidates = sorted((i for i in idle if i is not instance and i.model is not None), key=lambda i: i.last_used)
        held = self._held_bytes(instance, model, victims)
        while held > self.budget:
            if not candidates:
                if not any(i.busy for i in self.pool.instances):
                    raise RuntimeError(f"{model} ({self.sizes[model]} bytes) does not fit the node's budget ({self.budget})")
                return None  # busy instances hold the memory: wait for one to finish
            # With trims a copy is freed only when every instance mapping it lets go of it.
            candidate = candidates[0]
            group = [candidate] if self.source == "own" else [c for c in candidates if c.model == candidate.model]
            without = self._held_bytes(instance, model, victims + group)
            candidates = [c for c in candidates if c not in group]
            if without < held:  # else a busy instance maps it too: dropping it frees nothing
                victims += group
                held = without
        return instance, victims

    def _held_bytes(self, instance: Instance, model: str, victims: list[Instance]) -> int:
        """What instances would hold if ``instance`` switched to ``model`` and ``victims`` emptied."""
        held = [model] + [i.model for i in self.pool.instances
                          if i.model is not None and i is not instance and i not in victims]
        if self.source == "trims":
            held = list(set(held))  # one copy per node, whoever maps it
        return sum(self.sizes[name] for name in held)

    def _finish(self, instance: Instance, reply: dict) -> None:
        with self._changed:
            instance.busy = False
            instance.last_used = time.perf_counter()
            if "error" in reply or self.keep_alive <= 0:
                instance.model = None
            self._changed.notify_all()

    def _reap_idle(self) -> None:
        while True:
            with self._changed:
                if self._stopping:
                    return
                now = time.perf_counter()
                expired = [i for i in self.pool.instances
                           if not i.busy and i.model is not None and now - i.last_used > self.keep_alive]
                for instance in expired:
                    instance.busy, instance.model = True, None
            for instance in expired:
                self._finish(instance, self._call(instance, {"op": "drop"}))
            with self._changed:
                self._changed.wait(timeout=min(1.0, max(self.keep_alive, 0.1) / 4))
