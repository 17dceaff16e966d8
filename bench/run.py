"""The CPU benchmark: the worker against bare diffusers, side by side, in one run.

    python -m bench.run                 # tiny and full-size random SD 1.5; about 8 to 12 minutes on 2 cores
    python -m bench.run --quick         # tiny model only, one repeat
    python -m bench.run --smoke --out DIR   # tiny model, 64², 2 steps, one repeat: seconds (the test suite)

Writes bench/results/cpu.md (a markdown table) and bench/results/cpu.json, which
also record the command, the CPU, the load average before and after, and the
run's wall time.

For each model (the tiny one; SD 1.5's full architecture with random weights,
saved as safetensors) it measures, each in fresh processes or alternating in
one process so that both sides see the same machine state:

- cold start: process start until ready, split into imports and load, for the
  worker (its real startup: settings, engine, runpod) and for bare
  ``import torch, diffusers`` + ``StableDiffusionPipeline.from_pretrained``;
- warm latency: ``asyncio.run(handler.handler(job))`` against the bare pipeline call with
  the same scheduler, steps and seed, and their ratio (the handler overhead);
- denoising steps per second, VAE decode and encode + base64 time per image;
- peak RSS of one job, worker against bare.

Every timing is repeated; medians and spreads (min-max) are reported. The ratios
of medians measured side by side are the figures that count: absolute times on
a shared machine drift.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import load_average, median_range, report_header, run_child, write_results

RESULTS = Path(__file__).resolve().parent / "results"
FULL_MODEL_DIR = Path(os.environ.get("BENCH_MODEL_CACHE", Path(tempfile.gettempdir()) / "sd15-random-bench"))
PROMPT = "a red fox in a snowy forest at dawn, detailed fur, soft light"


# --- child processes: each prints one JSON line ---------------------------------------------------------


def _child_cold(role: str, model: str, started: float) -> dict[str, float]:
    """Startup of one process, from its start (``started``, the parent's clock at spawn) to ready."""
    t0 = time.time()
    if role == "worker":
        os.environ["MODEL_ID"] = model
        import handler  # cheap: no torch

        handler.prepare()  # exactly what `python handler.py` does before it takes a job
        ready = time.time()
        return {"interpreter": t0 - started, "prepare": ready - t0, "total": ready - started}
    import diffusers
    import torch

    t_imported = time.time()
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipeline.to("cpu")
    ready = time.time()
    return {
        "interpreter": t0 - started,
        "imports": t_imported - t0,
        "load": ready - t_imported,
        "total": ready - started,
    }


def _bare_pipeline(model: str) -> Any:
    import diffusers
    import torch

    from src.models.checkpoints import WITHOUT_SAFETY_CHECKER

    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, **WITHOUT_SAFETY_CHECKER)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _bare_call(pipeline: Any, side: int, steps: int, output_type: str = "pil") -> Any:
    """The bare diffusers call matching the worker's default job: DPM++ 2M Karras, seed 1, CPU generator."""
    import diffusers
    import torch

    pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config, use_karras_sigmas=True
    )
    return pipeline(
        prompt=PROMPT,
        negative_prompt="",
        width=side,
        height=side,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(1)],
        output_type=output_type,
    ).images


def _job(side: int, steps: int) -> dict[str, Any]:
    return {
        "id": "bench",
        "input": {"prompt": PROMPT, "width": side, "height": side, "num_inference_steps": steps, "seed": 1},
    }


def _child_warm(model: str, sides: list[int], steps: list[int], repeat: int) -> dict[str, Any]:
    """Handler and bare pipeline, alternating in one process, plus the parts of a job."""
    os.environ["MODEL_ID"] = model
    import torch

    import handler
    from src.finish import outputs

    handler.get_engine()
    bare = _bare_pipeline(model)
    results: dict[str, Any] = {}
    for side, step_count in zip(sides, steps, strict=True):
        job = _job(side, step_count)
        assert "images" in asyncio.run(handler.handler(job))  # warm-up both sides
        _bare_call(bare, side, step_count)
        worker_s, bare_s = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            asyncio.run(handler.handler(job))
            worker_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            _bare_call(bare, side, step_count)
            bare_s.append(time.perf_counter() - started)
        # The parts: denoising alone, the VAE decode, and encode + base64 of one image.
        started = time.perf_counter()
        latents = _bare_call(bare, side, step_count, output_type="latent")
        denoise_s = time.perf_counter() - started
        with torch.inference_mode():
            started = time.perf_counter()
            decoded = bare.vae.decode(latents / bare.vae.config.scaling_factor).sample
            vae_s = time.perf_counter() - started
        image = bare.image_processor.postprocess(decoded, output_type="pil")[0]
        started = time.perf_counter()
        base64.b64encode(outputs.encode_image(image, "png", 90, "parameters"))
        encode_s = time.perf_counter() - started
        results[str(side)] = {
            "steps": step_count,
            "worker_s": worker_s,
            "bare_s": bare_s,
            "steps_per_s": step_count / denoise_s,
            "vae_decode_s": vae_s,
            "encode_base64_s": encode_s,
        }
    return results


def _child_peak(role: str, model: str, side: int, steps: int) -> dict[str, float]:
    """Peak RSS of a process that loads the model and runs one job."""
    if role == "worker":
        os.environ["MODEL_ID"] = model
        import handler

        assert "images" in asyncio.run(handler.handler(_job(side, steps)))
    else:
        _bare_call(_bare_pipeline(model), side, steps)
    # VmHWM, not getrusage's ru_maxrss: on Linux the latter survives exec, so a child would
    # report its parent's peak when that was higher.
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return {"peak_rss_mib": peak_kib / 1024}


def _child(argv: list[str]) -> None:
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    kind, role, model = argv[0], argv[1], argv[2]
    if kind == "cold":
        result: Any = _child_cold(role, model, float(argv[3]))
    elif kind == "warm":
        sides, steps, repeat = json.loads(argv[3]), json.loads(argv[4]), int(argv[5])
        result = _child_warm(model, sides, steps, repeat)
    else:
        result = _child_peak(role, model, int(argv[3]), int(argv[4]))
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: spawn, collect, summarize -----------------------------------------------------------------


def _spawn(*args: str) -> Any:
    return run_child("bench.run", "--child", *args)


def prepare_models(quick: bool, scratch: Path) -> dict[str, Path]:
    """The tiny model (fresh, in ``scratch``) and the full-size random one (cached between runs)."""
    from builder.tiny_model import write_tiny_model

    models = {"tiny": write_tiny_model(scratch / "tiny")}
    if not quick:
        if not (FULL_MODEL_DIR / "model_index.json").is_file():
            from bench.sd15_random import build_sd15_random, check_parameter_counts

            pipeline = build_sd15_random("cpu")
            check_parameter_counts(pipeline)
            pipeline.save_pretrained(FULL_MODEL_DIR)
        models["full"] = FULL_MODEL_DIR
    return models


PLANS = {
    # model: (sizes, steps per size, repeats)
    "tiny": ([256, 512], [25, 25], 5),
    "full": ([256, 512], [2, 1], 2),
}
# --smoke: the whole path (every child, the table, the JSON) at the smallest size, for the test suite.
SMOKE_PLAN = ([64], [2], 1)
# Cold starts per side; the cold-start ratio is the noisiest figure, so it gets the most.
COLD_REPEAT = 5


def run(quick: bool, smoke: bool = False) -> dict[str, Any]:
    import diffusers
    import torch

    report: dict[str, Any] = {
        **report_header(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        for name, folder in prepare_models(quick or smoke, Path(scratch)).items():
            report["models"][name] = measure(folder, PLANS[name] if not smoke else SMOKE_PLAN, quick or smoke)
            print(f"measured {name}", file=sys.stderr, flush=True)
    report["load_average_after"] = load_average()
    return report


def measure(folder: Path, plan: tuple[list[int], list[int], int], once: bool) -> dict[str, Any]:
    """Cold starts, warm jobs and peak RSS of the worker and bare diffusers on one model; ``once``: one of each."""
    sides, steps, repeat = plan
    repeat = 1 if once else repeat
    cold_repeat = 1 if once else COLD_REPEAT
    entry: dict[str, Any] = {"cold": {"worker": [], "bare": []}}
    for _ in range(cold_repeat):
        for role in ("bare", "worker"):
            entry["cold"][role].append(_spawn("cold", role, str(folder), repr(time.time())))
    entry["warm"] = _spawn("warm", "both", str(folder), json.dumps(sides), json.dumps(steps), str(repeat))
    entry["peak"] = {
        role: _spawn("peak", role, str(folder), str(sides[0]), str(steps[0])) for role in ("bare", "worker")
    }
    return entry


def ratios(entry: dict[str, Any]) -> dict[str, float]:
    """The figures that count: ratios of medians measured side by side."""
    cold_worker = statistics.median(run["total"] for run in entry["cold"]["worker"])
    cold_bare = statistics.median(run["total"] for run in entry["cold"]["bare"])
    result = {"cold_start": cold_worker / cold_bare}
    for side, warm in entry["warm"].items():
        result[f"handler_overhead_{side}"] = statistics.median(warm["worker_s"]) / statistics.median(warm["bare_s"])
    result["peak_rss"] = entry["peak"]["worker"]["peak_rss_mib"] / entry["peak"]["bare"]["peak_rss_mib"]
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, "
        f"torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        "",
        "| model | size | steps | worker job | bare pipeline | overhead | steps/s | VAE decode | encode+b64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in report["models"].items():
        figures = ratios(entry)
        for side, warm in entry["warm"].items():
            lines.append(
                f"| {name} | {side}² | {warm['steps']} | {median_range(warm['worker_s'])} | "
                f"{median_range(warm['bare_s'])} | "
                f"{figures[f'handler_overhead_{side}']:.3f} | {warm['steps_per_s']:.2f} | "
                f"{warm['vae_decode_s'] * 1000:.0f} ms | {warm['encode_base64_s'] * 1000:.1f} ms |"
            )
    lines += [
        "",
        "| model | cold start, worker | cold start, bare | ratio | worker phases (median) | peak RSS worker / bare |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in report["models"].items():
        figures = ratios(entry)
        worker_runs = entry["cold"]["worker"]
        phases = ", ".join(
            f"{phase} {statistics.median(run[phase] for run in worker_runs):.2f} s"
            for phase in worker_runs[0]
            if phase != "total"
        )
        peak = entry["peak"]
        lines.append(
            f"| {name} | {median_range([run['total'] for run in worker_runs])} | "
            f"{median_range([run['total'] for run in entry['cold']['bare']])} | "
            f"{figures['cold_start']:.3f} | {phases} | "
            f"{peak['worker']['peak_rss_mib']:.0f} / {peak['bare']['peak_rss_mib']:.0f} MiB "
            f"= {figures['peak_rss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, one repeat")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64², 2 steps, one repeat: seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for cpu.md and cpu.json")
    args = parser.parse_args()
    started = time.time()
    report = run(args.quick, smoke=args.smoke)
    report["command"] = " ".join(["python -m bench.run", *sys.argv[1:]])
    report["ratios"] = {name: ratios(entry) for name, entry in report["models"].items()}
    report["seconds"] = round(time.time() - started, 1)
    write_results(args.out, "cpu", report, markdown(report))


if __name__ == "__main__":
    main()
