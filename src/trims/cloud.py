"""The object-storage tier: S3, or anything fsspec reaches (GCS, Azure, HTTP, ...).

The tier records, for each segment it holds, where each tensor's bytes can be read: an
object URL and an offset in it. Two ways in:

- a segment uploaded whole (``trims push PATH --to s3://bucket/prefix``): its tensors sit in
  ``<prefix>/segments/<store>/<id>.bin`` at the segment's own offsets, and the object is the
  tier's to delete (``<store>`` names this daemon's store, so that the daemons of many nodes
  can share one prefix without deleting each other's copies);
- a model registered from a bucket (``trims push s3://bucket/model-dir``): its tensors are
  read straight out of the original safetensors objects, which are never deleted.

A fetch splits every tensor into ranges, reads them with parallel ranged requests (with
retries), writes each straight into the destination at its place, and hashes each tensor
as soon as its last range lands. Credentials and endpoints come from the usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...). Needs the ``s3`` extra (boto3), or fsspec
and its backend for other schemes (:mod:`trims.objects`).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import digest as digests
from . import layout, torch_format
from .catalog import rename_durably
from .disk import new_temp_file
from .errors import CloudReadFailed, IntegrityError, InvalidModel, StorageError
from .ingest import MAX_SIDE_FILE_BYTES
from .objects import Objects
from .records import SegmentLayout
from .sources import Source
from .tier import UNBOUNDED, Fill, Tier
from .verify import Verifier

log = logging.getLogger("trims.cloud")

RANGE_BYTES = 16 * 1024 * 1024
COALESCE_GAP = 64 * 1024  # reading this many bytes more costs less than a round trip
COALESCE_LIMIT = 1024 * 1024  # one read of grouped spans reaches no further than this
_UPLOADS = "/segments/"  # what this daemon uploads lies under <location>/segments/


@dataclass
class RemoteCopy:
    """Where a segment's tensors can be read: tensor digest -> (object URL, offset in it)."""

    size: int
    places: dict[str, tuple[str, int]]
    owned: list[str] = field(default_factory=list)  # objects this daemon uploaded

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "places": {d: list(p) for d, p in self.places.items()}, "owned": self.owned}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RemoteCopy:
        return cls(size=doc["size"], places={d: (u, o) for d, (u, o) in doc["places"].items()}, owned=list(doc["owned"]))


def _store_id(path: Path, temp_dir: Path) -> str:
    """This store's name in the objects it uploads, made once: random, so that two stores
    never take the same."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    fd, temp = tempfile.mkstemp(dir=temp_dir, prefix="store-id-")
    with open(fd, "w") as out:
        out.write(uuid.uuid4().hex)
        out.flush()
        os.fsync(out.fileno())
    rename_durably(Path(temp), path)
    return path.read_text().strip()


class CloudTier(Tier):
    name = "cloud"

    def __init__(self, index_dir: Path, temp_dir: Path, pool: ThreadPoolExecutor, *, default_url: str | None = None,
                 connections: int = 16) -> None:
        super().__init__(UNBOUNDED)
        self._index_dir = index_dir
        self._temp_dir = temp_dir
        self._pool = pool
        self.default_url = default_url
        self._connections = connections
        self.objects = Objects(connections)
        self._copies: dict[str, RemoteCopy] = {}
        index_dir.mkdir(mode=0o700, exist_ok=True)
        self.store_id = _store_id(index_dir / "store-id", temp_dir)

    # --- the index of what the cloud holds ---------------------------------------------------

    def index(self, layouts: dict[str, SegmentLayout]) -> None:
        for path in self._index_dir.glob("*.json"):
            segment_id = digests.PREFIX + path.stem
            try:
                copy = RemoteCopy.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cloud record %s is unusable and was skipped: %s", path.name, exc)
                continue
            if segment_id in layouts:
                self._copies[segment_id] = copy
            else:
                path.unlink()

    def register(self, layout: SegmentLayout, places: dict[str, tuple[str, int]], owned: Iterable[str] = ()) -> None:
        """Record that every tensor of ``layout`` can be read at ``places``."""
        missing = [e.digest for e in layout.entries if e.digest not in places]
        if missing:
            raise ValueError(f"no cloud place for {len(missing)} tensors of {layout.id}")  # a bug in the caller
        copy = RemoteCopy(layout.size, {e.digest: places[e.digest] for e in layout.entries}, list(owned))
        fd, temp = tempfile.mkstemp(dir=self._temp_dir, prefix="cloud-record-")
        with open(fd, "w") as out:
            out.write(json.dumps(copy.to_json()))
            out.flush()
            os.fsync(out.fileno())
        rename_durably(Path(temp), self._index_dir / f"{digests.hex_of(layout.id)}.json")
        self._copies[layout.id] = copy

    def urls(self, segment_id: str) -> list[str]:
        return sorted({url for url, _ in self._copies[segment_id].places.values()})

    # --- the tier ----------------------------------------------------------------------------

    def has(self, segment_id: str) -> bool:
        return segment_id in self._copies

    def segment_ids(self) -> Iterable[str]:
        return list(self._copies)

    def bytes_used(self) -> int:
        return sum(c.size for c in list(self._copies.values()))

    def put(self, layout: SegmentLayout, fill: Fill) -> None:
        """Upload a segment under the daemon's ``--cloud`` location."""
        if self.default_url is None:
            raise StorageError("no cloud location is configured; start the daemon with --cloud s3://bucket/prefix")
        fd, temp = new_temp_file(self._temp_dir, layout.size)
        try:
            try:
                fill(fd)
            finally:
                os.close(fd)
            self.upload(layout, Path(temp), self.default_url)
        finally:
            Path(temp).unlink(missing_ok=True)

    def upload(self, layout: SegmentLayout, path: Path, base_url: str) -> None:
        """Upload a complete local copy of a segment to ``<base_url>/segments/<store>/<id>.bin``."""
        url = f"{base_url.rstrip('/')}{_UPLOADS}{self.store_id}/{digests.hex_of(layout.id)}.bin"
        self.objects.upload(path, url)
        self.register(layout, {e.digest: (url, e.offset) for e in layout.entries}, owned=[url])

    def carry_over(self, segment_id: str, part: SegmentLayout) -> str | None:
        """A segment's tensors are being repacked into ``part``: if they were read from a
        bucket's own objects (a model pushed from it), ``part`` is read from the same ones and
        None is returned; if this daemon uploaded the segment, the location ``part`` should be
        uploaded to (its copy goes with the segment); with no copy, the daemon's ``--cloud``."""
        copy = self._copies.get(segment_id)
        if copy is None:
            return self.default_url
        if copy.owned:
            return copy.owned[0].rsplit(_UPLOADS, 1)[0]
        self.register(part, copy.places)
        return None

    def fetch(self, layout: SegmentLayout, destination: int, progress: Callable[[int], None] | None = None) -> None:
        copy = self._copies.get(layout.id)
        if copy is None:
            raise IntegrityError(f"the cloud tier holds no copy of segment {layout.id[:19]}")
        ranges, pending = self._ranges(layout, copy)
        target = mmap.mmap(destination, layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            with Verifier(destination, layout, self._pool, source=f"the cloud ({self.urls(layout.id)[0]})") as verifier:
                with ThreadPoolExecutor(self._connections, thread_name_prefix="trims-cloud") as io:
                    futures = [io.submit(self._read_range, target, *r) for r in ranges]
                    try:
                        for future in as_completed(futures):
                            entries, nbytes = future.result()
                            if progress is not None:
                                progress(nbytes)
                            for entry in entries:
                                pending[entry] -= 1
                                if pending[entry] == 0:
                                    verifier.landed(entry)
                    finally:
                        for future in futures:
                            future.cancel()
                verifier.finish()
        except StorageError as exc:
            raise CloudReadFailed(str(exc)) from None
        finally:
            target.close()  # before the host tier seals the memfd: no writable mapping may remain

    def evict(self, segment_id: str) -> int:
        """Forget the segment; the objects this daemon uploaded for it are deleted in the
        background (the store calls this under its lock, and a delete may wait on the network)."""
        copy = self.forget(segment_id)
        # Objects uploaded before uploads were named by store may be another node's too: left.
        ours = [url for url in copy.owned if f"{_UPLOADS}{self.store_id}/" in url]
        if ours:
            self._pool.submit(self._delete, ours)
        return copy.size

    def forget(self, segment_id: str) -> RemoteCopy:
        """Drop the record of a copy, leaving its objects as they are: one that failed its
        digests (overwritten in the bucket, say) is no copy, and a push of the model uploads
        or registers a good one."""
        copy = self._copies.pop(segment_id)
        (self._index_dir / f"{digests.hex_of(segment_id)}.json").unlink(missing_ok=True)
        return copy

    def _delete(self, urls: list[str]) -> None:
        for url in urls:
            try:
                self.objects.delete(url)
            except StorageError as exc:  # a leftover object is garbage, not a failure
                log.warning("could not delete %s: %s", url, exc)

    # --- ranged reads --------------------------------------------------------------------------

    @staticmethod
    def _ranges(layout: SegmentLayout, copy: RemoteCopy):
        """The ranged reads for a fetch, and how many of them each tensor waits for.

        Neighbouring tensors that sit the same way in the object as in the segment (same
        offset difference: every tensor of an uploaded segment, most of a safetensors file)
        share one read of up to RANGE_BYTES; larger tensors are split into several.
        """
        ranges: list[list] = []  # [url, object start, destination offset, length, entries]
        pending = {entry: 1 for entry in layout.entries}
        empty = [["", 0, 0, 0, [e]] for e in layout.entries if not e.nbytes]  # nothing to read
        for entry in sorted((e for e in layout.entries if e.nbytes), key=lambda e: copy.places[e.digest]):
            url, start = copy.places[entry.digest]
            last = ranges[-1] if ranges else None
            gap = start - (last[1] + last[3]) if last is not None else -1
            if (last is not None and last[0] == url and start - entry.offset == last[1] - last[2]
                    and (gap == 0 or (gap > 0 and url in copy.owned))  # our own objects pad with zeros
                    and start + entry.nbytes - last[1] <= RANGE_BYTES):
                last[3] = start + entry.nbytes - last[1]
                last[4].append(entry)
                continue
            chunks = [(k, min(RANGE_BYTES, entry.nbytes - k)) for k in range(0, entry.nbytes, RANGE_BYTES)]
            ranges += [[url, start + k, entry.offset + k, length, [entry]] for k, length in chunks]
            pending[entry] = len(chunks)
        return ranges + empty, pending

    def _read_range(self, target: mmap.mmap, url: str, start: int, offset: int, length: int, entries: list):
        failure = None
        if length:
            with memoryview(target)[offset : offset + length] as view:
                try:
                    self.objects.read_into(url, start, view)
                except Exception as exc:  # noqa: BLE001 - raised again below, bare
                    # Without its traceback and the errors it came from: their frames hold slices
                    # of ``view``, and the mapping cannot be closed while any is alive.
                    failure = exc.with_traceback(None)
                    failure.__context__ = failure.__cause__ = None
        if failure is not None:
            raise failure
        return entries, length



class RemoteFile(Source):
    """An object in a bucket, read with ranged requests, as a file of a model being pushed."""

    def __init__(self, label: str, url: str, objects: Objects) -> None:
        self.label = label
        self.url = url
        self._objects = objects
        self._size: int | None = None
        self._version: str | None = None
        self.parallel_reads = objects.connections  # each request waits a round trip, not a CPU

    def size(self) -> int:
        if self._size is None:
            self._size, self._version = self._objects.head(self.url)
        return self._size

    def read_into(self, offset: int, view: memoryview) -> int:
        """Bytes of the object as it was when first sized: a push reads the header, then the
        tensors, and an object replaced in between must fail it, not splice the two."""
        count = max(0, min(len(view), self.size() - offset))
        if count:
            self._objects.read_into(self.url, offset, view[:count], self._version)
        return count

    def read_many(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """Each span's bytes, with requests in flight together: a request costs a round trip,
        so spans less than COALESCE_GAP apart share one (a checkpoint's local headers, one per
        record, lie between small tensors as often as between large ones)."""
        groups = _coalesced(sorted(set(spans)))

        def read_group(group: list[tuple[int, int]]) -> list[bytes]:
            start = group[0][0]
            block = self.read(start, max(offset + count for offset, count in group) - start)
            return [block[offset - start : offset - start + count] for offset, count in group]

        found: dict[tuple[int, int], bytes] = {}
        with ThreadPoolExecutor(min(self.parallel_reads, max(1, len(groups))), thread_name_prefix="trims-push") as io:
            for group, pieces in zip(groups, io.map(read_group, groups)):
                found.update(zip(group, pieces))
        return [found[span] for span in spans]


def _coalesced(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Sorted spans grouped into one read each wherever the bytes between them are few."""
    groups: list[list[tuple[int, int]]] = []
    end = 0  # where the last group's bytes end
    for offset, count in spans:
        if groups and offset - end <= COALESCE_GAP and offset + count - groups[-1][0][0] <= COALESCE_LIMIT:
            groups[-1].append((offset, count))
            end = max(end, offset + count)
        else:
            groups.append([(offset, count)])
            end = offset + count
    return groups


def remote_model_files(url: str, objects: Objects) -> list[RemoteFile]:
    """The files of a model in a bucket: one ``.safetensors`` object or PyTorch checkpoint, or
    a "directory" of them with its side files (config, tokenizer), chosen as a local one is."""
    if url.endswith((".safetensors", *torch_format.PUSHABLE)):
        return [RemoteFile(url.rsplit("/", 1)[-1], url, objects)]
    names = objects.list(url)  # a StorageError (no credentials, say) is the storage's, not the model's
    base = url.rstrip("/")
    chosen = layout.files_of_directory(names, lambda index: _read_index(RemoteFile(index, f"{base}/{index}", objects)), base)
    return [RemoteFile(name, f"{base}/{name}", objects) for name in chosen]


def _read_index(index: RemoteFile) -> bytes:
    # The bucket is not the daemon's: an index the size of a model is read no further than a side file.
    size = index.size()
    if size > MAX_SIDE_FILE_BYTES:
        raise InvalidModel(f"{index.url}: {size} bytes is more than a safetensors index may have ({MAX_SIDE_FILE_BYTES})")
    return index.read(0, size)
