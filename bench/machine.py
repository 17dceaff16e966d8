"""The machine a benchmark ran on, as its results files record it."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or the architecture where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: on a shared machine they say how busy it was."""
    return [round(value, 2) for value in os.getloadavg()]


# Set to 1, a benchmark's children are forked from one process that imported torch and diffusers (bench/forked.py)
# instead of starting new interpreters: the test suite's smoke runs, whose figures count for nothing, save the
# imports. Their start-up times are then not cold starts, and the results say so (``report_header``).
FORK_CHILDREN = "BENCH_FORK_CHILDREN"


def children_forked() -> bool:
    return os.environ.get(FORK_CHILDREN) == "1"


def run_process(module: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the project root in a fresh process, with ``env`` (default this one's); a new
    interpreter, or a forked one under ``BENCH_FORK_CHILDREN=1``."""
    environ = {**(os.environ if env is None else env), "PYTHONDONTWRITEBYTECODE": "1"}
    if children_forked():
        from bench.forked import run_module

        return run_module(module, *args, cwd=ROOT, env=environ)
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=environ)


def run_child(module: str, *args: str, env: Mapping[str, str] | None = None) -> Any:
    """Run ``python -m MODULE ARGS`` in a fresh process (``run_process``) and return what it printed as
    ``RESULT <json>``; a benchmark measures in children so that no run inherits another's state.

    Raises:
        RuntimeError: the child failed or printed no result; the message ends with its stderr.
    """
    completed = run_process(module, *args, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{module} child {args} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# The Python files a benchmark's figures depend on: the worker's, the builder's and the benchmarks' own.
CODE = ("handler.py", "src/**/*.py", "builder/**/*.py", "bench/**/*.py")


def code_version(root: Path = ROOT) -> dict[str, str]:
    """The code a run measured: ``digest``, a SHA-256 over the paths and bytes of the files ``CODE`` names,
    which a copy without git history (the GPU machine's) has too, and which ``python -m bench.machine`` prints for
    any checkout; and ``commit``, git's HEAD, with "+changes" when tracked files differ from it, where git can tell."""
    digest = hashlib.sha256()
    for path in sorted({path for pattern in CODE for path in root.glob(pattern) if "__pycache__" not in path.parts}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    version = {"digest": digest.hexdigest()[:16]}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        changed = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return version
    return {"commit": head.stdout.strip() + ("+changes" if changed else ""), **version}


def describe_code(version: dict[str, str]) -> str:
    """``version`` as a results table's header says it."""
    commit = f"commit {version['commit']}, " if "commit" in version else ""
    return f"{commit}code digest {version['digest']} (`python -m bench.machine` prints a checkout's)"


FORKED_NOTE = (
    f"{FORK_CHILDREN}=1: the children were forked from a process that had imported torch and diffusers, "
    "so no start-up time here is a cold start"
)


def report_header() -> dict[str, Any]:
    """What every results file starts with: the date, the machine, its CPU, Python, how busy it was, and the
    code it measured; and, where the children were forked, that their start-up times are not cold starts."""
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "load_average_before": load_average(),
        "code": code_version(),
    }
    if children_forked():
        header["children"] = FORKED_NOTE
    return header


def write_results(out: Path, stem: str, report: dict[str, Any], table: str) -> None:
    """Write ``stem``.json (the report) and ``stem``.md (its table) into ``out``, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    if "children" in report:
        table += f"\n{report['children']}.\n"
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"written to {out / f'{stem}.md'} and {out / f'{stem}.json'} in {report['seconds']:.0f} s")


def median_range(values: Sequence[float], scale: float = 1.0, unit: str = "s") -> str:
    """``median unit (min-max)`` of ``values`` times ``scale``, as the results tables write them."""
    scaled = [value * scale for value in values]
    return f"{statistics.median(scaled):.2f} {unit} ({min(scaled):.2f}-{max(scaled):.2f})"


class LogArguments(logging.Handler):
    """The arguments of the log records whose message starts with ``prefix``, by ``names``: what the worker
    logs as it loads something (a LoRA, a ControlNet), read as it was logged."""

    def __init__(self, prefix: str, names: Sequence[str]) -> None:
        super().__init__(logging.INFO)
        self.prefix = prefix
        self.names = tuple(names)
        self.loads: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(self.prefix) and isinstance(record.args, tuple):
            self.loads.append(dict(zip(self.names, record.args, strict=True)))


if __name__ == "__main__":
    print(json.dumps(code_version()))
