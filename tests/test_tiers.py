"""The tier conformance suite: every tier (host, disk, cloud) joins the same checks."""

from __future__ import annotations

import ctypes
import errno
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from trims import digest as digests
from trims import hugepages
from trims.cloud import CloudTier
from trims.disk import DiskTier
from trims.errors import DamagedCopy, IntegrityError, InvalidModel, StorageError
from trims.host import HostTier
from trims.records import SegmentLayout
from trims.tier import UNBOUNDED, Tier


def make_segment(seed: int, sizes=(1000, 0, 4096, 77)) -> tuple[SegmentLayout, bytes]:
    """A real segment: tensors of random bytes at aligned offsets, zeros between."""
    blobs = [os.urandom(n) if n else b"" for n in sizes]
    layout = SegmentLayout.pack([(digests.of_bytes(b), len(b)) for b in blobs])
    data = bytearray(layout.size)
    for entry, blob in zip(layout.entries, blobs):
        data[entry.offset : entry.offset + entry.nbytes] = blob
    return layout, bytes(data)


def fill_with(data: bytes):
    def fill(fd: int) -> None:
        os.pwrite(fd, data, 0)

    return fill


def fetched(tier: Tier, layout: SegmentLayout) -> bytes:
    fd = os.memfd_create("fetched")
    try:
        os.ftruncate(fd, layout.size)
        tier.fetch(layout, fd)
        return os.pread(fd, layout.size, 0)
    finally:
        os.close(fd)


class TierChecks:
    """What every tier must do. A tier's test class joins by defining ``tier`` (a fixture)."""

    can_be_corrupted = True

    def corrupt(self, tier: Tier, layout: SegmentLayout) -> None:
        raise NotImplementedError  # each tier that can be corrupted says how

    def test_put_then_fetch_gives_back_the_bytes(self, tier):
        layout, data = make_segment(1)
        assert not tier.has(layout.id)
        tier.put(layout, fill_with(data))
        assert tier.has(layout.id) and layout.id in tier.segment_ids()
        assert fetched(tier, layout) == data

    def test_bytes_used_counts_segments_and_evict_frees_them(self, tier):
        before = tier.bytes_used()
        first, first_data = make_segment(2)
        second, second_data = make_segment(3, sizes=(5000,))
        tier.put(first, fill_with(first_data))
        tier.put(second, fill_with(second_data))
        assert tier.bytes_used() == before + tier.footprint(first.size) + tier.footprint(second.size)
        assert tier.evict(first.id) == tier.footprint(first.size)
        assert not tier.has(first.id) and tier.has(second.id)
        assert tier.bytes_used() == before + tier.footprint(second.size)

    def test_a_failing_fill_keeps_nothing(self, tier):
        layout, _ = make_segment(4)

        def broken(fd: int) -> None:
            raise OSError("the source went away")

        with pytest.raises(OSError):
            tier.put(layout, broken)
        assert not tier.has(layout.id)

    def test_a_corrupt_copy_is_never_fetched(self, tier):
        if not self.can_be_corrupted:
            pytest.skip("sealed: this tier's bytes cannot change after they are put")
        layout, data = make_segment(5)
        tier.put(layout, fill_with(data))
        self.corrupt(tier, layout)
        with pytest.raises(IntegrityError):
            fetched(tier, layout)

    def test_capacity_is_a_number(self, tier):
        assert isinstance(tier.capacity, int) and tier.capacity > 0


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


class TestHostTier(TierChecks):
    can_be_corrupted = False  # sealed memfds: the kernel refuses every write

    @pytest.fixture
    def tier(self):
        host = HostTier(capacity=1 << 30)
        yield host
        host.close()

    def test_resident_segments_are_sealed_and_read_only(self, tier):
        import fcntl

        layout, data = make_segment(6)
        tier.put(layout, fill_with(data))
        fd = tier.get(layout.id).fd
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


class TestHostTierInHugePages(TestHostTier):
    """The host tier allocating segments in 2 MiB pages, as it does where the kernel allows
    (shmem_enabled=advise and the like); on a kernel that gives none, the same steps give
    4 KiB pages and the same bytes."""

    @pytest.fixture
    def tier(self):
        host = HostTier(capacity=1 << 30, huge_pages=True)
        yield host
        host.close()

    def test_a_segment_takes_no_more_memory_than_its_size(self, tier):
        layout, data = make_segment(7, sizes=(5 << 20, 3 << 20, 12345))  # not a multiple of 2 MiB
        tier.put(layout, fill_with(data))
        assert fetched(tier, layout) == data
        allocated = os.fstat(tier.get(layout.id).fd).st_blocks * 512
        assert allocated <= -(-layout.size // 4096) * 4096

    @pytest.mark.skipif(not HostTier(0).huge_pages, reason="this kernel gives shared memory no 2 MiB pages")
    def test_clients_map_huge_pages_and_a_write_copies_one_small_page(self, tier):
        from trims._mapping import map_private

        layout, data = make_segment(8, sizes=(8 << 20,))
        tier.put(layout, fill_with(data))
        fd = tier.get(layout.id).fd
        writer, reader = map_private(fd, layout.size), map_private(fd, layout.size)
        assert bytes(writer[::4096]) == data[::4096] == bytes(reader[::4096])  # a read of every page
        assert _mapping_kb(writer, "ShmemPmdMapped") == 8 << 10
        writer[12345] ^= 0xFF
        assert _mapping_kb(writer, "Anonymous") == 4  # the written page alone became private
        assert _mapping_kb(writer, "ShmemPmdMapped") >= 6 << 10  # the other 2 MiB pages stay shared
        assert reader[12345] == data[12345] and os.pread(fd, 1, 12345) == data[12345:12346]


def _mapping_kb(mapping: ctypes.Array, field: str) -> int:
    """A field of this process's smaps entry for ``mapping``, in kB."""
    lines = open("/proc/self/smaps").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{ctypes.addressof(mapping):x}-"))
    for line in lines[start + 1 :]:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in the mapping's smaps entry")


@pytest.mark.parametrize("text, expected", [
    ("always within_size [advise] never deny force\n", "advise"),
    ("always within_size advise [never] deny force\n", "never"),
    ("", "unsupported"),
    (None, "unsupported"),  # no transparent huge pages in this kernel, or no /sys
])
def test_the_kernels_huge_page_setting_for_shared_memory(tmp_path, text, expected):
    if text is not None:
        (tmp_path / "shmem_enabled").write_text(text)
    assert hugepages.shmem_setting(tmp_path) == expected


@pytest.mark.parametrize("setting", ["never", "deny", "unsupported"])
def test_settings_that_forbid_huge_pages_give_none(setting):
    assert not hugepages.available(setting)


class TestDiskTier(TierChecks):
    @pytest.fixture
    def tier(self, tmp_path, pool):
        (tmp_path / "tmp").mkdir()
        return DiskTier(tmp_path / "disk", tmp_path / "tmp", tmp_path / "corrupt", pool)

    def corrupt(self, tier, layout):
        path = tier.path(layout.id)
        data = bytearray(path.read_bytes())
        data[layout.entries[0].offset] ^= 0xFF
        path.write_bytes(bytes(data))

    def test_restart_keeps_complete_files_and_drops_strays(self, tier, tmp_path, pool):
        layout, data = make_segment(7)
        tier.put(layout, fill_with(data))
        (tier.directory / ("0" * 64 + ".bin")).write_bytes(b"stray")
        again = DiskTier(tmp_path / "disk", tmp_path / "tmp", tmp_path / "corrupt", pool)
        again.index({layout.id: layout})
        assert list(again.segment_ids()) == [layout.id] and fetched(again, layout) == data
        assert sorted(p.name for p in tier.directory.iterdir()) == [f"{digests.hex_of(layout.id)}.bin"]

    def test_unbounded_by_default(self, tier):
        assert tier.capacity == UNBOUNDED

    def test_a_copy_set_aside_leaves_the_tier_and_is_kept(self, tier, tmp_path):
        layout, data = make_segment(8)
        tier.put(layout, fill_with(data))
        kept = tier.set_aside(layout.id)
        assert kept.parent == tmp_path / "corrupt" and kept.read_bytes() == data
        assert not tier.has(layout.id) and tier.bytes_used() == 0 and not tier.path(layout.id).exists()
        tier.put(layout, fill_with(data))  # the same segment may come back, fetched anew
        assert fetched(tier, layout) == data and tier.set_aside(layout.id) != kept

    def test_a_damaged_copy_is_told_apart_from_an_error_that_may_pass(self, tier, monkeypatch):
        layout, data = make_segment(9)
        tier.put(layout, fill_with(data))
        tier.verify(layout)
        self.corrupt(tier, layout)
        with pytest.raises(DamagedCopy):
            tier.verify(layout)
        tier.path(layout.id).write_bytes(data[:100])  # truncated: checked without reading past the end
        with pytest.raises(DamagedCopy, match="shorter"):
            tier.verify(layout)
        tier.path(layout.id).unlink()
        with pytest.raises(DamagedCopy, match="missing"):
            fetched(tier, layout)

        def too_many_open_files(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")
        monkeypatch.setattr(os, "open", too_many_open_files)
        with pytest.raises(StorageError, match="Too many open files"):
            tier.verify(layout)


class TestCloudTier(TierChecks):
    @pytest.fixture
    def tier(self, tmp_path, pool, s3):
        (tmp_path / "tmp").mkdir()
        return CloudTier(tmp_path / "cloud", tmp_path / "tmp", pool, default_url=f"s3://{s3.new_bucket()}/trims")

    def corrupt(self, tier, layout):
        (url,) = tier.urls(layout.id)
        bucket, key = url[len("s3://"):].split("/", 1)
        import boto3

        s3 = boto3.client("s3")
        data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[layout.entries[0].offset] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    def test_large_tensors_are_read_in_parallel_ranges(self, tier, s3, monkeypatch):
        import trims.cloud

        monkeypatch.setattr(trims.cloud, "RANGE_BYTES", 1024)
        layout, data = make_segment(8, sizes=(10_000, 3000))
        tier.put(layout, fill_with(data))
        key = f"{digests.hex_of(layout.id)}.bin"
        before = s3.gets(key)
        assert fetched(tier, layout) == data
        assert s3.gets(key) - before == 10 + 3  # ceil(10000/1024) + ceil(3000/1024): too big to share a read

    def test_small_neighbouring_tensors_share_one_read(self, tier, s3):
        layout, data = make_segment(10, sizes=(1000, 0, 4096, 77, 30_000))
        tier.put(layout, fill_with(data))
        key = f"{digests.hex_of(layout.id)}.bin"
        before = s3.gets(key)
        assert fetched(tier, layout) == data
        assert s3.gets(key) - before == 1

    def test_register_reads_tensors_out_of_foreign_objects(self, tier, s3):
        layout, data = make_segment(9, sizes=(300, 500))
        bucket = s3.new_bucket()
        # a "file" holding the two tensors at other offsets, like a safetensors object
        blob = b"header" + data[: 300] + b"xx" + data[layout.entries[1].offset : layout.entries[1].offset + 500]
        s3.client().put_object(Bucket=bucket, Key="model.safetensors", Body=blob)
        url = f"s3://{bucket}/model.safetensors"
        tier.register(layout, {layout.entries[0].digest: (url, 6), layout.entries[1].digest: (url, 308)})
        assert fetched(tier, layout) == data
        tier.evict(layout.id)  # forgets it, but never deletes an object it did not upload
        assert s3.client().head_object(Bucket=bucket, Key="model.safetensors")["ContentLength"] == len(blob)


    def test_a_failed_read_fails_the_fetch_with_its_own_error(self, tier, monkeypatch):
        """A read's traceback holds slices of the destination's mapping (as botocore's readinto
        does): they must not keep the mapping from closing, which raised BufferError instead."""
        layout, data = make_segment(11)
        tier.put(layout, fill_with(data))

        def cut_short(url, start, view, version=None):
            part = view[1:]  # noqa: F841 - alive in this frame, as in the HTTP client's
            try:
                raise ConnectionResetError("connection reset by peer")
            except ConnectionResetError:
                raise StorageError(f"reading {url} failed after 3 tries: cut short") from None

        monkeypatch.setattr(tier.objects, "read_into", cut_short)
        with pytest.raises(StorageError, match="cut short"):
            fetched(tier, layout)


def test_an_object_replaced_while_a_push_reads_it_fails_the_read(s3):
    """A push reads a bucket object's header, then its tensors: every read is of the version
    first sized (its ETag), so a replacement in between cannot splice into what is stored."""
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    bucket = s3.new_bucket()
    s3.client().put_object(Bucket=bucket, Key="m.safetensors", Body=b"a" * 4096)
    remote = RemoteFile("m.safetensors", f"s3://{bucket}/m.safetensors", Objects(4))
    view = memoryview(bytearray(16))
    assert remote.size() == 4096 and remote.read_into(0, view) == 16 and bytes(view) == b"a" * 16
    s3.client().put_object(Bucket=bucket, Key="m.safetensors", Body=b"b" * 4096)
    with pytest.raises(IntegrityError, match="replaced while it was being read"):
        remote.read_into(16, view)


def test_a_pushed_objects_scattered_small_reads_share_requests(s3):
    """Spans a few bytes apart take one ranged GET; spans far apart take one each, all at once."""
    from trims.cloud import COALESCE_GAP, RemoteFile
    from trims.objects import Objects

    blob = os.urandom(3 * COALESCE_GAP)
    bucket = s3.new_bucket()
    s3.client().put_object(Bucket=bucket, Key="scattered.pt", Body=blob)
    source = RemoteFile("scattered.pt", f"s3://{bucket}/scattered.pt", Objects())
    near = [(100, 30), (10, 30), (500, 0), (100, 30), (20, 40)]  # out of order, repeated, overlapping, empty
    far = [(len(blob) - 30, 30)]
    source.size()
    before = s3.gets("scattered.pt")
    assert source.read_many(near + far) == [blob[o : o + n] for o, n in near + far]
    assert s3.gets("scattered.pt") - before == 2
    with pytest.raises(InvalidModel, match="truncated"):
        source.read_many([(len(blob) - 10, 30)])


def _reads_counted(objects, monkeypatch, fail_at: int = 0) -> tuple[list[int], list[int]]:
    """Make each of ``objects``' reads take a round trip's worth of time, so reads that may
    overlap do; the returned lists hold the most seen in flight at once and how many began.
    With ``fail_at``, that read (counting from 1) fails as an unreachable bucket would."""
    import threading
    import time

    in_flight, peak, started, lock = [0], [0], [0], threading.Lock()
    real_read = objects.read_into

    def counted_read(url, start, view, version=None):
        with lock:
            in_flight[0] += 1
            started[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            failing = started[0] == fail_at
        time.sleep(0.05)
        try:
            if failing:
                raise StorageError("the bucket stopped answering")
            real_read(url, start, view, version)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(objects, "read_into", counted_read)
    return peak, started


def test_a_push_from_a_bucket_has_many_reads_in_flight_whatever_the_cpus(s3, tmp_path, monkeypatch):
    """Each ranged GET waits a round trip: a node of few cores still reads many tensors, and
    side files, at once."""
    import numpy as np
    from safetensors.numpy import save_file

    from trims import ingest
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    tensors = {f"w{i}": np.full((1024,), i, dtype=np.float32) for i in range(16)}
    save_file(tensors, tmp_path / "model.safetensors")
    bucket = s3.new_bucket()
    s3.client().upload_file(str(tmp_path / "model.safetensors"), bucket, "model.safetensors")
    side = [f"vocab{i}.json" for i in range(8)]  # a tokenizer's files, say
    for name in side:
        s3.client().put_object(Bucket=bucket, Key=name, Body=b"{}")
    objects = Objects(connections=8)
    peak, _ = _reads_counted(objects, monkeypatch)
    files = [RemoteFile(name, f"s3://{bucket}/{name}", objects) for name in ["model.safetensors", *side]]
    planned = ingest.plan(files)
    assert peak[0] == 8 and planned.side_files == dict.fromkeys(side, b"{}")
    peak[0] = 0
    manifest = ingest.digest(planned, workers=1)
    assert peak[0] == 8
    expected = {name: digests.of_bytes(array.tobytes()) for name, array in tensors.items()}
    assert {t.name: t.digest for t in manifest.tensors} == expected


@pytest.fixture
def one_large_tensor_in_a_bucket(s3, tmp_path, monkeypatch):
    """A model whose bytes are nearly all one tensor (an embedding), in a bucket, pushed in
    chunks of 64 KiB so it has 16 of them; and the random bytes of each tensor."""
    import numpy as np
    from safetensors.numpy import save_file

    from trims import ingest

    monkeypatch.setattr(ingest, "_CHUNK", 64 * 1024)
    rng = np.random.default_rng(7)
    tensors = {"embedding": rng.standard_normal(256 * 1024, dtype=np.float32),
               "bias": rng.standard_normal(16, dtype=np.float32)}
    save_file(tensors, tmp_path / "model.safetensors")
    bucket = s3.new_bucket()
    s3.client().upload_file(str(tmp_path / "model.safetensors"), bucket, "model.safetensors")
    return f"s3://{bucket}/model.safetensors", tensors


def test_one_large_tensor_from_a_bucket_is_read_by_many_requests_at_once_and_hashed_in_order(
        one_large_tensor_in_a_bucket, tmp_path, monkeypatch):
    """A tensor read one chunk after another would be a push's straggler: a 1 GiB language
    model head at one request in flight. Its chunks are read together and still hashed, and
    written, exactly as the bytes lie."""
    from trims import ingest
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    url, tensors = one_large_tensor_in_a_bucket
    objects = Objects(connections=8)
    planned = ingest.plan([RemoteFile("model.safetensors", url, objects)])
    peak, _ = _reads_counted(objects, monkeypatch)
    ingested = ingest.write(planned, tmp_path, lambda manifest: set(), workers=1)
    assert peak[0] == 8
    expected = {name: digests.of_bytes(array.tobytes()) for name, array in tensors.items()}
    assert {t.name: t.digest for t in ingested.manifest.tensors} == expected
    written = ingested.segment_path.read_bytes()
    for entry in ingested.segment.entries:
        assert digests.of_bytes(written[entry.offset : entry.offset + entry.nbytes]) == entry.digest


def test_a_read_failing_inside_a_large_tensor_fails_the_push_with_its_own_error(
        one_large_tensor_in_a_bucket, tmp_path, monkeypatch):
    """The chunks after it stop waiting their turn, no further reads start, and no file is left."""
    from trims import ingest
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    url, _ = one_large_tensor_in_a_bucket
    objects = Objects(connections=4)
    planned = ingest.plan([RemoteFile("model.safetensors", url, objects)])
    _, started = _reads_counted(objects, monkeypatch, fail_at=3)
    (temp := tmp_path / "tmp").mkdir()
    with pytest.raises(StorageError, match="stopped answering"):
        ingest.write(planned, temp, lambda manifest: set(), workers=1)
    assert started[0] <= 3 + 2 * 3  # those begun before it failed, and at most one more per other thread
    assert list(temp.iterdir()) == []


def test_a_failure_outside_the_reads_ends_the_push_with_its_error_and_no_chunk_left_waiting(
        one_large_tensor_in_a_bucket, monkeypatch):
    """Here the progress report of the second chunk fails (as a client gone away would):
    the chunks after it, of every tensor, stop waiting their turn."""
    from trims import ingest
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    url, _ = one_large_tensor_in_a_bucket
    objects = Objects(connections=4)
    planned = ingest.plan([RemoteFile("model.safetensors", url, objects)])
    _reads_counted(objects, monkeypatch)  # slow reads: the failure comes before most have begun
    reports = []

    def progress(done, total):
        reports.append((done, total))
        if len(reports) == 2:
            raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        ingest.digest(planned, workers=1, progress=progress)
    assert len(reports) < 17


def test_a_push_reports_progress_up_to_every_byte_of_its_tensors(one_large_tensor_in_a_bucket):
    from trims import ingest
    from trims.cloud import RemoteFile
    from trims.objects import Objects

    url, tensors = one_large_tensor_in_a_bucket
    planned = ingest.plan([RemoteFile("model.safetensors", url, Objects(connections=4))])
    reports = []
    ingest.digest(planned, workers=1, progress=lambda done, total: reports.append((done, total)))
    everything = sum(array.nbytes for array in tensors.values())
    assert reports[-1] == (everything, everything)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


class TestCloudTierOverFsspec(TierChecks):
    """The same tier through fsspec (here its local ``file://`` backend), as GCS or Azure would go."""

    @pytest.fixture
    def tier(self, tmp_path, pool):
        (tmp_path / "tmp").mkdir()
        (tmp_path / "bucket").mkdir()
        return CloudTier(tmp_path / "cloud", tmp_path / "tmp", pool, default_url=f"file://{tmp_path}/bucket")

    def corrupt(self, tier, layout):
        (url,) = tier.urls(layout.id)
        path = url[len("file://"):]
        data = bytearray(open(path, "rb").read())
        data[layout.entries[0].offset] ^= 0xFF
        open(path, "wb").write(bytes(data))



class TestGpuTierLogic(TierChecks):
    """The GPU tier's own code (chunked, double-buffered upload; granules; export), over the
    memfd stand-in for the driver; tests/test_gpu.py runs it against a real GPU."""

    can_be_corrupted = False  # clients map it read-only; nothing of the daemon's writes it

    @pytest.fixture
    def driver(self):
        from tests.fake_cuda import FakeDriver

        return FakeDriver()

    @pytest.fixture
    def tier(self, driver, monkeypatch):
        import trims.gpu

        monkeypatch.setattr(trims.gpu, "STAGING_CHUNK", 1024)  # many chunks, both staging buffers in turn
        gpu = trims.gpu.GpuTier(driver, 0, capacity=1 << 30)
        yield gpu
        gpu.close()
        assert driver.open_handles() == 0  # every allocation and import released

    def test_segments_take_whole_granules_and_leave_as_descriptors(self, tier, driver):
        layout, data = make_segment(11, sizes=(5000,))
        tier.put(layout, fill_with(data))
        segment = tier.get(layout.id)
        assert segment.mapped_size == driver.granule == tier.footprint(layout.size)
        assert os.pread(segment.fd, layout.size, 0) == data  # the exported descriptor holds the bytes
        assert driver.uploads == -(-layout.size // 1024)

    def test_a_driver_that_refuses_read_only_mappings_is_reported(self, driver):
        from trims.gpu import GpuTier

        driver.read_only = False
        assert not GpuTier(driver, 0, capacity=1 << 20).capabilities.read_only_mapping
