"""What the worker's cold start is made of: each variant in fresh processes, alternating.

    python -m bench.startup [--model DIR] [--repeat 3] [--out bench/results]

Writes startup.md and startup.json. The model defaults to SD 1.5's full architecture
with random weights, as ``python -m bench.run`` caches it. Variants, each from process
start until ready:

- ``bare``: ``import torch, diffusers`` and ``StableDiffusionPipeline.from_pretrained``;
- ``worker``: ``handler.prepare()``, what ``python handler.py`` does before its first job
  (settings, the engine, and ``import runpod`` in a thread during the load);
- ``worker, no runpod``: the same without importing runpod;
- ``worker, py-cpuinfo's probe answered at once``: as shipped, with py-cpuinfo replaced by a
  function that returns /proc/cpuinfo's model name;
- ``worker, runpod after the imports``: runpod's import thread started once torch and
  diffusers are imported, so that it overlaps only the weight loading;
- ``import runpod``, alone, and alone with py-cpuinfo's probe answered at once (runpod's
  debugger module asks py-cpuinfo for the CPU's name at import, which starts a second
  Python process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

from bench.machine import cpu_name, load_average, report_header, run_child, write_results
from bench.run import FULL_MODEL_DIR, RESULTS

VARIANTS = {
    "bare": "bare `import torch, diffusers` + `from_pretrained`",
    "worker": "worker: `handler.prepare()`, runpod imported in a thread from the start (as shipped)",
    "worker_no_runpod": "worker without `import runpod`",
    "worker_no_cpuinfo": "worker, py-cpuinfo's probe answered at once",
    "worker_runpod_after_imports": "worker, runpod's import thread started after torch and diffusers are imported",
    "runpod": "`import runpod` alone",
    "runpod_no_cpuinfo": "`import runpod` alone, py-cpuinfo's probe answered at once",
}


def _fake_cpuinfo() -> None:
    """Stand in for py-cpuinfo, which runpod's debugger module calls at import."""
    module = types.ModuleType("cpuinfo")
    module.get_cpu_info = lambda: {"brand_raw": cpu_name()}  # type: ignore[attr-defined]
    sys.modules["cpuinfo"] = module


def _child(variant: str, model: str, started: float) -> dict[str, float]:
    t0 = time.time()
    os.environ["MODEL_ID"] = model
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    if variant == "bare":
        import diffusers
        import torch

        diffusers.StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32).to("cpu")
    elif variant == "worker":
        import handler

        handler.prepare()
    elif variant == "worker_no_cpuinfo":
        import handler

        _fake_cpuinfo()
        handler.prepare()
    elif variant == "worker_no_runpod":
        import handler

        handler.get_settings()
        handler.get_engine()
    elif variant == "worker_runpod_after_imports":
        import importlib

        import handler
        import src.run.engine  # noqa: F401  (torch and diffusers)

        handler.get_settings()
        thread = threading.Thread(target=importlib.import_module, args=("runpod",))
        thread.start()
        handler.get_engine()
        thread.join()
    elif variant in ("runpod", "runpod_no_cpuinfo"):
        if variant == "runpod_no_cpuinfo":
            _fake_cpuinfo()
        import runpod  # noqa: F401
    else:
        raise ValueError(variant)
    ready = time.time()
    return {"interpreter": t0 - started, "total": ready - started}


def _spawn(variant: str, model: Path) -> dict[str, float]:
    return dict(run_child("bench.startup", "--child", variant, str(model), repr(time.time())))


def _runpod_import_profile(top: int = 8) -> list[tuple[str, float]]:
    """The slowest parts of ``import runpod`` by their own time, from ``python -X importtime``, by package."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import runpod"],
        capture_output=True,
        text=True,
        check=True,
    )
    by_package: dict[str, float] = {}
    for line in completed.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        name = parts[2].strip()
        package = ".".join(name.split(".")[:3]) if name.startswith("runpod.") else name.split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(parts[0]) / 1e6
    return sorted(by_package.items(), key=lambda item: -item[1])[:top]


def measure(model: Path, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeat):
        for variant in VARIANTS:
            runs[variant].append(_spawn(variant, model))
    return {"runs": runs, "runpod_import_by_package_s": _runpod_import_profile()}


def markdown(report: dict[str, Any]) -> str:
    bare = statistics.median(run["total"] for run in report["runs"]["bare"])
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Model: `{report['model']}`.",
        "",
        "| startup | seconds, median (min-max) | / bare |",
        "| --- | --- | --- |",
    ]
    for variant, label in VARIANTS.items():
        totals = [run["total"] for run in report["runs"][variant]]
        median = statistics.median(totals)
        lines.append(f"| {label} | {median:.2f} ({min(totals):.2f}-{max(totals):.2f}) | {median / bare:.3f} |")
    lines += ["", "| `import runpod`: own import time by package | seconds |", "| --- | --- |"]
    lines += [f"| `{package}` | {seconds:.3f} |" for package, seconds in report["runpod_import_by_package_s"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        result = _child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        print("RESULT " + json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FULL_MODEL_DIR, help="a diffusers SD 1.5 folder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for startup.md and startup.json")
    args = parser.parse_args()
    if not (args.model / "model_index.json").is_file():
        parser.error(f"{args.model} holds no diffusers model: run `python -m bench.run` first, or pass --model")
    started = time.time()
    report: dict[str, Any] = {
        **report_header(),
        "model": "SD 1.5's architecture, random weights" if args.model == FULL_MODEL_DIR else str(args.model),
    }
    report.update(measure(args.model, args.repeat))
    report["load_average_after"] = load_average()
    report["command"] = " ".join(["python -m bench.startup", *sys.argv[1:]])
    report["seconds"] = round(time.time() - started, 1)
    write_results(args.out, "startup", report, markdown(report))


if __name__ == "__main__":
    main()
