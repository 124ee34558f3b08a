"""Which stored segments a model may be read from.

Mapping a segment exposes all of it, so a model may be read from a segment that holds
other tensors ("extras") only if everyone who may read the model may read each extra
through some other model of their own. Then a fine-tune reuses its base's bytes, and one
tenant's model never exposes another's private tensors. With one user (no tenants
configured) everything may be shared. Separately, a segment is reused only if at least half
its bytes are the model's: a small model that shares one tensor with a large one stores that
tensor again rather than mapping (and keeping resident) the large one.

The same test serves a push (may the new model use this segment?) and an open (may this
tenant map the segments recorded for the model, under the config of today?).
"""

from __future__ import annotations

from typing import Callable, Iterable

from .acl import AccessPolicy, Tenant
from .catalog import Catalog
from .records import Manifest


class SharingRule:
    def __init__(self, catalog: Catalog, access: AccessPolicy) -> None:
        self._catalog = catalog
        self._access = access

    def usable_for(self, manifest: Manifest, name: str) -> Callable[[str], bool]:
        """For a push of ``manifest`` as ``name``: whether it may be read from a segment.
        ``name`` counts for the new model only, not for the one it may point at now."""
        mine = {t.digest for t in manifest.tensors}
        names = self._catalog.names_of(manifest.digest) | {name}
        readers = [t for t in self._access.tenants if any(t.can_see(n) for n in names)]
        readable = self._readable(readers, manifest.digest, retagged=name)

        def usable(segment_id: str) -> bool:
            extras = self._catalog.extras(segment_id, mine)
            extra_bytes = sum(e.nbytes for e in extras)
            own_bytes = sum(e.nbytes for e in self._catalog.segments[segment_id].entries) - extra_bytes
            return extra_bytes <= own_bytes and readable(e.digest for e in extras)
        return usable

    def may_map(self, tenant: Tenant, model_digest: str, extras: Iterable[str]) -> bool:
        """Whether ``tenant`` may read each of a model's extras through another model."""
        return self._readable([tenant], model_digest)(extras)

    def _readable(self, readers: list[Tenant], model_digest: str,
                  retagged: str | None = None) -> Callable[[Iterable[str]], bool]:
        """A test: may every one of ``readers`` read each given tensor through some model
        other than ``model_digest``? Tensors no model has any more (their model was removed
        and the segment not yet repacked) are readable by nobody."""
        allowed_by: dict[str, set[str]] = {}  # model -> which readers may read it

        def allowed(holder: str) -> set[str]:
            if holder not in allowed_by:
                names = self._catalog.names_of(holder) - {retagged}
                allowed_by[holder] = {t.name for t in readers if any(t.can_see(n) for n in names)}
            return allowed_by[holder]

        everyone = {t.name for t in readers}

        def readable(extras: Iterable[str]) -> bool:
            for extra in extras:
                may = set()
                for holder in self._catalog.models_with(extra) - {model_digest}:
                    may |= allowed(holder)
                    if may == everyone:
                        break
                if may != everyone:
                    return False
            return True
        return readable
