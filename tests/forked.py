"""The tests' ``python -m MODULE ARGS``: bench/forked.py's fork server, which also imports spandrel as the test
processes do (tests/stand_ins/spandrel_loader.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from bench import forked

PRELOAD = (*forked.PRELOAD, "tests.stand_ins.site.sitecustomize")


def run_module(
    module: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from ``cwd``, forked with torch, diffusers and spandrel imported (bench/forked.py).

    Raises:
        subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds; it was killed.
    """
    return forked.run_module(module, *args, cwd=cwd, env=env, timeout=timeout, preload=PRELOAD)
