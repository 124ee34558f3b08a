"""Device memory in use on a GPU, read through NVML, the driver's management library (what
nvidia-smi shows): it needs no CUDA context, so the controller stays off the device.

NVML numbers devices in PCI bus order; set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` where a node has
several GPUs so that ``cuda:N`` and NVML's device N are the same one.
"""

from __future__ import annotations

import ctypes


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class DeviceMemory:
    def __init__(self, index: int) -> None:
        self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self._nvml.nvmlInit_v2(), "nvmlInit_v2")
        self._handle = ctypes.c_void_p()
        self._check(self._nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self._handle)),
                    "nvmlDeviceGetHandleByIndex_v2")

    def used(self) -> int:
        """Bytes of the device's memory in use by every process (contexts included)."""
        memory = _Memory()
        self._check(self._nvml.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(memory)), "nvmlDeviceGetMemoryInfo")
        return memory.used

    @staticmethod
    def _check(result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed with NVML error {result}")
