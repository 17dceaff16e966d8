"""What LoRA costs a job on the CPU: no LoRA, one cached, one not cached, three, and no LoRA after them.

    python -m bench.loras                    # tiny model, 128², 10 steps, 15 rounds: about 30 s on 2 cores
    python -m bench.loras --full             # SD 1.5's architecture, random weights, 256², 4 steps, 7 rounds: 12 min
    python -m bench.loras --repeat 1 --out DIR   # the test suite's smoke run

Writes loras.md and loras.json (``--full``: loras-full.md and loras-full.json)
into ``--out`` (default bench/results), with the command, the CPU, the load
average before and after, and the run's wall time.

Three workers are loaded side by side in one process, each an ``Engine`` with
``LORA_DIR`` set, float32 on the CPU: one that never loads a LoRA, one whose
cache keeps every LoRA it loads, and one with ``LORA_CACHE_MB=0``, which loads a
job's LoRAs from the file and drops them after the job. Every job goes through
the worker's own path, ``schema.parse_input`` then ``Engine.generate``, with the
same prompt, size, steps, seed and scheduler. The cases:

1. a plain job (no LoRA) on the worker that never loaded one: the baseline;
2. one LoRA not cached: the file read, its hash, diffusers' load into the UNet
   and text encoder, the job, and the adapter's deletion (``LORA_CACHE_MB=0``);
3. one LoRA, cached (loaded by an earlier job);
4. three LoRAs, cached;
5. a plain job on the caching worker, whose 3 cached adapters are off.

Then the caching worker loads more LoRAs, untimed, until it holds ``CROWDED``,
and a second set of rounds times the baseline again against a plain job and a
one-LoRA job on that crowded worker: diffusers walks every module of the UNet
to find its device, and each cached adapter adds PEFT modules to every layer
it covers.

Each LoRA is rank 32 on every attention projection of the UNet and the text
encoder (``builder.tiny_lora``, kohya layout as published SD 1.5 LoRAs have it,
float32, random weights), at scale 1. After one untimed warm-up of each case,
the cases run once per round, in an order shuffled each round (seeded), and
each case's median over the rounds is compared with the baseline's of the same
rounds. The time a job spends loading its LoRA is the worker's own figure,
from its log line ``LoRA ... loaded (..., MB) in ... s``, which also gives the
adapter's memory. Each job also records the process's user and system CPU
seconds and minor page faults (``getrusage``): where a job's time went besides
arithmetic. The LoRA files are read from a warm page cache, as they were just
written.

Nothing touches the network: the models are local folders and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from bench.machine import LogArguments, load_average, median_range, report_header, write_results
from bench.run import RESULTS
from bench.tasks import OFFLINE_ENV, prepare_model
from bench.tasks import PLANS as TASK_PLANS

PROMPT = "a red fox in a snowy forest at dawn, detailed fur, soft light"
SEED = 1
GUIDANCE = 7.5
SCHEDULER = "DPM++ 2M Karras"
RANK = 32
LAYOUT = "kohya"
# The caching worker keeps every LoRA it loads: no eviction happens in a timed job.
CACHE_MB = 100_000
# As many adapters as LORA_CACHE_MB's default (1024 MB) holds of the full-size rank-32 ones (35 MB each).
CROWDED = 29
# The most LoRAs one job may name (MAX_LORAS's upper bound): the crowded cache is filled by a few such jobs.
FILL_PER_JOB = 16
CACHED = ("cached-1", "cached-2", "cached-3")
UNCACHED = "uncached"
EXTRA = tuple(f"extra-{index}" for index in range(1, CROWDED - len(CACHED) + 1))


@dataclass(frozen=True)
class Plan:
    """What one mode measures."""

    model: str
    description: str
    side: int
    steps: int
    repeat: int
    stem: str


PLANS = {
    "tiny": Plan("tiny", "the tiny test model", 128, 10, 15, "loras"),
    # A 256², 4-step job takes about 9 s on a quiet 2-core CPU: 8 jobs x (7 rounds + a warm-up), the three model
    # loads, the fill jobs and the 30 LoRA files come to about 12 minutes.
    "full": Plan("full", "SD 1.5's architecture, random weights", 256, 4, 7, "loras-full"),
}

Worker = Literal["fresh", "caching", "uncached"]


@dataclass(frozen=True)
class Case:
    """One kind of job: which worker runs it, with which LoRAs."""

    key: str
    label: str
    worker: Worker
    loras: tuple[str, ...]


BASELINE = Case("plain_fresh", "no LoRA, on a worker that never loaded one", "fresh", ())
CASES = (
    BASELINE,
    Case("one_uncached", "1 LoRA, not cached (LORA_CACHE_MB=0)", "uncached", (UNCACHED,)),
    Case("one_cached", "1 LoRA, cached", "caching", CACHED[:1]),
    Case("three_cached", "3 LoRAs, cached", "caching", CACHED),
    Case("plain_after", "no LoRA, on the worker after its LoRA jobs", "caching", ()),
)
CROWDED_CASES = (
    BASELINE,
    Case("plain_crowded", f"no LoRA, on the worker holding {CROWDED} cached", "caching", ()),
    Case("one_cached_crowded", f"1 LoRA, cached, on the worker holding {CROWDED}", "caching", CACHED[:1]),
)


# --- LoRA files -----------------------------------------------------------------------------------------


def write_loras(model: Path, folder: Path) -> dict[str, Any]:
    """Every LoRA the run names, each with its own seed, into ``folder``; return what one file holds."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from builder.tiny_lora import build_lora_state_dict, save_lora

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32)
    for seed, name in enumerate((*CACHED, UNCACHED, *EXTRA), start=1):
        state = build_lora_state_dict(unet, text_encoder, rank=RANK, seed=seed, layout=LAYOUT, targets="attention")
        save_lora(state, folder / f"{name}.safetensors", metadata={"generator": "bench.loras", "rank": str(RANK)})
    downs = [key for key in state if key.endswith(".lora_down.weight")]
    return {
        "rank": RANK,
        "layout": LAYOUT,
        "unet_layers": sum(key.startswith("lora_unet_") for key in downs),
        "text_encoder_layers": sum(key.startswith("lora_te_") for key in downs),
        "parameters": sum(tensor.numel() for key, tensor in state.items() if not key.endswith(".alpha")),
        "file_mb": (folder / f"{CACHED[0]}.safetensors").stat().st_size / 1e6,
    }


# --- measuring -------------------------------------------------------------------------------------------


def _max_difference(first: Image.Image, second: Image.Image) -> int:
    """The largest difference of one channel of one pixel, 0 to 255."""
    import numpy as np

    return int(np.abs(np.asarray(first.convert("RGB"), np.int16) - np.asarray(second.convert("RGB"), np.int16)).max())


class Workers:
    """The three engines, and the one job each case runs on them."""

    def __init__(self, plan: Plan, model: Path, lora_dir: Path) -> None:
        from src.run.engine import Engine
        from src.settings import load_settings

        self.plan = plan
        common = {"MODEL_ID": str(model), "DEVICE": "cpu", "DTYPE": "float32", "LORA_DIR": str(lora_dir)}
        self.settings = {
            "fresh": load_settings(common),
            "caching": load_settings({**common, "LORA_CACHE_MB": str(CACHE_MB), "MAX_LORAS": str(FILL_PER_JOB)}),
            "uncached": load_settings({**common, "LORA_CACHE_MB": "0"}),
        }
        self.engines = {worker: Engine.load(settings) for worker, settings in self.settings.items()}

    def cached(self, worker: Worker) -> int:
        return len(self.engines[worker].loras.cached)

    def run(self, worker: Worker, loras: Sequence[str]) -> tuple[dict[str, float], Image.Image]:
        """Time one job on ``worker`` naming ``loras``: its seconds, CPU seconds and page faults, and its image."""
        from src.schema import parse_input

        job = {
            "prompt": PROMPT,
            "negative_prompt": "",
            "width": self.plan.side,
            "height": self.plan.side,
            "num_inference_steps": self.plan.steps,
            "guidance_scale": GUIDANCE,
            "seed": SEED,
            "scheduler": SCHEDULER,
            "loras": [{"name": name, "scale": 1.0} for name in loras],
        }
        request = parse_input({"input": job}, self.settings[worker])
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        generation = self.engines[worker].generate(request, timeout_s=3600)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage = {
            "seconds": seconds,
            "user_s": after.ru_utime - before.ru_utime,
            "system_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt,
        }
        return usage, generation.images[0]


def time_rounds(
    workers: Workers, cases: Sequence[Case], repeat: int, load_log: LogArguments, shuffle: random.Random
) -> dict[str, Any]:
    """One untimed warm-up of each case, then ``repeat`` rounds of every case in a shuffled order; each case's
    times, the adapters cached before it, its ratio to the baseline, and its image against the baseline's."""
    for case in cases:
        workers.run(case.worker, case.loras)
    loads_before = len(load_log.loads)
    usage: dict[str, list[dict[str, float]]] = {case.key: [] for case in cases}
    cached_before: dict[str, list[int]] = {case.key: [] for case in cases}
    images: dict[str, Image.Image] = {}
    rounds = []
    for index in range(repeat):
        order = list(cases)
        shuffle.shuffle(order)
        rounds.append([case.key for case in order])
        for case in order:
            cached_before[case.key].append(workers.cached(case.worker))
            job, images[case.key] = workers.run(case.worker, case.loras)
            usage[case.key].append(job)
        print(f"round {index + 1} of {repeat}", file=sys.stderr, flush=True)
    loads = load_log.loads[loads_before:]
    expected = [name for case in cases if case.worker == "uncached" for name in case.loras] * repeat
    if sorted(entry["name"] for entry in loads) != sorted(expected):
        raise RuntimeError(f"the timed jobs loaded {[entry['name'] for entry in loads]}, expected {expected}")
    seconds = {key: [job["seconds"] for job in jobs] for key, jobs in usage.items()}
    baseline = statistics.median(seconds[BASELINE.key])
    results: dict[str, Any] = {
        case.key: {
            "label": case.label,
            "worker": case.worker,
            "loras": list(case.loras),
            "seconds": seconds[case.key],
            "median_s": statistics.median(seconds[case.key]),
            "ratio": statistics.median(seconds[case.key]) / baseline,
            **{key: [job[key] for job in usage[case.key]] for key in ("user_s", "system_s", "minor_faults")},
            "cached_before": cached_before[case.key],
            "max_pixel_difference": _max_difference(images[case.key], images[BASELINE.key]),
        }
        for case in cases
    }
    for case in cases:
        if case.worker == "uncached":
            results[case.key]["load_s"] = [entry["seconds"] for entry in loads]
    return {"cases": results, "rounds": rounds}


def measure(plan: Plan, repeat: int, model: Path, lora_dir: Path) -> dict[str, Any]:
    """The five cases; then the crowded cache's."""
    load_log = LogArguments("LoRA %s loaded", ("name", "models", "adapter_mb", "seconds"))
    logger = logging.getLogger("src.adapters.loras")
    logger.setLevel(logging.INFO)
    logger.addHandler(load_log)
    shuffle = random.Random(0)
    try:
        workers = Workers(plan, model, lora_dir)
        first = time_rounds(workers, CASES, repeat, load_log, shuffle)
        for start in range(0, len(EXTRA), FILL_PER_JOB):
            workers.run("caching", EXTRA[start : start + FILL_PER_JOB])
        if workers.cached("caching") != CROWDED:
            raise RuntimeError(f"the caching worker holds {workers.cached('caching')} LoRAs, not {CROWDED}")
        print(f"the caching worker holds {CROWDED} LoRAs", file=sys.stderr, flush=True)
        crowded = time_rounds(workers, CROWDED_CASES, repeat, load_log, shuffle)
    finally:
        logger.removeHandler(load_log)
    return {**first, "crowded": crowded, "loads": load_log.loads}


def run(plan: Plan, repeat: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        **report_header(),
        "plan": {**asdict(plan), "repeat": repeat, "scheduler": SCHEDULER, "lora_cache_mb": CACHE_MB},
    }
    with tempfile.TemporaryDirectory(prefix="bench-loras-") as workdir:
        model = prepare_model(TASK_PLANS[plan.model], Path(workdir))
        lora_dir = Path(workdir) / "loras"
        report["lora"] = write_loras(model, lora_dir)
        print("wrote the LoRA files", file=sys.stderr, flush=True)
        report.update(measure(plan, repeat, model, lora_dir))
    first_load = next(entry for entry in report["loads"] if entry["name"] == CACHED[0])
    report["lora"].update(adapter_mb=first_load["adapter_mb"], models=first_load["models"])
    cases = report["cases"]
    cases["one_uncached"]["uncached_minus_cached_s"] = (
        cases["one_uncached"]["median_s"] - cases["one_cached"]["median_s"]
    )
    import diffusers
    import peft
    import torch

    report["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}
    report["load_average_after"] = load_average()
    return report


def _count(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.0f} k" if value >= 1e4 else f"{value:.0f}"


def _rows(model: str, cases: dict[str, Any], adapter_mb: float) -> list[str]:
    rows = [
        "| model | job | LoRAs cached before it | job time | / no LoRA, fresh worker | LoRA load (worker log) | "
        "CPU user, system, minor page faults | max pixel difference from no LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in cases.values():
        cached = max(entry["cached_before"])
        held = f"{cached} ({cached * adapter_mb:.0f} MB)" if cached else "0"
        load = median_range(entry["load_s"]) if "load_s" in entry else ""
        cpu = (
            f"{statistics.median(entry['user_s']):.2f} s, {statistics.median(entry['system_s']):.2f} s, "
            f"{_count(statistics.median(entry['minor_faults']))}"
        )
        rows.append(
            f"| {model} | {entry['label']} | {held} | {median_range(entry['seconds'])} | {entry['ratio']:.3f} | "
            f"{load} | "
            f"{cpu} | {entry['max_pixel_difference']} |"
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lora = report["lora"]
    versions = report["versions"]
    uncached = report["cases"]["one_uncached"]
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}, peft {versions['peft']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Model: {plan['description']}, float32, {plan['side']}², {plan['steps']} steps; {plan['scheduler']}, "
        f"seed {SEED}, guidance {GUIDANCE:g}; each LoRA rank {lora['rank']} on every attention projection of the "
        f"UNet and text encoder ({lora['layout']} layout), scale 1; the caching worker has "
        f"LORA_CACHE_MB={plan['lora_cache_mb']}; median (min-max) of {plan['repeat']} rounds, the cases in a "
        "shuffled order each round, after one warm-up of each.",
        "",
        *_rows(plan["model"], report["cases"], lora["adapter_mb"]),
        "",
        f"The caching worker then loads more LoRAs, untimed, until it holds {CROWDED}; the same rounds again:",
        "",
        *_rows(plan["model"], report["crowded"]["cases"], lora["adapter_mb"]),
        "",
        "| model | one LoRA file | layers: UNet + text encoder | parameters | file | adapter in memory (worker log) "
        "| not cached - cached, job medians |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {plan['model']} | rank {lora['rank']}, {lora['layout']}, float32 | {lora['unet_layers']} + "
        f"{lora['text_encoder_layers']} | {lora['parameters'] / 1e6:.2f} M | {lora['file_mb']:.1f} MB | "
        f"{lora['adapter_mb']:.1f} MB | {uncached['uncached_minus_cached_s']:.2f} s |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    os.environ.update(OFFLINE_ENV)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD 1.5's architecture with random weights, 256²")
    parser.add_argument("--repeat", type=int, help="rounds of every case (default: 15 tiny, 7 full)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for loras.md and loras.json")
    args = parser.parse_args()
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat={args.repeat}: must be at least 1")
    plan = PLANS["full" if args.full else "tiny"]
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    started = time.time()
    report = run(plan, args.repeat or plan.repeat)
    report["command"] = " ".join(["python -m bench.loras", *sys.argv[1:]])
    report["ratios"] = {key: entry["ratio"] for key, entry in report["cases"].items()}
    report["ratios"].update(
        {key: entry["ratio"] for key, entry in report["crowded"]["cases"].items() if key != BASELINE.key}
    )
    report["seconds"] = round(time.time() - started, 1)
    write_results(args.out, plan.stem, report, markdown(report))


if __name__ == "__main__":
    main()
