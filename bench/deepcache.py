"""What ``deepcache_interval`` trades on SD 1.5's full architecture: the denoising loop's time against how far the
image moves from the default's.

    python -m bench.deepcache            # CPU, random fp32 weights, 256², 10 steps; about 3 minutes on 2 cores

The worker's engine, as deployed, runs the same job (one image, DPM++ 2M Karras, CFG 7.5) at each interval; the
denoising time is its ``metadata.phases_ms``, the difference the mean and largest absolute difference per pixel
and channel (0 to 255) from interval 1's image. The weights are random, so the difference says how far the
picture moves, not what that does to a real model's picture.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.machine import report_header, write_results

INTERVALS = (1, 2, 3, 5)


def pixels(answer: dict[str, Any]) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def measure(folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each interval's job through the worker's three stages, timed by phase, after one untimed warm-up."""
    from src.finish import finish
    from src.prepare import JobPlan, prepare
    from src.run.engine import Engine
    from src.settings import load_settings

    settings = load_settings({"MODEL_ID": str(folder)})
    engine = Engine.load(settings)
    request = {"prompt": "a lighthouse on a cliff at dusk", "num_inference_steps": args.steps, "seed": 1}
    request.update(width=args.side, height=args.side, scheduler="DPM++ 2M Karras", output_type="base64")

    def job(interval: int) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        plan = prepare(
            {"input": {**request, "deepcache_interval": interval}},
            settings,
            catalog=lambda: engine.catalog,
            storage=None,
        )
        assert isinstance(plan, JobPlan)
        answer = finish(
            plan, engine.run(plan, timeout_s=3600), settings=settings, storage=None, job_id="b", started=started
        )
        return answer, (time.perf_counter() - started) * 1000

    job(1)  # warm-up: the first job's allocations
    rows, reference = [], None
    for interval in INTERVALS:
        answer, job_ms = job(interval)
        picture = pixels(answer)
        reference = picture if reference is None else reference
        difference = np.abs(picture - reference)
        rows.append(
            {
                "interval": interval,
                "job_ms": job_ms,
                "denoising_ms": answer["metadata"]["phases_ms"]["denoising"],
                "mean_difference": float(difference.mean()),
                "max_difference": int(difference.max()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", type=Path, help="a diffusers folder; default: SD 1.5's architecture, random weights")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    from bench.sd15_random import build_sd15_random, check_parameter_counts

    report = report_header()
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        folder = args.model or Path(workdir) / "sd15-random"
        if args.model is None:
            model = build_sd15_random("cpu", torch.float32)
            check_parameter_counts(model)
            model.save_pretrained(folder)
            del model
        rows = measure(folder, args)
    base = rows[0]
    report.update(command=" ".join(["python -m bench.deepcache", *sys.argv[1:]]), torch=torch.__version__)
    report.update(rows=rows, seconds=time.time() - started)
    lines = [
        f"{report['cpu']} ({report['machine']}), torch {torch.__version__}, {report['date']}, load average "
        f"{report['load_average_before'][0]:.2f} before; {args.model or 'SD 1.5 architecture, random fp32 weights'}, "
        f"{args.side}², "
        f"{args.steps} steps, DPM++ 2M Karras, CFG 7.5, one image",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s.",
        "",
        "| deepcache_interval | denoising s | speed-up | whole job s | mean difference | largest difference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['interval']} | {row['denoising_ms'] / 1000:.2f} | "
            f"{base['denoising_ms'] / row['denoising_ms']:.2f}x | {row['job_ms'] / 1000:.2f} | "
            f"{row['mean_difference']:.2f} | {row['max_difference']} |"
        )
    write_results(args.out, "deepcache", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
