"""``trims bench``: fresh processes getting a pushed model, measured against a real daemon."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.test_cli import trims_cli

MIB = 1 << 20


@pytest.fixture
def model_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    save_file({f"layer{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(4)}, path)
    return path


def test_one_after_another_the_first_open_misses_and_the_rest_share_one_copy(daemon, model_file):
    assert trims_cli("push", str(model_file), "--name", "b/m:1", env=daemon.env).returncode == 0
    done = trims_cli("bench", "b/m:1", "-n", "3", "--plain", str(model_file), "--evict-first", "--json",
                     env=daemon.env)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    nbytes = results["nbytes"]
    assert nbytes == 16 * MIB and results["plain_nbytes"] == model_file.stat().st_size
    trims_run, plain_run = results["runs"]["trims"], results["runs"]["plain"]
    assert [s["open"] for s in trims_run["samples"]] == ["miss", "hit", "hit"]  # evicted first: brought up once
    assert trims_run["daemon"]["opens"] == 3 and trims_run["daemon"]["misses"] == 1
    assert trims_run["daemon"]["fetched"]["disk->host"]["bytes"] == nbytes
    assert plain_run["daemon"]["opens"] == 0
    for sample in trims_run["samples"] + plain_run["samples"]:
        assert sample["tensors"] == 4 and sample["pages"] == 4 * math.ceil(4 * MIB / 4096)
        assert sample["ready_s"] > 0 and sample["touch_s"] > 0
    # Three processes through trims hold one copy between them; three plain loads, three.
    assert 0.8 * nbytes < trims_run["weights_pss"] < 1.3 * nbytes
    assert 2.7 * nbytes < plain_run["weights_pss"] < 3.5 * nbytes

    table = trims_cli("bench", "b/m:1", "-n", "2", "--plain", str(model_file), env=daemon.env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "b/m:1 (16.0 MiB, numpy): 2 fresh processes, one after another"
    assert any(line.startswith("trims, first (hit)") for line in lines)  # resident since the run above
    assert any(line.startswith("plain load_file ") for line in lines)
    assert lines[-1].startswith("trims: weights ready ") and "of memory against" in lines[-1]


def test_a_burst_of_torch_processes_opens_together(daemon, model_file):
    daemon.client().push(model_file, "b/m:1")
    done = trims_cli("bench", "b/m:1", "-n", "2", "--burst", "--framework", "torch", "--json", env=daemon.env)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["burst"] and results["framework"] == "torch" and "plain" not in results["runs"]
    trims_run = results["runs"]["trims"]
    assert len(trims_run["samples"]) == 2 and trims_run["daemon"]["opens"] == 2
    assert all(s["open"] is None for s in trims_run["samples"])  # not told apart when they open together
    assert 0.8 * results["nbytes"] < trims_run["weights_pss"] < 1.3 * results["nbytes"]


def test_what_cannot_be_measured_is_one_clear_line(daemon, model_file, tmp_path):
    torch.save([torch.zeros(4)], tmp_path / "list.pt")  # a checkpoint, but not of a state dict
    daemon.client().push(tmp_path / "list.pt", "b/list:1")
    daemon.client().push(model_file, "b/m:1")
    (tmp_path / "notes.txt").write_text("not weights")
    for args, said in [
        (("bench", "nope"), "no model named nope:latest"),
        (("bench", "b/m:1", "--plain", str(tmp_path / "notes.txt")), "not a .safetensors file"),
        (("bench", "b/list:1", "--framework", "torch"), "not of a state dict"),  # raised in a function process
    ]:
        done = trims_cli(*args, env=daemon.env)
        assert done.returncode == 1 and done.stderr.startswith("trims: error: ") and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    refused = trims_cli("bench", "b/m:1", "-n", "0", env=daemon.env)
    assert refused.returncode == 2 and "at least 1" in refused.stderr
    with daemon.client().open("b/m:1"):  # leased: an admin's eviction is refused, and says why
        busy = trims_cli("bench", "b/m:1", "--evict-first", env=daemon.env)
    assert busy.returncode == 1 and "trims: error: " in busy.stderr and "Traceback" not in busy.stderr
