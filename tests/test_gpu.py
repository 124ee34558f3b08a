"""The GPU tier on a real GPU: the tier conformance suite over the CUDA driver, modules on
CUDA over the node's one copy, read-only mappings, crashes. Skipped without a CUDA GPU
(CI has none; bench/gpu/run.py and these run on a GPU machine)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

import trims
import trims.torch

from .conftest import DaemonProcess, run_python, start_python, wait_for
from .models import build, example_input
from .test_tiers import TierChecks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class TestGpuTierOnDevice(TierChecks):
    can_be_corrupted = False  # clients map it read-only

    @pytest.fixture
    def tier(self, monkeypatch):
        import trims.gpu
        from trims.cuda_driver import driver

        monkeypatch.setattr(trims.gpu, "STAGING_CHUNK", 4096)  # many chunks: the double buffering is exercised
        tier = trims.gpu.open_tier(driver(), 0, capacity=1 << 30)
        yield tier
        tier.close()

    def test_the_driver_maps_shared_memory_read_only(self, tier):
        assert tier.capabilities.read_only_mapping


@pytest.fixture
def gpu_daemon(tmp_path):
    process = DaemonProcess(tmp_path, extra=("--gpu-memory", "1G")).start()
    yield process
    process.kill()


@pytest.fixture
def pushed(gpu_daemon, tmp_path):
    model, factory = build("gpt2", tmp_path / "gpt2")
    gpu_daemon.client().push(tmp_path / "gpt2", "gpt2")
    return model, factory


def reference_logits(model) -> torch.Tensor:
    inputs = {k: v.cuda() for k, v in example_input("gpt2").items()}
    with torch.no_grad():
        return model.cuda()(**inputs).logits.cpu()


CHILD = """
import json, sys, torch, trims.torch
from tests.models import FACTORIES, example_input
model = trims.torch.load_model("gpt2", FACTORIES["gpt2"](), device="cuda")
allocated_after_load = torch.cuda.memory_allocated()  # by torch, in this process
inputs = {k: v.cuda() for k, v in example_input("gpt2").items()}
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({"sum": float(logits.double().sum()), "allocated_after_load": allocated_after_load}), flush=True)
"""


def test_a_module_on_cuda_is_built_over_the_shared_copy_with_no_copy(gpu_daemon, pushed):
    model, factory = pushed
    client = gpu_daemon.client()
    shared = trims.torch.load_model("gpt2", factory, client=client, device="cuda")
    assert all(t.is_cuda for t in shared.parameters()) and all(b.is_cuda for b in shared.buffers())
    view = client.open("gpt2", device=0)
    (segment,) = view.segments
    assert segment.read_only
    same = trims.torch.assemble(factory, trims.torch.state_dict_from_view(view)).to("cuda")
    for tensor in same.parameters():  # every weight lies inside the mapped shared allocation
        assert segment.pointer <= tensor.data_ptr() < segment.pointer + segment.size
    inputs = {k: v.cuda() for k, v in example_input("gpt2").items()}
    with torch.no_grad():
        logits = shared(**inputs).logits.cpu()
    torch.testing.assert_close(logits, reference_logits(model))
    tier = client.stats()["tiers"]["gpu:0"]
    assert tier["used_bytes"] == segment.size and tier["read_only_mapping"]


def test_the_transformers_adapter_builds_on_the_gpu_copy_too(gpu_daemon, pushed):
    import trims.transformers

    model, _ = pushed
    shared = trims.transformers.from_pretrained("gpt2", client=gpu_daemon.client(), device="cuda")
    assert all(t.is_cuda for t in shared.parameters())
    inputs = {k: v.cuda() for k, v in example_input("gpt2").items()}
    with torch.no_grad():
        logits = shared(**inputs).logits.cpu()
    torch.testing.assert_close(logits, reference_logits(model))


def test_four_processes_hold_one_copy(gpu_daemon, pushed):
    outputs = [json.loads(run_python(CHILD, gpu_daemon.env, timeout=300).stdout) for _ in range(4)]
    assert len({round(o["sum"], 3) for o in outputs}) == 1
    nbytes = gpu_daemon.client().info("gpt2").nbytes
    assert all(o["allocated_after_load"] < nbytes / 10 for o in outputs)  # no private copy of the weights
    stats = gpu_daemon.client().stats()["tiers"]["gpu:0"]
    assert stats["segments"] == 1 and (stats["hits"], stats["misses"]) == (3, 1)


def test_a_write_to_shared_weights_faults_in_the_writer_and_no_one_else_sees_it(gpu_daemon, pushed):
    model, factory = pushed
    holder = trims.torch.load_model("gpt2", factory, client=gpu_daemon.client(), device="cuda")
    inputs = {k: v.cuda() for k, v in example_input("gpt2").items()}
    with torch.no_grad():
        before = holder(**inputs).logits.cpu()
    writer = run_python("""
        import torch, trims.torch
        from tests.models import FACTORIES
        model = trims.torch.load_model("gpt2", FACTORIES["gpt2"](), device="cuda")
        try:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
            torch.cuda.synchronize()
            print("wrote")
        except RuntimeError as exc:
            print("faulted:", exc)
        """, gpu_daemon.env, check=False, timeout=300)
    assert "faulted" in writer.stdout or writer.returncode != 0, writer.stdout + writer.stderr
    assert "wrote" not in writer.stdout
    with torch.no_grad():
        after = holder(**inputs).logits.cpu()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    fresh = json.loads(run_python(CHILD, gpu_daemon.env, timeout=300).stdout)
    assert fresh["sum"] == pytest.approx(float(before.double().sum()), rel=1e-5)


def test_a_client_killed_while_holding_a_model_leaves_the_daemon_serving(gpu_daemon, pushed):
    child = start_python(CHILD + "\nimport sys; sys.stdin.read()\n", gpu_daemon.env)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        client = gpu_daemon.client()
        assert client.stats()["leases"] == 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        wait_for(lambda: client.stats()["leases"] == 0, timeout=30, message="the killed client's lease to end")
        assert client.evict("gpt2") > 0  # nothing holds the copy any more
        json.loads(run_python(CHILD, gpu_daemon.env, timeout=300).stdout)  # and it serves the next one
    finally:
        child.kill()


def test_each_gpu_is_named_by_the_uuid_torch_gives_it():
    from trims.cuda_driver import driver
    from trims.errors import GpuError

    count = torch.cuda.device_count()
    assert [driver().device_uuid(i) for i in range(count)] == [
        f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    with pytest.raises(GpuError, match=f"no CUDA device {count}"):
        driver().device_uuid(count)


def test_trims_info_says_how_gpu_memory_is_shared(gpu_daemon, pushed):
    trims.torch.load_state_dict("gpt2", client=gpu_daemon.client(), device="cuda")
    out = subprocess.run([sys.executable, "-m", "trims", "info", "gpt2"], env=gpu_daemon.env,
                         capture_output=True, text=True, check=True).stdout
    assert "gpu:0" in out and "vmm-posix-fd" in out and "read-only" in out
    assert f"GPU-{torch.cuda.get_device_properties(0).uuid}" in out


def test_pull_puts_a_model_in_gpu_memory_before_any_open(gpu_daemon, pushed):
    subprocess.run([sys.executable, "-m", "trims", "pull", "gpt2", "--tier", "gpu:0"], env=gpu_daemon.env,
                   check=True, capture_output=True)
    stats = gpu_daemon.client().stats()
    assert stats["tiers"]["gpu:0"]["segments"] == 1 and stats["leases"] == 0
    json.loads(run_python(CHILD, gpu_daemon.env, timeout=300).stdout)
    assert gpu_daemon.client().stats()["tiers"]["gpu:0"]["hits"] == 1  # the function's open found it there
