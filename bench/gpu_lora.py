"""GPU benchmark of LoRA: per-job cost in the default mode, and FAST_MODE's hot-swap, on one NVIDIA GPU.

    python -m bench.gpu_lora --out DIR              # about 3 minutes on an H100-class card
    python -m bench.gpu_lora --tiny DIR --out OUT   # smoke run of the same code on the CPU with the tiny model

SD 1.5's full architecture with random fp16 weights (bench/sd15_random.py), 512²,
20 steps, DPM++ 2M Karras, and four random rank-32 LoRAs on every attention layer
of the UNet and the text encoder (builder/tiny_lora.py; two in PEFT's layout, two
in kohya's). Each job goes through the worker's engine and encoder, as deployed.

- Default mode: a plain job on a worker that never loaded a LoRA, a LoRA's first
  (uncached) use, the same LoRA cached, three LoRAs cached, and a plain job after
  them; the plain job's PNG before and after must be the same bytes.
- FAST_MODE (compute capability 7.0 and up): the cold start (compile and warm-up,
  one-LoRA slot included), then a sequence of jobs, each with the number of graphs
  torch.compile built during it: a new LoRA hot-swapped into a slot should build
  none; a job with more LoRAs than any before builds its graphs once. Each FAST job's
  image is compared with the default mode's for the same LoRAs and seed.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gc
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEPS = 20
SIDE = 512
RANK = 32
LORAS = ("style-0", "style-1", "style-2", "style-3")
PROMPT = "a red fox in a snowy forest"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Worker:
    """One engine, loaded as deployed, with timed jobs."""

    def __init__(self, model: Path, loras: Path, *, fast: bool, tiny: bool = False) -> None:
        from src.run.engine import Engine
        from src.settings import load_settings

        variables = {
            "MODEL_ID": str(model),
            "LORA_DIR": str(loras),
            "FAST_MODE": str(fast).lower(),
            "DEFAULT_STEPS": "2" if tiny else str(STEPS),
        }
        variables.update({"DEVICE": "cpu"} if tiny else {"MEMORY_PROFILE": "high"})
        self.settings = load_settings(variables)
        self.side = 64 if tiny else SIDE
        started = time.perf_counter()
        self.engine = Engine.load(self.settings)  # FAST_MODE compiles and warms up in here
        _synchronize()
        self.cold_start_s = time.perf_counter() - started

    def job(self, loras: list[str], scale: float = 0.8) -> tuple[float, int, bytes]:
        """Seconds, graphs compiled during the job, and the PNG, for a job with ``loras``."""
        from src.finish.response import Route, encode_response
        from src.schema import parse_input

        request = parse_input(
            {
                "input": {
                    "prompt": PROMPT,
                    "seed": 0,
                    "width": self.side,
                    "height": self.side,
                    "output_type": "base64",
                    "loras": [{"name": name, "scale": scale} for name in loras],
                }
            },
            self.settings,
        )
        graphs = _compiled_graphs()
        _synchronize()
        started = time.perf_counter()
        generation = self.engine.generate(request, timeout_s=600)
        response = encode_response(request, generation, Route(self.settings, None, "bench"), started=0.0)
        _synchronize()
        seconds = time.perf_counter() - started
        image = response.images[0]
        return seconds, _compiled_graphs() - graphs, base64.b64decode(image.image)  # type: ignore[union-attr]


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def default_mode(
    model: Path, loras: Path, repeat: int, tiny: bool
) -> tuple[dict[str, Any], dict[tuple[str, ...], bytes]]:
    worker = Worker(model, loras, fast=False, tiny=tiny)
    rows: dict[str, Any] = {"cold_start_s": worker.cold_start_s}
    images: dict[tuple[str, ...], bytes] = {}

    def median(loras: list[str]) -> float:
        times = []
        for _ in range(repeat):
            seconds, _graphs, png = worker.job(loras)
            times.append(seconds)
        images[tuple(loras)] = png
        return statistics.median(times)

    worker.job([])  # warm: cuDNN autotuning, allocator, lazy CUDA start
    rows["plain, never loaded a LoRA"] = median([])
    plain_before = images[()]
    rows["1 LoRA, first use (uncached)"] = worker.job([LORAS[0]])[0]
    rows["1 LoRA, cached"] = median([LORAS[0]])
    worker.job([LORAS[1]])  # load, so that the three below are cached
    worker.job([LORAS[2]])
    rows["3 LoRAs, cached"] = median(list(LORAS[:3]))
    rows["plain, 3 LoRAs cached and off"] = median([])
    rows["plain PNG identical before and after"] = images[()] == plain_before
    for combination in ([LORAS[1]], [LORAS[0], LORAS[1]], [LORAS[2], LORAS[3]]):
        images[tuple(combination)] = worker.job(combination)[2]
    rows["peak_gib"] = _peak_gib()
    return rows, images


def fast_mode(model: Path, loras: Path, reference: dict[tuple[str, ...], bytes], tiny: bool) -> dict[str, Any]:
    graphs = _compiled_graphs()
    worker = Worker(model, loras, fast=True, tiny=tiny)
    result: dict[str, Any] = {"cold_start_s": worker.cold_start_s, "cold_start_graphs": _compiled_graphs() - graphs}
    sequence = [
        ("plain", []),
        ("plain", []),
        ("style-0, first use", [LORAS[0]]),
        ("style-0, cached", [LORAS[0]]),
        ("style-1, hot-swapped into slot 0", [LORAS[1]]),
        ("style-1, again", [LORAS[1]]),
        ("style-0 + style-1, first 2-LoRA job", [LORAS[0], LORAS[1]]),
        ("style-0 + style-1, again", [LORAS[0], LORAS[1]]),
        ("style-2 + style-3, hot-swapped", [LORAS[2], LORAS[3]]),
        ("plain, after", []),
    ]
    jobs = []
    for label, names in sequence:
        seconds, built, png = worker.job(names)
        expected = reference.get(tuple(names))
        difference = None if expected is None else int(np.abs(_pixels(png) - _pixels(expected)).max())
        jobs.append({"job": label, "seconds": seconds, "graphs": built, "max_pixel_difference": difference})
        print(jobs[-1], flush=True)
    result["jobs"] = jobs
    result["peak_gib"] = _peak_gib()
    return result


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def render(
    name: str,
    capability: tuple[int, int],
    lora_mb: float,
    default: dict[str, Any],
    fast: dict[str, Any] | None,
    *,
    command: str,
    seconds: float,
) -> str:
    """The results as markdown: the setup, the command, and one table per mode."""
    tiny = name.startswith("CPU")
    plain = default["plain, never loaded a LoRA"]
    if tiny:
        setup = f"{name}, {datetime.date.today()}; smoke run, 64², 2 steps, rank-4 LoRAs"
    else:
        setup = (
            f"{name} (compute capability {capability[0]}.{capability[1]}), torch {torch.__version__}, "
            f"{datetime.date.today()}; SD 1.5 architecture, random fp16 weights, {SIDE}², {STEPS} steps, "
            f"DPM++ 2M Karras; rank-{RANK} LoRAs on every attention layer, {lora_mb:.1f} MB each"
        )
    lines = [
        setup,
        f"Command: `{command}`, {seconds:.0f} s.",
        "",
        f"Default mode (cold start {default['cold_start_s']:.1f} s, peak {default['peak_gib']:.2f} GiB); "
        f"the plain job's PNG was {'the same' if default['plain PNG identical before and after'] else 'NOT the same'} "
        "before and after the LoRA jobs:",
        "",
        "| job | seconds | against plain |",
        "| --- | --- | --- |",
    ]
    for label, value in default.items():
        if isinstance(value, float) and label not in ("cold_start_s", "peak_gib"):
            lines.append(f"| {label} | {value:.3f} | {value / plain:.2f} |")
    if fast is not None:
        lines += [
            "",
            f"FAST_MODE with LORA_DIR (cold start {fast['cold_start_s']:.1f} s with "
            f"{fast['cold_start_graphs']} graphs compiled, peak {fast['peak_gib']:.2f} GiB):",
            "",
            "| job, in order | seconds | graphs compiled | max pixel difference from the default mode |",
            "| --- | --- | --- | --- |",
        ]
        for job in fast["jobs"]:
            difference = "" if job["max_pixel_difference"] is None else str(job["max_pixel_difference"])
            lines.append(f"| {job['job']} | {job['seconds']:.3f} | {job['graphs']} | {difference} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tiny", type=Path, help="a tiny model folder: smoke-run on the CPU instead")
    args = parser.parse_args()
    tiny = args.tiny is not None
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny DIR for a CPU smoke run")
    started = time.time()
    from diffusers import StableDiffusionPipeline

    from bench.sd15_random import build_sd15_random, check_parameter_counts
    from builder.tiny_lora import build_lora_state_dict, save_lora

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, lora_dir = Path(workdir) / "sd15-random", Path(workdir) / "loras"
        if tiny:
            model_dir = args.tiny
            model = StableDiffusionPipeline.from_pretrained(model_dir)
        else:
            model = build_sd15_random("cuda", torch.float16)
            check_parameter_counts(model)
            model.save_pretrained(model_dir)
        for index, name in enumerate(LORAS):
            state = build_lora_state_dict(
                model.unet,
                model.text_encoder,
                rank=4 if tiny else RANK,
                seed=index,
                layout=("peft", "kohya")[index % 2],
            )
            save_lora(state, lora_dir / f"{name}.safetensors")
        lora_mb = (lora_dir / f"{LORAS[0]}.safetensors").stat().st_size / 1e6
        del model
        _release()
        default, images = default_mode(model_dir, lora_dir, args.repeat, tiny)
        _release()
        capability = torch.cuda.get_device_capability() if not tiny else (0, 0)
        # On the CPU FAST_MODE is ignored: the smoke run still takes the same path through the script.
        fast = fast_mode(model_dir, lora_dir, images, tiny) if tiny or capability >= (7, 0) else None

    name = "CPU (tiny model)" if tiny else torch.cuda.get_device_name()
    command = " ".join(["python -m bench.gpu_lora", *sys.argv[1:]])
    table = render(name, capability, lora_mb, default, fast, command=command, seconds=time.time() - started)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-lora.md").write_text(table + "\n", encoding="utf-8")
    digest = hashlib.sha256(table.encode()).hexdigest()[:12]
    payload = {"device": name, "default": default, "fast": fast, "table_sha256": digest}
    (args.out / "gpu-lora.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
