"""Eviction order, and nothing else.

A policy hears what happens to the keys of one tier (admitted, accessed, gone) and, asked
for a victim among the keys that may go, names one. It does no byte accounting and moves
nothing: the store does both, in one place, and never offers a leased or pinned key.

Each policy is one hook, :meth:`Policy.priority`: the lowest priority goes first, ties
going to the least recently used. The clock is injected, so tests can drive time.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from typing import Callable, ClassVar


@dataclass
class Entry:
    size: int
    reload_cost: float  # seconds to bring the key back from the next tier down
    admitted: float
    last_access: float
    accesses: int = 1
    credit: float = 0.0  # for cost-aware policies: GreedyDual's H value


class Policy(ABC):
    name: ClassVar[str]

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, Entry] = {}

    def admit(self, key: str, size: int, reload_cost: float = 0.0) -> None:
        """``key`` became resident (an admission counts as its first access)."""
        now = self._clock()
        entry = self._entries[key] = Entry(size=size, reload_cost=reload_cost, admitted=now, last_access=now)
        self._on_access(entry)

    def access(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_access = self._clock()
            entry.accesses += 1
            self._on_access(entry)

    def forget(self, key: str) -> None:
        """``key`` left the tier, for whatever reason."""
        self._entries.pop(key, None)

    def victim(self, candidates: Collection[str]) -> str:
        """The key among ``candidates`` to evict first. ``candidates`` must not be empty."""
        chosen = min(candidates, key=lambda k: (self.priority(self._entries[k]), self._entries[k].last_access)
                     if k in self._entries else (float("-inf"), 0.0))
        self._on_evict(self._entries.get(chosen))
        return chosen

    @abstractmethod
    def priority(self, entry: Entry) -> float:
        """Lower goes first."""

    def _on_access(self, entry: Entry) -> None:
        pass

    def _on_evict(self, entry: Entry | None) -> None:
        pass


class LRU(Policy):
    """Least recently used first: the paper's choice."""

    name = "lru"

    def priority(self, entry: Entry) -> float:
        return entry.last_access


class LFU(Policy):
    """Least frequently used first (ties: least recently used)."""

    name = "lfu"

    def priority(self, entry: Entry) -> float:
        return entry.accesses


class FIFO(Policy):
    """First admitted, first out, however popular."""

    name = "fifo"

    def priority(self, entry: Entry) -> float:
        return entry.admitted


class CostAware(Policy):
    """GreedyDual-Size-Frequency: keep what is used often and costly to reload per byte.

    priority = L + accesses × reload_cost / size, where L (the "inflation") rises to each
    victim's priority, so keys not touched for long age out whatever they cost. A large
    model that reloads fast from local disk goes before a small one only the cloud holds.
    """

    name = "cost"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._inflation = 0.0

    def priority(self, entry: Entry) -> float:
        return entry.credit

    def _on_access(self, entry: Entry) -> None:
        entry.credit = self._inflation + entry.accesses * entry.reload_cost / max(entry.size, 1)

    def _on_evict(self, entry: Entry | None) -> None:
        if entry is not None:
            self._inflation = max(self._inflation, entry.credit)


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (LRU, LFU, FIFO, CostAware)}
