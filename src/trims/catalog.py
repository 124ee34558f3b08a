"""The store's metadata: names, manifests, segment layouts, side files and pins.

Layout (every file is written to ``tmp/``, fsynced, then renamed into place)::

    <store>/lock                      held (flock) by the one daemon using this store
    <store>/tags.json                 {"resnet50:1": "blake3:…"}: names point at digests
    <store>/pins.json                 {"resnet50:1": "host"}: names kept warm in a tier
    <store>/owners.json               {"resnet50:1": "team-a"}: the tenant charged for a name
    <store>/uses.json                 {"blake3:…": ["blake3:…", …]}: the segments each model is read from
    <store>/models/<hex>.json         Manifest, named by the model digest
    <store>/segments/<hex>.json       SegmentLayout, named by the segment id
    <store>/files/<hex>               side files (config.json, tokenizer), by content digest
    <store>/tmp/                      partial writes; emptied at start

Segment bytes belong to the tiers (``disk/``, ``cloud/``), not to the catalogue. A crash at
any point leaves either the old or the new state visible: a segment's bytes land before
its layout, a layout before the model's ``uses`` entry, that before the manifest, and a
manifest before the tag that names it. What a crash leaves unreferenced is collected at the next start.

Not thread-safe: the store serialises every call.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import digest as digests
from .errors import ConfigError, DiskFull, StorageError
from .records import Manifest, SegmentEntry, SegmentLayout

log = logging.getLogger("trims.catalog")

FORMAT = "trims-store 1\n"
# Each segment of a model is one descriptor in an open's reply (one frame carries at most 250)
# and one mapping in every process that opens it.
MAX_SEGMENTS_PER_MODEL = 64


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd = self._take_lock()
        self.tags: dict[str, str] = {}
        self.manifests: dict[str, Manifest] = {}
        self.segments: dict[str, SegmentLayout] = {}
        self._holders: dict[str, list[str]] = {}  # tensor digest -> segments holding its bytes
        self._models_of: dict[str, set[str]] = {}  # tensor digest -> models that have it
        self._names: dict[str, set[str]] = {}  # model digest -> the names pointing at it
        self.uses: dict[str, tuple[str, ...]] = {}  # model digest -> the segments its tensors are read from
        self.pins: dict[str, str] = {}  # name -> tier
        self.owners: dict[str, str] = {}  # name -> the tenant that pushed it
        self._file_sizes: dict[str, int] = {}  # side file digest -> its bytes
        try:
            self._load()
        except BaseException:
            self.close()  # the lock too: the caller may mend the store and open it again
            raise

    # --- writes -------------------------------------------------------------------------

    def temp_dir(self) -> Path:
        return self.root / "tmp"

    def corrupt_dir(self) -> Path:
        """Where segment files that failed their digests are kept (made when one does)."""
        return self.root / "corrupt"

    def add_segment(self, layout: SegmentLayout) -> None:
        """Record a segment whose bytes a tier already holds."""
        if layout.id not in self.segments:
            self._write_json(self.root / "segments" / f"{digests.hex_of(layout.id)}.json", layout.to_json())
            self._index_segment(layout)

    def file_path(self, file_digest: str) -> Path:
        return self.root / "files" / digests.hex_of(file_digest)

    def add_file(self, file_digest: str, data: bytes) -> None:
        if not self.file_path(file_digest).exists():
            self._write_bytes(self.file_path(file_digest), data)
        self._file_sizes[file_digest] = len(data)

    def side_bytes(self) -> int:
        """What the side files take on the store's disk (with the segments, the disk tier's)."""
        return sum(list(self._file_sizes.values()))  # a snapshot: read outside the store lock too

    def new_side_bytes(self, sizes: dict[str, int]) -> int:
        """What of these side files (content digest -> bytes) the store does not hold yet."""
        return sum(nbytes for digest, nbytes in sizes.items() if digest not in self._file_sizes)

    def model_side_bytes(self, manifest: Manifest) -> int:
        return sum(self._file_sizes.get(d, 0) for d in set(manifest.files.values()))

    def read_file(self, file_digest: str) -> bytes:
        return self.file_path(file_digest).read_bytes()

    def add_manifest(self, manifest: Manifest, uses: tuple[str, ...]) -> bool:
        """Record a model, read from the segments ``uses`` (see :meth:`choose_segments`).
        True if it was known and read from other segments until now."""
        moved = self.uses.get(manifest.digest) not in (None, uses)
        if self.uses.get(manifest.digest) != uses:
            self._set_uses({**self.uses, manifest.digest: uses})
        if manifest.digest not in self.manifests:
            self._write_json(self._manifest_path(manifest.digest), manifest.to_json())
            self._index_manifest(manifest)
        return moved

    def replace_segment(self, old: str, new: SegmentLayout) -> list[str]:
        """Read every model that uses segment ``old`` from ``new`` instead (which must hold
        all their tensors); returns those models."""
        self.add_segment(new)
        moved = [d for d, segments in self.uses.items() if old in segments]
        self._set_uses({d: tuple(new.id if s == old else s for s in segments) if d in moved else segments
                        for d, segments in self.uses.items()})
        return moved

    def names_of(self, model_digest: str) -> set[str]:
        return self._names.get(model_digest, set())

    def set_tag(self, name: str, model_digest: str, owner: str) -> None:
        """Point ``name`` at a model; ``owner`` (a tenant) is charged for it in quotas."""
        owners = {**self.owners, name: owner}
        tags = {**self.tags, name: model_digest}
        self._write_json(self.root / "owners.json", owners)  # an owner without its tag is dropped at load
        self._write_json(self.root / "tags.json", tags)
        self.owners = owners  # in memory only once both are on disk: every owner's name has a tag
        self._set_tags(tags)

    def remove_tag(self, name: str) -> None:
        tags = {k: v for k, v in self.tags.items() if k != name}
        self._write_json(self.root / "tags.json", tags)
        self._set_tags(tags)
        self.owners = {k: v for k, v in self.owners.items() if k in tags}
        self._write_json(self.root / "owners.json", self.owners)

    def set_pin(self, name: str, tier: str) -> None:
        pins = {**self.pins, name: tier}
        self._write_json(self.root / "pins.json", pins)
        self.pins = pins

    def remove_pin(self, name: str) -> None:
        if name in self.pins:
            pins = {k: v for k, v in self.pins.items() if k != name}
            self._write_json(self.root / "pins.json", pins)
            self.pins = pins

    def collect_garbage(self, keep_segments: set[str]) -> list[str]:
        """Forget models no tag names, then segments and files no model uses.

        Returns the segments forgotten: their bytes are the tiers' to delete. ``keep_segments``
        (segments still leased) are kept until a later collection.
        """
        tagged = set(self.tags.values())
        for model_digest in [d for d in self.manifests if d not in tagged]:
            _unlink(self._manifest_path(model_digest))
            for digest in {t.digest for t in self.manifests.pop(model_digest).tensors}:
                self._models_of[digest].discard(model_digest)
                if not self._models_of[digest]:
                    del self._models_of[digest]
        if set(self.uses) - set(self.manifests):
            self._set_uses({d: s for d, s in self.uses.items() if d in self.manifests})
        for name in [n for n in self.pins if n not in self.tags]:
            self.remove_pin(name)
        dropped = sorted(self.unused_segments() - keep_segments)
        for segment_id in dropped:
            self._drop_segment(segment_id)
        used_files = {d for m in self.manifests.values() for d in m.files.values()}
        for path in (self.root / "files").iterdir():
            if digests.PREFIX + path.name not in used_files:
                _unlink(path)
                self._file_sizes.pop(digests.PREFIX + path.name, None)
        return dropped

    def unused_segments(self) -> set[str]:
        """Segments no model is read from."""
        return set(self.segments) - {s for d in self.manifests for s in self.uses[d]}

    def extras(self, segment_id: str, mine: set[str]) -> list[SegmentEntry]:
        """Tensors in a segment that are not among a model's (``mine``, its tensor digests):
        whoever maps the segment to read the model can read these too."""
        return [e for e in self.segments[segment_id].entries if e.digest not in mine]

    def orphans_in_use(self) -> dict[str, set[str]]:
        """Segments some model is read from that hold tensors no model has any more (their
        model was removed or re-tagged): segment -> those tensors."""
        found: dict[str, set[str]] = {}
        for segment_id in {s for segments in self.uses.values() for s in segments}:
            orphans = {e.digest for e in self.segments[segment_id].entries if not self._models_of.get(e.digest)}
            if orphans:
                found[segment_id] = orphans
        return found

    def models_with(self, tensor_digest: str) -> set[str]:
        return self._models_of.get(tensor_digest, set())

    def covered(self, manifest: Manifest, usable: Callable[[str], bool]) -> set[str]:
        """Which of a model's tensors already lie in segments it may be read from; none if
        reading them there would spread the model over more than MAX_SEGMENTS_PER_MODEL
        segments (one more for its new tensors): it is then stored anew, in one."""
        reused = self._greedy_cover(manifest, usable)
        held = set().union(*reused.values())
        needed = len(reused) + (held != {t.digest for t in manifest.tensors})
        return held if needed <= MAX_SEGMENTS_PER_MODEL else set()

    def choose_segments(self, manifest: Manifest, usable: Callable[[str], bool]) -> tuple[str, ...] | None:
        """Few segments, among those ``usable``, that hold every tensor of the model; None if
        some tensor is in none."""
        chosen = self._greedy_cover(manifest, usable)
        covered = set().union(*chosen.values())
        return tuple(chosen) if covered == {t.digest for t in manifest.tensors} else None

    def _greedy_cover(self, manifest: Manifest, usable: Callable[[str], bool]) -> dict[str, set[str]]:
        """Usable segments holding the model's tensors, the one with most of its bytes first,
        each with the tensors it is chosen for, until no segment adds one."""
        sizes = {t.digest: t.nbytes for t in manifest.tensors}
        todo = set(sizes)
        chosen: dict[str, set[str]] = {}
        held = {s: {e.digest for e in self.segments[s].entries} & todo
                for s in self._candidates(manifest) if usable(s)}
        while todo:
            best = max(sorted(held), key=lambda s: sum(sizes[d] for d in held[s] & todo), default=None)
            if best is None or not held[best] & todo:
                break
            chosen[best] = held.pop(best) & todo
            todo -= chosen[best]
        return chosen

    def placement(self, manifest: Manifest) -> dict[str, tuple[str, int]] | None:
        """Where each of a model's tensors is read: digest -> (segment, offset), from the
        segments recorded for it; None if one of those is gone or lacks a tensor."""
        places: dict[str, tuple[str, int]] = {}
        for segment_id in self.uses.get(manifest.digest, ()):
            layout = self.segments.get(segment_id)
            if layout is None:
                return None
            for entry in layout.entries:
                places.setdefault(entry.digest, (segment_id, entry.offset))
        return places if all(t.digest in places for t in manifest.tensors) else None

    def _candidates(self, manifest: Manifest) -> list[str]:
        return sorted({s for t in manifest.tensors for s in self._holders.get(t.digest, ())})

    # --- loading ------------------------------------------------------------------------

    def _take_lock(self) -> int:
        for sub in ("models", "segments", "files", "tmp"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another trims daemon is using the store {self.root}; stop it or pass "
                "--store with another directory"
            ) from None
        return fd

    def close(self) -> None:
        os.close(self._lock_fd)

    def _load(self) -> None:
        format_file = self.root / "format"
        if format_file.exists() and format_file.read_text() != FORMAT:
            raise ConfigError(f"{self.root} holds a store of another format: {format_file.read_text()!r}")
        if not format_file.exists():
            self._write_bytes(format_file, FORMAT.encode())
        shutil.rmtree(self.temp_dir())
        self.temp_dir().mkdir(mode=0o700)
        self._load_segments()
        self._file_sizes = {digests.PREFIX + p.name: p.stat().st_size for p in (self.root / "files").iterdir()}
        self.uses = self._read_uses()
        self._load_manifests()
        tags = self._read_json(self.root / "tags.json", dict, "every name") or {}
        self._set_tags({name: d for name, d in tags.items() if self._usable_tag(name, d)})
        pins = self._read_lost_if_damaged("pins.json", "no model is pinned")
        self.pins = {n: t for n, t in pins.items() if n in self.tags}
        owners = self._read_lost_if_damaged("owners.json", "quotas charge no tenant for what it pushed")
        self.owners = {n: o for n, o in owners.items() if n in self.tags}

    def _load_segments(self) -> None:
        for path in (self.root / "segments").glob("*.json"):
            layout = self._read_json(path, SegmentLayout.from_json, "the models stored in that segment")
            if digests.hex_of(layout.id) != path.stem:
                raise self._damaged(path, "it describes another segment than its name says",
                                    "the models stored in that segment")
            self._index_segment(layout)

    def _load_manifests(self) -> None:
        for path in (self.root / "models").glob("*.json"):
            manifest = self._read_json(path, Manifest.from_json, "that model and its names")
            if manifest.digest not in self.uses:  # a store from before uses.json: any segment holding its tensors
                self.uses[manifest.digest] = self.choose_segments(manifest, lambda s: True) or ()
            if self.placement(manifest) is None:
                log.error("model %s lacks the bytes of some of its %d tensors; skipped", path.stem, len(manifest.tensors))
                continue
            self._index_manifest(manifest)

    def _usable_tag(self, name: str, model_digest: str) -> bool:
        if model_digest in self.manifests:
            return True
        log.error("tag %s points at %s, which the store no longer holds; dropped", name, model_digest)
        return False

    def _index_segment(self, layout: SegmentLayout) -> None:
        self.segments[layout.id] = layout
        for digest in {e.digest for e in layout.entries}:
            self._holders.setdefault(digest, []).append(layout.id)

    def _read_uses(self) -> dict[str, tuple[str, ...]]:
        path = self.root / "uses.json"
        if not path.exists():
            return {}
        try:
            return {d: tuple(segments) for d, segments in json.loads(path.read_bytes()).items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Guessing could widen what a model exposes, and dropping models loses data.
            raise ConfigError(f"{path} is unreadable ({exc}); restore it from a backup of the store") from None

    def _set_uses(self, uses: dict[str, tuple[str, ...]]) -> None:
        self._write_json(self.root / "uses.json", {d: list(segments) for d, segments in uses.items()})
        self.uses = uses

    def _set_tags(self, tags: dict[str, str]) -> None:
        self.tags = tags
        self._names = {}
        for name, model_digest in tags.items():
            self._names.setdefault(model_digest, set()).add(name)

    def _index_manifest(self, manifest: Manifest) -> None:
        self.manifests[manifest.digest] = manifest
        for tensor in manifest.tensors:
            self._models_of.setdefault(tensor.digest, set()).add(manifest.digest)

    def _drop_segment(self, segment_id: str) -> None:
        _unlink(self.root / "segments" / f"{digests.hex_of(segment_id)}.json")
        for digest in {e.digest for e in self.segments.pop(segment_id).entries}:
            self._holders[digest].remove(segment_id)
            if not self._holders[digest]:
                del self._holders[digest]

    def _manifest_path(self, model_digest: str) -> Path:
        return self.root / "models" / f"{digests.hex_of(model_digest)}.json"

    # --- atomic file helpers ---------------------------------------------------------------

    def _read_json(self, path: Path, parse: Callable[[Any], Any], losing: str) -> Any:
        """``parse`` of the JSON in ``path``; None if there is no such file. A file that is
        there but unusable stops the start: going on without it would collect ``losing``
        as garbage."""
        try:
            return _parsed(path, parse)
        except ValueError as exc:
            raise self._damaged(path, str(exc), losing) from None

    def _read_lost_if_damaged(self, name: str, meaning: str) -> dict:
        """A record whose loss deletes nothing (pins, quota owners): damaged, it is said and
        started without."""
        try:
            return _parsed(self.root / name, dict) or {}
        except ValueError as exc:
            log.error("the store's %s cannot be used (%s); starting without it: %s until set again", name, exc, meaning)
            return {}

    def _damaged(self, path: Path, why: str, losing: str) -> ConfigError:
        return ConfigError(f"the store's {path.relative_to(self.root)} cannot be used: {why}. The daemon does not "
                           f"start without it, since it would delete {losing} as garbage: restore it from a backup "
                           f"of the store, or, to give up {losing} for good, move it out of {self.root}")

    def _write_json(self, path: Path, doc: Any) -> None:
        self._write_bytes(path, json.dumps(doc, separators=(",", ":")).encode())

    def _write_bytes(self, path: Path, data: bytes) -> None:
        fd, temp = tempfile.mkstemp(dir=self.temp_dir(), prefix=path.name)
        try:
            with open(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            rename_durably(Path(temp), path)
        except OSError as exc:
            _unlink(Path(temp))
            raise storage_error(exc, f"writing {path.name}") from None


def _parsed(path: Path, parse: Callable[[Any], Any]) -> Any:
    """``parse`` of the JSON in ``path``, None if there is none; ValueError saying what is wrong."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"it is unreadable ({exc})") from None
    try:
        return parse(doc)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ValueError(f"it does not hold what it should ({type(exc).__name__}: {exc})") from None


def storage_error(exc: OSError, doing: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"the store's disk is full while {doing}; free space or move --store")
    return StorageError(f"store I/O failed while {doing}: {exc.strerror or exc}")


def rename_durably(source: Path, target: Path) -> None:
    os.replace(source, target)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
