"""NumPy adapter, the neutral form: a model's tensors as arrays over the shared memory.

    import trims.numpy
    weights = trims.numpy.load_state_dict("resnet50:1")   # dict[str, numpy.ndarray]

Arrays are read-only views of the daemon's segments; bf16 and fp8 come as ``ml_dtypes``
types, packed fp4/fp6 as raw bytes. They keep the model's lease alive while they exist.
"""

from __future__ import annotations

import numpy as np

from .client import Client, ModelView, shared_client
from .torch_format import refuse_as_tensors

__all__ = ["load_state_dict", "state_dict_from_view"]


def load_state_dict(name: str, *, client: Client | None = None) -> dict[str, np.ndarray]:
    view = (client or shared_client()).open(name)
    refuse_as_tensors(name, view.metadata)
    return state_dict_from_view(view)


def state_dict_from_view(view: ModelView, *, writable: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of an open view. ``writable`` arrays may be written in place: the mapping
    is private, so a write copies the page it touches into this process and nowhere else; an
    array whose bytes an earlier one shares (``view.repeats``) is a copy of its own."""
    arrays = {name: view[name] for name in view}
    if writable:
        for name, array in arrays.items():
            if name in view.repeats:
                arrays[name] = array.copy()
            else:
                array.flags.writeable = True
    return arrays
