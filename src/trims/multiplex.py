"""Many threads' requests over one connection to the daemon, each reply matched to its
request by id, so one thread's release is answered while another's open waits.

It has no thread of its own: whichever waiting thread finds no one reading reads for all
and hands the others their frames (leader and followers), so a lone thread's request costs
no hand-off between threads.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable

from . import protocol
from .errors import ConnectionLost, LocalProtocolError, PeerStalled, ProtocolError, RemoteProtocolError, TrimsError
from .transport import Channel

ProgressCallback = Callable[[str, int, int], None]

_REFUSAL_WAIT = 0.5  # seconds to read why a daemon closed a connection a request could not be sent on


class Multiplexer:
    """One connection to the daemon, shared by threads. Once broken (the daemon went away, a
    frame was cut off) it stays broken: every call raises, and the owner opens a new
    connection. A call that times out gives up alone."""

    def __init__(self, channel: Channel, on_orphan: Callable[[protocol.Message], None]) -> None:
        """``on_orphan`` takes a reply whose request's thread stopped waiting (its progress
        callback raised, it was interrupted): its descriptors, and any lease it grants, are
        its to end. It runs in whichever thread read the reply and must not call back."""
        self._channel = channel
        self._on_orphan = on_orphan
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._frames: dict[int, collections.deque[protocol.Message]] = {}  # by the id of a call waiting
        self._abandoned: set[int] = set()  # ids whose reply nobody waits for any more
        self._reading = False
        self._users = 0  # threads sending or receiving: the socket closes once none is
        self._broken: TrimsError | None = None
        self.closed = False  # by close(): its calls' ConnectionLost is no reason to reconnect

    def call(self, message: protocol.Message, progress: ProgressCallback | None = None,
             timeout: float | None = None) -> protocol.Message:
        """Send ``message`` and return its reply, passing its progress frames to ``progress``.
        Raises ConnectionLost if the connection breaks, PeerStalled if no reply comes within
        ``timeout`` seconds (the reply, should it come, goes to the orphan handler)."""
        deadline = _Deadline(timeout)
        with self._lock:
            self._raise_if_broken()
            request_id = next(self._ids)
            frames = self._frames[request_id] = collections.deque()
            self._users += 1
        settled = False  # no frame for this id can come any more
        try:
            try:
                self._channel.send(_with_id(message, request_id))
            except LocalProtocolError:
                settled = True  # refused before a byte went out
                raise
            except ConnectionLost as exc:
                reply = self._refusal(frames, exc)
            except BaseException as exc:  # interrupted in the middle of a frame
                self._break(ConnectionLost(f"a request was cut off while being sent ({type(exc).__name__})"))
                raise
            else:
                reply = self._await(frames, progress, deadline)
            settled = True
            return reply
        finally:
            self._leave(request_id, frames, abandoned=not settled)

    def close(self) -> None:
        """End the connection (the daemon ends its leases); calls waiting raise ConnectionLost."""
        with self._lock:
            self.closed = True
            self._break_locked(ConnectionLost("the client closed its connection to the daemon"))
            close = self._users == 0
        if close:
            self._channel.close()

    def forget_in_child(self) -> None:
        """In a forked child: close the inherited socket without a word to the daemon or a
        lock a parent's thread may have held at fork (the parent still uses the connection)."""
        self._broken = ConnectionLost("a forked child cannot use its parent's connection")
        self._channel.close()

    @property
    def broken(self) -> bool:
        return self._broken is not None

    # --- waiting for a reply --------------------------------------------------------------

    def _await(self, frames: collections.deque[protocol.Message], progress: ProgressCallback | None,
               deadline: _Deadline) -> protocol.Message:
        while True:
            frame = self._next_frame(frames, deadline)
            if frame is None:  # nobody was reading: this thread reads for all
                self._read_one(deadline)
            elif isinstance(frame, protocol.Progress):
                if progress is not None:
                    progress(frame.stage, frame.done, frame.total)
            else:
                return frame

    def _next_frame(self, frames: collections.deque[protocol.Message], deadline: _Deadline) -> protocol.Message | None:
        """A frame for this call, or None once this thread is the one to read."""
        with self._lock:
            while not frames and self._broken is None and self._reading:
                if not self._arrived.wait(deadline.remaining()) and not frames:
                    raise deadline.stalled()
            if frames:
                return frames.popleft()
            self._raise_if_broken()
            self._reading = True
            return None

    def _read_one(self, deadline: _Deadline) -> None:
        timeout = deadline.remaining()
        try:
            message = self._channel.receive(timeout, timeout)
        except PeerStalled:  # nothing lost: what was read of a frame stays for the next reader
            with self._lock:
                self._reading = False
                self._arrived.notify_all()  # another waiting call reads from here on
            raise deadline.stalled() from None
        except (ConnectionLost, ProtocolError) as exc:
            with self._lock:
                self._reading = False
                self._break_locked(exc)
                self._raise_if_broken()  # the first cause: a close() hangs up before the read fails
        except BaseException as exc:  # interrupted, maybe in the middle of a frame: the stream cannot be trusted
            with self._lock:
                self._reading = False
                self._break_locked(ConnectionLost(f"reading a reply was interrupted ({type(exc).__name__})"))
            raise
        with self._lock:
            self._reading = False
            orphan = self._route_locked(message)
            self._arrived.notify_all()
        if orphan is not None:
            self._on_orphan(orphan)

    def _route_locked(self, message: protocol.Message) -> protocol.Message | None:
        """Give a frame to its call; the frame itself if it is an orphan's final reply."""
        if isinstance(message, protocol.Error) and message.id == 0:
            # About the connection itself (refused, or a bad frame): every call's answer.
            for frames in self._frames.values():
                frames.append(message)
            self._break_locked(ConnectionLost(f"the daemon closed the connection: {message.message}"))
            return None
        frames = self._frames.get(message.id)
        if frames is not None:
            frames.append(message)
            return None
        if message.id in self._abandoned:
            if isinstance(message, protocol.Progress):
                return None
            self._abandoned.discard(message.id)
            return message
        self._break_locked(RemoteProtocolError(f"the daemon sent a reply ({message.TYPE}) to request {message.id}, "
                                               "which no thread is waiting for"))
        return message

    def _refusal(self, frames: collections.deque[protocol.Message], lost: ConnectionLost) -> protocol.Message:
        """The daemon's word on why it closed a connection before a request could be sent
        (too many connections, not a tenant), if it said one; else ``lost``."""
        try:
            return self._await(frames, None, _Deadline(_REFUSAL_WAIT))
        except (ConnectionLost, PeerStalled):
            self._break(lost)
            raise lost from None

    # --- the connection's end -------------------------------------------------------------

    def _leave(self, request_id: int, frames: collections.deque[protocol.Message], *, abandoned: bool) -> None:
        orphans: list[protocol.Message] = []
        with self._lock:
            del self._frames[request_id]
            if abandoned:
                orphans = [frame for frame in frames if not isinstance(frame, protocol.Progress)]
                if not orphans and self._broken is None:
                    self._abandoned.add(request_id)
            self._users -= 1
            close = self._users == 0 and self._broken is not None
        for orphan in orphans:
            self._on_orphan(orphan)
        if close:
            self._channel.close()

    def _break(self, error: TrimsError) -> None:
        with self._lock:
            self._break_locked(error)

    def _break_locked(self, error: TrimsError) -> None:
        if self._broken is None:
            self._broken = error
            self._channel.hang_up()  # wakes the reader; the socket closes when its last user leaves
        self._arrived.notify_all()

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise type(self._broken)(str(self._broken))


def _with_id(message: protocol.Message, request_id: int) -> protocol.Message:
    return dataclasses.replace(message, id=request_id)


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        """Seconds left (a little at least, so that a wait never means for ever), or None: no limit."""
        return None if self._at is None else max(self._at - time.monotonic(), 0.001)

    def stalled(self) -> PeerStalled:
        return PeerStalled(f"peer stalled: no answer within {self.seconds:g} s")
