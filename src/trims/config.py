"""Where the daemon listens and keeps its store, how much it may hold: defaults and parsing.

Every client finds the daemon through ``TRIMS_SOCKET`` when it is set, else the default
socket path; the daemon uses the same rule, so the two agree without configuration.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .acl import AccessPolicy, parse_tenants
from .errors import ConfigError, DaemonUnavailable
from .objects import location_problem
from .policy import POLICIES

SOCKET_ENV = "TRIMS_SOCKET"
STORE_ENV = "TRIMS_STORE"
HOST_MEMORY_ENV = "TRIMS_HOST_MEMORY"
CONFIG_ENV = "TRIMS_CONFIG"
NODE_CONFIG_FILE = Path("/etc/trims/trims.toml")
UNBOUNDED = 2**63 - 1

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str | int) -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"4G"``, ``"1.5GiB"`` or ``"2GB"``.

    ``K/M/G/T``, ``Ki/Mi/…`` and ``KiB/MiB/…`` are powers of 1024; ``KB/MB/GB/TB`` are
    powers of 1000, as in SI.
    """
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size; write bytes or e.g. 512M, 4G, 1.5GiB")
    number, unit, binary, byte_suffix = match.groups()
    unit = unit.upper()
    if binary and not unit:
        raise ConfigError(f"{text!r} is not a size; write bytes or e.g. 512M, 4G, 1.5GiB")
    base = 1000 if (byte_suffix and unit and not binary) else 1024
    return int(float(number) * base ** _POWERS[unit])


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def default_socket_path() -> Path:
    """``$TRIMS_SOCKET``, else the config file's ``socket`` (the daemon's, where it is the
    node's: ``/etc/trims/trims.toml``), else a per-user runtime directory."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    return _configured_socket() or _runtime_dir() / "trims.sock"


def _configured_socket() -> Path | None:
    path = default_config_file()
    if path is None:
        return None
    try:
        return _socket_in(path, path.stat().st_mtime_ns)
    except (ConfigError, OSError):
        if path != NODE_CONFIG_FILE or os.environ.get(CONFIG_ENV):  # this user's own file: its fault is theirs
            raise
        return None  # the node's file, which this user may not be allowed to read


@functools.lru_cache(maxsize=4)
def _socket_in(path: Path, mtime_ns: int) -> Path | None:
    """The ``socket`` of a config file, parsed once per version of it: adapters ask for the
    socket path on every call."""
    socket = _read_config(path).get("socket")
    return Path(socket) if socket else None


def _runtime_dir() -> Path:
    if os.getuid() == 0:
        return Path("/run/trims")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "trims"
    return _shared_tmp_runtime_dir()


def _shared_tmp_runtime_dir() -> Path:
    return Path(f"/tmp/trims-{os.getuid()}")


def check_socket_directory(socket_path: Path) -> None:
    """Refuse a socket in the per-user fallback directory in /tmp when someone else made that
    directory, or others may write to it: anyone can create it first and listen there, to be
    sent this user's model files and to hand back weights of its own. Other paths are the
    operator's choice (``TRIMS_SOCKET``, ``$XDG_RUNTIME_DIR``, ``/run/trims``)."""
    directory = socket_path.parent
    if directory != _shared_tmp_runtime_dir():
        return
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return  # no daemon there: connecting says so
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
        raise DaemonUnavailable(
            f"{directory} (uid {info.st_uid}, mode {info.st_mode & 0o7777:o}) was not made by you or root, or others "
            "may write to it: another user may be listening there as a trims daemon. Remove it, or point "
            "TRIMS_SOCKET (or XDG_RUNTIME_DIR) at a directory of your own")


def default_store_dir() -> Path:
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    if os.getuid() == 0:
        return Path("/var/lib/trims")
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "trims"


def _half_of_memory() -> int:
    """The default host cap: the other half stays for the functions themselves."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True)
class Settings:
    """Everything ``trims serve`` can be told. :meth:`load` resolves flags > environment >
    config file > defaults."""

    socket_path: Path
    store_dir: Path
    host_memory: int
    disk: int = UNBOUNDED
    gpu_memory: int = 0  # per CUDA device; 0: no GPU tier
    policy: str = "lru"
    cloud: str | None = None
    busy_timeout: float = 0.0
    max_connections: int = 1024
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    socket_mode: int = 0o600
    socket_group: str | None = None
    frame_timeout: float = 10.0
    access: AccessPolicy = field(default_factory=AccessPolicy.single_user)

    @classmethod
    def defaults(cls) -> Settings:
        return cls.load({})

    @classmethod
    def load(cls, flags: dict[str, Any], config_file: Path | None = None) -> Settings:
        """``flags`` holds what the command line set (None for unset)."""
        path = config_file or default_config_file()
        values: dict[str, Any] = _read_config(path) if path else {}
        for key, env in (("socket", SOCKET_ENV), ("store", STORE_ENV), ("host_memory", HOST_MEMORY_ENV)):
            if os.environ.get(env):
                values[key] = os.environ[env]
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(
            socket_path=Path(values.get("socket") or _runtime_dir() / "trims.sock"),
            store_dir=Path(values.get("store") or default_store_dir()),
            host_memory=_size_of(values, "host_memory") if "host_memory" in values else _half_of_memory(),
            disk=_size_of(values, "disk") if "disk" in values else UNBOUNDED,
            gpu_memory=_size_of(values, "gpu_memory") if "gpu_memory" in values else 0,
            policy=_choice(values.get("policy", "lru"), tuple(POLICIES), "policy"),
            cloud=_location(values.get("cloud")),
            busy_timeout=_number(values.get("busy_timeout", 0.0), "busy_timeout", low=0.0),
            max_connections=int(_number(values.get("max_connections", 1024), "max_connections", low=1)),
            metrics_port=(int(_number(values["metrics_port"], "metrics_port", low=0, high=65535))
                          if values.get("metrics_port") is not None else None),
            metrics_address=str(values.get("metrics_address", "127.0.0.1")),
            socket_mode=_mode(values.get("socket_mode", "0600")),
            socket_group=values.get("socket_group"),
            frame_timeout=_number(values.get("frame_timeout", 10.0), "frame_timeout", low=0.001),
            access=parse_tenants(values["tenants"], parse_size) if "tenants" in values else AccessPolicy.single_user(),
        )


CONFIG_KEYS = {
    "socket": str, "store": str, "host_memory": (str, int), "disk": (str, int), "gpu_memory": (str, int), "policy": str, "cloud": str,
    "busy_timeout": (int, float), "max_connections": int, "metrics_port": int, "metrics_address": str,
    "socket_mode": str, "socket_group": str, "frame_timeout": (int, float), "tenants": dict,
}


def _size_of(values: dict[str, Any], key: str) -> int:
    try:
        return parse_size(values[key])
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _location(url: str | None) -> str | None:
    problem = None if url is None else location_problem(url)
    if problem:
        raise ConfigError(f"cloud: {problem}")
    return url


def _number(value: float, what: str, *, low: float, high: float = math.inf) -> float:
    """``value`` if it is a finite number from ``low`` to ``high``; else a ConfigError."""
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high):
        bounds = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
        raise ConfigError(f"{what} must be a number {bounds}, not {value!r}")
    return number


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"socket_mode {text!r} is not an octal mode like \"0660\"") from None
    if mode & ~0o666:
        raise ConfigError(f"socket_mode {text} may only grant read and write")
    return mode


def default_config_file() -> Path | None:
    """``$TRIMS_CONFIG``; else, the first that exists of ``$XDG_CONFIG_HOME/trims/trims.toml``
    (not for root) and ``/etc/trims/trims.toml`` (a service user finds the system's)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    candidates = [NODE_CONFIG_FILE]
    if os.getuid() != 0:
        user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "trims" / "trims.toml"
        candidates.insert(0, user)
    return next((c for c in candidates if c.is_file()), None)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for key, value in doc.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(CONFIG_KEYS))}")
        if not isinstance(value, CONFIG_KEYS[key]) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} = {value!r} has the wrong type: {_what_it_takes(key)}")
    return doc


_WHAT_TYPES_TAKE = {str: "a quoted string", int: "a whole number", (int, float): "a number",
                    (str, int): 'a size, like "16G"', dict: "[tenants.NAME] tables"}


def _what_it_takes(key: str) -> str:
    return 'a quoted octal string, like "0660"' if key == "socket_mode" else _WHAT_TYPES_TAKE[CONFIG_KEYS[key]]


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def private_directory(path: Path, *, sticky_ok: bool = False) -> None:
    """Create ``path`` (mode 0700) or check that an existing one is ours and closed to others.

    A world-writable /tmp lets anyone create our directory first; refusing it stops them
    from seeing or replacing the socket.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:  # a file there, a read-only or missing parent
        raise ConfigError(f"cannot use {path} as a directory: {exc.strerror or exc}; choose another path") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if sticky_ok and info.st_mode & stat.S_ISVTX and info.st_uid == 0:
        return  # like /tmp: others may add entries but cannot replace ours
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to you; remove it or choose another path")
    if info.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by others (mode {info.st_mode & 0o777:o}); chmod 700 it")
