"""The store's GPU tier bookkeeping, over the memfd stand-in for the CUDA driver
(tests/fake_cuda.py): one upload per segment whoever asks, leases that hold copies, a cap
that evicts only unleased ones, failures that leave nothing behind. tests/test_gpu.py
checks the same paths against a real GPU."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from trims.acl import EVERYONE
from trims.errors import CapacityError, GpuError, ModelBusy
from trims.store import Store, _Patience

from .conftest import wait_for
from .fake_cuda import FakeDriver
from .test_store import _push, _segments

GRANULE = 64 * 1024
MODEL_BYTES = 64 * 1024 * 4  # one float32 tensor of 64 Ki elements: four granules


@pytest.fixture
def driver():
    return FakeDriver(granularity=GRANULE)


def make_store(tmp_path, driver, gpu_capacity=2 * MODEL_BYTES + GRANULE, models=4) -> Store:
    store = Store(tmp_path / "store", host_capacity=1 << 30, gpu_capacity=gpu_capacity, gpu_driver=lambda: driver)
    for seed in range(models):
        path = tmp_path / f"{seed}.safetensors"
        save_file({"w": torch.randn(MODEL_BYTES // 4, generator=torch.Generator().manual_seed(seed))}, path)
        _push(store, f"m{seed}", path, EVERYONE)
    return store


@pytest.fixture
def store(tmp_path, driver):
    store = make_store(tmp_path, driver)
    yield store
    store.close()
    assert driver.open_handles() == 0  # every device allocation released


def gpu_bytes(store) -> int:
    return store.stats()["tiers"]["gpu:0"]["used_bytes"]


def test_opening_on_a_device_uploads_once_and_every_open_shares_that_copy(store, driver):
    first = store.open("m0", owner=1, device=0)
    second = store.open("m0", owner=2, device=0)
    assert first.device == second.device == 0
    assert first.segments == second.segments and driver.uploads == len(first.segments)
    (segment,) = first.segments
    host_copy = store.host.get(segment.id)
    assert os.pread(segment.fd, segment.size, 0) == os.pread(host_copy.fd, segment.size, 0)
    assert segment.mapped_size % GRANULE == 0 and gpu_bytes(store) == segment.mapped_size
    assert "gpu:0" in store.info("m0").tiers
    stats = store.stats()["tiers"]["gpu:0"]
    assert (stats["hits"], stats["misses"]) == (1, 1)
    assert stats["sharing"] == "vmm-posix-fd" and stats["read_only_mapping"] is True


def test_concurrent_opens_of_a_cold_model_cause_one_upload(store, driver):
    results, barrier = [], threading.Barrier(6)

    def open_it(owner):
        barrier.wait()
        results.append(store.open("m1", owner=owner, device=0))

    threads = [threading.Thread(target=open_it, args=(owner,)) for owner in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and len({tuple(s.fd for s in r.segments) for r in results}) == 1
    assert driver.uploads == 1


def test_the_cap_evicts_unleased_copies_and_never_leased_ones(store):
    held = store.open("m0", owner=1, device=0)
    released = store.open("m1", owner=2, device=0)
    store.release(released.lease, owner=2)
    store.open("m2", owner=3, device=0)  # room only by evicting m1's copy
    tiers = {name: store.info(name).tiers for name in ("m0", "m1", "m2")}
    assert "gpu:0" in tiers["m0"] and "gpu:0" not in tiers["m1"] and "gpu:0" in tiers["m2"]
    assert gpu_bytes(store) <= store.gpu_capacity
    with pytest.raises(CapacityError, match="--gpu-memory"):
        store.open("m3", owner=4, device=0)  # m0 and m2 are leased: nothing may go
    store.release_owner(1)  # a client that went away lets go of its copies
    store.open("m3", owner=4, device=0)
    assert "gpu:0" not in store.info("m0").tiers and held.lease not in store._leases


def test_evict_and_remove_drop_gpu_copies_once_unused(store):
    opened = store.open("m0", owner=1, device=0)
    with pytest.raises(ModelBusy):
        store.evict("m0")
    store.release(opened.lease, owner=1)
    assert store.evict("m0") > 0 and gpu_bytes(store) == 0
    store.open("m1", owner=1, device=0)
    store.release_owner(1)
    store.remove("m1")
    assert gpu_bytes(store) == 0


def test_evict_takes_one_tier_leaving_the_other_copy_serving(store, driver):
    """Freeing device memory need not cost the host copy (the next open on the device is an
    upload, not a disk read), and a host copy can go while a GPU lease holds the device's."""
    from trims.errors import InvalidName

    store.open("m0", owner=1, device=0)
    (segment_id,) = _segments(store, "m0")
    with pytest.raises(ModelBusy, match="in use in the gpu:0 tier"):
        store.evict("m0", tier="gpu:0")
    assert store.evict("m0", tier="host") == MODEL_BYTES  # the GPU lease holds no host copy
    assert not store.host.has(segment_id) and gpu_bytes(store) > 0
    store.release_owner(1)
    store.pull("m0")
    on_device = gpu_bytes(store)
    assert store.evict("m0", tier="gpu:0") == on_device > 0
    assert gpu_bytes(store) == 0 and store.host.has(segment_id)
    assert store.evict("m0", tier="gpu:1") == 0  # a device never used holds nothing
    with pytest.raises(InvalidName, match="trims rm"):
        store.evict("m0", tier="disk")
    uploads, host_hits = driver.uploads, store.stats()["tiers"]["host"]["hits"]
    store.open("m0", owner=2, device=0)
    assert driver.uploads == uploads + 1 and store.stats()["tiers"]["host"]["hits"] == host_hits + 1


def test_a_failed_upload_leaves_nothing_reserved_and_the_next_open_retries(store, driver, monkeypatch):
    def broken(*args):
        raise GpuError("the CUDA driver refused cuMemcpyHtoDAsync: out of memory")

    monkeypatch.setattr(driver, "copy_to_device", broken)
    with pytest.raises(GpuError):
        store.open("m0", owner=1, device=0)
    assert gpu_bytes(store) == 0 and store._reserved["gpu:0"] == 0 and not store._gpu_loading
    assert not store._refs  # the host copy it read is no longer held
    monkeypatch.undo()
    assert store.open("m0", owner=1, device=0).device == 0


def test_the_host_copy_is_held_only_while_it_is_uploaded(store):
    store.open("m0", owner=1, device=0)
    (segment_id,) = _segments(store, "m0")
    assert store.host.has(segment_id) and not store._refs.get(segment_id)
    store.host.evict(segment_id)  # host pressure may drop it: the GPU copy still serves
    assert store.open("m0", owner=2, device=0).device == 0


def test_a_daemon_without_gpu_memory_says_how_to_get_it(tmp_path, driver):
    store = make_store(tmp_path, driver, gpu_capacity=0, models=1)
    try:
        with pytest.raises(GpuError, match="--gpu-memory"):
            store.open("m0", owner=1, device=0)
    finally:
        store.close()


def test_a_device_the_node_lacks_is_refused(store):
    with pytest.raises(GpuError, match="no CUDA device 3"):
        store.open("m0", owner=1, device=3)


def test_without_a_cuda_driver_a_device_open_says_so(tmp_path):
    import ctypes

    try:  # as the driver binding loads it: find_library misses a libcuda reached through LD_LIBRARY_PATH
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a CUDA driver")
    except OSError:
        pass
    store = Store(tmp_path / "store", host_capacity=1 << 30, gpu_capacity=1 << 30)
    try:
        path = tmp_path / "m.safetensors"
        save_file({"w": torch.zeros(16)}, path)
        _push(store, "m", path, EVERYONE)
        with pytest.raises(GpuError, match="no CUDA driver"):
            store.open("m", owner=1, device=0)
        assert store.open("m", owner=1).device is None  # host memory still serves
    finally:
        store.close()


def test_a_client_asking_a_daemon_without_a_gpu_tier_gets_a_typed_error(daemon, tmp_path, driver, monkeypatch):
    import trims
    import trims.cuda_driver

    monkeypatch.setattr(trims.cuda_driver, "driver", lambda: driver)  # this process has a GPU; the daemon no tier
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(16)}, path)
    client = daemon.client()
    client.push(path, "m")
    with pytest.raises(trims.GpuError, match="--gpu-memory"):
        client.open("m", device=0)
    assert client.stats()["leases"] == 0 and client.open("m")["w"].shape == (16,)
    with pytest.raises(trims.GpuError, match="--gpu-memory"):  # not "freed 0 B of gpu:0"
        client.evict("m", tier="gpu:0")


def test_an_open_under_way_keeps_its_gpu_copy_from_trims_evict(store):
    (segment_id,) = _segments(store, "m0")
    tier = store._gpu_tier(0)
    store._acquire_on_gpu(tier, segment_id, _Patience(deadline=0))  # what an open holds before its lease exists
    with pytest.raises(ModelBusy):
        store.evict("m0")
    with store._changed:
        store._unref_gpu_locked(tier.name, [segment_id])
    assert store.evict("m0") > 0


@pytest.fixture
def start_gpu_daemon(tmp_path, monkeypatch):
    """Start a real daemon (socket, server, store) in this process: ``daemon_driver`` is the
    stand-in driver it sees the GPUs through, ``client_driver`` the one this process's
    clients do (two containers may number the same GPUs differently)."""
    import functools

    import trims.cuda_driver
    import trims.daemon
    from trims.config import Settings

    started = []

    def start(daemon_driver: FakeDriver, client_driver: FakeDriver):
        monkeypatch.setattr(trims.cuda_driver, "driver", lambda: client_driver)
        monkeypatch.setattr(trims.daemon, "Store", functools.partial(Store, gpu_driver=lambda: daemon_driver))
        settings = Settings.load({"socket": str(tmp_path / "run" / "trims.sock"), "store": str(tmp_path / "store"),
                                  "host_memory": "64M", "gpu_memory": "64M"})
        daemon = trims.daemon.Daemon(settings)
        thread = threading.Thread(target=daemon.serve_forever, daemon=True)
        thread.start()
        started.append((daemon, thread))
        return settings.socket_path

    yield start
    for daemon, thread in started:
        daemon.shutdown()
        thread.join(timeout=20)


@pytest.fixture
def gpu_daemon_in_process(start_gpu_daemon, driver):
    return start_gpu_daemon(driver, driver)


def test_a_closed_device_view_keeps_its_lease_while_its_segments_live(gpu_daemon_in_process, tmp_path):
    import gc

    import trims
    from trims.errors import ModelBusy as Busy

    save_file({"w": torch.arange(1000.0)}, tmp_path / "m.safetensors")
    client = trims.connect(gpu_daemon_in_process)
    client.push(tmp_path / "m.safetensors", "m")
    view = client.open("m", device=0)
    (segment,) = view.segments
    assert view.device == 0 and segment.read_only and segment.size % GRANULE == 0
    assert segment.__cuda_array_interface__["shape"] == (segment.size,)
    with pytest.raises(TypeError, match="GPU memory"):
        view["w"]
    view.close()  # a tensor over the segment would still read the daemon's allocation
    with pytest.raises(Busy):
        client.evict("m")
    del view, segment
    gc.collect()
    client.stats()  # carries the release the finalizer queued
    assert client.stats()["leases"] == 0 and client.evict("m") > 0


def test_trims_info_and_stats_say_how_gpu_memory_is_shared(gpu_daemon_in_process, driver, tmp_path, monkeypatch,
                                                           capsys):
    import trims
    from trims.cli import main

    save_file({"w": torch.arange(1000.0)}, tmp_path / "m.safetensors")
    client = trims.connect(gpu_daemon_in_process)
    client.push(tmp_path / "m.safetensors", "m")
    view = client.open("m", device=0)
    monkeypatch.setenv("TRIMS_SOCKET", str(gpu_daemon_in_process))
    capsys.readouterr()
    assert main(["info", "m"]) == 0 and main(["stats"]) == 0
    out = capsys.readouterr().out
    assert "tiers:    host, disk, gpu:0" in out
    assert out.count(f"{driver.uuids[0]}, shared as vmm-posix-fd, mapped read-only by clients") == 2  # info, stats
    view.close()


def test_pull_brings_a_model_into_gpu_memory_without_a_lease(store, driver):
    assert store.pull("m0", "gpu:0") == MODEL_BYTES
    assert "gpu:0" in store.info("m0").tiers and not store._leases and not store._gpu_refs
    assert store.pull("m0", "gpu:0") == 0 and driver.uploads == 1  # already there
    assert store.evict("m0") > 0  # nothing holds it


def test_a_model_pinned_in_gpu_memory_stays_under_pressure(store):
    from trims.errors import InvalidName

    store.pin("m0", "gpu:0")
    for name in ("m1", "m2", "m3"):  # room for two: each open evicts the unpinned one before it
        store.release(store.open(name, owner=1, device=0).lease, owner=1)
        assert "gpu:0" in store.info("m0").tiers
    with pytest.raises(ModelBusy, match="pinned in gpu:0"):
        store.evict("m0")
    store.pin("m1", "gpu:0")
    with pytest.raises(CapacityError, match="unpin"):
        store.pin("m2", "gpu:0")  # three models' granules: more than the tier holds
    for bad in ("gpu:zero", "gpu:00", "gpu:\u00b2", "gpu:\u0663"):  # one name per tier, ASCII digits only
        with pytest.raises(InvalidName, match="gpu:N"):
            store.pull("m0", bad)
    with pytest.raises(ModelBusy, match="pinned in gpu:0"):
        store.pin("m0", "host")  # one pin per model: moving it must be asked for
    store.unpin("m0")
    store.unpin("m1")
    assert store.evict("m0") > 0


def test_gpu_pins_come_back_after_a_restart(tmp_path, driver):
    store = make_store(tmp_path, driver, models=1)
    store.pin("m0", "gpu:0")
    store.close()
    again = Store(tmp_path / "store", host_capacity=1 << 30, gpu_capacity=1 << 30, gpu_driver=lambda: driver)
    try:
        again.warm_pins()
        assert "gpu:0" in again.info("m0").tiers and again.info("m0").pinned == "gpu:0"
    finally:
        again.close()
    assert driver.open_handles() == 0


def test_what_a_pin_brings_in_is_pinned_before_the_pull_lets_go(store, monkeypatch):
    pins_seen = []
    unref = store._unref_gpu_locked

    def spy(tier_name, segment_ids):
        pins_seen.append(dict(store.catalog.pins))
        unref(tier_name, segment_ids)

    monkeypatch.setattr(store, "_unref_gpu_locked", spy)
    store.pin("m0", "gpu:0")
    assert pins_seen and all(pins.get("m0:latest") == "gpu:0" for pins in pins_seen)


def test_a_pin_whose_pull_fails_is_not_kept(store, driver, monkeypatch):
    def broken(*args):
        raise GpuError("the CUDA driver refused cuMemcpyHtoDAsync: out of memory")

    monkeypatch.setattr(driver, "copy_to_device", broken)
    with pytest.raises(GpuError):
        store.pin("m0", "gpu:0")
    assert "m0" not in store.catalog.pins


GPU_A, GPU_B, GPU_C = (f"GPU-{n}0000000-0000-0000-0000-000000000000" for n in "abc")


def test_a_process_that_numbers_the_gpus_otherwise_gets_the_copy_on_its_own_gpu(start_gpu_daemon, tmp_path):
    import ctypes

    import trims

    # The daemon sees the node's two GPUs; this function's container was given only the
    # second, which it calls cuda:0 (as a device plugin or CUDA_VISIBLE_DEVICES=1 does).
    socket = start_gpu_daemon(FakeDriver(GRANULE, uuids=[GPU_A, GPU_B]), FakeDriver(GRANULE, uuids=[GPU_B]))
    weights = torch.arange(1000.0)
    save_file({"w": weights}, tmp_path / "m.safetensors")
    client = trims.connect(socket)
    client.push(tmp_path / "m.safetensors", "m")
    with client.open("m", device=0) as view:
        assert view.device == 0
        (segment,) = view.segments
        pointer = segment.__cuda_array_interface__["data"][0]
        offset = view.index["w"].offset
        assert ctypes.string_at(pointer + offset, weights.nbytes) == weights.numpy().tobytes()
        tiers = client.stats()["tiers"]
    assert "gpu:0" not in tiers  # the daemon's cuda:0 is GPU A, which no one asked for
    assert tiers["gpu:1"]["uuid"] == GPU_B and tiers["gpu:1"]["used_bytes"] > 0


def test_a_gpu_the_daemon_does_not_see_is_refused_saying_which_it_sees(start_gpu_daemon, tmp_path):
    import trims

    socket = start_gpu_daemon(FakeDriver(GRANULE, uuids=[GPU_A]), FakeDriver(GRANULE, uuids=[GPU_C]))
    save_file({"w": torch.arange(10.0)}, tmp_path / "m.safetensors")
    client = trims.connect(socket)
    client.push(tmp_path / "m.safetensors", "m")
    with pytest.raises(GpuError, match=f"does not see the GPU {GPU_C} .*cuda:0 {GPU_A}.*NVIDIA_VISIBLE_DEVICES=all"):
        client.open("m", device=0)
    assert client.stats()["leases"] == 0 and client.open("m")["w"][3] == 3.0  # host memory still serves


def test_the_current_cuda_device_where_pytorch_has_none_is_a_gpu_error(monkeypatch):
    from trims.torch import cuda_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GpuError, match="device='cuda' names the current CUDA device, and PyTorch has none here"):
        cuda_index("cuda")
    assert cuda_index("cuda:1") == 1 and cuda_index("cpu") is None and cuda_index(None) is None


def test_an_upload_whose_requester_went_away_is_made_by_the_next_open_waiting_on_it(tmp_path, driver):
    """Host memory for one model, leased: an open on the GPU that is uploading m1 waits for
    host room to read it from. Its client goes away, so it gives up; a second open waiting on
    that upload does not fail with it, but uploads m1 itself once the host room is freed."""
    store = Store(tmp_path / "store", host_capacity=MODEL_BYTES + GRANULE, gpu_capacity=4 * MODEL_BYTES,
                  gpu_driver=lambda: driver, busy_timeout=60)
    try:
        for seed in range(2):
            path = tmp_path / f"{seed}.safetensors"
            save_file({"w": torch.randn(MODEL_BYTES // 4, generator=torch.Generator().manual_seed(seed))}, path)
            _push(store, f"m{seed}", path, EVERYONE)
        held = store.open("m0", owner=1)  # the host's only room
        abandoned, outcomes = threading.Event(), {}

        def open_m1(owner: int, gone: threading.Event | None) -> None:
            try:
                outcomes[owner] = store.open("m1", owner=owner, device=0, abandoned=gone)
            except CapacityError as exc:
                outcomes[owner] = exc

        leaving = threading.Thread(target=open_m1, args=(2, abandoned))
        leaving.start()
        wait_for(lambda: store.stats()["waiting_for_room"] == 1, message="the upload to wait for host room")
        staying = threading.Thread(target=open_m1, args=(3, None))
        staying.start()
        wait_for(lambda: _in_future_result(staying), message="the second open to wait on the upload")
        abandoned.set()
        store.wake_waiters()
        leaving.join(10)
        assert isinstance(outcomes[2], CapacityError) and "went away" in str(outcomes[2])
        wait_for(lambda: store.stats()["waiting_for_room"] == 1, message="the second open to upload it itself")
        store.release(held.lease, owner=1)
        staying.join(10)
        assert not staying.is_alive() and outcomes[3].device == 0 and driver.uploads == 1
        store.release(outcomes[3].lease, owner=3)
    finally:
        store.close()


def _in_future_result(thread: threading.Thread) -> bool:
    """``thread`` waits on a Future's result (on a load another request makes)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "result" and frame.f_code.co_filename.endswith("futures/_base.py"):
            return True
        frame = frame.f_back
    return False
