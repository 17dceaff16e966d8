"""The benchmark scripts run, and the random-weight SD 1.5 really has SD 1.5's architecture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from bench.sd15_random import PUBLISHED_MILLIONS, build_sd15_random, check_parameter_counts
from tests.conftest import ROOT


def test_random_sd15_has_sd15_parameter_counts() -> None:
    pipeline = build_sd15_random("cpu", torch.float16)

    counts = check_parameter_counts(pipeline)

    assert counts.keys() == PUBLISHED_MILLIONS.keys()
    assert pipeline.vae_scale_factor == 8


def test_gpu_check_smoke_runs_on_the_cpu_with_the_tiny_model(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--tiny", str(tiny_model_dir), "--steps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 6, result.stdout
    assert all("| yes |" in row for row in rows[1:])


def test_encode_benchmark_prints_every_format() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.encode", "--repeat", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )

    for name in ("| png |", "| jpeg |", "| webp |"):
        assert name in result.stdout
