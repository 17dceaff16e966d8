"""For the processes the tests start with an UPSCALER_DIR: spandrel imported at interpreter start, as
tests/conftest.py imports it in the test processes (tests/stand_ins/spandrel_loader.py says how).

Python runs a ``sitecustomize`` module found on the path when it starts; a test puts this folder on PYTHONPATH
so that ``python handler.py``, started as the README says, runs the real spandrel on this CPU-only machine.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, for tests.stand_ins
from tests.stand_ins.spandrel_loader import import_spandrel

import_spandrel()
