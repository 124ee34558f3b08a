"""Ray Serve: the replicas on a node get their models from the node's trims daemon.

    import torch
    from ray import serve
    import trims.ray

    @serve.deployment(num_replicas=4, ray_actor_options={"runtime_env": trims.ray.runtime_env()})
    class Generator:
        @serve.multiplexed(max_num_models_per_replica=8)
        async def get_model(self, model_id: str):
            return await trims.ray.from_pretrained(model_id)

        async def __call__(self, input_ids: list[int]):
            model = await self.get_model(serve.get_multiplexed_model_id())
            with torch.inference_mode():
                return model(torch.tensor([input_ids])).logits[0, -1].argmax().item()

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

from .client import connect
from .config import SOCKET_ENV
from .names import canonical

__all__ = ["runtime_env", "load_model", "from_pretrained", "node_models", "where", "node_affinity"]

T = TypeVar("T")
DEPLOYED_SOCKET = "/run/trims/trims.sock"
_LOCAL_TIERS = ("host", "disk")  # warmest first; the cloud tier is no closer to one node than another


def runtime_env(socket: str | os.PathLike | None = None) -> dict[str, Any]:
    """A ``runtime_env`` that points workers at their node's daemon: ``socket``, else this
    process's ``$TRIMS_SOCKET``, else ``/run/trims/trims.sock`` (where ``deploy/`` puts it).
    The path must be the same on every node."""
    return {"env_vars": {SOCKET_ENV: _cluster_socket(socket)}}


def _cluster_socket(socket: str | os.PathLike | None) -> str:
    # Not the per-user default: the driver's runtime directory means nothing on other nodes.
    return str(socket or os.environ.get(SOCKET_ENV) or DEPLOYED_SOCKET)


async def load_model(name: str, factory: Callable[[], T], *, strict: bool = True, device: Any = None) -> T:
    """:func:`trims.torch.load_model`, off the replica's event loop (an open that misses host
    memory waits on disk or the cloud); ``device="cuda"`` for the node's GPU copy."""
    from .torch import load_model as load

    return await asyncio.to_thread(load, name, factory, strict=strict, device=device)


async def from_pretrained(name: str, **kwargs: Any) -> Any:
    """:func:`trims.transformers.from_pretrained`, off the replica's event loop."""
    from .transformers import from_pretrained as load

    return await asyncio.to_thread(load, name, **kwargs)


def node_models(socket: str | os.PathLike | None = None, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """What this node's daemon holds: each model's name, digest, size, tiers and leases
    (what ``trims ls --json`` and the daemon's ``/models`` endpoint say)."""
    with connect(socket, timeout=timeout) as client:
        return [{"name": m.name, "digest": m.digest, "nbytes": m.nbytes, "tiers": list(m.tiers),
                 "leases": m.leases} for m in client.list()]


@ray.remote(num_cpus=0)  # asks its own node's daemon; must run even on a full node
def _models_on_this_node(socket: str | None, timeout: float) -> list[dict[str, Any]]:
    return node_models(_cluster_socket(socket), timeout=timeout)  # this worker's $TRIMS_SOCKET, from the job's runtime_env


def where(name: str, *, socket: str | os.PathLike | None = None, timeout: float = 10.0) -> dict[str, list[str]]:
    """The alive nodes that hold ``name`` (or its digest) in host memory or on disk, each with
    those tiers, warmest first. Each node's daemon is found as its workers find it (see
    :func:`runtime_env`) unless ``socket`` says where. Nodes are asked in parallel; one whose daemon does not answer
    within ``timeout`` seconds is left out. A model only in the cloud tier is equally far
    from every node, so it places no one."""
    wanted = canonical(name)
    socket_path = os.fspath(socket) if socket is not None else None
    asks = {
        _models_on_this_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(socket_path, timeout): node["NodeID"]
        for node in ray.nodes() if node.get("Alive")
    }
    ready, late = ray.wait(list(asks), num_returns=len(asks), timeout=timeout)
    for ref in late:
        ray.cancel(ref, force=True)
    found: dict[str, list[str]] = {}
    for ref in ready:
        try:
            models = ray.get(ref)
        except ray.exceptions.RayError:  # no daemon there, or it refused us
            continue
        for model in models:
            tiers = [t for t in model["tiers"] if t in _LOCAL_TIERS]
            if wanted in (model["name"], model["digest"]) and tiers:
                found[asks[ref]] = sorted(tiers, key=_LOCAL_TIERS.index)
    return found


def node_affinity(name: str, **where_options: Any) -> NodeAffinitySchedulingStrategy | str:
    """A scheduling strategy for the node where ``name`` is warmest (host memory before disk),
    or ``"DEFAULT"`` if no node holds it locally. The affinity is soft in Ray's sense: the work
    goes elsewhere only if that node has died or could never fit it; if the node is merely
    busy, the work waits there for room (a warm start later rather than a cold one now)."""
    found = where(name, **where_options)
    if not found:
        return "DEFAULT"
    warmest = min(found, key=lambda node: _LOCAL_TIERS.index(found[node][0]))
    return NodeAffinitySchedulingStrategy(warmest, soft=True)
