"""Token merging (a request's ``tome_ratio``): ToMe for Stable Diffusion, applied to the UNet for one call.

Before the self-attention of each transformer block at the UNet's full latent resolution, the most similar
image tokens are merged (``ratio`` of them), and they are unmerged after: attention, whose cost grows with the
square of the tokens, runs on fewer. tomesd (Bolya & Hoffman, 2023) patches the blocks' classes and its
``remove_patch`` puts them back. Its choice of tokens is random; tomesd forks torch's global generator for it,
which would make a request's image depend on what ran before it, so the generator is seeded here from the
job's seed: the same request gives the same image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from src.run.fast_path import uncompiled


@contextlib.contextmanager
def token_merging(unet: Any, ratio: float, *, seed: int, device: torch.device) -> Iterator[None]:
    """``unet`` merging ``ratio`` of its full-resolution tokens for one pipeline call on ``device``, its choices
    drawn from ``seed``; as it was after. 0: off."""
    if ratio <= 0:
        yield
        return
    import tomesd  # imported here: only jobs that ask for it need it

    # tomesd's defaults for SD: the full-resolution blocks only, self-attention only, 2x2 windows.
    tomesd.apply_patch(unet, ratio=ratio, max_downsample=1, sx=2, sy=2, use_rand=True, merge_attn=True)
    unet._tome_info["args"]["generator"] = torch.Generator(device=device).manual_seed(seed)
    try:
        # FAST_MODE's compiled UNet would compile the patched blocks again, for one job: it runs them as written.
        with uncompiled(unet):
            yield
    finally:
        tomesd.remove_patch(unet)
