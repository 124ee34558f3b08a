"""The FaaS evaluation (bench/faas) in miniature, so the harness cannot rot: a real daemon, real
function instances, tiny real models; and the node's placement rules on their own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "faas"


@pytest.fixture(scope="module")
def faas_node_module():
    sys.path.insert(0, str(BENCH))
    try:
        import node

        yield node
    finally:
        sys.path.remove(str(BENCH))


def test_the_miniature_runs_every_experiment_and_measures_what_it_says(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH / "run.py"), "--zoo", "tiny", "--requests", "8", "--concurrency", "1,2",
               "--fractions", "1", "--runs", "1", "--repeats", "2", "--pool", "2", "--out", str(out), "--cache", str(tmp_path / "cache")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((out / "faas.json").read_text())

    assert set(results["latency"]) == {"gpt2-tiny", "resnet-tiny", "bert-tiny"}
    for row in results["latency"].values():
        assert all(seconds > 0 for seconds in row.values())
        assert row["ideal"] < row["cold"]  # a model already in the process skips acquiring it

    runs = [cell[source] for cell in results["grid"] + results["streams"] + results["beyond"]
            for source in ("own", "trims") if source in cell]
    # grid and streams: 2 cells each, both ways; beyond: LRU both ways and cost-aware trims, at two budgets
    assert len(results["grid"]) == 2 and len(runs) == 2 * 2 + 2 * 2 + 2 * (2 + 1)
    for run in runs:  # each the two repeats pooled
        assert run["requests"] == 2 * 8 and run["throughput"] > 0 and run["p99_s"] >= run["p50_s"] > 0
        assert [repeat["seed"] for repeat in run["repeats"]] == [0, 1]
        assert {record["repeat"] for record in run["records"]} == {0, 1}
        assert run["acquisitions"] >= 1 and run["peak_memory"] > 0 and run["memory"]
        assert run["peak_private"] + run["peak_shared"] == run["peak_memory"] and run["peak_private"] > 0
        # trims' instances map the daemon's copy; the baseline's hold their own
        assert run["from_store"] == (run["acquisitions"] if run["source"] == "trims" else 0)
        # where each inference went, as its instance's thread counted it (the kernel's
        # per-thread times may not move over one tiny inference, but over a run they do)
        usage = [record["infer_usage"] for record in run["records"]]
        assert all(value >= 0 for counts in usage for value in counts.values())
        assert sum(counts["cpu_s"] for counts in usage) > 0
    assert [cell["policy"] for cell in results["beyond"]] == ["lru", "cost"] * 2
    for cell in results["beyond"]:  # the policies ran side by side, each repeat's stream three ways
        ratios = cell["repeat_policy_ratios"] if cell["policy"] == "cost" else cell["repeat_ratios"]
        assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios)
    for cell in results["grid"]:
        assert len(cell["repeat_ratios"]) == 2
        trims_run = cell["trims"]
        # a cold node: the daemon brought every model it served up from its disk, and timed it
        assert trims_run["daemon_host_misses"] >= 1 and trims_run["daemon_fetch_s"] > 0
        assert trims_run["daemon_fetch_bytes"] > 0
        # the daemon's copies, counted once: in the trace (the peak sample is whichever had the
        # most private memory, which tiny models' copies do not decide)
        assert max(sample[2] for sample in trims_run["memory"]) > 0

    for plot in ("latency.png", "throughput.png", "memory.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "faas.md").read_text()
    assert "### End-to-end latency per model" in table and "Best point:" in table
    assert "### Where cold starts' first inference went" in table


def test_the_papers_setting_counts_the_daemons_warm_copies_and_serves_both_ways_one_stream(tmp_path):
    """--keep-alive 0 --warm-node, the README's headline: every request acquires its model
    from a node whose cache holds the popular ones. The daemon's copies it starts with are
    node memory; each repeat's requests are the same both ways."""
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH / "run.py"), "--zoo", "tiny", "--requests", "6", "--concurrency", "1",
               "--fractions", "1", "--repeats", "2", "--pool", "2", "--keep-alive", "0", "--warm-node",
               "--phases", "none", "--budget", "1", "--out", str(out), "--cache", str(tmp_path / "cache")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (cell,) = json.loads((out / "faas.json").read_text())["grid"]
    own, shared = cell["own"], cell["trims"]
    assert own["acquisitions"] == own["requests"] == shared["acquisitions"] == 2 * 6  # no keep-alive
    assert shared["daemon_host_misses"] == 0  # all warm: the whole zoo fits the budget
    assert own["peak_shared"] == 0 and all(sample[2] > 0 for sample in shared["memory"])  # from the first sample
    for repeat in (0, 1):
        asked = [[r["model"] for r in run["records"] if r["repeat"] == repeat] for run in (own, shared)]
        assert sorted(asked[0]) == sorted(asked[1]) and len(asked[0]) == 6


def instances(node, *models):
    """Stand-ins used just now, oldest first: the placement rules only read their state."""
    now = time.perf_counter()
    return [node.Instance(process=None, model=model, last_used=now + i) for i, model in enumerate(models)]


def test_without_trims_every_instance_counts_its_own_copy(faas_node_module):
    node = faas_node_module
    pool = types.SimpleNamespace(instances=instances(node, "a", "a", None))
    placer = node.Node(pool, "own", budget=250, sizes={"a": 100, "b": 100}, directories={}, keep_alive=60)
    try:
        instance, victims = placer._place_locked("b")  # a, a and b would be 300: the older "a" goes
        assert instance is pool.instances[2] and victims == [pool.instances[0]]
        assert placer._place_locked("a") == (pool.instances[0], [])  # a warm instance, nothing to drop
    finally:
        placer.close()


def test_with_trims_a_model_counts_once_however_many_instances_map_it(faas_node_module):
    node = faas_node_module
    pool = types.SimpleNamespace(instances=instances(node, "a", "a", None))
    placer = node.Node(pool, "trims", budget=250, sizes={"a": 100, "b": 100}, directories={}, keep_alive=60)
    try:
        assert placer._place_locked("b") == (pool.instances[2], [])
    finally:
        placer.close()


def test_with_trims_only_dropping_every_mapping_of_a_copy_frees_it(faas_node_module):
    node = faas_node_module
    pool = types.SimpleNamespace(instances=instances(node, "a", "b", "a", "a", None))
    pool.instances[3].busy = True  # maps "a" too: dropping the idle holders of "a" frees nothing
    placer = node.Node(pool, "trims", budget=250, sizes={"a": 100, "b": 100, "c": 100}, directories={}, keep_alive=60)
    try:
        assert placer._place_locked("c") == (pool.instances[4], [pool.instances[1]])
        pool.instances[3].busy = False
        pool.instances[1].model = None
        instance, victims = placer._place_locked("c")
        assert victims == [] and instance is pool.instances[1]
        placer.budget = 150  # now "a" must go: from all three instances that map it
        assert placer._place_locked("c") == (pool.instances[1], [pool.instances[0], pool.instances[2], pool.instances[3]])
    finally:
        placer.close()


def test_a_request_waits_while_busy_instances_hold_the_memory(faas_node_module):
    node = faas_node_module
    pool = types.SimpleNamespace(instances=instances(node, "a", None))
    pool.instances[0].busy = True
    placer = node.Node(pool, "own", budget=150, sizes={"a": 100, "b": 100}, directories={}, keep_alive=60)
    try:
        assert placer._place_locked("b") is None
        pool.instances[0].busy = False
        assert placer._place_locked("b") == (pool.instances[1], [pool.instances[0]])
    finally:
        placer.close()
