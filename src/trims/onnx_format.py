"""Splitting an ONNX model into a graph and its weights, for ``trims push model.onnx``.

The initializers of the main graph (those of 1 KiB or more) become tensors of a safetensors
file, stored and shared like any model's; the graph keeps them as declared-but-external
placeholders, which :func:`trims.onnxruntime.InferenceSession` fills with views of the
shared memory. Runs in
the client, which reads the file with its own rights. Needs the ``onnx`` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InvalidModel

GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
PLACEHOLDER = "trims-weights"  # the "location" every initializer names: the store, not a file
INLINE_BYTES = 1024  # smaller initializers stay in the graph, as onnx's own external-data split does


def split(model_path: Path, directory: Path) -> None:
    """Write ``directory/model.onnx`` (graph) and ``directory/model.safetensors`` (weights)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise InvalidModel("pushing an .onnx file needs the onnx package: pip install 'trims[onnx]'") from None
    from safetensors.numpy import save_file

    try:
        model = onnx.load(str(model_path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises a variety of errors for bad files
        raise InvalidModel(f"{model_path} is not a readable ONNX model: {exc}") from None
    tensors = {}
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.nbytes < INLINE_BYTES:
            continue  # shapes and scalars: shape inference needs them in the graph, and they are tiny
        if array.dtype.kind not in "biufc":
            raise InvalidModel(f"{model_path}: initializer {initializer.name!r} has dtype {array.dtype}, "
                               "which trims cannot store yet")
        tensors[initializer.name] = np.ascontiguousarray(array)
        _make_external(initializer)
    if not tensors:
        raise InvalidModel(f"{model_path} has no initializers of {INLINE_BYTES} bytes or more to share")
    save_file(tensors, str(directory / WEIGHTS_FILE))
    onnx.save(model, str(directory / GRAPH_FILE))


def _make_external(initializer) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        initializer.ClearField(field)
    del initializer.external_data[:]
    initializer.data_location = TensorProto.EXTERNAL
    location = initializer.external_data.add()
    location.key, location.value = "location", PLACEHOLDER
