"""PyTorch adapter: shared, zero-copy state dicts and ready modules.

    import trims.torch
    model = trims.torch.load_model("gpt2:large", lambda: GPT2LMHeadModel(config))

Tensors are views of the daemon's segments mapped copy-on-write in this process: building
them copies nothing, an in-place write (say, fine-tuning by mistake) copies only the pages
it touches and is never seen by another process. They keep the model's lease alive for as
long as any of them exists.

With ``device="cuda"`` (or ``"cuda:N"``) they are views of the node's one copy in that GPU's
memory, mapped read-only: building them copies nothing, and an in-place write faults in
the writing process (its CUDA context is lost) instead of reaching anyone else.

Importing this module wraps ``torch.nn.Module.register_parameter`` once (and the first
:func:`assemble` after transformers is loaded wraps its per-module weight initialisation);
outside :func:`assemble`, in every thread, the wrappers only call the originals.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping, TypeVar, Union

import torch
from torch.overrides import TorchFunctionMode

from ._torch_assign import assign_state, initialise_missing
from ._torch_checkpoint import load_exported_over, load_over, needs_file_offsets
from .client import Client, ModelView, shared_client
from .errors import GpuError, InvalidModel, ModelMismatch
from .torch_format import FORMAT, FORMAT_KEY, refuse_as_tensors

__all__ = ["load_state_dict", "load_model", "load_checkpoint", "load_exported", "assemble", "state_dict_from_view",
           "default_dtype", "cuda_index"]

M = TypeVar("M", bound=torch.nn.Module)

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16,
    "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16, "U32": torch.uint32,
    "I32": torch.int32, "F32": torch.float32, "U64": torch.uint64, "I64": torch.int64,
    "F64": torch.float64, "C64": torch.complex64, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
for _name, _attr in (("F8_E8M0", "float8_e8m0fnu"), ("F4", "float4_e2m1fn_x2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


Device = Union[torch.device, str, None]


def load_state_dict(name: str, *, client: Client | None = None,
                    device: Device | int = None) -> dict[str, torch.Tensor]:
    """The model's tensors, sharing the daemon's memory (host, or the GPU ``device``'s).
    The lease lasts while they do. For a PyTorch checkpoint of a state dict (``torch.save(
    model.state_dict())``), that state dict, as :func:`load_checkpoint` gives it."""
    client = client or shared_client()
    index = cuda_index(device)
    if index is not None and client.info(name).metadata.get(FORMAT_KEY) == FORMAT:  # before a GPU copy is made
        raise InvalidModel(f"{name} is a PyTorch checkpoint, which trims shares in host memory only: load it on "
                           "the CPU, or push its tensors as safetensors to share them on a GPU")
    view = client.open(name, device=index)
    if view.metadata.get(FORMAT_KEY) == FORMAT and index is None:
        return _checkpoints_state_dict(view, client)
    refuse_as_tensors(name, view.metadata)
    return state_dict_from_view(view)


def _checkpoints_state_dict(view: ModelView, client: Client) -> dict[str, torch.Tensor]:
    state = load_over(view, client.files(view.digest))
    if not (isinstance(state, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in state.items())):
        raise InvalidModel(f"{view.name} is a PyTorch checkpoint of a {type(state).__name__}, not of a state dict "
                           "(names to tensors): load it with trims.torch.load_checkpoint and take the state dict out")
    return dict(state)


def load_checkpoint(name: str, map_location: Any = None, *, client: Client | None = None, **load_args: Any) -> Any:
    """What ``torch.load`` returns for the PyTorch checkpoint pushed as ``name`` (``trims push
    model.pt --name NAME``): PyTorch unpickles it as ever (``weights_only``, ``map_location`` and
    ``load_args`` as ``torch.load`` takes them), its tensors over the node's shared copy,
    copy-on-write, for as long as they live."""
    if needs_file_offsets(map_location):
        raise InvalidModel(f"this torch.load needs the offsets of {name}'s storages in a file (it loads onto meta, "
                           "under a FakeTensorMode or with TORCH_SERIALIZATION_DEBUG=1), which a shared checkpoint "
                           "does not have: torch.load the checkpoint's file for it")
    client = client or shared_client()
    view = client.open(name)
    return load_over(view, client.files(view.digest), None, map_location, **load_args)


def load_exported(name: str, *, client: Client | None = None, **load_args: Any) -> torch.export.ExportedProgram:
    """What ``torch.export.load`` returns for the archive pushed as ``name`` (``trims push
    model.pt2 --name NAME``): PyTorch deserializes the program as ever (``load_args`` as
    ``torch.export.load`` takes them), its weights and constants over the node's shared copy,
    copy-on-write; ``.module()`` makes a module whose parameters are those same tensors."""
    client = client or shared_client()
    view = client.open(name)
    return load_exported_over(view, client.files(view.digest), None, **load_args)


def cuda_index(device: Device | int) -> int | None:
    """The CUDA device index ``device`` names (an int is one already; the current device for
    a bare ``"cuda"``); None for the CPU."""
    if device is None or isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"trims shares models in host memory or CUDA device memory, not on {device.type!r}")
    if device.index is not None:
        return device.index
    if not torch.cuda.is_available():  # current_device() would fail with a bare AssertionError
        build = "no CUDA device visible" if torch.version.cuda else "this PyTorch is a CPU-only build"
        raise GpuError(f"device='cuda' names the current CUDA device, and PyTorch has none here ({build}); "
                       "open on the CPU, or run where a GPU is")
    return torch.cuda.current_device()


def state_dict_from_view(view: ModelView) -> dict[str, torch.Tensor]:
    """Tensors over an open view's mapped segments, no byte copied. In host memory each has a
    storage of its own, exactly its bytes, as a file's loader gives it: ``torch.save``,
    ``deepcopy`` or pickling one tensor carries that tensor, not its segment (which may hold
    other models' tensors too); a tensor whose bytes an earlier one shares (``view.repeats``)
    is a copy instead, the mapping being writable and private, so ``add_`` on one must not
    change the other. On a GPU they are strided views of one tensor per segment and dtype."""
    if view.device is not None:
        return _device_state_dict(view)
    state = {}
    for name, entry in view.index.items():
        dtype, shape = _torch_layout(entry.dtype, entry.shape, entry.nbytes)
        count = entry.nbytes // dtype.itemsize
        state[name] = torch.frombuffer(view.segments[entry.segment], dtype=dtype, count=count,
                                       offset=entry.offset).view(shape) if count else torch.empty(shape, dtype=dtype)
    for name in view.repeats:
        state[name] = state[name].clone()
    return state


def _device_state_dict(view: ModelView) -> dict[str, torch.Tensor]:
    bases: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    state = {}
    for name, entry in view.index.items():
        dtype, shape = _torch_layout(entry.dtype, entry.shape, entry.nbytes)
        base = bases.get((entry.segment, dtype))
        if base is None:  # segments are 64-byte multiples: every element type divides them
            segment = torch.as_tensor(view.segments[entry.segment], device=f"cuda:{view.device}")
            base = bases[entry.segment, dtype] = segment.view(dtype)
        state[name] = base.as_strided(shape, _contiguous_strides(shape), entry.offset // dtype.itemsize)
    return state


def _torch_layout(dtype: str, shape: tuple[int, ...], nbytes: int) -> tuple[torch.dtype, tuple[int, ...]]:
    if dtype == "F4" and "F4" in _DTYPES:  # torch packs two fp4 values per element
        if not shape or shape[-1] % 2:
            raise InvalidModel(f"an F4 tensor of shape {list(shape)} cannot be a torch tensor: torch packs two "
                               "fp4 values per element, so the last dimension must be even (as safetensors requires)")
        return _DTYPES["F4"], (*shape[:-1], shape[-1] // 2)
    if dtype in _DTYPES:
        return _DTYPES[dtype], shape
    from ._numpy_views import packed_shape  # F6_*: no torch type; raw packed bytes

    return torch.uint8, packed_shape(shape, nbytes)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


KeyMap = Callable[[torch.nn.Module, "dict[str, torch.Tensor]"], "dict[str, torch.Tensor]"]


def load_model(name: str, factory: Callable[[], M], *, client: Client | None = None, strict: bool = True,
               key_map: KeyMap | None = None, device: Device = None) -> M:
    """``factory()`` built without weights of its own, given the stored model's shared ones:
    in host memory, or on the CUDA ``device`` (``"cuda"``, ``"cuda:1"``).

    See :func:`assemble`. Raises :class:`~trims.errors.ModelMismatch` if ``strict`` and the
    module's parameters and the stored tensors do not match one to one; with ``strict=False``
    stored tensors the module lacks are left out, and parameters the store lacks (a new
    classification head) are initialised afresh, in memory of this process's own (said on
    the ``trims.torch`` logger), as ``load_state_dict(strict=False)`` leaves them.
    """
    index = cuda_index(device)
    model = assemble(factory, load_state_dict(name, client=client, device=index), strict=strict, source=name,
                     key_map=key_map)
    # Shared tensors are on the device already (``to`` leaves them be); the buffers the model
    # computes rather than stores were built on the CPU and follow them.
    return model if index is None else model.to(f"cuda:{index}")


def assemble(factory: Callable[[], M], state: dict[str, torch.Tensor], *, strict: bool = True,
             source: str = "the state dict", key_map: KeyMap | None = None) -> M:
    """Build ``factory()`` without allocating its weights, then give it ``state``'s tensors.

    Parameters are created on the ``meta`` device (no memory, no random init); buffers
    the model computes itself and does not store (rotary ``inv_freq``, ``position_ids``)
    are built on the CPU as the model's own code builds them. The tensors are then
    assigned, not copied, and weights the checkpoint stored once but the model ties
    (GPT-2's ``lm_head`` and ``wte``) are tied again. The module comes back in eval mode.
    ``key_map(module, state)``, if given, renames the stored keys to the module's own names
    (a checkpoint saved in an older layout); it may rename, never copy.
    """
    _skip_transformers_init_of_weights()
    with _parameters_on_meta(), _SkipFillsOnMeta():
        model = factory()
    if key_map is not None:
        state = key_map(model, state)
    groups = _tied_groups(model)
    missing_keys, unexpected = assign_state(model, state, source)
    retied = _retie(model, groups, state)
    # Stored tensors the module lacks, parameters still on meta, and persistent buffers the
    # state did not provide (built on the CPU, they would silently keep their initial values).
    missing = sorted({n for n in missing_keys if n not in retied} | {n for n, t in named_tensors(model) if t.is_meta})
    if strict and (missing or unexpected):
        differences = [f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})"
                       for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelMismatch(f"the module built by the factory does not match {source}: {' and '.join(differences)}; "
                            "check the factory builds the architecture that was pushed")
    if missing:
        initialised = initialise_missing(model, source)
        if initialised:
            log.warning("%d parameters of %s are not in %s and were initialised afresh (strict=False): %s",
                        len(initialised), type(model).__name__, source, ", ".join(initialised[:5]))
    return model.eval()


# Parameters registered while this thread is inside assemble() go to the meta device. The
# hook is installed once, for good, and does nothing unless the flag is set: a temporary
# patch of torch.nn.Module would leak into other threads building modules meanwhile, and two
# overlapping patches could leave it installed.
_building = threading.local()
_register_parameter = torch.nn.Module.register_parameter


def _register_on_meta_while_building(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    _register_parameter(module, name, param)
    # A lazy module's uninitialised parameters hold no memory; their loader materialises them.
    if (param is not None and getattr(_building, "active", False) and not param.is_meta
            and not torch.nn.parameter.is_lazy(param)):
        module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)


torch.nn.Module.register_parameter = _register_on_meta_while_building


def _skip_transformers_init_of_weights() -> None:
    """While this thread assembles, transformers' model-wide initialisation pass
    (``PreTrainedModel._initialize_weights``, once per module) runs only for modules that
    hold non-persistent buffers: the values of those come from nowhere else, and transformers
    computes them there. Every other module's pass would only fill meta parameters (skipped)
    and persistent buffers the state replaces, yet its config look-ups and dispatch are about
    half of building a transformers model. Installed once, when transformers is loaded."""
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    original = getattr(pretrained, "_initialize_weights", None)
    if original is None or getattr(original, "_trims_wrapper", False):
        return

    def _initialize_weights(self, module: torch.nn.Module, *args, **kwargs):
        if getattr(_building, "active", False) and not getattr(module, "_non_persistent_buffers_set", ()):
            return None
        return original(self, module, *args, **kwargs)

    _initialize_weights._trims_wrapper = True
    pretrained._initialize_weights = _initialize_weights


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """In this thread, register every new parameter on ``meta``; buffers stay real."""
    outer = getattr(_building, "active", False)
    _building.active = True
    try:
        yield
    finally:
        _building.active = outer


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | str | None) -> Iterator[None]:
    """Build modules in ``dtype`` when it is a floating-point type, as ``from_pretrained``
    does for a checkpoint in that precision; otherwise change nothing."""
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# In-place initialisers: on a meta tensor they compute nothing, yet each runs through
# Python decompositions (~0.5 ms a call, most of a module's build time). Values only: ops
# that change shape or flags (resize_, requires_grad_) are not in this list.
_FILL_OPS = frozenset({
    "normal_", "uniform_", "zero_", "fill_", "copy_", "random_", "exponential_", "bernoulli_",
    "cauchy_", "log_normal_", "geometric_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "trunc_normal_", "orthogonal_", "sparse_", "constant_", "ones_", "zeros_",
    "eye_", "dirac_",
})


class _SkipFillsOnMeta(TorchFunctionMode):
    """Skips filling meta tensors with values they cannot hold."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _FILL_OPS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    by_identity: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity[id(param)].append(name)
    return [names for names in by_identity.values() if len(names) > 1]


def _retie(model: torch.nn.Module, groups: list[list[str]], state: dict[str, torch.Tensor]) -> set[str]:
    """Point every alias of a tied parameter at the one the state stored; the aliases set."""
    retied: set[str] = set()
    for names in groups:
        stored = next((n for n in names if n in state), None)
        if stored is None:
            continue
        param = model.get_parameter(stored)
        for alias in names:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)
            retied.add(alias)
    return retied


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer, a tied one under each of its names (as
    ``named_parameters(remove_duplicate=False)`` and ``named_buffers`` give them, in half the
    time: one walk of the modules)."""
    modules = list(model.named_modules(remove_duplicate=False))
    for members in ("_parameters", "_buffers"):
        for prefix, module in modules:
            for name, tensor in getattr(module, members).items():
                if tensor is not None:
                    yield (f"{prefix}.{name}" if prefix else name), tensor
