"""SD 1.5's exact architecture with random weights, for speed and memory figures.

Time and memory do not depend on the weights' values, and the real weights
cannot be downloaded here. The configs are SD 1.5's (see
shared/sd15-architecture.md); ``check_parameter_counts`` proves it against the
published counts: UNet 859.52 M, text encoder 123.06 M, VAE 83.65 M.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from builder.tiny_model import assemble_pipeline, write_tokenizer_files

UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
PUBLISHED_MILLIONS = {"unet": 859.52, "text_encoder": 123.06, "vae": 83.65}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_sd15_random(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> StableDiffusionPipeline:
    """SD 1.5's architecture with random weights drawn from ``seed``, created directly on ``device`` in ``dtype``.

    Creating the weights in place avoids a float32 copy on the CPU (4 GB) before the cast.
    """
    with tempfile.TemporaryDirectory() as workdir:
        write_tokenizer_files(Path(workdir))
        tokenizer = CLIPTokenizer(
            vocab=str(Path(workdir) / "vocab.json"), merges=str(Path(workdir) / "merges.txt"), model_max_length=77
        )
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return assemble_pipeline({"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet})


def parameter_counts(pipeline: StableDiffusionPipeline) -> dict[str, float]:
    """Millions of parameters per component."""
    return {
        name: sum(parameter.numel() for parameter in getattr(pipeline, name).parameters()) / 1e6
        for name in PUBLISHED_MILLIONS
    }


def check_parameter_counts(pipeline: StableDiffusionPipeline) -> dict[str, float]:
    """The counts, after checking each against SD 1.5's published figure (to 0.01 M)."""
    counts = parameter_counts(pipeline)
    for name, published in PUBLISHED_MILLIONS.items():
        if abs(counts[name] - published) > 0.01:
            raise AssertionError(f"{name}: {counts[name]:.2f} M parameters, SD 1.5 has {published} M")
    return counts
