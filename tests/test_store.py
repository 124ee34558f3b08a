"""The daemon's store end to end: registration, identity, persistence, caps, errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import trims
from trims import ingest, protocol, transport
from trims.sources import FileSource
from trims.store import _Patience

from .conftest import DaemonProcess, open_concurrently, wait_for
from .models import build, raw_safetensors


def tensors_of(view: trims.ModelView) -> dict[str, bytes]:
    return {name: view[name].tobytes() for name in view}


def expected_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}


def test_push_open_list_info(daemon, tmp_path):
    model, _ = build("gpt2", tmp_path / "gpt2")
    client = daemon.client()
    result = client.push(tmp_path / "gpt2", "team-a/gpt2:1")
    assert result.name == "team-a/gpt2:1" and result.new_bytes > 0 and result.digest.startswith("blake3:")
    with client.open("team-a/gpt2:1") as view:
        stored = tensors_of(view)
        assert view.digest == result.digest and view.nbytes == result.nbytes
        assert view.metadata == {"format": "pt"}
    originals = expected_bytes(model)
    # safetensors stores GPT-2's tied lm_head once, as transformer.wte.weight
    assert set(stored) == set(originals) - {"lm_head.weight"}
    assert all(stored[name] == originals[name] for name in stored)
    (summary,) = client.list()
    assert summary.name == "team-a/gpt2:1" and summary.tiers == ("host", "disk") and summary.leases == 0
    info = client.info("team-a/gpt2:1")
    assert info.files == ("config.json", "generation_config.json")
    assert info.tensors == len(stored) and info.dtypes == {"F32": len(stored)}


def test_same_bytes_are_stored_once_whatever_their_files_or_names(daemon, tmp_path):
    model, _ = build("gpt2", tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    client = daemon.client()
    first = client.push(tmp_path / "single", "gpt2")
    disk = client.stats()["tiers"]["disk"]["used_bytes"]
    again = client.push(tmp_path / "single" / "model.safetensors", "gpt2-file")
    sharded = client.push(tmp_path / "sharded", "gpt2-sharded")
    assert again.new_bytes == 0 and sharded.new_bytes == 0
    assert sharded.digest == first.digest  # identity is content: sharding does not change it
    assert client.stats()["tiers"]["disk"]["used_bytes"] == disk
    with client.open("gpt2-sharded") as a, client.open("gpt2") as b:
        assert tensors_of(a) == tensors_of(b)
    assert again.digest != first.digest  # a bare file carries no config: another model, same tensors
    assert {m.name for m in client.list()} == {"gpt2:latest", "gpt2-file:latest", "gpt2-sharded:latest"}


def test_a_fine_tune_shares_the_tensors_it_did_not_change(daemon, tmp_path):
    base = {"embed": torch.randn(256, 64), "head": torch.randn(64, 10)}
    tuned = {"embed": base["embed"], "head": torch.randn(64, 10)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    client = daemon.client()
    client.push(tmp_path / "base.safetensors", "base")
    pushed = client.push(tmp_path / "tuned.safetensors", "tuned")
    assert pushed.new_bytes < base["embed"].numel() * 4  # only the new head was stored
    with client.open("tuned") as view:
        assert np.array_equal(view["embed"], base["embed"].numpy())
        assert np.array_equal(view["head"], tuned["head"].numpy())
    assert client.info("tuned").segments == 2  # its own segment and the base's


ALL_DTYPES = {
    "bool": torch.tensor([True, False, True]),
    "u8": torch.arange(0, 250, dtype=torch.uint8),
    "i8": torch.arange(-100, 100, dtype=torch.int8),
    "u16": torch.randint(0, 2**15, (7,)).to(torch.uint16),
    "i16": torch.randint(-(2**15), 2**15, (7,), dtype=torch.int16),
    "u32": torch.randint(0, 2**31, (5,)).to(torch.uint32),
    "i32": torch.randint(-(2**31), 2**31, (5,), dtype=torch.int32),
    "u64": torch.randint(-(2**62), 2**62, (3,)).view(torch.uint64),
    "i64": torch.randint(-(2**62), 2**62, (3,)),
    "f16": torch.randn(4, 3, dtype=torch.float16),
    "bf16": torch.randn(4, 3, dtype=torch.bfloat16),
    "f32": torch.randn(2, 2, 2),
    "f64": torch.randn(3, dtype=torch.float64),
    "c64": torch.randn(3, dtype=torch.complex64),
    "f8_e4m3": torch.randn(9).to(torch.float8_e4m3fn),
    "f8_e5m2": torch.randn(9).to(torch.float8_e5m2),
    "f8_e8m0": torch.rand(9).to(torch.float8_e8m0fnu),
    "f8_e4m3fnuz": torch.randn(9).to(torch.float8_e4m3fnuz),
    "f8_e5m2fnuz": torch.randn(9).to(torch.float8_e5m2fnuz),
    "f4": torch.randint(0, 255, (2, 3), dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    "scalar": torch.tensor(3.5),
    "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
    "empty": torch.zeros(0, 4),
    "empty_i8": torch.zeros(3, 0, dtype=torch.int8),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_every_dtype_round_trips_exactly(daemon, tmp_path):
    import trims.torch

    save_file(ALL_DTYPES, tmp_path / "all.safetensors")
    client = daemon.client()
    client.push(tmp_path / "all.safetensors", "dtypes")
    state = trims.torch.load_state_dict("dtypes", client=client)
    assert set(state) == set(ALL_DTYPES)
    for name, original in ALL_DTYPES.items():
        loaded = state[name]
        assert loaded.dtype == original.dtype and loaded.shape == original.shape, name
        assert torch.equal(_bits(loaded), _bits(original)), name
    with client.open("dtypes") as view:
        for name, original in ALL_DTYPES.items():
            assert view[name].tobytes() == _bits(original).numpy().tobytes(), name
        assert view["bf16"].dtype.name == "bfloat16" and view["bf16"].shape == (4, 3)
        assert view["f8_e4m3"].dtype.name == "float8_e4m3fn"
        assert view["scalar"].shape == () and view["scalar"] == 3.5
        assert view["empty"].shape == (0, 4)
        assert view["f4"].dtype == np.uint8 and view["f4"].shape == (2, 3)  # packed: 2 values a byte


def test_packed_fp6_comes_back_as_raw_bytes(daemon, tmp_path):
    import trims.torch

    data = bytes([1, 2, 3, 4, 5, 6])
    header = {"w": {"dtype": "F6_E2M3", "shape": [2, 4], "data_offsets": [0, 6]}}
    raw_safetensors(tmp_path / "fp6.safetensors", header, data)
    client = daemon.client()
    client.push(tmp_path / "fp6.safetensors", "fp6")
    with client.open("fp6") as view:
        assert view["w"].shape == (2, 3) and view["w"].tobytes() == data
    assert trims.torch.load_state_dict("fp6", client=client)["w"].numpy().tobytes() == data


def _daemon_still_serves(client: trims.Client, tmp_path) -> None:
    save_file({"ok": torch.arange(4.0)}, tmp_path / "ok.safetensors")
    client.push(tmp_path / "ok.safetensors", "still-ok")
    with client.open("still-ok") as view:
        assert list(view["ok"]) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "content",
    [
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}},
        {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"[" * 100_000,
    ],
    ids=["out-of-range", "unknown-dtype", "shape-mismatch", "overlap", "deep-nesting"],
)
def test_hostile_files_get_a_typed_error_and_the_daemon_keeps_serving(daemon, tmp_path, content):
    raw_safetensors(tmp_path / "evil.safetensors", content, b"\0" * 12)
    client = daemon.client()
    with pytest.raises(trims.InvalidModel):
        client.push(tmp_path / "evil.safetensors", "evil")
    assert client.list() == []
    assert not os.listdir(daemon.store / "tmp")
    _daemon_still_serves(client, tmp_path)
    assert "Traceback" not in daemon.log()


def test_models_whose_open_could_not_be_answered_are_refused_at_push(daemon, tmp_path):
    """An open's reply lists every tensor and the metadata in one frame: a model it cannot
    carry is refused when pushed (17 MiB of metadata pushed fine and failed every open, ls and
    info), and so is one file sent as many (each of its headers parsed before the duplicates
    showed). Metadata of hundreds of KiB, as LoRA files carry, is fine, listings of it too."""
    client = daemon.client()
    save_file({"w": torch.zeros(4)}, tmp_path / "meta.safetensors", metadata={"notes": "x" * (17 << 20)})
    with pytest.raises(trims.InvalidModel, match="more than one open's reply can carry"):
        client.push(tmp_path / "meta.safetensors", "too-much-metadata")
    many = {f"layer.{i:06d}." + "w" * 90: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(160_000)}
    raw_safetensors(tmp_path / "many.safetensors", many)
    with pytest.raises(trims.InvalidModel, match="160000 tensors .* more than one open's reply can carry"):
        client.push(tmp_path / "many.safetensors", "too-many-tensors")
    for i in range(20):  # 20 x 900 KiB of metadata: more than a frame, were listings to carry it
        save_file({"w": torch.full((4,), float(i))}, tmp_path / "lora.safetensors",
                  metadata={"ss_tag_frequency": "t" * (900 << 10)})
        client.push(tmp_path / "lora.safetensors", f"lora/{i}")
    assert len(client.list()) == 20 and len(client.info("lora/3").metadata["ss_tag_frequency"]) == 900 << 10
    for i in range(20):
        client.remove(f"lora/{i}")
    save_file({"w": torch.zeros(4)}, tmp_path / "one.safetensors")
    for i in range(3):
        (tmp_path / "same").mkdir(exist_ok=True)
        os.link(tmp_path / "one.safetensors", tmp_path / "same" / f"model-{i}.safetensors")
    with pytest.raises(trims.InvalidModel, match="appears in both"):
        client.push(tmp_path / "same", "one-file-three-times")
    assert client.list() == []
    _daemon_still_serves(client, tmp_path)


def test_truncated_file_is_refused(daemon, tmp_path):
    save_file({"w": torch.randn(1000)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    client = daemon.client()
    with pytest.raises(trims.InvalidModel, match="truncated|outside"):
        client.push(tmp_path / "cut.safetensors", "cut")
    _daemon_still_serves(client, tmp_path)


def test_a_file_rewritten_between_the_passes_of_a_push_is_refused(tmp_path):
    """A push the disk has no room for whole reads its tensors twice (to hash, then to write
    the new ones): bytes that changed in between fail it, and leave nothing behind."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, path)
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    fd = os.open(path, os.O_RDONLY)
    try:
        planned = ingest.plan([FileSource("model.safetensors", fd)])
        manifest = ingest.digest(planned, workers=2)
        with open(path, "r+b") as rewrite:  # in place: the pushed descriptor reads it
            rewrite.seek(-4, os.SEEK_END)
            rewrite.write(b"\x01\x02\x03\x04")
        new = ingest.only_new(planned, manifest, stored=set())
        with pytest.raises(trims.InvalidModel, match="changed while they were pushed"):
            ingest.write_new(planned, new, manifest, temp_dir, workers=2)
    finally:
        os.close(fd)
    assert not list(temp_dir.iterdir())


def test_non_regular_descriptors_are_refused(daemon, tmp_path):
    read_end, write_end = os.pipe()
    directory = os.open(tmp_path, os.O_RDONLY)
    channel = transport.connect(daemon.socket)
    try:
        for fd in (read_end, directory):
            channel.send(protocol.Push(id=1, name="x", files=("model.safetensors",), fds=(fd,)))
            reply = channel.receive()
            assert isinstance(reply, protocol.Error) and reply.code == "invalid_model"
            assert "not a regular file" in reply.message
    finally:
        channel.close()
        for fd in (read_end, write_end, directory):
            os.close(fd)


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a//b", "/abs", "a:b:c", "bad\nname", "x" * 300, "blake3:abc", "ok:", "a b"])
def test_bad_names_get_invalid_name(daemon, tmp_path, name):
    save_file({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    client = daemon.client()
    with pytest.raises(trims.InvalidName):
        client.push(tmp_path / "m.safetensors", name)
    with pytest.raises((trims.InvalidName, trims.ModelNotFound)):
        client.open(name)


def test_unknown_names_and_paths(daemon, tmp_path):
    client = daemon.client()
    with pytest.raises(trims.ModelNotFound, match="no model named nope:latest"):
        client.open("nope")
    with pytest.raises(trims.ModelNotFound):
        client.info("nope:2")
    with pytest.raises(trims.InvalidModel, match="missing does not exist"):
        client.push(tmp_path / "missing", "x")
    (tmp_path / "notes.txt").write_text("no model")
    with pytest.raises(trims.InvalidModel, match="not a .safetensors file"):
        client.push(tmp_path / "notes.txt", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(trims.InvalidModel, match="holds no .safetensors"):
        client.push(tmp_path / "empty", "x")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    save_file({"w": torch.zeros(2)}, crowded / "m.safetensors")
    for i in range(trims.protocol.MAX_FDS_PER_FRAME):
        (crowded / f"{i}.json").write_text("{}")
    with pytest.raises(trims.InvalidModel, match="holds 251 weight and side files, more than one push can send"):
        client.push(crowded, "x")


def test_restart_keeps_the_catalogue_and_verifies_what_it_loads(tmp_path):
    model, _ = build("gpt2", tmp_path / "gpt2")
    first = DaemonProcess(tmp_path / "d").start()
    client = first.client()
    pushed = client.push(tmp_path / "gpt2", "gpt2:1")
    with client.open("gpt2:1") as view:
        before = tensors_of(view)
    assert first.stop() == 0
    second = DaemonProcess(tmp_path / "d").start()
    try:
        client = second.client()
        (summary,) = client.list()
        assert (summary.name, summary.digest, summary.tiers) == ("gpt2:1", pushed.digest, ("disk",))
        with client.open("gpt2:1") as view:
            assert tensors_of(view) == before
        assert client.stats()["fetches"]["disk->host"]["count"] == 1
    finally:
        second.kill()


@pytest.mark.parametrize("record", ["tags.json", "uses.json", "models", "segments", "pins.json", "owners.json"])
def test_an_unreadable_record_stops_the_start_and_deletes_nothing(tmp_path, record):
    """One damaged catalogue file must not make the start collect the models it describes as
    garbage: the daemon refuses to start, naming the file, and starts once it is restored.
    Pins and quota owners delete nothing when lost: without them it starts, and says so."""
    from trims.acl import EVERYONE
    from trims.errors import ConfigError
    from trims.store import Store

    save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
    root = tmp_path / "store"
    store = Store(root, host_capacity=1 << 26)
    _push(store, "m", tmp_path / "m.safetensors", EVERYONE)
    store.pin("m", "disk")
    store.close()
    path = root / record if record.endswith(".json") else next((root / record).glob("*.json"))
    original, before = path.read_bytes(), sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    for damage in (original[: len(original) // 2], b"[1, 2]"):
        path.write_bytes(damage)
        if record in ("pins.json", "owners.json"):
            Store(root, host_capacity=1 << 26).close()
            assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before
            continue
        with pytest.raises(ConfigError, match=f"{path.relative_to(root)}.*restore it from a backup"):
            Store(root, host_capacity=1 << 26)
        assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before
    path.write_bytes(original)
    store = Store(root, host_capacity=1 << 26)
    try:
        assert [(m.name, m.pinned) for m in store.list_models()] == [("m:latest", "disk")]
    finally:
        store.close()


def test_a_corrupted_byte_on_disk_is_set_aside_never_served_and_restored_by_a_push(tmp_path):
    weights = torch.randn(4096)
    save_file({"w": weights}, tmp_path / "m.safetensors")
    daemon = DaemonProcess(tmp_path / "d").start()
    client = daemon.client()
    client.push(tmp_path / "m.safetensors", "m")
    daemon.stop()
    (segment,) = (daemon.store / "disk").glob("*.bin")
    data = bytearray(segment.read_bytes())
    data[1000] ^= 0x01
    segment.write_bytes(bytes(data))
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        with pytest.raises(trims.IntegrityError, match="corrupt.*No other tier holds it: push the model again"):
            client.open("m")
        assert not segment.exists()
        (kept,) = (daemon.store / "corrupt").glob(f"{segment.stem}-*.bin")
        assert kept.read_bytes() == data  # kept for a look, out of the tier
        stats = client.stats()
        assert stats["tiers"]["host"]["used_bytes"] == 0 and stats["tiers"]["disk"]["used_bytes"] == 0
        assert stats["corrupt_copies"] == {"disk": 1}
        shown = subprocess.run([sys.executable, "-m", "trims", "stats"], env=daemon.env, capture_output=True, text=True,
                               timeout=120).stdout
        assert "damaged copies dropped from disk: 1 (the daemon's log names them; their files are kept" in shown
        with pytest.raises(trims.IntegrityError, match="bytes are lost; push the model again"):
            client.open("m")
        assert client.push(tmp_path / "m.safetensors", "m").new_bytes == len(data)  # written again, not reused
        with client.open("m") as view:
            assert view["w"].tobytes() == weights.numpy().tobytes()
        _daemon_still_serves(client, tmp_path)
    finally:
        daemon.kill()


def _push_seeded(client: trims.Client, tmp_path, seeds) -> int:
    for seed in seeds:
        save_file({"w": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(seed))}, tmp_path / f"{seed}.safetensors")
        client.push(tmp_path / f"{seed}.safetensors", f"m{seed}")
    return 64 * 1024 * 4


def test_host_cap_is_never_exceeded_and_leased_models_are_never_evicted(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", host_memory="600K").start()  # room for two 256 KiB models
    try:
        client = daemon.client()
        _push_seeded(client, tmp_path, range(4))
        capacity = client.stats()["tiers"]["host"]["capacity_bytes"]
        for seed in range(4):  # more models than fit, one after another
            with client.open(f"m{seed}"):
                assert client.stats()["tiers"]["host"]["used_bytes"] <= capacity
        stats = client.stats()
        assert stats["tiers"]["host"]["evictions"] == {"capacity": 2} and stats["tiers"]["host"]["segments"] == 2
        assert [m.tiers for m in client.list()] == [("disk",), ("disk",), ("host", "disk"), ("host", "disk")]
        held = [client.open("m0"), client.open("m1")]  # m0 and m1 evict m2 and m3 (least recently used)
        with pytest.raises(trims.CapacityError, match="host memory is full"):
            client.open("m2")
        assert [np.array_equal(v["w"], v["w"]) for v in held] == [True, True]
        assert client.stats()["tiers"]["host"]["used_bytes"] <= capacity
        held[0].close()
        with client.open("m2"):  # now m0 can go
            pass
        assert client.info("m1").tiers == ("host", "disk")
    finally:
        daemon.kill()


def test_side_files_count_against_the_disk_cap_and_the_push_quota(tmp_path):
    """A model's side files (a tokenizer, a checkpoint's pickle) lie on the store's disk
    beside its segments: they count under --disk, and against the pusher's quota."""
    from trims.acl import EVERYONE, Tenant
    from trims.sources import FileSource
    from trims.store import Store

    def push_with_vocab(store, name, vocab: bytes, tenant):
        directory = tmp_path / name
        directory.mkdir()
        save_file({"w": torch.zeros(4)}, directory / "model.safetensors")
        (directory / "vocab.txt").write_bytes(vocab)
        fds = [os.open(directory / f, os.O_RDONLY) for f in ("model.safetensors", "vocab.txt")]
        try:
            return store.push(name, [FileSource(f, fd) for f, fd in zip(("model.safetensors", "vocab.txt"), fds)],
                              tenant=tenant)
        finally:
            for fd in fds:
                os.close(fd)

    tenant = Tenant("t", uids=frozenset({1}), namespaces=("*",), push=("*",), max_pushed_bytes=3 << 20)
    store = Store(tmp_path / "store", host_capacity=1 << 26, disk_capacity=4 << 20)
    try:
        push_with_vocab(store, "a", os.urandom(2 << 20), tenant)
        assert store.stats()["tiers"]["disk"]["used_bytes"] >= 2 << 20
        assert store.usage(tenant)["pushed_bytes"] >= 2 << 20
        with pytest.raises(trims.QuotaExceeded):
            push_with_vocab(store, "b", os.urandom(2 << 20), tenant)
        with pytest.raises(trims.CapacityError, match="disk tier is full"):
            push_with_vocab(store, "c", os.urandom(3 << 20), EVERYONE)
        push_with_vocab(store, "d", (tmp_path / "a" / "vocab.txt").read_bytes(), EVERYONE)  # stored already
    finally:
        store.close()


def test_a_model_larger_than_the_cap_gets_a_clear_error(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", host_memory="100K").start()
    try:
        client = daemon.client()
        _push_seeded(client, tmp_path, [0])
        with pytest.raises(trims.CapacityError, match="larger than the host tier"):
            client.open("m0")
    finally:
        daemon.kill()


def test_evict_refuses_leased_models_and_frees_idle_ones(daemon, tmp_path):
    client = daemon.client()
    nbytes = _push_seeded(client, tmp_path, [0])
    view = client.open("m0")
    with pytest.raises(trims.ModelBusy, match="1 leases"):
        client.evict("m0")
    view.close()
    assert client.evict("m0") >= nbytes
    assert client.info("m0").tiers == ("disk",)
    assert client.stats()["tiers"]["host"]["used_bytes"] == 0
    with client.open("m0") as view:
        assert view["w"].shape == (64 * 1024,)


def test_a_closed_view_keeps_its_lease_while_arrays_taken_from_it_live(daemon, tmp_path):
    """The arrays map the daemon's memory: evicting it then would count it free while it is
    not (the host cap overrun by what clients still hold)."""
    client = daemon.client()
    _push_seeded(client, tmp_path, [0])
    with client.open("m0") as view:
        kept = view["w"]
    with pytest.raises(trims.ModelBusy, match="1 leases"):
        client.evict("m0")
    assert kept.shape == (64 * 1024,) and np.isfinite(kept).all()  # still readable
    del kept, view
    wait_for(lambda: client.stats()["leases"] == 0, message="the last array's lease to end")
    client.evict("m0")


def test_remove_deletes_bytes_once_no_name_uses_them(daemon, tmp_path):
    client = daemon.client()
    save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
    client.push(tmp_path / "m.safetensors", "a")
    client.push(tmp_path / "m.safetensors", "b")
    held = client.open("a")
    assert client.remove("a") == 0  # b still names the same bytes
    with pytest.raises(trims.ModelNotFound):
        client.open("a")
    with client.open("b"):
        pass
    client.remove("b")
    assert client.list() == [] and client.stats()["tiers"]["disk"]["used_bytes"] > 0  # still leased
    assert held["w"].shape == (1000,)  # a holder keeps its mapping
    held.close()
    stats = client.stats()
    assert stats["tiers"]["host"]["used_bytes"] == 0 and stats["tiers"]["disk"]["used_bytes"] == 0
    assert not list((daemon.store / "disk").iterdir()) and not list((daemon.store / "segments").iterdir())
    with pytest.raises(trims.ModelNotFound):
        client.remove("b")


def test_pushing_new_bytes_under_a_name_frees_the_old_ones(daemon, tmp_path):
    client = daemon.client()
    save_file({"w": torch.randn(1000)}, tmp_path / "v1.safetensors")
    save_file({"w": torch.randn(1000)}, tmp_path / "v2.safetensors")
    client.push(tmp_path / "v1.safetensors", "m")
    old = client.open("m")
    client.push(tmp_path / "v2.safetensors", "m")
    assert len(list((daemon.store / "disk").glob("*.bin"))) == 2  # v1 is still leased
    with client.open("m") as new:
        assert new["w"].tobytes() != old["w"].tobytes()
    old.close()
    assert len(list((daemon.store / "disk").glob("*.bin"))) == 1
    assert len(list((daemon.store / "models").glob("*.json"))) == 1


def test_concurrent_opens_of_a_cold_model_load_it_once(daemon, tmp_path):
    setup = daemon.client()
    _push_seeded(setup, tmp_path, [0])
    setup.evict("m0")
    views = open_concurrently([daemon.client() for _ in range(8)], "m0")
    stats = setup.stats()
    assert stats["fetches"]["disk->host"]["count"] == 1 and stats["opens"]["total"] == 8 and stats["leases"] == 8
    assert len({v["w"].tobytes() for v in views}) == 1


def test_a_client_survives_a_daemon_restart(tmp_path):
    save_file({"w": torch.arange(1000.0)}, tmp_path / "m.safetensors")
    daemon = DaemonProcess(tmp_path / "d").start()
    client = daemon.client()
    client.push(tmp_path / "m.safetensors", "m")
    view = client.open("m")
    daemon.kill()  # SIGKILL: no goodbye
    assert float(view["w"].sum()) == 499500.0  # the mapping outlives the daemon
    with pytest.raises(trims.DaemonUnavailable):
        client.list()
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        with client.open("m") as again:  # same Client object: it reconnects
            assert float(again["w"].sum()) == 499500.0
        view.close()  # a lease of the old daemon: nothing to release, no error
    finally:
        daemon.kill()


def test_two_daemons_cannot_share_a_store_or_a_socket(daemon, tmp_path):
    other_store = DaemonProcess(tmp_path / "other")
    other_store.store = daemon.store
    with pytest.raises(RuntimeError, match="another trims daemon is using the store"):
        other_store.start()
    same_socket = subprocess.run(
        [sys.executable, "-m", "trims", "serve", "--socket", str(daemon.socket), "--store", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )
    assert same_socket.returncode == 1 and "already serving" in same_socket.stderr
    daemon.client().ping()


def test_sigterm_shuts_down_cleanly(tmp_path):
    daemon = DaemonProcess(tmp_path / "d").start()
    view_holder = daemon.client()
    save_file({"w": torch.zeros(4)}, tmp_path / "m.safetensors")
    view_holder.push(tmp_path / "m.safetensors", "m")
    view = view_holder.open("m")
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "trims daemon stopped" in daemon.log()
    assert not os.listdir(daemon.store / "tmp")
    view.close()


def test_evict_refuses_a_segment_an_unfinished_open_holds(tmp_path):
    """White box: between taking its segments and recording its lease, an open holds references
    that evict must respect (the descriptor would be closed under it)."""
    import os as _os

    from trims.sources import FileSource
    from trims.store import Store

    save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
    store = Store(tmp_path / "store", host_capacity=1 << 30)
    try:
        fd = _os.open(tmp_path / "m.safetensors", _os.O_RDONLY)
        store.push("m", [FileSource("m.safetensors", fd)])
        _os.close(fd)
        segments = store._placement(store._resolve("m")[1]).segments
        store._acquire_all(segments, _Patience(deadline=0))  # what open() does before it records the lease
        with pytest.raises(trims.ModelBusy):
            store.evict("m")
        assert store.host.get(segments[0]).fd >= 0 and _os.fstat(store.host.get(segments[0]).fd)
    finally:
        store.close()


def test_a_segment_just_loaded_is_not_evicted_before_its_open_takes_it(tmp_path):
    """White box: a load's segment is in host memory a moment before the open that loaded it
    takes its reference. Another open making room in that moment must not evict it (the first
    open would answer with no segment: an internal error, seen in the FaaS benchmark)."""
    import threading

    from trims.errors import CapacityError
    from trims.store import Store

    size = _push_seeded_store(tmp_path)
    store = Store(tmp_path / "store", host_capacity=int(size * 1.5))  # room for one model
    resident, go = threading.Event(), threading.Event()
    put = store.host.put

    def put_then_pause(layout, fill):
        put(layout, fill)
        resident.set()
        go.wait(10)

    store.host.put = put_then_pause
    first = {}
    opener = threading.Thread(
        target=lambda: first.update(segments=store._acquire_all(_segments(store, "m1"), _Patience(deadline=0))[0]))
    try:
        opener.start()
        assert resident.wait(10)
        with pytest.raises(CapacityError, match="host memory is full"):  # m1 is taken: nothing may go
            store._acquire_all(_segments(store, "m0"), _Patience(deadline=time.monotonic() + 0.2))
        go.set()
        opener.join(10)
        assert [os.fstat(segment.fd).st_size for segment in first["segments"]] == [size]
    finally:
        go.set()
        store.close()


def test_a_model_removed_while_an_open_loads_it_is_served_then_collected(tmp_path):
    """White box: the open that was loading a model, and another waiting for that load, get
    it although it was removed meanwhile; its memory goes when their leases end (a removal
    used to collect the segment between the load and its reference: an internal error, the
    waiter hung for good and the host memory stayed counted)."""
    import threading

    from trims.store import Store

    size = _push_seeded_store(tmp_path)
    store = Store(tmp_path / "store", host_capacity=1 << 30)
    loading, go = threading.Event(), threading.Event()
    fetch = store.disk.fetch

    def fetch_slowly(layout, destination):
        loading.set()
        go.wait(10)
        fetch(layout, destination)

    store.disk.fetch = fetch_slowly
    segments = _segments(store, "m0")
    got: dict = {}

    def take(key):
        got[key] = store._acquire_all(segments, _Patience(deadline=time.monotonic() + 10))[0]

    openers = [threading.Thread(target=take, args=(key,)) for key in ("loader", "waiter")]
    try:
        openers[0].start()
        assert loading.wait(10)
        openers[1].start()
        store.remove("m0")
        go.set()
        for opener in openers:
            opener.join(10)
        assert [[os.fstat(s.fd).st_size for s in got[key]] for key in ("loader", "waiter")] == [[size], [size]]
        with store._changed:
            store._unref_locked(segments)
            store._unref_locked(segments)
        assert store.host.bytes_used() == 0 and not store.host.has(segments[0])
    finally:
        go.set()
        store.close()


def test_a_tag_that_could_not_be_written_leaves_the_store_as_it_was(tmp_path):
    """A push whose tags.json cannot be written fails with a StorageError and no trace: the
    name is not charged to its tenant (stats, quotas), and the next push, once the disk is
    mended, lands."""
    from trims.acl import EVERYONE
    from trims.store import Store

    save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
    store = Store(tmp_path / "store", host_capacity=1 << 26)
    try:
        _push(store, "first", tmp_path / "m.safetensors", EVERYONE)
        tags = tmp_path / "store" / "tags.json"
        tags.unlink()
        tags.mkdir()  # renaming the new tags.json into place fails
        with pytest.raises(trims.StorageError):
            _push(store, "second", tmp_path / "m.safetensors", EVERYONE)
        assert [m.name for m in store.list_models()] == ["first:latest"]
        assert store.usage(EVERYONE)["pushed_bytes"] == store.list_models()[0].nbytes
        tags.rmdir()
        _push(store, "second", tmp_path / "m.safetensors", EVERYONE)
        assert [m.name for m in store.list_models()] == ["first:latest", "second:latest"]
    finally:
        store.close()


def test_a_model_is_read_from_few_segments_however_many_hold_its_tensors(tmp_path):
    """Each segment is a descriptor in an open's one reply: a model whose tensors lie in more
    segments than MAX_SEGMENTS_PER_MODEL is stored anew, in one, not left unopenable."""
    from trims.acl import EVERYONE
    from trims.catalog import MAX_SEGMENTS_PER_MODEL
    from trims.store import Store

    store = Store(tmp_path / "store", host_capacity=1 << 26)
    try:
        every = {}
        for i in range(MAX_SEGMENTS_PER_MODEL + 1):
            every[f"t{i}"] = torch.full((16,), float(i))
            save_file({f"t{i}": every[f"t{i}"]}, tmp_path / f"{i}.safetensors")
            _push(store, f"part{i}", tmp_path / f"{i}.safetensors", EVERYONE)
        few = {k: every[k] for k in list(every)[:8]}
        save_file(few, tmp_path / "few.safetensors")
        save_file(every, tmp_path / "all.safetensors")
        assert _push(store, "few", tmp_path / "few.safetensors", EVERYONE).new_bytes == 0
        assert len(_segments(store, "few")) == 8
        assert _push(store, "all", tmp_path / "all.safetensors", EVERYONE).new_bytes > 0
        assert len(_segments(store, "all")) == 1
        opened = store.open("all", owner=1)
        assert len(opened.segments) == 1
        store.release_owner(1)
    finally:
        store.close()


def _push_seeded_store(tmp_path) -> int:
    from trims.acl import EVERYONE
    from trims.store import Store

    store = Store(tmp_path / "store", host_capacity=1 << 30)
    try:
        for seed in range(2):
            path = tmp_path / f"{seed}.safetensors"
            save_file({"w": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(seed))}, path)
            _push(store, f"m{seed}", path, EVERYONE)
        return store.catalog.segments[_segments(store, "m0")[0]].size
    finally:
        store.close()


def _segments(store, name: str) -> tuple[str, ...]:
    return store._placement(store._resolve(name)[1]).segments


def test_a_fine_tune_or_a_part_reuses_stored_tensors_and_maps_only_what_it_needs(daemon, tmp_path):
    """One user: a stored tensor is reused when at least half the segment holding it is the new
    model's; opening a model maps the fewest segments that hold its tensors."""
    common, head, extra = torch.arange(4096.0), torch.randn(1024), torch.randn(256)
    save_file({"common": common, "head": head}, tmp_path / "base.safetensors")
    save_file({"common": common}, tmp_path / "part.safetensors")
    save_file({"head": head}, tmp_path / "small-part.safetensors")
    save_file({"common": common, "head": head, "extra": extra}, tmp_path / "extended.safetensors")
    client = daemon.client()
    client.push(tmp_path / "base.safetensors", "base")
    assert client.push(tmp_path / "part.safetensors", "part").new_bytes == 0
    # 4 KiB of a 20 KiB segment: stored again rather than keeping 16 KiB of others' bytes mapped
    assert client.push(tmp_path / "small-part.safetensors", "small-part").new_bytes == 4096
    extended = client.push(tmp_path / "extended.safetensors", "extended")
    assert extended.new_bytes == 1024 and client.info("extended").segments == 2
    with client.open("part") as view:
        assert view["common"].tobytes() == common.numpy().tobytes() and len(view.segments) == 1


def test_removing_a_base_repacks_what_its_fine_tunes_still_use(daemon, tmp_path):
    """A removed model's tensors leave the segments other models are read from: no one maps
    them any more, and the disk gets their bytes back."""
    common, head, tuned_head = torch.arange(4096.0), torch.randn(1024), torch.randn(1024)
    save_file({"common": common, "head": head}, tmp_path / "base.safetensors")
    save_file({"common": common, "head": tuned_head}, tmp_path / "tuned.safetensors")
    client = daemon.client()
    client.push(tmp_path / "base.safetensors", "base")
    assert client.push(tmp_path / "tuned.safetensors", "tuned").new_bytes == 4096
    held = client.open("tuned")  # a lease across the repack: its mapping stays valid
    before = client.stats()["tiers"]["disk"]["used_bytes"]
    client.remove("base")
    with client.open("tuned") as view:
        assert sorted(len(s) for s in view.segments) == [4096, 16384]  # nothing of "head" is mapped
        assert view["head"].tobytes() == tuned_head.numpy().tobytes()
        assert view["common"].tobytes() == common.numpy().tobytes()
    assert held["common"].tobytes() == common.numpy().tobytes()
    held.close()
    assert client.stats()["tiers"]["disk"]["used_bytes"] == before - 4096
    assert client.info("tuned").segments == 2


def test_a_repacked_segment_holds_its_room_on_disk_until_the_tier_counts_it(tmp_path):
    """Checking a repacked copy reads all of it: a push meanwhile must not take the room its
    file already fills, so the room stays reserved until the disk tier has adopted the file."""
    from trims.acl import EVERYONE
    from trims.store import Store

    common, head, tuned_head = torch.arange(4096.0), torch.randn(1024), torch.randn(1024)
    save_file({"common": common, "head": head}, tmp_path / "base.safetensors")
    save_file({"common": common, "head": tuned_head}, tmp_path / "tuned.safetensors")
    store = Store(tmp_path / "store", host_capacity=1 << 30)
    try:
        _push(store, "base", tmp_path / "base.safetensors", EVERYONE)
        _push(store, "tuned", tmp_path / "tuned.safetensors", EVERYONE)
        disk_stats = lambda: store.stats()["tiers"]["disk"]  # noqa: E731
        used_before, checked_new_file, verify = disk_stats()["used_bytes"], [], store.disk.verify

        def verify_and_look(layout, path=None):
            verify(layout, path)
            if path is not None:
                checked_new_file.append((disk_stats()["reserved_bytes"], disk_stats()["used_bytes"]))

        store.disk.verify = verify_and_look
        store.remove("base")
        assert checked_new_file == [(4 * 4096, used_before)]  # the new file's room, before it is adopted
        assert disk_stats()["reserved_bytes"] == 0
        assert disk_stats()["used_bytes"] == used_before - 4096
    finally:
        store.close()


def _push(store, name: str, path, tenant):
    from trims.sources import FileSource

    fd = os.open(path, os.O_RDONLY)
    try:
        return store.push(name, [FileSource("model.safetensors", fd)], tenant=tenant)
    finally:
        os.close(fd)


def test_storage_is_shared_only_where_every_reader_may_read_all_of_it(tmp_path):
    """Mapping a segment exposes all of it: a model reuses another's segment only if each of
    its readers may read every other tensor there. If the config later narrows, an open
    that would expose a tensor is refused, until the tensor's own model is removed."""
    from trims.acl import AccessPolicy, Tenant
    from trims.store import Store

    a = Tenant("a", uids=frozenset({1}), namespaces=("a/*", "shared/*"), push=("a/*", "shared/*"))
    b = Tenant("b", uids=frozenset({2}), namespaces=("b/*", "shared/*"), push=("b/*",))
    b_sees_a = Tenant("b", uids=frozenset({2}), namespaces=("a/*", "b/*", "shared/*"), push=("b/*",))
    common, secret, extra = torch.arange(4096.0), torch.randn(1024), torch.randn(256)
    save_file({"common": common, "secret": secret}, tmp_path / "base.safetensors")
    save_file({"common": common}, tmp_path / "part.safetensors")
    save_file({"common": common, "secret": secret, "extra": extra}, tmp_path / "tuned.safetensors")

    store = Store(tmp_path / "store", host_capacity=1 << 30, access=AccessPolicy((a, b)))
    try:
        _push(store, "a/base", tmp_path / "base.safetensors", a)
        assert _push(store, "b/part", tmp_path / "part.safetensors", b).new_bytes == 16384  # not a's segment
        opened = store.open("b/part", owner=1, tenant=b)
        assert [s.size for s in opened.segments] == [16384]  # nothing of "secret" is mapped
        assert _push(store, "a/tuned", tmp_path / "tuned.safetensors", a).new_bytes == 1024  # a's own base
        assert _push(store, "shared/part", tmp_path / "part.safetensors", a).new_bytes == 0  # b/part's segment
        # Re-pointing a name: its old model does not vouch for the new one's extras.
        _push(store, "shared/x", tmp_path / "tuned.safetensors", a)
        _push(store, "shared/x", tmp_path / "part.safetensors", a)
        assert [s.size for s in store.open("shared/x", owner=2, tenant=b).segments] == [16384]
    finally:
        store.close()

    store = Store(tmp_path / "store2", host_capacity=1 << 30, access=AccessPolicy((a, b_sees_a)))
    try:
        _push(store, "a/base", tmp_path / "base.safetensors", a)
        assert _push(store, "shared/part", tmp_path / "part.safetensors", a).new_bytes == 0  # b may read a/base
    finally:
        store.close()
    store = Store(tmp_path / "store2", host_capacity=1 << 30, access=AccessPolicy((a, b)))  # b no longer sees a/*
    try:
        assert store.open("shared/part", owner=1, tenant=a).segments
        with pytest.raises(trims.PermissionDenied, match="push it again"):
            store.open("shared/part", owner=2, tenant=b)
        store.remove("a/base", tenant=a)  # "secret" is nobody's now: it leaves the segment
        assert [s.size for s in store.open("shared/part", owner=2, tenant=b).segments] == [16384]
    finally:
        store.close()


def test_side_file_names_are_plain_relative_paths_each_spelled_one_way():
    """./config.json beside config.json would be two stored files that a directory holds as
    one (transformers' snapshot keeps either)."""
    from trims.ingest import plain_label

    assert plain_label("config.json") and plain_label("tokenizer/vocab.txt") and plain_label("a.b/c..d")
    for bad in ("./config.json", "a/./b", "../x", "a/..", ".", "a b", "/abs", "a//b", "", "x" * 256):
        assert not plain_label(bad), bad


def test_a_models_lease_quota_counts_while_an_open_of_it_is_under_way(tmp_path, monkeypatch):
    """An open of a model the tenant holds already adds nothing to its quota; but if that
    lease ends while the open is under way, the model must still count until the new lease
    exists, or another model slips in past the quota. Two first opens of one model at once
    count it once."""
    import threading

    from trims.acl import AccessPolicy, Tenant
    from trims.errors import QuotaExceeded
    from trims.store import Store

    tenant = Tenant("t", uids=frozenset({os.getuid()}), namespaces=("*",), admin=True, max_leased_bytes=2 * 16384 + 100)
    store = Store(tmp_path / "store", host_capacity=1 << 26, access=AccessPolicy((tenant,)))
    try:
        for i, name in enumerate("abc"):
            save_file({"w": torch.full((4096,), float(i))}, tmp_path / f"{name}.safetensors")
            _push(store, name, tmp_path / f"{name}.safetensors", tenant)
        gate, entered = threading.Event(), threading.Event()
        acquire = store._acquire_all

        def held_open(*args, **kwargs):
            if threading.current_thread().name == "held":
                entered.set()
                gate.wait(10)
            return acquire(*args, **kwargs)

        monkeypatch.setattr(store, "_acquire_all", held_open)
        first_a, b = store.open("a", owner=1, tenant=tenant), store.open("b", owner=1, tenant=tenant)
        again = threading.Thread(target=lambda: store.open("a", owner=2, tenant=tenant), name="held")
        again.start()
        assert entered.wait(10)
        store.release(first_a.lease, 1)
        with pytest.raises(QuotaExceeded, match="holds or is opening models of 32768 bytes"):
            store.open("c", owner=1, tenant=tenant)  # a (being opened) and b: the quota is full
        gate.set()
        again.join(10)
        store.release_owner(1), store.release_owner(2)
        # two first opens of one model at once, under a quota of that one model
        tenant_one = dataclasses.replace(tenant, max_leased_bytes=16384)
        gate.clear()
        entered.clear()
        again = threading.Thread(target=lambda: store.open("a", owner=2, tenant=tenant_one), name="held")
        again.start()
        assert entered.wait(10)
        store.open("a", owner=1, tenant=tenant_one)
        gate.set()
        again.join(10)
        assert store.usage(tenant_one)["leases"] == 2 and store.usage(tenant_one)["leased_bytes"] == 16384
    finally:
        store.close()


def test_a_wait_for_memory_abandoned_makes_no_room_when_memory_frees(tmp_path):
    """A pull waiting (busy timeout) for a lease to end, whose requester has gone: when the
    lease ends, it neither evicts the model nor loads its own for no one, and fails at once."""
    import threading

    from trims.acl import EVERYONE
    from trims.errors import CapacityError
    from trims.store import Store

    from .conftest import make_models

    make_models(tmp_path, range(2))
    store = Store(tmp_path / "store", host_capacity=300 * 1024, busy_timeout=60)
    try:
        for seed in range(2):
            _push(store, f"m{seed}", tmp_path / f"m{seed}.safetensors", EVERYONE)
        held = store.open("m0", owner=1)
        abandoned, outcome = threading.Event(), []

        def pull() -> None:
            try:
                outcome.append(store.pull("m1", abandoned=abandoned))
            except CapacityError as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=pull)
        waiter.start()
        wait_for(lambda: store.stats()["waiting_for_room"] == 1, message="the pull to wait")
        abandoned.set()
        store.release(held.lease, owner=1)  # wakes the waiter, as the end of its connection would
        waiter.join(10)
        assert not waiter.is_alive() and isinstance(outcome[0], CapacityError), outcome
        assert "client went away" in str(outcome[0])
        assert store.info("m0").tiers[0] == "host" and store.info("m1").tiers[0] != "host"
    finally:
        store.close()
