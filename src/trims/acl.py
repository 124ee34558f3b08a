"""Tenants and what they may do, decided from the kernel's word on who is connecting.

A connection's tenant comes from ``SO_PEERCRED`` (uid, gid) and ``SO_PEERGROUPS``
(supplementary groups), never from anything the client says. A tenant sees, and may open,
only models whose names match one of its namespace patterns (``team-a/*``, ``public/*``,
``*``); to it, every other model does not exist. Writing (push, rm) needs ``push`` or
``admin``; moving models between tiers (evict, pull, pin, unpin) needs ``admin``.

With no tenants configured the daemon is single-user: its own uid (and root) may do
everything, and nobody else may connect.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, PermissionDenied

READ, WRITE, ADMIN = "read", "write", "admin"


@dataclass(frozen=True)
class Tenant:
    name: str
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    namespaces: tuple[str, ...] = ("*",)
    push: bool = False
    admin: bool = False
    max_leased_bytes: int | None = None
    max_pushed_bytes: int | None = None

    def can_see(self, name: str) -> bool:
        """Whether a model name (``NAME:TAG``) lies in one of this tenant's namespaces."""
        bare = name.split(":", 1)[0]
        return any(fnmatch.fnmatchcase(bare, pattern) for pattern in self.namespaces)

    def require(self, right: str, what: str) -> None:
        allowed = {READ: True, WRITE: self.push or self.admin, ADMIN: self.admin}[right]
        if not allowed:
            role = "push or admin" if right == WRITE else "admin"
            raise PermissionDenied(f"tenant {self.name} may not {what}: that needs the {role} role in the daemon's config")


# The daemon's own view, for calls that come from inside it (pinned re-warms) and for
# embedding the store in-process: sees everything, may do everything, no quotas.
EVERYONE = Tenant("daemon", namespaces=("*",), push=True, admin=True)


@dataclass(frozen=True)
class AccessPolicy:
    tenants: tuple[Tenant, ...] = field(default_factory=tuple)

    @classmethod
    def single_user(cls) -> AccessPolicy:
        owner = Tenant("owner", uids=frozenset({os.getuid(), 0}), namespaces=("*",), push=True, admin=True)
        return cls((owner,))

    def tenant_for(self, uid: int, gids: list[int]) -> Tenant:
        """The first tenant whose uids or gids match; PermissionDenied if none does."""
        for tenant in self.tenants:
            if uid in tenant.uids or any(g in tenant.gids for g in gids):
                return tenant
        raise PermissionDenied(
            f"uid {uid} is not a tenant of this trims daemon; ask its operator to add it to the config's [tenants]"
        )


def parse_tenants(table: dict[str, Any], parse_size) -> AccessPolicy:
    """``[tenants.NAME]`` tables of the config file -> an AccessPolicy (in file order)."""
    tenants = []
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"tenants.{name} must be a table")
        unknown = set(spec) - {"uids", "gids", "namespaces", "push", "admin", "max_leased_bytes", "max_pushed_bytes"}
        if unknown:
            raise ConfigError(f"tenants.{name}: unknown setting {sorted(unknown)[0]!r}")
        tenants.append(Tenant(
            name=name,
            uids=frozenset(_ids(spec.get("uids", []), _uid, f"tenants.{name}.uids")),
            gids=frozenset(_ids(spec.get("gids", []), _gid, f"tenants.{name}.gids")),
            namespaces=tuple(_strings(spec.get("namespaces", []), f"tenants.{name}.namespaces")),
            push=bool(spec.get("push", False)),
            admin=bool(spec.get("admin", False)),
            max_leased_bytes=parse_size(spec["max_leased_bytes"]) if "max_leased_bytes" in spec else None,
            max_pushed_bytes=parse_size(spec["max_pushed_bytes"]) if "max_pushed_bytes" in spec else None,
        ))
    return AccessPolicy(tuple(tenants))


def _ids(values: Any, lookup, where: str) -> list[int]:
    if not isinstance(values, list):
        raise ConfigError(f"{where} must be a list")
    return [v if isinstance(v, int) and not isinstance(v, bool) else lookup(v, where) for v in values]


def _uid(name: Any, where: str) -> int:
    try:
        return pwd.getpwnam(str(name)).pw_uid
    except KeyError:
        raise ConfigError(f"{where}: no user named {name!r}") from None


def _gid(name: Any, where: str) -> int:
    try:
        return grp.getgrnam(str(name)).gr_gid
    except KeyError:
        raise ConfigError(f"{where}: no group named {name!r}") from None


def _strings(values: Any, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where} must be a list of strings")
    return values
