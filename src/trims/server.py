"""Serving the store over the socket: a reader thread per connection, and threads for the
requests that may wait.

Concurrency model of the daemon: threads. The accept loop runs in the daemon's main thread;
each connection gets a thread that reads its requests. It answers those that never wait
(release, ping, list, ...) itself, and hands each that may wait (open, push, pull, pin,
adopt: a load from disk or cloud, a wait for memory under --busy-timeout) to a worker thread
of that connection, so a release from one of a client's threads is answered while its other
thread's open waits for the memory that release frees. Replies carry their request's id and
go out in the order they are ready. All shared state is the store's, behind its lock. When a
connection ends, for any reason, its workers finish and then its leases end with it.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import os
import queue
import resource
import selectors
import socket
import threading
import time
from typing import Callable

from . import __version__, protocol
from .cloud import remote_model_files
from .acl import ADMIN, CLIENT_URL_SCHEMES, WRITE, AccessPolicy, Tenant, not_a_tenant, plain_url
from .errors import (ConnectionLost, InvalidModel, InvalidName, LocalProtocolError, PeerStalled, PermissionDenied,
                     ProtocolError, RequestError, StorageError)
from .objects import location_problem
from .sources import FileSource
from .store import Store
from .transport import Channel, DescriptorBudget, PeerCredentials

log = logging.getLogger("trims.server")

# Replies whose descriptors were opened just to be sent (segment descriptors are the store's).
_OPENED_FOR_THE_REPLY = (protocol.Files,)
# Requests that may wait (for bytes to load, for memory to free): not answered by the reader.
_MAY_WAIT = (protocol.Open, protocol.Push, protocol.Adopt, protocol.Pull, protocol.Pin)
# One connection's requests waiting at once; each holds a thread, which a client must not take without bound.
MAX_WAITING_REQUESTS = 64

class _Context:
    """What a handler knows of its request: the connection, and the tenant the kernel vouched for."""

    _INTERVAL = 0.25  # seconds between progress frames

    def __init__(self, conn_id: int, tenant: Tenant, channel: Channel, ended: threading.Event,
                 request_id: int) -> None:
        self.conn_id = conn_id
        self.tenant = tenant
        self.channel = channel
        self.ended = ended  # set once the connection is over: nobody waits for the reply any more
        self._request_id = request_id

    def progress(self) -> protocol.ProgressCallback:
        """A callback, safe from any thread, that sends throttled progress frames (each stage's
        first and last always)."""
        lock, last = threading.Lock(), ["", 0.0]

        def report(stage: str, done: int, total: int) -> None:
            with lock:
                now = time.monotonic()
                if stage == last[0] and now - last[1] < self._INTERVAL and done < total:
                    return
                last[:] = [stage, now]
                try:
                    self.channel.send(protocol.Progress(id=self._request_id, stage=stage, done=done, total=total))
                except (ConnectionLost, OSError):
                    pass  # the reply will fail the same way; the request still completes

        return report


class Server:
    def __init__(self, store: Store, listener: socket.socket, *, max_connections: int,
                 describe: Callable[[], dict], access: AccessPolicy | None = None, frame_timeout: float = 10.0) -> None:
        self.store = store
        self._describe = describe
        self._access = access or AccessPolicy.single_user()
        self._frame_timeout = frame_timeout
        self._listener = listener
        self._max_connections = max_connections
        # With no [tenants], everyone is the one admin "owner": no one to connect past.
        self._admins_apart = not all(tenant.admin for tenant in self._access.tenants)
        self._connections: dict[int, Channel] = {}
        self._tenant_connections: collections.Counter[str] = collections.Counter()
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        # A quarter of the process's descriptors for those riding on frames not yet complete;
        # the rest are segments, store files and the connections themselves.
        self._descriptors = DescriptorBudget(max(4 * protocol.MAX_FDS_PER_FRAME,
                                                 resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        self._spare_fd = _spare_descriptor()  # given up to refuse a connection when none is left
        self._out_of_fds_logged = 0.0
        store.metrics.describe("trims_connections", "gauge", "Client connections open.")
        store.metrics.gauge("trims_connections", lambda: {(): self.connection_count()})
        self._handlers: dict[type, Callable[[protocol.Message, _Context], protocol.Message]] = {
            protocol.Ping: self._on_ping,
            protocol.Open: self._on_open,
            protocol.Release: self._on_release,
            protocol.Push: self._on_push,
            protocol.ListModels: self._on_list,
            protocol.Info: self._on_info,
            protocol.Evict: self._on_evict,
            protocol.Remove: self._on_remove,
            protocol.Stats: self._on_stats,
            protocol.Pull: self._on_pull,
            protocol.Pin: self._on_pin,
            protocol.Unpin: self._on_unpin,
            protocol.Adopt: self._on_adopt,
            protocol.GetFiles: self._on_get_files,
        }

    # --- lifecycle ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self._listener and not self._stopping:
                        self._accept()
        self._close_connections()

    def shutdown(self) -> None:
        """Ask serve_forever to return. Safe from signal handlers and other threads."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._refuse_without_descriptors()
            else:
                log.error("accept failed: %s", exc)
            return
        channel = Channel(sock, max_frame_bytes=protocol.MAX_REQUEST_BYTES, budget=self._descriptors)
        peer, tenant = self._identify(channel)
        with self._lock:
            refusal = self._refusal(tenant)
            if refusal is None:
                conn_id = next(self._ids)
                self._connections[conn_id] = channel
                if tenant is not None:
                    self._tenant_connections[tenant.name] += 1
        if refusal is not None:
            log.warning("refused a connection from uid %s: %s", "?" if peer is None else peer.uid, refusal)
            self._refuse(channel, refusal)
            return
        thread = threading.Thread(target=self._serve, args=(conn_id, channel, peer, tenant), name=f"trims-conn-{conn_id}",
                                  daemon=True)
        with self._lock:
            self._threads[conn_id] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # the process's thread limit (a container's pids cap): refuse this one
            self._forget(conn_id, tenant)
            log.error("refused a connection: cannot start a thread for it (%s) with %d connections open; raise the "
                      "container's pids limit or lower --max-connections", exc, self.connection_count())
            self._refuse(channel, "the daemon cannot start a thread for another connection (its process limit); "
                                  "retry later, or ask the node's operator to raise its pids limit")

    def _refuse_without_descriptors(self) -> None:
        """Out of descriptors, the listener stays readable and accept fails at once, for ever:
        give up the spare one to accept the waiting connection and refuse it, rather than
        spin. Logged once a minute at most."""
        now = time.monotonic()
        if now - self._out_of_fds_logged > 60:
            self._out_of_fds_logged = now
            log.error("out of file descriptors (%d connections open): refusing new connections until some close; "
                      "raise the daemon's RLIMIT_NOFILE (LimitNOFILE= in systemd)", self.connection_count())
        if self._spare_fd < 0:
            time.sleep(0.05)  # another thread took the spare's place: wait for descriptors to free
        else:
            os.close(self._spare_fd)
            self._spare_fd = -1
            try:
                sock, _ = self._listener.accept()
            except OSError:
                time.sleep(0.05)  # the whole system is out, not only this process
            else:
                self._refuse(Channel(sock), "the daemon has run out of file descriptors; retry later, or ask the "
                                            "node's operator to raise its descriptor limit")
        try:
            self._spare_fd = _spare_descriptor()
        except OSError:
            pass

    def _identify(self, channel: Channel) -> tuple[PeerCredentials | None, Tenant | None]:
        """Who connected, and as which tenant (None: not a tenant, told so once served)."""
        try:
            peer = channel.peer_credentials()
        except OSError:
            return None, None
        try:
            return peer, self._access.tenant_for(peer.uid, [peer.gid, *peer.groups])
        except PermissionDenied:
            return peer, None

    def _refusal(self, tenant: Tenant | None) -> str | None:
        """Why a new connection of this tenant is refused, or None. Called under the lock."""
        if tenant is not None and tenant.max_connections is not None:
            held = self._tenant_connections[tenant.name]
            if held >= tenant.max_connections:
                return (f"tenant {tenant.name} already has {held} connections open (its max_connections in the "
                        f"daemon's config); close some, or ask the node's operator to raise it")
        serving = len(self._connections)
        if serving < self._max_connections:
            return None
        # A tenant filling the cap must not lock the operator out: an admin may connect past it,
        # by as many again at most (only where some tenants are not admins).
        if self._admins_apart and tenant is not None and tenant.admin and serving < 2 * self._max_connections:
            return None
        return (f"the daemon already serves {serving} connections (--max-connections {self._max_connections}); "
                f"retry later, or raise --max-connections if this is the node's normal load")

    def _forget(self, conn_id: int, tenant: Tenant | None) -> None:
        with self._lock:
            self._connections.pop(conn_id, None)
            self._threads.pop(conn_id, None)
            if tenant is not None:
                self._tenant_connections[tenant.name] -= 1

    def _refuse(self, channel: Channel, message: str) -> None:
        try:
            channel.send(protocol.Error(code="too_many_connections", message=message))
        except (OSError, ConnectionLost):
            pass
        channel.close()

    def _close_connections(self) -> None:
        with self._lock:
            channels = list(self._connections.values())
            threads = list(self._threads.values())
        for channel in channels:
            channel.hang_up()
        for thread in threads:
            thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._spare_fd >= 0:
            os.close(self._spare_fd)

    # --- one connection ------------------------------------------------------------------

    def _serve(self, conn_id: int, channel: Channel, peer: PeerCredentials | None, tenant: Tenant | None) -> None:
        workers = _Workers(f"trims-conn-{conn_id}")
        ended = threading.Event()
        try:
            if peer is None:  # the peer hung up before it could be identified
                return
            channel.set_send_timeout(self._frame_timeout)
            if tenant is None:
                log.warning("refused pid %d uid %d: not a tenant", peer.pid, peer.uid)
                refused = not_a_tenant(peer.uid)
                channel.send(protocol.Error(code=refused.code, message=str(refused)))
                return
            log.debug("connection %d: pid %d uid %d, tenant %s", conn_id, peer.pid, peer.uid, tenant.name)
            while True:
                try:
                    request = channel.receive(self._frame_timeout)
                except ProtocolError as exc:
                    log.warning("connection %d sent an invalid frame: %s", conn_id, exc)
                    channel.send(protocol.Error(code="protocol_error", message=str(exc)))
                    return
                ctx = _Context(conn_id, tenant, channel, ended, request.id)
                if not isinstance(request, _MAY_WAIT):
                    self._answer(request, ctx)
                elif not workers.run(functools.partial(self._answer_from_worker, request, ctx)):
                    self._answer_overloaded(request, channel)
        except PeerStalled as exc:
            log.info("connection %d: %s; closing it", conn_id, exc)
        except (ConnectionLost, OSError):
            pass
        finally:
            try:
                channel.hang_up()  # a worker still sending learns the connection is over
                ended.set()
                if workers.busy:
                    self.store.wake_waiters()  # its requests waiting for memory give up
                workers.finish()  # before the leases end: a lease a worker makes must end with them
                released = self.store.release_owner(conn_id)
                if released:
                    log.debug("connection %d closed holding %d leases; released", conn_id, released)
            finally:
                self._forget(conn_id, tenant)
                channel.close()

    def _answer(self, request: protocol.Message, ctx: _Context) -> None:
        """Handle a request and send its reply (ConnectionLost or OSError if it cannot be sent)."""
        try:
            reply = self._handle(request, ctx)
        finally:
            for fd in request.fds:
                os.close(fd)
        try:
            ctx.channel.send(reply)
        except LocalProtocolError:  # e.g. a reply over the frame cap: a bug, not the peer's fault
            log.exception("cannot encode the reply to %s", request.TYPE)
            if isinstance(reply, protocol.Opened):  # nobody will ever release it
                self.store.release(reply.lease, ctx.conn_id)
            ctx.channel.send(protocol.Error(id=request.id, code="internal",
                                            message=f"the daemon could not encode its reply to {request.TYPE}; see its log"))
        finally:
            if isinstance(reply, _OPENED_FOR_THE_REPLY):  # the peer has its own copies now
                for fd in reply.fds:
                    os.close(fd)

    def _answer_from_worker(self, request: protocol.Message, ctx: _Context) -> None:
        try:
            self._answer(request, ctx)
        except (ConnectionLost, OSError):
            ctx.channel.hang_up()  # a peer that takes no replies is gone: the reader must stop too

    def _answer_overloaded(self, request: protocol.Message, channel: Channel) -> None:
        for fd in request.fds:
            os.close(fd)
        channel.send(protocol.Error(
            id=request.id, code="too_many_requests",
            message=f"this connection already has {MAX_WAITING_REQUESTS} requests waiting in the daemon "
                    "(or the daemon cannot start a thread for another); wait for some to finish, or give "
                    "the threads that open models concurrently clients of their own (trims.connect())"))

    def _handle(self, request: protocol.Message, ctx: _Context) -> protocol.Message:
        handler = self._handlers.get(type(request))
        if handler is None:
            return protocol.Error(id=request.id, code="unexpected_message", message=f"{request.TYPE} is not a request")
        try:
            return handler(request, ctx)
        except RequestError as exc:
            return protocol.Error(id=request.id, code=exc.code, message=str(exc))
        except Exception:
            log.exception("request %s failed", request.TYPE)
            return protocol.Error(
                id=request.id, code="internal", message=f"the daemon failed on {request.TYPE}; see its log"
            )

    # --- handlers ------------------------------------------------------------------------

    def _on_ping(self, request: protocol.Ping, ctx: _Context) -> protocol.Message:
        return protocol.Pong(id=request.id, daemon_version=__version__, protocol_version=protocol.PROTOCOL_VERSION, pid=os.getpid())

    def _on_open(self, request: protocol.Open, ctx: _Context) -> protocol.Message:
        device = None if request.device is None else self.store.gpu_device(request.device)
        opened = self.store.open(request.name, owner=ctx.conn_id, tenant=ctx.tenant, device=device,
                                 abandoned=ctx.ended)
        return protocol.Opened(
            id=request.id,
            lease=opened.lease,
            name=opened.name,
            digest=opened.manifest.digest,
            nbytes=opened.manifest.nbytes,
            segment_sizes=tuple(s.mapped_size for s in opened.segments),
            device=request.device,
            tensors=opened.tensors,
            metadata=opened.manifest.metadata,
            fds=tuple(s.fd for s in opened.segments),
        )

    def _on_release(self, request: protocol.Release, ctx: _Context) -> protocol.Message:
        self.store.release(request.lease, owner=ctx.conn_id)
        return protocol.Done(id=request.id)

    def _on_push(self, request: protocol.Push, ctx: _Context) -> protocol.Message:
        ctx.tenant.require(WRITE, "push models")
        for url in (request.url, request.to):
            if url is not None:
                _check_client_url(url, ctx.tenant)
        if request.url is not None and request.files:
            raise InvalidModel("push takes a URL or files, not both")
        if request.url is not None:
            files = remote_model_files(request.url, self.store.cloud.objects)
        else:
            files = [FileSource(label, fd) for label, fd in zip(request.files, request.fds)]
        result = self.store.push(request.name, files, to=request.to, progress=ctx.progress(), tenant=ctx.tenant)
        return protocol.Pushed(id=request.id, result=result)

    def _on_adopt(self, request: protocol.Adopt, ctx: _Context) -> protocol.Message:
        files = [FileSource(label, fd) for label, fd in zip(request.files, request.fds)]
        may_add = bool(ctx.tenant.push) or ctx.tenant.admin
        return protocol.Pushed(id=request.id, result=self.store.adopt(files, ctx.tenant, may_add=may_add))

    def _on_get_files(self, request: protocol.GetFiles, ctx: _Context) -> protocol.Message:
        # The daemon's own store files, opened read-only: never a path a client named.
        files = self.store.side_files(request.name, ctx.tenant)
        fds: list[int] = []
        try:
            for _, path in files:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise StorageError(f"cannot read {request.name}'s side files from the store: {exc.strerror}") from None
        return protocol.Files(id=request.id, names=tuple(label for label, _ in files), fds=tuple(fds))

    def _on_list(self, request: protocol.ListModels, ctx: _Context) -> protocol.Message:
        return protocol.ModelList(id=request.id, models=tuple(self.store.list_models(ctx.tenant)))

    def _on_info(self, request: protocol.Info, ctx: _Context) -> protocol.Message:
        return protocol.ModelDetails(id=request.id, model=self.store.info(request.name, ctx.tenant))

    def _on_evict(self, request: protocol.Evict, ctx: _Context) -> protocol.Message:
        ctx.tenant.require(ADMIN, "evict models")
        return protocol.Evicted(id=request.id, name=request.name, freed_bytes=self.store.evict(request.name, ctx.tenant, request.tier))

    def _on_remove(self, request: protocol.Remove, ctx: _Context) -> protocol.Message:
        ctx.tenant.require(WRITE, "remove models")
        return protocol.Removed(id=request.id, name=request.name, deleted_bytes=self.store.remove(request.name, ctx.tenant))

    def _on_pull(self, request: protocol.Pull, ctx: _Context) -> protocol.Message:
        ctx.tenant.require(ADMIN, "pull models")
        moved = self.store.pull(request.name, request.tier, progress=ctx.progress(), tenant=ctx.tenant,
                                abandoned=ctx.ended)
        return protocol.Pulled(id=request.id, name=request.name, tier=request.tier, moved_bytes=moved)

    def _on_pin(self, request: protocol.Pin, ctx: _Context) -> protocol.Message:
        ctx.tenant.require(ADMIN, "pin models")
        moved = self.store.pin(request.name, request.tier, progress=ctx.progress(), tenant=ctx.tenant,
                               abandoned=ctx.ended)
        return protocol.Pulled(id=request.id, name=request.name, tier=request.tier, moved_bytes=moved)

    def _on_unpin(self, request: protocol.Unpin, ctx: _Context) -> protocol.Message:
        ctx.tenant.require(ADMIN, "unpin models")
        self.store.unpin(request.name, ctx.tenant)
        return protocol.Done(id=request.id)

    def _on_stats(self, request: protocol.Stats, ctx: _Context) -> protocol.Message:
        if not ctx.tenant.admin:  # totals and other tenants' numbers are an admin's business
            return protocol.StatsReply(id=request.id, stats=self.store.usage(ctx.tenant))
        stats = self.store.stats()
        stats["connections"] = self.connection_count()
        stats["daemon"] = self._describe()
        stats["tenant"] = self.store.usage(ctx.tenant)
        return protocol.StatsReply(id=request.id, stats=stats)


class _Workers:
    """A connection's threads for requests that may wait: started when none is idle, kept
    while the connection lasts, at most MAX_WAITING_REQUESTS of them."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> bool:
        """Run ``job`` on a worker; False if every worker is busy and no more may start."""
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif not self._start_one():
                return False
        self._jobs.put(job)
        return True

    @property
    def busy(self) -> bool:
        """A request is on a worker (or on its way to one)."""
        with self._lock:
            return self._idle < len(self._threads)

    def _start_one(self) -> bool:
        if len(self._threads) >= MAX_WAITING_REQUESTS:
            return False
        thread = threading.Thread(target=self._work, name=f"{self._name}-worker-{len(self._threads) + 1}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the process's thread limit (a container's pids cap)
            log.error("cannot start a thread for a request (%d running on its connection)", len(self._threads))
            return False
        self._threads.append(thread)
        return True

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # noqa: BLE001 -- a bug must not take the worker, and the connection, with it
                log.exception("a request's worker failed")
            with self._lock:
                self._idle += 1

    def finish(self) -> None:
        """Let every worker finish its request, then end them."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


def _spare_descriptor() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _check_client_url(url: str, tenant: Tenant) -> None:
    """Refuse object storage a client may not have the daemon reach with its own credentials."""
    scheme = url.split("://", 1)[0]
    if scheme not in CLIENT_URL_SCHEMES:
        raise PermissionDenied(
            f"{scheme}:// is not for clients: the daemon reads and writes only object storage "
            f"({', '.join(s + '://' for s in CLIENT_URL_SCHEMES)}) on a client's behalf; push local files by path"
        )
    problem = location_problem(url)
    if problem:
        raise InvalidName(f"{problem}; name the bucket, then the key or prefix")
    if tenant.may_reach(url):
        return
    if not plain_url(url):
        raise PermissionDenied(
            f"{url!r} is not a plain scheme://bucket/key URL: a tenant's URLs may not have %-escapes, '?', '#', "
            "'\\', whitespace, ':' after the scheme, or '.' and '..' segments; name the objects as they are"
        )
    allowed = ", ".join(tenant.buckets) or "none"
    raise PermissionDenied(
        f"tenant {tenant.name} may not have the daemon read or write {url}: its config's buckets allow {allowed}; "
        f"ask the daemon's operator to add the bucket to [tenants.{tenant.name}] buckets, or push local files"
    )
