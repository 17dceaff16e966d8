"""Many models on one worker, on the CPU: what a swap costs, from host memory and from the volume.

    python -m bench.models                      # SD 1.5's architecture, random weights, float32: about 20 minutes
    python -m bench.models --tiny --out DIR     # the tiny model and its tiny models: the test suite's smoke run

Writes models.md and models.json (``--tiny``: models-tiny.md and models-tiny.json) into ``--out`` (default
bench/results), with the command, the CPU, the load average before and after, and the run's wall time.

Prepared first, in a temporary folder: the default model (a diffusers folder, which is also MODEL_CONFIG) and,
in MODELS_DIR, two single-file checkpoints with weights of their own (float16, as fine-tunes are shared).
Then, in this process, the worker's engine (``Engine.load``, DEVICE=cpu, float32) with MODELS_DIR, and:

- first use from the volume, three ways, each a fresh ``Models`` (the engine's host cache, empty): without
  MODEL_CACHE_DIR (the file checked, hashed and converted), with an empty MODEL_CACHE_DIR (converted, and the
  conversion kept), and with that MODEL_CACHE_DIR filled (the conversion read); each the read, then the copy
  into the modules;
- a swap from the host cache: the default model and a cached checkpoint in turn, ``--repeat`` times each way;
- a ``--steps``-step ``--side``² job on a model already in the modules, against the same job right after a
  swap from the host cache, in turn, ``--jobs`` times each;
- one small job (``CHECK_SIDE``², 2 steps) on a swapped-in model, against the same job on a worker started with
  that model as MODEL_ID: the largest difference of a pixel's channel (0: the same image).

Every file is read from a warm page cache: all were just written, and they fit in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import load_average, median_range, report_header, write_results
from bench.run import RESULTS

CHECKPOINTS = ("model-a", "model-b")
CHECK_SIDE = 256
# The contract: a swap from the host cache adds at most this much to a 25-step 512² job on this CPU.
WITHIN = 0.10


def prepare(workdir: Path, tiny: bool) -> tuple[Path, Path]:
    """The default model's folder and MODELS_DIR, with CHECKPOINTS in it."""
    import torch

    from builder import single_file

    default, models = workdir / "default", workdir / "models"
    models.mkdir()
    for index, name in enumerate((None, *CHECKPOINTS)):
        if tiny:
            from builder.tiny_model import build_tiny_pipeline

            with tempfile.TemporaryDirectory() as scratch:
                pipeline = build_tiny_pipeline(Path(scratch), seed=index)
        else:
            from bench.sd15_random import build_sd15_random

            pipeline = build_sd15_random(dtype=torch.float16 if name else torch.float32, seed=index)
        if name is None:
            pipeline.save_pretrained(default)
        else:
            single_file.save(single_file.checkpoint_state_dict(pipeline), models / f"{name}.safetensors")
        del pipeline
        print(f"wrote {name or 'the default model'}", file=sys.stderr, flush=True)
    return default, models


def _timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def first_uses(engine: Any, workdir: Path) -> dict[str, dict[str, float]]:
    """A first use of CHECKPOINTS[0] from the volume: without MODEL_CACHE_DIR, filling it, and from it."""
    from src.run.models import Models

    cache = workdir / "converted"
    cache.mkdir()
    ways = {"no_cache": None, "cache_filled_now": str(cache), "cache_already_filled": str(cache)}
    results = {}
    for way, folder in ways.items():
        settings = engine.settings.model_copy(update={"model_cache_dir": folder})
        models = Models.from_settings(
            engine._pipeline, settings, dtype=engine.dtype, pin=False, default=engine.identity
        )
        read_s, _ = _timed(lambda models=models: models._weights(CHECKPOINTS[0]))
        copy_s, _ = _timed(lambda models=models: models.use(CHECKPOINTS[0]))
        models.use(None)
        results[way] = {"read_s": read_s, "copy_s": copy_s}
        print(f"first use, {way}: read {read_s:.1f} s, copy {copy_s:.2f} s", file=sys.stderr, flush=True)
    return results


def cached_swaps(engine: Any, repeat: int) -> dict[str, list[float]]:
    """Swaps from the host cache: to the cached checkpoint and back to the default, ``repeat`` times."""
    models = engine.models
    models.use(CHECKPOINTS[0])  # read once: cached from here on
    models.use(None)
    swaps: dict[str, list[float]] = {"to_checkpoint": [], "to_default": []}
    for _ in range(repeat):
        swaps["to_checkpoint"].append(_timed(lambda: models.use(CHECKPOINTS[0]))[0])
        swaps["to_default"].append(_timed(lambda: models.use(None))[0])
    assert models.reads[CHECKPOINTS[0]] == 1, "a cached model is never read again"
    return swaps


def job(side: int, steps: int, model: str | None) -> dict[str, Any]:
    fields = {"prompt": "a red fox in a snowy forest", "width": side, "height": side}
    fields.update(num_inference_steps=steps, seed=1, **({"model": model} if model else {}))
    return {"id": "bench-models", "input": fields}


def jobs_with_and_without_a_swap(side: int, steps: int, count: int) -> dict[str, list[float]]:
    """The job on CHECKPOINTS[0] already in the modules, and right after the default model was swapped back in."""
    import handler

    times: dict[str, list[float]] = {"in_place": [], "after_swap": []}
    for _ in range(count):
        handler.get_engine().models.use(CHECKPOINTS[0])
        times["in_place"].append(_timed(lambda: asyncio.run(handler.handler(job(side, steps, CHECKPOINTS[0]))))[0])
        handler.get_engine().models.use(None)
        times["after_swap"].append(_timed(lambda: asyncio.run(handler.handler(job(side, steps, CHECKPOINTS[0]))))[0])
        print(f"jobs: {times['in_place'][-1]:.1f} s, {times['after_swap'][-1]:.1f} s", file=sys.stderr, flush=True)
    return times


def _pixels(response: dict[str, Any]) -> Any:
    import numpy as np
    from PIL import Image

    assert "images" in response, response
    with Image.open(io.BytesIO(base64.b64decode(response["images"][0]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def against_a_fresh_worker(models_dir: Path) -> dict[str, Any]:
    """One small job on a swapped-in model, then on a worker started with that model as MODEL_ID."""
    import handler

    swapped_s, swapped = _timed(lambda: asyncio.run(handler.handler(job(CHECK_SIDE, 2, CHECKPOINTS[0]))))
    os.environ["MODEL_ID"] = str(models_dir / f"{CHECKPOINTS[0]}.safetensors")
    del os.environ["MODELS_DIR"]
    handler._settings, handler._engine = None, None
    gc.collect()  # the first worker's weights and host cache go before the second loads
    load_s, _ = _timed(handler.get_engine)
    fresh_s, fresh = _timed(lambda: asyncio.run(handler.handler(job(CHECK_SIDE, 2, None))))
    return {
        "max_pixel_difference": int(abs(_pixels(swapped) - _pixels(fresh)).max()),
        "swapped_job_s": swapped_s,
        "fresh_worker_load_s": load_s,
        "fresh_job_s": fresh_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    report: dict[str, Any] = {**report_header(), "settings": {**vars(args), "out": str(args.out)}}
    report["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as scratch:
        workdir = Path(scratch)
        default, models_dir = prepare(workdir, args.tiny)
        os.environ.update(
            MODEL_ID=str(default),
            MODEL_CONFIG=str(default),
            MODELS_DIR=str(models_dir),
            DEVICE="cpu",
            DTYPE="float32",
            EMBED_PARAMETERS="false",
            HF_HUB_OFFLINE="1",
        )
        import handler

        parts = [getattr(handler.get_engine()._pipeline, part) for part in ("unet", "text_encoder", "vae")]
        report["model_mib"] = sum(tensor.nbytes for part in parts for tensor in part.state_dict().values()) / 2**20
        del parts
        report["first_use"] = first_uses(handler.get_engine(), workdir)
        gc.collect()
        report["cached_swap_s"] = cached_swaps(handler.get_engine(), args.repeat)
        report["jobs_s"] = jobs_with_and_without_a_swap(args.side, args.steps, args.jobs)
        report["fresh_worker"] = against_a_fresh_worker(models_dir)
    report["load_average_after"] = load_average()
    return report


def markdown(report: dict[str, Any]) -> str:
    settings, versions = report["settings"], report["versions"]
    swaps, jobs, first, fresh = report["cached_swap_s"], report["jobs_s"], report["first_use"], report["fresh_worker"]
    in_place, after = statistics.median(jobs["in_place"]), statistics.median(jobs["after_swap"])
    added = after / in_place - 1
    model = "the tiny model" if settings["tiny"] else "SD 1.5's architecture, random weights"
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Model: {model}, float32 on the CPU ({report['model_mib']:.0f} MiB of weights); checkpoints float16 on "
        "disk; every file read from a warm page cache.",
        "",
        "| swap | seconds, median (min-max) |",
        "| --- | --- |",
        f"| from host memory: a checkpoint into the modules ({settings['repeat']} times) | "
        f"{median_range(swaps['to_checkpoint'])} |",
        f"| from host memory: the default model back ({settings['repeat']} times) | "
        f"{median_range(swaps['to_default'])} |",
    ]
    for way, label in (
        ("no_cache", "first use, no MODEL_CACHE_DIR: checked, hashed, converted"),
        ("cache_filled_now", "first use, MODEL_CACHE_DIR empty: converted, the conversion kept"),
        ("cache_already_filled", "first use, MODEL_CACHE_DIR filled: the conversion read"),
    ):
        lines.append(f"| {label}; then the copy | {first[way]['read_s']:.2f} + {first[way]['copy_s']:.2f} |")
    lines += [
        "",
        "| job | seconds, median (min-max) |",
        "| --- | --- |",
        f"| {settings['side']}², {settings['steps']} steps, the model already in the modules | "
        f"{median_range(jobs['in_place'])} |",
        f"| the same job right after a swap from host memory | {median_range(jobs['after_swap'])} |",
        "",
        f"A swap from host memory adds {added:+.1%} to the {settings['steps']}-step {settings['side']}² job "
        f"(goal: at most {WITHIN:.0%}).",
        f"A {CHECK_SIDE}², 2-step job on the swapped-in checkpoint and on a worker started with it as MODEL_ID: "
        f"largest pixel difference {fresh['max_pixel_difference']}; {fresh['swapped_job_s']:.2f} s and "
        f"{fresh['fresh_job_s']:.2f} s (that worker loaded in {fresh['fresh_worker_load_s']:.1f} s).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model and its tiny models: seconds")
    parser.add_argument("--side", type=int, help="the job's side (default: 512, --tiny 64)")
    parser.add_argument("--steps", type=int, default=25, help="the job's steps (default 25)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs each way (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="cached swaps each way (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json")
    args = parser.parse_args(argv)
    args.side = args.side or (64 if args.tiny else 512)
    started = time.time()
    report = run(args)
    report["command"] = " ".join(["python -m bench.models", *argv])
    report["seconds"] = round(time.time() - started, 1)
    stem = "models-tiny" if args.tiny else "models"
    report = json.loads(json.dumps(report, default=str))
    write_results(args.out, stem, report, markdown(report))


if __name__ == "__main__":
    main()
