"""Encode time and file size of PNG, JPEG and WebP at 512² and 1024², as the worker writes them.

    python -m bench.encode [--repeat 5] [--out bench/results/encode.md]

The images stand in for SD output: colour noise whose amplitude spectrum
falls off as 1/f^1.5, like a natural photograph's, tuned so that a 512²
PNG is about 400 KB and a quality-90 JPEG about 60 KB, as SD 1.5's photos
are. (Random-weight models give white noise, which no format compresses.)
Encoding goes through src.finish.outputs.encode_image, parameters chunk included.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.machine import cpu_name
from src.finish import outputs

SPECTRAL_EXPONENT = 1.5


def natural_image(side: int, seed: int = 0) -> Image.Image:
    """A side x side RGB image with a 1/f^1.5 amplitude spectrum."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / side) ** SPECTRAL_EXPONENT
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, falloff.shape)
        field = np.fft.irfft2(falloff * np.exp(1j * phase), s=(side, side))
        field = (field - field.mean()) / field.std()
        channels.append(np.clip(128 + 48 * field, 0, 255))
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def measure(image: Image.Image, fmt: str, quality: int, repeat: int) -> tuple[float, int]:
    """Median milliseconds and bytes for one encode."""
    parameters = "a fox\nNegative prompt: \nSteps: 25, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 512x512"
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = len(outputs.encode_image(image, fmt, quality, parameters))
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table, with machine, date and command, to this file")
    args = parser.parse_args()
    started = time.time()
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} ({cpu_name()}); "
        f"Python {platform.python_version()}, Pillow {Image.__version__}; {datetime.date.today().isoformat()}.",
        f"Command: `{' '.join(['python -m bench.encode', *sys.argv[1:]])}`; median of {args.repeat} encodes each.",
        "",
    ]
    cases = [("png", 0, level) for level in (0, 1, 3, 6)]
    cases += [("jpeg", quality, 0) for quality in (75, 90, 95)]  # JPEG has no knob here
    cases += [("webp", quality, method) for quality in (90,) for method in (0, 2, 4, 6)]
    lines += ["| format | setting | side | encode ms | size KB | base64 KB |", "| --- | --- | --- | --- | --- | --- |"]
    default_png, default_webp = outputs.PNG_COMPRESS_LEVEL, outputs.WEBP_METHOD
    for side in (512, 1024):
        image = natural_image(side)
        for fmt, quality, knob in cases:
            if fmt == "png":
                outputs.PNG_COMPRESS_LEVEL = knob
                setting = f"compress_level={knob}"
            elif fmt == "webp":
                outputs.WEBP_METHOD = knob
                setting = f"quality={quality}, method={knob}"
            else:
                setting = f"quality={quality}"
            ms, size = measure(image, fmt, quality, args.repeat)
            lines.append(f"| {fmt} | {setting} | {side} | {ms:.1f} | {size / 1024:.0f} | {size * 4 / 3 / 1024:.0f} |")
    outputs.PNG_COMPRESS_LEVEL, outputs.WEBP_METHOD = default_png, default_webp
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
        print(f"written to {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
