"""Which files of a model directory make the model: the same choice on disk and in a bucket."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import trims
import trims.torch
from trims import layout
from trims.errors import InvalidModel


def no_index(name: str) -> bytes:
    raise AssertionError(f"{name} read where no index was listed")


def test_the_weights_come_first_then_the_side_files():
    names = ["tokenizer.json", "model.safetensors", "config.json", "README.md", "notes.bin.lock"]
    assert layout.files_of_directory(names, no_index, "d") == ["model.safetensors", "config.json", "tokenizer.json"]


def test_an_index_names_the_shards_and_nothing_else_is_weights():
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    names = ["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "params.json"]
    read = {"model.safetensors.index.json": json.dumps(index).encode()}.__getitem__
    assert layout.files_of_directory(names, read, "d") == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "params.json"]
    with pytest.raises(InvalidModel, match="lists model-00002-of-00002.safetensors, which is not in d"):
        layout.files_of_directory([n for n in names if not n.startswith("model-00002")], read, "d")
    with pytest.raises(InvalidModel, match="d/model.safetensors.index.json is not a safetensors index"):
        layout.files_of_directory(names, lambda _: b"[]", "d")


def test_one_checkpoint_where_no_safetensors_and_trainer_state_is_not_it():
    names = ["pytorch_model.bin", "optimizer.pt", "training_args.bin", "config.json"]
    assert layout.files_of_directory(names, no_index, "d") == ["pytorch_model.bin", "config.json"]
    assert layout.files_of_directory(["weights.pt", "rng_state_3.pth"], no_index, "d") == ["weights.pt"]
    with pytest.raises(InvalidModel, match="holds several PyTorch checkpoints"):
        layout.files_of_directory(["a.pt", "b.pt"], no_index, "d")
    with pytest.raises(InvalidModel, match="d holds no .safetensors file and no PyTorch checkpoint"):
        layout.files_of_directory(["config.json"], no_index, "d")


def test_an_onnx_graph_is_refused_with_how_to_push_it_unless_split():
    names = ["model.onnx", "model.safetensors"]
    with pytest.raises(InvalidModel, match=r"push the .onnx file itself \(trims push d/model.onnx"):
        layout.files_of_directory(names, no_index, "d")
    with pytest.raises(InvalidModel, match=r"copy model.onnx to this node and push it"):
        layout.files_of_directory(names, no_index, "s3://b/d")
    assert layout.files_of_directory(names, no_index, "d", split_onnx=True) == ["model.safetensors", "model.onnx"]


def test_a_bucket_directory_with_a_pytorch_model_bin_pushes_as_the_local_one(daemon, tmp_path, s3):
    """transformers' layout from before safetensors, in a bucket: config.json beside pytorch_model.bin."""
    import trims.transformers

    from .models import build, output_of

    model, _ = build("gpt2", tmp_path / "gpt2")
    torch.save(model.state_dict(), tmp_path / "gpt2" / "pytorch_model.bin")
    (tmp_path / "gpt2" / "model.safetensors").unlink()
    torch.save({"learning_rate": 1e-4}, tmp_path / "gpt2" / "training_args.bin")  # no part of the model
    bucket = s3.new_bucket()
    s3.upload_directory(tmp_path / "gpt2", bucket, "models/gpt2")
    client = daemon.client()
    pushed = client.push(f"s3://{bucket}/models/gpt2", "gpt2-bin")
    assert client.push(tmp_path / "gpt2", "gpt2-local").digest == pushed.digest  # the same files chosen
    assert client.info("gpt2-bin").tiers == ("disk", "cloud")
    assert "config.json" in client.info("gpt2-bin").files
    loaded, expected = trims.torch.load_state_dict("gpt2-bin", client=client), model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    shared = trims.transformers.from_pretrained("gpt2-bin", client=client)
    with torch.no_grad():
        assert torch.equal(output_of(shared, "gpt2"), output_of(model, "gpt2"))


def test_a_bucket_directory_with_an_index_pushes_only_its_shards(daemon, tmp_path, s3):
    """Mistral's layout: consolidated.safetensors beside the shards, the same tensors under other names."""
    directory = tmp_path / "mistral"
    directory.mkdir()
    a, b = torch.randn(8, 4), torch.randn(16)
    save_file({"a": a}, directory / "model-00001-of-00002.safetensors")
    save_file({"b": b}, directory / "model-00002-of-00002.safetensors")
    save_file({"layers.0.a": a, "layers.0.b": b}, directory / "consolidated.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text("{}")
    bucket = s3.new_bucket()
    s3.upload_directory(directory, bucket, "models/mistral")
    client = daemon.client()
    client.push(f"s3://{bucket}/models/mistral", "mistral")
    assert client.info("mistral").files == ("config.json",)
    with client.open("mistral") as view:
        assert sorted(view) == ["a", "b"]
        assert (view["a"] == a.numpy()).all() and (view["b"] == b.numpy()).all()
    s3.client().delete_object(Bucket=bucket, Key="models/mistral/model-00002-of-00002.safetensors")
    with pytest.raises(trims.InvalidModel, match="lists model-00002-of-00002.safetensors, which is not in s3://"):
        client.push(f"s3://{bucket}/models/mistral", "mistral-broken")


def test_a_bucket_directory_holding_an_onnx_graph_is_refused_with_how_to_push_it(daemon, tmp_path, s3):
    directory = tmp_path / "onnx"
    directory.mkdir()
    save_file({"w": torch.zeros(2)}, directory / "model.safetensors")
    (directory / "model.onnx").write_bytes(b"\x08\x07")  # refused by its name, never read
    bucket = s3.new_bucket()
    s3.upload_directory(directory, bucket, "models/onnx")
    with pytest.raises(trims.InvalidModel, match=r"holds model.onnx, an ONNX model: copy model.onnx to this node"):
        daemon.client().push(f"s3://{bucket}/models/onnx", "onnx")


def test_a_bucket_index_larger_than_a_side_file_is_not_read(s3, monkeypatch):
    """A bucket is not the daemon's: an index is read only as far as a side file may be."""
    from trims import cloud
    from trims.objects import Objects

    bucket = s3.new_bucket()
    s3.client().put_object(Bucket=bucket, Key="big/model.safetensors.index.json", Body=b" " * 64)
    monkeypatch.setattr(cloud, "MAX_SIDE_FILE_BYTES", 63)
    with pytest.raises(InvalidModel, match="64 bytes is more than a safetensors index may have"):
        cloud.remote_model_files(f"s3://{bucket}/big", Objects())
