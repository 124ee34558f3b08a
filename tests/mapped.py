"""Whether memory lies in the daemon's segments, as this process maps them: for tests, and for
the child interpreters they start (``from tests.mapped import in_store``)."""

from __future__ import annotations


def memfd_ranges() -> list[tuple[int, int]]:
    ranges = []
    for line in open("/proc/self/maps"):
        if "memfd:trims" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


def in_store(pointer: int) -> bool:
    return any(start <= pointer < end for start, end in memfd_ranges())
