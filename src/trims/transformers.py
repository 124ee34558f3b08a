"""Hugging Face adapter: a ready ``transformers`` model from a tag, weights shared.

    import trims.transformers
    model = trims.transformers.from_pretrained("gpt2:large")
    tokenizer = AutoTokenizer.from_pretrained(trims.transformers.snapshot("gpt2:large"))

``trims push`` of a model directory keeps its config and tokenizer files beside the weights,
so the tag alone is enough: the architecture comes from ``config.json``, is built without
weights of its own (see :func:`trims.torch.assemble`) and given the shared tensors; tied
weights are tied again. Causal LMs, encoders and vision models alike.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
import transformers

from .client import Client, shared_client
from .digest import hex_of
from .ingest import plain_label
from .errors import InvalidModel, ModelMismatch
from .torch import Device, default_dtype, load_model, named_tensors

__all__ = ["from_pretrained", "snapshot"]


def from_pretrained(name: str, *, client: Client | None = None, model_class: type | None = None,
                    device: Device = None, **config_overrides: Any) -> transformers.PreTrainedModel:
    """The model ``name`` with its stored config; ``model_class`` overrides the architecture
    the config names, ``config_overrides`` its attributes (as ``from_pretrained`` takes them).
    ``device="cuda[:N]"`` builds it over the node's copy in that GPU's memory."""
    client = client or shared_client()
    model_digest = client.info(name).digest  # one look-up: config and weights of the same version
    directory = snapshot(model_digest, client=client)
    if not (directory / "config.json").is_file():
        raise InvalidModel(f"{name} was pushed without a config.json, which names its architecture: push the "
                           "model's directory (config.json beside its weights), or build the module yourself and "
                           "give it trims.torch.load_state_dict's tensors (trims.torch.load_model)")
    config = transformers.AutoConfig.from_pretrained(directory, **config_overrides)
    cls = model_class or _architecture(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)

    def build() -> torch.nn.Module:
        with default_dtype(dtype):  # buffers the model computes come out in the checkpoint's precision
            return cls(config)

    return load_model(model_digest, build, client=client, key_map=_as_transformers_loads_it, device=device)


def _as_transformers_loads_it(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors transformers' own ``from_pretrained`` would load, by the module's names."""
    return _without_ignored(model, _checkpoint_to_module_names(model, state))


def _without_ignored(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the stored tensors the module has no place for that transformers ignores
    (``_keys_to_ignore_on_load_unexpected``: GPT-2's causal masks ``attn.bias`` in older
    checkpoints; ``position_ids`` and ``inv_freq`` stored when they were persistent), or that
    are buffers the module computes (non-persistent) and transformers does not load."""
    names = dict(named_tensors(model))
    unexpected = {key for key in state if key not in names}
    computed = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                for b in getattr(module, "_non_persistent_buffers_set", ())}
    ignored = _ignored_unexpected(model, unexpected) | (set(state) & computed)
    return {key: tensor for key, tensor in state.items() if key not in ignored}


def _ignored_unexpected(model: torch.nn.Module, unexpected: set[str]) -> set[str]:
    """Which of ``unexpected`` transformers itself ignores, asked of the model (its rules
    differ by architecture and version); by ``_keys_to_ignore_on_load_unexpected`` alone where
    the model has no such method."""
    if not unexpected:
        return set()
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:
        info = types.SimpleNamespace(missing_keys=set(), unexpected_keys=set(unexpected))
        try:
            adjust(info)
            return unexpected - set(info.unexpected_keys)
        except (AttributeError, TypeError):  # another version's loading info: fall back to the patterns
            pass
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    return {key for key in unexpected if any(re.search(pattern, key) for pattern in patterns)}


def _checkpoint_to_module_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored keys as the module names them. transformers 5 renames some architectures'
    weights (ViT's ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``)
    but saves checkpoints in the old layout, renaming again on load; renaming is free, so do
    the same. Conversions that compute new tensors (merging experts, splitting fused
    projections) would copy every weight they touch, so they are refused instead."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4 renamed for a few models only (Llava): those fail as mismatches
        return state
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict(named_tensors(model))
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target, converted = (key, None) if key in names else rename_source_key(
            key, renamings, converters, model.base_model_prefix, names)
        if converted is not None:
            raise ModelMismatch(
                f"{type(model).__name__} computes its weight {target} from the stored {key}, and trims maps "
                "weights as stored rather than copy them: push the weights in the module's own layout "
                "(safetensors.torch.save_file(model.state_dict(), ...) beside its config.json), or load this "
                "model with transformers' own from_pretrained"
            )
        if target in renamed:
            raise ModelMismatch(f"two stored weights, one of them {key}, are both {target} in {type(model).__name__}")
        renamed[target] = tensor
    return renamed


def snapshot(name: str, *, client: Client | None = None) -> Path:
    """A local directory with the model's side files (config, tokenizer, generation config).

    Written once per model digest under ``$XDG_CACHE_HOME/trims/files`` and reused: pass it
    to ``AutoTokenizer.from_pretrained`` or anything else that wants a model directory.
    """
    client = client or shared_client()
    model_digest = client.info(name).digest
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trims" / "files"
    target = cache / hex_of(model_digest)
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        files = client.files(model_digest)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
        try:
            for label, data in files.items():
                if not plain_label(label):  # never trust a path from a socket
                    raise ValueError(f"the daemon sent a side file named {label!r}")
                (staging / label).parent.mkdir(parents=True, exist_ok=True)
                (staging / label).write_bytes(data)
            staging.rename(target)  # complete or absent, even with processes racing here
        except OSError:
            if not target.is_dir():  # another process finished first: use its copy
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _architecture(config: transformers.PretrainedConfig) -> type:
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]
