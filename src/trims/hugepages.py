"""Shared memory in 2 MiB pages: what the kernel allows, and allocating a memfd's pages so.

A client maps a segment made of 2 MiB pages a page-table entry per 2 MiB instead of per 4 KiB,
so its first touch of a model's weights costs a tenth of the page faults. The kernel decides,
node-wide, with ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` (and per page size under
``hugepages-<size>kB/``, which narrows what faults may get): with ``advise`` only memory whose
mapping asked (``MADV_HUGEPAGE``) gets them. The host tier therefore allocates each segment's
pages through such a mapping (:func:`allocate`) before filling it; that also keeps the tail
beyond the last whole 2 MiB in 4 KiB pages, which ``always`` would otherwise round up.

Whether it works here is found by doing it once (:func:`available`): old kernels lack
``MADV_POPULATE_WRITE`` (Linux 5.14), sandboxes such as gVisor have no such pages, and the
per-size settings can take away what the top-level one allows.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

_THP = Path("/sys/kernel/mm/transparent_hugepage")
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python 3.11's mmap has no constant for it
_ALLOWING = frozenset({"always", "within_size", "advise", "force"})
_PROBE_BYTES = 4 << 20
_PROBE_NAME = "trims-huge-page-probe"


def shmem_setting(root: Path = _THP) -> str:
    """The kernel's top-level setting for shared memory in huge pages: ``always``,
    ``within_size``, ``advise``, ``never``, ``deny`` or ``force``; ``unsupported`` where the
    kernel has no transparent huge pages (or does not say)."""
    try:
        text = (root / "shmem_enabled").read_text()  # "always within_size [advise] never deny force"
        return text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        return "unsupported"


def available(setting: str) -> bool:
    """Whether a memfd allocated by :func:`allocate` gets 2 MiB pages on this kernel, found by
    allocating one of 4 MiB (a few milliseconds, once)."""
    if setting not in _ALLOWING:
        return False
    memfd = os.memfd_create(_PROBE_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, _PROBE_BYTES)
        with mmap.mmap(memfd, _PROBE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            _ask(mapping)
            return _pmd_mapped_kb(_PROBE_NAME) > 0
    except OSError:
        return False
    finally:
        os.close(memfd)


def allocate(memfd: int, size: int) -> None:
    """Give the memfd its pages now, 2 MiB ones, through a mapping that asks for them; writes
    (sendfile) then fill pages already there. Raises OSError if the kernel refuses (the memfd
    is then as before: its pages come with the writes). The mapping is gone on return, as
    sealing against writes requires."""
    if size:
        with mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            _ask(mapping)


def _ask(mapping: mmap.mmap) -> None:
    mapping.madvise(mmap.MADV_HUGEPAGE)
    mapping.madvise(_MADV_POPULATE_WRITE)


def _pmd_mapped_kb(name: str) -> int:
    """ShmemPmdMapped of this process's mapping of the memfd called ``name``."""
    found = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
                found = f"memfd:{name}" in line
            elif found and fields[0] == "ShmemPmdMapped:":
                return int(fields[1])
    return 0
