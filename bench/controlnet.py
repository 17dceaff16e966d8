"""What ControlNet costs a job on the CPU: 0, 1 and 2 units through the worker and through bare diffusers,
and a ControlNet's first use.

    python -m bench.controlnet                   # tiny model, 128², 10 steps, 10 rounds: about 40 s on 2 cores
    python -m bench.controlnet --full            # SD 1.5's architecture and full-size ControlNets, random
                                                 # weights, 256², 4 steps, 3 rounds: about 8 minutes
    python -m bench.controlnet --repeat 1 --out DIR   # the test suite's smoke run

Writes controlnet.md and controlnet.json (``--full``: controlnet-full.md and
controlnet-full.json) into ``--out`` (default bench/results), with the command,
the CPU, the load average before and after, and the run's wall time.

Two ControlNets are copied from the model's UNet (``ControlNetModel.from_unet``,
361 M parameters at full size) and given random weights where diffusers starts
them at zero (``builder.tiny_model.build_tiny_controlnet``, seeds 0 and 1), then
saved as diffusers folders in float32; the first is also saved as one
``.safetensors`` file in the layout of lllyasviel's ``control_v11p_sd15_*``
files. The full-size ones are written once and kept next to the full-size
model that ``python -m bench.run`` caches.

Two workers are loaded side by side in one process, each an ``Engine`` with
``CONTROLNET_DIR`` set, float32 on the CPU: one whose cache keeps every
ControlNet it loads, and one with ``CONTROLNET_CACHE_MB=0``, which loads a job's
ControlNets from disk and drops them after the job. Every worker job goes the
worker's own way, ``schema.parse_input``, ``inputs.prepare_inputs`` (which
decodes the control images, sent as base64 PNGs) and ``Engine.generate``.
Bare diffusers runs ``StableDiffusionPipeline`` (no unit),
``StableDiffusionControlNetPipeline`` with one ``ControlNetModel`` (one unit)
and with a ``MultiControlNetModel`` of both (two units), built over the caching
worker's loaded components (a second copy of SD 1.5 would not fit beside the
rest in this machine's memory), with its own ControlNets loaded from the same
folders and the control images already decoded. Both sides use the same
prompt, size, steps, seed, CPU generator and scheduler (DPM++ 2M Karras, a
fresh one per job), and each unit its defaults: scale 1, start 0, end 1,
balanced.

After one untimed warm-up of each case, the cases run once per round in an
order shuffled each round (seeded); each figure is a median over the rounds,
and each ratio one of medians from the same rounds. The time a job spends
loading a ControlNet is the worker's own figure, from its log line
``loaded ControlNet ... in ... s``. Its files are read from a warm page cache,
as they were just written or read. The last image of each worker case is
compared with bare diffusers' of as many units, and the not-cached jobs' with
the cached one-unit job's.

Nothing touches the network: the models are local folders and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
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
from bench.run import FULL_MODEL_DIR, RESULTS
from bench.tasks import OFFLINE_ENV, _max_difference, _png_base64, _test_image, prepare_model
from bench.tasks import PLANS as TASK_PLANS

PROMPT = "a red fox in a snowy forest at dawn, detailed fur, soft light"
SEED = 1
GUIDANCE = 7.5
SCHEDULER = "DPM++ 2M Karras"
# The two ControlNets as diffusers folders, and the first one's weights again as one file.
FIRST, SECOND = "control-a", "control-b"
FIRST_FILE = "control-a-file"
# The caching worker keeps every ControlNet it loads: no eviction happens in a timed job.
CACHE_MB = 100_000
# The full-size ControlNets, written once (about 4.3 GB in float32) and kept for later runs.
FULL_CONTROLNET_DIR = FULL_MODEL_DIR.parent / f"{FULL_MODEL_DIR.name}-controlnets"


@dataclass(frozen=True)
class Plan:
    """What one mode measures."""

    model: str
    description: str
    side: int
    steps: int
    # Steps of the warm-up jobs: the same shapes, so the same kernels, for less time.
    warmup_steps: int
    repeat: int
    stem: str


PLANS = {
    "tiny": Plan("tiny", "the tiny test model and tiny ControlNets", 128, 10, 10, 10, "controlnet"),
    # A 256², 4-step job takes about 11 s on a quiet 2-core CPU without a unit, 15 s with one and 18 s with two.
    # 8 jobs x 3 rounds, the 2-step warm-ups and the loads come to about 8 minutes; writing the full-size
    # ControlNets, the first time, adds one.
    "full": Plan(
        "full",
        "SD 1.5's architecture and full-size ControlNets, random weights",
        256,
        4,
        2,
        3,
        "controlnet-full",
    ),
}

Side = Literal["worker", "bare", "uncached"]


@dataclass(frozen=True)
class Case:
    """One kind of job: who runs it, with which ControlNets."""

    key: str
    side: Side
    units: tuple[str, ...]


UNIT_COUNTS = (0, 1, 2)
CASES = (
    *(Case(f"worker_{count}", "worker", (FIRST, SECOND)[:count]) for count in UNIT_COUNTS),
    *(Case(f"bare_{count}", "bare", (FIRST, SECOND)[:count]) for count in UNIT_COUNTS),
    Case("first_use_folder", "uncached", (FIRST,)),
    Case("first_use_file", "uncached", (FIRST_FILE,)),
)
FIRST_USE = {"first_use_folder": "diffusers folder", "first_use_file": "single .safetensors file"}


# --- the ControlNets -------------------------------------------------------------------------------------


def write_controlnets(model: Path, folder: Path) -> None:
    """The two ControlNets of ``model``'s UNet as diffusers folders, and the first as one file, into ``folder``."""
    import torch
    from diffusers import UNet2DConditionModel

    from builder import single_file
    from builder.tiny_model import build_tiny_controlnet

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=torch.float32)
    for seed, name in enumerate((FIRST, SECOND)):
        controlnet = build_tiny_controlnet(unet, seed=seed)
        controlnet.save_pretrained(folder / name)
        if name == FIRST:
            single_file.save(single_file.controlnet_state_dict(controlnet), folder / f"{FIRST_FILE}.safetensors")


def prepare_controlnets(plan: Plan, model: Path, workdir: Path) -> Path:
    """The tiny ControlNets, written fresh into ``workdir``; or the full-size ones, written once and kept."""
    if plan.model == "tiny":
        folder = workdir / "controlnets"
        write_controlnets(model, folder)
        return folder
    if not (FULL_CONTROLNET_DIR / f"{FIRST_FILE}.safetensors").is_file():
        # Written beside, then renamed: an interrupted run leaves no half-written folder behind.
        partial = FULL_CONTROLNET_DIR.with_name(FULL_CONTROLNET_DIR.name + ".partial")
        write_controlnets(model, partial)
        partial.rename(FULL_CONTROLNET_DIR)
    return FULL_CONTROLNET_DIR


def describe_controlnets(folder: Path) -> dict[str, Any]:
    """What one ControlNet holds, and its sizes on disk as a folder and as a file."""
    import math

    from src.models.safetensors_header import read_header, tensor_shapes

    header, _start = read_header(folder / FIRST / "diffusion_pytorch_model.safetensors")
    return {
        "parameters": sum(math.prod(shape) for shape in tensor_shapes(header).values()),
        "folder_mb": sum(path.stat().st_size for path in (folder / FIRST).iterdir()) / 1e6,
        "file_mb": (folder / f"{FIRST_FILE}.safetensors").stat().st_size / 1e6,
    }


# --- the two sides -----------------------------------------------------------------------------------------


class ControlImages:
    """One control image per unit: decoded for bare diffusers, base64 PNGs for the worker."""

    def __init__(self, side: int) -> None:
        picture = _test_image(side, side)
        self.decoded = [picture, picture.transpose(Image.Transpose.ROTATE_90)]
        self.encoded = [_png_base64(image) for image in self.decoded]


class Workers:
    """The caching and the not-caching engine, and the one job each runs."""

    def __init__(self, model: Path, controlnet_dir: Path) -> None:
        from src.run.engine import Engine
        from src.settings import load_settings

        common = {"MODEL_ID": str(model), "DEVICE": "cpu", "DTYPE": "float32", "CONTROLNET_DIR": str(controlnet_dir)}
        self.settings = {
            "worker": load_settings({**common, "CONTROLNET_CACHE_MB": str(CACHE_MB)}),
            "uncached": load_settings({**common, "CONTROLNET_CACHE_MB": "0"}),
        }
        self.engines = {side: Engine.load(settings) for side, settings in self.settings.items()}

    def run(self, side: Side, units: Sequence[str], side_px: int, steps: int, images: ControlImages) -> Image.Image:
        """One job on ``side`` naming ``units``, from the parsed request to the image."""
        from src.prepare.inputs import prepare_inputs
        from src.schema import parse_input

        job = {
            "prompt": PROMPT,
            "negative_prompt": "",
            "width": side_px,
            "height": side_px,
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE,
            "seed": SEED,
            "scheduler": SCHEDULER,
            "controlnets": [{"model": name, "image": images.encoded[index]} for index, name in enumerate(units)],
        }
        settings = self.settings[side]
        inputs = prepare_inputs(parse_input({"input": job}, settings), settings, None)
        generation = self.engines[side].generate(
            inputs.request, images=inputs.images, controls=inputs.controls, timeout_s=3600
        )
        image: Image.Image = generation.images[0]
        return image


class Bare:
    """Bare diffusers: one pipeline per unit count over the same components, with its own ControlNets."""

    def __init__(self, components: dict[str, Any], controlnet_dir: Path) -> None:
        import torch
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        nets = [ControlNetModel.from_pretrained(controlnet_dir / name, dtype=torch.float32) for name in (FIRST, SECOND)]
        self.pipelines = {
            0: StableDiffusionPipeline(**components, requires_safety_checker=False),
            1: StableDiffusionControlNetPipeline(**components, controlnet=nets[0], requires_safety_checker=False),
            2: StableDiffusionControlNetPipeline(
                **components, controlnet=MultiControlNetModel(nets), requires_safety_checker=False
            ),
        }
        self.scheduler_config = components["scheduler"].config
        for pipeline in self.pipelines.values():
            pipeline.set_progress_bar_config(disable=True)

    def run(self, count: int, side_px: int, steps: int, images: ControlImages) -> Image.Image:
        """One image with ``count`` units, from control images already decoded."""
        import torch
        from diffusers import DPMSolverMultistepScheduler

        pipeline = self.pipelines[count]
        # A fresh DPM++ 2M Karras scheduler, as the worker gives each job.
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config, use_karras_sigmas=True)
        arguments: dict[str, Any] = {
            "prompt": PROMPT,
            "negative_prompt": "",
            "width": side_px,
            "height": side_px,
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE,
            "generator": [torch.Generator("cpu").manual_seed(SEED)],
        }
        if count == 1:
            arguments["image"] = images.decoded[0]
        elif count == 2:
            arguments["image"] = images.decoded[:2]
        image: Image.Image = pipeline(**arguments).images[0]
        return image


# --- measuring -------------------------------------------------------------------------------------------


class Runner:
    """Every case's job: the workers, bare diffusers and the control images, at the plan's size."""

    def __init__(self, plan: Plan, model: Path, controlnet_dir: Path) -> None:
        self.plan = plan
        self.workers = Workers(model, controlnet_dir)
        # The caching worker's loaded models, shared: the same weights on both sides.
        pipeline = self.workers.engines["worker"].controlnets.pipeline
        self.bare = Bare(pipeline.components, controlnet_dir)
        self.images = ControlImages(plan.side)

    def run(self, case: Case, steps: int) -> tuple[float, Image.Image]:
        started = time.perf_counter()
        if case.side == "bare":
            image = self.bare.run(len(case.units), self.plan.side, steps, self.images)
        else:
            image = self.workers.run(case.side, case.units, self.plan.side, steps, self.images)
        return time.perf_counter() - started, image


def _progress(seconds: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.1f} s" for key, value in seconds.items())


def measure(plan: Plan, repeat: int, model: Path, controlnet_dir: Path) -> dict[str, Any]:
    """One untimed warm-up of each case, then ``repeat`` rounds of every case in a shuffled order."""
    load_log = LogArguments("loaded ControlNet %s", ("name", "seconds"))
    logger = logging.getLogger("src.adapters.controlnets")
    logger.setLevel(logging.INFO)
    logger.addHandler(load_log)
    shuffle = random.Random(0)
    try:
        runner = Runner(plan, model, controlnet_dir)
        warm_up = {case.key: runner.run(case, plan.warmup_steps)[0] for case in CASES}
        print(f"warmed up: {_progress(warm_up)}", file=sys.stderr, flush=True)
        loads_before = len(load_log.loads)
        seconds: dict[str, list[float]] = {case.key: [] for case in CASES}
        images: dict[str, Image.Image] = {}
        rounds = []
        for index in range(repeat):
            order = list(CASES)
            shuffle.shuffle(order)
            rounds.append([case.key for case in order])
            for case in order:
                job_s, images[case.key] = runner.run(case, plan.steps)
                seconds[case.key].append(job_s)
            done = {key: seconds[key][-1] for key in rounds[-1]}
            print(f"round {index + 1} of {repeat}: {_progress(done)}", file=sys.stderr, flush=True)
        loads = load_log.loads[loads_before:]
    finally:
        logger.removeHandler(load_log)
    # Only the not-caching worker loads in a timed job: the caching one holds both ControlNets since its warm-up.
    expected = [name for case in CASES if case.side == "uncached" for name in case.units] * repeat
    if sorted(entry["name"] for entry in loads) != sorted(expected):
        raise RuntimeError(f"the timed jobs loaded {[entry['name'] for entry in loads]}, expected {expected}")
    return {"seconds": seconds, "rounds": rounds, "loads": loads, "images": images}


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    """Each unit count's worker and bare medians, their ratio and the cost of a unit; each first use's cost."""
    seconds, images = measured["seconds"], measured["images"]
    median = {key: statistics.median(values) for key, values in seconds.items()}
    units = {
        str(count): {
            "worker_s": seconds[f"worker_{count}"],
            "bare_s": seconds[f"bare_{count}"],
            "ratio": median[f"worker_{count}"] / median[f"bare_{count}"],
            "worker_over_0_units": median[f"worker_{count}"] / median["worker_0"],
            "bare_over_0_units": median[f"bare_{count}"] / median["bare_0"],
            "max_pixel_difference": _max_difference(images[f"worker_{count}"], images[f"bare_{count}"]),
        }
        for count in UNIT_COUNTS
    }
    first_use = {}
    for case in CASES:
        if case.side != "uncached":
            continue
        [name] = case.units
        first_use[case.key] = {
            "form": FIRST_USE[case.key],
            "controlnet": name,
            "seconds": seconds[case.key],
            "load_s": [entry["seconds"] for entry in measured["loads"] if entry["name"] == name],
            "minus_cached_s": median[case.key] - median["worker_1"],
            "max_pixel_difference": _max_difference(images[case.key], images["worker_1"]),
        }
    ratios = {f"worker_over_bare_{count}": units[str(count)]["ratio"] for count in UNIT_COUNTS}
    for count in UNIT_COUNTS[1:]:
        ratios[f"worker_{count}_units_over_0"] = units[str(count)]["worker_over_0_units"]
        ratios[f"bare_{count}_units_over_0"] = units[str(count)]["bare_over_0_units"]
    return {"units": units, "first_use": first_use, "ratios": ratios, "rounds": measured["rounds"]}


def run(plan: Plan, repeat: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        **report_header(),
        "plan": {**asdict(plan), "repeat": repeat, "scheduler": SCHEDULER, "controlnet_cache_mb": CACHE_MB},
    }
    with tempfile.TemporaryDirectory(prefix="bench-controlnet-") as workdir:
        model = prepare_model(TASK_PLANS[plan.model], Path(workdir))
        controlnet_dir = prepare_controlnets(plan, model, Path(workdir))
        report["controlnet"] = describe_controlnets(controlnet_dir)
        print("the ControlNets are ready", file=sys.stderr, flush=True)
        report.update(summarize(measure(plan, repeat, model, controlnet_dir)))
    import diffusers
    import torch

    report["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    report["load_average_after"] = load_average()
    return report


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    net = report["controlnet"]
    versions = report["versions"]
    model = plan["model"]
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Model: {plan['description']}, float32, {plan['side']}², {plan['steps']} steps; {plan['scheduler']}, "
        f"seed {SEED}, guidance {GUIDANCE:g}; each unit scale 1, start 0, end 1, balanced, its control image a "
        f"{plan['side']}² PNG; one ControlNet: {net['parameters'] / 1e6:.1f} M parameters; median (min-max) of "
        f"{plan['repeat']} rounds, the cases in a shuffled order each round, after one warm-up of each.",
        "",
        "| model | ControlNet units | worker job | bare diffusers | worker / bare | worker / worker, 0 units | "
        "bare / bare, 0 units | max pixel difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count, entry in report["units"].items():
        lines.append(
            f"| {model} | {count} | {median_range(entry['worker_s'])} | {median_range(entry['bare_s'])} | "
            f"{entry['ratio']:.3f} | "
            f"{entry['worker_over_0_units']:.3f} | {entry['bare_over_0_units']:.3f} | "
            f"{entry['max_pixel_difference']} |"
        )
    cached = report["units"]["1"]
    lines += [
        "",
        "| model | 1 unit, its ControlNet | on disk | worker job | load (worker log) | job - cached job, medians | "
        "max pixel difference from the cached job |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    sizes = {"first_use_folder": net["folder_mb"], "first_use_file": net["file_mb"]}
    for key, entry in report["first_use"].items():
        lines.append(
            f"| {model} | {entry['form']}, not cached (CONTROLNET_CACHE_MB=0) | {sizes[key]:.0f} MB | "
            f"{median_range(entry['seconds'])} | {median_range(entry['load_s'])} | {entry['minus_cached_s']:.2f} s | "
            f"{entry['max_pixel_difference']} |"
        )
    lines.append(
        f"| {model} | cached (loaded by an earlier job) |  | {median_range(cached['worker_s'])} |  | 0.00 s | 0 |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    os.environ.update(OFFLINE_ENV)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="SD 1.5's architecture and full-size ControlNets, random weights, 256²"
    )
    parser.add_argument("--repeat", type=int, help="rounds of every case (default: 10 tiny, 3 full)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for controlnet.md and controlnet.json")
    args = parser.parse_args()
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat={args.repeat}: must be at least 1")
    plan = PLANS["full" if args.full else "tiny"]
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    started = time.time()
    report = run(plan, args.repeat or plan.repeat)
    report["command"] = " ".join(["python -m bench.controlnet", *sys.argv[1:]])
    report["seconds"] = round(time.time() - started, 1)
    write_results(args.out, plan.stem, report, markdown(report))


if __name__ == "__main__":
    main()
