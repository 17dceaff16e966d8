"""Does the worker fit a 6 GB GTX 1060? SD 1.5's full architecture on a GPU capped at 6 GiB.

    python -m bench.gpu_check                 # on a machine with one NVIDIA GPU, under 8 minutes
    python -m bench.gpu_check --tiny DIR      # smoke run of the same code on the CPU with the tiny model, sides / 4

It builds SD 1.5 with random weights in fp16 (same memory and time as the real
weights), caps the process at 6 GiB with ``torch.cuda.set_per_process_memory_fraction``,
and runs the worker's own engine in the ``balanced`` profile at 512² x1, 768² x1
and 512² x4, recording whether each finished, its sub-batch, its peak memory and
its time. Then it provokes a real out-of-memory error (admission told the card
is 80 GiB, so 1024² x4 runs whole) and shows the frugal retry recover. Last, it
runs 512² x1 with one and with two units of a full-size ControlNet (random
weights, float16, 723 MB, loaded through the worker's CONTROLNET_DIR path). It
ends with a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.gpu_bench import kit_left_s
from bench.machine import code_version, describe_code
from src.adapters.controlnets import ControlNets, scan_controlnets
from src.errors import WorkerError
from src.models.loader import load_pipeline
from src.prepare.inputs import prepare_inputs
from src.run.engine import Engine
from src.run.memory import GIB, Profile, plan_sub_batch
from src.schema import parse_input
from src.settings import load_settings

CAP_GIB = 6.0
STEPS = 20
# The checks ask for more than the default limits allow (1024² x4).
LIMITS = {"MAX_PIXELS": str(1024 * 1024 * 4)}
CONTROLNET = "controlnet-random-weights"


# Under the GPU kit, the cases stop when less than this is left of the kit's call: the speed benchmark, its last
# step and the one issue 27 needs, plans within what is left (``bench.gpu_bench.kit_left_s``).
BENCH_RESERVE_S = 200
# --tiny: every side divided by this. The CPU has no memory to run out of, so the sizes prove nothing there, and
# 1024² x4 through the tiny model's VAE is most of the smoke run's time.
TINY_SIDE_DIVISOR = 4


@dataclass
class Case:
    width: int
    height: int
    num_images: int
    note: str = ""  # after the size, as written: ", forced OOM"
    profile: Profile = Profile.BALANCED
    admission_gib: float | None = None  # what admission is told the card has; None: the cap
    control_units: int = 0

    @property
    def name(self) -> str:
        size = f"{self.width}²" if self.width == self.height else f"{self.width}x{self.height}"
        return f"{size} x{self.num_images}{self.note}"


def run_case(engine: Engine, case: Case, steps: int) -> str:
    """Run one case; return its table row."""
    engine.profile = case.profile
    engine.gpu_bytes = int((case.admission_gib or CAP_GIB) * GIB) if engine.device.type == "cuda" else None
    request = parse_input(
        {
            "input": {
                "prompt": "a red fox in a snowy forest, detailed fur",
                "width": case.width,
                "height": case.height,
                "num_images": case.num_images,
                "num_inference_steps": steps,
                "seed": 1,
                "controlnets": [{"model": CONTROLNET, "image": _control_image()}] * case.control_units,
            }
        },
        engine.settings,
    )
    inputs = prepare_inputs(request, engine.settings, None)
    plan = plan_sub_batch(
        case.profile,
        case.width,
        case.height,
        case.num_images,
        gpu_bytes=engine.gpu_bytes,
        dtype_bytes=2,
        adapter_bytes=engine.controlnets.gpu_bytes(request.controlnets),
        control_units=case.control_units,
    )
    batch = f"{plan.batch}{' tiled' if plan.vae_tiling else ''}"
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    outcome, note = "yes", ""
    try:
        generation = engine.generate(inputs.request, controls=inputs.controls, timeout_s=600)
        note = "; ".join(generation.warnings)
    except WorkerError as error:
        outcome, note = "no", str(error)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / GIB if engine.device.type == "cuda" else float("nan")
    return f"| {case.name} | {case.profile.value} | {outcome} | {batch} | {peak:.2f} | {seconds:.1f} | {note[:160]} |"


def _control_image() -> str:
    """A 512² control map: white squares on black, as a base64 PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (512, 512))
    ImageDraw.Draw(image).rectangle((128, 128, 384, 384), outline="white", width=8)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def attach_controlnet(engine: Engine, folder: Path) -> None:
    """Give the engine one ControlNet built from its UNet (random weights where it has its own), in ``folder``."""
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(engine._pipeline.unet).save_pretrained(folder / CONTROLNET)
    engine.controlnets = ControlNets(
        engine._pipeline,
        scan_controlnets(str(folder)),
        device=engine.device,
        dtype=engine.dtype,
        cache_bytes=int(2e9),
    )


def build_engine(tiny: Path | None, controlnets: Path) -> Engine:
    """The worker's engine around SD 1.5's architecture on the GPU, or around the tiny model on the CPU,
    with a ControlNet in ``controlnets``."""
    limits = {**LIMITS, "CONTROLNET_DIR": str(controlnets)}
    if tiny is not None:
        settings = load_settings({**limits, "MODEL_ID": str(tiny), "DEVICE": "cpu"})
        pipeline = load_pipeline(settings, torch.float32)
        engine = Engine(
            pipeline,
            settings=settings,
            device=torch.device("cpu"),
            dtype=torch.float32,
            profile=Profile.CPU,
            gpu_bytes=None,
        )
        attach_controlnet(engine, controlnets)
        return engine
    from bench.sd15_random import build_sd15_random, check_parameter_counts

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(CAP_GIB * GIB / total, 1.0))
    pipeline = build_sd15_random("cuda", torch.float16)
    check_parameter_counts(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    settings = load_settings({**limits, "MODEL_ID": "sd15-random-weights", "GPU_MEMORY_GB": str(CAP_GIB)})
    engine = Engine(
        pipeline,
        settings=settings,
        device=torch.device("cuda"),
        dtype=torch.float16,
        profile=Profile.BALANCED,
        gpu_bytes=int(CAP_GIB * GIB),
    )
    attach_controlnet(engine, controlnets)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=Path, help="a tiny model folder: smoke-run on the CPU instead")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if args.tiny is None and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny DIR for a CPU smoke run")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-controlnets-") as controlnets:
        run_checks(build_engine(args.tiny, Path(controlnets)), args.tiny is not None, args.steps, started)


def run_checks(engine: Engine, tiny: bool, steps: int, started: float) -> None:
    """Print the header and one table row per case, each case within what the GPU kit has left."""
    device = torch.cuda.get_device_name(0) if engine.device.type == "cuda" else "CPU (tiny model)"
    print(f"# GPU check: {device}, capped at {CAP_GIB:g} GiB, torch {torch.__version__}, {datetime.date.today()}")
    print(f"Command: `{' '.join(['python -m bench.gpu_check', *sys.argv[1:]])}`")
    print(f"Code: {describe_code(code_version())}")
    print(f"model ready in {time.perf_counter() - started:.0f} s; {steps} steps, DPM++ 2M Karras\n")
    divisor = TINY_SIDE_DIVISOR if tiny else 1
    cases = [
        Case(512 // divisor, 512 // divisor, 1),
        Case(768 // divisor, 768 // divisor, 1),
        Case(512 // divisor, 512 // divisor, 4),
        # A real OOM: admission is told the card has 80 GiB, so 1024² x4 runs whole and the frugal retry must save it.
        Case(1024 // divisor, 1024 // divisor, 4, ", forced OOM", profile=Profile.HIGH, admission_gib=80),
        Case(512 // divisor, 512 // divisor, 1, " after the OOM"),
        Case(512 // divisor, 512 // divisor, 1, ", one ControlNet unit", control_units=1),
        Case(512 // divisor, 512 // divisor, 1, ", two ControlNet units", control_units=2),
    ]
    print("| case | profile | finished | sub-batch | peak GiB | seconds | warnings or error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        left = kit_left_s()
        if left is not None and left < BENCH_RESERVE_S:
            print(f"| {case.name} | | skipped: the GPU kit has {left:.0f} s left, kept for bench.gpu_bench | | | | |")
            continue
        print(run_case(engine, case, steps), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
