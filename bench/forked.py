"""`python -m MODULE ARGS` without importing torch and diffusers again for each run.

Importing torch, diffusers and transformers costs a new interpreter about 10 CPU-seconds, more than most
benchmark smoke runs spend on their work. ``run_module`` runs the module in a fresh process forked from
multiprocessing's fork server, which imported them once (``PRELOAD``) and then never runs anything else: each run
gets a process of its own, with no state left by an earlier run or by the calling process, in which the module runs
as ``__main__`` with ``sys.argv`` set, as ``python -m`` runs it.

What differs from a new interpreter: the preloaded libraries read their environment when the fork server started,
so a run whose command needs other import-time variables (``HF_HUB_OFFLINE``, say) starts a real process instead;
and the run's start-up skips those imports, so it is never a cold start. The tests run the benchmarks' smoke runs
this way, and ``bench.machine.run_child`` starts a benchmark's own children this way under ``BENCH_FORK_CHILDREN=1``.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# What the fork server imports once: the worker's engine pulls in torch, diffusers and transformers.
PRELOAD = ("src.run.engine",)


def _context(preload: Sequence[str]) -> multiprocessing.context.ForkServerContext:
    """The fork server's context; ``preload`` counts when the server starts, at a process's first run."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


@dataclass(frozen=True)
class _Run:
    """One run, as the fork server's process receives it."""

    module: str
    args: list[str]
    cwd: str
    environ: dict[str, str]
    stdout: str
    stderr: str


def _main(run: _Run) -> None:
    """The forked process: output to the two files, then the module as ``__main__``; its exit status is the run's."""
    for fd, path in ((1, run.stdout), (2, run.stderr)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    os.chdir(run.cwd)
    sys.path.insert(0, run.cwd)  # as `python -m` puts the current folder first
    os.environ.clear()
    os.environ.update(run.environ)
    sys.argv = [run.module, *run.args]
    code: int | str | None = 0
    try:
        runpy.run_module(run.module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - a new interpreter prints any failure and exits 1
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            if not stream.closed:  # a module may close them, as `with outfile:` in json.tool does
                stream.flush()
    sys.exit(code)


def run_module(
    module: str,
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    preload: Sequence[str] = PRELOAD,
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from ``cwd`` with ``env`` (default: this process's), in a process forked from a
    server that imported ``preload`` (the first run's ``preload`` is the server's).

    Raises:
        subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds; it was killed.
    """
    command = ["python", "-m", module, *args]
    with tempfile.TemporaryDirectory(prefix="forked-") as scratch:
        stdout, stderr = Path(scratch, "stdout"), Path(scratch, "stderr")
        stdout.touch()
        stderr.touch()
        run = _Run(module, list(args), str(cwd), dict(os.environ if env is None else env), str(stdout), str(stderr))
        process = _context(preload).Process(target=_main, args=(run,), name=module)
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, stdout.read_text(), stderr.read_text())
        return subprocess.CompletedProcess(
            command, process.exitcode, stdout.read_text(encoding="utf-8"), stderr.read_text(encoding="utf-8")
        )
