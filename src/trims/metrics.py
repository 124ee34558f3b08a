"""Counters, gauges and histograms with labels, rendered in the Prometheus text format.

The store counts into one :class:`Metrics`; gauges whose value lives elsewhere (bytes in a
tier, leases) are read when rendered, so they are never stale. Thread-safe.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from typing import Callable

Labels = tuple[tuple[str, str], ...]

OPEN_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, list[float]]] = defaultdict(dict)  # bucket counts + sum
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauges: dict[str, Callable[[], dict[Labels, float]]] = {}

    def describe(self, name: str, kind: str, help_text: str, buckets: tuple[float, ...] = ()) -> None:
        self._help[name] = (kind, help_text)
        if buckets:
            self._buckets[name] = buckets

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key, buckets = _labels(labels), self._buckets[name]
        with self._lock:
            counts = self._histograms[name].setdefault(key, [0.0] * (len(buckets) + 2))
            counts[bisect.bisect_left(buckets, value)] += 1  # the last slot before the sum is +Inf
            counts[-1] += value

    def gauge(self, name: str, read: Callable[[], dict[Labels, float]]) -> None:
        """A gauge whose values ``read`` returns when the metrics are rendered."""
        self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(_labels(labels), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Totals of counter ``name`` by the value of one label."""
        totals: dict[str, float] = defaultdict(float)
        with self._lock:
            for key, value in self._values[name].items():
                totals[dict(key).get(label, "")] += value
        return dict(totals)

    def histogram(self, name: str) -> dict[str, float]:
        """Count, sum and mean of a histogram over all its labels."""
        with self._lock:
            rows = list(self._histograms[name].values())
        count = sum(sum(r[:-1]) for r in rows)
        total = sum(r[-1] for r in rows)
        return {"count": count, "sum": total, "mean": total / count if count else 0.0}

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            values = {n: dict(v) for n, v in self._values.items()}
            histograms = {n: {k: list(c) for k, c in v.items()} for n, v in self._histograms.items()}
        for name, read in self._gauges.items():
            values[name] = read()
        for name in sorted(self._help):
            kind, help_text = self._help[name]
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                lines += _histogram_lines(name, self._buckets[name], histograms.get(name, {}))
            else:
                lines += [f"{name}{_format(key)} {_number(v)}" for key, v in sorted(values.get(name, {}).items())]
        return "\n".join(lines) + "\n"


def _histogram_lines(name: str, buckets: tuple[float, ...], rows: dict[Labels, list[float]]) -> list[str]:
    lines = []
    for key, counts in sorted(rows.items()):
        cumulative = 0.0
        for bound, count in zip((*buckets, math.inf), counts[:-1]):
            cumulative += count
            le = "+Inf" if bound == math.inf else _number(bound)
            lines.append(f"{name}_bucket{_format(key + (('le', le),))} {_number(cumulative)}")
        lines.append(f"{name}_sum{_format(key)} {_number(counts[-1])}")
        lines.append(f"{name}_count{_format(key)} {_number(cumulative)}")
    return lines


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _format(key: Labels) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in key) + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
