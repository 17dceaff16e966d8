"""`pytest -m gpu tests/test_gpu.py` collects and runs on the GPU machine, which has torch, transformers,
accelerate, diffusers, pydantic and pytest, and not the test suite's other tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# On the CPU machine only: the S3 tests' tools, the HTTP client, pytest-timeout, torchsde (DPM++ 2M SDE's noise).
# (PyYAML is not among them: huggingface_hub and accelerate need it, so it is wherever diffusers is.)
MISSING_ON_THE_GPU_MACHINE = ("boto3", "botocore", "moto", "pytest_timeout", "torchsde")

# Imported by Python at startup when its folder is on PYTHONPATH: the path finder, which every
# import of an installed package goes through (pytest's assertion rewriter included), then acts as
# if the missing packages were not installed: ``import`` fails, ``importlib.util.find_spec`` is None.
BLOCKER = """
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _find_spec_without_them(cls, name, path=None, target=None):
    if name.partition(".")[0] in {missing!r}:
        return None
    return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_find_spec_without_them)
"""


def run_blocked(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the project root with the GPU machine's missing packages blocked."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(missing=MISSING_ON_THE_GPU_MACHINE), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def test_the_blocker_blocks(tmp_path: Path) -> None:
    for name in MISSING_ON_THE_GPU_MACHINE:
        result = run_blocked(tmp_path, "-c", f"import {name}")

        assert result.returncode == 1, name
        assert f"ModuleNotFoundError: No module named '{name}'" in result.stderr, result.stderr


def test_gpu_tests_run_without_the_cpu_only_packages_and_say_each_outcome(tmp_path: Path) -> None:
    # As the GPU kit runs them (../shared/gpu/run.sh), with pytest-timeout absent: -p no:timeout. Here, with no
    # CUDA device, each is collected and skipped, with a line for its start and one for its outcome.
    result = run_blocked(
        tmp_path, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:timeout", "-p", "no:cacheprovider", "tests/test_gpu.py",
    )  # fmt: skip

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    started = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("START tests/test_gpu.py::")]
    ended = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("SKIPPED tests/test_gpu.py::")]
    assert started == ended, result.stdout
    defined = re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_gpu.py").read_text(), flags=re.MULTILINE)
    names = [nodeid.split("::")[1].split("[")[0] for nodeid in started]
    assert list(dict.fromkeys(names)) == defined, result.stdout
    assert "Unknown config option" not in result.stdout + result.stderr, "pyproject's timeout key is declared"
