"""The one module that touches sockets: framed messages and descriptors over a Unix socket."""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import protocol
from .errors import ConnectionLost, DaemonUnavailable, PeerStalled

_RECV_BYTES = 256 * 1024
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 has no name for it


@dataclass(frozen=True)
class PeerCredentials:
    """Who is on the other end, as the kernel saw it at connect time (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (SO_PEERGROUPS)


class DescriptorBudget:
    """How many received descriptors all channels together may hold in frames not yet
    complete. Each frame may carry 250, and a peer may begin one and never finish it: without
    a bound across connections, a few dozen of them would take every descriptor the process
    may have. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def claim(self, count: int) -> bool:
        with self._lock:
            if self._held + count > self.limit:
                return False
            self._held += count
            return True

    def give_back(self, count: int) -> None:
        with self._lock:
            self._held -= count


class Channel:
    """A connected socket speaking trims frames. Any number of threads may send (a frame goes
    whole); one at a time may receive.

    The socket stays blocking: receive timeouts wait in poll(), since a socket timeout would
    also switch a concurrent sender's socket to non-blocking under it."""

    def __init__(self, sock: socket.socket, *, max_frame_bytes: int = protocol.MAX_FRAME_BYTES,
                 budget: DescriptorBudget | None = None) -> None:
        self.sock = sock
        self._decoder = protocol.Decoder(max_frame_bytes=max_frame_bytes)
        self._budget = budget
        self._claimed = 0  # of the budget: the descriptors the decoder holds
        self._send_lock = threading.Lock()
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)

    def send(self, message: protocol.Message) -> None:
        data = protocol.encode(message)
        with self._send_lock:
            self._send_frame(data, message.fds)

    def _send_frame(self, data: bytes, fds: tuple[int, ...]) -> None:
        try:
            # Descriptors ride on the first chunk; the rest of a large frame follows.
            sent = socket.send_fds(self.sock, [data], list(fds)) if fds else 0
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost(f"connection closed while sending: {exc}") from None

    def receive(self, frame_timeout: float | None = None, first_byte_timeout: float | None = None) -> protocol.Message:
        """The next message; raises :class:`ConnectionLost` on EOF, :class:`PeerStalled` when
        a limit below runs out (what was read of a frame stays, for the next call).

        With ``frame_timeout``, a frame begun must be complete within that many seconds (a
        peer trickling a byte at a time cannot hold a frame's buffer for ever). Waiting for a
        first byte has no limit unless ``first_byte_timeout`` sets one (idle clients may hold
        leases; a health check may not wait for ever).
        """
        deadline = None
        while True:
            message = self._decoder.next_message()
            if message is not None:
                self._settle_claim()  # its descriptors are the message's now
                return message
            if self._decoder.buffered and frame_timeout:
                deadline = deadline or time.monotonic() + frame_timeout
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise PeerStalled(f"peer stalled: no complete frame within {frame_timeout:g} s")
            else:
                timeout = first_byte_timeout or None
            if timeout is not None and not self._readable.poll(math.ceil(timeout * 1000)):
                limit = frame_timeout if self._decoder.buffered else timeout
                what = "no complete frame" if self._decoder.buffered else "no answer"
                raise PeerStalled(f"peer stalled: {what} within {limit:g} s")
            self._receive_some()

    def _receive_some(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(
                self.sock, _RECV_BYTES, protocol.MAX_FDS_PER_FRAME, socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionLost(f"connection reset: {exc}") from None
        self._decoder.feed(data, fds)
        self._settle_claim()
        if flags & socket.MSG_CTRUNC:
            raise protocol.RemoteProtocolError("peer sent more descriptors than a frame may carry")
        if not data:
            partial = " in the middle of a frame" if self._decoder.buffered else ""
            raise ConnectionLost(f"connection closed by peer{partial}")

    def _settle_claim(self) -> None:
        """Claim from the budget what the decoder holds now, or give back what it let go."""
        if self._budget is None:
            return
        held = self._decoder.pending_fds
        if held > self._claimed and not self._budget.claim(held - self._claimed):
            raise protocol.RemoteProtocolError(
                f"the daemon holds as many descriptors in unfinished frames as it may ({self._budget.limit}); "
                "send each frame whole, or retry later")
        if held < self._claimed:
            self._budget.give_back(self._claimed - held)
        self._claimed = held

    def hang_up(self) -> None:
        """End the connection both ways, waking a thread blocked receiving on it (it sees EOF);
        the socket stays open until close()."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more
            pass

    def close(self) -> None:
        """Close the socket and any descriptors received but never handed out."""
        for fd in self._decoder.take_fds():
            _close_quietly(fd)
        if self._budget is not None:
            self._budget.give_back(self._claimed)
            self._claimed = 0
        self.sock.close()

    def peer_credentials(self) -> PeerCredentials:
        """Who connected, as the kernel recorded it: never what the peer claims."""
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=self._peer_groups())

    def _peer_groups(self) -> tuple[int, ...]:
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)  # Python caps buflen at 1024: 256 groups
        except OSError:  # kernels before 4.13, or more than 256 groups
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw)

    def set_send_timeout(self, seconds: float) -> None:
        """Fail a send that a peer not reading its replies blocks for longer than this."""
        whole = int(seconds)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def connect(path: Path, timeout: float | None = None) -> Channel:
    """Connect to a daemon's socket; :class:`DaemonUnavailable` if none answers. A full
    listen backlog (a burst of connections) is waited out, up to ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            return _connect_once(path, timeout)
        except BlockingIOError:  # EAGAIN: the backlog is full, as a timeout's non-blocking connect sees it
            if deadline is not None and time.monotonic() + pause > deadline:
                raise DaemonUnavailable(f"the trims daemon at {path} accepted no connection within {timeout:g} s "
                                        "(its listen backlog stayed full)") from None
            time.sleep(pause)
            pause = min(2 * pause, 0.1)


def _connect_once(path: Path, timeout: float | None) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except BlockingIOError:
        sock.close()
        raise
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonUnavailable(
            f"no trims daemon at {path} ({exc.strerror}); start one with `trims serve`, "
            "or point TRIMS_SOCKET at a running daemon's socket"
        ) from None
    except OSError as exc:
        sock.close()
        raise DaemonUnavailable(f"cannot connect to the trims daemon at {path}: {exc}") from None
    sock.settimeout(None)
    return Channel(sock)


def listen(path: Path, mode: int = 0o600, group: int | None = None, backlog: int = 4096) -> socket.socket:
    """A listening socket at ``path``, created owner-only, then opened up to ``mode``/``group``.
    The backlog holds a burst of function processes starting at once (the kernel caps it at
    net.core.somaxconn)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
