"""trims: deep-learning models resident on the node, shared zero-copy and read-only.

    import trims
    with trims.connect() as client:
        with client.open("resnet50:1") as model:   # Mapping[str, numpy.ndarray]
            print(model.digest, model["fc.weight"].shape)

Framework adapters live in their own modules (``trims.torch``); importing ``trims``
imports no framework.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors as _errors
from .client import Client, ModelView, connect
from .errors import *  # noqa: F403 - the whole error tree is public
from .protocol import ModelSummary, PushResult, TensorEntry

__all__ = [
    "__version__",
    "connect",
    "Client",
    "ModelView",
    "ModelSummary",
    "PushResult",
    "TensorEntry",
    *_errors.__all__,
]
