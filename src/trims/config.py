"""Where the daemon listens and keeps its store, how much it may hold: defaults and parsing.

Every client finds the daemon through ``TRIMS_SOCKET`` when it is set, else the default
socket path; the daemon uses the same rule, so the two agree without configuration.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

SOCKET_ENV = "TRIMS_SOCKET"
STORE_ENV = "TRIMS_STORE"
HOST_MEMORY_ENV = "TRIMS_HOST_MEMORY"

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
    """``$TRIMS_SOCKET``, else a per-user runtime directory."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    return _runtime_dir() / "trims.sock"


def _runtime_dir() -> Path:
    if os.getuid() == 0:
        return Path("/run/trims")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "trims"
    return Path(f"/tmp/trims-{os.getuid()}")


def default_store_dir() -> Path:
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    if os.getuid() == 0:
        return Path("/var/lib/trims")
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "trims"


def default_host_memory() -> int:
    """Half of the machine's memory: the other half stays for the functions themselves."""
    if os.environ.get(HOST_MEMORY_ENV):
        return parse_size(os.environ[HOST_MEMORY_ENV])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True)
class Settings:
    socket_path: Path
    store_dir: Path
    host_memory: int
    max_connections: int = 1024

    @classmethod
    def defaults(cls) -> Settings:
        return cls(default_socket_path(), default_store_dir(), default_host_memory())


def private_directory(path: Path, *, sticky_ok: bool = False) -> None:
    """Create ``path`` (mode 0700) or check that an existing one is ours and closed to others.

    A world-writable /tmp lets anyone create our directory first; refusing it stops them
    from seeing or replacing the socket.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if sticky_ok and info.st_mode & stat.S_ISVTX and info.st_uid == 0:
        return  # like /tmp: others may add entries but cannot replace ours
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to you; remove it or choose another path")
    if info.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by others (mode {info.st_mode & 0o777:o}); chmod 700 it")
