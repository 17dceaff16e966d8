"""GPU benchmark: plain diffusers against the worker's default mode and FAST_MODE, on one NVIDIA GPU.

    python -m bench.gpu_bench            # under 8 minutes on an A100/H100-class card

SD 1.5's full architecture with random weights in fp16 (bench/sd15_random.py),
512², 25 steps, DPM++ 2M Karras, batch 1 and batch 4. For each mode: cold start
(load from a saved folder, move to the GPU, and for FAST_MODE the compilation and
warm-up), median job latency over repeats (the worker's include PNG encoding and
base64), plain diffusers' UNet steps per second, and peak GPU memory. Speed-ups are ratios of medians
measured in this one run, against plain diffusers with SDPA on the same card.

Then, in each worker mode, model swaps (MODELS_DIR holds a second model with weights of its own): its first
use (read into pinned host memory, then copied in), a swap to it and back from the host cache (median of
``--repeat``), and the graphs torch.compile made during the swaps and a batch-1 job on the swapped-in model
(FAST_MODE: 0 when the compiled graphs stay valid).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STEPS = 25
SIDE = 512
BATCHES = (1, 4)


def _timed(run: Callable[[], Any], repeat: int) -> float:
    run()  # warm: cuDNN autotuning, allocator, lazy CUDA start
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def plain(folder: Path, repeat: int) -> dict[str, Any]:
    """Bare diffusers: from_pretrained, .to('cuda'), SDPA (its default), the same scheduler and seed."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    started = time.perf_counter()
    pipeline = StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    torch.cuda.synchronize()
    cold = time.perf_counter() - started
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config, use_karras_sigmas=True)
    result: dict[str, Any] = {"cold_start_s": cold}
    for batch in BATCHES:

        def job(output_type: str = "pil", batch: int = batch) -> Any:
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(batch)]
            return pipeline(
                "a red fox in a snowy forest",
                num_inference_steps=STEPS,
                width=SIDE,
                height=SIDE,
                num_images_per_prompt=batch,
                generator=generators,
                output_type=output_type,
            )

        result[f"batch{batch}_s"] = _timed(job, repeat)
        denoise = _timed(lambda job=job: job("latent"), repeat)
        result[f"batch{batch}_steps_per_s"] = STEPS / denoise
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result  # the pipeline goes with this frame; main() then releases its memory


def worker(folder: Path, models_dir: Path, repeat: int, fast: bool) -> dict[str, Any]:
    """The worker's engine and handler path, as deployed, with FAST_MODE off or on; then its model swaps."""
    from src.finish.response import encode_response
    from src.run.engine import Engine
    from src.schema import parse_input
    from src.settings import load_settings

    settings = load_settings(
        {
            "MODEL_ID": str(folder),
            "MODEL_CONFIG": str(folder),
            "MODELS_DIR": str(models_dir),
            "FAST_MODE": str(fast).lower(),
            "MEMORY_PROFILE": "high",
        }
    )
    started = time.perf_counter()
    engine = Engine.load(settings)  # FAST_MODE compiles and warms up in here
    torch.cuda.synchronize()
    result: dict[str, Any] = {"cold_start_s": time.perf_counter() - started}
    for batch in BATCHES:
        request = parse_input(
            {
                "input": {
                    "prompt": "a red fox in a snowy forest",
                    "num_images": batch,
                    "seed": 0,
                    "output_type": "base64",
                }
            },
            settings,
        )

        def job(request: Any = request) -> Any:
            generation = engine.generate(request, timeout_s=600)
            return encode_response(request, generation, settings=settings, storage=None, job_id="bench", started=0.0)

        result[f"batch{batch}_s"] = _timed(job, repeat)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["swaps"] = swaps(engine, settings, repeat)
    return result


def swaps(engine: Any, settings: Any, repeat: int) -> dict[str, float]:
    """The second model's first use, then swaps from the host cache, and the graphs compiled meanwhile."""
    from torch._dynamo.utils import counters

    from bench.models import CHECKPOINTS, cached_swaps
    from src.schema import parse_input

    graphs = counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    engine.models.use(CHECKPOINTS[0])  # synchronizes the device
    first_use = time.perf_counter() - started
    engine.models.use(None)
    times = cached_swaps(engine, repeat)
    request = parse_input({"input": {"prompt": "a red fox in a snowy forest", "model": CHECKPOINTS[0]}}, settings)
    engine.generate(request, timeout_s=600)
    return {
        "first_use_s": first_use,
        "swap_s": statistics.median(times["to_checkpoint"]),
        "swap_back_s": statistics.median(times["to_default"]),
        "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs one NVIDIA GPU")
    started = time.time()
    from bench.models import CHECKPOINTS
    from bench.sd15_random import build_sd15_random, check_parameter_counts

    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir) / "sd15-random"
        models_dir = Path(workdir) / "models"
        model = build_sd15_random("cuda", torch.float16)
        check_parameter_counts(model)
        model.save_pretrained(folder)
        del model
        # The second model a request may name: a diffusers folder with weights of its own.
        build_sd15_random("cuda", torch.float16, seed=1).save_pretrained(models_dir / CHECKPOINTS[0])
        _release()
        results = {"plain diffusers": plain(folder, args.repeat)}
        _release()
        results["worker, default"] = worker(folder, models_dir, args.repeat, fast=False)
        _release()
        capability = torch.cuda.get_device_capability()
        if capability >= (7, 0):
            results["worker, FAST_MODE"] = worker(folder, models_dir, args.repeat, fast=True)
    base = results["plain diffusers"]
    name = torch.cuda.get_device_name()
    lines = [
        f"{name} (compute capability {capability[0]}.{capability[1]}), torch {torch.__version__}, "
        f"{datetime.date.today()}; SD 1.5 architecture, random fp16 weights, {SIDE}², {STEPS} steps, DPM++ 2M Karras",
        f"Command: `{' '.join(['python -m bench.gpu_bench', *sys.argv[1:]])}`, {time.time() - started:.0f} s.",
        "",
        "| mode | cold start | batch 1 job | speed-up | batch 4 job | speed-up | plain steps/s (b1, b4) | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, result in results.items():
        steps = (
            f"{base['batch1_steps_per_s']:.1f}, {base['batch4_steps_per_s']:.1f}" if mode == "plain diffusers" else ""
        )
        lines.append(
            f"| {mode} | {result['cold_start_s']:.1f} s | {result['batch1_s']:.2f} s | "
            f"{base['batch1_s'] / result['batch1_s']:.2f} | {result['batch4_s']:.2f} s | "
            f"{base['batch4_s'] / result['batch4_s']:.2f} | {steps} | {result['peak_gib']:.2f} |"
        )
    lines += [
        "",
        "| mode | model swap: first use | from the host cache | back to the default | graphs compiled |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, result in results.items():
        if "swaps" in result:
            swap = result["swaps"]
            lines.append(
                f"| {mode} | {swap['first_use_s']:.2f} s | {swap['swap_s']:.3f} s | {swap['swap_back_s']:.3f} s | "
                f"{swap['graphs_compiled']} |"
            )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "gpu.json").write_text(json.dumps({"device": name, "results": results}, indent=2), encoding="utf-8")
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
