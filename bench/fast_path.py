"""FAST_MODE's compiled path against the modules as written: how far each kind of job's image moves, and what
compiles when, through torch.compile's real inductor backend.

    python -m bench.fast_path                  # CPU, the tiny model, inductor's C++ kernels; about 5 minutes on 2 cores
    python -m bench.fast_path --device cuda    # one NVIDIA GPU: FAST_MODE as the worker applies it, CUDA graphs too

The worker's engine runs each kind of job (512² warm-up shapes aside) twice: through FAST_MODE's compiled UNet and
VAE decoder (src/run/fast_path.py), then with the modules as written (``uncompiled``). The table gives the mean and
largest difference per pixel and channel (0 to 255), how many graphs torch had compiled after the job (a kind that
adds none replays what was compiled before: dynamic shapes at work), and the job's seconds, compiles included
(torch's compile caches start empty). On
the CPU FAST_MODE is applied by hand (the worker applies it on CUDA only), without CUDA graphs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import report_header, write_results

JOB = {"prompt": "a lighthouse on a cliff at dusk", "num_inference_steps": 3, "seed": 5, "width": 64, "height": 64}
# Each kind of job, as fields over JOB: the first compiles, the others show what compiles again and what replays.
KINDS: dict[str, dict[str, Any]] = {
    "one image, 64²": {},
    "two images, 128x64": {"num_images": 2, "width": 128},
    "no CFG (guidance 1)": {"guidance_scale": 1.0},
    "three images, 192x128": {"num_images": 3, "width": 192, "height": 128},
    "hires 1.5x": {"hires": {"scale": 1.5, "steps": 2}},
}


def measure(folder: Path, device: str) -> list[dict[str, Any]]:
    """Each kind's job compiled and as written, through the worker's prepare and run stages."""
    from torch._dynamo.utils import counters

    from src.prepare import JobPlan, prepare
    from src.run.engine import Engine
    from src.run.fast_path import apply_fast_mode, compiled_modules, uncompiled
    from src.settings import load_settings

    variables = {"MODEL_ID": str(folder), "DEVICE": device}
    engine = Engine.load(load_settings({**variables, "FAST_MODE": "true"} if device == "cuda" else variables))
    if device == "cpu":
        apply_fast_mode(engine._pipeline, engine.loras, graphs=False)

    def job(fields: dict[str, Any]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        plan = prepare({"input": {**JOB, **fields}}, engine.settings, catalog=lambda: engine.catalog, storage=None)
        assert isinstance(plan, JobPlan)
        images = engine.run(plan, timeout_s=3600).images
        return np.stack([np.asarray(image, dtype=np.int16) for image in images]), time.perf_counter() - started

    rows = []
    for kind, fields in KINDS.items():
        compiled, seconds = job(fields)
        with uncompiled(*compiled_modules(engine._pipeline)):
            written, _ = job(fields)
        difference = np.abs(compiled - written)
        rows.append(
            {
                "kind": kind,
                "mean_difference": float(difference.mean()),
                "max_difference": int(difference.max()),
                "graphs": int(counters["stats"]["unique_graphs"]),
                "seconds": seconds,
                "still_compiled": len(compiled_modules(engine._pipeline)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", type=Path, help="a diffusers folder; default: the tiny model, written here")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    from builder.tiny_model import write_tiny_model

    report = report_header()
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        # An empty compile cache, so that each compile's time is a cold start's (the caches are read lazily).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(workdir) / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(Path(workdir) / "triton")
        folder = args.model or write_tiny_model(Path(workdir) / "tiny")
        rows = measure(folder, args.device)
    report.update(command=" ".join(["python -m bench.fast_path", *sys.argv[1:]]), torch=torch.__version__)
    report.update(rows=rows, seconds=time.time() - started, device=args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{report['cpu']} ({report['machine']})"
    lines = [
        f"{where}, torch {torch.__version__}, {report['date']}, load average {report['load_average_before'][0]:.2f} "
        f"before; {args.model or 'the tiny model'}, {JOB['num_inference_steps']} steps, inductor",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s.",
        "",
        "| job | mean difference | largest difference | graphs compiled so far | job s, compiles included |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['kind']} | {row['mean_difference']:.5f} | {row['max_difference']} | {row['graphs']} | "
            f"{row['seconds']:.1f} |"
        )
    stem = "fast-path-cpu" if args.device == "cpu" else "fast-path-gpu"
    write_results(args.out, stem, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
