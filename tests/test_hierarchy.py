"""Host over disk over cloud, end to end: a real daemon, a real S3 endpoint, real pressure."""

from __future__ import annotations

import threading
from pathlib import Path
import time
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import trims

from .conftest import DaemonProcess, make_models, open_concurrently, wait_for
from .models import build

KIB = 1024
MODEL_BYTES = 64 * KIB * 4  # each test model: one 256 KiB tensor


def tiers_of(client: trims.Client, name: str) -> tuple[str, ...]:
    return client.info(name).tiers


@pytest.fixture
def bucket(s3) -> str:
    return s3.new_bucket()


def test_the_disk_gives_up_only_what_the_cloud_holds(tmp_path, s3, bucket):
    weights = make_models(tmp_path, range(5))
    daemon = DaemonProcess(tmp_path / "d", host_memory="1M", extra=("--disk", "600K")).start()  # two models' room
    try:
        client = daemon.client()
        for seed in (0, 1):
            client.push(tmp_path / f"m{seed}.safetensors", f"m{seed}", to=f"s3://{bucket}/trims")
        assert tiers_of(client, "m0") == ("disk", "cloud")
        client.push(tmp_path / "m2.safetensors", "m2")  # no cloud copy: the disk holds the only one
        assert tiers_of(client, "m0") == ("cloud",) and tiers_of(client, "m2") == ("disk",)
        client.push(tmp_path / "m3.safetensors", "m3")  # m1 has a cloud copy: it makes room
        assert tiers_of(client, "m1") == ("cloud",)
        with pytest.raises(trims.CapacityError, match="disk tier is full"):
            client.push(tmp_path / "m4.safetensors", "m4")  # m2 and m3 are last copies
        assert {m.name for m in client.list()} == {"m0:latest", "m1:latest", "m2:latest", "m3:latest"}
        assert not list((daemon.store / "tmp").iterdir())
        stats = client.stats()
        assert stats["tiers"]["disk"]["used_bytes"] <= 600 * KIB
        with client.open("m0") as view:  # back from the cloud, verified, into host memory
            assert np.array_equal(view["w"], weights[0])
        assert "host" in tiers_of(client, "m0")
        assert client.stats()["fetches"]["cloud->host"]["count"] + client.stats()["fetches"].get("cloud->disk", {}).get("count", 0) == 1
    finally:
        daemon.kill()


def test_a_push_of_bytes_the_store_holds_needs_no_room_for_them(tmp_path):
    """A deploy pipeline pushing again, or a fine-tune sharing most tensors, onto a full disk:
    the push is hashed first, and only the tensors the store lacks need room."""
    weights = make_models(tmp_path, range(3))
    head = torch.randn(256, generator=torch.Generator().manual_seed(7))
    save_file({"w": torch.from_numpy(weights[0]), "head": head}, tmp_path / "tuned.safetensors")
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "600K")).start()  # two models' room
    try:
        client = daemon.client()
        def push(path, name):
            """The push's result, and the last progress report of each stage, in order."""
            stages: dict[str, tuple[int, int]] = {}
            result = client.push(path, name, progress=lambda stage, done, total: stages.update({stage: (done, total)}))
            return result, list(stages.items())

        for seed in (0, 1):  # no cloud: last copies, so the disk is full for a third model
            assert push(tmp_path / f"m{seed}.safetensors", f"m{seed}")[1] == [("push", (MODEL_BYTES, MODEL_BYTES))]
        again, stages = push(tmp_path / "m0.safetensors", "m0-again")
        assert again.new_bytes == 0 and again.digest == client.info("m0").digest
        assert stages == [("hash", (MODEL_BYTES, MODEL_BYTES))]  # nothing to write
        tuned, stages = push(tmp_path / "tuned.safetensors", "tuned")
        assert tuned.new_bytes == head.numel() * 4
        assert stages == [("hash", (MODEL_BYTES + 1024, MODEL_BYTES + 1024)), ("write", (1024, 1024))]
        with client.open("tuned") as view:
            assert np.array_equal(view["w"], weights[0]) and np.array_equal(view["head"], head.numpy())
        with pytest.raises(trims.CapacityError, match="disk tier is full"):
            client.push(tmp_path / "m2.safetensors", "m2")  # new bytes still need room
        assert client.stats()["tiers"]["disk"]["used_bytes"] <= 600 * KIB
        assert not list((daemon.store / "tmp").iterdir())
    finally:
        daemon.kill()


def test_with_a_cloud_location_every_push_is_uploaded(tmp_path, s3, bucket):
    make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d", extra=("--cloud", f"s3://{bucket}/trims")).start()
    # Another node's daemon on the same prefix keeps a copy of its own, which ours never deletes
    other = DaemonProcess(tmp_path / "other", extra=("--cloud", f"s3://{bucket}/trims")).start()
    try:
        client = daemon.client()
        client.push(tmp_path / "m0.safetensors", "m0")
        assert tiers_of(client, "m0") == ("disk", "cloud")
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert len(keys) == 1 and keys[0].startswith("trims/segments/")
        other.client().push(tmp_path / "m0.safetensors", "m0")
        client.remove("m0")  # the uploaded copy is the daemon's: removed with the model
        wait_for(lambda: s3.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 1, message="its deletion")
        (kept,) = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert kept != keys[0] and tiers_of(other.client(), "m0") == ("disk", "cloud")
        other.client().remove("m0")
        wait_for(lambda: s3.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0, message="its deletion")
    finally:
        daemon.kill()
        other.kill()


def test_a_failed_upload_says_the_model_is_stored_and_a_push_again_uploads_it(tmp_path, s3, bucket):
    make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        with pytest.raises(trims.StorageError, match="m0:latest is stored on this node, but uploading it to "
                                                     "s3://no-such-bucket/trims failed") as failed:
            client.push(tmp_path / "m0.safetensors", "m0", to="s3://no-such-bucket/trims")
        assert "Push it again with the same --to" in str(failed.value)
        assert tiers_of(client, "m0") == ("disk",)
        assert client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims").uploaded_bytes == MODEL_BYTES
        assert tiers_of(client, "m0") == ("disk", "cloud")
        # The cloud tier holds the segment already: a push elsewhere uploads nothing, and says so
        assert client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{s3.new_bucket()}/x").uploaded_bytes == 0
    finally:
        daemon.kill()


def test_clients_may_not_make_the_daemon_touch_local_paths(daemon, tmp_path):
    make_models(tmp_path, [0])
    client = daemon.client()
    with pytest.raises(trims.PermissionDenied, match="file:// is not for clients"):
        client.push(f"file://{tmp_path}", "stolen")
    with pytest.raises(trims.PermissionDenied, match="file:// is not for clients"):
        client.push(tmp_path / "m0.safetensors", "m0", to=f"file://{tmp_path}/planted")
    with pytest.raises(trims.PermissionDenied, match="https:// is not for clients"):
        client.push("https://169.254.169.254/latest/meta-data", "x")
    # nor by a URL without a bucket, which fsspec takes for a path beside the daemon (its
    # owner, an admin, is no exception)
    with pytest.raises(trims.InvalidName, match="'s3://' names no bucket"):
        client.push(tmp_path / "m0.safetensors", "m0", to="s3://")
    assert client.list() == [] and not (tmp_path / "planted").exists()
    assert not (daemon.store.parent / "s3:").exists() and not Path("s3:").exists()


def test_pins_cannot_claim_more_than_the_tier_holds(tmp_path):
    make_models(tmp_path, range(3))
    daemon = DaemonProcess(tmp_path / "d", host_memory="600K").start()
    try:
        client = daemon.client()
        for seed in range(3):
            client.push(tmp_path / f"m{seed}.safetensors", f"m{seed}")
        client.pin("m0")
        client.pin("m1")
        with pytest.raises(trims.CapacityError, match="would pin"):
            client.pin("m2")
        assert client.info("m2").pinned == ""
        with pytest.raises(trims.ModelBusy, match="pinned"):
            client.evict("m0")
    finally:
        daemon.kill()


def test_a_model_larger_than_the_disk_cap_is_refused_at_push(tmp_path):
    make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "100K")).start()
    try:
        client = daemon.client()
        with pytest.raises(trims.CapacityError, match="larger than the disk tier's capacity"):
            client.push(tmp_path / "m0.safetensors", "m0")
        assert client.list() == [] and not list((daemon.store / "tmp").iterdir())
    finally:
        daemon.kill()


def test_a_model_registered_from_a_bucket_is_served_and_evictable_from_disk(tmp_path, s3, bucket):
    model, factory = build("gpt2", tmp_path / "gpt2")
    s3.upload_directory(tmp_path / "gpt2", bucket, "models/gpt2")
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        pushed = client.push(f"s3://{bucket}/models/gpt2", "gpt2")
        local = client.push(tmp_path / "gpt2", "gpt2-local")
        assert pushed.digest == local.digest and local.new_bytes == 0  # identity is content
        assert tiers_of(client, "gpt2") == ("disk", "cloud")
        assert client.info("gpt2").files == ("config.json", "generation_config.json")
        import trims.torch

        shared = trims.torch.load_model("gpt2", factory, client=client)
        from .models import output_of

        assert torch.equal(output_of(shared, "gpt2"), output_of(model, "gpt2"))
    finally:
        daemon.kill()


def test_concurrent_opens_of_a_cold_cloud_model_cause_one_get_series(tmp_path, s3, bucket):
    make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "300K")).start()
    try:
        client = daemon.client()
        client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims")
        make_models(tmp_path, [1])
        client.push(tmp_path / "m1.safetensors", "m1", to=f"s3://{bucket}/trims")  # pushes m0 off the disk
        client.evict("m0")
        assert tiers_of(client, "m0") == ("cloud",)
        gets_before = s3.gets("/trims/segments/")
        views = open_concurrently([daemon.client() for _ in range(8)], "m0")
        assert len(views) == 8
        assert s3.gets("/trims/segments/") - gets_before == 1  # one tensor of 256 KiB: one ranged GET, once
        fetches = client.stats()["fetches"]
        assert sum(f["count"] for route, f in fetches.items() if route.startswith("cloud->")) == 1
        assert len({v["w"].tobytes() for v in views}) == 1
    finally:
        daemon.kill()


def _m0_only_in_the_cloud(client, daemon, tmp_path, s3, bucket) -> str:
    """Push m0 and m1 to the bucket, so that m1 pushes m0 off the 300K disk, evict m0 from
    memory; the key of m0's one copy left, its object in the bucket."""
    client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims")
    client.push(tmp_path / "m1.safetensors", "m1", to=f"s3://{bucket}/trims")
    client.evict("m0")
    return next(k for k in [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
                if k.endswith(".bin") and not (daemon.store / "disk" / k.rsplit("/", 1)[1]).exists())


def test_a_cloud_that_cannot_be_read_fails_the_open_once_not_again_into_memory(tmp_path, s3, bucket):
    """Staging on disk falls back to reading into memory when the disk cannot take the
    segment; when it is the cloud that fails, that second read would fail the same way."""
    make_models(tmp_path, [0, 1])
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "300K")).start()
    try:
        client = daemon.client()
        s3.client().delete_object(Bucket=bucket, Key=_m0_only_in_the_cloud(client, daemon, tmp_path, s3, bucket))
        gets_before = s3.gets("/trims/segments/")
        with pytest.raises(trims.StorageError, match="no such object"):
            client.open("m0")
        assert s3.gets("/trims/segments/") - gets_before == 1
        assert "could not stage segment" not in daemon.log()
        assert client.stats()["fetches"].get("cloud->host", {}).get("count", 0) == 0
    finally:
        daemon.kill()


def test_a_corrupted_byte_in_the_bucket_is_never_served_and_a_push_restores_the_copy(tmp_path, s3, bucket):
    weights = make_models(tmp_path, [0, 1])
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "300K")).start()
    try:
        client = daemon.client()
        key = _m0_only_in_the_cloud(client, daemon, tmp_path, s3, bucket)
        data = bytearray(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        data[100] ^= 0x01
        s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        with pytest.raises(trims.IntegrityError, match="cloud.*No other tier holds it: push the model again"):
            client.open("m0")
        assert tiers_of(client, "m0") == ()  # that copy is no copy: forgotten, its object left as it is
        assert client.stats()["corrupt_copies"] == {"cloud": 1}
        with pytest.raises(trims.IntegrityError, match="bytes are lost; push the model again"):
            client.open("m0")
        assert client.stats()["tiers"]["host"]["used_bytes"] == 0
        assert not list((daemon.store / "tmp").iterdir())
        with client.open("m1"):
            pass
        client.evict("m1")
        assert client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims").new_bytes == MODEL_BYTES
        with client.open("m0") as view:
            assert np.array_equal(view["w"], weights[0])
        assert s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() != bytes(data)  # uploaded again
    finally:
        daemon.kill()


def test_a_damaged_disk_copy_is_never_uploaded(tmp_path, s3, bucket):
    make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        client.push(tmp_path / "m0.safetensors", "m0")
        (segment,) = (daemon.store / "disk").glob("*.bin")
        data = bytearray(segment.read_bytes())
        data[100] ^= 0x01
        segment.write_bytes(bytes(data))
        # The same bytes again: the push relies on the stored segment, whose upload finds it damaged.
        with pytest.raises(trims.IntegrityError, match="disk tier.*No other tier holds it: push the model again"):
            client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims")
        assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket)
        assert client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims").new_bytes == MODEL_BYTES
        assert tiers_of(client, "m0") == ("disk", "cloud")
    finally:
        daemon.kill()


def test_a_corrupt_disk_copy_is_set_aside_and_fetched_again_from_the_bucket(tmp_path, s3, bucket):
    weights = make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims")
        client.evict("m0")
        (segment,) = (daemon.store / "disk").glob("*.bin")
        data = bytearray(segment.read_bytes())
        data[100] ^= 0x01
        segment.write_bytes(bytes(data))
        views = open_concurrently([daemon.client() for _ in range(4)], "m0")  # one fetch, which heals
        assert len(views) == 4 and all(np.array_equal(v["w"], weights[0]) for v in views)
        stats = client.stats()
        assert stats["corrupt_copies"] == {"disk": 1}
        assert stats["fetches"]["cloud->disk"]["count"] == 1
        (kept,) = (daemon.store / "corrupt").glob(f"{segment.stem}-*.bin")
        assert kept.read_bytes() == data
        assert segment.read_bytes() != data  # the disk holds a good copy again
        assert tiers_of(client, "m0") == ("host", "disk", "cloud")
        for view in views:
            view.close()
        assert client.stats()["tiers"]["disk"]["reserved_bytes"] == 0
        client.evict("m0")  # nothing still counts as reading or loading it
    finally:
        daemon.kill()


@pytest.mark.parametrize("policy, survivor", [("lru", "m1"), ("lfu", "m0"), ("fifo", "m1")])
def test_each_policy_evicts_the_model_it_should(tmp_path, policy, survivor):
    make_models(tmp_path, range(3))
    daemon = DaemonProcess(tmp_path / "d", host_memory="600K", extra=("--policy", policy)).start()
    try:
        client = daemon.client()
        for seed in range(3):
            client.push(tmp_path / f"m{seed}.safetensors", f"m{seed}")
        for name in ("m0", "m0", "m0", "m1"):  # m0: older but used more; m1: newer, used once
            client.open(name).close()
        client.open("m2").close()  # room for two: one of m0, m1 must go
        resident = {n for n in ("m0", "m1") if "host" in tiers_of(client, n)}
        assert resident == {survivor}
        assert client.stats()["policy"] == policy
    finally:
        daemon.kill()


def test_pinned_and_leased_models_survive_pressure_and_pins_rewarm_after_restart(tmp_path):
    make_models(tmp_path, range(4))
    daemon = DaemonProcess(tmp_path / "d", host_memory="600K").start()
    try:
        client = daemon.client()
        for seed in range(4):
            client.push(tmp_path / f"m{seed}.safetensors", f"m{seed}")
        assert client.pin("m0") == MODEL_BYTES
        held = client.open("m1")
        with pytest.raises(trims.CapacityError, match="leased, pinned"):
            client.open("m2")
        held.close()
        for name in ("m2", "m3", "m2"):
            client.open(name).close()
        assert "host" in tiers_of(client, "m0") and client.info("m0").pinned == "host"
        daemon.stop()
        daemon = DaemonProcess(tmp_path / "d", host_memory="600K").start()
        client = daemon.client()
        wait_for(lambda: "host" in tiers_of(client, "m0"), message="the pinned model to be warm again")
        assert client.stats()["opens"]["total"] == 0  # warmed, not opened
        client.unpin("m0")
        for name in ("m1", "m2"):
            client.open(name).close()
        assert "host" not in tiers_of(client, "m0")
    finally:
        daemon.kill()


def test_an_open_waits_for_a_release_up_to_the_busy_timeout(tmp_path):
    make_models(tmp_path, range(2))
    daemon = DaemonProcess(tmp_path / "d", host_memory="300K", extra=("--busy-timeout", "20")).start()
    try:
        client = daemon.client()
        for seed in range(2):
            client.push(tmp_path / f"m{seed}.safetensors", f"m{seed}")
        held = client.open("m0")
        timer = threading.Timer(0.5, held.close)
        timer.start()
        started = time.monotonic()
        with daemon.client().open("m1") as view:  # waits until m0's lease ends
            assert view["w"].shape == (64 * KIB,)
        assert time.monotonic() - started >= 0.4
        timer.join()
    finally:
        daemon.kill()


def test_pull_warms_without_a_lease(tmp_path, s3, bucket):
    make_models(tmp_path, range(2))
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "300K")).start()
    try:
        client = daemon.client()
        client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims")
        client.push(tmp_path / "m1.safetensors", "m1", to=f"s3://{bucket}/trims")
        assert tiers_of(client, "m0") == ("cloud",)
        updates = []
        assert client.pull("m0", "disk", progress=lambda *u: updates.append(u)) == MODEL_BYTES
        assert tiers_of(client, "m0") == ("disk", "cloud") and updates[-1][1:] == (MODEL_BYTES, MODEL_BYTES)
        assert client.pull("m0") == MODEL_BYTES
        assert tiers_of(client, "m0") == ("host", "disk", "cloud") and client.stats()["leases"] == 0
        assert client.pull("m0") == 0
    finally:
        daemon.kill()


def test_restart_keeps_disk_and_cloud_tiers(tmp_path, s3, bucket):
    weights = make_models(tmp_path, range(2))
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "300K")).start()
    client = daemon.client()
    client.push(tmp_path / "m0.safetensors", "m0", to=f"s3://{bucket}/trims")
    client.push(tmp_path / "m1.safetensors", "m1")
    daemon.stop()
    daemon = DaemonProcess(tmp_path / "d", extra=("--disk", "300K")).start()
    try:
        client = daemon.client()
        assert tiers_of(client, "m0") == ("cloud",) and tiers_of(client, "m1") == ("disk",)
        with client.open("m0") as view:
            assert np.array_equal(view["w"], weights[0])
    finally:
        daemon.kill()


def test_prometheus_endpoint(tmp_path):
    make_models(tmp_path, [0])
    daemon = DaemonProcess(tmp_path / "d", extra=("--metrics-port", "0")).start()
    try:
        client = daemon.client()
        client.push(tmp_path / "m0.safetensors", "m0")
        client.open("m0").close()
        port = client.stats()["daemon"]["metrics_port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'trims_tier_bytes{tier="host"} 262144' in text
        assert 'trims_opens_total{result="miss"} 1' in text
        assert 'trims_fetches_total{destination="host",source="disk"} 1' in text
        assert "trims_open_seconds_bucket" in text and 'trims_tier_capacity_bytes{tier="host"}' in text
        assert "# TYPE trims_leases gauge" in text
    finally:
        daemon.kill()


def test_a_config_file_sets_what_flags_do_not(tmp_path):
    config = tmp_path / "trims.toml"
    config.write_text('host_memory = "3M"\ndisk = "10M"\npolicy = "lfu"\n')
    daemon = DaemonProcess(tmp_path / "d", extra=("--config", str(config), "--policy", "fifo")).start()
    try:
        stats = daemon.client().stats()
        assert stats["tiers"]["disk"]["capacity_bytes"] == 10 * 2**20
        assert stats["policy"] == "fifo"  # the flag wins
    finally:
        daemon.kill()
    config.write_text('host_memory = "3M"\nhost_mem = 1\n')
    with pytest.raises(RuntimeError, match="unknown setting 'host_mem'"):
        DaemonProcess(tmp_path / "e", extra=("--config", str(config))).start()


@pytest.mark.parametrize("from_bucket", [False, True], ids=["uploaded", "pushed-from-the-bucket"])
def test_a_repack_checks_what_it_copies_and_takes_a_damaged_copy_from_the_bucket(tmp_path, s3, bucket, from_bucket):
    """Removing a base repacks its fine-tune's tensors into a new segment, which no bucket
    holds yet: copying damaged bytes into it would lose the model though the bucket has them.
    The new segment's cloud copy is an upload where the old one's was, or the bucket's objects."""
    common, head, tuned_head = torch.arange(4096.0), torch.randn(1024), torch.randn(1024)
    for name, tensors in (("base", {"common": common, "head": head}), ("tuned", {"common": common, "head": tuned_head})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        s3.client().upload_file(str(tmp_path / name / "model.safetensors"), bucket, f"models/{name}/model.safetensors")
    daemon = DaemonProcess(tmp_path / "d").start()
    try:
        client = daemon.client()
        for name in ("base", "tuned"):
            if from_bucket:
                client.push(f"s3://{bucket}/models/{name}", name)
            else:
                client.push(tmp_path / name, name, to=f"s3://{bucket}/trims")
        shared = max((daemon.store / "disk").glob("*.bin"), key=lambda p: p.stat().st_size)
        data = bytearray(shared.read_bytes())
        data[100] ^= 0x01
        shared.write_bytes(bytes(data))
        client.remove("base")
        assert client.stats()["corrupt_copies"] == {"disk": 1}
        (kept,) = (daemon.store / "corrupt").glob(f"{shared.stem}-*.bin")
        assert kept.read_bytes() == data
        client.evict("tuned")
        with client.open("tuned") as view:
            assert view["common"].tobytes() == common.numpy().tobytes()
            assert view["head"].tobytes() == tuned_head.numpy().tobytes()
            assert sorted(len(s) for s in view.segments) == [4096, 16384]  # repacked from the bucket's copy
        assert tiers_of(client, "tuned") == ("host", "disk", "cloud")

        def uploaded_sizes() -> list[int]:
            return sorted(o["Size"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="trims/").get("Contents", []))

        # The old segment's upload is deleted (in the background), the new one's in its place.
        wait_for(lambda: uploaded_sizes() == ([] if from_bucket else [4096, 16384]), message="the old upload deleted, the new one made")
    finally:
        daemon.kill()
