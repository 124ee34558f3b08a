"""Hostile traffic for a live daemon: the CI chaos tests and bench/soak.py share it."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

from trims import protocol

VALID = [
    protocol.Ping(id=1),
    protocol.Open(id=2, name="chaos/model"),
    protocol.Release(id=3, lease=1),
    protocol.ListModels(id=4),
    protocol.Info(id=5, name="chaos/model"),
    protocol.Stats(id=6),
    protocol.Evict(id=7, name="nope"),
]


def hostile_frame(rng: random.Random) -> tuple[bytes, int]:
    """One frame of some kind of wrong, and how many descriptors to send with it."""
    kind = rng.randrange(6)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(1, 200)), 0
    if kind == 1:  # a valid frame, bytes flipped
        data = bytearray(protocol.encode(rng.choice(VALID)))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), 0
    if kind == 2:  # well framed, random JSON of a known type
        body = {"type": rng.choice(sorted(protocol._MESSAGE_TYPES)), "id": rng.randrange(-5, 5)}
        for _ in range(rng.randrange(4)):
            body[rng.choice(["name", "lease", "files", "tier", "url", "x"])] = rng.choice(
                [None, True, -1, 2**70, 1.5, "", "../../etc/passwd", "a" * 300, [], {}, ["x"] * 3])
        payload = json.dumps(body).encode()
        return protocol.HEADER.pack(protocol.MAGIC, 1, 0, 0, len(payload)) + payload, 0
    if kind == 3:  # a header promising more than will ever come, or more than allowed
        length = rng.choice([10, 1 << 20, protocol.MAX_FRAME_BYTES, 2**32 - 1])
        return protocol.HEADER.pack(protocol.MAGIC, rng.choice([0, 1, 2, 255]), rng.randrange(3), 0, length), 0
    if kind == 4:  # a push of descriptors that are not model files
        names = tuple(f"f{i}.safetensors" for i in range(rng.randrange(1, 3)))
        message = protocol.Push(id=9, name="chaos/pushed", files=names, fds=tuple(range(len(names))))
        return protocol.encode(message), len(names)
    message = rng.choice(VALID)  # a valid request, cut short
    data = protocol.encode(message)
    return data[: rng.randrange(1, len(data))], 0


def send_hostile(socket_path: Path, rng: random.Random, frames: int) -> None:
    """Send ``frames`` hostile frames, a fresh connection whenever the daemon hangs up."""
    sent = 0
    while sent < frames:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_path))
        sock.settimeout(0.01)  # replies are read when they are there; many frames get none
        try:
            for _ in range(rng.randrange(1, 8)):
                data, nfds = hostile_frame(rng)
                fds = _junk_fds(nfds)
                try:
                    socket.send_fds(sock, [data], fds) if fds else sock.sendall(data)
                finally:
                    for fd in fds:
                        os.close(fd)
                sent += 1
                if rng.random() < 0.3:
                    try:
                        sock.recv(65536)  # sometimes read what came back
                    except TimeoutError:
                        pass
        except OSError:
            pass  # the daemon hung up on us, as it should
        finally:
            sock.close()


def _junk_fds(count: int) -> list[int]:
    """Descriptors that are not model files: a pipe's ends and /dev/null."""
    if not count:
        return []
    read_end, write_end = os.pipe()
    pool = [read_end, write_end, os.open("/dev/null", os.O_RDONLY)]
    for fd in pool[count:]:
        os.close(fd)
    return pool[:count]
