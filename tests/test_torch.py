"""The PyTorch adapter on real (tiny) architectures: identical outputs, shared memory."""

from __future__ import annotations

import json

import pytest
import torch

import trims
import trims.torch

from .conftest import ROOT, run_python
from .mapped import in_store
from .models import FACTORIES, build, output_of

# save_pretrained writes ViT in transformers' older layout, which only trims.transformers
# renames (tests/test_adapters.py); trims.torch takes weights as the module names them.
KINDS = sorted(kind for kind in FACTORIES if kind != "vit")


def lives_in_store(tensor: torch.Tensor) -> bool:
    return in_store(tensor.data_ptr())


def only_repeats_copied(parameters: list[torch.Tensor], view: trims.ModelView) -> bool:
    """Every parameter lies in the store but those equal to an earlier tensor (a random init's
    zero biases): the daemon keeps those once and hands each out as a copy of its own."""
    copied = sum(p.nbytes for p in parameters if not lives_in_store(p))
    return bool(parameters) and copied <= sum(view.index[name].nbytes for name in view.repeats)


@pytest.fixture(scope="module")
def pushed(shared_daemon, tmp_path_factory):
    """Each tiny architecture, pushed once, with its original module for comparison."""
    client = shared_daemon.client()
    models = {}
    for kind in KINDS:
        directory = tmp_path_factory.mktemp(kind)
        model, factory = build(kind, directory)
        client.push(directory, f"torch-tests/{kind}")
        models[kind] = (model, factory)
    return client, models


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_gives_identical_outputs_from_shared_memory(pushed, kind):
    client, models = pushed
    original, factory = models[kind]
    shared = trims.torch.load_model(f"torch-tests/{kind}", factory, client=client)
    assert not shared.training
    assert torch.equal(output_of(shared, kind), output_of(original, kind))
    with client.open(f"torch-tests/{kind}") as view:
        assert only_repeats_copied(list(shared.parameters()), view)
    for name, buffer in shared.named_buffers():
        assert not buffer.is_meta, name
        assert torch.equal(buffer, original.get_buffer(name)), name


def test_tied_weights_are_tied_again(pushed):
    client, models = pushed
    shared = trims.torch.load_model("torch-tests/gpt2", models["gpt2"][1], client=client)
    assert shared.lm_head.weight is shared.transformer.wte.weight


def test_computed_buffers_are_built_on_cpu_not_left_on_meta(pushed):
    client, models = pushed
    llama = trims.torch.load_model("torch-tests/llama", models["llama"][1], client=client)
    inv_freq = llama.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and torch.equal(inv_freq, models["llama"][0].model.rotary_emb.inv_freq)
    bert = trims.torch.load_model("torch-tests/bert", models["bert"][1], client=client)
    assert torch.equal(bert.embeddings.position_ids, models["bert"][0].embeddings.position_ids)


def test_transformers_initialises_only_modules_with_computed_buffers():
    """assemble skips transformers' per-module weight initialisation (about half of a build)
    except where it computes a non-persistent buffer, which no checkpoint holds."""
    from transformers import PretrainedConfig, PreTrainedModel

    initialised = []

    class Config(PretrainedConfig):
        model_type = "trims-test-computed-buffer"

    class Model(PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.zeros(4), persistent=False)  # its value comes from _init_weights
            self.post_init()

        def _init_weights(self, module):
            initialised.append(type(module).__name__)
            if module is self:
                self.table.copy_(torch.arange(4.0))

    original = Model(Config())
    assert original.table.tolist() == [0.0, 1.0, 2.0, 3.0] and "Linear" in initialised
    initialised.clear()
    assembled = trims.torch.assemble(lambda: Model(Config()), original.state_dict())
    assert assembled.table.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert initialised == ["Model"]
    assert torch.equal(assembled.linear.weight, original.linear.weight)
    initialised.clear()
    Model(Config())  # outside assemble, transformers initialises every module again
    assert "Linear" in initialised


def test_state_dict_is_zero_copy_and_a_write_stays_private(pushed):
    client, _ = pushed
    state = trims.torch.load_state_dict("torch-tests/gpt2", client=client)
    other = trims.torch.load_state_dict("torch-tests/gpt2", client=client)
    weight = state["transformer.wte.weight"]
    assert lives_in_store(weight)
    before = other["transformer.wte.weight"].clone()
    weight.add_(1.0)  # no warning, no crash: the mapping is private copy-on-write
    assert torch.equal(other["transformer.wte.weight"], before)
    assert torch.equal(weight, before + 1.0)


def test_equal_tensors_stored_once_are_still_written_apart(shared_daemon, tmp_path):
    """The daemon keeps equal tensors once; a write to one must not show in the other."""
    import trims.numpy
    from safetensors.torch import save_file

    save_file({"a.bias": torch.zeros(64), "b.bias": torch.zeros(64), "c.empty": torch.zeros(0),
               "c.weight": torch.randn(4096)}, tmp_path / "model.safetensors")
    client = shared_daemon.client()
    client.push(tmp_path / "model.safetensors", "torch-tests/equal")
    view = client.open("torch-tests/equal")
    weight, empty = view.index["c.weight"], view.index["c.empty"]
    assert (empty.segment, empty.offset) == (weight.segment, weight.offset)  # where an empty tensor lies
    assert view.repeats == {"b.bias"}  # an empty tensor before a weight does not make it a copy
    state = trims.torch.load_state_dict("torch-tests/equal", client=client)
    assert lives_in_store(state["c.weight"]) and lives_in_store(state["a.bias"])
    state["a.bias"].add_(1)
    assert state["b.bias"].sum() == 0 and state["a.bias"].sum() == 64
    arrays = trims.numpy.state_dict_from_view(client.open("torch-tests/equal"), writable=True)
    arrays["b.bias"] += 2
    assert arrays["a.bias"].sum() == 0 and arrays["b.bias"].sum() == 128


def test_assembling_in_threads_leaves_torch_as_it_was(pushed):
    import threading

    client, models = pushed
    results = []

    def assemble() -> None:
        for _ in range(5):
            results.append(trims.torch.load_model("torch-tests/gpt2", models["gpt2"][1], client=client))

    threads = [threading.Thread(target=assemble) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 15
    assert not torch.nn.Linear(2, 2).weight.is_meta  # outside assemble, parameters are real again


def test_strict_catches_a_persistent_buffer_the_state_lacks(pushed):
    client, models = pushed
    state = trims.torch.load_state_dict("torch-tests/resnet", client=client)
    running = next(k for k in state if k.endswith("running_var"))
    del state[running]
    with pytest.raises(trims.ModelMismatch, match="running_var"):
        trims.torch.assemble(models["resnet"][1], state)


def test_a_factory_that_does_not_match_is_refused(pushed):
    client, _ = pushed
    with pytest.raises(trims.ModelMismatch, match="missing"):
        trims.torch.load_model("torch-tests/gpt2", FACTORIES["bert"](), client=client)
    loose = trims.torch.load_model("torch-tests/gpt2", FACTORIES["bert"](), client=client, strict=False)
    assert isinstance(loose, torch.nn.Module)


def test_each_tensor_has_a_storage_of_its_own_bytes(pushed, tmp_path):
    """Saving, copying or pickling one tensor carries its own bytes, not its whole segment."""
    import copy
    import io

    client, _ = pushed
    state = trims.torch.load_state_dict("torch-tests/gpt2", client=client)
    name, small = min(state.items(), key=lambda item: item[1].nbytes if item[1].nbytes else 1 << 62)
    assert small.untyped_storage().nbytes() == small.nbytes and lives_in_store(small)
    assert copy.deepcopy(small).untyped_storage().nbytes() == small.nbytes
    saved = io.BytesIO()
    torch.save(small, saved)
    assert len(saved.getvalue()) < small.nbytes + 4096
    assert torch.equal(torch.load(io.BytesIO(saved.getvalue())), small)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no fp4 type")
def test_fp4_with_an_odd_last_dimension_is_refused_not_truncated(shared_daemon, tmp_path):
    """torch packs two fp4 values per element: [2, 3] has no torch shape (safetensors refuses it too)."""
    from .models import raw_safetensors

    path = raw_safetensors(tmp_path / "odd.safetensors", {"a": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}},
                           b"\x12\x34\x56")
    client = shared_daemon.client()
    client.push(path, "torch-tests/fp4-odd")
    with pytest.raises(trims.InvalidModel, match="last dimension must be even"):
        trims.torch.load_state_dict("torch-tests/fp4-odd", client=client)


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.factor = torch.nn.Parameter(torch.ones(8))


def test_strict_false_initialises_what_the_state_lacks_and_leaves_the_shared_tensors_be(shared_daemon, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    save_file({f"body.{k}": v for k, v in body.state_dict().items()}, tmp_path / "body.safetensors")
    client = shared_daemon.client()
    client.push(tmp_path / "body.safetensors", "torch-tests/body")

    def with_head(head):
        return lambda: torch.nn.ModuleDict({"body": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()),
                                            "head": head()})

    model = trims.torch.load_model("torch-tests/body", with_head(lambda: torch.nn.Linear(8, 3)), client=client,
                                   strict=False)
    head = model["head"]
    assert not head.weight.is_meta and head.weight.device.type == "cpu" and head.weight.abs().sum() > 0
    assert lives_in_store(model["body"][0].weight) and torch.equal(model["body"][0].weight, body[0].weight)
    x = torch.linspace(-1, 1, 8)
    assert head(model["body"](x)).shape == (3,)
    with pytest.raises(trims.ModelMismatch, match="nor the module's reset_parameters gives them any"):
        trims.torch.load_model("torch-tests/body", with_head(_Scale), client=client, strict=False)

    # A module missing one parameter of several: the stored ones beside it, buffers too, stay as stored
    norm = torch.nn.BatchNorm1d(8)
    norm.running_mean.fill_(7.0)
    stored = {k: v for k, v in norm.state_dict().items() if k != "weight"}
    save_file(stored, tmp_path / "norm.safetensors")
    client.push(tmp_path / "norm.safetensors", "torch-tests/norm-without-weight")
    loaded = trims.torch.load_model("torch-tests/norm-without-weight", lambda: torch.nn.BatchNorm1d(8),
                                    client=client, strict=False)
    assert torch.equal(loaded.weight, torch.ones(8)) and torch.equal(loaded.running_mean, torch.full((8,), 7.0))
    assert lives_in_store(loaded.running_mean) and lives_in_store(loaded.bias)
    with client.open("torch-tests/norm-without-weight") as view:
        assert (view["running_mean"] == 7.0).all()  # the node's copy, unwritten


def test_a_fresh_process_gets_a_ready_model_with_the_same_output(pushed, shared_daemon):
    _, models = pushed
    expected = output_of(models["gpt2"][0], "gpt2")
    result = run_python(
        """
        import json, trims.torch
        from tests.models import tiny_gpt2, output_of
        model = trims.torch.load_model("torch-tests/gpt2", tiny_gpt2())
        print(json.dumps(output_of(model, "gpt2").flatten().tolist()))
        """,
        {**shared_daemon.env, "PYTHONPATH": str(ROOT)},
    )
    values = torch.tensor(json.loads(result.stdout), dtype=expected.dtype)
    assert torch.equal(values, expected.flatten())
