"""What an ESRGAN-family upscaler costs on the CPU, in a hires pass and in an upscale job: a 512² image to 1024².

    PYTHONPATH=tests/stand_ins/site python -m bench.upscalers              # full-size models, float32: minutes
    PYTHONPATH=tests/stand_ins/site python -m bench.upscalers --tiny --out DIR   # the builder's tiny models: seconds

The models are full-size architectures with random weights (the time does not depend on the values), saved as
published files are and read through the worker's own ``src.adapters.upscalers`` (spandrel): ESRGAN's RRDB
network at ``RealESRGAN_x4plus``'s and ``4x-UltraSharp``'s size (64 filters, 23 blocks, 4x; 16.7 M parameters)
and Real-ESRGAN's compact network at ``realesr-general-x4v3``'s (64 features, 32 convolutions, 4x). For each:
its first read, then the step a hires pass adds with it, ``--repeat`` times: the decoded ``--side``² image
through the model in the worker's tiles (UPSCALE_TILE 512, overlap 32), then resized with Lanczos to twice
``--side``, as the hires pass does before encoding it again. The VAE decode and encode and the denoising steps
cost what they cost with the ``lanczos`` upscaler and are not measured here. Then the upscale job
(``"task": "upscale"``, ``scale`` 2), ``--repeat`` times through ``handler.handler`` as RunPod calls it, the worker
started with the tiny SD model (an upscale job does not use it) and these models in its UPSCALER_DIR: the PNG
decoded, the model's pass, Lanczos, the 1024² PNG encoded, with the metadata's stage times.

torchvision's CPU build is not on the package index this runs from: with ``PYTHONPATH=tests/stand_ins/site``
spandrel is imported at start with the tests' stand-in for the two torchvision names it binds, which these
architectures never call, and the stand-in is then off the path (tests/stand_ins/spandrel_loader.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import load_average, median_range, report_header, write_results
from bench.run import RESULTS

TILE, OVERLAP = 512, 32


def write_models(folder: Path, tiny: bool) -> dict[str, Path]:
    """The models, as files: an RRDB ``.pth`` and a compact ``.safetensors``."""
    import torch
    from safetensors.torch import save_file

    if tiny:
        from builder.tiny_upscalers import write_tiny_upscalers

        write_tiny_upscalers(folder)
        return {
            "ESRGAN (RRDB)": folder / "tiny-esrgan-4x.pth",
            "Real-ESRGAN compact": folder / "tiny-compact-2x.safetensors",
        }
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    torch.manual_seed(0)
    torch.save(RRDBNet().state_dict(), folder / "rrdb-4x.pth")
    compact = SRVGGNetCompact(num_feat=64, num_conv=32, upscale=4).state_dict()
    save_file({name: tensor.contiguous() for name, tensor in compact.items()}, folder / "compact-4x.safetensors")
    return {"ESRGAN (RRDB)": folder / "rrdb-4x.pth", "Real-ESRGAN compact": folder / "compact-4x.safetensors"}


def measure(path: Path, side: int, repeat: int) -> dict[str, Any]:
    import torch
    from PIL import Image

    from src.adapters.upscalers import Upscalers, read_upscaler, scan_upscalers

    started = time.perf_counter()
    model = read_upscaler(path)
    read_s = time.perf_counter() - started
    upscalers = Upscalers(
        scan_upscalers(str(path.parent)),
        device=torch.device("cpu"),
        dtype=torch.float32,
        cache_bytes=10**10,
        tile=TILE,
        overlap=OVERLAP,
    )
    images = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        enlarged = upscalers.upscale(path.stem, images)
        array = (enlarged[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).resize((side * 2, side * 2), Image.Resampling.LANCZOS)
        times.append(time.perf_counter() - started)
        print(f"{path.name}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    parameters = sum(tensor.numel() for tensor in model.model.state_dict().values())
    return {"read_s": read_s, "step_s": times, "scale": model.scale, "parameters": parameters}


def measure_jobs(folder: Path, names: list[str], side: int, repeat: int) -> dict[str, Any]:
    """Each model's upscale job (``scale`` 2) through the handler, ``repeat`` times: total and stage times, in s."""
    import asyncio
    import base64
    import io
    import os

    import numpy as np
    from PIL import Image

    from builder.tiny_model import write_tiny_model

    os.environ.update(MODEL_ID=str(write_tiny_model(folder / "tiny-sd15")), UPSCALER_DIR=str(folder))
    import handler

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    photo = base64.b64encode(buffer.getvalue()).decode("ascii")
    handler.get_engine()  # the worker's start, which a job does not pay
    jobs: dict[str, Any] = {}
    for name in names:
        timings = []
        for _ in range(repeat):
            job = {"task": "upscale", "image": photo, "upscaler": name, "scale": 2}
            result = asyncio.run(handler.handler({"id": "bench", "input": job}))
            assert "images" in result, result
            timings.append(result["metadata"]["timings_ms"])
            print(f"upscale job with {name}: {timings[-1]['total'] / 1000:.1f} s", file=sys.stderr, flush=True)
        jobs[name] = {stage: [t[stage] / 1000 for t in timings] for stage in ("inputs", "inference", "encode", "total")}
    return jobs


def markdown(report: dict[str, Any]) -> str:
    side = report["settings"]["side"]
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, torch {report['torch']}; "
        f"{report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"A {side}² image through each model (float32, tiles of {TILE} overlapping by {OVERLAP}), then Lanczos to "
        f"{side * 2}²: the step a hires pass adds with it.",
        "",
        "| model | parameters | scale | first read | hires upscale step, median (min-max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in report["models"].items():
        lines.append(
            f"| {name} | {result['parameters'] / 1e6:.2f} M | {result['scale']}x | {result['read_s']:.2f} s | "
            f"{median_range(result['step_s'])} |"
        )
    lines += [
        "",
        f"The upscale job, `scale` 2 from a {side}² PNG, through `handler.handler` (the model loaded by the first "
        "job): median (min-max) per stage.",
        "",
        "| model | whole job | input decoded | upscale (inference) | PNG encoded |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, job in report["jobs"].items():
        cells = [median_range(job[stage]) for stage in ("total", "inputs", "inference", "encode")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.upscalers", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the builder's tiny models: seconds")
    parser.add_argument("--side", type=int, help="the image's side (default 512, --tiny 64)")
    parser.add_argument("--repeat", type=int, default=2, help="upscales per model (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json")
    args = parser.parse_args(argv)
    args.side = args.side or (64 if args.tiny else 512)
    import torch

    started = time.time()
    report: dict[str, Any] = {**report_header(), "torch": torch.__version__}
    report["settings"] = {**vars(args), "out": str(args.out)}
    with tempfile.TemporaryDirectory(prefix="bench-upscalers-") as scratch:
        models = write_models(Path(scratch), args.tiny)
        report["models"] = {name: measure(path, args.side, args.repeat) for name, path in models.items()}
        jobs = measure_jobs(Path(scratch), [path.stem for path in models.values()], args.side, args.repeat)
        report["jobs"] = {name: jobs[path.stem] for name, path in models.items()}
    report["load_average_after"] = load_average()
    report["command"] = " ".join(["PYTHONPATH=tests/stand_ins/site python -m bench.upscalers", *argv])
    report["seconds"] = round(time.time() - started, 1)
    report = json.loads(json.dumps(report, default=str))
    write_results(args.out, "upscalers-tiny" if args.tiny else "upscalers", report, markdown(report))


if __name__ == "__main__":
    main()
