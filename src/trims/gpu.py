"""The GPU tier: one copy of each segment in device memory, shared as a file descriptor.

Each resident segment is one VMM allocation (see :mod:`trims.cuda_driver`) exported as a
POSIX descriptor; the daemon hands that descriptor to clients over the socket and each maps
it read-only. A segment is filled from host memory through two page-locked staging buffers
in turn: while the copy engine moves one chunk to the device, the next is read into the
other, so the copy runs at the slower of the two rates, not their sum.

One tier per device, created when a client first asks for it. The daemon maps a segment
only while filling it; afterwards it holds just the allocation's handle and descriptor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterable

from .cuda_driver import PROT_READ, PROT_READWRITE, Allocation, CudaError, Driver, granules
from .errors import GpuError
from .records import SegmentLayout
from .tier import Fill, Tier

log = logging.getLogger("trims.gpu")

STAGING_CHUNK = 32 * 1024 * 1024


@dataclass
class GpuSegment:
    id: str
    size: int  # the segment's bytes
    allocation: Allocation

    @property
    def fd(self) -> int:
        return self.allocation.fd

    @property
    def mapped_size(self) -> int:
        """The allocation's size (a granularity multiple): what a client maps."""
        return self.allocation.size


@dataclass(frozen=True)
class GpuCapabilities:
    device: int
    uuid: str  # the device's name in every process (ordinals differ between containers)
    sharing: str  # how device memory leaves the daemon: "vmm-posix-fd"
    read_only_mapping: bool  # whether the driver maps shared memory read-only for clients


class GpuTier(Tier):
    def __init__(self, driver: Driver, device: int, capacity: int) -> None:
        super().__init__(capacity)
        self.name = f"gpu:{device}"
        self.device = device
        self._driver = driver
        self._segments: dict[str, GpuSegment] = {}
        self._staging_lock = threading.Lock()  # one upload at a time: they share the copy engine
        self._staging: tuple[ctypes.Array, ctypes.Array] | None = None
        self.capabilities = _probe(driver, device)

    def has(self, segment_id: str) -> bool:
        return segment_id in self._segments

    def get(self, segment_id: str) -> GpuSegment | None:
        return self._segments.get(segment_id)

    def segment_ids(self) -> Iterable[str]:
        return list(self._segments)

    def bytes_used(self) -> int:
        return sum(s.mapped_size for s in list(self._segments.values()))

    def footprint(self, nbytes: int) -> int:
        return granules(nbytes, self._driver.granularity(self.device))

    def put(self, layout: SegmentLayout, fill: Fill) -> None:
        memfd = os.memfd_create("trims-gpu-staging", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, layout.size)
            fill(memfd)
            self.put_from(layout, memfd)
        finally:
            os.close(memfd)

    def put_from(self, layout: SegmentLayout, source: int) -> None:
        """Store a segment copied from ``source``, a descriptor of its bytes (a host segment)."""
        allocation = self._driver.allocate(self.device, layout.size)
        try:
            mapping = self._driver.map(self.device, allocation.handle, allocation.size, PROT_READWRITE)
            try:
                with self._driver.current(self.device):
                    self._upload(source, mapping.pointer, layout.size)
            finally:
                self._driver.unmap(mapping)
        except BaseException:
            _free(self._driver, allocation)
            raise
        self._segments[layout.id] = GpuSegment(id=layout.id, size=layout.size, allocation=allocation)

    def fetch(self, layout: SegmentLayout, destination: int) -> None:
        """Copy a resident segment out. Not re-verified: its bytes were verified on the way into
        host memory, and clients map them read-only."""
        segment = self._segments[layout.id]
        handle = self._driver.import_fd(self.device, segment.fd)  # a mapping of our own, read-only
        try:
            mapping = self._driver.map(self.device, handle, segment.mapped_size,
                                       PROT_READ if self.capabilities.read_only_mapping else PROT_READWRITE)
            try:
                buffer = (ctypes.c_ubyte * min(STAGING_CHUNK, max(layout.size, 1)))()
                with self._driver.current(self.device):
                    for offset in range(0, layout.size, len(buffer)):
                        n = min(len(buffer), layout.size - offset)
                        self._driver.copy_to_host(ctypes.addressof(buffer), mapping.pointer + offset, n)
                        _write_all(destination, memoryview(buffer)[:n], offset)
            finally:
                self._driver.unmap(mapping)
        finally:
            self._driver.release(self.device, handle)

    def evict(self, segment_id: str) -> int:
        segment = self._segments.pop(segment_id)
        _free(self._driver, segment.allocation)
        return segment.mapped_size

    def close(self) -> None:
        for segment_id in list(self._segments):
            self.evict(segment_id)
        with self._staging_lock:  # an upload still running (daemon shutdown) keeps its buffers
            if self._staging is not None:
                for buffer in self._staging:
                    self._driver.free_pinned(buffer)
                self._staging = None

    def _upload(self, source: int, pointer: int, size: int) -> None:
        """Read ``size`` bytes of ``source`` into device memory at ``pointer``, pipelined (in
        this device's context)."""
        with self._staging_lock:
            if self._staging is None:
                self._staging = (self._driver.pinned(self.device, STAGING_CHUNK),
                                 self._driver.pinned(self.device, STAGING_CHUNK))
            stream = self._driver.stream(self.device)
            events = (self._driver.event(self.device), self._driver.event(self.device))
            in_flight = [False, False]
            try:
                for index, offset in enumerate(range(0, size, STAGING_CHUNK)):
                    slot = index % 2
                    if in_flight[slot]:
                        self._driver.wait(events[slot])  # its last chunk has reached the device
                    n = min(STAGING_CHUNK, size - offset)
                    _read_all(source, memoryview(self._staging[slot])[:n], offset)
                    self._driver.copy_to_device(pointer + offset, ctypes.addressof(self._staging[slot]), n, stream)
                    self._driver.record(events[slot], stream)
                    in_flight[slot] = True
                self._driver.synchronize(stream)
            except BaseException:
                _quietly(self._driver.synchronize, stream)  # no copy may still read a buffer we reuse
                raise
            finally:
                for event in events:
                    self._driver.destroy_event(event)
                self._driver.destroy_stream(stream)


def open_tier(driver: Driver, device: int, capacity: int) -> GpuTier:
    """The tier for ``device``; GpuError says why there cannot be one."""
    count = driver.device_count()
    if not 0 <= device < count:
        raise GpuError(f"there is no CUDA device {device} on this node ({count} devices); ask for cuda:0..{count - 1}")
    if not driver.supports_vmm(device):
        raise GpuError(f"CUDA device {device} cannot export memory as file descriptors (no VMM support); "
                       "the GPU tier needs a driver and GPU with virtual memory management")
    return GpuTier(driver, device, capacity)


def _probe(driver: Driver, device: int) -> GpuCapabilities:
    """Whether this driver maps imported memory read-only: map a granule the way a client does."""
    allocation = driver.allocate(device, 1)
    try:
        handle = driver.import_fd(device, allocation.fd)
        try:
            driver.unmap(driver.map(device, handle, allocation.size, PROT_READ))
        finally:
            driver.release(device, handle)
        read_only = True
    except CudaError as exc:
        log.warning("the CUDA driver cannot map shared memory read-only (%s): clients will map it writable", exc)
        read_only = False
    finally:
        _free(driver, allocation)
    return GpuCapabilities(device=device, uuid=driver.device_uuid(device), sharing="vmm-posix-fd",
                           read_only_mapping=read_only)


def _free(driver: Driver, allocation: Allocation) -> None:
    """Let go of an allocation; a driver that refuses must not stop an eviction half-way."""
    os.close(allocation.fd)
    _quietly(driver.release, allocation.device, allocation.handle)


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except CudaError as exc:
        log.error("%s", exc)


def _read_all(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise GpuError(f"the host copy of a segment ended {len(buffer) - done} bytes early")
        done += n


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
