"""The few CUDA driver calls the GPU tier needs, through ctypes: no build step, no CUDA
toolkit, nothing imported until a GPU is asked for.

Device memory is made with the virtual memory management (VMM) API, so that it can leave
the process as a POSIX file descriptor and be mapped by another process, in another
container, without a shared PID or IPC namespace:

    daemon:  cuMemCreate(POSIX_FILE_DESCRIPTOR) -> cuMemExportToShareableHandle -> fd
    client:  fd -> cuMemImportFromShareableHandle -> cuMemAddressReserve -> cuMemMap
             -> cuMemSetAccess(PROT_READ)

A client's own driver call decides its mapping's protection: read-only mapping turns a
stray in-place write into a fault in the writer instead of corrupting every tenant, but it
is a guard against bugs, not a wall against a tenant that calls the driver itself (see the
README's threat model).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator

from .errors import GpuError

__all__ = ["Driver", "driver", "Allocation", "Mapping", "PROT_READ", "PROT_READWRITE", "granules"]

CUresult = ctypes.c_int
CUdeviceptr = ctypes.c_uint64
CUhandle = ctypes.c_uint64  # CUmemGenericAllocationHandle

_ALLOCATION_PINNED = 1
_LOCATION_DEVICE = 1
_HANDLE_POSIX_FD = 1
_GRANULARITY_RECOMMENDED = 1
_ATTR_VMM_SUPPORTED = 102
_ATTR_POSIX_FD_SUPPORTED = 103
PROT_READ = 1
PROT_READWRITE = 3


def granules(nbytes: int, granularity: int) -> int:
    """Bytes an allocation of ``nbytes`` takes: whole granules, at least one."""
    return max(granularity, -(-nbytes // granularity) * granularity)


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class CudaError(GpuError):
    """A driver call failed; ``result`` is its CUresult."""

    def __init__(self, message: str, result: int) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Allocation:
    """Device memory the daemon made: its handle and the descriptor that exports it."""

    device: int
    size: int  # rounded up to the allocation granularity
    handle: int
    fd: int


@dataclass
class Mapping:
    """Device memory mapped into this process at ``pointer``."""

    device: int
    pointer: int
    size: int
    handle: int
    protection: int


class Driver:
    """libcuda, loaded once. Methods that take a device make its primary context (the one
    PyTorch uses too) current for the call and then put back what was current before, so any
    thread may call them (the daemon's loaders, a client's finalizers) and none finds its
    current device changed; the rest (copies, events, stream waits) work on objects made under
    that context, inside the caller's ``with driver.current(device):``."""

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise GpuError(f"no CUDA driver on this machine ({exc}); the GPU tier needs an NVIDIA GPU") from None
        self._check(self._lib.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._granularity: dict[int, int] = {}
        self._lock = threading.RLock()  # a mapping's finalizer may run inside a locked section (GC)

    @contextlib.contextmanager
    def current(self, device: int) -> Iterator[None]:
        """``device``'s primary context (the one PyTorch uses too) current in this thread for
        the block, and whatever was current before it again afterwards: a thread's current
        context is PyTorch's current device there, which mapping a model on another device (or
        a finalizer unmapping one, on whatever thread the collector runs) must not change."""
        self._check(self._lib.cuCtxPushCurrent_v2(self._primary(device)), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    # --- devices ------------------------------------------------------------------------

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._check(self._lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return count.value

    def device_uuid(self, device: int) -> str:
        """``device``'s UUID as ``nvidia-smi -L`` writes it: the same in every process, whatever
        ordinal the process's ``CUDA_VISIBLE_DEVICES`` and container give the device."""
        count = self.device_count()
        if not 0 <= device < count:
            raise GpuError(f"this process has no CUDA device {device} (it sees {count}); ask for cuda:0..{count - 1}")
        handle, raw = ctypes.c_int(), _Uuid()
        self._check(self._lib.cuDeviceGet(ctypes.byref(handle), device), f"cuDeviceGet({device})")
        # _v2 (CUDA 11.4) gives a MIG instance its own UUID; the first version its GPU's.
        get_uuid = getattr(self._lib, "cuDeviceGetUuid_v2", None) or self._lib.cuDeviceGetUuid
        self._check(get_uuid(ctypes.byref(raw), handle), "cuDeviceGetUuid")
        return f"GPU-{uuid.UUID(bytes=bytes(raw.bytes))}"

    def supports_vmm(self, device: int) -> bool:
        """Whether ``device`` can export memory as POSIX file descriptors."""
        return all(self._attribute(device, a) for a in (_ATTR_VMM_SUPPORTED, _ATTR_POSIX_FD_SUPPORTED))

    def granularity(self, device: int) -> int:
        with self._lock:
            if device not in self._granularity:
                value = ctypes.c_size_t()
                self._check(self._lib.cuMemGetAllocationGranularity(
                    ctypes.byref(value), ctypes.byref(_prop(device)), _GRANULARITY_RECOMMENDED),
                    "cuMemGetAllocationGranularity")
                self._granularity[device] = value.value
            return self._granularity[device]

    # --- the daemon's side: allocate, export, fill, free ---------------------------------

    def allocate(self, device: int, nbytes: int) -> Allocation:
        """Device memory of at least ``nbytes``, exportable as a file descriptor."""
        with self.current(device):
            size = granules(nbytes, self.granularity(device))
            handle = CUhandle()
            self._check(self._lib.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size),
                                              ctypes.byref(_prop(device)), ctypes.c_ulonglong(0)),
                        f"cuMemCreate({size} bytes)")
            fd = ctypes.c_int(-1)
            try:
                self._check(self._lib.cuMemExportToShareableHandle(ctypes.byref(fd), handle, _HANDLE_POSIX_FD,
                                                                   ctypes.c_ulonglong(0)),
                            "cuMemExportToShareableHandle")
            except CudaError:
                self._lib.cuMemRelease(handle)
                raise
            return Allocation(device=device, size=size, handle=handle.value, fd=fd.value)

    def release(self, device: int, handle: int) -> None:
        """Drop a handle; the memory is freed once no process maps it any more."""
        with self.current(device):
            self._check(self._lib.cuMemRelease(CUhandle(handle)), "cuMemRelease")

    def copy_to_device(self, pointer: int, source: int, nbytes: int, stream: int) -> None:
        self._check(self._lib.cuMemcpyHtoDAsync_v2(CUdeviceptr(pointer), ctypes.c_void_p(source),
                                                   ctypes.c_size_t(nbytes), ctypes.c_void_p(stream)),
                    "cuMemcpyHtoDAsync")

    def copy_to_host(self, destination: int, pointer: int, nbytes: int) -> None:
        self._check(self._lib.cuMemcpyDtoH_v2(ctypes.c_void_p(destination), CUdeviceptr(pointer),
                                              ctypes.c_size_t(nbytes)), "cuMemcpyDtoH")

    def pinned(self, device: int, nbytes: int) -> ctypes.Array:
        """Page-locked host memory (a staging buffer the copy engines read directly)."""
        with self.current(device):
            pointer = ctypes.c_void_p()
            self._check(self._lib.cuMemHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes), 0),
                        "cuMemHostAlloc")
            return (ctypes.c_ubyte * nbytes).from_address(pointer.value)

    def free_pinned(self, buffer: ctypes.Array) -> None:
        self._lib.cuMemFreeHost(ctypes.c_void_p(ctypes.addressof(buffer)))

    def stream(self, device: int) -> int:
        with self.current(device):
            stream = ctypes.c_void_p()
            self._check(self._lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking
            return stream.value or 0

    def destroy_stream(self, stream: int) -> None:
        self._lib.cuStreamDestroy_v2(ctypes.c_void_p(stream))

    def event(self, device: int) -> int:
        with self.current(device):
            event = ctypes.c_void_p()
            self._check(self._lib.cuEventCreate(ctypes.byref(event), 2), "cuEventCreate")  # no timing
            return event.value or 0

    def record(self, event: int, stream: int) -> None:
        self._check(self._lib.cuEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cuEventRecord")

    def wait(self, event: int) -> None:
        self._check(self._lib.cuEventSynchronize(ctypes.c_void_p(event)), "cuEventSynchronize")

    def destroy_event(self, event: int) -> None:
        self._lib.cuEventDestroy_v2(ctypes.c_void_p(event))

    def synchronize(self, stream: int) -> None:
        self._check(self._lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")

    # --- both sides: map an allocation into this process ---------------------------------

    def import_fd(self, device: int, fd: int) -> int:
        """The allocation behind an exported descriptor (the descriptor stays open)."""
        with self.current(device):
            handle = CUhandle()
            self._check(self._lib.cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd),
                                                                 _HANDLE_POSIX_FD), "cuMemImportFromShareableHandle")
            return handle.value

    def map(self, device: int, handle: int, size: int, protection: int) -> Mapping:
        """Map ``handle`` at a fresh address with ``protection`` for ``device``."""
        with self.current(device):
            pointer = CUdeviceptr()
            self._check(self._lib.cuMemAddressReserve(ctypes.byref(pointer), ctypes.c_size_t(size),
                                                      ctypes.c_size_t(0), CUdeviceptr(0), ctypes.c_ulonglong(0)),
                        "cuMemAddressReserve")
            try:
                self._check(self._lib.cuMemMap(pointer, ctypes.c_size_t(size), ctypes.c_size_t(0), CUhandle(handle),
                                               ctypes.c_ulonglong(0)), "cuMemMap")
                try:
                    access = _AccessDesc(_Location(_LOCATION_DEVICE, device), protection)
                    self._check(self._lib.cuMemSetAccess(pointer, ctypes.c_size_t(size), ctypes.byref(access),
                                                         ctypes.c_size_t(1)), "cuMemSetAccess")
                except CudaError:
                    self._lib.cuMemUnmap(pointer, ctypes.c_size_t(size))
                    raise
            except CudaError:
                self._lib.cuMemAddressFree(pointer, ctypes.c_size_t(size))
                raise
            return Mapping(device=device, pointer=pointer.value, size=size, handle=handle, protection=protection)

    def synchronize_device(self, device: int) -> None:
        """Wait for all work queued on ``device`` by this process (kernels may still read a
        mapping that nothing refers to any more)."""
        with self.current(device):
            self._check(self._lib.cuCtxSynchronize(), "cuCtxSynchronize")

    def unmap(self, mapping: Mapping) -> None:
        with self.current(mapping.device):
            self._lib.cuMemUnmap(CUdeviceptr(mapping.pointer), ctypes.c_size_t(mapping.size))
            self._lib.cuMemAddressFree(CUdeviceptr(mapping.pointer), ctypes.c_size_t(mapping.size))

    # --- plumbing -----------------------------------------------------------------------

    def _primary(self, device: int) -> ctypes.c_void_p:
        with self._lock:
            context = self._contexts.get(device)
            if context is None:
                handle = ctypes.c_int()
                self._check(self._lib.cuDeviceGet(ctypes.byref(handle), device), f"cuDeviceGet({device})")
                context = ctypes.c_void_p()
                self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle),
                            "cuDevicePrimaryCtxRetain")
                self._contexts[device] = context
            return context

    def _attribute(self, device: int, attribute: int) -> int:
        value, handle = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(handle), device), f"cuDeviceGet({device})")
        self._check(self._lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, handle), "cuDeviceGetAttribute")
        return value.value

    def _check(self, result: int, call: str) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(result, ctypes.byref(text))
            reason = text.value.decode() if text.value else "unknown error"
            raise CudaError(f"the CUDA driver refused {call}: {reason} (CUresult {result})", result)


def _prop(device: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _ALLOCATION_PINNED
    prop.requestedHandleTypes = _HANDLE_POSIX_FD
    prop.location = _Location(_LOCATION_DEVICE, device)
    return prop


_driver: Driver | None = None
_driver_lock = threading.Lock()


def driver() -> Driver:
    """The process's one driver binding, loaded on first use."""
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = Driver()
        return _driver
