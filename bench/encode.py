"""Encode time and file size of PNG, JPEG and WebP at 512² and 1024², as the worker writes them.

    python -m bench.encode [--repeat 5]

The images stand in for SD output: colour noise whose amplitude spectrum
falls off as 1/f^1.5, like a natural photograph's, tuned so that a 512²
PNG is about 400 KB and a quality-90 JPEG about 60 KB, as SD 1.5's photos
are. (Random-weight models give white noise, which no format compresses.)
Encoding goes through src.outputs.encode_image, parameters chunk included.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from PIL import Image

from src import outputs

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
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, Pillow {Image.__version__}")
    cases = [("png", 0, level) for level in (0, 1, 3, 6)]
    cases += [("jpeg", quality, None) for quality in (75, 90, 95)]
    cases += [("webp", quality, method) for quality in (90,) for method in (0, 2, 4, 6)]
    print("| format | setting | side | encode ms | size KB | base64 KB |")
    print("| --- | --- | --- | --- | --- | --- |")
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
            print(f"| {fmt} | {setting} | {side} | {ms:.1f} | {size / 1024:.0f} | {size * 4 / 3 / 1024:.0f} |")
    outputs.PNG_COMPRESS_LEVEL, outputs.WEBP_METHOD = default_png, default_webp


if __name__ == "__main__":
    main()
