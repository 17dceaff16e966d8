"""DeepCache-style feature reuse (a request's ``deepcache_interval``): most UNet steps run its outer blocks only.

The UNet's deep blocks (all but its first down block and its last up block) change slowly from one denoising
step to the next. Every ``interval``-th evaluation runs the whole UNet and keeps what enters its last up block;
the evaluations between run only the first down block (for the skip connections the last up block reads) and the
last up block on the kept features (DeepCache, Ma et al., CVPR 2024, with its shallowest branch). The speed-up
comes from skipping the deep blocks, and costs detail: the kept features are up to ``interval - 1`` steps old.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from src.run.fast_path import uncompiled


class FeatureReuse:
    """The UNet's forward, wrapped: whole every ``interval`` calls, its outer blocks only in between."""

    def __init__(self, unet: Any, interval: int) -> None:
        self.unet, self.interval = unet, interval
        self.calls = 0
        self.kept: torch.Tensor | None = None
        self.whole = unet.forward

    def keep(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward pre-hook on the last up block: keep the features that enter it."""
        self.kept = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        reuse = self.calls % self.interval != 0 and self.kept is not None and self.kept.shape[0] == sample.shape[0]
        self.calls += 1
        if not reuse:
            return self.whole(sample, timestep, encoder_hidden_states, **kwargs)
        return self.outer(sample, timestep, encoder_hidden_states, **kwargs)

    def outer(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        """The first down block and the last up block, on the kept features: SD 1.5's UNet has no class or
        added embeddings, so its time embedding is all the blocks need besides the prompt."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), kwargs.get("timestep_cond"))
        attention = {"cross_attention_kwargs": kwargs.get("cross_attention_kwargs")}
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None:  # as the UNet's forward makes it a bias (``src.run.cross_attention``)
            attention["encoder_attention_mask"] = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        hidden = unet.conv_in(sample)
        if getattr(first, "has_cross_attention", False):
            _, skips = first(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states, **attention)
        else:
            _, skips = first(hidden_states=hidden, temb=emb)
        skips = ((hidden, *skips))[: len(last.resnets)]
        assert self.kept is not None
        if getattr(last, "has_cross_attention", False):
            hidden = last(
                hidden_states=self.kept,
                temb=emb,
                res_hidden_states_tuple=skips,
                encoder_hidden_states=encoder_hidden_states,
                **attention,
            )
        else:
            hidden = last(hidden_states=self.kept, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        hidden = unet.conv_out(hidden)
        return UNet2DConditionOutput(sample=hidden) if kwargs.get("return_dict", True) else (hidden,)


@contextlib.contextmanager
def feature_reuse(unet: Any, interval: int) -> Iterator[None]:
    """``unet`` reusing its deep features for one pipeline call; as it was after. ``interval`` 1: untouched."""
    if interval <= 1:
        yield
        return
    wrapped = FeatureReuse(unet, interval)
    hook = unet.up_blocks[-1].register_forward_pre_hook(wrapped.keep, with_kwargs=True)
    # An offloading profile's hook may have replaced the forward already: the wrapper calls it, and it comes back.
    own = unet.__dict__.get("forward")
    unet.forward = wrapped
    try:
        # FAST_MODE's compiled UNet would compile the wrapper, its Python state and all: the job runs it as written.
        with uncompiled(unet):
            yield
    finally:
        if own is None:
            del unet.forward  # the class's own forward again
        else:
            unet.forward = own
        hook.remove()
