"""Ray Serve on a local Ray instance: replicas load multiplexed models from the node's daemon.

Two replicas serve two models through ``@serve.multiplexed``; every replica that loads a
model maps the daemon's one copy (the same memfd inode as the test process sees), and all
give the same outputs as the model loaded here. Takes about a minute, most of it Ray
starting; ``pytest -m "not ray"`` leaves it out.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from .models import build

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

PROMPT = [[1, 7, 42, 99, 3]]


def memfd_inode(tensor: torch.Tensor) -> tuple[str, int]:
    """The file (path, inode) whose mapping holds a tensor's bytes, from /proc/self/maps."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return (fields[5].strip() if len(fields) > 5 else "", int(fields[4]))
    raise AssertionError("the tensor lies in no mapping")


def make_app():
    """Built inside a function so that Ray ships the class by value to its workers."""
    import trims.ray

    @serve.deployment(num_replicas=2, max_ongoing_requests=1, ray_actor_options={"num_cpus": 0})
    class Generator:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str):
            return (await trims.ray.from_pretrained(model_id)).eval()

        async def __call__(self, prompt: list[list[int]]) -> dict:
            model = await self.get_model(serve.get_multiplexed_model_id())
            with torch.no_grad():
                logits = model(torch.tensor(prompt)).logits
            await asyncio.sleep(0.3)  # like real inference: keeps this replica busy, so requests spread
            return {"pid": os.getpid(), "logits": logits.tolist(),
                    "weights": memfd_inode(model.transformer.h[0].attn.c_attn.weight)}

    return Generator.bind()


@pytest.fixture
def ray_serve(daemon):
    import trims.ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=trims.ray.runtime_env(daemon.socket))
    try:
        serve.start(proxy_location="Disabled")  # no HTTP port: the test calls through a handle
        yield serve.run(make_app(), name="trims-test", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def daemon(daemon, tmp_path):
    client = daemon.client()
    for name, seed in (("gpt2-a", 0), ("gpt2-b", 1)):
        build("gpt2", tmp_path / name, seed=seed)
        client.push(tmp_path / name, name)
    return daemon


def test_replicas_share_one_copy_of_each_multiplexed_model(daemon, ray_serve):
    import trims.ray
    import trims.transformers

    client = daemon.client()
    responses = {
        model_id: [ray_serve.options(multiplexed_model_id=model_id).remote(PROMPT) for _ in range(6)]
        for model_id in ("gpt2-a", "gpt2-b")
    }
    results = {model_id: [r.result(timeout_s=120) for r in refs] for model_id, refs in responses.items()}

    for model_id, served in results.items():
        here = trims.transformers.from_pretrained(model_id, client=client).eval()
        with torch.no_grad():  # one thread, as in Ray's workers (conftest): the same order of sums
            expected = here(torch.tensor(PROMPT)).logits.tolist()
        mapped_here = memfd_inode(here.transformer.h[0].attn.c_attn.weight)
        assert mapped_here[0].startswith("/memfd:trims")
        assert {r["weights"] for r in served} == {mapped_here}  # one copy: the daemon's, in every process
        assert all(r["logits"] == expected for r in served)
    pids = {r["pid"] for served in results.values() for r in served}
    assert len(pids) == 2  # both replicas served, and loaded models
    assert client.info("gpt2-a").leases >= 2  # at least one per replica that loaded it, and ours

    # The routing hint: this one node holds both models in host memory.
    node = ray.get_runtime_context().get_node_id()
    assert trims.ray.where("gpt2-a") == {node: ["host", "disk"]}
    assert trims.ray.where("nothing-like-it") == {}
    assert trims.ray.node_affinity("gpt2-b").node_id == node
