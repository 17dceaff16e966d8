"""The command line is read and checked before torch is imported or the model loads.

Each run points MODEL_ID at a folder that does not exist: had the model been
loaded, the run would end with the model's error ("Ways out") and exit 1.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from runpod.serverless import parser as runpod_parser

from tests.conftest import run_handler_cli

LOCAL_FLAGS = ("--test_input", "--output_dir")


@pytest.fixture
def no_model_env(offline_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The offline environment with an unloadable model, and Python reporting every import on stderr."""
    return {**offline_env, "MODEL_ID": str(tmp_path / "no-such-model"), "PYTHONPROFILEIMPORTTIME": "1"}


def imported_modules(stderr: str) -> set[str]:
    """Module names from Python's `-X importtime` lines."""
    return {match.group(1) for match in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", stderr, re.MULTILINE)}


def assert_nothing_loaded(result: subprocess.CompletedProcess[str]) -> None:
    modules = imported_modules(result.stderr)
    assert "handler" in modules or "src.local" in modules, "PYTHONPROFILEIMPORTTIME took effect"
    assert not {name for name in modules if name.split(".")[0] in ("torch", "diffusers", "runpod")}
    assert "Ways out" not in result.stderr


def messages(stderr: str) -> str:
    """stderr without the import-time lines."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


def test_help_answers_at_once_listing_local_and_runpod_flags(no_model_env: dict[str, str], tmp_path: Path) -> None:
    result = run_handler_cli(["--help"], no_model_env, tmp_path)

    assert result.returncode == 0, messages(result.stderr)[-3000:]
    assert result.stdout.startswith("usage: python handler.py")
    for flag in (*LOCAL_FLAGS, *runpod_parser._option_string_actions):
        assert flag in result.stdout, flag
    assert_nothing_loaded(result)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["--bogus"], "unrecognized arguments: --bogus", id="unknown-flag"),
        pytest.param(["--test_input", "{not json"], "--test_input is not valid JSON", id="bad-json"),
        pytest.param(["--test_input", "[1, 2]"], "--test_input must be a JSON object", id="not-an-object"),
        pytest.param(["--rp_api_port", "eighty"], "argument --rp_api_port: invalid int value", id="bad-port"),
        pytest.param([], "no --test_input given and no test_input.json", id="no-job"),
        pytest.param(
            ["--rp_serve_api", "--rp_api_concurrency", "2"], "--rp_api_concurrency 2: must be 1", id="api-workers"
        ),
        pytest.param(["--rp_debugger"], "--rp_debugger: runpod 1.12 loses the result of every failed job", id="debug"),
    ],
)
def test_bad_invocation_exits_2_with_usage_before_loading(
    no_model_env: dict[str, str], tmp_path: Path, args: list[str], says: str
) -> None:
    result = run_handler_cli(args, no_model_env, tmp_path)

    assert result.returncode == 2, messages(result.stderr)[-3000:]
    stderr = messages(result.stderr)
    assert stderr.startswith("usage: python handler.py"), stderr
    assert says in stderr
    assert "Traceback" not in stderr
    assert_nothing_loaded(result)
