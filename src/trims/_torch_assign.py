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
torch's loader whole. One difference on purpose: a key under a child set to None is unexpected
here (torch drops that tensor without a word).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

import torch
from torch.nn import Module, Parameter
from torch.nn.modules import batchnorm as _batchnorm
from torch.nn.modules import module as _module

from .errors import ModelMismatch

# Overriding any of these (in its class or on itself), a module loads a way of its own, whatever
# its _load_from_state_dict.
_CHANGE_LOADING = ("set_extra_state", "__setattr__", "register_parameter", "register_buffer")
# Batch norms' loader differs from the default in one rule (a state without num_batches_tracked
# gets the module's own), applied here: a hundred of them, each loading its own way, would
# cost more than all the rest of a ResNet's assignment.
_NORM_LOADER = _batchnorm._NormBase._load_from_state_dict
_DEFAULT, _NORM, _OWN = "default", "norm", "own"


def assign_state(model: Module, state: dict[str, torch.Tensor], source: str) -> tuple[list[str], list[str]]:
    """Assign ``state``'s tensors to ``model``'s parameters and persistent buffers; the keys the
    model expected but ``state`` lacks, and the keys ``state`` has but no module takes. Raises
    :class:`ModelMismatch` where a tensor does not fit its place (shape, type)."""
    modules = [(prefix, module, _loading_of(module)) for prefix, module in model.named_modules(remove_duplicate=False)]
    if not _one_pass_is_exact(state, modules):
        return _torch_loader(model, state, source)
    assignment = _Assignment(state)
    for prefix, module, loading in modules:
        assignment.load(prefix, module, loading)
    if assignment.errors:
        raise _mismatch(source, assignment.errors)
    return assignment.missing, assignment.unexpected()


class _Assignment:
    """One pass: the state's keys grouped by the module they name, and what became of them."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.by_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in state.items():
            prefix, dot, leaf = key.rpartition(".")
            if leaf and not (dot and not prefix):  # ".weight", "fc.": no module's, so unexpected
                self.by_module[prefix][leaf] = tensor
        self.prefixes = sorted(self.by_module)
        self.missing: list[str] = []
        self.errors: list[str] = []
        self.taken: set[str] = set()
        self.made_up: list[str] = []  # unexpected keys a module's own loader added to its state

    def unexpected(self) -> list[str]:
        return [key for key in self.state if key not in self.taken] + self.made_up

    def load(self, prefix: str, module: Module, loading: str) -> None:
        given = self.by_module.get(prefix, {})
        if loading == _NORM and module.track_running_stats and "num_batches_tracked" not in given:
            given = {**given, "num_batches_tracked": _own_batch_count(module)}
        if loading == _OWN:
            self._load_its_own_way(prefix, module, given)
        else:
            self._assign(f"{prefix}." if prefix else "", module, given)

    def _assign(self, head: str, module: Module, given: dict[str, torch.Tensor]) -> None:
        """Module._load_from_state_dict with assign=True, for a module that loads the default way."""
        for name, current in list(_own_tensors(module)):  # a Parameter for a buffer moves it
            key = head + name
            if name not in given:
                self.missing.append(key)
                continue
            problem = _put(module, name, given[name], current)
            if problem:
                self.errors.append(f"{key}: {problem}")
            else:
                self.taken.add(key)

    def _load_its_own_way(self, prefix: str, module: Module, given: dict[str, torch.Tensor]) -> None:
        """A leaf (see _one_pass_is_exact) given every key under its prefix, as torch gives them."""
        head = f"{prefix}." if prefix else ""
        local = {head + leaf: t for leaf, t in given.items()}
        for deeper in _below(self.prefixes, prefix):
            local.update((f"{deeper}.{leaf}", t) for leaf, t in self.by_module[deeper].items())
        keys, unexpected = set(local), []
        module._load_from_state_dict(local, head, {"assign_to_params_buffers": True}, True, self.missing,
                                     unexpected, self.errors)
        self.taken.update(keys.difference(unexpected))
        self.made_up.extend(key for key in unexpected if key not in self.state)


def _below(prefixes: list[str], prefix: str) -> list[str]:
    """The sorted ``prefixes`` of modules below ``prefix`` (all others, below the root's "")."""
    head = f"{prefix}." if prefix else ""
    start = end = bisect.bisect_left(prefixes, head)
    while end < len(prefixes) and prefixes[end].startswith(head):
        end += 1
    return [p for p in prefixes[start:end] if p != prefix]


def _put(module: Module, name: str, tensor: torch.Tensor, current: torch.Tensor) -> str | None:
    """Put ``tensor`` in ``current``'s place, as torch's loader would; what stopped it, if anything."""
    if not torch.overrides.is_tensor_like(tensor):
        return f"a {type(tensor).__name__}, not a tensor"
    if current.dim() == 0 and tensor.shape == (1,):  # torch's loader accepts 0.3-era scalars
        tensor = tensor[0]
    if tensor.shape != current.shape:
        return f"size mismatch: the state's is {tuple(tensor.shape)}, the module's {tuple(current.shape)}"
    try:
        if name not in module._parameters:
            if isinstance(tensor, (Parameter, torch.nn.Buffer)):  # these change what the name is
                setattr(module, name, tensor)
            else:
                module._buffers[name] = tensor
            return None
        if isinstance(tensor, Parameter):
            tensor.requires_grad_(current.requires_grad)
        else:  # raises for a dtype that cannot take gradients, as torch's loader does
            tensor = Parameter(tensor, requires_grad=current.requires_grad)
        module._parameters[name] = tensor
    except Exception as error:  # as torch's loader: collected, reported together
        return f"cannot be assigned ({tensor.dtype}, {tuple(tensor.shape)}): {error}"
    return None


def _own_tensors(module: Module):
    for name, param in module._parameters.items():
        if param is not None:
            yield name, param
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield name, buffer


def _loading_of(module: Module) -> str:
    """How ``module`` loads a state: the default way, batch norms' way, or a way of its own."""
    kind, own = type(module), module.__dict__
    if module._load_state_dict_pre_hooks or "_load_from_state_dict" in own or any(
            name in own or getattr(kind, name) is not getattr(Module, name) for name in _CHANGE_LOADING):
        return _OWN
    loader = kind._load_from_state_dict
    if loader is Module._load_from_state_dict:
        return _DEFAULT
    if loader is _NORM_LOADER and _counts_batches_the_usual_way(module):
        return _NORM
    return _OWN


def _counts_batches_the_usual_way(module: Module) -> bool:
    """A persistent num_batches_tracked, or none because it tracks no statistics."""
    if not module.track_running_stats:
        return True
    return module.num_batches_tracked is not None and "num_batches_tracked" not in module._non_persistent_buffers_set


def _own_batch_count(module: Module) -> torch.Tensor:
    count = module.num_batches_tracked
    return count if count is not None and not count.is_meta else torch.tensor(0, dtype=torch.long)


def _one_pass_is_exact(state: dict, modules: list[tuple[str, Module, str]]) -> bool:
    """Whether assigning module by module gives what torch's loader would."""
    if getattr(state, "_metadata", None) is not None or torch.__future__.get_swap_module_params_on_conversion():
        return False
    if _module._global_parameter_registration_hooks or _module._global_buffer_registration_hooks:
        return False
    for _, module, loading in modules:
        if module._load_state_dict_post_hooks:
            return False
        if module._modules and loading == _OWN:
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


def initialise_missing(model: Module, source: str) -> list[str]:
    """Parameters no stored tensor gave a value (still on ``meta``), made real on the CPU and
    initialised as the model would initialise them (a transformers model's ``_init_weights``,
    else the module's ``reset_parameters``), as ``load_state_dict(strict=False)`` leaves them
    at their initial values; the names initialised. The stored tensors beside them (weights,
    BatchNorm statistics) are not written: while the module initialises, it holds scratch
    copies of them instead."""
    initialised = []
    init_weights = getattr(model, "_init_weights", None)
    for prefix, module in model.named_modules():
        missing = [name for name, p in module._parameters.items() if p is not None and p.is_meta]
        if not missing:
            continue
        inits = [init for init in ((lambda m=module: init_weights(m)) if init_weights else None,
                                   getattr(module, "reset_parameters", None)) if init is not None]
        if not _initialise(module, missing, inits):
            raise ModelMismatch(f"{source} has no values for {', '.join(missing)} of {type(module).__name__} "
                                f"{prefix or '(the model)'}, and neither the model's _init_weights nor the module's "
                                "reset_parameters gives them any: push a state that holds them, or load with "
                                "strict=True to see what is missing")
        initialised += [f"{prefix}.{name}" if prefix else name for name in missing]
    return initialised


def _initialise(module: Module, missing: list[str], inits: list) -> bool:
    """Run the first of ``inits`` that gives every missing parameter a value (NaN until then),
    over scratch copies of the module's other tensors; whether one did."""
    kept = {name: p for name, p in module._parameters.items() if p is not None and name not in missing}
    buffers = dict(module._buffers)
    for name, p in list(module._parameters.items()):
        if p is not None:
            scratch = torch.empty_like(p, device="cpu")
            module._parameters[name] = Parameter(scratch.fill_(float("nan")) if scratch.is_floating_point() else
                                                 scratch.zero_(), requires_grad=p.requires_grad)
    for name, b in buffers.items():
        if b is not None:
            module._buffers[name] = b.detach().clone()
    done = False
    for init in inits:
        with torch.no_grad():
            init()
        if all(not (p.is_floating_point() and p.isnan().any()) for p in (module._parameters[n] for n in missing)):
            done = True
            break
    module._parameters.update(kept)
    module._buffers.update(buffers)
    return done
