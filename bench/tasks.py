"""The image tasks on the CPU: the worker against bare diffusers, task by task, and peak RSS with every task.

    python -m bench.tasks                    # tiny model, 128², 10 steps, 3 repeats: about 20 s on 2 cores
    python -m bench.tasks --full             # SD 1.5 architecture, random weights, 256², 4 steps, 2 repeats: 6 min
    python -m bench.tasks --repeat 1 --out DIR   # the test suite's smoke run

Writes tasks.md and tasks.json (``--full``: tasks-full.md and tasks-full.json) into
``--out`` (default bench/results), with the command, the CPU, the load average
before and after, and the run's wall time.

For each task (txt2img, img2img, inpaint, outpaint, hires fix with the latent
upscaler) it times, alternating in one process, after one warm-up of each side:

- the worker: ``handler.handler(job)``, whose input image and mask arrive as
  base64 PNGs and whose output is a base64 PNG; so its figure includes decoding
  the input, preparing the canvas and mask, pasting back, and encoding the PNG;
- bare diffusers: the task's own pipeline (``StableDiffusionPipeline``,
  ``StableDiffusionImg2ImgPipeline`` or ``StableDiffusionInpaintPipeline`` built
  from the same components) given PIL images already decoded, returning PIL;

with the same size, steps, seed, CPU generator and scheduler (the worker's
default, DPM++ 2M Karras), each pass with a fresh generator and its input image
encoded at the VAE's mean, as the worker runs it, and the image tasks running
the worker's count of steps (A1111's). Their ratio of medians is the figure that
counts. The last image of each side is compared with the other's: the largest
difference of a pixel's channel, 0 when the two computed the same image. Inpaint
and outpaint are not the same image: diffusers' inpaint pipeline blends the kept
part in its own way, the worker as A1111 does (``src.run.inpaint``), and pastes
it back.

Then two fresh processes load the same model the same way (``MODEL_ID``,
``handler.get_engine()``) and run five jobs each through the handler: one only
text-to-image, the other every task. Each reports its peak RSS; the ratio (all
tasks / text-to-image only) shows whether the image tasks hold a second copy of
the weights. Both run their largest job at the hires size, so the activations
peak alike and the ratio measures the weights.

The network is never touched: ``HF_HUB_OFFLINE=1``, and every process here
refuses to open a socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bench.machine import load_average, median_range, report_header, run_child, write_results
from bench.run import FULL_MODEL_DIR, RESULTS
from src.prepare.passes import strength_for
from src.schema import STRENGTH_CAP

PROMPT = "a red fox in a snowy forest at dawn, detailed fur, soft light"
SEED = 1
GUIDANCE = 7.5
SCHEDULER = "DPM++ 2M Karras"
STRENGTH = 0.75
HIRES_STRENGTH = 0.5
# Outpaint adds this many pixels on the right of an image that narrow, so that its canvas is side x side.
OUTPAINT_RIGHT = 64
TASKS = ("txt2img", "img2img", "inpaint", "outpaint", "hires")
# Settings pinned for the worker, whatever the shell holds: the bare side runs float32 on the CPU too.
WORKER_ENV = {"DEVICE": "cpu", "DTYPE": "float32"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class Plan:
    """What one mode measures."""

    model: str
    description: str
    side: int
    steps: int
    # Steps of the warm-ups and of the RSS children's jobs: the same shapes, so the same kernels and peaks.
    light_steps: int
    hires_scale: float
    repeat: int
    stem: str

    @property
    def hires_side(self) -> int:
        return int(self.side * self.hires_scale)


PLANS = {
    "tiny": Plan("tiny", "the tiny test model", 128, 10, 10, 2.0, 3, "tasks"),
    # 256², 4 steps, hires to 384² and 2 repeats keep the run near 6 minutes on a quiet 2-core CPU: a 256² job
    # takes about 9 s there and a hires job 19 s (about 30 s with a 512² second pass), and each job runs 6 times
    # (a light warm-up and 2 timed runs per side) besides the two RSS processes.
    "full": Plan("full", "SD 1.5's architecture, random weights", 256, 4, 2, 1.5, 2, "tasks-full"),
}


# --- inputs -------------------------------------------------------------------------------------------


def _test_image(width: int, height: int) -> Image.Image:
    """A smooth picture with some grain, the same every run: PNG decodes it at a realistic cost."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = np.random.default_rng(0).normal(0, 8, (height, width, 3))
    pixels = np.stack([x / width * 255, y / height * 255, (np.sin(x / 9) * np.cos(y / 13) + 1) * 127], axis=-1)
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8), mode="RGB")


def _centre_mask(side: int) -> Image.Image:
    """White (repaint) in the middle half, black (keep) around it."""
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, side * 3 // 4, side * 3 // 4))
    return mask


def _outpaint_canvas(part: Image.Image, right: int) -> tuple[Image.Image, Image.Image]:
    """Bare diffusers' outpaint: ``part`` with its right edge stretched ``right`` pixels, and a mask of that strip."""
    import numpy as np

    pixels = np.pad(np.asarray(part), ((0, 0), (0, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(pixels, mode="RGB")
    mask = Image.new("L", canvas.size, 0)
    mask.paste(255, (part.width, 0, canvas.width, canvas.height))
    return canvas, mask


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class TaskImages:
    """The decoded images bare diffusers gets, and the base64 PNGs the worker gets."""

    image: Image.Image
    mask: Image.Image
    outpaint_part: Image.Image
    outpaint_canvas: Image.Image
    outpaint_mask: Image.Image

    @classmethod
    def for_side(cls, side: int) -> TaskImages:
        part = _test_image(side - OUTPAINT_RIGHT, side)
        canvas, mask = _outpaint_canvas(part, OUTPAINT_RIGHT)
        return cls(_test_image(side, side), _centre_mask(side), part, canvas, mask)


def worker_job(task: str, plan: Plan, steps: int, encoded: dict[str, str]) -> dict[str, Any]:
    """The RunPod job for ``task``: inline base64 PNG in, base64 PNG out."""
    job: dict[str, Any] = {
        "prompt": PROMPT,
        "negative_prompt": "",
        "width": plan.side,
        "height": plan.side,
        "num_inference_steps": steps,
        "guidance_scale": GUIDANCE,
        "seed": SEED,
        "scheduler": SCHEDULER,
        "output_type": "base64",
        "output_format": "png",
    }
    if task == "hires":
        job["hires"] = {"scale": plan.hires_scale, "steps": steps, "strength": HIRES_STRENGTH, "upscaler": "latent"}
    elif task in ("img2img", "inpaint"):
        job.update(image=encoded["image"], strength=STRENGTH)
        if task == "inpaint":
            job["mask"] = encoded["mask"]
    elif task == "outpaint":
        job.update(image=encoded["outpaint_part"], strength=STRENGTH, outpaint={"right": OUTPAINT_RIGHT})
    return {"id": f"bench-{task}", "input": job}


def _encoded(images: TaskImages) -> dict[str, str]:
    return {
        "image": _png_base64(images.image),
        "mask": _png_base64(images.mask),
        "outpaint_part": _png_base64(images.outpaint_part),
    }


def steps_run(task: str, plan: Plan) -> str:
    """The denoising steps each pass runs, as the pipelines count them."""
    if task == "txt2img":
        return str(plan.steps)
    if task == "hires":
        return f"{plan.steps} + {plan.steps}"
    return str(a1111_steps(plan.steps))


def a1111_steps(steps: int) -> int:
    """The steps an image task runs at ``STRENGTH``, A1111's count: int(steps x min(strength, 0.999)) + 1."""
    return int(steps * min(STRENGTH, STRENGTH_CAP)) + 1


# --- bare diffusers ----------------------------------------------------------------------------------------


class Bare:
    """Bare diffusers: the model loaded once, one pipeline per task class over the same components."""

    def __init__(self, model: Path) -> None:
        import torch
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

        self.text = StableDiffusionPipeline.from_pretrained(
            model, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
        )
        self.img2img = StableDiffusionImg2ImgPipeline(**self.text.components, requires_safety_checker=False)
        self.inpaint = StableDiffusionInpaintPipeline(**self.text.components, requires_safety_checker=False)
        self.scheduler_config = self.text.scheduler.config
        for pipeline in (self.text, self.img2img, self.inpaint):
            pipeline.set_progress_bar_config(disable=True)

    def _ready(self, pipeline: Any) -> Any:
        """``pipeline`` with a fresh DPM++ 2M Karras scheduler, as the worker gives each job."""
        from diffusers import DPMSolverMultistepScheduler

        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config, use_karras_sigmas=True)
        return pipeline

    def run(self, task: str, plan: Plan, steps: int, images: TaskImages) -> Image.Image:
        """One image of ``task``, from PIL images already decoded."""
        import torch

        from src.run.noise import encoded_at_mean

        def call(pipeline: Any, **arguments: Any) -> Any:
            # As the worker runs a pass (and A1111): a fresh CPU generator, the input image at the VAE's mean.
            generator = [torch.Generator("cpu").manual_seed(SEED)]
            with encoded_at_mean(pipeline):
                return self._ready(pipeline)(**common, generator=generator, **arguments)

        common: dict[str, Any] = {
            "prompt": PROMPT,
            "negative_prompt": "",
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE,
        }
        size = {"width": plan.side, "height": plan.side}
        # The strength at which diffusers runs the steps the worker runs (A1111's count).
        strength = strength_for(steps, a1111_steps(steps))
        if task == "txt2img":
            result = call(self.text, **size)
        elif task == "img2img":
            result = call(self.img2img, image=images.image, strength=strength)
        elif task == "inpaint":
            result = call(self.inpaint, image=images.image, mask_image=images.mask, strength=strength, **size)
        elif task == "outpaint":
            canvas, mask = images.outpaint_canvas, images.outpaint_mask
            result = call(self.inpaint, image=canvas, mask_image=mask, strength=strength, **size)
        elif task == "hires":
            latents = call(self.text, **size, output_type="latent").images
            larger = torch.nn.functional.interpolate(latents, scale_factor=plan.hires_scale, mode="bilinear")
            # A1111's count, as the worker runs it: all `steps`, the last of a schedule stretched to steps / strength.
            common["num_inference_steps"] = int(steps / HIRES_STRENGTH)
            result = call(self.img2img, image=larger, strength=HIRES_STRENGTH)
        else:
            raise ValueError(task)
        image: Image.Image = result.images[0]
        return image


# --- measuring -------------------------------------------------------------------------------------------


def _forbid_network() -> None:
    """Make any network connection or name lookup in this process fail at once, naming it. A Unix socket is no
    network: multiprocessing's fork server (``BENCH_FORK_CHILDREN=1``) is reached through one."""

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.connect" and args[0].family == socket.AF_UNIX:
            return
        if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
            raise RuntimeError(f"bench.tasks is offline, and something tried {event}{args!r}")

    sys.addaudithook(hook)


def _worker_environment(model: Path) -> dict[str, str]:
    """The environment the worker runs in: this model, float32 on the CPU, offline, nothing else of ours."""
    from src.settings import Settings

    ours = {str(field.alias) for field in Settings.model_fields.values()}
    env = {key: value for key, value in os.environ.items() if key not in ours}
    env.update(MODEL_ID=str(model), **WORKER_ENV, **OFFLINE_ENV)
    return env


def _decoded(response: dict[str, Any]) -> Image.Image:
    if "images" not in response:
        raise RuntimeError(f"the worker answered an error: {response.get('error')}")
    image = Image.open(io.BytesIO(base64.b64decode(response["images"][0]["image"])))
    image.load()
    return image


def _max_difference(first: Image.Image, second: Image.Image) -> int | None:
    """The largest difference of one channel of one pixel, 0 to 255; None when the sizes differ."""
    import numpy as np

    if first.size != second.size:
        return None
    return int(np.abs(np.asarray(first.convert("RGB"), np.int16) - np.asarray(second.convert("RGB"), np.int16)).max())


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def measure_tasks(plan: Plan, repeat: int, model: Path) -> dict[str, Any]:
    """Each task through the worker and through bare diffusers, alternating, after a warm-up of each."""
    environment = _worker_environment(model)
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)
    import handler

    handler.get_engine()
    bare = Bare(model)
    images = TaskImages.for_side(plan.side)
    encoded = _encoded(images)
    results: dict[str, Any] = {}
    for task in TASKS:
        job = worker_job(task, plan, plan.steps, encoded)
        _decoded(asyncio.run(handler.handler(worker_job(task, plan, plan.light_steps, encoded))))
        bare.run(task, plan, plan.light_steps, images)
        worker_s, bare_s = [], []
        for _ in range(repeat):
            seconds, response = _timed(lambda job=job: asyncio.run(handler.handler(job)))
            worker_s.append(seconds)
            seconds, bare_image = _timed(functools.partial(bare.run, task, plan, plan.steps, images))
            bare_s.append(seconds)
        worker_image = _decoded(response)
        results[task] = {
            "steps": steps_run(task, plan),
            "output_size": list(worker_image.size),
            "worker_s": worker_s,
            "bare_s": bare_s,
            "ratio": statistics.median(worker_s) / statistics.median(bare_s),
            "max_pixel_difference": _max_difference(worker_image, bare_image),
        }
        print(f"measured {task}", file=sys.stderr, flush=True)
    return results


def rss_jobs(mode: str, plan: Plan, encoded: dict[str, str]) -> list[dict[str, Any]]:
    """Five jobs each: text-to-image only (the last at the hires size), or every task (the last hires)."""
    if mode == "txt2img":
        larger = {"width": plan.hires_side, "height": plan.hires_side}
        jobs = [worker_job("txt2img", plan, plan.light_steps, encoded) for _ in range(5)]
        jobs[-1]["input"].update(larger)
        return jobs
    return [worker_job(task, plan, plan.light_steps, encoded) for task in TASKS]


def rss_child(mode: str, plan: Plan) -> dict[str, Any]:
    """Load the model as the worker does, run the mode's jobs through the handler, report the peak RSS."""
    import resource

    import handler

    encoded = _encoded(TaskImages.for_side(plan.side))
    handler.get_engine()
    jobs = rss_jobs(mode, plan, encoded)
    sizes = [list(_decoded(asyncio.run(handler.handler(job))).size) for job in jobs]
    # VmHWM is this process's own peak. ru_maxrss (KiB on Linux) also counts the parent's pages it was forked
    # with, kept across exec; both are reported, and the table uses VmHWM.
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    vm_hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return {
        "mode": mode,
        "jobs": [worker_task(job) for job in jobs],
        "output_sizes": sizes,
        "peak_rss_mib": vm_hwm_kib / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def worker_task(job: dict[str, Any]) -> str:
    """The task a job's input asks for: the schema's name, or hires."""
    data = job["input"]
    if "hires" in data:
        return "hires"
    if "mask" in data:
        return "inpaint"
    if "outpaint" in data:
        return "outpaint"
    return "img2img" if "image" in data else "txt2img"


def measure_rss(plan: Plan, model: Path) -> dict[str, Any]:
    """Peak RSS of two fresh worker processes, one per mode, and their ratio.

    One after the other: side by side on 2 cores, torch's threads spin against each other and the run takes
    twice as long.
    """
    flags = [*(["--full"] if plan.model == "full" else []), "--rss-child"]
    rss: dict[str, Any] = {
        mode: run_child("bench.tasks", *flags, mode, env=_worker_environment(model)) for mode in ("txt2img", "all")
    }
    rss["ratio"] = rss["all"]["peak_rss_mib"] / rss["txt2img"]["peak_rss_mib"]
    return rss


def prepare_model(plan: Plan, workdir: Path) -> Path:
    """The tiny model, written fresh into ``workdir`` as `python -m builder.tiny_model DIR` does; or the
    full-size one, cached between runs as `python -m bench.run` caches it."""
    if plan.model == "tiny":
        from builder.tiny_model import write_tiny_model

        return write_tiny_model(workdir / "tiny")
    if not (FULL_MODEL_DIR / "model_index.json").is_file():
        from bench.sd15_random import build_sd15_random, check_parameter_counts

        pipeline = build_sd15_random("cpu")
        check_parameter_counts(pipeline)
        pipeline.save_pretrained(FULL_MODEL_DIR)
    return FULL_MODEL_DIR


def run(plan: Plan, repeat: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        **report_header(),
        "plan": {**asdict(plan), "repeat": repeat, "scheduler": SCHEDULER, "strength": STRENGTH},
    }
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as workdir:
        model = prepare_model(plan, Path(workdir))
        # The fresh processes first, while this one holds no model.
        report["rss"] = measure_rss(plan, model)
        print("measured peak RSS", file=sys.stderr, flush=True)
        report["tasks"] = measure_tasks(plan, repeat, model)
    import diffusers
    import torch

    report["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    report["load_average_after"] = load_average()
    return report


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, "
        f"torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Model: {plan['description']}, float32; {plan['scheduler']}, seed {SEED}, guidance {GUIDANCE:g}, "
        f"strength {plan['strength']:g} (hires {HIRES_STRENGTH:g}, latent upscaler); "
        f"median (min-max) of {plan['repeat']} after one warm-up of each side.",
        "",
        "| task | size | steps run | worker job | bare diffusers | worker / bare | max pixel difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    side = plan["side"]
    for task, entry in report["tasks"].items():
        width = entry["output_size"][0]
        size = f"{side}² → {width}²" if task == "hires" else f"{side}²"
        difference = "-" if entry["max_pixel_difference"] is None else str(entry["max_pixel_difference"])
        lines.append(
            f"| {plan['model']} {task} | {size} | {entry['steps']} | {median_range(entry['worker_s'])} | "
            f"{median_range(entry['bare_s'])} | {entry['ratio']:.3f} | {difference} |"
        )
    rss = report["rss"]
    lines += [
        "",
        "| model | peak RSS, 5 txt2img jobs | peak RSS, one job of each task | all tasks / txt2img only |",
        "| --- | --- | --- | --- |",
        f"| {plan['model']} | {rss['txt2img']['peak_rss_mib']:.0f} MiB | {rss['all']['peak_rss_mib']:.0f} MiB | "
        f"{rss['ratio']:.3f} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    os.environ.update(OFFLINE_ENV)
    _forbid_network()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD 1.5's architecture with random weights, 256²")
    parser.add_argument("--repeat", type=int, help="timed jobs per side and task (default: 3 tiny, 2 full)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for tasks.md and tasks.json")
    parser.add_argument("--rss-child", choices=("txt2img", "all"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = PLANS["full" if args.full else "tiny"]
    if args.rss_child:
        import logging

        logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
        print("RESULT " + json.dumps(rss_child(args.rss_child, plan)), flush=True)
        return
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat={args.repeat}: must be at least 1")
    started = time.time()
    report = run(plan, args.repeat or plan.repeat)
    report["command"] = " ".join(["python -m bench.tasks", *sys.argv[1:]])
    report["ratios"] = {task: entry["ratio"] for task, entry in report["tasks"].items()}
    report["ratios"]["peak_rss"] = report["rss"]["ratio"]
    report["seconds"] = round(time.time() - started, 1)
    write_results(args.out, plan.stem, report, markdown(report))


if __name__ == "__main__":
    main()
