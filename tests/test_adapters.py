"""Adapters with the same verbs: Hugging Face, NumPy and ONNX Runtime, outputs identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trims
import trims.numpy
import trims.transformers

from .conftest import run_python
from .models import build, output_of
from .test_torch import only_repeats_copied


@pytest.mark.parametrize("kind", ["gpt2", "bert", "resnet", "llama", "vit"])
def test_from_pretrained_needs_only_the_tag(kind, shared_daemon, tmp_path):
    original, _ = build(kind, tmp_path / kind)
    client = shared_daemon.client()
    client.push(tmp_path / kind, f"adapters/{kind}")
    model = trims.transformers.from_pretrained(f"adapters/{kind}", client=client)
    assert type(model) is type(original) and not model.training
    assert torch.equal(output_of(model, kind), output_of(original, kind))
    with client.open(f"adapters/{kind}") as view:
        assert only_repeats_copied(list(model.parameters()), view)


def test_weights_in_the_modules_own_layout_are_not_renamed(shared_daemon, tmp_path):
    """The other way to store a ViT: its state_dict as the module names it, beside its config."""
    from safetensors.torch import save_file

    original, _ = build("vit", tmp_path / "saved")
    directory = tmp_path / "own-layout"
    original.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, directory / "model.safetensors")
    client = shared_daemon.client()
    client.push(directory, "adapters/vit-own-layout")
    model = trims.transformers.from_pretrained("adapters/vit-own-layout", client=client)
    assert torch.equal(output_of(model, "vit"), output_of(original, "vit"))


def test_stored_tensors_transformers_ignores_are_ignored(shared_daemon, tmp_path):
    """Older checkpoints store what today's modules have no place for (GPT-2's causal masks
    ``attn.bias``, without the ``transformer.`` prefix as the Hub's gpt2 is saved) or compute
    themselves (BERT's ``position_ids``): transformers loads them, and so does trims."""
    import transformers
    from safetensors.torch import load_file, save_file

    client = shared_daemon.client()
    for kind, edit in (("gpt2", _as_an_old_gpt2_checkpoint), ("bert", _as_an_old_bert_checkpoint)):
        build(kind, tmp_path / kind)
        state = load_file(tmp_path / kind / "model.safetensors")
        save_file(edit(state), tmp_path / kind / "model.safetensors", metadata={"format": "pt"})
        expected = transformers.AutoModel.from_pretrained(tmp_path / kind)  # the reference: transformers' own
        client.push(tmp_path / kind, f"adapters/old-{kind}")
        model = trims.transformers.from_pretrained(f"adapters/old-{kind}", client=client,
                                                   model_class=type(expected))
        assert torch.equal(output_of(model, kind), output_of(expected, kind))


def _as_an_old_gpt2_checkpoint(state: dict) -> dict:
    old = {k.removeprefix("transformer."): v.clone() for k, v in state.items() if k.startswith("transformer.")}
    for key in [k for k in old if k.endswith(".attn.c_attn.weight")]:
        old[key.replace("c_attn.weight", "bias")] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    return old


def _as_an_old_bert_checkpoint(state: dict) -> dict:
    return {**{k: v.clone() for k, v in state.items()}, "bert.embeddings.position_ids": torch.arange(64).view(1, 64)}


def test_tied_weights_and_snapshot(shared_daemon, tmp_path):
    build("gpt2", tmp_path / "gpt2")
    client = shared_daemon.client()
    client.push(tmp_path / "gpt2", "adapters/gpt2-tied")
    model = trims.transformers.from_pretrained("adapters/gpt2-tied", client=client)
    assert model.lm_head.weight is model.transformer.wte.weight
    directory = trims.transformers.snapshot("adapters/gpt2-tied", client=client)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json"]
    assert trims.transformers.snapshot("adapters/gpt2-tied", client=client) == directory  # written once


def test_numpy_adapter(shared_daemon, tmp_path):
    original, _ = build("bert", tmp_path / "bert")
    client = shared_daemon.client()
    client.push(tmp_path / "bert", "adapters/bert-np")
    arrays = trims.numpy.load_state_dict("adapters/bert-np", client=client)
    expected = {k: v.numpy() for k, v in original.state_dict().items() if k in arrays}
    assert set(expected) == set(arrays)
    assert all(np.array_equal(arrays[k], expected[k]) for k in arrays)
    assert not any(a.flags.writeable for a in arrays.values())


def test_arrays_stay_readable_to_atexit_handlers_and_daemon_threads(shared_daemon, tmp_path):
    """The mappings are not unmapped at interpreter exit (the kernel does it): a handler
    registered before the first load, or a daemon thread still computing, read them then."""
    from safetensors.numpy import save_file

    save_file({"w": np.ones(1 << 20, dtype=np.float32)}, str(tmp_path / "m.safetensors"))
    shared_daemon.client().push(tmp_path / "m.safetensors", "adapters/at-exit")
    code = """
        import atexit, threading
        import numpy as np
        import trims.numpy
        held = {}
        # Registered before the first load: atexit runs handlers last in, first out
        atexit.register(lambda: print("at exit", float(held["w"].sum()), flush=True))
        w = held["w"] = trims.numpy.load_state_dict("adapters/at-exit")["w"]
        def compute():
            while True:
                np.add(w, 1.0)
        threading.Thread(target=compute, daemon=True).start()
        print("done", flush=True)
    """
    for _ in range(2):
        done = run_python(code, shared_daemon.env)
        assert done.stdout.split() == ["done", "at", "exit", str(float(1 << 20))]


def tiny_onnx(path, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A two-layer MLP as an ONNX file; returns an input for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((64, 128)).astype(dtype), rng.standard_normal(128).astype(dtype)
    w2 = rng.standard_normal((128, 10)).astype(dtype)
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = np.array([1, 64], dtype=np.int64)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", element, [64])],
        [helper.make_tensor_value_info("y", element, [1, 10])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (shape, "shape"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return rng.standard_normal(64).astype(dtype)


def test_onnxruntime_session_runs_on_shared_initializers(shared_daemon, tmp_path):
    import onnxruntime as ort

    import trims.onnxruntime

    x = tiny_onnx(tmp_path / "mlp.onnx")
    client = shared_daemon.client()
    pushed = client.push(tmp_path / "mlp.onnx", "adapters/mlp")
    assert pushed.tensors == 2  # shape and bias stay inline; every level's fused graph reads the same weights
    assert set(client.info("adapters/mlp").files) == {"model.onnx", "model.nchwc.onnx", "layout-probe.onnx"}
    def plain(prepack: bool) -> np.ndarray:
        options = ort.SessionOptions()
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(tmp_path / "mlp.onnx"), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    session = trims.onnxruntime.InferenceSession("adapters/mlp", client=client)
    assert np.array_equal(session.run(None, {"x": x})[0], plain(prepack=False))  # same kernels, same bits
    view, values = session._trims_weights
    for value in values.values():  # every initializer is the mapped segment, not a copy
        assert any(value.data_ptr() == np.frombuffer(s, np.uint8).ctypes.data + e.offset
                   for s in view.segments for e in view.index.values())
    packed = trims.onnxruntime.InferenceSession("adapters/mlp", client=client, prepack=True)
    assert np.array_equal(packed.run(None, {"x": x})[0], plain(prepack=True))
    options = ort.SessionOptions()
    trims.onnxruntime.InferenceSession("adapters/mlp", client=client, sess_options=options)
    with pytest.raises(TypeError, match="pass a fresh SessionOptions"):
        trims.onnxruntime.InferenceSession("adapters/mlp", client=client, sess_options=options)
    import trims.torch

    for load in (trims.torch.load_checkpoint, trims.torch.load_exported):  # the mistake names the right loader
        with pytest.raises(trims.InvalidModel, match="ONNX model; run it with trims.onnxruntime.InferenceSession"):
            load("adapters/mlp", client=client)


def test_an_fp16_onnx_model_runs_as_onnx_runtime_runs_it(shared_daemon, tmp_path):
    """ONNX Runtime's CPU kernels cast fp16 weights to fp32, after its constant folding: the
    push folds those casts too, so a session has no weight left to fold (it failed to open)."""
    import onnxruntime as ort

    import trims.onnxruntime

    x = tiny_onnx(tmp_path / "half.onnx", seed=3, dtype=np.float16)
    client = shared_daemon.client()
    client.push(tmp_path / "half.onnx", "adapters/mlp-fp16")
    plain = ort.InferenceSession(str(tmp_path / "half.onnx"), providers=["CPUExecutionProvider"])
    session = trims.onnxruntime.InferenceSession("adapters/mlp-fp16", client=client)
    assert np.allclose(session.run(None, {"x": x})[0], plain.run(None, {"x": x})[0], rtol=1e-3, atol=1e-3)


def test_a_directory_holding_an_onnx_model_says_to_push_the_onnx_file(shared_daemon, tmp_path):
    """Pushed as a side file beside safetensors weights, the whole .onnx (weights inline) would
    be stored and shared with no one: the push says what to do instead."""
    from safetensors.numpy import save_file

    directory = tmp_path / "mixed"
    directory.mkdir()
    tiny_onnx(directory / "Model.ONNX")
    save_file({"w": np.ones(4, np.float32)}, str(directory / "model.safetensors"))
    client = shared_daemon.client()
    with pytest.raises(trims.InvalidModel, match="push the .onnx file itself"):
        client.push(directory, "adapters/mixed")
    assert client.push(directory / "Model.ONNX", "adapters/upper-case-onnx").tensors == 2


def test_an_onnx_session_serves_bf16_and_fp8_initializers_as_they_are(shared_daemon, tmp_path):
    """NumPy lacks bf16 and fp8: they are stored as themselves (not widened to float32) and
    given to ONNX Runtime as their bits in place, with the ONNX type named. (Embedding tables
    here: a weight cast straight to float32 is folded at push, as ONNX Runtime would.)"""
    import ml_dtypes
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import trims.onnxruntime

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    w2 = rng.standard_normal((64, 64)).astype(ml_dtypes.float8_e4m3fn)
    nodes = [helper.make_node("Gather", ["w1", "ids"], ["e1"]), helper.make_node("Cast", ["e1"], ["f1"], to=TensorProto.FLOAT),
             helper.make_node("DequantizeLinear", ["w2", "scale"], ["f2"]), helper.make_node("Gather", ["f2", "ids"], ["e2"]),
             helper.make_node("Add", ["f1", "e2"], ["y"])]
    graph = helper.make_graph(nodes, "low-precision", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                              initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                                           numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "low.onnx"))
    client = shared_daemon.client()
    client.push(tmp_path / "low.onnx", "adapters/low")
    assert client.info("adapters/low").dtypes == {"BF16": 1, "F8_E4M3": 1}

    ids = np.array([0, 5, 63, 5], dtype=np.int64)
    session = trims.onnxruntime.InferenceSession("adapters/low", client=client)
    plain = ort.InferenceSession(str(tmp_path / "low.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"ids": ids})[0], plain.run(None, {"ids": ids})[0])
    view, values = session._trims_weights
    assert view["w1"].dtype == ml_dtypes.bfloat16 and values["w1"].data_type() == "tensor(bfloat16)"
    assert values["w2"].data_type() == "tensor(float8e4m3fn)"
    assert values["w1"].data_ptr() == view["w1"].ctypes.data  # the mapped segment, not a copy

    packed = np.ones((64, 64), dtype=ml_dtypes.int4)  # ONNX's INT4: packed two to a byte
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "int4", [],
                              [helper.make_tensor_value_info("y", TensorProto.INT4, [64, 64])],
                              initializer=[numpy_helper.from_array(packed, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "int4.onnx"))
    with pytest.raises(trims.InvalidModel, match="initializer 'w' is INT4, which trims cannot store yet"):
        client.push(tmp_path / "int4.onnx", "adapters/int4")


def test_an_onnx_graph_onnx_runtime_cannot_load_here_is_stored_as_it_is(shared_daemon, tmp_path, caplog):
    """An operator this machine's ONNX Runtime lacks (another execution provider's, say)
    leaves nothing to fold at push: the graph is stored unoptimized, and the push says so."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Blend", ["x", "w"], ["y"], domain="com.example")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])],
                              initializer=[numpy_helper.from_array(np.ones(1024, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with caplog.at_level("WARNING", logger="trims.onnx_format"):
        assert shared_daemon.client().push(tmp_path / "custom.onnx", "adapters/custom").tensors == 1
    assert "could not load" in caplog.text and "storing the graph as it is" in caplog.text


def test_weights_onnx_runtime_would_rewrite_are_rewritten_once_at_push(shared_daemon, tmp_path):
    """Conv+BatchNorm fusion and constant folding read and rewrite weights: in every session
    that would be a private copy of each (and read data the stored graph does not carry), so
    the push runs them once and stores what they produce; sessions go no further than that."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import trims.onnxruntime

    rng, channels = np.random.default_rng(0), 256
    weights = {"conv": rng.standard_normal((channels, channels, 1, 1)), "linear": rng.standard_normal((channels, channels)),
               **{n: np.abs(rng.standard_normal(channels)) + 0.5 for n in ("scale", "bias", "mean", "var")}}
    nodes = [helper.make_node("Conv", ["x", "conv"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Flatten", ["r"], ["flat"]),
             helper.make_node("Transpose", ["linear"], ["linear_t"]), helper.make_node("MatMul", ["flat", "linear_t"], ["y"])]
    graph = helper.make_graph(nodes, "conv-bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels])],
                              initializer=[numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "cnn.onnx"))
    client = shared_daemon.client()
    client.push(tmp_path / "cnn.onnx", "adapters/cnn")
    with client.open("adapters/cnn") as view:  # the portable graph's: the NCHWc graph's are named nchwc/...
        assert len([n for n in view if not n.startswith("nchwc/")]) == 3  # the fused conv's weight, bias; the matrix

    x = rng.standard_normal((1, channels, 1, 1), dtype=np.float32)
    expected = ort.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    options = ort.SessionOptions()  # ORT_ENABLE_ALL, ONNX Runtime's default
    session = trims.onnxruntime.InferenceSession("adapters/cnn", client=client, sess_options=options)
    assert np.allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-3)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


SESSION_MEMORY = """
import numpy as np, onnxruntime, trims.onnxruntime
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("Pss_Anon:")) * 1024
before = anon()
session = trims.onnxruntime.InferenceSession("adapters/wide")
session.run(None, {"x": np.ones((1, 1024), dtype=np.float32)})
print(anon() - before)
"""


def test_an_onnx_session_holds_no_copy_of_its_weights(shared_daemon, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .conftest import run_python

    weights = [np.random.default_rng(i).standard_normal((1024, 1024), dtype=np.float32) for i in range(4)]  # 16 MiB
    nodes = [helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"a{i + 1}"]) for i in range(4)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("a0", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("a4", TensorProto.FLOAT, [1, 1024])],
                              initializer=[numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "wide.onnx"))
    shared_daemon.client().push(tmp_path / "wide.onnx", "adapters/wide")
    growth = int(run_python(SESSION_MEMORY.replace('"x"', '"a0"'), shared_daemon.env).stdout.split()[-1])
    assert growth < 16 * 2**20 / 4  # private memory grew by far less than the 16 MiB of weights


def tiny_cnn(path, channels: int = 64, layers: int = 2) -> np.ndarray:
    """A stack of 3x3 convolutions, ReLU between; returns an input for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i in range(layers):
        nodes += [helper.make_node("Conv", [f"a{i}", f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"a{i + 1}"])]
        weights += [numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.05,
                                            f"w{i}"),
                    numpy_helper.from_array(rng.standard_normal(channels * 4, dtype=np.float32)[:channels], f"b{i}")]
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("a0", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(f"a{layers}", TensorProto.FLOAT, shape)], initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return rng.standard_normal(shape, dtype=np.float32)


def _push_with_nchwc(client, path, name):
    from trims.onnx_format import EVERY_LEVEL_GRAPH_FILE

    client.push(path, name)
    if EVERY_LEVEL_GRAPH_FILE not in client.info(name).files:
        pytest.skip("this CPU or ONNX Runtime has no NCHWc convolution kernels")


def test_convolutions_run_in_this_cpus_nchwc_layout_from_weights_stored_for_it(shared_daemon, tmp_path, monkeypatch,
                                                                               caplog):
    """ONNX Runtime's layout level reorders convolution weights for this CPU's vector width:
    the push stores that graph and its weights too, for sessions whose ONNX Runtime lays
    them out the same; any other session, or one asking for less, runs the portable graph."""
    import onnxruntime as ort

    import trims.onnxruntime

    x = tiny_cnn(tmp_path / "cnn.onnx")
    client = shared_daemon.client()
    _push_with_nchwc(client, tmp_path / "cnn.onnx", "adapters/nchwc")
    assert set(client.info("adapters/nchwc").files) == {"model.onnx", "model.nchwc.onnx", "layout-probe.onnx"}
    with client.open("adapters/nchwc") as view:
        reordered = [n for n in view if n.startswith("nchwc/")]  # the NCHWc graph's own: each conv's weights
        assert len(reordered) == 2 and sorted(set(view) - set(reordered)) == ["w0", "w1"]
    expected = ort.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"a0": x})[0]

    def layout_of(session):
        assert np.allclose(session.run(None, {"a0": x})[0], expected, rtol=1e-4, atol=1e-4)
        return session.get_modelmeta().custom_metadata_map.get("trims.layout", "portable")

    assert layout_of(trims.onnxruntime.InferenceSession("adapters/nchwc", client=client)) == "every-level"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert layout_of(trims.onnxruntime.InferenceSession("adapters/nchwc", client=client, sess_options=options)) == "portable"
    monkeypatch.setattr(trims.onnxruntime, "layout_fingerprint", lambda probe: "onnxruntime 9.9 another-cpu")
    with caplog.at_level("INFO", logger="trims.onnxruntime"):
        assert layout_of(trims.onnxruntime.InferenceSession("adapters/nchwc", client=client)) == "portable"
    assert "laid out for another CPU or ONNX Runtime" in caplog.text


def test_a_quantized_qdq_model_runs_fused_int8_kernels_as_onnx_runtime_runs_it(shared_daemon, tmp_path):
    """quantize_static's QDQ form runs in float at the basic level (several times slower, and
    off by the quantization error); every level fuses it into int8 kernels over the same
    int8 weights. The push stores that graph: sessions run it, bit for bit as ONNX Runtime's own."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import trims.onnxruntime

    x = tiny_cnn(tmp_path / "cnn.onnx")

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"a0": np.random.default_rng(i).standard_normal(x.shape, dtype=np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(tmp_path / "cnn.onnx"), str(tmp_path / "qdq.onnx"), Calibration(), quant_format=QuantFormat.QDQ,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    client = shared_daemon.client()
    client.push(tmp_path / "qdq.onnx", "adapters/qdq")
    assert "model.nchwc.onnx" in client.info("adapters/qdq").files
    with client.open("adapters/qdq") as view:
        assert {str(view.index[n].dtype) for n in view if not n.startswith("nchwc/")} >= {"I8"}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    expected = ort.InferenceSession(str(tmp_path / "qdq.onnx"), options, providers=["CPUExecutionProvider"])
    session = trims.onnxruntime.InferenceSession("adapters/qdq", client=client)
    assert session.get_modelmeta().custom_metadata_map.get("trims.layout") == "every-level"
    import onnx

    every_level = onnx.load_from_string(client.files(client.info("adapters/qdq").digest)["model.nchwc.onnx"])
    assert "QLinearConv" in {node.op_type for node in every_level.graph.node}
    assert np.array_equal(session.run(None, {"a0": x})[0], expected.run(None, {"a0": x})[0])


def test_the_layout_fingerprint_tells_layouts_apart_and_survives_a_probe_it_cannot_run():
    from trims.onnx_format import _probe_model, layout_fingerprint

    probe = _probe_model()
    assert layout_fingerprint(probe) == layout_fingerprint(bytes(probe))  # the same ONNX Runtime, the same CPU
    assert layout_fingerprint(probe).startswith("onnxruntime ")
    assert layout_fingerprint(b"not a model") is None


def test_an_nchwc_session_holds_no_copy_of_its_weights(shared_daemon, tmp_path):
    from .conftest import run_python

    tiny_cnn(tmp_path / "wide-cnn.onnx", channels=256, layers=4)  # 9 MiB of convolution weights
    _push_with_nchwc(shared_daemon.client(), tmp_path / "wide-cnn.onnx", "adapters/wide-cnn")
    script = (SESSION_MEMORY.replace('"adapters/wide"', '"adapters/wide-cnn"')
              .replace('{"x": np.ones((1, 1024), dtype=np.float32)}', '{"a0": np.ones((1, 256, 8, 8), dtype=np.float32)}'))
    assert "wide-cnn" in script and "256, 8, 8" in script
    growth = int(run_python(script + "\nassert session.get_modelmeta().custom_metadata_map['trims.layout'] == 'every-level'",
                            shared_daemon.env).stdout.split()[-1])
    assert growth < 9 * 2**20 / 4  # private memory grew by far less than the 9 MiB of weights


def test_onnx_without_initializers_or_not_pushed_from_onnx(shared_daemon, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    import trims.onnxruntime

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    onnx.save(helper.make_model(graph), str(tmp_path / "empty.onnx"))
    client = shared_daemon.client()
    with pytest.raises(trims.InvalidModel, match="no initializers of 1024 bytes or more"):
        client.push(tmp_path / "empty.onnx", "adapters/empty")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(trims.InvalidModel, match="not a readable ONNX model"):
        client.push(tmp_path / "bad.onnx", "adapters/bad")
    build("gpt2", tmp_path / "gpt2")
    client.push(tmp_path / "gpt2", "adapters/not-onnx")
    with pytest.raises(trims.ModelMismatch, match="not pushed from an .onnx file"):
        trims.onnxruntime.InferenceSession("adapters/not-onnx", client=client)
