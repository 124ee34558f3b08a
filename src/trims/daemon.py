"""The daemon object: it owns the store and the server, and nothing else holds state."""

from __future__ import annotations

import grp
import logging
import os
import resource
import signal
import socket
import stat
import threading

from . import __version__, transport
from .config import UNBOUNDED, Settings, format_size, private_directory
from .errors import ConfigError, DaemonUnavailable
from .exporter import MetricsServer
from .server import Server
from .store import ADOPTED, Store

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
        try:
            self.store = Store(  # takes the store's lock
                settings.store_dir, host_capacity=settings.host_memory, disk_capacity=settings.disk,
                policy=settings.policy, cloud_url=settings.cloud, busy_timeout=settings.busy_timeout,
                access=settings.access, gpu_capacity=settings.gpu_memory,
            )
        except OSError as exc:  # a read-only filesystem, say: the daemon cannot keep a store there
            raise ConfigError(f"cannot use the store at {settings.store_dir}: {_what_failed(exc)}; give --store a "
                              "directory on a writable local filesystem") from None
        self.exporter: MetricsServer | None = None
        try:
            listener = _socket_from_systemd()
            self._owns_socket = listener is None
            if listener is None:
                group = _group_id(settings.socket_group)
                private_directory(socket_path.parent, sticky_ok=True)
                _open_directory_to_socket_users(socket_path.parent, settings.socket_mode, group)
                _remove_stale_socket(socket_path)
                try:
                    listener = transport.listen(socket_path, settings.socket_mode, group)
                except OSError as exc:
                    raise ConfigError(f"cannot listen on {socket_path}: {_what_failed(exc)}; give --socket a path "
                                      "on a writable filesystem") from None
            if settings.metrics_port is not None:
                try:
                    self.exporter = MetricsServer(self.store.metrics, self._locality, settings.metrics_address,
                                                  settings.metrics_port)
                except OSError as exc:  # in use, or an address that does not resolve
                    raise ConfigError(f"cannot serve metrics on {settings.metrics_address}:{settings.metrics_port}: "
                                      f"{exc.strerror or exc}; choose another --metrics-port or --metrics-address") from None
        except BaseException:
            self.store.close()
            raise
        self.server = Server(self.store, listener, max_connections=settings.max_connections, describe=self._describe,
                             access=settings.access, frame_timeout=settings.frame_timeout)
        self._listener = listener

    def _locality(self) -> list[dict]:
        # The metrics port asks no one who they are: tenants' own registrations (transparent
        # mode's auto/<tenant>/...) would tell anyone on the network who runs what.
        return [{"name": m.name, "digest": m.digest, "nbytes": m.nbytes, "tiers": list(m.tiers), "leases": m.leases,
                 "pinned": m.pinned} for m in self.store.list_models() if not m.name.startswith(f"{ADOPTED}/")]

    def _describe(self) -> dict:
        return {"pid": os.getpid(), "version": __version__, "open_fds": len(os.listdir("/proc/self/fd")),
                "metrics_port": self.exporter.port if self.exporter else None}

    def serve_forever(self) -> None:
        """Serve until SIGTERM, SIGINT or :meth:`shutdown`; then release everything."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.shutdown())
        s = self.settings
        disk = "unbounded" if s.disk == UNBOUNDED else format_size(s.disk)
        gpu = f"{format_size(s.gpu_memory)} per device" if s.gpu_memory else "off"
        log.info("trims daemon %d serving %s (store %s, host memory %s, GPU memory %s, disk %s, policy %s, cloud %s)",
                 os.getpid(), s.socket_path, s.store_dir, format_size(s.host_memory), gpu, disk, s.policy,
                 s.cloud or "none")
        self._say_how_host_memory_is_paged()
        threading.Thread(target=self.store.warm_pins, name="trims-warm-pins", daemon=True).start()
        try:
            self.server.serve_forever()
        finally:
            self.close()

    def _say_how_host_memory_is_paged(self) -> None:
        host = self.store.host
        if host.huge_pages:
            log.info("host memory in 2 MiB pages (the kernel's shmem_enabled is %s)", host.shmem_enabled)
        elif host.shmem_enabled == "never":
            log.info("host memory in 4 KiB pages (the kernel's shmem_enabled is never): clients fault mapped "
                     "weights up to 10 times slower than in 2 MiB pages; 'advise' gives those to trims alone "
                     "(docs/deployment.md, 'Huge pages')")
        elif host.shmem_enabled not in ("deny", "unsupported"):
            log.warning("host memory in 4 KiB pages: the kernel's shmem_enabled is %s, yet a test segment got none "
                        "of 2 MiB (hugepages-2048kB/shmem_enabled may forbid them, or the kernel predates "
                        "MADV_POPULATE_WRITE, Linux 5.14)", host.shmem_enabled)

    def shutdown(self) -> None:
        self.server.shutdown()

    def close(self) -> None:
        if self._owns_socket:  # a socket systemd passed in is systemd's to remove
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass
        self._listener.close()
        if self.exporter is not None:
            self.exporter.close()
        self.store.close()
        log.info("trims daemon stopped")


def _socket_from_systemd() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_PID/LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "0") or "0"
    if not (count.isascii() and count.isdigit()):
        raise ConfigError(f"LISTEN_FDS={count!r} is not a number of descriptors; check the unit's trims.socket")
    if int(count) < 1:
        return None
    try:
        listener = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
    except OSError as exc:
        raise ConfigError(f"LISTEN_FDS says a socket was passed in, but descriptor 3 is not one ({exc.strerror}); "
                          "check the unit's trims.socket") from None
    # Only a listening Unix stream socket tells us who is calling (SO_PEERCRED); on TCP the
    # peer's uid would read as -1, which the access rules must never see.
    listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM or not listening:
        listener.detach()
        raise ConfigError("the socket systemd passed in is not a listening Unix stream socket; set "
                          "ListenStream=/run/trims/trims.sock (a path, not a port) in trims.socket")
    listener.set_inheritable(False)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for our children
        os.environ.pop(name, None)
    log.info("serving the socket systemd passed in")
    return listener


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group {name!r} is not a group on this machine") from None


def _open_directory_to_socket_users(directory, mode: int, group: int | None) -> None:
    """Whoever may use the socket must be able to reach it: search (x) permission only, so
    its directory still cannot be listed or written by them."""
    info = os.stat(directory)
    if info.st_uid != os.getuid() or info.st_mode & stat.S_ISVTX:
        return  # a shared directory like /tmp: searchable already, and not ours to change
    wanted = info.st_mode & 0o7777  # keep setgid and the rest as they are
    if mode & 0o060:
        wanted |= 0o010
        if group is not None and info.st_gid != group:
            os.chown(directory, -1, group)
    if mode & 0o006:
        wanted |= 0o001
    if wanted != info.st_mode & 0o7777:
        os.chmod(directory, wanted)


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


def _what_failed(exc: OSError) -> str:
    return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def _raise_fd_limit() -> None:
    """Each resident segment and connection costs the daemon a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
