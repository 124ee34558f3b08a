"""ONNX Runtime adapter: a session whose initializers are the shared memory, not copies.

    import trims.onnxruntime
    session = trims.onnxruntime.InferenceSession("classifier:3")
    session.run(None, {"input": batch})

``trims push model.onnx --name NAME`` stores the graph beside the weights (see :mod:`trims.onnx_format`).
Each initializer is an ``OrtValue`` over the mapped segment, given to ONNX Runtime with
``SessionOptions.add_initializer``, which uses it in place. (Measured with onnxruntime 1.32:
``add_external_initializers`` copies every initializer into the session, and so do external
data "files in memory"; ``add_initializer`` does not, but wants the graph loaded from a path,
beside a file for its external-data placeholders.) Weight prepacking is off, since it would
copy each packed weight into every process; ``prepack=True`` trades sharing for ONNX
Runtime's packed matrix layouts. Graph optimization stops at the basic level, which the push
already ran (constant folding and fusions, their weights stored): higher levels rewrite
weights too (NCHWc reorders every convolution's), which would be a private copy in each
process and reads weight data the graph's placeholders do not have. Where the push also
stored the graph after every level, for a CPU and ONNX Runtime laid out as this process's
(:func:`trims.onnx_format.layout_fingerprint`), and the options ask for every level (their
default), the session runs that graph (QDQ groups fused into int8 kernels, convolutions in
the NCHWc layout, fused MatMuls and normalizations), still shared.
Needs the ``onnx`` extra.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from .client import Client, shared_client
from .errors import ModelMismatch
from .onnx_format import (GRAPH_FILE, ML_DTYPE_ELEMENT_TYPES, EVERY_LEVEL_GRAPH_FILE, EVERY_LEVEL_KEY, PLACEHOLDER, PROBE_FILE,
                          layout_fingerprint)

__all__ = ["InferenceSession"]

log = logging.getLogger(__name__)


def InferenceSession(name: str, *, client: Client | None = None, sess_options: ort.SessionOptions | None = None,
                     providers: Sequence[Any] | None = None, prepack: bool = False) -> ort.InferenceSession:  # noqa: N802
    """An ``onnxruntime.InferenceSession`` for the ONNX model pushed as ``name``."""
    client = client or shared_client()
    view = client.open(name)
    files = client.files(view.digest)  # by digest: the graph of the very weights just opened
    if GRAPH_FILE not in files:
        raise ModelMismatch(f"{name} was not pushed from an .onnx file: it has no {GRAPH_FILE}")
    options = sess_options or ort.SessionOptions()
    providers = list(providers or ["CPUExecutionProvider"])
    graph_file = _graph_for(name, files, view.metadata, options, providers)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if int(options.graph_optimization_level) > int(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    values = {n: _ortvalue(view[n]) for n in view}  # no copy: the arrays' memory
    try:
        for tensor_name, value in values.items():
            options.add_initializer(tensor_name, value)
    except RuntimeError:  # ONNX Runtime refuses a second value for a name: options used before
        raise TypeError("these SessionOptions already hold another session's initializers (trims adds the "
                        "model's to them); pass a fresh SessionOptions for each session") from None
    with tempfile.TemporaryDirectory(prefix="trims-onnx-") as directory:
        (Path(directory) / PLACEHOLDER).touch()  # what the placeholders name; never read
        graph = Path(directory) / GRAPH_FILE
        graph.write_bytes(files[graph_file])
        session = ort.InferenceSession(str(graph), sess_options=options,
                                       providers=providers)
    session._trims_weights = (view, values)  # the session reads this memory for as long as it lives
    return session


def _graph_for(name: str, files: dict[str, bytes], metadata: dict[str, str], options: ort.SessionOptions,
               providers: list[Any]) -> str:
    """The graph after every level (CPU kernels) where the push made one that is right here,
    ``options`` ask for every level and the CPU runs the session; else the portable graph."""
    on_cpu = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers)
    every_level = options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    made_for = metadata.get(EVERY_LEVEL_KEY)
    if EVERY_LEVEL_GRAPH_FILE not in files or made_for is None or not (on_cpu and every_level):
        return GRAPH_FILE
    if layout_fingerprint(files.get(PROBE_FILE, b"")) != made_for:
        log.info("%s: its every-level graph was laid out for another CPU or ONNX Runtime (%s); running the portable "
                 "graph, which runs slower; push the model again on this node to lay it out for this one",
                 name, made_for)
        return GRAPH_FILE
    return EVERY_LEVEL_GRAPH_FILE


def _ortvalue(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over ``array``'s memory. ONNX Runtime takes no ml_dtypes arrays (bf16, fp8):
    those go as their bits, an unsigned view of the same memory, with the ONNX type named."""
    element_type = ML_DTYPE_ELEMENT_TYPES.get(array.dtype.name)
    if element_type is None:
        return ort.OrtValue.ortvalue_from_numpy(array)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(f"u{array.itemsize}"), element_type)
