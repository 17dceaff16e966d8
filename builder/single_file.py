"""Write a diffusers SD 1.5 pipeline as one file in the original (LDM) layout, as checkpoints are shared.

Fine-tunes of SD 1.5 are published as one ``.safetensors`` file whose tensor names are those of
the original CompVis code: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (CLIP). This module maps a diffusers pipeline back to those
names, for any UNet and VAE depth, so that the tiny model and the full-size random model can be
written the way real checkpoints are, and read back through diffusers' ``from_single_file``.

The mapping is the inverse of diffusers' ``convert_ldm_*_checkpoint``; ``tests/test_checkpoints.py``
checks the round trip tensor by tensor.

ControlNets are shared the same way, in the layout of lllyasviel's ``control_v11p_sd15_*`` files
(``control_model.*``); ``controlnet_state_dict`` writes it, as the inverse of diffusers'
``convert_controlnet_checkpoint``, and ``tests/test_tiny_controlnet.py`` checks that round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
CONTROLNET_PREFIX = "control_model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
_UNET_RESNET |= {"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict[str, torch.Tensor], renames: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """Apply the longest matching ``renames`` entry to each key's start, then add ``prefix``."""
    out = {}
    for key, tensor in state.items():
        match = max((old for old in renames if key == old or key.startswith(old + ".")), key=len, default=None)
        if match is None:
            raise KeyError(f"no LDM name for {key!r}")
        out[prefix + renames[match] + key[len(match) :]] = tensor
    return out


def _resnet(renames: dict[str, str], diffusers: str, ldm: str, inner: dict[str, str]) -> None:
    renames[diffusers] = ldm
    for ours, theirs in inner.items():
        renames[f"{diffusers}.{ours}"] = f"{ldm}.{theirs}"


def _encoder_renames(config: Any) -> dict[str, str]:
    """The diffusers -> LDM renames of a UNet's time embedding, input blocks and middle block.

    A ControlNet is a copy of these parts, under the same names, so both mappings start here.
    """
    per_block = config.layers_per_block
    blocks = len(config.block_out_channels)
    renames = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "mid_block.attentions.0": "middle_block.1",
    }
    for index in range(2):
        _resnet(renames, f"mid_block.resnets.{index}", f"middle_block.{2 * index}", _UNET_RESNET)
    for block in range(blocks):
        for layer in range(per_block):
            ldm = f"input_blocks.{block * (per_block + 1) + layer + 1}"
            _resnet(renames, f"down_blocks.{block}.resnets.{layer}", f"{ldm}.0", _UNET_RESNET)
            renames[f"down_blocks.{block}.attentions.{layer}"] = f"{ldm}.1"
        if block < blocks - 1:
            renames[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{(block + 1) * (per_block + 1)}.0.op"
    return renames


def unet_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's tensors under their LDM names (``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``, ...)."""
    config = unet.config
    per_block = config.layers_per_block
    blocks = len(config.block_out_channels)
    renames = _encoder_renames(config) | {"conv_norm_out": "out.0", "conv_out": "out.2"}
    for block in range(blocks):
        has_attention = config.up_block_types[block].startswith("CrossAttn")
        for layer in range(per_block + 1):
            ldm = f"output_blocks.{block * (per_block + 1) + layer}"
            _resnet(renames, f"up_blocks.{block}.resnets.{layer}", f"{ldm}.0", _UNET_RESNET)
            renames[f"up_blocks.{block}.attentions.{layer}"] = f"{ldm}.1"
        if block < blocks - 1:
            ldm = f"output_blocks.{block * (per_block + 1) + per_block}.{2 if has_attention else 1}.conv"
            renames[f"up_blocks.{block}.upsamplers.0.conv"] = ldm
    return _rename(unet.state_dict(), renames, UNET_PREFIX)


def controlnet_state_dict(controlnet: ControlNetModel, prefix: str = CONTROLNET_PREFIX) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors under the names of lllyasviel's ``control_v11p_sd15_*`` files.

    Its copy of the UNet's encoder keeps the UNet's LDM names (``input_blocks.*``, ``middle_block.*``);
    ``controlnet_down_blocks.N`` becomes ``zero_convs.N.0``, ``controlnet_mid_block`` becomes
    ``middle_block_out.0`` and the conditioning embedding becomes ``input_hint_block.*``.
    ``prefix=""`` gives the names without ``control_model.``, which diffusers reads as well.

    Raises:
        KeyError: a tensor has no LDM name (an SDXL ControlNet's ``add_embedding``, say).
    """
    renames = _encoder_renames(controlnet.config)
    for index in range(len(controlnet.controlnet_down_blocks)):
        renames[f"controlnet_down_blocks.{index}"] = f"zero_convs.{index}.0"
    renames["controlnet_mid_block"] = "middle_block_out.0"
    # LDM's hint block is one nn.Sequential of convolutions, each followed by a SiLU (but the
    # last), so the convolutions sit at the even indices: conv_in at 0, conv_out after the blocks.
    hint_convs = len(controlnet.controlnet_cond_embedding.blocks)
    renames["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    for index in range(hint_convs):
        renames[f"controlnet_cond_embedding.blocks.{index}"] = f"input_hint_block.{2 * index + 2}"
    renames["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * hint_convs + 2}"
    return _rename(controlnet.state_dict(), renames, prefix)


def vae_state_dict(vae: AutoencoderKL, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """The VAE's tensors under their LDM names; ``prefix=""`` gives a VAE file's own names.

    The LDM VAE's attention projections are 1x1 convolutions where diffusers has linear layers.
    """
    blocks = len(vae.config.block_out_channels)
    renames = {}
    resnet = {"conv_shortcut": "nin_shortcut"}
    for part in ("encoder", "decoder"):
        renames |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out"}
        renames[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for index in range(2):
            _resnet(renames, f"{part}.mid_block.resnets.{index}", f"{part}.mid.block_{index + 1}", resnet)
        for ours, theirs in _VAE_ATTENTION.items():
            renames[f"{part}.mid_block.attentions.0.{ours}"] = f"{part}.mid.attn_1.{theirs}"
    for block in range(blocks):
        for layer in range(vae.config.layers_per_block):
            ours, theirs = f"encoder.down_blocks.{block}.resnets.{layer}", f"encoder.down.{block}.block.{layer}"
            _resnet(renames, ours, theirs, resnet)
        renames[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = f"encoder.down.{block}.downsample.conv"
        # The decoder's blocks are numbered from the bottom in LDM, from the top in diffusers.
        up = blocks - 1 - block
        for layer in range(vae.config.layers_per_block + 1):
            _resnet(renames, f"decoder.up_blocks.{block}.resnets.{layer}", f"decoder.up.{up}.block.{layer}", resnet)
        renames[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    renames |= {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    state = _rename(vae.state_dict(), renames, prefix)
    for key, tensor in state.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            state[key] = tensor[:, :, None, None]
    return state


def text_encoder_state_dict(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's tensors as SD checkpoints name them, position ids included."""
    import torch

    state = {TEXT_PREFIX + key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    positions = text_encoder.config.max_position_embeddings
    state[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return state


def checkpoint_state_dict(pipeline: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one LDM-layout state dict."""
    return {
        **unet_state_dict(pipeline.unet),
        **vae_state_dict(pipeline.vae),
        **text_encoder_state_dict(pipeline.text_encoder),
    }


def save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``state`` as one ``.safetensors`` file, floating tensors cast to ``dtype`` when given."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for key, tensor in state.items():
        cast = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        tensors[key] = cast.detach().contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
