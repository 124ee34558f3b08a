"""A stand-in for the CUDA driver, backed by memfds, so CI (no GPU) tests the GPU tier's
own logic and the store's bookkeeping of it: uploads in chunks, granule accounting,
single-flight loads, leases, eviction. Device memory is a memfd, an export a dup of it, a
mapping an mmap with the asked protection. The binding under it (trims.cuda_driver's ctypes
calls) runs against a stand-in libcuda in tests/test_cuda_binding.py; what only a GPU can
show (the real driver's VMM export, read-only device mappings, kernels faulting) is tested by
tests/test_gpu.py on a machine with one.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import os

from trims.cuda_driver import PROT_READ, Allocation, Mapping, granules

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class FakeDriver:
    def __init__(self, granularity: int = 64 * 1024, devices: int = 1, read_only: bool = True,
                 uuids: list[str] | None = None) -> None:
        """``uuids`` are the devices this process sees, in its own order (one process's
        cuda:0 may be another's cuda:3); by default ``devices`` GPUs of made-up UUIDs."""
        self.granule = granularity
        self.uuids = uuids or [f"GPU-00000000-0000-0000-0000-{i:012x}" for i in range(devices)]
        self.devices = len(self.uuids)
        self.read_only = read_only
        self._handles: dict[int, int] = {}  # handle -> memfd
        self._ids = itertools.count(1)
        self.uploads = 0  # host-to-device copies made

    def device_count(self) -> int:
        return self.devices

    def device_uuid(self, device: int) -> str:
        return self.uuids[device]

    def supports_vmm(self, device: int) -> bool:
        return True

    def granularity(self, device: int) -> int:
        return self.granule

    def allocate(self, device: int, nbytes: int) -> Allocation:
        size = granules(nbytes, self.granule)
        memfd = os.memfd_create("fake-device-memory", os.MFD_CLOEXEC)
        os.ftruncate(memfd, size)
        handle = next(self._ids)
        self._handles[handle] = memfd
        return Allocation(device=device, size=size, handle=handle, fd=os.dup(memfd))

    def release(self, device: int, handle: int) -> None:
        os.close(self._handles.pop(handle))

    def import_fd(self, device: int, fd: int) -> int:
        handle = next(self._ids)
        self._handles[handle] = os.dup(fd)
        return handle

    def map(self, device: int, handle: int, size: int, protection: int) -> Mapping:
        from trims.cuda_driver import CudaError

        if protection == PROT_READ and not self.read_only:
            raise CudaError("the CUDA driver refused cuMemSetAccess: operation not supported (CUresult 801)", 801)
        prot = mmap.PROT_READ if protection == PROT_READ else mmap.PROT_READ | mmap.PROT_WRITE
        address = _libc.mmap(None, size, prot, mmap.MAP_SHARED, self._handles[handle], 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        return Mapping(device=device, pointer=address, size=size, handle=handle, protection=protection)

    def synchronize_device(self, device: int) -> None:
        pass

    def current(self, device: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def unmap(self, mapping: Mapping) -> None:
        _libc.munmap(mapping.pointer, mapping.size)

    def copy_to_device(self, pointer: int, source: int, nbytes: int, stream: int) -> None:
        ctypes.memmove(pointer, source, nbytes)
        self.uploads += 1

    def copy_to_host(self, destination: int, pointer: int, nbytes: int) -> None:
        ctypes.memmove(destination, pointer, nbytes)

    def pinned(self, device: int, nbytes: int) -> ctypes.Array:
        return (ctypes.c_ubyte * nbytes)()

    def free_pinned(self, buffer: ctypes.Array) -> None:
        pass

    def stream(self, device: int) -> int:
        return 1

    def event(self, device: int) -> int:
        return 1

    def record(self, event: int, stream: int) -> None:
        pass

    def wait(self, event: int) -> None:
        pass

    def synchronize(self, stream: int) -> None:
        pass

    def destroy_event(self, event: int) -> None:
        pass

    def destroy_stream(self, stream: int) -> None:
        pass

    def open_handles(self) -> int:
        return len(self._handles)
