"""Private (copy-on-write) mappings of segment descriptors that keep no descriptor open.

Python's ``mmap.mmap`` duplicates the descriptor it maps and holds the copy for the
mapping's life (``trackfd=False`` arrived only in 3.13), so a mapped model would keep one
descriptor per segment. This maps through libc instead: the caller closes its descriptor
right after, and the mapping is a ctypes byte array that unmaps itself once nothing (no
array, no tensor made from it) refers to it any more.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_private(fd: int, size: int) -> ctypes.Array:
    """Map ``size`` bytes of ``fd`` copy-on-write: readable, writable, writes stay private.

    Never ``MAP_POPULATE``: on a private mapping it pre-faults for write and copies every
    page, losing the sharing.
    """
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a {size}-byte segment failed: {os.strerror(err)}")
    buffer = (ctypes.c_ubyte * size).from_address(address)
    unmap = weakref.finalize(buffer, _libc.munmap, address, size)
    # Not at exit: atexit handlers and daemon threads may still read arrays over the mapping,
    # and the kernel unmaps it when the process ends anyway.
    unmap.atexit = False
    return buffer
