"""The store: what models exist, where their segments are, and who holds them.

The hierarchy is host memory over local disk over object storage. A model is served from
host memory; a segment missing there comes from disk, or from the cloud by way of disk
when the disk has room. All state lives here, behind one lock; long work (hashing a push,
copying a segment between tiers) runs outside it. A segment moving into a tier has one
:class:`Future` that every other request for it waits on, so N clients opening a cold model
cause one fetch.

Accounting happens in one place, :meth:`Store._make_room_locked`: before bytes enter a
tier, the tier's policy picks victims among what may go, and they are evicted. A segment
under lease, pinned, or being read is never a victim, and the disk gives up a segment only
if the cloud holds it: demotion never destroys the last copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import cuda_driver
from . import digest as digests
from . import ingest, names
from .catalog import MAX_SEGMENTS_PER_MODEL, Catalog
from .cloud import CloudTier, RemoteFile
from .disk import DiskTier
from .gpu import GpuSegment, GpuTier
from .acl import EVERYONE, AccessPolicy, Tenant
from .errors import (CapacityError, CloudReadFailed, DamagedCopy, DiskFull, GpuError, IntegrityError, InvalidModel,
                     InvalidName, ModelBusy, ModelNotFound, PermissionDenied, QuotaExceeded, StorageError, TrimsError)
from .host import HostSegment, HostTier
from .metrics import OPEN_SECONDS_BUCKETS, Metrics
from .policy import POLICIES
from .protocol import MAX_FDS_PER_FRAME, ModelSummary, ProgressCallback, PushResult, TensorEntry, TensorTable
from .records import Manifest, SegmentEntry, SegmentLayout
from .sharing import SharingRule
from .sources import FileSource, Source
from .tier import PIN_TIERS, UNBOUNDED, Tier, gpu_device

log = logging.getLogger("trims.store")

ADOPTED = "auto"  # models registered by content (transparent mode) go to auto/<tenant>/


def adopted_name(tenant: str, model_digest: str) -> str:
    """Each tenant's registrations under a namespace of its own: no tenant learns, through
    them, what files another one loads."""
    return f"{ADOPTED}/{tenant}/{digests.hex_of(model_digest)[:32]}:latest"

TIERS = ("host", "disk", "cloud")
# Starting guesses of how fast each tier refills the one above it; refined by measurement.
_INITIAL_RATES = {"host": 2.0e10, "disk": 1.5e9, "cloud": 1.0e8}
_CLOUD_LATENCY = 0.05
_LOADS_OF_A_DAMAGED_SEGMENT = 3  # a disk that damages every copy would otherwise fetch for ever


@dataclass(frozen=True)
class OpenResult:
    lease: int
    name: str
    manifest: Manifest
    segments: tuple[HostSegment, ...] | tuple[GpuSegment, ...]
    tensors: TensorTable
    device: int | None = None  # the CUDA device holding the segments; None for host memory


@dataclass(frozen=True)
class _Lease:
    owner: int  # the connection
    tenant: str
    model: str
    nbytes: int
    segments: tuple[str, ...]
    gpu: str | None = None  # the GPU tier whose copies it holds; None for host memory


@dataclass(frozen=True)
class _Placement:
    """Where an opened model's tensors are: the segments it needs and each tensor's spot."""

    segments: tuple[str, ...]
    tensors: TensorTable
    extras: frozenset[str]  # other models' tensors that share its segments


@dataclass(frozen=True)
class _Patience:
    """How long a request may wait for memory to be freed (--busy-timeout), and the sign that
    nobody waits for its answer any more (its connection ended)."""

    deadline: float
    abandoned: threading.Event | None = None

    def gave_up(self) -> bool:
        return self.abandoned is not None and self.abandoned.is_set()


class _RequesterLeft(CapacityError):
    """A wait for memory ended because its requester's connection did. Requests waiting on
    the load it was making (a GPU upload waiting for host room) make it themselves."""


class _NoRoom(Exception):
    """Everything the tier holds is in use; waiting for a release may help."""


class _Tracker:
    """Bytes a pull has moved so far, reported as ("pull", done, total); thread-safe."""

    def __init__(self, total: int, report: ProgressCallback | None) -> None:
        self._total, self._report = total, report
        self._done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self._report is not None:
            with self._lock:
                self._done += nbytes
                self._report("pull", self._done, self._total)


def _stage(progress: ProgressCallback | None, stage: str) -> ingest.Progress | None:
    """A push's progress in one stage: "push" (hashed and written in one pass), or "hash"
    and then "write" (the two passes of a push the disk has no room for whole)."""
    return None if progress is None else functools.partial(progress, stage)


def _capacity_flag(tier: Tier) -> str:
    if isinstance(tier, GpuTier):
        return "gpu-memory"
    return "host-memory" if tier.name == "host" else tier.name


def _add(tracker: _Tracker | None) -> Callable[[int], None] | None:
    return tracker.add if tracker is not None else None


class Store:
    def __init__(
        self,
        root: Path,
        *,
        host_capacity: int,
        disk_capacity: int = UNBOUNDED,
        policy: str = "lru",
        cloud_url: str | None = None,
        busy_timeout: float = 0.0,
        workers: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        access: AccessPolicy | None = None,
        gpu_capacity: int = 0,
        gpu_driver: Callable[[], Any] | None = None,
    ) -> None:
        self.catalog = Catalog(root)
        self._sharing = SharingRule(self.catalog, access or AccessPolicy.single_user())
        self._workers = workers or os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="trims-verify")
        self.host = HostTier(host_capacity)
        self.disk = DiskTier(root / "disk", self.catalog.temp_dir(), self.catalog.corrupt_dir(), self._pool,
                             disk_capacity, also_used=self.catalog.side_bytes)
        self.cloud = CloudTier(root / "cloud", self.catalog.temp_dir(), self._pool, default_url=cloud_url)
        self._tiers: dict[str, Tier] = {"host": self.host, "disk": self.disk, "cloud": self.cloud}
        self.policy_name = policy
        self._policies = {tier: POLICIES[policy](clock) for tier in PIN_TIERS}
        self.busy_timeout = busy_timeout
        self._clock = clock
        self.metrics = Metrics()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when bytes or leases are freed
        self._loading: dict[str, Future] = {}  # segment -> its load into host memory
        self._staging: dict[str, Future] = {}  # segment -> its fetch from the cloud onto disk
        self._reading: Counter[str] = Counter()  # disk segments being copied out
        self._reserved: Counter[str] = Counter()  # tier -> bytes promised to moves in flight
        self._refs: Counter[str] = Counter()  # host segment -> leases and pulls holding it
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._placements: dict[str, _Placement] = {}
        self._doomed: set[str] = set()  # unused segments kept only until their leases end
        self._repacking: set[str] = set()  # segments losing a removed model's tensors (see _repack_orphans)
        self._orphans_possible = True  # a model left a segment others read from: look for its tensors
        self._may_map: dict[tuple[str, str], bool] = {}  # (model, tenant) -> SharingRule.may_map; cleared on changes
        self._rates = dict(_INITIAL_RATES)
        self._adopted: dict[tuple, str] = {}  # identities of files adopted -> model digest
        self._push_reserved: Counter[str] = Counter()  # tenant -> bytes of its pushes under way
        self._opening: Counter[tuple[str, str]] = Counter()  # (tenant, model digest) -> opens under way
        self._waiting_for_room = 0  # requests waiting, under --busy-timeout, for a release to free memory
        self.gpu_capacity = gpu_capacity  # per device; 0: no GPU tier
        self._gpu_driver = gpu_driver
        self._gpus: dict[int, GpuTier] = {}
        self._gpu_ordinals: dict[str, int] | None = None  # device UUID -> the daemon's ordinal, read once
        self._gpu_setup = threading.Lock()
        self._gpu_loading: dict[tuple[str, str], Future] = {}  # (gpu tier, segment) -> its upload
        self._gpu_refs: Counter[tuple[str, str]] = Counter()  # (gpu tier, segment) -> leases holding it
        self._describe_metrics()
        self._take_stock()

    def _take_stock(self) -> None:
        """After a (re)start: index what each tier holds, report what is lost, collect garbage."""
        self.disk.index(self.catalog.segments)
        self.cloud.index(self.catalog.segments)
        for segment_id in self.disk.segment_ids():
            size = self.catalog.segments[segment_id].size
            self._policies["disk"].admit(segment_id, size, self._reload_cost(segment_id, "disk"))
        lost = [s for s in self.catalog.segments if not self.disk.has(s) and not self.cloud.has(s)]
        if lost:
            log.error("%d segments are on no tier (their models cannot be opened): %s", len(lost), lost[:3])
        with self._lock:
            self._collect_garbage_locked()
        self._repack_orphans()  # left by a crash in the middle of one

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for gpu in self._gpus.values():
                gpu.close()
            self.host.close()
            self.catalog.close()

    # --- registration -----------------------------------------------------------------------

    def push(self, reference: str | None, files: list[Source], *, to: str | None = None,
             progress: ProgressCallback | None = None, tenant: Tenant = EVERYONE) -> PushResult:
        """Register a model from ``files``; with ``to`` (default: the daemon's ``--cloud``), also
        upload its segments there. With no ``reference``, the model is named by its digest,
        ``auto/<digest>``.

        Files that are objects in a bucket (:class:`~trims.cloud.RemoteFile`) stay the cloud
        copy of what they hold, so the disk may later give those bytes up.
        """
        name = names.canonical(reference) if reference is not None else None
        if name is not None and digests.is_digest(name):
            raise InvalidName("push needs a NAME[:TAG] to tag the model with, not a digest")
        if name is not None and not tenant.can_push(name):
            raise PermissionDenied(f"tenant {tenant.name} may not push {name}: it is outside the namespaces it may write")
        planned = ingest.plan(files)
        model_bytes = sum(spec.nbytes for _, spec in planned.specs) + planned.side_bytes
        with self._changed:
            self._check_push_quota_locked(tenant, name or "", model_bytes)
        try:
            ingested, new_bytes = self._write_and_commit(name, planned, files, progress, tenant)
            self._repack_orphans()  # if the name pointed at another model, it may have left some
        finally:
            with self._changed:
                self._release_push_quota_locked(tenant, model_bytes)
                self._changed.notify_all()
        manifest = ingested.manifest
        name = name or adopted_name(tenant.name, manifest.digest)
        log.info("pushed %s = %s (%d tensors, %d new bytes)", name, manifest.digest, len(manifest.tensors), new_bytes)
        self.metrics.inc("trims_pushes_total")
        self.metrics.inc("trims_push_new_bytes_total", new_bytes)
        to = to or self.cloud.default_url  # with --cloud, every model gets a copy the disk can give up
        uploaded = 0
        if to is not None:
            try:
                uploaded = self._upload(manifest, to)
            except StorageError as exc:  # the push itself stands: say so, not only that something failed
                raise StorageError(f"{name} is stored on this node, but uploading it to {to} failed: {exc}. Push it "
                                   "again with the same --to to retry the upload (segments already uploaded are not "
                                   "sent again)") from None
        return PushResult(name=name, digest=manifest.digest, nbytes=manifest.nbytes, tensors=len(manifest.tensors),
                          new_bytes=new_bytes, uploaded_bytes=uploaded)

    def _write_and_commit(self, name: str | None, planned: ingest.Plan, files: list[Source],
                          progress: ProgressCallback | None, tenant: Tenant) -> tuple[ingest.Ingested, int]:
        remote_urls = {f.label: f.url for f in files if isinstance(f, RemoteFile)}
        for _ in range(3):
            # Hashing runs outside the lock; what it took as already stored may be deleted
            # meanwhile by a concurrent `remove`. Then the commit refuses and we go again.
            with self._ingested_in_room(name, planned, progress, tenant) as ingested:
                try:
                    with self._changed:
                        new_bytes = self._commit_locked(name, ingested, remote_urls, tenant)
                finally:
                    ingested.discard()  # a no-op once the segment was moved into place
            if new_bytes is not None:
                return ingested, new_bytes
        raise StorageError(f"pushing {name} kept racing with removals; try again")

    @contextlib.contextmanager
    def _ingested_in_room(self, name: str | None, planned: ingest.Plan, progress: ProgressCallback | None,
                          tenant: Tenant) -> Iterator[ingest.Ingested]:
        """The push ingested, with room on disk reserved for its new segment until the caller
        has committed it. In one pass if the disk has room for the whole model; if not, hashed
        first, so that room is needed for its new tensors alone (none on a re-push)."""
        covered, temp_dir = (lambda m: self._covered(m, name, tenant)), self.catalog.temp_dir()
        side = self.catalog.new_side_bytes(  # written at the commit
            {planned.side_digests[label]: len(data) for label, data in planned.side_files.items()})
        whole = self._written_whole(planned, planned.size + side, temp_dir, covered, progress)
        if whole is not None:
            try:
                yield whole
            finally:
                self._release_disk(planned.size + side)
            return
        manifest = ingest.digest(planned, self._workers, _stage(progress, "hash"))
        new = ingest.only_new(planned, manifest, covered(manifest))
        room = (new.size if new.specs else 0) + side
        self._reserve_disk(room)
        try:
            yield ingest.write_new(planned, new, manifest, temp_dir, self._workers, _stage(progress, "write"))
        finally:
            self._release_disk(room)

    def _written_whole(self, planned: ingest.Plan, room: int, temp_dir: Path, covered,
                       progress: ProgressCallback | None) -> ingest.Ingested | None:
        """The push in one pass, with ``room`` on disk reserved (the caller releases it); None,
        nothing reserved, where the disk has no room for the whole model: under --disk, or
        on a filesystem fuller than --disk knows."""
        try:
            self._reserve_disk(room)
        except CapacityError:
            return None
        try:
            return ingest.write(planned, temp_dir, covered, self._workers, _stage(progress, "push"))
        except DiskFull:
            self._release_disk(room)
            return None
        except BaseException:
            self._release_disk(room)
            raise

    def _reserve_disk(self, nbytes: int) -> None:
        """Room on disk for ``nbytes`` more, made if it can be; raises CapacityError."""
        if nbytes == 0:
            return
        with self._changed:
            try:
                self._make_room_locked(self.disk, nbytes)
            except _NoRoom:
                raise CapacityError(self._full_message(self.disk, nbytes)) from None
            self._reserved["disk"] += nbytes

    def _release_disk(self, nbytes: int) -> None:
        with self._changed:
            self._reserved["disk"] -= nbytes
            self._changed.notify_all()

    def _commit_locked(self, name: str | None, ingested: ingest.Ingested, remote_urls: dict[str, str],
                       tenant: Tenant) -> int | None:
        """Make a push visible; the new bytes stored, or None if a tensor it relies on is gone."""
        catalog, segment = self.catalog, ingested.segment
        new_bytes = 0
        if segment is not None and not self._stored_locked(segment.id):  # new, or lost and now restored
            self.disk.adopt(segment, ingested.segment_path)
            catalog.add_segment(segment)
            if remote_urls:  # pushed from a bucket: the objects stay the cloud copy
                places = {d: (remote_urls[label], offset) for d, (label, offset) in ingested.sources.items()}
                self.cloud.register(segment, places)
            self._policies["disk"].admit(segment.id, segment.size, self._reload_cost(segment.id, "disk"))
            new_bytes = segment.size
        manifest = ingested.manifest
        name = name or adopted_name(tenant.name, manifest.digest)
        uses = self._segments_for_locked(manifest, name)
        if uses is None:  # a segment it counted on was removed, or became off limits, meanwhile
            self._collect_garbage_locked()
            return None
        for file_digest, data in ingested.side_files.items():
            catalog.add_file(file_digest, data)
        moved = catalog.add_manifest(manifest, uses)
        if moved:
            self._placements.pop(manifest.digest, None)
        replaced = catalog.tags.get(name)
        catalog.set_tag(name, manifest.digest, owner=tenant.name)
        self._may_map.clear()
        if moved or replaced not in (None, manifest.digest):
            self._collect_garbage_locked()  # the name's old model, or the model's old segments, may be unused
            self._orphans_possible = True
        return new_bytes

    # --- what may share storage (see sharing.py) ---------------------------------------------

    def _covered(self, manifest: Manifest, name: str | None, tenant: Tenant) -> set[str]:
        """Which of a new model's tensors are stored where it may be read from."""
        name = name or adopted_name(tenant.name, manifest.digest)
        with self._lock:
            return self.catalog.covered(manifest, self._usable_locked(manifest, name))

    def _segments_for_locked(self, manifest: Manifest, name: str) -> tuple[str, ...] | None:
        """The segments a model pushed as ``name`` is read from: those it had, if all may
        still be shared with the new name's readers, or else a fresh choice."""
        usable = self._usable_locked(manifest, name)
        current = self.catalog.uses.get(manifest.digest)
        if (current and len(current) <= MAX_SEGMENTS_PER_MODEL and self.catalog.placement(manifest) is not None
                and all(usable(s) for s in current)):
            return current
        return self.catalog.choose_segments(manifest, usable)

    def _usable_locked(self, manifest: Manifest, name: str) -> Callable[[str], bool]:
        """Segments a push may rely on: shareable with its readers (sharing.py), and still
        stored. A segment whose last copy was lost is written again, which restores it."""
        shareable = self._sharing.usable_for(manifest, name)
        return lambda segment_id: self._stored_locked(segment_id) and shareable(segment_id)

    def _stored_locked(self, segment_id: str) -> bool:
        return self.disk.has(segment_id) or self.cloud.has(segment_id)

    def _may_map_locked(self, tenant: Tenant, manifest: Manifest, placement: _Placement) -> bool:
        if not placement.extras:
            return True
        key = (manifest.digest, tenant.name)
        if key not in self._may_map:
            self._may_map[key] = self._sharing.may_map(tenant, manifest.digest, placement.extras)
        return self._may_map[key]

    def _repack_orphans(self) -> None:
        """Removing or re-tagging a model can leave its tensors in a segment other models are
        still read from: copy those models' tensors into a segment without them, so nobody
        keeps mapping (or storing) the removed model's bytes. Opens that would map them wait."""
        with self._lock:
            if not self._orphans_possible:  # the scan reads every stored tensor: not on every push
                return
            found = self.catalog.orphans_in_use()
            work = {s: o for s, o in found.items() if s not in self._repacking}
            self._orphans_possible = len(work) < len(found)  # one being repacked may need it again
            self._repacking.update(work)
        try:
            for segment_id, orphans in work.items():
                try:
                    self._repack(segment_id, orphans)
                except (TrimsError, OSError) as exc:
                    with self._lock:
                        self._orphans_possible = True  # try again after the next push or removal
                    log.error("could not repack segment %s without the tensors of removed models: %s; "
                              "models read from it stay unopenable for tenants who may not read those", segment_id[:19], exc)
        finally:
            with self._changed:
                self._repacking.difference_update(work)
                self._changed.notify_all()

    def _repack(self, segment_id: str, orphans: set[str]) -> None:
        layout = self.catalog.segments[segment_id]
        keep = [e for e in layout.entries if e.digest not in orphans]
        packed = SegmentLayout.pack([(e.digest, e.nbytes) for e in keep])
        path = self._packed_copy(layout, keep, packed)
        moved: list[Manifest] = []
        try:
            with self._changed:
                if any(self.catalog.models_with(d) for d in orphans) or packed.id in self.catalog.segments:
                    path.unlink()  # pushed again meanwhile: they are nobody's orphans any more
                    return
                self.disk.adopt(packed, path)
                for model_digest in self.catalog.replace_segment(segment_id, packed):
                    self._placements.pop(model_digest, None)
                    moved.append(self.catalog.manifests[model_digest])
                self._policies["disk"].admit(packed.id, packed.size, self._reload_cost(packed.id, "disk"))
                upload_to = self.cloud.carry_over(segment_id, packed)
                self._may_map.clear()
                self._collect_garbage_locked()  # the old segment goes once its leases end
        finally:
            self._release_disk(packed.size)  # the disk tier counts the file now, or it is gone
        log.info("repacked segment %s without %d tensors of removed models", segment_id[:19], len(orphans))
        if upload_to is not None:
            for manifest in moved:
                self._upload(manifest, upload_to)

    def _packed_copy(self, layout: SegmentLayout, keep: list[SegmentEntry], packed: SegmentLayout) -> Path:
        """A new file laid out as ``packed`` with ``keep``'s tensors, copied from the segment's
        disk copy (staged from the cloud if need be) and checked, as no other tier holds it yet.
        Its room on disk stays reserved: the caller releases it once the file is adopted or gone.
        A damaged disk copy is set aside and the segment fetched again, if another tier has it."""
        for _ in range(_LOADS_OF_A_DAMAGED_SEGMENT):  # each from a copy fetched anew and checked
            self._stage_on_disk(layout, required=True)  # counts as reading it until the finally below
            try:
                self._reserve_disk(packed.size)
                path: Path | None = None
                try:
                    path = ingest.repack(self.disk.path(layout.id), keep, packed, self.catalog.temp_dir())
                    self.disk.verify(packed, path)
                    return path
                except BaseException as exc:
                    self._release_disk(packed.size)
                    if path is not None:
                        path.unlink()
                    if not isinstance(exc, DamagedCopy):
                        raise
                    damaged = DamagedCopy(f"repacking segment {layout.id[:19]} from the disk tier: {exc}")
            finally:
                with self._changed:
                    self._reading[layout.id] -= 1
                    self._settle_locked([layout.id])
            self._drop_damaged(self.disk, layout, damaged)  # raises if no other tier holds the segment
        raise StorageError(f"segment {layout.id[:19]} came out of the disk tier damaged {_LOADS_OF_A_DAMAGED_SEGMENT} "
                           "times while being repacked, each copy fetched anew from the cloud: check the store's disk")

    def _upload(self, manifest: Manifest, base_url: str) -> int:
        """Upload the model's segments the cloud tier lacks under ``base_url``; their bytes."""
        uploaded = 0
        with self._lock:
            segments = [s for s in self._placement(manifest).segments if not self.cloud.has(s)]
            for segment_id in segments:
                self._reading[segment_id] += 1  # keeps the disk copy while it uploads
        try:
            for segment_id in segments:
                layout = self.catalog.segments[segment_id]
                started = self._clock()
                try:
                    self.disk.verify(layout)  # an upload copies the file unchecked: check it here
                except DamagedCopy as damage:
                    self._drop_damaged(self.disk, layout, damage)  # raises: it is not in the cloud yet
                    raise
                self.cloud.upload(layout, self.disk.path(segment_id), base_url)
                self._count_fetch("disk", "cloud", layout.size, self._clock() - started)
                uploaded += layout.size
        finally:
            with self._changed:
                for segment_id in segments:
                    self._reading[segment_id] -= 1
                self._settle_locked(segments)
        return uploaded

    def adopt(self, files: list[FileSource], tenant: Tenant = EVERYONE, *, may_add: bool = True) -> PushResult:
        """Register files by content, for the transparent mode: the model is ``auto/<digest>``.

        Files seen before and unchanged since (same device, inode, size, modification and
        change times) are not read again; a new file is pushed, which needs ``may_add``.
        """
        key = (tenant.name, tuple(f.identity() for f in files))
        with self._lock:
            known = self._adopted.get(key)
            if known is not None and self.catalog.tags.get(adopted_name(tenant.name, known)) == known:
                manifest = self.catalog.manifests[known]
                return PushResult(name=adopted_name(tenant.name, known), digest=known, nbytes=manifest.nbytes,
                                  tensors=len(manifest.tensors), new_bytes=0)
        if not may_add:
            raise PermissionDenied(f"tenant {tenant.name} may not register new files; it needs the push role")
        result = self.push(None, files, tenant=tenant)
        with self._lock:
            self._adopted[key] = result.digest
        return result

    def side_files(self, reference: str, tenant: Tenant = EVERYONE) -> list[tuple[str, Path]]:
        """A model's side files (config, tokenizer, ONNX graph): names and paths in the store."""
        with self._lock:
            _, manifest = self._resolve(reference, tenant)
            return [(label, self.catalog.file_path(d)) for label, d in sorted(manifest.files.items())]

    def remove(self, reference: str, tenant: Tenant = EVERYONE) -> int:
        """Untag a model; delete what no tag needs any more. Returns disk bytes deleted."""
        name = names.canonical(reference)
        with self._changed:
            if name not in self.catalog.tags or not tenant.can_see(name):
                raise ModelNotFound(f"no model named {name}")
            if not tenant.can_push(name):
                raise PermissionDenied(f"tenant {tenant.name} may not remove {name}: it is outside the namespaces it may write")
            self.catalog.remove_tag(name)
            self._may_map.clear()
            freed = self._collect_garbage_locked()
            self._orphans_possible = True
        self._repack_orphans()
        return freed

    def _collect_garbage_locked(self) -> int:
        """Delete what no name needs; a segment still in use goes when its last lease ends."""
        busy = set(self._refs) | set(self._loading) | set(self._staging) | set(+self._reading)
        busy |= {segment for _, segment in [*self._gpu_refs, *self._gpu_loading]}
        freed = 0
        for segment_id in self.catalog.collect_garbage(keep_segments=busy):
            for tier in self._tiers.values():
                if tier.has(segment_id):
                    bytes_out = self._evict_locked(tier, segment_id, "removed")
                    freed += bytes_out if tier is self.disk else 0
        self._doomed = self.catalog.unused_segments()
        self._placements = {d: p for d, p in self._placements.items() if d in self.catalog.manifests}
        return freed

    def _settle_locked(self, segment_ids) -> None:
        """Work on these segments ended (a read, a move, a lease): wake waiters, and collect
        any segment whose model was removed while the work went on."""
        if self._doomed.intersection(segment_ids):
            self._collect_garbage_locked()
        self._changed.notify_all()

    # --- opening, pulling, pinning ------------------------------------------------------------

    def open(self, reference: str, owner: int, tenant: Tenant = EVERYONE, device: int | None = None,
             abandoned: threading.Event | None = None) -> OpenResult:
        """Lease a model's segments in host memory, or in CUDA ``device``'s memory, bringing
        them up the hierarchy if needed. Once ``abandoned`` is set (and :meth:`wake_waiters`
        called), a wait for memory gives up."""
        started = self._clock()
        with self._changed:
            while True:
                name, manifest = self._resolve(reference, tenant)
                placement = self._placement(manifest)
                if len(placement.segments) > MAX_FDS_PER_FRAME:  # stored before pushes were held to fewer
                    raise InvalidModel(f"{name} is spread over {len(placement.segments)} stored segments, more than "
                                       f"one open can hand out ({MAX_FDS_PER_FRAME}): push it again, which stores it "
                                       "in fewer")
                if self._may_map_locked(tenant, manifest, placement):
                    break
                if not self._repacking.intersection(placement.segments):
                    raise PermissionDenied(
                        f"{name} shares storage with models you may not read (the daemon's access config changed "
                        "since it was pushed); ask the operator to remove it (`trims rm`) and push it again")
                self._changed.wait()  # a removed model's tensors are being taken out of its segments
            self._check_lease_quota_locked(tenant, manifest)
        try:
            gpu = None if device is None else self._gpu_tier(device)  # only for a model this tenant may open
            patience = _Patience(started + self.busy_timeout, abandoned)
            if gpu is None:
                segments, missed = self._acquire_all(placement.segments, patience)
            else:
                segments, missed = self._acquire_all_on_gpu(gpu, placement.segments, patience)
            with self._lock:
                lease = next(self._lease_ids)
                self._leases[lease] = _Lease(owner, tenant.name, manifest.digest, manifest.nbytes, placement.segments,
                                             gpu.name if gpu else None)
        finally:
            with self._lock:
                self._opening[(tenant.name, manifest.digest)] -= 1  # the lease (if any) counts from here on
                if not self._opening[(tenant.name, manifest.digest)]:
                    del self._opening[(tenant.name, manifest.digest)]
        self.metrics.inc("trims_opens_total", result="miss" if missed else "hit")
        self.metrics.observe("trims_open_seconds", self._clock() - started)
        return OpenResult(lease, name, manifest, tuple(segments), placement.tensors, device)

    def pull(self, reference: str, tier: str = "host", progress: ProgressCallback | None = None,
             tenant: Tenant = EVERYONE, abandoned: threading.Event | None = None) -> int:
        """Bring a model into ``tier`` without leasing it; returns the bytes that moved.
        ``abandoned`` as for :meth:`open`."""
        device = gpu_device(tier)
        with self._lock:
            _, manifest = self._resolve(reference, tenant)
            segments = self._placement(manifest).segments
            layouts = [self.catalog.segments[s] for s in segments]
        tracker = _Tracker(sum(layout.size for layout in layouts), progress)
        patience = _Patience(self._clock() + self.busy_timeout, abandoned)
        if device is not None:
            gpu = self._gpu_tier(device)
            _, missed = self._acquire_all_on_gpu(gpu, segments, patience)
            with self._changed:
                self._unref_gpu_locked(gpu.name, segments)
            return sum(layout.size for layout in layouts) if missed else 0
        if tier == "host":
            _, missed = self._acquire_all(segments, patience, tracker)
            with self._changed:
                self._unref_locked(segments)
            return sum(layout.size for layout in layouts) if missed else 0
        moved = 0
        for layout in layouts:
            moved += 0 if self.disk.has(layout.id) else layout.size
            self._stage_on_disk(layout, required=True, tracker=tracker)
            with self._changed:
                self._reading[layout.id] -= 1
                self._settle_locked([layout.id])
        return moved

    def pin(self, reference: str, tier: str = "host", progress: ProgressCallback | None = None,
            tenant: Tenant = EVERYONE, abandoned: threading.Event | None = None) -> int:
        """Keep a model in ``tier`` across pressure and restarts; brings it there now.
        ``abandoned`` as for :meth:`open`."""
        device = gpu_device(tier)
        with self._lock:
            self._resolve(reference, tenant)  # a model this tenant may see, before any GPU is set up for it
        tier_obj = self._gpu_tier(device) if device is not None else self._tiers[tier]
        with self._lock:
            name, manifest = self._resolve(reference, tenant)
            current = self.catalog.pins.get(name)
            if current not in (None, tier):  # one pin per model: moving it would silently drop the other
                raise ModelBusy(f"{name} is pinned in {current}; `trims unpin` it first to pin it in {tier}")
            pinned = self._pinned_locked(tier) | set(self._placement(manifest).segments)
            pinned_bytes = sum(tier_obj.footprint(self.catalog.segments[s].size) for s in pinned)
            if pinned_bytes > tier_obj.capacity:
                raise CapacityError(
                    f"pinning {name} would pin {pinned_bytes} bytes in the {tier} tier, more than its capacity "
                    f"({tier_obj.capacity}); unpin something first"
                )
            self.catalog.set_pin(name, tier)  # before the pull: what it brings in must not be evicted meanwhile
        try:
            return self.pull(name, tier, progress, tenant, abandoned)
        except BaseException:
            with self._lock:
                if current is None:
                    self.catalog.remove_pin(name)
            raise

    def unpin(self, reference: str, tenant: Tenant = EVERYONE) -> None:
        with self._changed:
            name, _ = self._resolve(reference, tenant)
            self.catalog.remove_pin(name)
            self._changed.notify_all()

    def warm_pins(self) -> None:
        """Bring every pinned model into its tier (after a restart); failures are logged."""
        for name, tier in list(self.catalog.pins.items()):
            try:
                self.pull(name, tier)
                log.info("re-warmed pinned %s into %s", name, tier)
            except Exception as exc:  # noqa: BLE001 - one bad pin must not stop the others
                log.error("could not re-warm pinned %s into %s: %s", name, tier, exc)

    def _acquire_all(self, segment_ids: tuple[str, ...], patience: _Patience,
                     tracker: _Tracker | None = None) -> tuple[list[HostSegment], bool]:
        return self._acquire_each(segment_ids, lambda s: self._acquire(s, patience, tracker), self._unref_locked)

    def _acquire_all_on_gpu(self, gpu: GpuTier, segment_ids: tuple[str, ...],
                            patience: _Patience) -> tuple[list[GpuSegment], bool]:
        return self._acquire_each(segment_ids, lambda s: self._acquire_on_gpu(gpu, s, patience),
                                  lambda ids: self._unref_gpu_locked(gpu.name, ids))

    def _acquire_each(self, segment_ids: tuple[str, ...], acquire: Callable[[str], tuple[Any, bool]],
                      unref_locked: Callable[[list[str]], None]) -> tuple[list, bool]:
        """Take every segment, or none: a failure lets go of those already taken."""
        acquired: list = []
        missed = False
        try:
            for segment_id in segment_ids:
                segment, loaded = acquire(segment_id)
                acquired.append(segment)
                missed |= loaded
        except BaseException:
            with self._changed:
                unref_locked([s.id for s in acquired])
            raise
        return acquired, missed

    def _acquire(self, segment_id: str, patience: _Patience,
                 tracker: _Tracker | None = None) -> tuple[HostSegment, bool]:
        """Take a reference on a segment in host memory, loading it (once) if it is not."""
        while True:
            with self._changed:
                resident = self.host.get(segment_id)
                if resident is not None:
                    self._refs[segment_id] += 1
                    self._policies["host"].access(segment_id)
                    self.metrics.inc("trims_tier_hits_total", tier="host")
                    return resident, False
                pending = self._loading.get(segment_id)
                if pending is None:
                    layout = self._layout_locked(segment_id)
                    if not self._room_or_wait_locked(self.host, layout.size, patience):
                        continue
                    self._reserved["host"] += layout.size
                    pending = self._loading[segment_id] = Future()
                    self.metrics.inc("trims_tier_misses_total", tier="host")
                    break
            pending.result()  # someone else is loading it: wait, then take a reference
        return self._load_into_host(layout, pending, tracker), True

    def _load_into_host(self, layout: SegmentLayout, pending: Future, tracker: _Tracker | None) -> HostSegment:
        segment_id, started = layout.id, self._clock()
        source: Tier | None = None
        damaged: Tier | None = None
        try:
            for attempt in itertools.count(1):
                source = self._source_for_host(layout, tracker)
                try:
                    self._fill_host(layout, source, tracker)
                    break
                except DamagedCopy as damage:
                    damaged, source = source, None  # that copy is read no more
                    self._drop_damaged(damaged, layout, damage, was_reading=damaged is self.disk)
                    if attempt == _LOADS_OF_A_DAMAGED_SEGMENT:  # each from a copy fetched anew and checked
                        raise StorageError(f"segment {segment_id[:19]} came out of the disk tier damaged {attempt} "
                                           "times, each copy fetched anew from the cloud: check the store's disk") from None
        except BaseException as exc:
            with self._changed:
                self._finish_host_load_locked(layout, source)
                failed = source or damaged
                self.metrics.inc("trims_fetch_failures_total", source=failed.name if failed else "none")
            pending.set_exception(exc)
            raise
        with self._changed:
            # The reference first: a removal of the model meanwhile collects the segment as
            # soon as the load ends, unless a lease holds it.
            self._refs[segment_id] += 1
            self._policies["host"].admit(segment_id, layout.size, self._reload_cost(segment_id, "host"))
            self._finish_host_load_locked(layout, source)
            segment = self.host.get(segment_id)
        self._count_fetch(source.name, "host", layout.size, self._clock() - started)
        pending.set_result(segment)
        return segment

    def _fill_host(self, layout: SegmentLayout, source: Tier, tracker: _Tracker | None) -> None:
        if source is self.cloud:
            self.host.put(layout, lambda fd: self.cloud.fetch(layout, fd, progress=_add(tracker)))
        else:
            self.host.put(layout, lambda fd: source.fetch(layout, fd))

    def _drop_damaged(self, tier: Tier, layout: SegmentLayout, damage: DamagedCopy, was_reading: bool = False) -> None:
        """A copy failed its digests, or is gone: take it out of its tier so that nothing reads
        it again (a disk file is kept in the store's corrupt/, a bucket's objects stay as they
        are). Returns if another tier holds the segment, to be read instead; else raises
        IntegrityError: its bytes are lost until a push of the model writes them anew."""
        with self._changed:
            if was_reading:
                self._reading[layout.id] -= 1
            kept = self.disk.set_aside(layout.id) if tier is self.disk else None
            if tier is self.cloud and self.cloud.has(layout.id):
                self.cloud.forget(layout.id)
            if tier.name in self._policies:
                self._policies[tier.name].forget(layout.id)
            self.metrics.inc("trims_corrupt_copies_total", tier=tier.name)
            elsewhere = self._stored_locked(layout.id)
            self._changed.notify_all()
        where = f"; the file is kept in {kept}" if kept else ""
        if elsewhere:
            log.error("%s%s; reading the segment from another tier instead", damage, where)
            return
        log.error("%s%s; no other tier holds the segment", damage, where)
        raise IntegrityError(f"{damage}. No other tier holds it: push the model again to restore its bytes{where}") from None

    def _finish_host_load_locked(self, layout: SegmentLayout, source: Tier | None) -> None:
        self._reserved["host"] -= layout.size
        del self._loading[layout.id]
        if source is self.disk:
            self._reading[layout.id] -= 1
        self._settle_locked([layout.id])

    def _source_for_host(self, layout: SegmentLayout, tracker: _Tracker | None) -> Tier:
        """The tier to copy a segment from: disk (staging it from the cloud if there is room)."""
        with self._lock:
            if self.disk.has(layout.id):
                self._reading[layout.id] += 1
                self.metrics.inc("trims_tier_hits_total", tier="disk")
                return self.disk
            if not self.cloud.has(layout.id):
                raise IntegrityError(
                    f"no tier holds segment {layout.id[:19]} any more: its bytes are lost; push the model again"
                )
            self.metrics.inc("trims_tier_misses_total", tier="disk")
        try:
            staged = self._stage_on_disk(layout, required=False, tracker=tracker)
        except CloudReadFailed:
            raise  # reading it into memory instead would fail the same way, after as many tries again
        except StorageError as exc:  # the disk is only a cache on this path: a full one must not fail the open
            log.warning("could not stage segment %s on disk (%s); reading it from the cloud into memory", layout.id[:19], exc)
            staged = False
        return self.disk if staged else self.cloud

    def _stage_on_disk(self, layout: SegmentLayout, required: bool, tracker: _Tracker | None = None) -> bool:
        """Fetch a segment from the cloud onto disk (once). True if the disk has it, counted
        as being read; False if there is no room and ``required`` is false."""
        segment_id = layout.id
        while True:
            with self._changed:
                if self.disk.has(segment_id):
                    self._reading[segment_id] += 1
                    return True
                pending = self._staging.get(segment_id)
                if pending is None:
                    try:
                        self._make_room_locked(self.disk, layout.size)
                    except (_NoRoom, CapacityError) as exc:
                        if required:
                            raise CapacityError(self._full_message(self.disk, layout.size)) from exc
                        return False
                    self._reserved["disk"] += layout.size
                    pending = self._staging[segment_id] = Future()
                    break
            pending.result()
        started = self._clock()
        try:
            try:
                self.disk.put(layout, lambda fd: self.cloud.fetch(layout, fd, progress=_add(tracker)))
            except DamagedCopy as damage:
                self._drop_damaged(self.cloud, layout, damage)  # raises: the disk has no copy either
                raise
        except BaseException as exc:
            with self._changed:
                self._reserved["disk"] -= layout.size
                del self._staging[segment_id]
                self._settle_locked([segment_id])
                self.metrics.inc("trims_fetch_failures_total", source="cloud")
            pending.set_exception(exc)
            raise
        with self._changed:
            self._reserved["disk"] -= layout.size
            del self._staging[segment_id]
            self._reading[segment_id] += 1
            self._policies["disk"].admit(segment_id, layout.size, self._reload_cost(segment_id, "disk"))
            self._changed.notify_all()
        self._count_fetch("cloud", "disk", layout.size, self._clock() - started)
        self.metrics.inc("trims_tier_hits_total", tier="cloud")
        pending.set_result(None)
        return True

    # --- the GPU tier: above host memory, filled from it -----------------------------------------

    def gpu_device(self, uuid: str) -> int:
        """The daemon's ordinal of the CUDA device named ``uuid``. Ordinals are each process's
        own (its container's devices, its CUDA_VISIBLE_DEVICES): clients name devices by UUID."""
        self._require_gpu_tier()
        with self._gpu_setup:
            if self._gpu_ordinals is None:
                cuda = self._cuda()
                self._gpu_ordinals = {cuda.device_uuid(d): d for d in range(cuda.device_count())}
        device = self._gpu_ordinals.get(uuid)
        if device is None:
            seen = ", ".join(f"cuda:{d} {u}" for u, d in self._gpu_ordinals.items()) or "none"
            raise GpuError(f"the daemon does not see the GPU {uuid[:64]} (it sees {seen}); give the daemon every GPU "
                           "of the node (NVIDIA_VISIBLE_DEVICES=all in its container, no CUDA_VISIBLE_DEVICES)")
        return device

    def _require_gpu_tier(self) -> None:
        if self.gpu_capacity <= 0:
            raise GpuError("this daemon keeps no models in GPU memory; start it with --gpu-memory SIZE "
                           "(or open the model without a device)")

    def _cuda(self) -> cuda_driver.Driver:
        return (self._gpu_driver or cuda_driver.driver)()

    def _gpu_tier(self, device: int) -> GpuTier:
        """The tier for CUDA ``device``, made on first use; GpuError if there can be none."""
        self._require_gpu_tier()
        with self._gpu_setup:  # one setup at a time; the store's lock stays free meanwhile
            with self._lock:
                tier = self._gpus.get(device)
            if tier is not None:
                return tier
            from .gpu import open_tier

            tier = open_tier(self._cuda(), device, self.gpu_capacity)  # a CUDA context: slow
            with self._lock:
                self._gpus[device] = self._tiers[tier.name] = tier
                self._policies[tier.name] = POLICIES[self.policy_name](self._clock)
            log.info("GPU tier on cuda:%d: %d bytes, shared as %s, read-only mapping %s", device, tier.capacity,
                     tier.capabilities.sharing, "supported" if tier.capabilities.read_only_mapping else "UNSUPPORTED")
            return tier

    def _acquire_on_gpu(self, tier: GpuTier, segment_id: str, patience: _Patience) -> tuple[GpuSegment, bool]:
        """Take a reference on a segment in ``tier``, uploading it (once) from host memory."""
        key = (tier.name, segment_id)
        while True:
            with self._changed:
                resident = tier.get(segment_id)
                if resident is not None:
                    self._gpu_refs[key] += 1
                    self._policies[tier.name].access(segment_id)
                    self.metrics.inc("trims_tier_hits_total", tier=tier.name)
                    return resident, False
                pending = self._gpu_loading.get(key)
                if pending is None:
                    layout = self._layout_locked(segment_id)
                    footprint = tier.footprint(layout.size)
                    if not self._room_or_wait_locked(tier, footprint, patience):
                        continue
                    self._reserved[tier.name] += footprint
                    pending = self._gpu_loading[key] = Future()
                    self.metrics.inc("trims_tier_misses_total", tier=tier.name)
                    break
            try:
                pending.result()
            except _RequesterLeft:
                continue  # its loader's client went away: load it for this one
        return self._load_onto_gpu(tier, layout, footprint, pending, patience), True

    def _load_onto_gpu(self, tier: GpuTier, layout: SegmentLayout, footprint: int, pending: Future,
                       patience: _Patience) -> GpuSegment:
        key, started = (tier.name, layout.id), self._clock()
        try:
            host_segment, _ = self._acquire(layout.id, patience)  # the host copy is held only while it is read
            try:
                tier.put_from(layout, host_segment.fd)
            finally:
                with self._changed:
                    self._unref_locked([layout.id])
        except BaseException as exc:
            with self._changed:
                self._reserved[tier.name] -= footprint
                del self._gpu_loading[key]
                self._settle_locked([layout.id])
                self.metrics.inc("trims_fetch_failures_total", source="host")
            pending.set_exception(exc)
            raise
        with self._changed:
            self._reserved[tier.name] -= footprint
            del self._gpu_loading[key]
            self._gpu_refs[key] += 1
            self._policies[tier.name].admit(layout.id, footprint, self._reload_cost(layout.id, tier.name))
            self._settle_locked([layout.id])
            segment = tier.get(layout.id)
        self._count_fetch("host", tier.name, layout.size, self._clock() - started)
        pending.set_result(segment)
        return segment

    def _unref_gpu_locked(self, tier_name: str, segment_ids) -> None:
        for segment_id in segment_ids:
            key = (tier_name, segment_id)
            self._gpu_refs[key] -= 1
            if self._gpu_refs[key] <= 0:
                del self._gpu_refs[key]
        self._settle_locked(segment_ids)

    # --- leases -------------------------------------------------------------------------------

    def release(self, lease: int, owner: int) -> None:
        """End a lease. Unknown leases (already released) are ignored."""
        with self._changed:
            held = self._leases.get(lease)
            if held is not None and held.owner == owner:
                del self._leases[lease]
                self._end_lease_locked(held)

    def wake_waiters(self) -> None:
        """Have every request waiting for memory look again (one may have been abandoned)."""
        with self._changed:
            self._changed.notify_all()

    def release_owner(self, owner: int) -> int:
        """End every lease of a connection that went away; returns how many."""
        with self._changed:
            mine = [lease for lease, held in self._leases.items() if held.owner == owner]
            for lease in mine:
                self._end_lease_locked(self._leases.pop(lease))
        return len(mine)

    def _end_lease_locked(self, held: _Lease) -> None:
        if held.gpu is None:
            self._unref_locked(held.segments)
        else:
            self._unref_gpu_locked(held.gpu, held.segments)

    def _unref_locked(self, segment_ids) -> None:
        for segment_id in segment_ids:
            self._refs[segment_id] -= 1
            if self._refs[segment_id] <= 0:
                del self._refs[segment_id]
        self._settle_locked(segment_ids)

    def evict(self, reference: str, tenant: Tenant = EVERYONE, tier: str | None = None) -> int:
        """Drop a model from memory: ``tier`` "host" or "gpu:N", or None for host and every
        GPU; it stays on disk or in the cloud. A GPU's copy does not need the host's once made,
        so either can go alone. Returns bytes freed."""
        with self._lock:
            name, manifest = self._resolve(reference, tenant)
            segments = set(self._placement(manifest).segments)
            tiers = self._memory_tiers_locked(tier)
            for held in tiers:
                self._check_evictable_locked(name, held, segments)
            copies = [(held, s) for held in tiers for s in sorted(segments) if held.has(s)]
            return sum(self._evict_locked(held, s, "requested") for held, s in copies)

    def _memory_tiers_locked(self, tier: str | None) -> list[Tier]:
        if tier is None:
            return [self.host, *self._gpus.values()]
        device = gpu_device(tier)
        if device is None and tier != "host":
            raise InvalidName(f"models leave the {tier} tier with `trims rm`; evict takes host or gpu:N")
        if device is None:
            return [self.host]
        if self.gpu_capacity <= 0:
            raise GpuError(f"this daemon keeps no models in GPU memory (no --gpu-memory): {tier} holds nothing to evict")
        return [self._gpus[device]] if device in self._gpus else []  # never used: nothing to drop

    def _check_evictable_locked(self, name: str, tier: Tier, segments: set[str]) -> None:
        """Raises ModelBusy if a lease, an open or a load under way holds the model's segments
        in ``tier``, or the model is pinned there."""
        on_gpu = tier is not self.host
        leases = sum(1 for held in self._leases.values()
                     if held.gpu == (tier.name if on_gpu else None) and segments.intersection(held.segments))
        # the refs also count opens and pulls still under way, which hold no lease yet
        if on_gpu:
            busy = any(self._gpu_refs.get((tier.name, s)) or (tier.name, s) in self._gpu_loading for s in segments)
        else:
            busy = any(self._refs.get(s) or s in self._loading for s in segments)
        if leases or busy:
            raise ModelBusy(f"{name} is in use in the {tier.name} tier ({leases} leases); "
                            "it can leave once they close")
        if segments & self._pinned_locked(tier.name):
            raise ModelBusy(f"{name} is pinned in {tier.name}; `trims unpin` it first")

    # --- accounting: the one place bytes are made room for -------------------------------------

    def _room_or_wait_locked(self, tier: Tier, nbytes: int, patience: _Patience) -> bool:
        """Make room in ``tier``; if everything is in use, wait for a release until the
        deadline, or until nobody waits for the request any more.

        True once there is room; False after a wait (the caller re-checks its state).
        """
        if patience.gave_up():  # room made now would evict others' models for no one
            raise _RequesterLeft(f"no room made in the {tier.name} tier for a request whose client went away")
        try:
            self._make_room_locked(tier, nbytes)
            return True
        except _NoRoom:
            remaining = patience.deadline - self._clock()
            if remaining <= 0:
                waited = f" after waiting {self.busy_timeout:g} s" if self.busy_timeout else ""
                raise CapacityError(self._full_message(tier, nbytes) + waited) from None
            self._waiting_for_room += 1
            try:
                self._changed.wait(remaining)
            finally:
                self._waiting_for_room -= 1
            return False

    def _make_room_locked(self, tier: Tier, nbytes: int) -> None:
        if nbytes > tier.capacity:
            raise CapacityError(
                f"a segment of {nbytes} bytes is larger than the {tier.name} tier's capacity ({tier.capacity} "
                f"bytes); restart the daemon with a larger --{_capacity_flag(tier)}"
            )
        while tier.bytes_used() + self._reserved[tier.name] + nbytes > tier.capacity:
            candidates = [s for s in tier.segment_ids() if self._evictable_locked(tier, s)]
            if not candidates:
                raise _NoRoom()
            self._evict_locked(tier, self._policies[tier.name].victim(candidates), "capacity")

    def _evictable_locked(self, tier: Tier, segment_id: str) -> bool:
        if segment_id in self._pinned_locked(tier.name):
            return False
        if isinstance(tier, GpuTier):
            key = (tier.name, segment_id)
            return not self._gpu_refs.get(key) and key not in self._gpu_loading
        if tier is self.host:  # a load's segment is resident just before the load is accounted for
            return not self._refs.get(segment_id) and segment_id not in self._loading
        return (self.cloud.has(segment_id) and not self._reading.get(segment_id)
                and segment_id not in self._staging)

    def _pinned_locked(self, tier: str) -> set[str]:
        pinned: set[str] = set()
        for name, pin_tier in self.catalog.pins.items():
            manifest = self.catalog.manifests.get(self.catalog.tags.get(name, ""))
            if pin_tier == tier and manifest is not None:
                pinned.update(self._placement(manifest).segments)
        return pinned

    def _evict_locked(self, tier: Tier, segment_id: str, reason: str) -> int:
        freed = tier.evict(segment_id)
        if tier.name in self._policies:
            self._policies[tier.name].forget(segment_id)
        self.metrics.inc("trims_evictions_total", tier=tier.name, reason=reason)
        return freed

    def _full_message(self, tier: Tier, nbytes: int) -> str:
        used = tier.bytes_used() + self._reserved[tier.name]
        if isinstance(tier, GpuTier):
            return (f"GPU memory for models on cuda:{tier.device} is full: {used} of {tier.capacity} bytes are leased, "
                    f"pinned or loading and {nbytes} more are needed; close models you no longer use, unpin some, or "
                    "give the daemon a larger --gpu-memory")
        if tier is self.host:
            return (f"host memory is full: {used} of {tier.capacity} bytes are leased, pinned or loading and "
                    f"{nbytes} more are needed; close models you no longer use, or give the daemon a larger --host-memory")
        return (f"the disk tier is full: {used} of {tier.capacity} bytes hold models the cloud does not, or that are "
                f"pinned or in use, and {nbytes} more are needed; remove models (`trims rm`), push with --to a bucket, "
                "or give the daemon a larger --disk")

    def _reload_cost(self, segment_id: str, tier: str) -> float:
        """Seconds to bring a segment back into ``tier`` from the tier below it."""
        size = self.catalog.segments[segment_id].size
        if tier.startswith("gpu:"):  # from host memory, which may need it from below first
            below = 0.0 if self.host.has(segment_id) else self._reload_cost(segment_id, "host")
            return below + size / self._rates["host"]
        if tier == "host" and self.disk.has(segment_id):
            return size / self._rates["disk"]
        return _CLOUD_LATENCY + size / self._rates["cloud"]

    def _count_fetch(self, source: str, destination: str, nbytes: int, seconds: float) -> None:
        self.metrics.inc("trims_fetch_bytes_total", nbytes, source=source, destination=destination)
        self.metrics.inc("trims_fetch_seconds_total", seconds, source=source, destination=destination)
        self.metrics.inc("trims_fetches_total", source=source, destination=destination)
        if source in self._rates and seconds > 0 and nbytes > 1 << 20:
            self._rates[source] = 0.8 * self._rates[source] + 0.2 * nbytes / seconds

    # --- catalogue views --------------------------------------------------------------------------

    def _resolve(self, reference: str, tenant: Tenant = EVERYONE) -> tuple[str, Manifest]:
        """The model a name (or digest) stands for, if ``tenant`` may see it.

        A model the tenant may not see gets the very same error as one that does not exist.
        """
        name = names.canonical(reference)
        if digests.is_digest(name):
            visible = any(d == name and tenant.can_see(n) for n, d in self.catalog.tags.items())
            model_digest = name if visible else None
        else:
            model_digest = self.catalog.tags.get(name) if tenant.can_see(name) else None
        manifest = self.catalog.manifests.get(model_digest) if model_digest else None
        if manifest is None:
            raise ModelNotFound(f"no model named {name}; `trims ls` lists the models, `trims push` adds one")
        return name, manifest

    def _check_lease_quota_locked(self, tenant: Tenant, manifest: Manifest) -> None:
        """Refuse an open that would take the tenant past its max_leased_bytes, or count the
        model as the tenant's until the open ends (see open), when its lease, if any, counts
        instead. A model it holds or is opening already adds nothing: the same memory, under
        one name or another."""
        key = (tenant.name, manifest.digest)
        if tenant.max_leased_bytes is not None and key not in self._opening:
            held = self._leased_models_locked(tenant.name)
            if manifest.digest not in held:
                total = sum(held.values())
                if total + manifest.nbytes > tenant.max_leased_bytes:
                    raise QuotaExceeded(
                        f"tenant {tenant.name} holds or is opening models of {total} bytes; {manifest.nbytes} more "
                        f"would pass its max_leased_bytes of {tenant.max_leased_bytes}; close models it no longer uses"
                    )
        self._opening[key] += 1

    def _check_push_quota_locked(self, tenant: Tenant, name: str, nbytes: int) -> None:
        """Refuse, or reserve ``nbytes`` of the tenant's quota until the push ends."""
        if tenant.max_pushed_bytes is None:
            return
        pushed = self._pushed_bytes_locked(tenant.name, excluding=name) + self._push_reserved[tenant.name]
        if pushed + nbytes > tenant.max_pushed_bytes:
            raise QuotaExceeded(
                f"tenant {tenant.name} has pushed {pushed} bytes; {nbytes} more would pass its "
                f"max_pushed_bytes of {tenant.max_pushed_bytes}; remove models it no longer needs (`trims rm`)"
            )
        self._push_reserved[tenant.name] += nbytes

    def _release_push_quota_locked(self, tenant: Tenant, nbytes: int) -> None:
        if tenant.max_pushed_bytes is not None:  # committed, the model's tag counts instead
            self._push_reserved[tenant.name] -= nbytes

    def _leased_models_locked(self, tenant: str) -> dict[str, int]:
        """digest -> bytes of each model the tenant holds leases on or is opening, once however
        many, and wherever their copies are (host memory or a GPU's)."""
        held = {lease.model: lease.nbytes for lease in self._leases.values() if lease.tenant == tenant}
        held.update({digest: self.catalog.manifests[digest].nbytes for name, digest in self._opening
                     if name == tenant and digest in self.catalog.manifests})
        return held

    def _leased_bytes_locked(self, tenant: str) -> int:
        return sum(self._leased_models_locked(tenant).values())

    def _pushed_bytes_locked(self, tenant: str, excluding: str = "") -> int:
        manifests = [self.catalog.manifests[self.catalog.tags[n]]
                     for n, owner in self.catalog.owners.items() if owner == tenant and n != excluding]
        return sum(m.nbytes + self.catalog.model_side_bytes(m) for m in manifests)

    def _layout_locked(self, segment_id: str) -> SegmentLayout:
        layout = self.catalog.segments.get(segment_id)
        if layout is None:
            raise ModelNotFound("the model was removed while it was being opened")
        return layout

    def _placement(self, manifest: Manifest) -> _Placement:
        cached = self._placements.get(manifest.digest)
        if cached is None:
            order: dict[str, int] = {}
            tensors = []
            places = self.catalog.placement(manifest)
            for t in manifest.tensors:
                segment_id, offset = places[t.digest]
                index = order.setdefault(segment_id, len(order))
                tensors.append(TensorEntry(t.name, t.dtype, t.shape, index, offset, t.nbytes))
            mine = {t.digest for t in manifest.tensors}
            extras = frozenset(e.digest for s in order for e in self.catalog.extras(s, mine))
            cached = self._placements[manifest.digest] = _Placement(tuple(order), TensorTable.of(tensors), extras)
        return cached

    def list_models(self, tenant: Tenant = EVERYONE) -> list[ModelSummary]:
        with self._lock:
            # Without metadata (info has it): a listing of many models with large metadata
            # (LoRA training notes run to hundreds of KiB) would not fit one reply.
            return [dataclasses.replace(self._summary_locked(name, tenant), metadata={})
                    for name in sorted(self.catalog.tags) if tenant.can_see(name)]

    def info(self, reference: str, tenant: Tenant = EVERYONE) -> ModelSummary:
        with self._lock:
            name, _ = self._resolve(reference, tenant)
            return self._summary_locked(name, tenant)

    def usage(self, tenant: Tenant) -> dict[str, Any]:
        """What a tenant sees of the daemon: its own models, leases and quotas, nobody else's."""
        with self._lock:
            return {
                "tenant": tenant.name,
                "models": sum(1 for n in self.catalog.tags if tenant.can_see(n)),
                "leases": sum(1 for held in self._leases.values() if held.tenant == tenant.name),
                "leased_bytes": self._leased_bytes_locked(tenant.name),
                "pushed_bytes": self._pushed_bytes_locked(tenant.name),
                "max_leased_bytes": tenant.max_leased_bytes,
                "max_pushed_bytes": tenant.max_pushed_bytes,
            }

    def _summary_locked(self, name: str, tenant: Tenant) -> ModelSummary:
        """What ``tenant`` may know of a model: other names for it only if it may see them,
        and only its own leases unless it is an admin."""
        _, manifest = self._resolve(name)
        segments = self._placement(manifest).segments
        return ModelSummary(
            name=name,
            digest=manifest.digest,
            nbytes=manifest.nbytes,
            tensors=len(manifest.tensors),
            tiers=tuple(t for t, tier in self._tiers.items() if all(tier.has(s) for s in segments)),
            leases=sum(1 for held in self._leases.values()
                       if held.model == manifest.digest and (tenant.admin or held.tenant == tenant.name)),
            segments=len(segments),
            dtypes=dict(Counter(t.dtype for t in manifest.tensors)),
            metadata=manifest.metadata,
            files=tuple(sorted(manifest.files)),
            aliases=tuple(n for n, d in sorted(self.catalog.tags.items())
                          if d == manifest.digest and n != name and tenant.can_see(n)),
            pinned=self.catalog.pins.get(name, ""),
        )

    # --- metrics ----------------------------------------------------------------------------------

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe("trims_opens_total", "counter", "Opens, by whether every segment was already in host memory.")
        m.describe("trims_open_seconds", "histogram", "Time to serve an open, fetches included.", OPEN_SECONDS_BUCKETS)
        m.describe("trims_tier_hits_total", "counter", "Segment requests a tier could serve.")
        m.describe("trims_tier_misses_total", "counter", "Segment requests a tier had to pass down.")
        m.describe("trims_fetches_total", "counter", "Segment copies between tiers.")
        m.describe("trims_fetch_bytes_total", "counter", "Bytes copied between tiers.")
        m.describe("trims_fetch_seconds_total", "counter", "Seconds spent copying between tiers.")
        m.describe("trims_fetch_failures_total", "counter", "Segment copies that failed, by source tier.")
        m.describe("trims_evictions_total", "counter", "Segments evicted, by tier and reason.")
        m.describe("trims_corrupt_copies_total", "counter", "Copies that failed their digests, or whose file was gone, dropped from their tier.")
        m.describe("trims_pushes_total", "counter", "Models pushed.")
        m.describe("trims_push_new_bytes_total", "counter", "Bytes pushes added to the store.")
        m.describe("trims_tier_bytes", "gauge", "Bytes a tier holds.")
        m.describe("trims_tier_capacity_bytes", "gauge", "Bytes a tier may hold.")
        m.describe("trims_tier_segments", "gauge", "Segments a tier holds.")
        m.describe("trims_leases", "gauge", "Leases held by clients.")
        m.describe("trims_models", "gauge", "Models in the catalogue.")
        m.describe("trims_waiting_for_room", "gauge", "Requests waiting (--busy-timeout) for a release to free memory.")
        tiers = lambda: list(self._tiers.items())  # noqa: E731 - a GPU tier may join meanwhile
        m.gauge("trims_tier_bytes", lambda: {(("tier", n),): t.bytes_used() for n, t in tiers()})
        m.gauge("trims_tier_capacity_bytes", lambda: {(("tier", n),): t.capacity for n, t in tiers()
                                                      if t.capacity != UNBOUNDED})
        m.gauge("trims_tier_segments", lambda: {(("tier", n),): len(list(t.segment_ids())) for n, t in tiers()})
        m.gauge("trims_leases", lambda: {(): len(self._leases)})
        m.gauge("trims_models", lambda: {(): len(self.catalog.manifests)})
        m.gauge("trims_waiting_for_room", lambda: {(): self._waiting_for_room})

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        with self._lock:
            tiers = {
                name: {
                    "capacity_bytes": None if tier.capacity == UNBOUNDED else tier.capacity,
                    "used_bytes": tier.bytes_used(),
                    "reserved_bytes": self._reserved[name],
                    "segments": len(list(tier.segment_ids())),
                    "hits": m.value("trims_tier_hits_total", tier=name),
                    "misses": m.value("trims_tier_misses_total", tier=name),
                    "evictions": {reason: m.value("trims_evictions_total", tier=name, reason=reason)
                                  for reason in ("capacity", "requested", "removed")
                                  if m.value("trims_evictions_total", tier=name, reason=reason)},
                }
                for name, tier in self._tiers.items()
            }
            tiers["host"].update(huge_pages=self.host.huge_pages, shmem_enabled=self.host.shmem_enabled)
            for gpu in self._gpus.values():
                tiers[gpu.name].update(uuid=gpu.capabilities.uuid, sharing=gpu.capabilities.sharing,
                                       read_only_mapping=gpu.capabilities.read_only_mapping)
            counts = {"models": len(self.catalog.manifests), "tags": len(self.catalog.tags),
                      "pins": len(self.catalog.pins), "leases": len(self._leases),
                      "waiting_for_room": self._waiting_for_room}
        fetches = {}
        for source in TIERS:
            for destination in tiers:
                count = m.value("trims_fetches_total", source=source, destination=destination)
                if count:
                    fetches[f"{source}->{destination}"] = {
                        "count": count,
                        "bytes": m.value("trims_fetch_bytes_total", source=source, destination=destination),
                        "seconds": m.value("trims_fetch_seconds_total", source=source, destination=destination),
                    }
        opens = m.by_label("trims_opens_total", "result")
        return {
            "tiers": tiers,
            "policy": self.policy_name,
            **counts,
            "opens": {"total": sum(opens.values()), "hits": opens.get("hit", 0), "misses": opens.get("miss", 0),
                      "mean_seconds": m.histogram("trims_open_seconds")["mean"]},
            "fetches": fetches,
            "fetch_failures": m.by_label("trims_fetch_failures_total", "source"),
            "corrupt_copies": m.by_label("trims_corrupt_copies_total", "tier"),
            "pushes": {"total": m.value("trims_pushes_total"), "new_bytes": m.value("trims_push_new_bytes_total")},
        }
