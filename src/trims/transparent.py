"""Transparent mode: unchanged code that loads safetensors gets the node's shared copy.

With ``trims run -- CMD`` (or ``TRIMS_TRANSPARENT=1`` after ``trims hook install``), these
calls are served from the daemon when it can, for files on local disk and the CPU:

- ``safetensors.safe_open(path, framework="pt" | "numpy" | "flax")``
- ``safetensors.torch.load_file(path)``, ``safetensors.numpy.load_file(path)``,
  ``safetensors.flax.load_file(path)`` (JAX arrays over the shared copy on the CPU, copies
  from it on another default device), with either read ``backend``
- ``torch.load(path)`` of a checkpoint in ``torch.save``'s zip format (the default since
  PyTorch 1.6) named ``*.bin``, ``*.pt``, ``*.pth`` or ``*.ckpt``, or of a file object open
  on one (as Lightning loads), to any ``map_location`` but ``"meta"``; PyTorch unpickles it
  as ever (``weights_only`` and all), its storages the shared copy's
- ``torch.export.load(path)`` of a ``.pt2`` archive (``torch.export.save``'s), or of a file
  object open on one: PyTorch deserializes the program as ever, over the shared weights
- and through them, transformers' ``from_pretrained`` of a local directory.

The file is passed to the daemon as a descriptor and registered by its content (the model
``auto/<digest>``; the next process finds it warm, and a file seen before and unchanged is
not read again). The tensors come back as copy-on-write views of the shared memory, so code
that writes to them still works, on private copies. When the daemon cannot help (not
running, not allowed, a device other than the CPU), the original function runs, after one
warning line on stderr per process; files of a kind trims does not share (``torch.save``'s
legacy pickles, TorchScript archives) load as ever, quietly.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import threading
from pathlib import Path
from typing import Any

from .client import ModelView, shared_client
from .errors import TrimsError, UnsupportedFormat

__all__ = ["install", "installed"]

_lock = threading.Lock()
_originals: dict[str, Any] = {}  # "safetensors.safe_open" -> the real object
_digests: dict[tuple, str] = {}  # identity of a file this process adopted -> model digest
_unshared: set[tuple] = set()  # identities of files of a kind trims does not share
_warned = False
_bypass = threading.local()  # .active while a real loader runs, in that thread
_LAZY_MODULES = ("safetensors.torch", "safetensors.numpy", "safetensors.flax",  # heavy: patched when imported
                 "torch.serialization", "torch.export")


def installed() -> bool:
    return "safetensors.safe_open" in _originals


def original(name: str) -> Any:
    """The real loader transparent mode replaced (``"torch.serialization.load"``, say), or None."""
    return _originals.get(name)


def install() -> None:
    """Serve safetensors loads from the daemon in this process (idempotent).

    Run it before the program imports its frameworks (``trims run`` does, at interpreter
    start): ``from safetensors import safe_open`` then binds the replacement.
    """
    import safetensors

    with _lock:
        if installed():
            return
        _originals["safetensors.safe_open"] = safetensors.safe_open
        safetensors.safe_open = SharedSafeOpen
        for name in _LAZY_MODULES:
            if name in sys.modules:
                _patch(sys.modules[name])
        sys.meta_path.insert(0, _LazyModuleFinder())
    for module in list(sys.modules.values()):  # anything imported earlier that kept the originals
        _rebind(module)


# --- what replaces the safetensors loaders --------------------------------------------------


_FRAMEWORKS = {"pt": "pt", "torch": "pt", "numpy": "numpy", "np": "numpy", "flax": "jax", "jax": "jax"}


class SharedSafeOpen:
    """Stands in for ``safetensors.safe_open``; the real one handles what trims cannot."""

    def __init__(self, filename: Any, framework: str, device: Any = "cpu", **kwargs: Any) -> None:
        self._args = (filename, framework)
        self._kwargs = {"device": device, **kwargs}
        self._real = None
        self._tensors: dict[str, Any] | None = None
        self._view: ModelView | None = None
        self._place = _as_is
        if str(device) == "cpu" and framework in _FRAMEWORKS and not _bypassed():
            self._view = _shared_view(filename)
        if self._view is not None and _FRAMEWORKS[framework] == "jax":
            # Host views; each goes onto JAX's device when asked for, as safetensors reads only
            # what is asked for (a sharded load reads slices): no whole model onto a GPU at open.
            from .jax import LazyPlacement
            from .numpy import state_dict_from_view

            self._tensors = state_dict_from_view(self._view)  # read-only: JAX arrays are immutable
            self._place = LazyPlacement(os.fsdecode(filename))
        elif self._view is not None:
            self._tensors = _tensors(self._view, _FRAMEWORKS[framework])
        else:
            self._real = _originals["safetensors.safe_open"](filename, framework, device=device, **kwargs)

    def keys(self) -> list[str]:
        return sorted(self._open()) if self._real is None else self._real.keys()  # sorted, as safetensors does

    def offset_keys(self) -> list[str]:
        if self._tensors is None:
            return self._real.offset_keys()
        return sorted(self._tensors, key=lambda n: (self._view.index[n].segment, self._view.index[n].offset))

    def metadata(self) -> dict[str, str] | None:
        if self._real is not None:
            return self._real.metadata()
        self._open()
        return self._view.metadata or None

    def get_tensor(self, name: str) -> Any:
        return self._real.get_tensor(name) if self._real is not None else self._place(self._open()[name])

    def get_tensors(self) -> dict[str, Any]:
        if self._real is not None:
            return self._real.get_tensors()
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_slice(self, name: str) -> Any:
        if self._real is not None:
            return self._real.get_slice(name)
        return _Slice(self._open()[name], self._view.index[name].dtype, self._place)

    def _open(self) -> dict[str, Any]:
        if self._tensors is None:
            from safetensors import SafetensorError

            raise SafetensorError("File is closed")
        return self._tensors

    def __enter__(self) -> SharedSafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._real is not None:
            self._real.__exit__(*exc)
        self._tensors = None  # the tensors handed out keep the memory (and lease) alive

    def __getattr__(self, name: str) -> Any:  # anything else: the real reader, opened on demand
        if name.startswith("_"):
            raise AttributeError(name)
        if self.__dict__.get("_real") is None:
            filename, framework = self._args
            self._real = _originals["safetensors.safe_open"](filename, framework, **self._kwargs)
        return getattr(self._real, name)


def _as_is(tensor: Any) -> Any:
    return tensor


class _Slice:
    """Like safetensors' lazy slice: index it to get (a view of) the tensor."""

    def __init__(self, tensor: Any, dtype: str, place: Any) -> None:
        self._tensor = tensor
        self._dtype = dtype
        self._place = place

    def __getitem__(self, index: Any) -> Any:
        part = self._tensor[index]  # contiguous, as safetensors reads a slice (a copy only where it is not)
        if hasattr(part, "contiguous"):
            return self._place(part.contiguous())
        import numpy

        return self._place(numpy.ascontiguousarray(part))

    def get_shape(self) -> list[int]:
        return list(self._tensor.shape)

    def get_dtype(self) -> str:
        return self._dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tensor, name)


def _served(kwargs: dict[str, Any]) -> bool:
    """Whether a ``load_file`` call is for the daemon: ``backend`` (mmap or pread) only says how
    safetensors reads the file, which a served load does not; anything else is the real one's."""
    return set(kwargs) <= {"backend"} and kwargs.get("backend", "mmap") in ("mmap", "pread") and not _bypassed()


def shared_torch_load_file(filename: Any, device: Any = "cpu", **kwargs: Any) -> dict[str, Any]:
    view = _shared_view(filename) if str(device) == "cpu" and _served(kwargs) else None
    if view is None:
        return _original("safetensors.torch.load_file", filename, device=device, **kwargs)
    return _tensors(view, "pt")


def _shared_load_file(loader: str, framework: str) -> Any:
    """Stands in for ``load_file`` of safetensors.numpy or .flax (``loader``)."""
    def load_file(filename: Any, **kwargs: Any) -> dict[str, Any]:
        view = _shared_view(filename) if _served(kwargs) else None
        if view is None:
            return _original(loader, filename, **kwargs)
        return _tensors(view, framework)
    return load_file


shared_numpy_load_file = _shared_load_file("safetensors.numpy.load_file", "numpy")
shared_flax_load_file = _shared_load_file("safetensors.flax.load_file", "jax")


def shared_torch_load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
    """Stands in for ``torch.load``: a checkpoint file on local disk comes from the daemon."""
    path = _checkpoint_path(f) if not _bypassed() else None
    if path is not None:
        served = _shared_checkpoint(f, path, map_location, pickle_module, kwargs)
        if served is not _NOT_SERVED:
            return served
    # Not as _original(): torch.load of a .safetensors path calls safetensors' load_file, served too.
    return _originals["torch.serialization.load"](f, map_location, pickle_module, **kwargs)


_NOT_SERVED = object()


def _shared_checkpoint(f: Any, path: str, map_location: Any, pickle_module: Any, kwargs: dict[str, Any]) -> Any:
    from . import _torch_checkpoint

    if _torch_checkpoint.needs_file_offsets(map_location):
        return _NOT_SERVED  # torch.load reads those from the file, as it would without trims
    view = _shared_view(path)
    if view is None:
        return _NOT_SERVED
    try:
        records = shared_client().files(view.digest)
    except TrimsError as exc:
        _warn_once(f"trims: loading {path} without the shared store: {exc}")
        view.close()
        return _NOT_SERVED
    try:
        return _torch_checkpoint.load_over(view, records, f, map_location, pickle_module, **kwargs)
    except UnsupportedFormat:  # refused before anything was read: the file serves, as without trims
        view.close()
        return _NOT_SERVED


def shared_export_load(f: Any, **kwargs: Any) -> Any:
    """Stands in for ``torch.export.load``: a ``.pt2`` archive on local disk comes from the daemon."""
    from .torch_format import EXPORT_SUFFIX

    path = _checkpoint_path(f, (EXPORT_SUFFIX,)) if not _bypassed() else None
    view = _shared_view(path) if path is not None else None
    if view is not None:
        from ._torch_checkpoint import load_exported_over

        try:
            return load_exported_over(view, shared_client().files(view.digest), f, **kwargs)
        except TrimsError as exc:  # nothing was read from f: the file serves, as without trims
            _warn_once(f"trims: loading {path} without the shared store: {exc}")
            view.close()
        except BaseException:
            view.close()  # not for as long as the traceback lives
            raise
    return _originals["torch.export.load"](f, **kwargs)


def _checkpoint_path(f: Any, suffixes: tuple[str, ...] | None = None) -> str | None:
    """The file a loader was given, if on disk: a path with one of ``suffixes`` (torch.save's
    by default), or a file object open on one at its start (Lightning's
    ``load_from_checkpoint`` passes what fsspec opened)."""
    from .torch_format import SUFFIXES

    suffixes = suffixes or SUFFIXES
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
    else:
        try:
            path, position, opened = f.name, f.tell(), os.fstat(f.fileno())
            named = os.stat(path)
        except (AttributeError, OSError, TypeError, ValueError):  # a BytesIO, a closed file, a socket
            return None
        if position != 0 or (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            return None  # read from elsewhere, or a file the name no longer leads to
    return path if isinstance(path, str) and path.endswith(suffixes) else None


def _bypassed() -> bool:
    return getattr(_bypass, "active", False)


def _original(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call a real loader; the safe_open it calls inside must not ask the daemon again."""
    _bypass.active = True
    try:
        return _originals[name](*args, **kwargs)
    finally:
        _bypass.active = False


# --- from a path to a view of the shared copy ------------------------------------------------


def _shared_view(filename: Any) -> ModelView | None:
    """The daemon's copy of a local model file, or None if it cannot help: with one warning,
    unless the file is of a kind trims does not share (a TorchScript archive, say)."""
    try:
        path = Path(os.fspath(filename))
        try:
            info = path.stat()
        except OSError:  # no such file, say: the original loader says so, as without trims
            return None
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if identity in _unshared:
            return None
        client = shared_client()
        model_digest = _digests.get(identity)
        if model_digest is None:
            try:
                model_digest = _digests[identity] = client.adopt(path).digest
            except UnsupportedFormat:
                _unshared.add(identity)  # not asked again: loaded as it would be without trims
                return None
        return client.open(model_digest)
    except (TrimsError, OSError, TypeError) as exc:
        _warn_once(f"trims: loading {filename} without the shared store: {exc}")
        return None


def _tensors(view: ModelView, framework: str) -> dict[str, Any]:
    if framework == "pt":
        from .torch import state_dict_from_view

        return state_dict_from_view(view)
    if framework == "jax":
        from .jax import state_dict_from_view as jax_arrays

        return jax_arrays(view)  # immutable: nothing to copy on write
    from .numpy import state_dict_from_view as arrays

    return arrays(view, writable=True)  # as safetensors' own arrays are


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        sys.stderr.write(message.rstrip() + "\n")


# --- putting the replacements where code will look for them ----------------------------------


def _patch(module: Any) -> None:
    """Replace ``load_file`` in safetensors.torch, .numpy or .flax (and its ``safe_open``),
    ``load`` in torch.serialization (which ``torch`` then imports as ``torch.load``) or in
    torch.export."""
    attribute = "load" if module.__name__.startswith("torch.") else "load_file"
    _originals.setdefault(f"{module.__name__}.{attribute}", getattr(module, attribute))
    setattr(module, attribute, _REPLACEMENTS[f"{module.__name__}.{attribute}"])
    if hasattr(module, "safe_open"):
        module.safe_open = SharedSafeOpen


def _rebind(module: Any) -> None:
    """Point names a module imported from safetensors at the replacements."""
    swaps = {id(_originals[k]): v for k, v in (("safetensors.safe_open", SharedSafeOpen), *_REPLACEMENTS.items())
             if k in _originals}
    try:
        items = list(vars(module).items())
    except TypeError:
        return
    for attr, value in items:
        if id(value) in swaps:
            setattr(module, attr, swaps[id(value)])


_REPLACEMENTS = {"safetensors.torch.load_file": shared_torch_load_file,
                 "safetensors.numpy.load_file": shared_numpy_load_file,
                 "safetensors.flax.load_file": shared_flax_load_file,
                 "torch.serialization.load": shared_torch_load,
                 "torch.export.load": shared_export_load}


class _LazyModuleFinder(importlib.abc.MetaPathFinder):
    """Patches safetensors.torch, .numpy, .flax, torch.serialization and torch.export when the
    program imports them."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _LAZY_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                    return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
