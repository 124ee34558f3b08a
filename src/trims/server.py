"""Serving the store over the socket: one thread per connection, requests in order.

Concurrency model of the daemon: the accept loop runs in the daemon's main thread; each
connection gets a thread that reads a request, asks the store, writes the reply. All
shared state is the store's, behind its lock. When a connection ends, for any reason, its
leases end with it.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import socket
import threading
from typing import Callable

from . import __version__, protocol
from .errors import ConnectionLost, ProtocolError, RequestError
from .ingest import SourceFile
from .store import Store
from .transport import Channel

log = logging.getLogger("trims.server")


class Server:
    def __init__(self, store: Store, listener: socket.socket, *, max_connections: int) -> None:
        self.store = store
        self._listener = listener
        self._max_connections = max_connections
        self._connections: dict[int, Channel] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._handlers: dict[type, Callable[[protocol.Message, int], protocol.Message]] = {
            protocol.Ping: self._on_ping,
            protocol.Open: self._on_open,
            protocol.Release: self._on_release,
            protocol.Push: self._on_push,
            protocol.ListModels: self._on_list,
            protocol.Info: self._on_info,
            protocol.Evict: self._on_evict,
            protocol.Remove: self._on_remove,
            protocol.Stats: self._on_stats,
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
        except OSError as exc:  # e.g. EMFILE: refuse this one, keep serving the rest
            log.error("accept failed: %s", exc)
            return
        channel = Channel(sock)
        with self._lock:
            full = len(self._connections) >= self._max_connections
            if not full:
                conn_id = next(self._ids)
                self._connections[conn_id] = channel
        if full:
            self._refuse(channel)
            return
        thread = threading.Thread(target=self._serve, args=(conn_id, channel), name=f"trims-conn-{conn_id}", daemon=True)
        with self._lock:
            self._threads[conn_id] = thread
        thread.start()

    def _refuse(self, channel: Channel) -> None:
        log.warning("refused a connection: %d connections are open (--max-connections)", self._max_connections)
        try:
            channel.send(protocol.Error(code="too_many_connections", message=(
                f"the daemon already serves {self._max_connections} connections; retry later "
                "or raise --max-connections")))
        except (OSError, ConnectionLost):
            pass
        channel.close()

    def _close_connections(self) -> None:
        with self._lock:
            channels = list(self._connections.values())
            threads = list(self._threads.values())
        for channel in channels:
            try:
                channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- one connection ------------------------------------------------------------------

    def _serve(self, conn_id: int, channel: Channel) -> None:
        try:
            peer = channel.peer_credentials()
            log.debug("connection %d from pid %d uid %d", conn_id, peer.pid, peer.uid)
            while True:
                try:
                    request = channel.receive()
                except ProtocolError as exc:
                    log.warning("connection %d sent an invalid frame: %s", conn_id, exc)
                    channel.send(protocol.Error(code="protocol_error", message=str(exc)))
                    return
                try:
                    reply = self._handle(request, conn_id)
                finally:
                    for fd in request.fds:
                        os.close(fd)
                channel.send(reply)
        except (ConnectionLost, OSError):
            pass
        finally:
            released = self.store.release_owner(conn_id)
            if released:
                log.debug("connection %d closed holding %d leases; released", conn_id, released)
            with self._lock:
                self._connections.pop(conn_id, None)
                self._threads.pop(conn_id, None)
            channel.close()

    def _handle(self, request: protocol.Message, conn_id: int) -> protocol.Message:
        handler = self._handlers.get(type(request))
        if handler is None:
            return protocol.Error(id=request.id, code="unexpected_message", message=f"{request.TYPE} is not a request")
        try:
            return handler(request, conn_id)
        except RequestError as exc:
            return protocol.Error(id=request.id, code=exc.code, message=str(exc))
        except Exception:
            log.exception("request %s failed", request.TYPE)
            return protocol.Error(
                id=request.id, code="internal", message=f"the daemon failed on {request.TYPE}; see its log"
            )

    # --- handlers ------------------------------------------------------------------------

    def _on_ping(self, request: protocol.Ping, conn_id: int) -> protocol.Message:
        return protocol.Pong(id=request.id, daemon_version=__version__, protocol_version=protocol.PROTOCOL_VERSION, pid=os.getpid())

    def _on_open(self, request: protocol.Open, conn_id: int) -> protocol.Message:
        opened = self.store.open(request.name, owner=conn_id)
        return protocol.Opened(
            id=request.id,
            lease=opened.lease,
            name=opened.name,
            digest=opened.manifest.digest,
            nbytes=opened.manifest.nbytes,
            segment_sizes=tuple(s.size for s in opened.segments),
            tensors=opened.tensors,
            metadata=opened.manifest.metadata,
            fds=tuple(s.fd for s in opened.segments),
        )

    def _on_release(self, request: protocol.Release, conn_id: int) -> protocol.Message:
        self.store.release(request.lease, owner=conn_id)
        return protocol.Done(id=request.id)

    def _on_push(self, request: protocol.Push, conn_id: int) -> protocol.Message:
        files = [SourceFile(label, fd) for label, fd in zip(request.files, request.fds)]
        return protocol.Pushed(id=request.id, result=self.store.push(request.name, files))

    def _on_list(self, request: protocol.ListModels, conn_id: int) -> protocol.Message:
        return protocol.ModelList(id=request.id, models=tuple(self.store.list_models()))

    def _on_info(self, request: protocol.Info, conn_id: int) -> protocol.Message:
        return protocol.ModelDetails(id=request.id, model=self.store.info(request.name))

    def _on_evict(self, request: protocol.Evict, conn_id: int) -> protocol.Message:
        return protocol.Evicted(id=request.id, name=request.name, freed_bytes=self.store.evict(request.name))

    def _on_remove(self, request: protocol.Remove, conn_id: int) -> protocol.Message:
        return protocol.Removed(id=request.id, name=request.name, deleted_bytes=self.store.remove(request.name))

    def _on_stats(self, request: protocol.Stats, conn_id: int) -> protocol.Message:
        stats = self.store.stats()
        stats["connections"] = self.connection_count()
        stats["daemon"] = {"pid": os.getpid(), "version": __version__, "open_fds": len(os.listdir("/proc/self/fd"))}
        return protocol.StatsReply(id=request.id, stats=stats)
