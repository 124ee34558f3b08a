"""The client: connect to the node's daemon, open models as read-only mappings.

``Client.open`` returns a :class:`ModelView`, a ``Mapping[str, numpy.ndarray]`` over the
daemon's sealed segments mapped copy-on-write: no byte is copied, a write stays private to
the process that makes it, and the descriptors are closed as soon as the memory is mapped
(a model costs no descriptors and one mapping per segment).

``Client.open(name, device=N)`` maps the node's copy in CUDA device N's memory instead,
read-only, for the adapters (:mod:`trims.torch`) to build tensors over. N is this process's
ordinal, as torch numbers its devices; the daemon, which may number them otherwise, is told
the device's UUID.

A lease keeps the model in the daemon's host (or GPU) memory. It ends at :meth:`ModelView.close`,
when the process exits, or once nothing refers to the view or to any array or tensor made
from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TypeVar

from . import layout, protocol, transport
from ._mapping import map_private
from .config import check_socket_directory, default_socket_path
from .errors import (ConnectionLost, DaemonUnavailable, GpuError, IntegrityError, InvalidModel, PeerStalled,
                     RemoteProtocolError, RequestError, error_for_code)
from .multiplex import Multiplexer
from .protocol import ModelSummary, ProgressCallback, PushResult, TensorEntry
from .torch_format import PUSHABLE

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Client", "ModelView", "connect", "shared_client", "model_files"]

_Reply = TypeVar("_Reply", bound=protocol.Message)

log = logging.getLogger("trims.client")


def connect(socket: str | os.PathLike | None = None, *, timeout: float | None = 10.0) -> Client:
    """A client of the daemon at ``socket`` (default: ``$TRIMS_SOCKET`` or the per-user path).

    Raises :class:`~trims.errors.DaemonUnavailable` if no daemon answers.
    """
    client = Client(Path(socket) if socket is not None else default_socket_path(), timeout=timeout)
    try:
        client.ping(timeout)
    except BaseException:
        client.close()  # a stalled daemon's connection would otherwise stay open until the gc's next cycle
        raise
    return client


_shared: Client | None = None
_shared_lock = threading.Lock()
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock another thread held at fork() stays held forever in the child: renew them all."""
    global _shared_lock
    _shared_lock = threading.Lock()
    for client in list(_clients):
        client._lock = threading.Lock()
        client._forget_connection_in_child()
        if client._release_flusher is not None:  # the parent's thread did not come along
            client._release_flusher.abandon()
            client._release_flusher = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def shared_client() -> Client:
    """One client per process for the adapters' convenience functions (``client=None``).

    It connects on its first request, saving a round trip on the path to a ready model.
    """
    global _shared
    path = default_socket_path()  # each call: a changed TRIMS_SOCKET gets a client of its own
    with _shared_lock:
        if _shared is None or _shared.socket_path != path:
            _shared = Client(path)
        return _shared


class Client:
    """A connection to the daemon. Thread-safe, and its threads' requests do not wait for each
    other's: a release is answered while another thread's open waits. Reconnects after a
    daemon restart.

    Safe across ``fork()``: a child process opens a connection of its own on first use.
    """

    def __init__(self, socket_path: Path, *, timeout: float | None = 10.0) -> None:
        self.socket_path = socket_path
        self._timeout = timeout
        self._lock = threading.Lock()
        _clients.add(self)
        self._connection: Multiplexer | None = None
        self._pid = os.getpid()
        self._generation = 0  # bumped on every new connection: leases belong to one
        self._pending_releases: list[tuple[int, int]] = []
        self._release_flusher: _ReleaseFlusher | None = None

    # --- public verbs ----------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> protocol.Pong:
        """The daemon's version and pid; :class:`DaemonUnavailable` if it does not answer
        within ``timeout`` seconds (a daemon that accepts but never answers is not healthy).
        A timeout costs only the ping: the connection, and its leases, stay."""
        try:
            return self._request(protocol.Ping(), protocol.Pong, reply_timeout=timeout)[0]
        except (ConnectionLost, PeerStalled) as exc:
            raise DaemonUnavailable(f"the trims daemon at {self.socket_path} did not answer: {exc}") from None

    def open(self, name: str, *, device: int | None = None) -> ModelView:
        """Lease and map model ``name`` (``NAME[:TAG]`` or a ``blake3:`` digest): in host
        memory, or, with ``device``, the node's copy in that CUDA device's memory."""
        with self._lock:
            if self._release_flusher is None:
                self._release_flusher = _ReleaseFlusher(self)
        uuid = None if device is None else _device_uuid(device)
        reply, generation = self._request(protocol.Open(name=name, device=uuid), protocol.Opened)
        lease = _Lease(self, reply.lease, generation)
        if reply.device != uuid:
            lease.close()
            _close_fds(reply.fds)
            raise GpuError(f"asked for {name} on cuda:{device} ({uuid}), the daemon sent it in "
                           f"{'host memory' if reply.device is None else reply.device}; "
                           "upgrade the daemon to one with a GPU tier")
        return _map_model(reply, lease, device)

    def push(self, path: str | os.PathLike, name: str, *, to: str | None = None,
             progress: ProgressCallback | None = None) -> PushResult:
        """Register a model under ``name``: a ``.safetensors`` file, a model directory, an
        ``.onnx`` model, a PyTorch checkpoint, or the URL of a model in object storage
        (``s3://bucket/prefix``).

        Local files are opened here and passed as descriptors; the daemon never opens a local
        path. A URL is read by the daemon, with its own credentials. ``to`` also uploads the
        model's segments to ``<to>/segments/``, so the disk may later give them up.
        """
        if "://" in str(path):
            return self._request(protocol.Push(name=name, url=str(path), to=to), protocol.Pushed, progress)[0].result
        if Path(path).suffix.lower() == ".onnx":  # graph and weights go in separately
            from .onnx_format import split

            with tempfile.TemporaryDirectory(prefix="trims-onnx-") as directory:
                split(Path(path), Path(directory))
                return self._push_files(_directory_files(Path(directory), split_onnx=True), name, to, progress)
        return self._push_files(model_files(Path(path)), name, to, progress)

    def _push_files(self, files: list[tuple[str, Path]], name: str, to: str | None,
                    progress: ProgressCallback | None) -> PushResult:
        with _opened(files) as (labels, fds):
            message = protocol.Push(name=name, files=labels, to=to, fds=fds)
            return self._request(message, protocol.Pushed, progress)[0].result

    def adopt(self, path: str | os.PathLike) -> PushResult:
        """Register a ``.safetensors`` file or model directory by its content, as the
        transparent mode does: it becomes ``auto/<digest>``. A file registered before and
        unchanged since is not read again; the daemon only looks at its identity."""
        with _opened(model_files(Path(path))) as (labels, fds):
            return self._request(protocol.Adopt(files=labels, fds=fds), protocol.Pushed)[0].result

    def files(self, name: str) -> dict[str, bytes]:
        """A model's side files (config.json, tokenizer files, an ONNX graph) by name."""
        reply = self._request(protocol.GetFiles(name=name), protocol.Files)[0]
        try:
            return {label: _read_whole(fd) for label, fd in zip(reply.names, reply.fds)}
        finally:
            _close_fds(reply.fds)

    def pull(self, name: str, tier: str = "host", *, progress: ProgressCallback | None = None) -> int:
        """Bring a model into ``tier`` (``host``, ``disk`` or ``gpu:N``) without opening it; bytes moved."""
        return self._request(protocol.Pull(name=name, tier=tier), protocol.Pulled, progress)[0].moved_bytes

    def pin(self, name: str, tier: str = "host", *, progress: ProgressCallback | None = None) -> int:
        """Keep a model in ``tier`` under pressure and across restarts; brings it there now."""
        return self._request(protocol.Pin(name=name, tier=tier), protocol.Pulled, progress)[0].moved_bytes

    def unpin(self, name: str) -> None:
        self._request(protocol.Unpin(name=name), protocol.Done)

    def list(self) -> list[ModelSummary]:
        return list(self._request(protocol.ListModels(), protocol.ModelList)[0].models)

    def info(self, name: str) -> ModelSummary:
        return self._request(protocol.Info(name=name), protocol.ModelDetails)[0].model

    def evict(self, name: str, tier: str | None = None) -> int:
        """Drop a model from the daemon's memory, ``tier`` (``host`` or ``gpu:N``) or else host
        and every GPU; it stays on disk. Bytes freed."""
        return self._request(protocol.Evict(name=name, tier=tier), protocol.Evicted)[0].freed_bytes

    def remove(self, name: str) -> int:
        """Delete a name; the bytes go once no name and no lease needs them. Bytes deleted."""
        return self._request(protocol.Remove(name=name), protocol.Removed)[0].deleted_bytes

    def stats(self) -> dict[str, Any]:
        return self._request(protocol.Stats(), protocol.StatsReply)[0].stats

    def close(self) -> None:
        """Close the connection; the daemon ends every lease it carried."""
        with self._lock:
            if self._connection is not None:
                self._drop_locked(self._connection)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------------

    def _request(self, message: protocol.Message, reply_type: type[_Reply],
                 progress: ProgressCallback | None = None, reply_timeout: float | None = None) -> tuple[_Reply, int]:
        """Send one request and wait for its reply, reconnecting once if the daemon restarted."""
        for attempt in (1, 2):
            with self._lock:
                before = self._generation
                connection, generation = self._connection_locked()
                fresh = generation != before  # made for this request: a failure is no stale connection
                # A request with a limit carries no releases: a stalled daemon's reply to one
                # would hold it past its limit (the flusher thread sends them).
                releases = self._take_releases_locked() if reply_timeout is None else []
            try:
                _end_leases(connection, releases)  # first, so that an open finds the room they free
                reply = connection.call(message, progress, reply_timeout)
            except ConnectionLost:
                closed_here = connection.closed  # by close(), in another thread: no reason to reconnect
                self._drop(connection)
                if fresh or attempt == 2 or closed_here:
                    raise
                continue  # a stale connection to a daemon that has restarted
            return _expect(reply, reply_type), generation
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection_locked(self) -> tuple[Multiplexer, int]:
        if self._pid != os.getpid():  # forked outside os.fork(): the parent's connection is not ours
            self._forget_connection_in_child()
        if self._connection is None or self._connection.broken:
            if self._connection is not None:
                self._drop_locked(self._connection)
            check_socket_directory(self.socket_path)
            channel = transport.connect(self.socket_path, timeout=self._timeout)
            self._generation += 1
            self._connection = Multiplexer(channel, functools.partial(self._orphaned, self._generation))
        return self._connection, self._generation

    def _drop(self, connection: Multiplexer) -> None:
        with self._lock:
            self._drop_locked(connection)

    def _drop_locked(self, connection: Multiplexer) -> None:
        connection.close()
        if connection is self._connection:
            self._connection = None
            self._pending_releases.clear()  # those leases ended with the connection

    def _forget_connection_in_child(self) -> None:
        if self._connection is not None:
            self._connection.forget_in_child()
            self._connection = None
        self._pending_releases.clear()
        self._pid = os.getpid()

    def _orphaned(self, generation: int, reply: protocol.Message) -> None:
        """A reply no thread waits for any more (its progress callback raised, or it was
        interrupted): an open's lease must still end."""
        _close_fds(reply.fds)
        if isinstance(reply, protocol.Opened):
            self._release_later(reply.lease, generation)

    # --- leases ---------------------------------------------------------------------------------

    def _release(self, lease: int, generation: int) -> None:
        """End a lease now (an explicit close)."""
        with self._lock:
            connection = self._connection
            if connection is None or generation != self._generation or self._pid != os.getpid():
                return  # its connection is gone, and the lease with it
        try:
            _end_leases(connection, [lease])
        except ConnectionLost:
            self._drop(connection)

    def _release_later(self, lease: int, generation: int) -> None:
        """End a lease whose memory was garbage-collected, from the flusher thread (or with
        the next request, whichever comes first).

        Runs inside the garbage collector, maybe while this thread holds the lock, so it
        must not block or send: it only wakes the flusher.
        """
        self._pending_releases.append((lease, generation))
        flusher = self._release_flusher
        if flusher is not None:
            flusher.wake()

    def _take_releases_locked(self) -> list[int]:
        pending, self._pending_releases = self._pending_releases, []
        return [lease for lease, generation in pending if generation == self._generation]

    def _flush_releases(self) -> None:
        with self._lock:
            connection = self._connection
            if connection is None or connection.broken or self._pid != os.getpid():
                return
            releases = self._take_releases_locked()
        try:
            _end_leases(connection, releases)
        except ConnectionLost:
            self._drop(connection)
        except RequestError as exc:  # no caller to tell; the lease is the daemon's to forget
            log.warning("the daemon refused to end a lease: %s", exc)


class _ReleaseFlusher:
    """Sends the releases of garbage-collected models at once, so a process that drops a model
    and then sits idle does not keep it leased (and unevictable) until its next request. The
    garbage collector wakes it through a pipe: a write takes no Python lock it might hold.
    It lives as long as its client; the client's finalizer closes the pipe, which ends it (no
    lease can wake it then: each pending one keeps the client alive)."""

    def __init__(self, client: Client) -> None:
        self._read_end, self._write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(self._read_end, True)
        self._read_closed = False
        self._closer = weakref.finalize(client, os.close, self._write_end)
        self._closer.atexit = False  # at exit a late finalizer might still wake it
        threading.Thread(target=self._run, args=(weakref.ref(client),), name="trims-releases", daemon=True).start()

    def wake(self) -> None:
        try:
            os.write(self._write_end, b"!")
        except BlockingIOError:  # the pipe is full: woken already
            pass

    def abandon(self) -> None:
        """In a forked child, where the thread does not exist: close the inherited pipe."""
        if self._closer.detach() is not None:
            os.close(self._write_end)
            if not self._read_closed:
                os.close(self._read_end)

    def _run(self, client_ref: weakref.ref) -> None:
        while os.read(self._read_end, 4096):
            client = client_ref()
            if client is not None:
                client._flush_releases()
            del client
        self._read_closed = True
        os.close(self._read_end)


class _Lease:
    """Holds a daemon lease while anything refers to it (a view, its mappings)."""

    def __init__(self, client: Client, lease: int, generation: int) -> None:
        self._finalizer = weakref.finalize(self, client._release_later, lease, generation)
        self._finalizer.atexit = False  # the connection closes at exit and ends it anyway
        self._client = weakref.ref(client)

    def close(self) -> None:
        detached = self._finalizer.detach()
        client = self._client()
        if detached is not None and client is not None:
            _, _, (lease, generation), _ = detached
            client._release(lease, generation)


class ModelView(Mapping[str, "np.ndarray"]):
    """A leased, mapped model: tensor name -> read-only ``numpy.ndarray``, no copies.

    ``index`` has each tensor's safetensors dtype, shape and place; ``segments`` are the
    mapped buffers (adapters build their own tensors from them). A view opened on a CUDA
    ``device`` has :class:`~trims._device_mapping.DeviceSegment` segments, for adapters
    only: NumPy cannot read GPU memory.
    """

    def __init__(self, *, name: str, digest: str, nbytes: int, metadata: dict[str, str],
                 index: dict[str, TensorEntry], segments: tuple[Any, ...], lease: _Lease,
                 device: int | None = None) -> None:
        self.name = name
        self.device = device
        self.digest = digest
        self.nbytes = nbytes
        self.metadata = metadata
        self.index = index
        self.segments = segments
        self._lease = lease
        self._arrays: dict[str, np.ndarray] = {}
        self.closed = False

    def __getitem__(self, key: str) -> np.ndarray:
        if self.closed:
            raise ValueError(f"model view of {self.name} is closed")
        if self.device is not None:
            raise TypeError(f"{self.name} is open in GPU memory (cuda:{self.device}), which NumPy cannot read; "
                            "use trims.torch.load_state_dict(name, device=...) or open it without a device")
        array = self._arrays.get(key)
        if array is None:
            from ._numpy_views import as_array

            entry = self.index[key]
            array = self._arrays[key] = as_array(self.segments[entry.segment], entry)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    @functools.cached_property
    def repeats(self) -> frozenset[str]:
        """Names whose bytes lie where an earlier name's do: the daemon stores equal tensors
        once (all-zero buffers, optimizer steps). Adapters that hand out writable tensors copy
        these, so an in-place write to one never shows in another, as with a file's copy."""
        seen: set[tuple[int, int]] = set()
        repeats = set()
        for name, entry in self.index.items():
            place = (entry.segment, entry.offset)
            if not entry.nbytes:
                continue  # an empty tensor sits where the next one begins, holding none of it
            if place in seen:
                repeats.add(name)
            seen.add(place)
        return frozenset(repeats)

    def close(self) -> None:
        """End the lease: now, if nothing made from the view is left; else with the last
        array or tensor over its memory (host or device), which stays valid until then, so
        the daemon never counts memory in use as free."""
        if not self.closed:
            self.closed = True
            self._arrays.clear()
            lease, client = weakref.ref(self._lease), self._lease._client()
            self.segments, self._lease = (), None  # the lease now lives as long as the segments that hold it
            if lease() is None and client is not None:
                client._flush_releases()  # it went with them: its release was queued, send it now

    def __enter__(self) -> ModelView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.index)} tensors, {self.nbytes} bytes"
        return f"<ModelView {self.name} {self.digest[:19]} {state}>"


def _device_uuid(device: int) -> str:
    """What the daemon calls this process's CUDA ``device``."""
    from . import cuda_driver

    return cuda_driver.driver().device_uuid(device)


def _map_model(reply: protocol.Opened, lease: _Lease, device: int | None) -> ModelView:
    try:
        segments = tuple(_map_segment(fd, size, lease, device) for fd, size in zip(reply.fds, reply.segment_sizes))
        entries = reply.tensors.entries()
        index = {entry.name: entry for entry in entries}
        for entry in entries:
            if not (0 <= entry.segment < len(segments) and 0 <= entry.offset
                    and entry.offset + entry.nbytes <= reply.segment_sizes[entry.segment]):
                raise RemoteProtocolError(f"tensor {entry.name!r} lies outside its segment")
    except BaseException:
        lease.close()
        raise
    finally:
        _close_fds(reply.fds)
    return ModelView(name=reply.name, digest=reply.digest, nbytes=reply.nbytes, metadata=reply.metadata,
                     index=index, segments=segments, lease=lease, device=device)


def _map_segment(fd: int, size: int, lease: _Lease, device: int | None) -> Any:
    if device is not None:
        from ._device_mapping import DeviceSegment

        segment = DeviceSegment(device, fd, size)
    else:
        if os.fstat(fd).st_size < size:
            raise RemoteProtocolError(f"segment is {os.fstat(fd).st_size} bytes, the daemon said {size}")
        _check_sealed(fd)
        segment = map_private(fd, size)
    segment.lease = lease  # whatever keeps the memory alive keeps the lease too
    return segment


# What a daemon's segment must be: memory nobody can change any more (it was hashed before).
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def _check_sealed(fd: int) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd at all
        seals = 0
    if seals & _SEALS != _SEALS:
        raise IntegrityError("the daemon sent a segment that is not sealed against writes, so its bytes could change "
                             "under this process: whatever listens at the socket is not a trims daemon (or one too "
                             "old); check TRIMS_SOCKET")


@contextlib.contextmanager
def _opened(files: list[tuple[str, Path]]) -> Iterator[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Open a model's files for sending; closed again on the way out, whatever happens."""
    fds: list[int] = []
    try:
        for _, path in files:
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise InvalidModel(f"cannot open {path}: {exc.strerror}") from None
        yield tuple(label for label, _ in files), tuple(fds)
    finally:
        _close_fds(tuple(fds))


def _read_whole(fd: int) -> bytes:
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _end_leases(connection: Multiplexer, leases: list[int]) -> None:
    for lease in leases:
        _expect(connection.call(protocol.Release(lease=lease)), protocol.Done)


def _expect(reply: protocol.Message, reply_type: type[_Reply]) -> _Reply:
    if isinstance(reply, protocol.Error):
        if reply.code == "protocol_error":
            raise RemoteProtocolError(f"the daemon rejected a frame: {reply.message}")
        raise error_for_code(reply.code, reply.message)
    if not isinstance(reply, reply_type):
        _close_fds(reply.fds)
        raise RemoteProtocolError(f"expected a {reply_type.TYPE} reply, got {reply.TYPE}")
    return reply


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def model_files(path: Path) -> list[tuple[str, Path]]:
    """The files a push of ``path`` sends: its safetensors weights and small side files.

    ``path`` is a ``.safetensors`` file, or a directory holding one or several (a Hugging
    Face model directory, sharded with a ``model.safetensors.index.json`` or not, or holding
    one ``pytorch_model.bin``) along with its config and tokenizer files, or a PyTorch checkpoint (``torch.save``'s file, or
    ``torch.export.save``'s ``.pt2`` archive).
    """
    try:
        if path.is_file() and path.name.endswith((".safetensors", *PUSHABLE)):
            return [(path.name, path)]
        if not path.exists():
            raise InvalidModel(f"{path} does not exist: give the path of a model file or directory")
        if not path.is_dir():
            raise InvalidModel(f"{path} is not a .safetensors file, a directory holding them, an ONNX model "
                               f"(.onnx) or a PyTorch checkpoint ({', '.join(PUSHABLE)})")
        return _directory_files(path)
    except OSError as exc:
        raise InvalidModel(f"cannot read {exc.filename or path}: {exc.strerror}") from None


def _directory_files(path: Path, *, split_onnx: bool = False) -> list[tuple[str, Path]]:
    """``split_onnx``: the directory is an ONNX model split for the push, its graphs side files."""
    names = [p.name for p in path.iterdir() if p.is_file()]
    chosen = layout.files_of_directory(names, lambda index: (path / index).read_bytes(), str(path), split_onnx=split_onnx)
    if len(chosen) > protocol.MAX_FDS_PER_FRAME:  # each goes as a descriptor, all in one frame
        raise InvalidModel(f"{path} holds {len(chosen)} weight and side files, more than one push "
                           f"can send ({protocol.MAX_FDS_PER_FRAME}): move what the model does not need elsewhere")
    return [(name, path / name) for name in chosen]
