"""JAX adapter: a model's tensors as ``jax.Array``s over the node's shared copy.

    import trims.jax
    params = trims.jax.load_params("vit:3")        # nested dicts, as Flax modules take them
    weights = trims.jax.load_state_dict("vit:3")   # flat: tensor name -> jax.Array

On the CPU the arrays are the daemon's memory, mapped into this process: ``jax.device_put``
of a read-only NumPy array aligned to 64 bytes (trims aligns every tensor so) makes an XLA
buffer over that memory instead of a copy, and JAX arrays are immutable, so nothing ever
writes to it. The arrays keep the model's lease alive for as long as any of them exists.

On any other device (``device=`` a GPU or a sharding, or JAX's default device where that is
not the CPU) each tensor is copied there from the shared host copy: no file is read and no
host copy of this process's own is made. With 64-bit types off (JAX's default), I64, U64,
F64 and C128 tensors become 32-bit copies, as ``jnp.asarray`` makes them. Packed sub-byte
tensors (F4, F6_*) come as their raw bytes, as from :mod:`trims.numpy`. Needs the ``jax``
extra.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from .client import Client, ModelView, shared_client
from .errors import ModelMismatch

__all__ = ["load_state_dict", "load_params", "state_dict_from_view"]

log = logging.getLogger(__name__)

Placement = Any  # a jax.Device, a jax.sharding.Sharding, or None for JAX's default device


def load_state_dict(name: str, *, client: Client | None = None, device: Placement = None) -> dict[str, jax.Array]:
    """The model's tensors by name, over the shared memory on the CPU (copies on another device)."""
    return state_dict_from_view((client or shared_client()).open(name), device=device)


def load_params(name: str, *, client: Client | None = None, device: Placement = None,
                sep: str = ".") -> dict[str, Any]:
    """The model's tensors as nested dicts, a name ``encoder.layer_0.kernel`` becoming
    ``params["encoder"]["layer_0"]["kernel"]``: the pytree Flax's ``apply`` takes, from
    weights saved flattened with ``flax.traverse_util.flatten_dict(params, sep=".")``."""
    return nest(load_state_dict(name, client=client, device=device), sep, name)


def state_dict_from_view(view: ModelView, *, device: Placement = None) -> dict[str, jax.Array]:
    """Every tensor of an open host view as a ``jax.Array`` on ``device``."""
    host = {name: view[name] for name in view}
    arrays = jax.device_put(host, device)  # one call: XLA overlaps the copies a GPU needs
    _report_copies(view.name, host, arrays)
    return arrays


def nest(flat: dict[str, Any], sep: str, name: str) -> dict[str, Any]:
    """``{"a.b": x}`` as ``{"a": {"b": x}}``; refuses names that are both a leaf and a prefix."""
    tree: dict[str, Any] = {}
    for key in sorted(flat):
        *parents, leaf = key.split(sep)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ModelMismatch(f"{name}: tensor {key!r} lies under {part!r}, itself a tensor, so its "
                                    f"names do not nest at {sep!r}; use load_state_dict for the flat names")
        if leaf in node:
            raise ModelMismatch(f"{name}: {key!r} is both a tensor and a group of tensors at {sep!r}; "
                                "use load_state_dict for the flat names")
        node[leaf] = flat[key]
    return tree


def _report_copies(name: str, host: dict[str, np.ndarray], arrays: dict[str, jax.Array]) -> None:
    """Say, once per load, how much went into memory of this process's own on the CPU: the
    caller counted on none."""
    copied = [k for k, a in arrays.items() if _on_cpu(a) and host[k].nbytes and not _aliases(a, host[k])]
    if copied:
        nbytes = sum(host[k].nbytes for k in copied)
        log.info("%s: %d of %d tensors (%d bytes, e.g. %s, %s) were copied into this process, not shared: JAX "
                 "narrows 64-bit types unless jax_enable_x64 is on, and a tensor split over several devices is "
                 "copies", name, len(copied), len(arrays), nbytes, copied[0], host[copied[0]].dtype)


def _on_cpu(array: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in array.devices())


def _aliases(array: jax.Array, host: np.ndarray) -> bool:
    try:
        return array.unsafe_buffer_pointer() == host.ctypes.data
    except Exception:  # noqa: BLE001 - a sharded array has no one pointer; it is not aliased then
        return False
