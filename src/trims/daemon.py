"""The daemon object: it owns the store and the server, and nothing else holds state."""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading

from . import transport
from .config import Settings, format_size, private_directory
from .errors import ConfigError, DaemonUnavailable
from .server import Server
from .store import Store

log = logging.getLogger("trims.daemon")

_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the NUL


class Daemon:
    """``Daemon(settings).serve_forever()`` is ``trims serve``; :meth:`shutdown` stops it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        _raise_fd_limit()
        socket_path = settings.socket_path
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"socket path {socket_path} is longer than the {_MAX_SOCKET_PATH} bytes Unix allows")
        private_directory(settings.store_dir)
        self.store = Store(settings.store_dir, settings.host_memory)  # takes the store's lock
        try:
            private_directory(socket_path.parent, sticky_ok=True)
            _remove_stale_socket(socket_path)
            listener = transport.listen(socket_path)
        except BaseException:
            self.store.close()
            raise
        self.server = Server(self.store, listener, max_connections=settings.max_connections)
        self._listener = listener

    def serve_forever(self) -> None:
        """Serve until SIGTERM, SIGINT or :meth:`shutdown`; then release everything."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.shutdown())
        log.info(
            "trims daemon %d serving %s (store %s, host memory %s)",
            os.getpid(), self.settings.socket_path, self.settings.store_dir, format_size(self.settings.host_memory),
        )
        try:
            self.server.serve_forever()
        finally:
            self.close()

    def shutdown(self) -> None:
        self.server.shutdown()

    def close(self) -> None:
        try:
            os.unlink(self.settings.socket_path)
        except FileNotFoundError:
            pass
        self._listener.close()
        self.store.close()
        log.info("trims daemon stopped")


def _remove_stale_socket(path) -> None:
    """Refuse to start over a live daemon; remove the socket a dead one left behind."""
    if not os.path.exists(path):
        return
    try:
        transport.connect(path, timeout=1.0).close()
    except DaemonUnavailable:
        os.unlink(path)
        return
    raise ConfigError(f"a trims daemon is already serving {path}")


def _raise_fd_limit() -> None:
    """Each resident segment and connection costs the daemon a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
