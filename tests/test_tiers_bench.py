"""The tiers benchmark's emulated bucket (bench/wan_store.py), so it cannot rot: S3 clients
read exact ranges from it, and its push row runs through a real daemon."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trims.errors import StorageError

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_tiers(monkeypatch):
    """bench/tiers.py as a module; the settings it makes for the processes it starts, and the
    S3 endpoints it points boto3 at, are undone after the test (set here first, so undone)."""
    for key in ("PYTHONPATH", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.syspath_prepend(str(BENCH))
    import tiers

    return tiers


def test_the_emulated_bucket_serves_exact_ranges_and_refuses_what_it_lacks(bench_tiers, tmp_path):
    from trims.objects import Objects

    (tmp_path / "models").mkdir()
    blob = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "models" / "m.bin").write_bytes(blob)
    with bench_tiers.WanServer(tmp_path, first_byte_s=0.001, bytes_per_s=1e9) as url:
        bench_tiers.use_endpoint(url)
        objects = Objects()
        assert objects.size("s3://models/m.bin") == len(blob)
        for start, count in [(0, 10), (1024 * 1024 - 3, 300_000), (len(blob) - 5, 5)]:
            view = memoryview(bytearray(count))
            objects.read_into("s3://models/m.bin", start, view)
            assert bytes(view) == blob[start : start + count]
        with pytest.raises(StorageError):
            objects.size("s3://models/absent.bin")


def test_the_network_rows_push_and_fetch_through_a_real_daemon(bench_tiers, tmp_path):
    """The push, and the fetch from the bucket alone (the function asserts the disk gave the
    model up), each timed beside boto3's download."""
    row = bench_tiers.bucket_across_network(tmp_path, 4 * 1024 * 1024, runs=1, first_byte_s=0.001, bytes_per_s=1e9)
    assert row["bytes"] > 4 * 1024 * 1024  # the tensor and its header
    assert row["push"] > 0 and row["fetch"] > 0 and row["boto3"] > 0
