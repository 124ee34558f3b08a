"""One level of the storage hierarchy: host memory, local disk, or object storage.

A tier holds whole segments, named by their layout id, and knows five things: whether it
has a segment, how to store one, how to copy one out, how to drop one, and how many bytes
it holds. Moving a segment between tiers is one tier's ``fetch`` feeding another's
``put``::

    host.put(layout, fill=lambda fd: disk.fetch(layout, fd))     # promote disk -> host

``fetch`` verifies every byte it copies out of storage that could have changed underneath
(disk, cloud); ``put`` trusts its ``fill``. Tiers do not enforce their capacity: the store
does the accounting and chooses victims in one place, before it calls ``put``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Callable, Iterable

from .config import UNBOUNDED
from .errors import InvalidName
from .records import SegmentLayout

__all__ = ["UNBOUNDED", "PIN_TIERS", "Fill", "Tier", "gpu_device"]

PIN_TIERS = ("host", "disk")  # the tiers a model can be pinned or pulled into, besides a GPU's ("gpu:0")


def gpu_device(tier: str) -> int | None:
    """The CUDA device a tier name means ("gpu:1" -> 1); None for host and disk; InvalidName
    for anything else, "gpu:01" included: a tier has one name, or pins would miss it."""
    if tier in PIN_TIERS:
        return None
    match = re.fullmatch(r"gpu:(0|[1-9][0-9]{0,2})", tier)
    if match is None:
        raise InvalidName(f"tier {tier!r} is not one of {', '.join(PIN_TIERS)} or gpu:N (a CUDA device)")
    return int(match.group(1))

Fill = Callable[[int], None]  # writes a segment's bytes into the descriptor it is given


class Tier(ABC):
    name: str  # a class attribute, except the GPU's ("gpu:0", one tier per device)

    def __init__(self, capacity: int = UNBOUNDED) -> None:
        self.capacity = capacity

    @abstractmethod
    def has(self, segment_id: str) -> bool:
        """Whether the tier holds the segment."""

    @abstractmethod
    def segment_ids(self) -> Iterable[str]:
        """Every segment the tier holds."""

    @abstractmethod
    def bytes_used(self) -> int:
        """Bytes the held segments take."""

    @abstractmethod
    def put(self, layout: SegmentLayout, fill: Fill) -> None:
        """Store a segment: make room for ``layout.size`` bytes, let ``fill`` write them, keep them.

        Nothing is kept if ``fill`` raises.
        """

    @abstractmethod
    def fetch(self, layout: SegmentLayout, destination: int) -> None:
        """Write the segment's bytes into ``destination`` (sized for them), verified.

        Raises IntegrityError if the stored copy does not match the layout's digests.
        """

    @abstractmethod
    def evict(self, segment_id: str) -> int:
        """Drop the segment; returns the bytes freed."""

    def footprint(self, nbytes: int) -> int:
        """Bytes of capacity a segment of ``nbytes`` takes (a GPU allocates in granules)."""
        return nbytes
