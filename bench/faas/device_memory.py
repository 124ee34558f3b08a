"""Device memory in use on a GPU, read through NVML, the driver's management library (what
nvidia-smi shows): it needs no CUDA context, so the controller stays off the device.

NVML numbers every device of the machine in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``;
:meth:`DeviceMemory.of_cuda_device` finds the device CUDA calls ``cuda:N`` (run.py sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers devices the same way).
"""

from __future__ import annotations

import ctypes
import os


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class DeviceMemory:
    def __init__(self, device: str) -> None:
        """``device``: an NVML index, or a GPU's UUID (``GPU-...``)."""
        self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self._nvml.nvmlInit_v2(), "nvmlInit_v2")
        self._handle = ctypes.c_void_p()
        if device.isdigit():
            found = self._nvml.nvmlDeviceGetHandleByIndex_v2(int(device), ctypes.byref(self._handle))
        else:
            found = self._nvml.nvmlDeviceGetHandleByUUID(device.encode(), ctypes.byref(self._handle))
        self._check(found, f"finding GPU {device}")

    @classmethod
    def of_cuda_device(cls, index: int) -> DeviceMemory:
        return cls(nvml_device(index))

    def used(self) -> int:
        """Bytes of the device's memory in use by every process (contexts included)."""
        memory = _Memory()
        self._check(self._nvml.nvmlDeviceGetMemoryInfo(self._handle, ctypes.byref(memory)), "nvmlDeviceGetMemoryInfo")
        return memory.used

    @staticmethod
    def _check(result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed with NVML error {result}")


def nvml_device(index: int) -> str:
    """The machine-wide name (index or UUID, as NVML and ``nvidia-smi -i`` take it) of the
    device this process's CUDA calls ``cuda:index``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    entries = [entry.strip() for entry in visible.split(",")]
    if index >= len(entries):
        raise RuntimeError(f"cuda:{index} is not among CUDA_VISIBLE_DEVICES={visible}")
    return entries[index]
