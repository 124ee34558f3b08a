"""trims' one-pass state assignment against torch's own loader: the same module, the same
missing and unexpected keys, for real architectures and for the ways a module can load."""

from __future__ import annotations

import pytest
import torch

import trims
import trims.torch
from trims import _torch_assign
from trims._torch_assign import assign_state

from .models import FACTORIES


def on_meta(factory):
    with trims.torch._parameters_on_meta(), trims.torch._SkipFillsOnMeta():
        return factory()


@pytest.fixture
def both_ways(monkeypatch):
    """The module torch's loader makes and the one assign_state makes, checked to have the same
    missing and unexpected keys; assign_state must make its own unless ``handed_on``."""
    handed_on = []

    def to_torch(*args):
        handed_on.append(True)
        return real_loader(*args)

    real_loader = _torch_assign._torch_loader
    monkeypatch.setattr(_torch_assign, "_torch_loader", to_torch)

    def assign_both_ways(factory, state, hand_on: bool = False):
        handed_on.clear()
        by_torch = on_meta(factory)
        missing, unexpected = by_torch.load_state_dict(state, strict=False, assign=True)
        ours = on_meta(factory)
        our_missing, our_unexpected = assign_state(ours, state, "the test state")
        assert bool(handed_on) == hand_on
        assert sorted(our_missing) == sorted(missing)
        assert sorted(our_unexpected) == sorted(unexpected)
        return by_torch, ours

    return assign_both_ways


def assert_same_tensors(left: torch.nn.Module, right: torch.nn.Module) -> None:
    """The same tensors under the same names: the state's own memory, or equal values where
    the module made them (buffers it computes)."""
    def described(module):
        return [(name, type(t), t.dtype, tuple(t.shape), t.requires_grad, t.device.type) for name, t in
                trims.torch.named_tensors(module)]

    assert described(left) == described(right)
    for (name, a), (_, b) in zip(trims.torch.named_tensors(left), trims.torch.named_tensors(right)):
        assert a.is_meta == b.is_meta and (a.is_meta or a.data_ptr() == b.data_ptr() or torch.equal(a, b)), name



def fresh_state(factory) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in factory().state_dict().items()}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_real_architectures_are_assigned_as_torch_assigns_them(kind, both_ways):
    factory = FACTORIES[kind]()
    state = fresh_state(factory)
    by_torch, ours = both_ways(factory, state)
    assert_same_tensors(by_torch, ours)
    assert all(p.data_ptr() == state[n].data_ptr() for n, p in ours.named_parameters() if n in state)


def test_a_batch_norm_without_its_count_gets_its_own_as_torch_gives_it(both_ways):
    factory = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))  # noqa: E731
    state = fresh_state(factory)
    del state["1.num_batches_tracked"]
    by_torch, ours = both_ways(factory, state)
    assert_same_tensors(by_torch.float(), ours.float())
    assert ours[1].num_batches_tracked.item() == 0


def test_keys_no_module_takes_are_unexpected_as_torch_says(both_ways):
    class WithScratch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("scratch", torch.zeros(2), persistent=False)
            self.register_parameter("absent", None)

    state = fresh_state(WithScratch)
    state.update({"scratch": torch.ones(2), "absent": torch.ones(1), "linear.bias.extra": torch.ones(1),
                  "nowhere.weight": torch.ones(1), "linear": torch.ones(1), "linear._extra_state": torch.ones(1)})
    del state["linear.bias"]
    by_torch, ours = both_ways(WithScratch, state)
    assert_same_tensors(by_torch, ours)
    assert ours.scratch.tolist() == [0.0, 0.0]


def test_a_frozen_parameter_stays_frozen(both_ways):
    def factory():
        module = torch.nn.Linear(2, 2)
        module.bias.requires_grad_(False)
        return module

    by_torch, ours = both_ways(factory, fresh_state(factory))
    assert_same_tensors(by_torch, ours)
    assert not ours.bias.requires_grad and ours.weight.requires_grad


def test_a_module_shared_under_two_names_is_given_each_name_s_tensors(both_ways):
    def factory():
        shared = torch.nn.Linear(2, 2)
        return torch.nn.ModuleDict({"first": shared, "second": shared})

    state = fresh_state(factory)
    by_torch, ours = both_ways(factory, state)
    assert_same_tensors(by_torch, ours)
    assert ours["first"].weight.data_ptr() == state["second.weight"].data_ptr()  # the last name wins, as in torch


class ScalesOnLoad(torch.nn.Linear):
    """A leaf with a loader of its own: it must still run."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 2
        super()._load_from_state_dict(state_dict, prefix, *args)


class RenamesChildren(torch.nn.Module):
    """A loader over children (an older layout renamed): only torch's loader gives it their keys."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        for leaf in ("weight", "bias"):
            old = f"{prefix}old.{leaf}"
            if old in state_dict:
                state_dict[f"{prefix}inner.{leaf}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args)


class Versioned(torch.nn.Linear):
    """A leaf with extra state."""

    def __init__(self):
        super().__init__(2, 2)
        self.version = None

    def get_extra_state(self):
        return torch.tensor(7)

    def set_extra_state(self, state):
        self.version = int(state)


OLD_LAYOUT = {"0.inner.weight": "0.old.weight", "0.inner.bias": "0.old.bias"}


@pytest.mark.parametrize("factory, saved, rename, hand_on", [
    (lambda: torch.nn.Sequential(ScalesOnLoad(2, 2)), None, {}, False),
    (lambda: torch.nn.Sequential(RenamesChildren()), None, OLD_LAYOUT, True),
    (lambda: torch.nn.Sequential(Versioned()), None, {}, False),
    (lambda: torch.nn.Sequential(torch.nn.LazyLinear(2)), lambda: torch.nn.Sequential(torch.nn.Linear(3, 2)), {}, False),
], ids=["own-loader-leaf", "own-loader-over-children", "extra-state", "lazy"])
def test_modules_that_load_their_own_way_still_do(factory, saved, rename, hand_on, both_ways):
    source = (saved or factory)()
    state = {rename.get(key, key): value.clone() for key, value in source.state_dict().items()}
    by_torch, ours = both_ways(factory, state, hand_on=hand_on)
    assert_same_tensors(by_torch, ours)
    if isinstance(ours[0], Versioned):
        assert ours[0].version == 7


def test_post_load_hooks_and_metadata_go_to_torch_s_loader(both_ways):
    calls = []

    def hooked():
        module = torch.nn.Linear(2, 2)
        module.register_load_state_dict_post_hook(lambda module, keys: calls.append(list(keys.missing_keys)))
        return module

    both_ways(hooked, fresh_state(hooked), hand_on=True)
    assert calls == [[], []]
    versioned = torch.nn.BatchNorm1d(2).state_dict()  # with the versions torch records
    assert versioned._metadata
    both_ways(lambda: torch.nn.BatchNorm1d(2), versioned, hand_on=True)


def test_a_tensor_of_the_wrong_shape_is_a_model_mismatch():
    state = fresh_state(lambda: torch.nn.Linear(3, 2))
    with pytest.raises(trims.ModelMismatch, match=r"weight: size mismatch.*\(2, 3\).*\(2, 2\).*same configuration"):
        assign_state(on_meta(lambda: torch.nn.Linear(2, 2)), state, "the test state")


def test_a_tensor_that_cannot_be_a_parameter_is_a_model_mismatch():
    state = {"weight": torch.zeros(2, 2, dtype=torch.int8), "bias": torch.zeros(2)}
    with pytest.raises(trims.ModelMismatch, match="weight: cannot be assigned.*int8.*floating point"):
        trims.torch.assemble(lambda: torch.nn.Linear(2, 2), state)


class WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(2))


def renames_deeper_keys(module):
    """A load pre-hook from an older layout, in which this leaf held its weights one level down."""
    def hook(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix + "inner.")]:
            state_dict[prefix + key[len(prefix + "inner."):]] = state_dict.pop(key)

    module._register_load_state_dict_pre_hook(hook)
    return module


def loads_by_instance(module):
    """A loader set on the instance, not the class."""
    plain = module._load_from_state_dict

    def renaming(state_dict, prefix, *args):
        if prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")
        plain(state_dict, prefix, *args)

    module._load_from_state_dict = renaming
    return module


def counts_batches_privately():
    norm = torch.nn.BatchNorm1d(2)
    norm.register_buffer("num_batches_tracked", torch.tensor(0), persistent=False)
    return norm


@pytest.mark.parametrize("factory, state", [
    (WithBuffer, {"table": torch.nn.Parameter(torch.ones(2))}),
    (lambda: torch.nn.Sequential(renames_deeper_keys(torch.nn.Linear(2, 2))),
     {"0.inner.weight": torch.ones(2, 2), "0.inner.bias": torch.ones(2)}),
    (lambda: torch.nn.Sequential(loads_by_instance(torch.nn.Linear(2, 2))), {"0.w": torch.ones(2, 2), "0.bias": torch.ones(2)}),
    (lambda: torch.nn.Sequential(counts_batches_privately()),
     {f"0.{name}": torch.ones(2) for name in ("weight", "bias", "running_mean", "running_var")}),
    (lambda: torch.nn.Linear(2, 2), {".weight": torch.ones(2, 2), "bias.": torch.ones(2)}),
], ids=["parameter-for-a-buffer", "pre-hook-over-deeper-keys", "loader-on-the-instance", "private-batch-count",
        "keys-of-no-module"])
def test_unusual_states_and_modules_load_as_torch_loads_them(factory, state, both_ways):
    by_torch, ours = both_ways(factory, state)
    assert_same_tensors(by_torch, ours)
    assert sorted(ours._parameters) == sorted(by_torch._parameters)


def _transformers_case(config: str, model: str, **settings):
    def factory():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**settings))

    return factory


def _frozen_batch_norms():
    from transformers.models.rt_detr.modeling_rt_detr import RTDetrFrozenBatchNorm2d

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), RTDetrFrozenBatchNorm2d(4))


TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
# Each a way transformers models load: weight-norm parametrizations and load hooks (handed on to
# torch's loader), tied and shared embeddings, computed buffers, batch norms, frozen batch norms
# with a loader of their own.
TRANSFORMERS_CASES = {
    "wav2vec2": (_transformers_case("Wav2Vec2Config", "Wav2Vec2Model", hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=37, conv_dim=(8, 8), conv_stride=(5, 2),
                                    conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
                 True),
    "mamba": (_transformers_case("MambaConfig", "MambaModel", hidden_size=32, num_hidden_layers=1, vocab_size=100,
                                 state_size=4), True),
    "t5": (_transformers_case("T5Config", "T5ForConditionalGeneration", d_model=32, d_ff=37, num_layers=1, num_heads=2,
                              d_kv=16, vocab_size=100), False),
    "bart": (_transformers_case("BartConfig", "BartForConditionalGeneration", d_model=32, encoder_layers=1,
                                decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=100), False),
    "swin": (_transformers_case("SwinConfig", "SwinModel", embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                image_size=32, patch_size=4, window_size=4), False),
    "clip": (_transformers_case("CLIPConfig", "CLIPModel", text_config=TINY_TEXT, projection_dim=16,
                                vision_config=dict(TINY_TEXT, image_size=32, patch_size=8)), False),
    "mobilenet-v2": (_transformers_case("MobileNetV2Config", "MobileNetV2Model", depth_multiplier=0.25, image_size=32),
                     False),
    "frozen-batch-norms": (_frozen_batch_norms, False),
}


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_CASES))
def test_transformers_architectures_are_assigned_as_torch_assigns_them(kind, both_ways):
    factory, hand_on = TRANSFORMERS_CASES[kind]
    state = fresh_state(factory)
    for variant in (state, {k: v for k, v in state.items() if k != next(iter(state))},
                    {**state, "extra.weight": torch.ones(1)}):
        by_torch, ours = both_ways(factory, variant, hand_on=hand_on)
        assert_same_tensors(by_torch, ours)
