"""Ray Serve: the replicas on a node get their models from the node's trims daemon.

    from ray import serve
    import trims.ray

    @serve.deployment(num_replicas=4, ray_actor_options={"runtime_env": trims.ray.runtime_env()})
    class Generator:
        @serve.multiplexed(max_num_models_per_replica=8)
        async def get_model(self, model_id: str):
            return await trims.ray.from_pretrained(model_id)

        async def __call__(self, prompt: str):
            model = await self.get_model(serve.get_multiplexed_model_id())
            ...

Every replica on a node maps the same copy of a model's weights, so a node holds each
model once however many replicas load it, and a replica that loads a model another one
already holds gets it in milliseconds. Serve still decides which replica loads which model;
when its LRU unloads one, the replica drops the module and its lease ends with the last
tensor. trims stays node-local: one daemon per node (see ``deploy/``), sharing a cloud tier.

For requests that do not go through Serve's router, :func:`where` says which nodes hold a
model warm, and :func:`node_affinity` schedules a task or actor onto the warmest.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .client import connect, default_socket_path
from .names import canonical

__all__ = ["runtime_env", "load_model", "from_pretrained", "node_models", "where", "node_affinity"]

T = TypeVar("T")
_TIER_ORDER = {"host": 0, "disk": 1, "cloud": 2}


def runtime_env(socket: str | os.PathLike | None = None) -> dict[str, Any]:
    """A ``runtime_env`` that points workers at the node's daemon (default: this process's
    ``$TRIMS_SOCKET``, or the path clients use by default). The socket path must be the same
    on every node: ``/run/trims/trims.sock`` with the provided deployments."""
    return {"env_vars": {"TRIMS_SOCKET": str(socket or default_socket_path())}}


async def load_model(name: str, factory: Callable[[], T], *, strict: bool = True) -> T:
    """:func:`trims.torch.load_model`, off the replica's event loop (an open that misses host
    memory waits on disk or the cloud)."""
    from .torch import load_model as load

    return await asyncio.to_thread(load, name, factory, strict=strict)


async def from_pretrained(name: str, **kwargs: Any) -> Any:
    """:func:`trims.transformers.from_pretrained`, off the replica's event loop."""
    from .transformers import from_pretrained as load

    return await asyncio.to_thread(load, name, **kwargs)


def node_models() -> list[dict[str, Any]]:
    """What this node's daemon holds: each model's name, digest, size, tiers and leases
    (what ``trims ls --json`` and the daemon's ``/models`` endpoint say)."""
    with connect() as client:
        return [{"name": m.name, "digest": m.digest, "nbytes": m.nbytes, "tiers": list(m.tiers),
                 "leases": m.leases} for m in client.list()]


@ray.remote(num_cpus=0)  # asks its own node's daemon; must run even on a full node
def _models_on_this_node() -> list[dict[str, Any]]:
    return node_models()


def where(name: str, *, timeout: float = 30.0) -> dict[str, list[str]]:
    """The alive nodes that hold ``name`` (or its digest), each with the tiers it is in there,
    warmest first. A node whose daemon does not answer is left out."""
    wanted = canonical(name)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    pending = {
        node: _models_on_this_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in nodes
    }
    found: dict[str, list[str]] = {}
    for node, ref in pending.items():
        try:
            models = ray.get(ref, timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError):
            continue
        for model in models:
            if wanted in (model["name"], model["digest"]):
                found[node] = sorted(model["tiers"], key=lambda t: _TIER_ORDER.get(t, 9))
    return found


def node_affinity(name: str) -> NodeAffinitySchedulingStrategy | str:
    """A scheduling strategy for the node where ``name`` is warmest (host memory before disk
    before cloud); soft, so Ray may still place the work elsewhere. ``"DEFAULT"`` if no node
    holds it."""
    found = where(name)
    if not found:
        return "DEFAULT"
    warmest = min(found, key=lambda node: _TIER_ORDER.get(found[node][0] if found[node] else "", 9))
    return NodeAffinitySchedulingStrategy(warmest, soft=True)

