"""Imported by the ``trims-transparent.pth`` that ``trims hook install`` writes into
site-packages: turns the transparent mode on when ``TRIMS_TRANSPARENT=1``."""

import os
import sys

if os.environ.get("TRIMS_TRANSPARENT") == "1":
    try:
        import trims.transparent

        trims.transparent.install()
    except Exception as exc:  # noqa: BLE001 - never stop the interpreter from starting
        sys.stderr.write(f"trims: transparent mode is off: {exc}\n")
