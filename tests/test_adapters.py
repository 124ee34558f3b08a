"""Adapters with the same verbs: Hugging Face, NumPy and ONNX Runtime, outputs identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trims
import trims.numpy
import trims.transformers

from .models import build, output_of
from .test_torch import lives_in_store


@pytest.mark.parametrize("kind", ["gpt2", "bert", "resnet", "llama", "vit"])
def test_from_pretrained_needs_only_the_tag(kind, shared_daemon, tmp_path):
    original, _ = build(kind, tmp_path / kind)
    client = shared_daemon.client()
    client.push(tmp_path / kind, f"adapters/{kind}")
    model = trims.transformers.from_pretrained(f"adapters/{kind}", client=client)
    assert type(model) is type(original) and not model.training
    assert torch.equal(output_of(model, kind), output_of(original, kind))
    assert all(lives_in_store(p) for p in model.parameters())


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


def tiny_onnx(path, seed: int = 0) -> np.ndarray:
    """A two-layer MLP as an ONNX file; returns an input for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((64, 128), dtype=np.float32), rng.standard_normal(128, dtype=np.float32)
    w2 = rng.standard_normal((128, 10), dtype=np.float32)
    shape = np.array([1, 64], dtype=np.int64)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (shape, "shape"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return rng.standard_normal(64, dtype=np.float32)


def test_onnxruntime_session_runs_on_shared_initializers(shared_daemon, tmp_path):
    import onnxruntime as ort

    import trims.onnxruntime

    x = tiny_onnx(tmp_path / "mlp.onnx")
    client = shared_daemon.client()
    pushed = client.push(tmp_path / "mlp.onnx", "adapters/mlp")
    assert pushed.tensors == 2 and client.info("adapters/mlp").files == ("model.onnx",)  # shape and bias stay inline
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
