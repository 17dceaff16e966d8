"""A job's initial noise as A1111 makes it: variation seeds (``subseed``, ``subseed_strength``) and seed resize
(``seed_resize_from_w``/``_h``), from A1111's ``modules/rng.py`` (``ImageRNG.first`` and ``slerp``).

Image i's noise is its seed's, as in a job without them (drawn from the image's own generator, so everything the
generator draws after it is the same); with a variation seed, it moves towards the variation seed's noise by
spherical interpolation (as A1111, image i then has the job's seed and the variation seed subseed + i); with a
seed resize, the seed's noise is drawn at the size named and placed in the middle of noise drawn at the job's
size. Without any of them, nothing here runs: the pipeline draws the noise itself, and a job gives the bytes it
gave before these fields existed.

The pipelines draw the initial noise with diffusers' ``randn_tensor``; ``initial_noise`` makes the first such
draw of a pipeline call (the starting latents of txt2img, the noise added to the image's latents in img2img and
inpaint, and in a hires pass) return the job's noise instead, under the GPU lock.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# A1111's slerp falls back to a plain mix when the two noises are this close to parallel.
PARALLEL = 0.9995


def randn(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise from a fresh CPU generator seeded with ``seed``: A1111's ``randn`` with its CPU source."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed))


def slerp(value: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's ``slerp`` of two (C, H, W) noises, norms taken along dim 1, as it does (its quirk included: close
    to parallel, it returns ``low * value + high * (1 - value)``)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > PARALLEL:
        return low * value + high * (1 - value)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - value) * omega) / so).unsqueeze(1) * low + (torch.sin(value * omega) / so).unsqueeze(
        1
    ) * high


def image_noise(
    drawn: torch.Tensor,
    seed: int,
    *,
    subseed: int,
    strength: float,
    resize_from: tuple[int, int] | None,
) -> torch.Tensor:
    """One image's noise, (C, H, W), on the CPU, from ``drawn``, the noise its seed's generator gave at the job's
    size (on the pipeline's device).

    As A1111's ``ImageRNG.first``: at ``resize_from`` (width, height), the seed's noise is drawn at that size
    (a fresh generator), mixed with the variation seed's, and pasted, centred (cropped when larger), into
    ``drawn``.
    """
    # On the CPU, where A1111 draws its noise and where randn draws here: ``drawn`` is on the pipeline's device.
    shape = tuple(drawn.shape)
    noise_shape = shape if resize_from is None else (shape[0], resize_from[1] // 8, resize_from[0] // 8)
    noise = drawn.float().cpu() if noise_shape == shape else randn(seed, noise_shape)
    if strength > 0:
        noise = slerp(strength, noise, randn(subseed, noise_shape))
    if noise_shape == shape:
        return noise
    placed = drawn.float().cpu().clone()
    dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
    width = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
    height = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    placed[:, ty : ty + height, tx : tx + width] = noise[:, sy : sy + height, sx : sx + width]
    return placed


def job_noise(
    seeds: Sequence[int], *, subseeds: Sequence[int], strength: float, resize_from: tuple[int, int] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that turns a batch's seed noise (B, C, H, W), the images of ``seeds``, into the job's; image
    i's variation seed is ``subseeds[i]``."""

    def make(drawn: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                image_noise(drawn[index], seed, subseed=subseed, strength=strength, resize_from=resize_from)
                for index, (seed, subseed) in enumerate(zip(seeds, subseeds, strict=True))
            ]
        )

    return make


@contextlib.contextmanager
def encoded_at_mean(pipeline: Any) -> Iterator[None]:
    """For the ``with`` block, ``pipeline`` encodes an input image (img2img's, inpaint's, the hires pass's) to the
    mean of the VAE's latent distribution, drawing nothing from the images' generators: its noise is then each
    generator's first draw, as A1111's (whose VAE sample draws from torch's global generator, not the image's)."""
    module = sys.modules[type(pipeline).__module__]
    original = getattr(module, "retrieve_latents", None)
    if original is None:  # a pipeline that encodes no image
        yield
        return

    def at_mean(encoder_output: Any, generator: Any = None, sample_mode: str = "sample") -> torch.Tensor:
        return original(encoder_output, generator, sample_mode="argmax")

    module.retrieve_latents = at_mean  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.retrieve_latents = original  # type: ignore[attr-defined]


@contextlib.contextmanager
def initial_noise(pipeline: Any, make: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """For the ``with`` block, the first noise ``pipeline`` draws is ``make(noise it drew)``; None: unchanged.

    The draw itself still happens, so each image's generator moves on exactly as without this.
    """
    if make is None:
        yield
        return
    module = sys.modules[type(pipeline).__module__]
    original = module.randn_tensor
    first = True

    def first_noise(shape: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal first
        drawn = original(shape, *args, **kwargs)
        if not first:
            return drawn
        first = False
        return make(drawn).to(device=drawn.device, dtype=drawn.dtype)

    module.randn_tensor = first_noise  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.randn_tensor = original  # type: ignore[attr-defined]
