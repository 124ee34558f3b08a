"""Model names: ``NAMESPACE/NAME:TAG``, a mutable tag that points at an immutable digest."""

from __future__ import annotations

import re

from . import digest as digests
from .errors import InvalidName

DEFAULT_TAG = "latest"
MAX_CHARS = 256
_COMPONENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"{_COMPONENT}(/{_COMPONENT})*")
_TAG = re.compile(_COMPONENT)


def canonical(reference: str) -> str:
    """``name[:tag]`` with the tag filled in, or a ``blake3:…`` digest as given.

    Raises :class:`InvalidName` for anything else (path tricks, control characters, …).
    """
    if not isinstance(reference, str) or not 0 < len(reference) <= MAX_CHARS:
        raise InvalidName(f"a model name has 1 to {MAX_CHARS} characters, got {str(reference)[:40]!r}")
    if digests.is_digest(reference):
        return reference
    name, _, tag = reference.partition(":")
    if not tag and reference.endswith(":"):
        raise InvalidName(f"{reference!r} has an empty tag; write NAME or NAME:TAG")
    tag = tag or DEFAULT_TAG
    if not _NAME.fullmatch(name) or name == "blake3":
        raise InvalidName(
            f"{reference[:80]!r} is not a valid model name: use letters, digits, '.', '_' and "
            "'-', with '/' between namespace parts, e.g. team-a/resnet50:1"
        )
    if not _TAG.fullmatch(tag):
        raise InvalidName(f"{reference[:80]!r} has an invalid tag {tag[:40]!r}: use letters, digits, '.', '_' and '-'")
    return f"{name}:{tag}"
