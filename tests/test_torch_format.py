"""PyTorch checkpoints: read as torch.save writes them, hostile ones refused, served to torch.load."""

from __future__ import annotations

import os
import struct
import warnings
import zipfile
from fractions import Fraction

import pytest
import torch

import trims
import trims.torch
from trims import ingest, torch_format
from trims.errors import InvalidModel, UnsupportedFormat
from trims.sources import FileSource


def plan_of(*paths):
    fds = [os.open(path, os.O_RDONLY) for path in paths]
    try:
        return ingest.plan([FileSource(path.name, fd) for path, fd in zip(paths, fds)])
    finally:
        for fd in fds:
            os.close(fd)


def checkpoint(tmp_path, name="model.pt"):
    a = torch.randn(3, 4)
    objects = {"a": a, "row": a[1], "b": torch.ones(2, dtype=torch.bfloat16), "empty": torch.zeros(0), "step": 3}
    torch.save(objects, tmp_path / name)
    return tmp_path / name, objects


def test_reads_what_torch_save_writes(tmp_path):
    path, objects = checkpoint(tmp_path)
    planned = plan_of(path)
    data = path.read_bytes()
    storages = {spec.name: data[spec.start : spec.start + spec.nbytes] for _, spec in planned.specs}
    # One storage per torch storage: the row shares a's; each holds the storage's bytes.
    assert sorted(storages) == ["data/0", "data/1", "data/2"]
    assert sorted(storages.values(), key=len) == sorted(
        [bytes(t.untyped_storage()) for t in (objects["a"], objects["b"], objects["empty"])], key=len)
    assert {"data.pkl", "byteorder", "version"} <= set(planned.side_files)
    assert planned.metadata == {torch_format.FORMAT_KEY: torch_format.FORMAT}


def _zip(path, records: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return path


def _second_entry_points_at_the_first(path):
    """The central directory's second entry claims the first one's local header."""
    data = bytearray(path.read_bytes())
    second = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)
    data[second + 42 : second + 46] = struct.pack("<I", 0)
    path.write_bytes(bytes(data))
    return path


def _directory_claims_to_start(offset: int):
    """torch.save's zip64 end record says the central directory starts at ``offset``: every
    record's header offset then moves by the difference, before the file or far past it."""
    def make(path):
        torch.save({"a": torch.ones(2)}, path)
        data = bytearray(path.read_bytes())
        end64 = data.rindex(b"PK\x06\x06")
        data[end64 + 48 : end64 + 56] = struct.pack("<Q", offset)
        path.write_bytes(bytes(data))
        return path
    return make


def _torchscript(path):
    with warnings.catch_warnings():  # deprecated in PyTorch 2.13, still written
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: _zip(p, {"m/data.pkl": b"x", "m/data/0": b"y" * 100}, zipfile.ZIP_DEFLATED), "compressed"),
    (lambda p: _zip(p, {"m/data.pkl": b"x", "n/data/0": b"y"}), "more than one top-level directory"),
    (lambda p: _zip(p, {"m/data/0": b"y"}), "without data.pkl"),
    (lambda p: _zip(p, {"m/data.pkl": b"x", "m/DATA.pkl": b"x"}), "differ only in case"),
    (lambda p: _zip(p, {"m/data.pkl": b"x", "m/data/a b": b"y"}), "torch.save does not write"),
    (lambda p: _zip(p, {"m/data.pkl": b"x", "m/bad name": b"y"}), "not a plain relative path"),
    (lambda p: _zip(p, {}), "torch.save writes a zip archive"),  # an empty one starts with its directory's end
    (lambda p: p.write_bytes(b"\x80\x02" + bytes(60)) and p, "torch.save writes a zip archive"),  # a pickle, not torch's
    (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(26) + b"PK\x05\x06" + bytes(18)) and p, "empty zip"),
    (lambda p: _second_entry_points_at_the_first(_zip(p, {"m/data.pkl": b"x" * 64, "m/data/0": b"y" * 64})), "overlap"),
    (lambda p: p.write_bytes(p.with_name("good.pt").read_bytes()[:-30]) and p, "unreadable"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 100) and p, "unreadable"),
    (lambda p: torch.save({"a": torch.ones(2)}, p, _use_new_zipfile_serialization=False), "legacy format"),
    (lambda p: _torchscript(p), "TorchScript archive"),
    (_directory_claims_to_start(1 << 20), "outside the file"),
    (_directory_claims_to_start((1 << 64) - 1), "outside the file"),  # found by fuzzing: an OverflowError
])
def test_hostile_checkpoints_are_refused_with_a_clear_error(tmp_path, make, fragment):
    torch.save({"a": torch.ones(1000)}, tmp_path / "good.pt")
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(InvalidModel, match=fragment) as info:
        plan_of(path)
    assert "bad.pt" in str(info.value) or "bad name" in str(info.value)
    # Sound files of a kind trims does not share are told apart: transparent mode loads those quietly.
    assert (info.type is UnsupportedFormat) == (fragment in ("legacy format", "TorchScript archive"))


def test_a_huge_central_directory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path, _ = checkpoint(tmp_path)
    monkeypatch.setattr(torch_format, "MAX_DIRECTORY_BYTES", 64)
    with pytest.raises(InvalidModel, match="larger than 64 bytes"):
        plan_of(path)


def test_side_records_past_what_a_reply_can_carry_are_refused_at_push(daemon, tmp_path):
    """Each small record reaches a client as a descriptor, all in one reply: a checkpoint of
    more would push, then fail every load. It is refused at push, and the daemon carries on."""
    records = {"m/data.pkl": b"x", "m/data/0": b"y" * 64, **{f"m/note{i}": b"z" for i in range(ingest.MAX_SIDE_FILES)}}
    client = daemon.client()
    with pytest.raises(trims.InvalidModel, match="side files .* more than a model may have"):
        client.push(_zip(tmp_path / "many.pt", records), "many")
    assert client.ping() and "many" not in [m.name for m in client.list()]


def test_side_files_are_sized_together_before_any_is_read(tmp_path, monkeypatch):
    path, _ = checkpoint(tmp_path)
    monkeypatch.setattr(ingest, "MAX_SIDE_BYTES", 64)
    with pytest.raises(InvalidModel, match="the side files come to .* bytes, more than a model's may"):
        plan_of(path)


def test_a_checkpoint_is_a_model_by_itself(tmp_path):
    path, _ = checkpoint(tmp_path)
    torch.save({"b": torch.ones(1)}, tmp_path / "other.bin")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    for pair in ((path, tmp_path / "other.bin"), (path, tmp_path / "model.safetensors")):
        with pytest.raises(InvalidModel, match="one PyTorch checkpoint, not"):
            plan_of(*pair)


def test_a_pushed_checkpoint_loads_as_torch_load_would(daemon, tmp_path):
    path, objects = checkpoint(tmp_path)
    client = daemon.client()
    pushed = client.push(path, "ckpt")
    assert client.info("ckpt").metadata == {torch_format.FORMAT_KEY: torch_format.FORMAT}
    loaded = trims.torch.load_checkpoint("ckpt", client=client)
    expected = torch.load(path)
    assert loaded.keys() == expected.keys() and loaded["step"] == 3
    for key in ("a", "row", "b", "empty"):
        assert torch.equal(loaded[key], expected[key]) and loaded[key].dtype == expected[key].dtype
    assert loaded["row"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()  # still one storage
    loaded["a"].add_(1)  # a private copy of the pages written
    assert torch.equal(trims.torch.load_checkpoint("ckpt", client=client)["a"], objects["a"])
    with pytest.raises(trims.InvalidModel, match="not a PyTorch checkpoint"):
        trims.torch.load_checkpoint(client.push(_safetensors(tmp_path), "plain").name, client=client)
    assert client.push(path, "again").new_bytes == 0 and client.info("again").digest == pushed.digest


def test_a_checkpoint_of_a_state_dict_is_the_state_dict_load_state_dict_and_load_model_give(daemon, tmp_path):
    """torch.save(model.state_dict()) is the commonest PyTorch file: the state-dict adapters
    give its tensors (over the shared copy), not the archive's storages as raw bytes."""
    import trims.jax
    import trims.numpy

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "run.pt")
    client = daemon.client()
    client.push(tmp_path / "mlp.pt", "mlp-pt")
    client.push(tmp_path / "run.pt", "run-pt")
    state = trims.torch.load_state_dict("mlp-pt", client=client)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    built = trims.torch.load_model("mlp-pt", lambda: torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), client=client)
    x = torch.randn(3, 4)
    assert torch.equal(built(x), model(x))
    with pytest.raises(trims.InvalidModel, match="checkpoint of a dict, not of a state dict"):
        trims.torch.load_state_dict("run-pt", client=client)
    for load in (trims.numpy.load_state_dict, trims.jax.load_state_dict):
        with pytest.raises(trims.InvalidModel, match="is a PyTorch checkpoint, whose stored tensors are its storages"):
            load("mlp-pt", client=client)
    import trims.transformers

    with pytest.raises(trims.InvalidModel, match="mlp-pt was pushed without a config.json"):
        trims.transformers.from_pretrained("mlp-pt", client=client)


def test_a_model_directory_with_a_pytorch_model_bin_loads_with_from_pretrained(daemon, tmp_path):
    """A Hugging Face directory from before safetensors: config.json beside pytorch_model.bin."""
    import trims.transformers

    from .models import build, output_of

    model, _ = build("gpt2", tmp_path / "gpt2")
    torch.save(model.state_dict(), tmp_path / "gpt2" / "pytorch_model.bin")
    (tmp_path / "gpt2" / "model.safetensors").unlink()
    client = daemon.client()
    client.push(tmp_path / "gpt2", "gpt2-bin")
    assert "config.json" in client.info("gpt2-bin").files
    shared = trims.transformers.from_pretrained("gpt2-bin", client=client)
    with torch.no_grad():
        assert torch.equal(output_of(shared, "gpt2"), output_of(model, "gpt2"))
    assert shared.lm_head.weight.data_ptr() == shared.transformer.wte.weight.data_ptr()  # tied again
    torch.save({"learning_rate": 1e-4}, tmp_path / "gpt2" / "training_args.bin")  # as Trainer.save_model leaves
    assert client.push(tmp_path / "gpt2", "gpt2-bin").new_bytes == 0  # the same weights; its arguments no part
    (tmp_path / "gpt2" / "pytorch_model.bin").rename(tmp_path / "gpt2" / "weights.pt")
    torch.save(model.state_dict(), tmp_path / "gpt2" / "other.pt")
    with pytest.raises(trims.InvalidModel, match="holds several PyTorch checkpoints"):
        client.push(tmp_path / "gpt2", "two-checkpoints")


def test_equal_storages_stored_once_are_still_written_apart(daemon, tmp_path):
    """An optimizer's state holds equal storages (every parameter's ``step``, zero moments):
    the daemon keeps them once, but ``step += 1`` on one must leave the others as torch.load does."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "run.pt")
    client = daemon.client()
    client.push(tmp_path / "run.pt", "run")
    loaded, expected = trims.torch.load_checkpoint("run", client=client), torch.load(tmp_path / "run.pt")
    for state in (loaded, expected):
        steps = [s["step"] for s in state["optimizer"]["state"].values()]
        steps[0] += 1
        assert [float(s) for s in steps] == [2.0, 1.0, 1.0, 1.0]
    restored = torch.optim.Adam(model.parameters())
    restored.load_state_dict(loaded["optimizer"])
    optimizer.step(), restored.step()  # both from the same state: the same moments afterwards
    for ours, theirs in zip(restored.state.values(), optimizer.state.values()):
        assert torch.equal(ours["exp_avg"], theirs["exp_avg"])


def test_equal_storages_of_a_big_endian_checkpoint_are_swapped_each_once(daemon, tmp_path):
    """torch.load byte-swaps a big-endian archive's storages in place as it reads them: the
    copy handed out for an equal storage is taken before, not of the swapped bytes."""
    import zipfile

    torch.save({"a": torch.arange(4.0), "b": torch.arange(4.0)}, tmp_path / "little.pt")
    with zipfile.ZipFile(tmp_path / "little.pt") as little, \
            zipfile.ZipFile(tmp_path / "big.pt", "w", compression=zipfile.ZIP_STORED) as big:
        for info in little.infolist():
            big.writestr(info, b"big" if info.filename.endswith("/byteorder") else little.read(info))
    client = daemon.client()
    client.push(tmp_path / "big.pt", "big-endian")
    loaded, expected = trims.torch.load_checkpoint("big-endian", client=client), torch.load(tmp_path / "big.pt")
    assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in expected.items()}


def test_a_load_that_asks_for_file_offsets_is_told_to_read_the_file(daemon, tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    path, _ = checkpoint(tmp_path)
    client = daemon.client()
    client.push(path, "ckpt")
    for location in ("meta", torch.device("meta", 0)):
        with pytest.raises(trims.InvalidModel, match="torch.load the checkpoint's file"):
            trims.torch.load_checkpoint("ckpt", location, client=client)
    with FakeTensorMode(), pytest.raises(trims.InvalidModel, match="under a FakeTensorMode"):
        trims.torch.load_checkpoint("ckpt", client=client)
    assert client.stats()["leases"] == 0  # refused before anything was opened


def test_weights_only_holds_for_a_shared_checkpoint(daemon, tmp_path):
    """The daemon never unpickles; the client's torch.load refuses what it would refuse anyway."""
    torch.save({"a": torch.ones(2), "other": Fraction(1, 3)}, tmp_path / "unsafe.pt")  # not weights: a class to import
    client = daemon.client()
    client.push(tmp_path / "unsafe.pt", "unsafe")
    with pytest.raises(Exception, match="Weights only load failed"):
        trims.torch.load_checkpoint("unsafe", client=client)
    assert trims.torch.load_checkpoint("unsafe", client=client, weights_only=False)["other"] == Fraction(1, 3)


def test_a_legacy_checkpoint_is_a_typed_error_and_the_daemon_carries_on(daemon, tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    client = daemon.client()
    with pytest.raises(trims.InvalidModel, match="legacy format"):
        client.push(tmp_path / "old.pt", "old")
    assert client.ping()


def _safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    return tmp_path / "plain.safetensors"


def test_a_checkpoint_in_a_bucket_is_read_where_it_lies(daemon, tmp_path, s3):
    """Its zip directory is read with ranged GETs; the object stays the model's cloud copy."""
    path, _ = checkpoint(tmp_path)
    bucket = s3.new_bucket()
    s3.client().upload_file(str(path), bucket, "runs/7/model.pt")
    client = daemon.client()
    client.push(f"s3://{bucket}/runs/7/model.pt", "from-bucket")
    assert client.info("from-bucket").tiers == ("disk", "cloud")
    loaded, expected = trims.torch.load_checkpoint("from-bucket", client=client), torch.load(path)
    assert all(torch.equal(loaded[k], expected[k]) for k in ("a", "row", "b", "empty"))


def test_a_bucket_checkpoints_local_headers_take_few_requests(tmp_path, s3):
    """One header per record, read together: a push from a bucket waits a few round trips
    for them, not one per tensor (GPT-2 has 150)."""
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    path = tmp_path / "many.pt"
    torch.save({f"bias{i}": torch.full((64,), float(i)) for i in range(120)}, path)
    bucket = s3.new_bucket()
    s3.client().upload_file(str(path), bucket, "many.pt")
    before = s3.gets("many.pt")
    read = torch_format.read_checkpoint(RemoteFile("many.pt", f"s3://{bucket}/many.pt", Objects()))
    assert len(read.storages) == 120
    assert s3.gets("many.pt") - before <= 6  # the zip directory's few reads, and the headers' one
    local = plan_of(path)
    assert [spec.start for spec in read.storages] == [spec.start for _, spec in local.specs]
