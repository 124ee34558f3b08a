"""Splitting an ONNX model into a graph and its weights, for ``trims push model.onnx``.

The initializers of the main graph (those of 1 KiB or more) become tensors of a safetensors
file, stored and shared like any model's; the graph keeps them as declared-but-external
placeholders, which :func:`trims.onnxruntime.InferenceSession` fills with views of the
shared memory. Runs in the client, which reads the file with its own rights. Needs the
``onnx`` extra.

ONNX Runtime's graph optimizations read and rewrite weights (constant folding, Conv+BN
fusion): in a session they would make a private copy of each rewritten weight, and they read
the graph's own initializer data, which the placeholders do not have. So the basic level, the
one ONNX Runtime documents as hardware-independent and safe to save, runs here, once, and the
weights it produces are what is stored and shared; sessions run no optimization that rewrites
weights (see :mod:`trims.onnxruntime`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .errors import InvalidModel

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
PLACEHOLDER = "trims-weights"  # the "location" every initializer names: the store, not a file
INLINE_BYTES = 1024  # smaller initializers stay in the graph, as onnx's own external-data split does
# ONNX's element types that NumPy lacks, by their ml_dtypes names (TensorProto.DataType values,
# fixed by the ONNX spec): bf16 and fp8 weights are stored as themselves, not widened.
ML_DTYPE_ELEMENT_TYPES = {"bfloat16": 16, "float8_e4m3fn": 17, "float8_e4m3fnuz": 18,
                          "float8_e5m2": 19, "float8_e5m2fnuz": 20}


def split(model_path: Path, directory: Path) -> None:
    """Write ``directory/model.onnx`` (graph) and ``directory/model.safetensors`` (weights)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise InvalidModel("pushing an .onnx file needs the onnx package: pip install 'trims[onnx]'") from None
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="trims-onnx-optimized-") as scratch:
        optimized, not_optimized = _optimized(model_path, Path(scratch))
        try:
            model = onnx.load(str(optimized), load_external_data=True)
        except Exception as exc:  # noqa: BLE001 - onnx raises a variety of errors for bad files
            raise InvalidModel(f"{model_path} is not a readable ONNX model: {exc}") from None
    if not_optimized:
        log.warning("ONNX Runtime could not load %s to fold its weights (%s); storing the graph as it is. "
                    "Sessions over it fail if an optimization of theirs would rewrite a weight.", model_path,
                    not_optimized)
    tensors = {}
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.nbytes < INLINE_BYTES:
            continue  # shapes and scalars: shape inference needs them in the graph, and they are tiny
        _check_storable(model_path, initializer, array)
        tensors[initializer.name] = np.ascontiguousarray(array)
        _make_external(initializer)
    if not tensors:
        raise InvalidModel(f"{model_path} has no initializers of {INLINE_BYTES} bytes or more to share")
    save_file(tensors, str(directory / WEIGHTS_FILE))
    onnx.save(model, str(directory / GRAPH_FILE))


def _optimized(model_path: Path, scratch: Path) -> tuple[Path, str | None]:
    """The model after ONNX Runtime's basic graph optimizations, saved in ``scratch``; or the
    model as it is, and why, where ONNX Runtime cannot load it here (an operator of another
    execution provider, say, or no ONNX at all, which onnx.load then says)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InvalidModel("pushing an .onnx file needs onnxruntime: pip install 'trims[onnx]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(scratch / GRAPH_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(INLINE_BYTES))  # a model of over 2 GiB fits no protobuf
    options.log_severity_level = 4  # a failure is reported below, once
    try:
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own, untyped, errors
        return model_path, (str(exc).splitlines() or [type(exc).__name__])[0]
    return scratch / GRAPH_FILE, None


def _check_storable(model_path: Path, initializer, array: np.ndarray) -> None:
    from onnx import TensorProto

    declared = TensorProto.DataType.Name(initializer.data_type)
    if initializer.data_type in ML_DTYPE_ELEMENT_TYPES.values():
        if ML_DTYPE_ELEMENT_TYPES.get(array.dtype.name) != initializer.data_type:  # onnx < 1.18 misreads them
            raise InvalidModel(f"{model_path}: initializer {initializer.name!r} is {declared}, which this onnx "
                               f"package reads as {array.dtype}; pushing it needs onnx 1.18 or later (pip install -U onnx)")
    elif array.dtype.kind not in "biufc":
        raise InvalidModel(f"{model_path}: initializer {initializer.name!r} is {declared}, "
                           "which trims cannot store yet")


def _make_external(initializer) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        initializer.ClearField(field)
    del initializer.external_data[:]
    initializer.data_location = TensorProto.EXTERNAL
    location = initializer.external_data.add()
    location.key, location.value = "location", PLACEHOLDER
