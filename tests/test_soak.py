"""The soak run's 15-second version: the worker as on RunPod, every task from several clients, every answer checked.

It asserts what holds in a run of any length: no job lost or answered twice, no wrong image, every bad input's
error naming its field, and no file descriptor kept open. Latencies and the RSS slope are figures for a long
run on a quiet machine (BENCHMARKS.md, "Soak"); a 15-second run on a shared machine settles neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import FD_GROWTH_MARGIN, TASKS, job_mix
from tests.conftest import ROOT
from tests.forked import run_module

pytestmark = pytest.mark.slow


def test_a_quarter_minute_soak_loses_nothing_and_answers_every_job_right(tmp_path: Path) -> None:
    # Forked with torch and diffusers imported (tests/forked.py); the worker it runs is `python handler.py`.
    completed = run_module("bench.soak", "--minutes", "0.25", "--out", str(tmp_path), cwd=ROOT, timeout=280)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text(encoding="utf-8"))
    counts = report["counts"]
    wrong = [job for job in report["jobs"] if job["status"] in ("wrong", "lost", "duplicated")]

    assert wrong == []
    assert counts.get("lost", 0) == counts.get("duplicated", 0) == counts.get("wrong", 0) == 0
    assert report["posts_for_unknown_jobs"] == []
    # Every task ran and was checked: at least its reference job (the second job to cancel has none).
    answered = {job["task"] for job in report["jobs"] if job["status"] in ("ok", "expected-error")} - {"startup"}
    assert answered == set(TASKS) - {"cancel-at-take"}
    assert report["jobs_sent"]["soak"] > 0
    bad = {spec.name: spec.error_field for spec in job_mix() if spec.error_field}
    assert {name: entry["field"] for name, entry in report["bad_inputs"].items()} == bad
    assert all(entry["named"] for entry in report["bad_inputs"].values()), report["bad_inputs"]
    assert report["resources"]["fds"]["growth"] <= FD_GROWTH_MARGIN
    assert report["worker"]["alive_at_end"]
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"Command: `{report['command']}`" in (tmp_path / "soak.md").read_text(encoding="utf-8")
