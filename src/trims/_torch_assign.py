"""Giving a module the tensors of a state dict: what ``load_state_dict(state, strict=False,
assign=True)`` does, in one pass over the keys.

torch's loader hands every module the keys under its prefix by filtering its parent's (a pass
over the keys per module: about a millisecond per hundred modules on the models we serve)
and assigns each tensor through ``Module.__setattr__``. Here the keys are grouped by module
once, and a module that loads the default way gets its tensors put in place directly, as
``__setattr__`` would put them. A module that loads its own way (an override of
``_load_from_state_dict``, load hooks, extra state) without children still loads its own way,
given its own keys; any model whose loading could reach further than that (a custom loader
over children, post-load hooks, metadata, global registration hooks, swapped tensors) goes to
torch's loader whole.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.nn import Module, Parameter
from torch.nn.modules import batchnorm as _batchnorm
from torch.nn.modules import module as _module

from .errors import ModelMismatch

# Overriding any of these, a module loads a way of its own even with the default loader.
_LOADING_ATTRIBUTES = ("set_extra_state", "__setattr__", "register_parameter", "register_buffer")
# Batch norms' loader differs from the default in one rule (a state without num_batches_tracked
# gets the module's own), applied here: a hundred of them, each loading its own way, would
# cost more than all the rest of a ResNet's assignment.
_NORM_LOADER = _batchnorm._NormBase._load_from_state_dict
_DEFAULT, _NORM, _OWN = "default", "norm", "own"
_LOADING_BY_CLASS: dict[type, str] = {}


def assign_state(model: Module, state: dict[str, torch.Tensor], source: str) -> tuple[list[str], list[str]]:
    """Assign ``state``'s tensors to ``model``'s parameters and persistent buffers; the keys the
    model expected but ``state`` lacks, and the keys ``state`` has but no module takes. Raises
    :class:`ModelMismatch` where a tensor does not fit its place (shape, type)."""
    modules = list(model.named_modules(remove_duplicate=False))
    if not _one_pass_is_exact(model, state, modules):
        return _torch_loader(model, state, source)
    by_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        by_module[prefix][leaf] = tensor
    missing: list[str] = []
    errors: list[str] = []
    taken: set[str] = set()
    for prefix, module in modules:
        given = by_module.get(prefix, {})
        head = f"{prefix}." if prefix else ""
        loading = _loading_of(module)
        if loading == _NORM and module.track_running_stats and "num_batches_tracked" not in given:
            given = {**given, "num_batches_tracked": _own_batch_count(module)}
        if loading != _OWN:
            _assign_own(module, given, head, missing, errors, taken)
        else:  # a leaf (see _one_pass_is_exact): its keys are all its loader sees
            unexpected_here: list[str] = []
            module._load_from_state_dict({head + leaf: t for leaf, t in given.items()}, head,
                                         {"assign_to_params_buffers": True}, True, missing, unexpected_here, errors)
            taken.update(head + leaf for leaf in given if head + leaf not in unexpected_here)
    if errors:
        raise _mismatch(source, errors)
    return missing, [key for key in state if key not in taken]


def _assign_own(module: Module, given: dict[str, torch.Tensor], head: str, missing: list[str],
                errors: list[str], taken: set[str]) -> None:
    """Module._load_from_state_dict with assign=True, for one module that loads the default way."""
    for name, current in _own_tensors(module):
        key = head + name
        if name not in given:
            missing.append(key)
            continue
        tensor = given[name]
        if not torch.overrides.is_tensor_like(tensor):
            errors.append(f"{key} is a {type(tensor).__name__}, not a tensor")
            continue
        if current.dim() == 0 and tensor.shape == (1,):  # torch's loader accepts 0.3-era scalars
            tensor = tensor[0]
        if tensor.shape != current.shape:
            errors.append(f"size mismatch for {key}: the state's is {tuple(tensor.shape)}, "
                          f"the module's {tuple(current.shape)}")
            continue
        if name in module._parameters:
            if isinstance(tensor, Parameter):
                tensor.requires_grad_(current.requires_grad)
            else:
                tensor = Parameter(tensor, requires_grad=current.requires_grad)
            module._parameters[name] = tensor
        else:
            module._buffers[name] = tensor
        taken.add(key)


def _own_tensors(module: Module):
    for name, param in module._parameters.items():
        if param is not None:
            yield name, param
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


def _loading_of(module: Module) -> str:
    """How ``module`` loads a state: the default way, batch norms' way, or a way of its own."""
    if module._load_state_dict_pre_hooks:
        return _OWN
    kind = type(module)
    loading = _LOADING_BY_CLASS.get(kind)
    if loading is None:
        loader = kind._load_from_state_dict
        if any(getattr(kind, name) is not getattr(Module, name) for name in _LOADING_ATTRIBUTES):
            loading = _OWN
        else:
            loading = _DEFAULT if loader is Module._load_from_state_dict else _NORM if loader is _NORM_LOADER else _OWN
        _LOADING_BY_CLASS[kind] = loading
    return loading


def _own_batch_count(module: Module) -> torch.Tensor:
    count = module.num_batches_tracked
    return count if count is not None and not count.is_meta else torch.tensor(0, dtype=torch.long)


def _one_pass_is_exact(model: Module, state: dict, modules: list[tuple[str, Module]]) -> bool:
    """Whether assigning module by module gives what torch's loader would."""
    if getattr(state, "_metadata", None) is not None or torch.__future__.get_swap_module_params_on_conversion():
        return False
    if _module._global_parameter_registration_hooks or _module._global_buffer_registration_hooks:
        return False
    for _, module in modules:
        if module._load_state_dict_post_hooks:
            return False
        if module._modules and _loading_of(module) == _OWN:
            return False
    return True


def _torch_loader(model: Module, state: dict[str, torch.Tensor], source: str) -> tuple[list[str], list[str]]:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # torch reports a tensor that does not fit so
        raise _mismatch(source, [str(error)]) from error
    return list(missing), list(unexpected)


def _mismatch(source: str, errors: list[str]) -> ModelMismatch:
    shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
    return ModelMismatch(f"the module built by the factory does not fit {source}: {shown}; "
                         "check the factory builds the architecture that was pushed, in the same configuration")
