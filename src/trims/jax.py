"""JAX adapter: a model's tensors as ``jax.Array``s over the node's shared copy.

    import trims.jax
    params = trims.jax.load_params("vit:3")        # nested dicts, as Flax modules take them
    weights = trims.jax.load_state_dict("vit:3")   # flat: tensor name -> jax.Array

On the CPU the arrays are the daemon's memory, mapped into this process: ``jax.device_put``
of a NumPy array aligned to 64 bytes (trims aligns every tensor so) makes an XLA buffer over
that memory instead of a copy, and JAX arrays are immutable, so nothing writes to it. The
arrays keep the model's lease alive for as long as any of them exists. A sharding over
several CPU devices shares it too, each shard a view of the one copy.

On any other device (``device=`` a GPU, a sharding, a tree of them shaped like the params, or
JAX's default device where that is not the CPU) each tensor is copied there from the shared
host copy, no file read; the lease ends once the copies are made. With 64-bit types off (JAX's
default), I64, U64 and F64 tensors become 32-bit copies, as ``jnp.asarray`` makes them (said
at INFO on the ``trims.jax`` logger). Packed sub-byte tensors (F4, F6_*) come as their raw
bytes, as from :mod:`trims.numpy`. Needs the ``jax`` extra.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from .client import Client, ModelView, shared_client
from .errors import ModelMismatch
from .numpy import state_dict_from_view as numpy_views
from .torch_format import refuse_as_tensors

__all__ = ["load_state_dict", "load_params", "state_dict_from_view", "LazyPlacement"]

log = logging.getLogger(__name__)

Placement = Any  # a jax.Device, a jax.sharding.Sharding, or None for JAX's default device


def load_state_dict(name: str, *, client: Client | None = None, device: Placement = None) -> dict[str, jax.Array]:
    """The model's tensors by name, over the shared memory on the CPU (copies on another device)."""
    view = (client or shared_client()).open(name)
    refuse_as_tensors(name, view.metadata)
    return state_dict_from_view(view, device=device)


def load_params(name: str, *, client: Client | None = None, device: Placement = None,
                sep: str = ".") -> dict[str, Any]:
    """The model's tensors as nested dicts, a name ``encoder.layer_0.kernel`` becoming
    ``params["encoder"]["layer_0"]["kernel"]``: the pytree Flax's ``apply`` takes, from
    weights saved flattened with ``flax.traverse_util.flatten_dict(params, sep=".")``.
    ``device`` may be a tree of shardings shaped like the result."""
    view = (client or shared_client()).open(name)
    return _put(view.name, _nest(_host_arrays(view), sep, view.name), device)


def state_dict_from_view(view: ModelView, *, device: Placement = None) -> dict[str, jax.Array]:
    """Every tensor of an open host view as a ``jax.Array`` on ``device``."""
    return _put(view.name, _host_arrays(view), device)


def _host_arrays(view: ModelView) -> dict[str, np.ndarray]:
    if view.device is not None:
        raise TypeError(f"{view.name} is open in GPU memory, which trims.jax does not map: open it without a "
                        "device and pass device= to trims.jax, which copies it onto the GPU from the host copy")
    return numpy_views(view)  # read-only: JAX arrays are immutable, so nothing is copied for repeats


def _put(name: str, host: dict[str, Any], device: Placement) -> dict[str, Any]:
    arrays = jax.device_put(host, device)  # one call for the tree: XLA overlaps the copies a GPU needs
    _report_copies(name, jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(arrays))
    return arrays


def _nest(flat: dict[str, np.ndarray], sep: str, name: str) -> dict[str, Any]:
    """``{"a.b": x}`` as ``{"a": {"b": x}}``; refuses names that are both a tensor and a group."""
    if not sep:
        raise ValueError("sep must be the text between the levels of a name, such as '.' or '/'")
    tree: dict[str, Any] = {}
    for key in sorted(flat):  # a name comes before every name it begins: a clash shows at a parent
        *parents, leaf = key.split(sep)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ModelMismatch(f"{name}: tensor {key!r} lies under {part!r}, itself a tensor, so the names do "
                                    f"not nest at {sep!r}: pass a sep= they do nest at, or use load_state_dict "
                                    "for the flat names")
        node[leaf] = flat[key]
    return tree


class LazyPlacement:
    """Puts host tensors onto JAX's default device one at a time, as ``safe_open``'s
    ``get_tensor`` asks for them, and says once per model (at the first) when JAX narrowed a
    64-bit tensor into a copy of this process's own: the caller counted on none."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._said = False

    def __call__(self, host: np.ndarray) -> jax.Array:
        array = jax.device_put(host)  # over the shared memory on the CPU, else a copy
        if not self._said and array.dtype != host.dtype and _on_cpu(array):
            self._said = True
            log.info("%s: tensors of 64-bit types are copied into this process, not shared (the first: %s as %s): "
                     "%s", self._name, host.dtype, array.dtype, _NARROWING)
        return array


_NARROWING = ("JAX narrows 64-bit types unless jax_enable_x64 is on; turn it on "
              "(jax.config.update('jax_enable_x64', True)) to share them")


def _report_copies(name: str, host: list[np.ndarray], arrays: list[jax.Array]) -> None:
    """Say, once per load, how much went into memory of this process's own on the CPU: the
    caller counted on none."""
    copied = [(h, a) for h, a in zip(host, arrays) if h.nbytes and _on_cpu(a) and not _aliases(a, h)]
    if copied:
        nbytes = sum(h.nbytes for h, _ in copied)
        log.info("%s: %d of %d tensors (%d bytes, e.g. %s as %s) were copied into this process, not shared: %s",
                 name, len(copied), len(arrays), nbytes, copied[0][0].dtype, copied[0][1].dtype, _NARROWING)


def _on_cpu(array: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in array.devices())


def _aliases(array: jax.Array, host: np.ndarray) -> bool:
    """Whether every shard of ``array`` lies in ``host``'s memory."""
    start, end = host.ctypes.data, host.ctypes.data + host.nbytes
    return all(start <= shard.data.unsafe_buffer_pointer() < end for shard in array.addressable_shards)
