"""The store's metadata: names, manifests, segment layouts, side files and pins.

Layout (every file is written to ``tmp/``, fsynced, then renamed into place)::

    <store>/lock                      held (flock) by the one daemon using this store
    <store>/tags.json                 {"resnet50:1": "blake3:…"}: names point at digests
    <store>/pins.json                 {"resnet50:1": "host"}: names kept warm in a tier
    <store>/owners.json               {"resnet50:1": "team-a"}: the tenant charged for a name
    <store>/models/<hex>.json         Manifest, named by the model digest
    <store>/segments/<hex>.json       SegmentLayout, named by the segment id
    <store>/files/<hex>               side files (config.json, tokenizer), by content digest
    <store>/tmp/                      partial writes; emptied at start

Segment bytes belong to the tiers (``disk/``, ``cloud/``), not to the catalogue. A crash at
any point leaves either the old or the new state visible: a segment's bytes land before
its layout, a layout before the manifest that uses it, a manifest before the tag that
names it. What a crash leaves unreferenced is collected at the next start.

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
from typing import Any

from . import digest as digests
from .errors import ConfigError, StorageError
from .records import Manifest, SegmentLayout

log = logging.getLogger("trims.catalog")

FORMAT = "trims-store 1\n"


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd = self._take_lock()
        self.tags: dict[str, str] = {}
        self.manifests: dict[str, Manifest] = {}
        self.segments: dict[str, SegmentLayout] = {}
        self.locations: dict[str, tuple[str, int]] = {}  # tensor digest -> (segment, offset)
        self.pins: dict[str, str] = {}  # name -> tier
        self.owners: dict[str, str] = {}  # name -> the tenant that pushed it
        self._load()

    # --- writes -------------------------------------------------------------------------

    def temp_dir(self) -> Path:
        return self.root / "tmp"

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

    def read_file(self, file_digest: str) -> bytes:
        return self.file_path(file_digest).read_bytes()

    def add_manifest(self, manifest: Manifest) -> None:
        if manifest.digest not in self.manifests:
            self._write_json(self._manifest_path(manifest.digest), manifest.to_json())
            self.manifests[manifest.digest] = manifest

    def set_tag(self, name: str, model_digest: str, owner: str) -> None:
        """Point ``name`` at a model; ``owner`` (a tenant) is charged for it in quotas."""
        owners = {**self.owners, name: owner}
        self._write_json(self.root / "owners.json", owners)
        self.owners = owners
        tags = {**self.tags, name: model_digest}
        self._write_json(self.root / "tags.json", tags)
        self.tags = tags

    def remove_tag(self, name: str) -> None:
        tags = {k: v for k, v in self.tags.items() if k != name}
        self._write_json(self.root / "tags.json", tags)
        self.tags = tags
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
            del self.manifests[model_digest]
        for name in [n for n in self.pins if n not in self.tags]:
            self.remove_pin(name)
        dropped = sorted(self.unused_segments() - keep_segments)
        for segment_id in dropped:
            self._drop_segment(segment_id)
        used_files = {d for m in self.manifests.values() for d in m.files.values()}
        for path in (self.root / "files").iterdir():
            if digests.PREFIX + path.name not in used_files:
                _unlink(path)
        return dropped

    def unused_segments(self) -> set[str]:
        """Segments no manifest draws a tensor from."""
        used = {self.locations[t.digest][0] for m in self.manifests.values() for t in m.tensors}
        return set(self.segments) - used

    def files_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "files").iterdir())

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
        self._load_manifests()
        tags = self._read_json(self.root / "tags.json") or {}
        self.tags = {name: d for name, d in tags.items() if self._usable_tag(name, d)}
        self.pins = {n: t for n, t in (self._read_json(self.root / "pins.json") or {}).items() if n in self.tags}
        self.owners = {n: o for n, o in (self._read_json(self.root / "owners.json") or {}).items() if n in self.tags}

    def _load_segments(self) -> None:
        for path in (self.root / "segments").glob("*.json"):
            try:
                layout = SegmentLayout.from_json(self._read_json(path))
            except (TypeError, KeyError, ValueError) as exc:
                log.error("segment layout %s is unusable and was skipped: %s", path.name, exc)
                continue
            if digests.hex_of(layout.id) != path.stem:
                log.error("segment layout %s does not match its name; skipped", path.name)
                continue
            self._index_segment(layout)

    def _load_manifests(self) -> None:
        for path in (self.root / "models").glob("*.json"):
            try:
                manifest = Manifest.from_json(self._read_json(path))
            except (TypeError, KeyError, ValueError) as exc:
                log.error("model manifest %s is unusable and was skipped: %s", path.name, exc)
                continue
            missing = [t.name for t in manifest.tensors if t.digest not in self.locations]
            if missing:
                log.error("model %s lacks the bytes of %d tensors (e.g. %s); skipped", path.stem, len(missing), missing[0])
                continue
            self.manifests[manifest.digest] = manifest

    def _usable_tag(self, name: str, model_digest: str) -> bool:
        if model_digest in self.manifests:
            return True
        log.error("tag %s points at %s, which the store no longer holds; dropped", name, model_digest)
        return False

    def _index_segment(self, layout: SegmentLayout) -> None:
        self.segments[layout.id] = layout
        for entry in layout.entries:
            self.locations.setdefault(entry.digest, (layout.id, entry.offset))

    def _drop_segment(self, segment_id: str) -> None:
        _unlink(self.root / "segments" / f"{digests.hex_of(segment_id)}.json")
        del self.segments[segment_id]
        self.locations = {d: loc for d, loc in self.locations.items() if loc[0] != segment_id}
        # Another segment may hold a copy of a tensor this one indexed first.
        for layout in self.segments.values():
            for entry in layout.entries:
                self.locations.setdefault(entry.digest, (layout.id, entry.offset))

    def _manifest_path(self, model_digest: str) -> Path:
        return self.root / "models" / f"{digests.hex_of(model_digest)}.json"

    # --- atomic file helpers ---------------------------------------------------------------

    def _read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("%s is unreadable: %s", path, exc)
            return None

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


def storage_error(exc: OSError, doing: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"the store's disk is full while {doing}; free space or move --store")
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
