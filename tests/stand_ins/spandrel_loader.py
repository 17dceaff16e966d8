"""spandrel imported with the real torchvision when it imports, else with the stand-in beside this file.

tests/conftest.py calls ``import_spandrel`` in each test process, and ``site/sitecustomize.py`` in the processes
the tests start (``python handler.py`` with an UPSCALER_DIR), so that both run the real spandrel on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

# torchvision's stand-in for spandrel, where the real one does not import (tests/stand_ins/torchvision says why).
STAND_INS = Path(__file__).resolve().parent


def import_spandrel() -> None:
    """Import spandrel once, with the real torchvision when it imports, else with the stand-in; the stand-in is
    then taken off the path again, so that no other library (diffusers and transformers look for torchvision)
    ever sees it: only spandrel's two imports are bound to it."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a CUDA build beside the CPU torch (RuntimeError)
        _forget_torchvision()
        sys.path.insert(0, str(STAND_INS))
        try:
            import spandrel  # noqa: F401
        except ImportError:
            pass  # not installed (the GPU machine's kit): its tests skip
        finally:
            sys.path.remove(str(STAND_INS))
            _forget_torchvision()


def _forget_torchvision() -> None:
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
