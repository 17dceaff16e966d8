"""What the per-request speed options trade on SD 1.5's full architecture: ``deepcache_interval`` and
``tome_ratio``, the denoising loop's time against how far the image moves from the default's.

    python -m bench.speed_options        # CPU, random fp32 weights, 256², 10 steps; about 4 minutes on 2 cores

The worker's engine, as deployed, runs the same job (one image, DPM++ 2M Karras, CFG 7.5) with each option's
value; the denoising time is its ``metadata.phases_ms``, the difference the mean and largest absolute difference
per pixel and channel (0 to 255) from the default job's image. The weights are random, so the difference says
how far the picture moves, not what that does to a real model's picture.
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

# (field, value) of each job; the first is the default job, the reference.
SETTINGS = (
    ("default", None),
    ("deepcache_interval", 2),
    ("deepcache_interval", 3),
    ("deepcache_interval", 5),
    ("tome_ratio", 0.3),
    ("tome_ratio", 0.5),
)


def pixels(answer: dict[str, Any]) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def measure(folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each setting's job through the worker's three stages, timed by phase, after one untimed warm-up."""
    from src.finish import finish
    from src.prepare import JobPlan, prepare
    from src.run.engine import Engine
    from src.settings import load_settings

    settings = load_settings({"MODEL_ID": str(folder)})
    engine = Engine.load(settings)
    request = {"prompt": "a lighthouse on a cliff at dusk", "num_inference_steps": args.steps, "seed": 1}
    request.update(width=args.side, height=args.side, scheduler="DPM++ 2M Karras", output_type="base64")

    def job(option: dict[str, Any]) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        plan = prepare(
            {"input": {**request, **option}},
            settings,
            catalog=lambda: engine.catalog,
            storage=None,
        )
        assert isinstance(plan, JobPlan)
        answer = finish(
            plan, engine.run(plan, timeout_s=3600), settings=settings, storage=None, job_id="b", started=started
        )
        return answer, (time.perf_counter() - started) * 1000

    job({})  # warm-up: the first job's allocations
    rows, reference = [], None
    for name, value in SETTINGS:
        answer, job_ms = job({} if value is None else {name: value})
        picture = pixels(answer)
        reference = picture if reference is None else reference
        difference = np.abs(picture - reference)
        rows.append(
            {
                "option": name,
                "value": value,
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
    report.update(command=" ".join(["python -m bench.speed_options", *sys.argv[1:]]), torch=torch.__version__)
    report.update(rows=rows, seconds=time.time() - started)
    lines = [
        f"{report['cpu']} ({report['machine']}), torch {torch.__version__}, {report['date']}, load average "
        f"{report['load_average_before'][0]:.2f} before; {args.model or 'SD 1.5 architecture, random fp32 weights'}, "
        f"{args.side}², "
        f"{args.steps} steps, DPM++ 2M Karras, CFG 7.5, one image",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s.",
        "",
        "| option | denoising s | speed-up | whole job s | mean difference | largest difference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        label = row["option"] if row["value"] is None else f"{row['option']} {row['value']:g}"
        lines.append(
            f"| {label} | "
            f"{row['denoising_ms'] / 1000:.2f} | "
            f"{base['denoising_ms'] / row['denoising_ms']:.2f}x | {row['job_ms'] / 1000:.2f} | "
            f"{row['mean_difference']:.2f} | {row['max_difference']} |"
        )
    write_results(args.out, "speed-options", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
