"""Started with every Python process under ``trims run`` (this directory leads PYTHONPATH)."""

import importlib
import os
import sys

if os.environ.get("TRIMS_TRANSPARENT") == "1":
    try:
        import trims.transparent

        trims.transparent.install()
    except Exception as exc:  # noqa: BLE001 - never stop the program from starting
        sys.stderr.write(f"trims: transparent mode is off: {exc}\n")

# Then whatever sitecustomize the program would have had without us.
_here = os.path.dirname(os.path.abspath(__file__))
_saved_path, _me = list(sys.path), sys.modules.pop("sitecustomize", None)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    importlib.import_module("sitecustomize")
except ImportError:
    pass
finally:
    sys.path[:] = _saved_path
    sys.modules["sitecustomize"] = _me  # the import system finishes importing *this* module
