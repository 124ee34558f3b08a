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

ONNX Runtime's default, every level (``ORT_ENABLE_ALL``), goes further, in ways that depend
on the CPU and on ONNX Runtime's version: it fuses QDQ groups into int8 kernels (without
which a quantized model runs in float, its outputs off by the quantization error), MatMuls
and normalizations into fused kernels, and reorders convolution weights into the blocked
NCHWc layout, whose block follows the CPU's vector width (ResNet-50 runs 1.2x faster in it
here). So a graph saved after it is right only where it was made. Where it runs other operators than
the basic level's graph, the push also stores that graph and the weights it rewrites
(``model.nchwc.onnx``, tensors named ``nchwc/...``: names from when NCHWc was all it did),
with the fingerprint of this ONNX Runtime and CPU: what they make of probe convolutions,
float and quantized (``layout-probe.onnx``). A session whose own ONNX Runtime gives the same
fingerprint uses that graph, any other the portable one.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from .errors import InvalidModel

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
# The graph after every level, right only where EVERY_LEVEL_KEY matches. The stored names are
# those of when only NCHWc convolutions made one; models pushed then are read as ever.
EVERY_LEVEL_GRAPH_FILE = "model.nchwc.onnx"
PROBE_FILE = "layout-probe.onnx"  # convolutions, float and QDQ, whose rewritten weights fingerprint a layout
EVERY_LEVEL_KEY = "trims.onnx.nchwc"  # the weights' metadata: layout_fingerprint() where that graph was made
EVERY_LEVEL_PREFIX = "nchwc/"  # names of the weights that graph alone reads
LAYOUT_MARK = "every-level"  # the graph's own trims.layout metadata
PLACEHOLDER = "trims-weights"  # the "location" every initializer names: the store, not a file
INLINE_BYTES = 1024  # smaller initializers stay in the graph, as onnx's own external-data split does
# ONNX's element types that NumPy lacks, by their ml_dtypes names (TensorProto.DataType values,
# fixed by the ONNX spec): bf16 and fp8 weights are stored as themselves, not widened.
ML_DTYPE_ELEMENT_TYPES = {"bfloat16": 16, "float8_e4m3fn": 17, "float8_e4m3fnuz": 18,
                          "float8_e5m2": 19, "float8_e5m2fnuz": 20}


def split(model_path: Path, directory: Path) -> None:
    """Write ``directory/model.onnx`` (graph) and ``directory/model.safetensors`` (weights), and
    where every level changes the graph, ``model.nchwc.onnx`` and ``layout-probe.onnx``."""
    try:
        import onnx
    except ImportError:
        raise InvalidModel("pushing an .onnx file needs the onnx package: pip install 'trims[onnx]'") from None
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="trims-onnx-optimized-") as scratch:
        optimized, not_optimized = _optimized(model_path, Path(scratch) / "basic", "ORT_ENABLE_BASIC")
        model = _load(optimized, model_path)
        variant = None if not_optimized else _every_level_variant(model_path, Path(scratch) / "every", model.graph)
    if not_optimized:
        log.warning("ONNX Runtime could not load %s to fold its weights (%s); storing the graph as it is. "
                    "Sessions over it fail if an optimization of theirs would rewrite a weight.", model_path,
                    not_optimized)
    tensors: dict[str, np.ndarray] = {}
    _externalize(model_path, model.graph, tensors)
    if not tensors:
        raise InvalidModel(f"{model_path} has no initializers of {INLINE_BYTES} bytes or more to share")
    metadata = {} if variant is None else _store_every_level_variant(model_path, variant, tensors, directory)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=metadata or None)
    onnx.save(model, str(directory / GRAPH_FILE))


def _store_every_level_variant(model_path: Path, variant, tensors: dict[str, np.ndarray], directory: Path) -> dict[str, str]:
    """Add the every-level graph's own weights to ``tensors``, write it and the probe beside
    them, and return the metadata that names its layout; nothing where that cannot be told."""
    import onnx

    probe = _probe_model()
    fingerprint = layout_fingerprint(probe)
    if fingerprint is None:
        return {}
    _externalize(model_path, variant.graph, tensors, rename=EVERY_LEVEL_PREFIX)
    (directory / PROBE_FILE).write_bytes(probe)
    onnx.save(variant, str(directory / EVERY_LEVEL_GRAPH_FILE))
    return {EVERY_LEVEL_KEY: fingerprint}


def _load(path: Path, model_path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises a variety of errors for bad files
        raise InvalidModel(f"{model_path} is not a readable ONNX model: {exc}") from None


def _externalize(model_path: Path, graph, tensors: dict[str, np.ndarray], rename: str | None = None) -> None:
    """Move ``graph``'s initializers of INLINE_BYTES or more into ``tensors``, leaving
    placeholders. With ``rename``, one that differs from the tensor of its name already there
    is stored under a name of its own, which the graph is changed to read."""
    from onnx import numpy_helper

    for initializer in graph.initializer:
        array = np.ascontiguousarray(numpy_helper.to_array(initializer))
        if array.nbytes < INLINE_BYTES:
            continue  # shapes and scalars: shape inference needs them in the graph, and they are tiny
        _check_storable(model_path, initializer, array)
        known = tensors.get(initializer.name)
        if rename is not None and not (known is not None and _same(known, array)):
            name = rename + initializer.name
            while name in tensors:
                name = rename + name
            _rename_input(graph, initializer.name, name)
            initializer.name = name
        tensors[initializer.name] = array
        _make_external(initializer)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _rename_input(graph, old: str, new: str) -> None:
    """Make every reader of ``old`` in ``graph`` and its subgraphs (which see the outer
    scope's initializers) read ``new``."""
    for value in graph.input:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                _rename_input(subgraph, old, new)


def _every_level_variant(model_path: Path, scratch: Path, basic_graph):
    """The model after ONNX Runtime's every level, where that runs other operators than the
    basic level's graph (convolutions in the NCHWc layout, QDQ groups fused into int8
    kernels, MatMul and normalization fusions); None where it changes nothing."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    optimized, failed = _optimized(model_path, scratch, "ORT_ENABLE_ALL")
    if failed:
        return None
    model = onnx.load(str(optimized), load_external_data=False)  # its weights only if it is kept
    if _operators(model.graph) == _operators(basic_graph):
        return None
    load_external_data_for_model(model, str(scratch))
    entry = model.metadata_props.add()
    entry.key, entry.value = "trims.layout", LAYOUT_MARK  # sessions over it can tell (get_modelmeta)
    return model


def _operators(graph) -> collections.Counter:
    return collections.Counter((node.domain, node.op_type) for node in graph.node)


@functools.lru_cache(maxsize=8)
def layout_fingerprint(probe: bytes) -> str | None:
    """What this ONNX Runtime, on this CPU, makes of the probe's convolution weights at every
    level: equal fingerprints, the same layouts. None where it cannot tell."""
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="trims-onnx-probe-") as scratch:
            ort.InferenceSession(probe, _saving(ort, Path(scratch), "ORT_ENABLE_ALL"), providers=["CPUExecutionProvider"])
            reordered = (Path(scratch) / "weights.data").read_bytes()
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own, untyped, errors
        log.info("cannot tell this ONNX Runtime's NCHWc layout (%s); using portable ONNX graphs", exc)
        return None
    return f"onnxruntime {ort.__version__} {hashlib.blake2b(reordered, digest_size=16).hexdigest()}"


def _probe_model() -> bytes:
    """Two 3x3 convolutions over 16 channels, weights inline: one in float, whose NCHWc
    reordering shows the vector width; one in QDQ form, whose int8 kernel's weights show how
    this CPU takes int8 (some convert them to uint8). Old IR and opset versions, so that an
    older ONNX Runtime than the pusher's loads it too."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(16 * 16 * 3 * 3, dtype=np.float32).reshape(16, 16, 3, 3)
    quantized = (np.arange(weights.size) % 255 - 127).astype(np.int8).reshape(weights.shape)
    scalars = {"x_scale": np.float32(0.05), "x_zero": np.uint8(128), "w_scale": np.float32(0.01),
               "w_zero": np.int8(0), "y_scale": np.float32(0.5), "y_zero": np.uint8(128)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "y_scale", "y_zero"], ["q"])]
    shape = [1, 16, 8, 8]
    graph = helper.make_graph(
        nodes, "layout-probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("y", "q")],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(quantized, "wq"),
                     *(numpy_helper.from_array(np.array(v), n) for n, v in scalars.items())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model.SerializeToString()


def _optimized(model_path: Path, scratch: Path, level: str) -> tuple[Path, str | None]:
    """The model after ONNX Runtime's graph optimizations up to ``level``, saved in
    ``scratch``; or the model as it is, and why, where ONNX Runtime cannot load it here (an
    operator of another execution provider, say, or no ONNX at all, which onnx.load then says)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InvalidModel("pushing an .onnx file needs onnxruntime: pip install 'trims[onnx]'") from None
    scratch.mkdir()
    try:
        ort.InferenceSession(str(model_path), _saving(ort, scratch, level), providers=["CPUExecutionProvider"])
        if not _casts_weights(scratch / GRAPH_FILE):
            return scratch / GRAPH_FILE, None
        # ONNX Runtime's CPU kernels have no fp16 MatMul: it casts fp16 weights to fp32 after
        # its constant folding, so one more pass folds them (a session would, into private
        # memory, and over the placeholders it cannot: the weights are not in the graph).
        (scratch / "again").mkdir()
        ort.InferenceSession(str(scratch / GRAPH_FILE), _saving(ort, scratch / "again", level),
                             providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own, untyped, errors
        return model_path, (str(exc).splitlines() or [type(exc).__name__])[0]
    return scratch / "again" / GRAPH_FILE, None


def _casts_weights(graph_path: Path) -> bool:
    """Whether a saved graph converts an initializer with a Cast node: a constant left to fold."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return any(node.op_type == "Cast" and node.input and node.input[0] in weights for node in graph.node)


def _saving(ort, scratch: Path, level: str):
    """Session options that optimize up to ``level`` and save the graph in ``scratch``, its
    initializers of INLINE_BYTES or more in ``scratch/weights.data``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(scratch / GRAPH_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(INLINE_BYTES))  # a model of over 2 GiB fits no protobuf
    options.log_severity_level = 4  # a failure is reported by the caller, once
    return options


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
