"""The store: what models exist, which segments are in host memory, and who holds them.

All state lives here, behind one lock. Long work (hashing a push, loading a segment from
disk) runs outside the lock; a segment being loaded has one :class:`Future` that every
other open of it waits on, so N clients opening a cold model cause one load.

A lease pins a model's segments in host memory until released; released segments stay
resident until the host cap needs their room (least recently used first).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import names
from .catalog import Catalog
from .errors import CapacityError, InvalidName, ModelBusy, ModelNotFound, StorageError
from .host import HostSegment, HostTier, load_segment
from .ingest import Ingested, SourceFile, ingest
from .protocol import ModelSummary, PushResult, TensorEntry, TensorTable
from .records import Manifest, SegmentLayout

log = logging.getLogger("trims.store")


@dataclass(frozen=True)
class OpenResult:
    lease: int
    name: str
    manifest: Manifest
    segments: tuple[HostSegment, ...]
    tensors: TensorTable


@dataclass(frozen=True)
class _Lease:
    owner: int
    model: str
    segments: tuple[str, ...]


@dataclass(frozen=True)
class _Placement:
    """Where an opened model's tensors are: the segments it needs and each tensor's spot."""

    segments: tuple[str, ...]
    tensors: TensorTable


@dataclass
class Metrics:
    opens: int = 0
    open_hits: int = 0
    open_misses: int = 0
    open_seconds_total: float = 0.0
    segment_loads: int = 0
    segment_load_bytes: int = 0
    segment_load_seconds: float = 0.0
    segment_load_failures: int = 0
    evictions: Counter = field(default_factory=Counter)
    pushes: int = 0
    push_bytes_new: int = 0


class Store:
    def __init__(
        self,
        root: Path,
        host_capacity: int,
        *,
        workers: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = Catalog(root)
        self.host = HostTier(host_capacity)
        self.metrics = Metrics()
        self._workers = workers or os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="trims-verify")
        self._clock = clock
        self._lock = threading.Lock()
        self._loading: dict[str, Future] = {}
        self._refs: Counter[str] = Counter()
        self._last_used: dict[str, float] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._placements: dict[str, _Placement] = {}
        self._doomed: set[str] = set()  # unused segments kept only until their leases end
        freed = self.catalog.collect_garbage(keep_segments=set())
        if freed:
            log.info("collected %d bytes no model uses", freed)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self.host.close()
            self.catalog.close()

    # --- registration -------------------------------------------------------------------

    def push(self, reference: str, files: list[SourceFile]) -> PushResult:
        name = names.canonical(reference)
        if name.startswith("sha256:"):
            raise InvalidName("push needs a NAME[:TAG] to tag the model with, not a digest")
        catalog = self.catalog
        for _ in range(3):
            # Hashing runs outside the lock; what it took as already stored may be deleted
            # meanwhile by a concurrent `remove`. Then the commit refuses and we go again.
            ingested = ingest(files, catalog.temp_dir(), lambda d: d in catalog.locations, self._workers)
            try:
                with self._lock:
                    new_bytes = self._commit_locked(name, ingested)
            finally:
                ingested.discard()  # a no-op once the segment was renamed into place
            if new_bytes is not None:
                break
        else:
            raise StorageError(f"pushing {name} kept racing with removals; try again")
        manifest = ingested.manifest
        log.info("pushed %s = %s (%d tensors, %d new bytes)", name, manifest.digest, len(manifest.tensors), new_bytes)
        return PushResult(
            name=name, digest=manifest.digest, nbytes=manifest.nbytes, tensors=len(manifest.tensors), new_bytes=new_bytes
        )

    def _commit_locked(self, name: str, ingested: Ingested) -> int | None:
        """Make a push visible; the new bytes stored, or None if a tensor it relies on is gone."""
        catalog, segment = self.catalog, ingested.segment
        carried = {e.digest for e in segment.entries} if segment else set()
        if any(t.digest not in catalog.locations and t.digest not in carried for t in ingested.manifest.tensors):
            return None
        new_bytes = 0
        if segment is not None and any(e.digest not in catalog.locations for e in segment.entries):
            catalog.add_segment(segment, ingested.segment_path)
            new_bytes = segment.size
        for file_digest, data in ingested.side_files.items():
            catalog.add_file(file_digest, data)
        catalog.add_manifest(ingested.manifest)
        replaced = catalog.tags.get(name)
        catalog.set_tag(name, ingested.manifest.digest)
        if replaced not in (None, ingested.manifest.digest):
            self._collect_garbage_locked()  # the name's old model may now be unused
        self.metrics.pushes += 1
        self.metrics.push_bytes_new += new_bytes
        return new_bytes

    def remove(self, reference: str) -> int:
        """Untag a model; delete what no tag needs any more. Returns bytes deleted."""
        name = names.canonical(reference)
        with self._lock:
            if name not in self.catalog.tags:
                raise ModelNotFound(f"no model named {name}")
            self.catalog.remove_tag(name)
            return self._collect_garbage_locked()

    def _collect_garbage_locked(self) -> int:
        """Delete what no name needs; a segment still leased goes when its last lease ends."""
        busy = set(self._refs) | set(self._loading)
        freed = self.catalog.collect_garbage(keep_segments=busy)
        for segment_id in [s for s in self.host.resident if s not in self.catalog.segments]:
            self._evict_locked(segment_id, "removed")
        self._doomed = self.catalog.unused_segments()
        self._placements = {d: p for d, p in self._placements.items() if d in self.catalog.manifests}
        return freed

    # --- opening and leases ---------------------------------------------------------------

    def open(self, reference: str, owner: int) -> OpenResult:
        """Lease a model's segments in host memory, loading them from disk if needed."""
        started = self._clock()
        with self._lock:
            name, manifest = self._resolve(reference)
            placement = self._placement(manifest)
        acquired: list[HostSegment] = []
        missed = False
        try:
            for segment_id in placement.segments:
                segment, loaded = self._acquire(segment_id)
                acquired.append(segment)
                missed |= loaded
        except BaseException:
            with self._lock:
                self._unref_locked([s.id for s in acquired])
            raise
        with self._lock:
            lease = next(self._lease_ids)
            self._leases[lease] = _Lease(owner, manifest.digest, placement.segments)
            self.metrics.opens += 1
            if missed:
                self.metrics.open_misses += 1
            else:
                self.metrics.open_hits += 1
            self.metrics.open_seconds_total += self._clock() - started
        return OpenResult(lease, name, manifest, tuple(acquired), placement.tensors)

    def release(self, lease: int, owner: int) -> None:
        """End a lease. Unknown leases (already released) are ignored."""
        with self._lock:
            held = self._leases.get(lease)
            if held is not None and held.owner == owner:
                del self._leases[lease]
                self._unref_locked(held.segments)

    def release_owner(self, owner: int) -> int:
        """End every lease of a connection that went away; returns how many."""
        with self._lock:
            mine = [lease for lease, held in self._leases.items() if held.owner == owner]
            for lease in mine:
                self._unref_locked(self._leases.pop(lease).segments)
        return len(mine)

    def evict(self, reference: str) -> int:
        """Drop a model from host memory; it stays on disk. Returns bytes freed."""
        with self._lock:
            name, manifest = self._resolve(reference)
            segments = self._placement(manifest).segments
            leases = sum(1 for held in self._leases.values() if set(held.segments) & set(segments))
            if leases or any(s in self._loading for s in segments):
                raise ModelBusy(
                    f"{name} is in use ({leases} leases); it can leave host memory once they close"
                )
            return sum(self._evict_locked(s, "requested") for s in segments if s in self.host.resident)

    def _acquire(self, segment_id: str) -> tuple[HostSegment, bool]:
        """Take a reference on a resident segment, loading it (once) if it is not."""
        while True:
            with self._lock:
                resident = self.host.resident.get(segment_id)
                if resident is not None:
                    self._ref_locked(segment_id)
                    return resident, False
                pending = self._loading.get(segment_id)
                if pending is None:
                    layout = self.catalog.segments.get(segment_id)
                    if layout is None:
                        raise ModelNotFound("the model was removed while it was being opened")
                    self._make_room_locked(layout.size)
                    self.host.reserved += layout.size
                    pending = self._loading[segment_id] = Future()
                    break
            pending.result()  # another client is loading it: wait, then take a reference
        return self._load(segment_id, layout, pending), True

    def _load(self, segment_id: str, layout: SegmentLayout, pending: Future) -> HostSegment:
        started = self._clock()
        try:
            segment = load_segment(layout, self.catalog.segment_path(segment_id), self._pool)
        except BaseException as exc:
            with self._lock:
                self.host.reserved -= layout.size
                del self._loading[segment_id]
                self.metrics.segment_load_failures += 1
            pending.set_exception(exc)
            raise
        with self._lock:
            self.host.reserved -= layout.size
            del self._loading[segment_id]
            self.host.add(segment)
            self._ref_locked(segment_id)
            self.metrics.segment_loads += 1
            self.metrics.segment_load_bytes += layout.size
            self.metrics.segment_load_seconds += self._clock() - started
        pending.set_result(segment)
        return segment

    def _ref_locked(self, segment_id: str) -> None:
        self._refs[segment_id] += 1
        self._last_used[segment_id] = self._clock()

    def _unref_locked(self, segment_ids) -> None:
        for segment_id in segment_ids:
            self._refs[segment_id] -= 1
            if self._refs[segment_id] <= 0:
                del self._refs[segment_id]
                if segment_id in self._doomed:  # its model was removed while it was leased
                    self._collect_garbage_locked()

    def _make_room_locked(self, nbytes: int) -> None:
        if nbytes > self.host.capacity:
            raise CapacityError(
                f"a segment of {nbytes} bytes is larger than the host memory trims was given "
                f"({self.host.capacity} bytes); restart the daemon with a larger --host-memory"
            )
        while not self.host.fits(nbytes):
            idle = [s for s in self.host.resident if not self._refs.get(s)]
            if not idle:
                raise CapacityError(
                    f"host memory is full: {self.host.used} of {self.host.capacity} bytes are "
                    f"leased or loading and {nbytes} more are needed; close models you no longer "
                    "use, or give the daemon a larger --host-memory"
                )
            victim = min(idle, key=lambda s: self._last_used.get(s, 0.0))
            self._evict_locked(victim, "capacity")

    def _evict_locked(self, segment_id: str, reason: str) -> int:
        self._last_used.pop(segment_id, None)
        self.metrics.evictions[reason] += 1
        return self.host.drop(segment_id)

    # --- catalogue views ------------------------------------------------------------------

    def _resolve(self, reference: str) -> tuple[str, Manifest]:
        name = names.canonical(reference)
        model_digest = self.catalog.tags.get(name, name if name.startswith("sha256:") else None)
        manifest = self.catalog.manifests.get(model_digest) if model_digest else None
        if manifest is None:
            raise ModelNotFound(f"no model named {name}; `trims ls` lists the models, `trims push` adds one")
        return name, manifest

    def _placement(self, manifest: Manifest) -> _Placement:
        cached = self._placements.get(manifest.digest)
        if cached is None:
            order: dict[str, int] = {}
            tensors = []
            for t in manifest.tensors:
                segment_id, offset = self.catalog.locations[t.digest]
                index = order.setdefault(segment_id, len(order))
                tensors.append(TensorEntry(t.name, t.dtype, t.shape, index, offset, t.nbytes))
            cached = self._placements[manifest.digest] = _Placement(tuple(order), TensorTable.of(tensors))
        return cached

    def list_models(self) -> list[ModelSummary]:
        with self._lock:
            return [self._summary_locked(name) for name in sorted(self.catalog.tags)]

    def info(self, reference: str) -> ModelSummary:
        with self._lock:
            name, _ = self._resolve(reference)
            return self._summary_locked(name)

    def _summary_locked(self, name: str) -> ModelSummary:
        _, manifest = self._resolve(name)
        segments = self._placement(manifest).segments
        tiers = ("host", "disk") if all(s in self.host.resident for s in segments) else ("disk",)
        return ModelSummary(
            name=name,
            digest=manifest.digest,
            nbytes=manifest.nbytes,
            tensors=len(manifest.tensors),
            tiers=tiers,
            leases=sum(1 for held in self._leases.values() if held.model == manifest.digest),
            segments=len(segments),
            dtypes=dict(Counter(t.dtype for t in manifest.tensors)),
            metadata=manifest.metadata,
            files=tuple(sorted(manifest.files)),
            aliases=tuple(n for n, d in sorted(self.catalog.tags.items()) if d == manifest.digest and n != name),
        )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            m = self.metrics
            return {
                "host": {
                    "capacity_bytes": self.host.capacity,
                    "used_bytes": self.host.used,
                    "resident_segments": len(self.host.resident),
                    "loading_segments": len(self._loading),
                },
                "disk": {"used_bytes": self.catalog.disk_bytes(), "segments": len(self.catalog.segments)},
                "models": len(self.catalog.manifests),
                "tags": len(self.catalog.tags),
                "leases": len(self._leases),
                "opens": {"total": m.opens, "hits": m.open_hits, "misses": m.open_misses, "seconds_total": m.open_seconds_total},
                "loads": {
                    "segments": m.segment_loads,
                    "bytes": m.segment_load_bytes,
                    "seconds_total": m.segment_load_seconds,
                    "failures": m.segment_load_failures,
                },
                "evictions": dict(m.evictions),
                "pushes": {"total": m.pushes, "new_bytes": m.push_bytes_new},
            }
