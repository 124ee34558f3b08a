"""Tenants and what they may do, decided from the kernel's word on who is connecting.

A connection's tenant comes from ``SO_PEERCRED`` (uid, gid) and ``SO_PEERGROUPS``
(supplementary groups), never from anything the client says. A tenant sees, and may open,
only models whose names match one of its namespace patterns (``team-a/*``, ``public/*``,
``*``); to it, every other model does not exist. Writing (push, rm) is allowed where the
tenant's ``push`` patterns (or, for an admin, its namespaces) match; moving models between
tiers (evict, pull, pin, unpin) needs ``admin``. The daemon reads and writes object storage
on a tenant's behalf (``push s3://...``, ``push --to``) with its own credentials, so only
where the tenant's ``buckets`` patterns match (an admin: anywhere); else a tenant could have
the daemon read a bucket it has no access to itself.

With no tenants configured the daemon is single-user: its own uid (and root) may do
everything, and nobody else may connect.
"""

from __future__ import annotations

import fnmatch
import grp
import re
import os
import pwd
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, PermissionDenied

READ, WRITE, ADMIN = "read", "write", "admin"
ANY_ID = -1  # `uids = ["*"]`: every uid
# URL schemes a client may ask the daemon to read or write. Never file:// (the daemon would
# open a path with its own rights: a confused deputy) nor http(s):// (requests to internal hosts).
CLIENT_URL_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")
# What a URL a tenant names may look like: scheme://bucket/key in plain characters. Anything
# else (%-escapes, ?, #, \, whitespace, control characters, ::) is refused, not interpreted:
# each object store's client parses URLs its own way (some drop tabs, some resolve "..").
_PLAIN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[A-Za-z0-9._~@-]+(/[A-Za-z0-9._~@=+,!()*'-]*)*")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._/*?\[\]!-]+")
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it names the tenant's auto/<tenant>/ namespace


@dataclass(frozen=True)
class Tenant:
    name: str
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    namespaces: tuple[str, ...] = ("*",)
    push: tuple[str, ...] = ()  # where it may push and remove
    buckets: tuple[str, ...] = ()  # object storage URLs the daemon may read or write for it
    admin: bool = False
    max_leased_bytes: int | None = None
    max_pushed_bytes: int | None = None
    max_connections: int | None = None  # so that one tenant cannot take every connection

    def matches(self, uid: int, gids: list[int]) -> bool:
        return ANY_ID in self.uids or ANY_ID in self.gids or uid in self.uids or any(g in self.gids for g in gids)

    def can_see(self, name: str) -> bool:
        """Whether a model name (``NAME:TAG``) lies in one of this tenant's namespaces. Under
        ``auto/`` (transparent mode's registrations) a tenant sees its own ``auto/<tenant>/``
        alone, whatever its patterns say (``*`` included); an admin sees them all."""
        bare = name.split(":", 1)[0]
        if bare.startswith("auto/"):
            return bare.startswith(f"auto/{self.name}/") or self.admin
        return any(fnmatch.fnmatchcase(bare, p) for p in self.namespaces)

    def can_push(self, name: str) -> bool:
        """Whether it may push or remove ``name`` (which it must also be able to see)."""
        bare = name.split(":", 1)[0]
        patterns = self.namespaces if self.admin else self.push
        return self.can_see(name) and (bare.startswith(f"auto/{self.name}/") or
                                       any(fnmatch.fnmatchcase(bare, p) for p in patterns))

    def may_reach(self, url: str) -> bool:
        """Whether the daemon may read or write ``url`` in object storage for this tenant:
        a plain URL (:func:`plain_url`) that one of its ``buckets`` patterns matches."""
        return self.admin or (plain_url(url) and any(fnmatch.fnmatchcase(url, p) for p in self.buckets))

    def require(self, right: str, what: str) -> None:
        allowed = {READ: True, WRITE: bool(self.push) or self.admin, ADMIN: self.admin}[right]
        if not allowed:
            role = "push or admin" if right == WRITE else "admin"
            raise PermissionDenied(f"tenant {self.name} may not {what}: that needs the {role} role in the daemon's config")


def plain_url(url: str) -> bool:
    """``scheme://bucket/key`` in plain characters, without ``.`` or ``..`` segments."""
    return bool(_PLAIN_URL.fullmatch(url)) and not {".", ".."} & set(url.split("://", 1)[1].split("/"))


# The daemon's own view, for calls that come from inside it (pinned re-warms) and for
# embedding the store in-process: sees everything, may do everything, no quotas.
EVERYONE = Tenant("daemon", namespaces=("*",), push=("*",), admin=True)


@dataclass(frozen=True)
class AccessPolicy:
    tenants: tuple[Tenant, ...] = field(default_factory=tuple)

    @classmethod
    def single_user(cls) -> AccessPolicy:
        owner = Tenant("owner", uids=frozenset({os.getuid(), 0}), namespaces=("*",), push=("*",), admin=True)
        return cls((owner,))

    def tenant_for(self, uid: int, gids: list[int]) -> Tenant:
        """The first tenant whose uids or gids match; PermissionDenied if none does."""
        for tenant in self.tenants:
            if tenant.matches(uid, gids):
                return tenant
        raise not_a_tenant(uid)


def not_a_tenant(uid: int) -> PermissionDenied:
    return PermissionDenied(
        f"uid {uid} is not a tenant of this trims daemon; ask its operator to add it to the config's [tenants]"
    )


def parse_tenants(table: dict[str, Any], parse_size) -> AccessPolicy:
    """``[tenants.NAME]`` tables of the config file -> an AccessPolicy (in file order)."""
    if not table:  # a [tenants] left empty would leave the node to its owner alone, without a word
        raise ConfigError("[tenants] names no tenant: add [tenants.NAME] tables, or remove it for single-user mode")
    tenants = []
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"tenants.{name} must be a table")
        if not _TENANT_NAME.fullmatch(name):
            raise ConfigError(f"tenant name {name!r}: use letters, digits, '.', '_' and '-'")
        unknown = set(spec) - {"uids", "gids", "namespaces", "push", "buckets", "admin", "max_leased_bytes",
                               "max_pushed_bytes", "max_connections"}
        if unknown:
            raise ConfigError(f"tenants.{name}: unknown setting {sorted(unknown)[0]!r}")
        namespaces = tuple(_name_patterns(spec.get("namespaces", []), f"tenants.{name}.namespaces"))
        push = spec.get("push", False)
        if isinstance(push, bool):  # true: wherever it can see
            push = list(namespaces) if push else []
        tenants.append(Tenant(
            name=name,
            uids=frozenset(_ids(spec.get("uids", []), _uid, f"tenants.{name}.uids")),
            gids=frozenset(_ids(spec.get("gids", []), _gid, f"tenants.{name}.gids")),
            namespaces=namespaces,
            push=tuple(_name_patterns(push, f"tenants.{name}.push")),
            buckets=tuple(_url_patterns(spec.get("buckets", []), f"tenants.{name}.buckets")),
            admin=_boolean(spec.get("admin", False), f"tenants.{name}.admin"),
            max_leased_bytes=_size(spec, "max_leased_bytes", name, parse_size),
            max_pushed_bytes=_size(spec, "max_pushed_bytes", name, parse_size),
            max_connections=_count(spec, "max_connections", name),
        ))
    return AccessPolicy(tuple(tenants))


def _ids(values: Any, lookup, where: str) -> list[int]:
    """Numbers, names, or "*" for any (a catch-all tenant: list it last)."""
    if not isinstance(values, list):
        raise ConfigError(f"{where} must be a list")
    if any(isinstance(v, int) and not isinstance(v, bool) and v < 0 for v in values):
        raise ConfigError(f"{where}: ids are not negative (write \"*\" for any)")
    return [ANY_ID if v == "*" else v if isinstance(v, int) and not isinstance(v, bool) else lookup(v, where)
            for v in values]


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


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):  # "no" would be truthy: refuse anything but true and false
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


def _size(spec: dict[str, Any], key: str, tenant: str, parse_size) -> int | None:
    if key not in spec:
        return None
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"tenants.{tenant}.{key} must be a size like \"16G\"")
    try:
        size = parse_size(value)
    except ConfigError as exc:
        raise ConfigError(f"tenants.{tenant}.{key}: {exc}") from None
    if size < 0:
        raise ConfigError(f"tenants.{tenant}.{key} cannot be negative")
    return size


def _count(spec: dict[str, Any], key: str, tenant: str) -> int | None:
    value = spec.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"tenants.{tenant}.{key} must be a whole number of at least 1, not {value!r}")
    return value


def _url_patterns(values: Any, where: str) -> list[str]:
    """Patterns like ``s3://team-a-models/*``: a scheme, and the bucket spelled out (a bucket
    named by a wildcard would let ``team-a*`` match ``team-attacker``)."""
    patterns = _strings(values, where)
    for pattern in patterns:
        scheme, sep, rest = pattern.partition("://")
        bucket = rest.split("/", 1)[0]
        if not sep or scheme not in CLIENT_URL_SCHEMES or not bucket or any(c in bucket for c in "*?["):
            raise ConfigError(f"{where}: {pattern!r} is not like \"s3://bucket/prefix/*\" (a scheme of "
                              f"{', '.join(CLIENT_URL_SCHEMES)}, a bucket named in full, then a key pattern)")
    return patterns


def _name_patterns(values: Any, where: str) -> list[str]:
    """Patterns of model names (``team-a/*``): a pattern with a character no name may have
    would match nothing, silently."""
    patterns = _strings(values, where)
    for pattern in patterns:
        if not pattern or not _NAME_PATTERN.fullmatch(pattern):
            raise ConfigError(f"{where}: {pattern!r} can match no model name (letters, digits, '.', '_', '-' and "
                              "'/', with the wildcards * ? [ ])")
    return patterns


def _strings(values: Any, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where} must be a list of strings")
    return values
