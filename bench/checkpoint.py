"""Cold start from a single-file checkpoint against the same weights as a diffusers folder, on the CPU.

    python -m bench.checkpoint                  # SD 1.5's architecture, random weights: about 2.5 minutes on 2 cores
    python -m bench.checkpoint --tiny --repeat 1 --out DIR   # the tiny model: the test suite's smoke run

Writes checkpoint.md and checkpoint.json (``--tiny``: checkpoint-tiny.md and checkpoint-tiny.json)
into ``--out`` (default bench/results), with the command, the CPU, the load average before and
after, and the run's wall time.

Prepared first, in a temporary folder:

- the model in float16, saved with ``save_pretrained``: the diffusers folder, which is also the
  MODEL_CONFIG the checkpoint is converted with;
- the same weights as one checkpoint file in the original (LDM) layout, float16 as pruned fp16
  checkpoints are shared (``builder.single_file``);
- that file baked by ``python -m builder.cache_model`` in its own process (MODEL_ID the file,
  MODEL_CONFIG the diffusers folder): the converted folder. The bake is timed, whole;
- a MODEL_CACHE_DIR filled by one start of the worker with the file, timed apart: the one-time
  conversion a first worker pays.

Then each variant starts in a fresh process, the variants alternating, ``--repeat`` times, from
process start until ``Engine.load(load_settings())`` returns:

- ``diffusers folder``: MODEL_ID is the folder;
- ``converted folder (baked)``: MODEL_ID is the file and MODEL_DIR the baked folder, which the
  worker loads instead of the file;
- ``single file, converted at startup``: MODEL_ID is the file, MODEL_CONFIG the diffusers folder,
  no cache: the file is checked, hashed and converted;
- ``single file, MODEL_CACHE_DIR already filled``: the same with the filled cache, where the
  worker finds the conversion by the file's name, size and modification time.

Every start gets DEVICE=cpu, DTYPE=float16 (the dtype of the files and of a GPU worker, so that
no cast to float32 dilutes a difference in reading them), HF_HUB_OFFLINE=1, and none of the
worker's other variables from this shell. The files are read from a warm page cache: all were just
written, and they fit in memory. The loader's log says which way each start loaded its model; a
start that loaded it another way than its variant's stops the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.machine import load_average, report_header, run_child, run_process, write_results
from bench.run import RESULTS
from bench.tasks import OFFLINE_ENV

VARIANTS = {
    "folder": "diffusers folder",
    "baked": "converted folder (baked)",
    "startup": "single file, converted at startup",
    "cached": "single file, MODEL_CACHE_DIR already filled",
}
BASELINE = "folder"
# The contract: a converted folder starts within 5% of the same weights saved as a diffusers folder.
WITHIN = 0.05
# What the loader logs (src.models.loader) for each way of loading; a diffusers folder logs none of these.
LOADED_BY = {
    "folder": None,
    "baked": "baked at build time",
    "startup": "with the configs in",
    "cached": "converted earlier",
}
KEPT = "kept the conversion in"
WORKER_ENV = {"DEVICE": "cpu", "DTYPE": "float16"}


@dataclass(frozen=True)
class Plan:
    """What one mode measures."""

    model: str
    description: str
    checkpoint: str
    stem: str


PLANS = {
    "tiny": Plan("tiny", "the tiny test model", "tiny-sd15.safetensors", "checkpoint-tiny"),
    "full": Plan("full", "SD 1.5's architecture, random weights", "sd15-random.safetensors", "checkpoint"),
}


@dataclass(frozen=True)
class Paths:
    """The model in each form, and the folders the variants point the worker at."""

    folder: Path
    checkpoint: Path
    baked: Path
    cache: Path
    empty: Path


# --- the child: one cold start ---------------------------------------------------------------------------


class LoaderLog(logging.Handler):
    """Every line ``src.models.loader`` logs, as it is logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _child(started: float) -> dict[str, Any]:
    """One worker's start, from its process's start (``started``, the parent's clock at spawn) to ready."""
    t0 = time.time()
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from src.run.engine import Engine  # torch and diffusers
    from src.settings import load_settings

    imported = time.time()
    loader_log = LoaderLog()
    logger = logging.getLogger("src.models.loader")
    logger.setLevel(logging.INFO)
    logger.addHandler(loader_log)
    Engine.load(load_settings())
    ready = time.time()
    return {
        "interpreter": t0 - started,
        "imports": imported - t0,
        "load": ready - imported,
        "total": ready - started,
        "log": loader_log.lines,
    }


# --- preparing the model in each form --------------------------------------------------------------------


def build_pipeline(plan: Plan) -> Any:
    """The plan's model, every floating weight in float16."""
    import torch

    if plan.model == "tiny":
        from builder.tiny_model import build_tiny_pipeline
        from src.models.checkpoints import cast

        with tempfile.TemporaryDirectory() as scratch:
            pipeline = build_tiny_pipeline(Path(scratch))
        for name in ("unet", "vae", "text_encoder"):
            cast(getattr(pipeline, name), torch.float16)
        return pipeline
    from bench.sd15_random import build_sd15_random, check_parameter_counts

    pipeline = build_sd15_random(dtype=torch.float16)
    check_parameter_counts(pipeline)
    return pipeline


def worker_environ(**variables: str) -> dict[str, str]:
    """This process's environment without any of the worker's variables, then offline, on the CPU, in
    float16, with ``variables``."""
    from src.settings import Settings

    names = {field.alias for field in Settings.model_fields.values() if field.alias}
    inherited = {name: value for name, value in os.environ.items() if name not in names}
    return {**inherited, **OFFLINE_ENV, **WORKER_ENV, **variables}


def bake(checkpoint: Path, config: Path, destination: Path) -> float:
    """Run ``python -m builder.cache_model`` on ``checkpoint`` into ``destination``; its wall time in seconds.

    Raises:
        RuntimeError: the bake failed or wrote no labelled folder; the message ends with its stderr.
    """
    environ = worker_environ(MODEL_ID=str(checkpoint), MODEL_CONFIG=str(config), MODEL_DIR=str(destination))
    started = time.perf_counter()
    completed = run_process("builder.cache_model", env=environ)
    seconds = time.perf_counter() - started
    if completed.returncode != 0 or not (destination / "source.json").is_file():
        status = completed.returncode
        raise RuntimeError(f"python -m builder.cache_model failed ({status}):\n{completed.stderr[-3000:]}")
    return seconds


def prepare(plan: Plan, workdir: Path) -> tuple[Paths, float]:
    """The diffusers folder, the checkpoint file, and the baked folder in ``workdir``; and the bake's seconds."""
    import torch

    from builder import single_file

    paths = Paths(
        folder=workdir / "diffusers",
        checkpoint=workdir / plan.checkpoint,
        baked=workdir / "baked",
        cache=workdir / "cache",
        empty=workdir / "empty",
    )
    pipeline = build_pipeline(plan)
    pipeline.save_pretrained(paths.folder)
    single_file.save(single_file.checkpoint_state_dict(pipeline), paths.checkpoint, dtype=torch.float16)
    del pipeline
    print("wrote the diffusers folder and the checkpoint file", file=sys.stderr, flush=True)
    seconds = bake(paths.checkpoint, paths.folder, paths.baked)
    print(f"baked the checkpoint in {seconds:.1f} s", file=sys.stderr, flush=True)
    paths.cache.mkdir()
    paths.empty.mkdir()
    return paths, seconds


def environments(paths: Paths) -> dict[str, dict[str, str]]:
    """Each variant's environment. MODEL_DIR is an empty folder wherever the variant has no baked folder."""
    checkpoint, config, empty = str(paths.checkpoint), str(paths.folder), str(paths.empty)
    return {
        "folder": worker_environ(MODEL_ID=config, MODEL_DIR=empty),
        "baked": worker_environ(MODEL_ID=checkpoint, MODEL_DIR=str(paths.baked)),
        "startup": worker_environ(MODEL_ID=checkpoint, MODEL_CONFIG=config, MODEL_DIR=empty),
        "cached": worker_environ(
            MODEL_ID=checkpoint, MODEL_CONFIG=config, MODEL_DIR=empty, MODEL_CACHE_DIR=str(paths.cache)
        ),
    }


# --- measuring -------------------------------------------------------------------------------------------


def start(variant: str, environ: dict[str, str]) -> dict[str, Any]:
    """One cold start of ``variant`` in a fresh process, after checking from its log that it loaded its way.

    Raises:
        RuntimeError: the start failed, or loaded the model another way than the variant's.
    """
    result = run_child("bench.checkpoint", "--child", repr(time.time()), env=environ)
    expected = LOADED_BY[variant]
    found = [marker for marker in LOADED_BY.values() if marker and any(marker in line for line in result["log"])]
    if found != ([expected] if expected else []):
        raise RuntimeError(f"{VARIANTS[variant]}: the loader logged {result['log']}, expected a line with {expected!r}")
    return dict(result)


def fill_cache(paths: Paths, environ: dict[str, str]) -> dict[str, Any]:
    """The first start with an empty MODEL_CACHE_DIR, which converts the file and keeps the conversion.

    Raises:
        RuntimeError: the start failed, or left other than one labelled conversion in the cache.
    """
    result = run_child("bench.checkpoint", "--child", repr(time.time()), env=environ)
    kept = sorted(label.parent.name for label in paths.cache.glob("*/source.json"))
    if len(kept) != 1 or not any(KEPT in line for line in result["log"]):
        raise RuntimeError(f"the first start with MODEL_CACHE_DIR kept {kept}; the loader logged {result['log']}")
    return dict(result)


def measure(paths: Paths, repeat: int) -> dict[str, Any]:
    """The cache's first fill, then ``repeat`` rounds of every variant, each a fresh process."""
    environs = environments(paths)
    first = fill_cache(paths, environs["cached"])
    os.sync()  # the conversion just written is not flushed during a timed start
    print(f"filled MODEL_CACHE_DIR in {first['total']:.1f} s", file=sys.stderr, flush=True)
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for index in range(repeat):
        for variant in VARIANTS:
            runs[variant].append(start(variant, environs[variant]))
        print(f"round {index + 1} of {repeat}", file=sys.stderr, flush=True)
    return {"first_cache_fill": first, "runs": runs}


def on_disk(path: Path) -> dict[str, int]:
    """The files of a folder (or the one file), relative path to bytes."""
    if path.is_file():
        return {path.name: path.stat().st_size}
    found = sorted(file for file in path.rglob("*") if file.is_file())
    return {file.relative_to(path).as_posix(): file.stat().st_size for file in found}


def logged_seconds(runs: list[dict[str, Any]], pattern: str) -> list[float]:
    """The seconds each start's loader log gives in the line that ``pattern`` (one group: the seconds) matches."""
    return [float(match[1]) for run in runs for line in run["log"] if (match := re.search(pattern, line))]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Each variant's median, min and max cold start and load, and its ratio of medians to the diffusers folder."""
    runs = report["runs"]
    baseline = statistics.median(run["total"] for run in runs[BASELINE])
    summary: dict[str, Any] = {}
    for variant, label in VARIANTS.items():
        totals = [run["total"] for run in runs[variant]]
        loads = [run["load"] for run in runs[variant]]
        summary[variant] = {
            "label": label,
            "total_s": [statistics.median(totals), min(totals), max(totals)],
            "load_s": [statistics.median(loads), min(loads), max(loads)],
            "ratio": statistics.median(totals) / baseline,
        }
    startup = runs["startup"]
    summary["startup_sha256_s"] = logged_seconds(startup, r"SHA-256 \w+ \(([\d.]+) s\)")
    summary["startup_conversion_s"] = logged_seconds(startup, r"^converted .+ in ([\d.]+) s$")
    summary["baked_within"] = summary["baked"]["ratio"] <= 1 + WITHIN
    return summary


# --- the report ------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    median, low, high = values
    return f"{median:.2f} ({low:.2f}-{high:.2f})"


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def _megabytes(files: dict[str, int]) -> str:
    return f"{sum(files.values()) / 1e6:.0f}"


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    plan = report["plan"]
    versions = report["versions"]
    files = report["files"]
    baked = summary["baked"]["ratio"]
    verdict = "within" if summary["baked_within"] else "not within"
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Model: {plan['description']}, float16 on disk, loaded with DEVICE=cpu, DTYPE=float16, offline; median "
        f"(min-max) of {plan['repeat']} cold starts of each variant, each in a fresh process, the variants "
        "alternating; every file read from a warm page cache.",
        "",
        "| cold start, process start to `Engine.load` done | seconds, median (min-max) | of which the load, "
        "after the imports | / diffusers folder |",
        "| --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        entry = summary[variant]
        lines.append(
            f"| {entry['label']} | {_spread(entry['total_s'])} | {_spread(entry['load_s'])} | {entry['ratio']:.3f} |"
        )
    lines += [
        "",
        "| once per checkpoint file | seconds |",
        "| --- | --- |",
        f"| bake: `python -m builder.cache_model`, its whole process (check, SHA-256, convert, save, verify) | "
        f"{report['bake_s']:.1f} |",
        f"| first start with an empty MODEL_CACHE_DIR (converts, keeps the conversion) | "
        f"{report['first_cache_fill']['total']:.1f} |",
        f"| single file at startup: its SHA-256, median (worker log) | {_median(summary['startup_sha256_s'])} |",
        f"| single file at startup: its conversion, median (worker log) | {_median(summary['startup_conversion_s'])} |",
        "",
        "| on disk | files | MB |",
        "| --- | --- | --- |",
    ]
    for key, label in (
        ("folder", "diffusers folder (`save_pretrained`)"),
        ("checkpoint", "checkpoint file (LDM layout)"),
        ("baked", "converted folder (baked)"),
        ("cached", "conversion in MODEL_CACHE_DIR"),
    ):
        lines.append(f"| {label} | {len(files[key])} | {_megabytes(files[key])} |")
    lines += [
        "",
        f"The converted folder (baked) is {verdict} {WITHIN:.0%} of the diffusers folder: its median cold start is "
        f"{baked:.3f} times the diffusers folder's.",
    ]
    return "\n".join(lines) + "\n"


def run(plan: Plan, repeat: int) -> dict[str, Any]:
    report: dict[str, Any] = {**report_header(), "plan": {**asdict(plan), "repeat": repeat}}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as workdir:
        paths, report["bake_s"] = prepare(plan, Path(workdir))
        os.sync()  # the files just written are not flushed during a timed start
        report.update(measure(paths, repeat))
        [conversion] = [label.parent for label in paths.cache.glob("*/source.json")]
        report["files"] = {
            "folder": on_disk(paths.folder),
            "checkpoint": on_disk(paths.checkpoint),
            "baked": on_disk(paths.baked),
            "cached": on_disk(conversion),
        }
    import diffusers
    import torch

    report["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    report["summary"] = summarize(report)
    report["load_average_after"] = load_average()
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        result = _child(float(sys.argv[2]))
        print("RESULT " + json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of SD 1.5's architecture")
    parser.add_argument("--repeat", type=int, default=3, help="cold starts of each variant")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for checkpoint.md and checkpoint.json")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat={args.repeat}: must be at least 1")
    plan = PLANS["tiny" if args.tiny else "full"]
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    started = time.time()
    report = run(plan, args.repeat)
    report["command"] = " ".join(["python -m bench.checkpoint", *sys.argv[1:]])
    report["ratios"] = {variant: report["summary"][variant]["ratio"] for variant in VARIANTS}
    report["seconds"] = round(time.time() - started, 1)
    write_results(args.out, plan.stem, report, markdown(report))


if __name__ == "__main__":
    main()
