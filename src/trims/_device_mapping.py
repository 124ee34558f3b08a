"""Segments in GPU memory, mapped into this process from the descriptors the daemon sends.

A :class:`DeviceSegment` imports one exported allocation and maps it read-only for its
device; frameworks take it through ``__cuda_array_interface__`` without a copy, and it
unmaps itself once nothing (no tensor made from it) refers to it any more.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from . import cuda_driver
from .cuda_driver import PROT_READ, PROT_READWRITE, CudaError, Driver, Mapping

log = logging.getLogger("trims.client")


class DeviceSegment:
    def __init__(self, device: int, fd: int, size: int) -> None:
        self.device = device
        self.size = size
        cuda = cuda_driver.driver()
        handle = cuda.import_fd(device, fd)
        try:
            self._mapping = _map_read_only(cuda, device, handle, size)
        except BaseException:
            cuda.release(device, handle)
            raise
        finalizer = weakref.finalize(self, _unmap, cuda, self._mapping)
        finalizer.atexit = False  # at exit the driver frees every mapping itself
        self.lease: Any = None  # whatever keeps the segment alive keeps the daemon's lease too

    @property
    def pointer(self) -> int:
        return self._mapping.pointer

    @property
    def read_only(self) -> bool:
        return self._mapping.protection == PROT_READ

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # PyTorch refuses the interface's read-only flag; the driver's mapping enforces it.
        return {"shape": (self.size,), "typestr": "|u1", "data": (self.pointer, False), "version": 2}


def _map_read_only(cuda: Driver, device: int, handle: int, size: int) -> Mapping:
    try:
        return cuda.map(device, handle, size, PROT_READ)
    except CudaError as exc:
        log.warning("the CUDA driver cannot map shared weights read-only (%s); mapping them writable: "
                    "an in-place write here would reach every process using the model", exc)
        return cuda.map(device, handle, size, PROT_READWRITE)


def _unmap(cuda: Driver, mapping: Mapping) -> None:
    try:
        cuda.synchronize_device(mapping.device)  # kernels queued before the last tensor died
    except CudaError as exc:  # a context lost to a fault: unmap all the same
        log.debug("unmapping a shared segment after a failed synchronize: %s", exc)
    cuda.unmap(mapping)
    cuda.release(mapping.device, mapping.handle)
