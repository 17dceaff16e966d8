"""Write a tiny random-weight pipeline shaped like Stable Diffusion 1.5.

Usage::

    python -m builder.tiny_model DIR                  # a diffusers folder
    python -m builder.tiny_model DIR --single-file    # and, inside it, the same weights as one
                                                      # checkpoint file plus a VAE file
    python -m builder.tiny_model DIR --controlnet     # and, in DIR/controlnets, tiny ControlNets
    python -m builder.tiny_model DIR --models         # and, in DIR/models, tiny models for MODELS_DIR
    python -m builder.tiny_model DIR --loras          # and, in DIR/loras, tiny LoRAs for LORA_DIR
    python -m builder.tiny_model DIR --upscalers      # and, in DIR/upscalers, tiny upscalers for UPSCALER_DIR

The pipeline is built from the real diffusers and transformers classes at tiny
sizes and saved with ``save_pretrained``, so ``MODEL_ID=DIR`` loads it through
exactly the code that loads SD 1.5. Nothing is downloaded. Its images are
noise; it exists so that tests and smoke runs exercise the real code offline.

Its weights are float16 values (stored as float32), as SD 1.5's published weights
are, so that a float16 copy of it (a checkpoint baked by ``builder.cache_model``)
holds exactly the same numbers.

``--single-file`` also writes, beside the folder's subfolders:

- ``DIR/tiny-sd15.safetensors``: the same weights as one checkpoint in the original
  (LDM) layout, ``model.diffusion_model.*``, ``first_stage_model.*`` and
  ``cond_stage_model.transformer.*``, as fine-tunes are shared;
- ``DIR/tiny-vae.safetensors``: a VAE of the same shape with other weights, in the
  layout of a shared VAE file (``encoder.*``, ``decoder.*``), for ``VAE_ID``.

``--models`` writes ``DIR/models/``, a MODELS_DIR of tiny models with the pipeline's shapes and weights of
their own (seeds 1 to 3): ``tiny-a.safetensors`` and ``styles/tiny-b.safetensors`` in the LDM layout, and
the diffusers folder ``tiny-c/``; DIR is their MODEL_CONFIG.

``--controlnet`` (which combines with ``--single-file``) writes ``DIR/controlnets/``, ControlNets
copied from the tiny UNet with ``ControlNetModel.from_unet``, as ControlNets are trained:

- ``tiny-controlnet/``: a diffusers ControlNet folder (seed 0);
- ``tiny-controlnet-file.safetensors``: the same weights as one file in the layout of
  lllyasviel's ``control_v11p_sd15_*`` files (``control_model.*``);
- ``tiny-controlnet-b.safetensors``: another ControlNet (seed 1), in the same layout.

``--loras`` writes ``DIR/loras/``, the two LoRAs ``python -m builder.tiny_lora DIR DIR/loras`` writes
(``tiny-peft-0`` and ``tiny-kohya-1``); ``--upscalers`` writes ``DIR/upscalers/``, the upscalers of
``python -m builder.tiny_upscalers DIR/upscalers`` (``tiny-esrgan-4x`` and ``tiny-compact-2x``, which need spandrel).
Each flag saves a smoke run one more process start.

A ControlNet starts from zero output convolutions, which would leave every image unchanged;
these get random weights instead, so that the conditioning scale and the control image both
change the image.

The shapes that matter to the worker follow SD 1.5: 4 latent channels, a VAE
with 4 blocks (scale factor 8), a CLIP text encoder with a 77-token context,
and SD 1.5's default scheduler config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

CONTEXT_LENGTH = 77
TEXT_WIDTH = 32
CHECKPOINT_FILE = "tiny-sd15.safetensors"
# --models: MODELS_DIR's layout, each model with weights of its own (the seed), as two files and a folder.
MODELS_FOLDER = "models"
MODELS = {"tiny-a.safetensors": 1, "styles/tiny-b.safetensors": 2, "tiny-c": 3}
VAE_FILE = "tiny-vae.safetensors"
CONTROLNET_FOLDER = "controlnets"
LORA_FOLDER = "loras"
UPSCALER_FOLDER = "upscalers"
CONTROLNET_DIFFUSERS = "tiny-controlnet"
CONTROLNET_FILE = "tiny-controlnet-file.safetensors"
CONTROLNET_B_FILE = "tiny-controlnet-b.safetensors"
CONTROLNET_ENTRIES = (CONTROLNET_DIFFUSERS, CONTROLNET_FILE, CONTROLNET_B_FILE)
# The names without the .safetensors suffix, as a folder of ControlNets lists them.
CONTROLNET_NAMES = tuple(entry.removesuffix(".safetensors") for entry in CONTROLNET_ENTRIES)

# Standard deviations of the ControlNet weights that training starts at zero. Measured on a
# 2-step 64x64 image of the tiny model (values 0..1): at conditioning scale 1 it moves by about
# 0.05 on average from scale 0 (0.06 at scale 2); a blank control image with one white bar gives
# an image 0.035 away from a noise control image's.
ZERO_CONV_STD = 0.1
HINT_OUT_STD = 0.5

# SD 1.5's scheduler config (scheduler/scheduler_config.json on the hub).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer_files(directory: Path) -> None:
    """Write a byte-level CLIP vocab and merges: every byte, alone and word-final.

    With no merges beyond single bytes, every string tokenizes (one token per
    byte), which is all a random-weight text encoder needs.
    """
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tiny_safety_checker() -> tuple[Any, Any]:
    """A tiny random StableDiffusionSafetyChecker and its CLIP image processor (32x32 inputs).

    Its concept thresholds are SD's (weights of 1 against cosine similarities), so with
    random embeddings it flags nothing; tests that need a flag lower the weights.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = {"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 4},
        projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def build_tiny_vae(seed: int) -> Any:
    """The tiny AutoencoderKL (4 blocks: scale factor 8, 4 latent channels), its weights drawn from ``seed``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    return _round_to_float16(vae)


def _round_to_float16(model: Any) -> Any:
    """Make every floating weight a float16 value, kept in its dtype."""
    import torch

    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.float16))
    return model


def build_tiny_controlnet(unet: Any, seed: int) -> Any:
    """A ControlNet copied from ``unet`` (``ControlNetModel.from_unet``), its new weights drawn from ``seed``.

    The copy of the UNet's encoder keeps the UNet's weights. The zero-initialised output
    convolutions (``controlnet_down_blocks``, ``controlnet_mid_block`` and the conditioning
    embedding's ``conv_out``) get normal weights instead, and the conditioning embedding's other
    convolutions He-initialised ones: with PyTorch's default initialisation the control image
    fades out over its seven convolutions and SiLUs, and every control image gives the same image.
    """
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv, std in [(conv, ZERO_CONV_STD) for conv in zero_convs] + [(embedding.conv_out, HINT_OUT_STD)]:
            torch.nn.init.normal_(conv.weight, std=std)
            torch.nn.init.normal_(conv.bias, std=std)
    return _round_to_float16(controlnet)


def build_tiny_pipeline(workdir: Path, *, safety_checker: bool = False, seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny pipeline, its weights drawn from ``seed``; ``workdir`` receives the tokenizer's source files."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer_files(workdir)
    tokenizer = CLIPTokenizer(
        vocab=str(workdir / "vocab.json"),
        merges=str(workdir / "merges.txt"),
        model_max_length=CONTEXT_LENGTH,
    )
    vocab = tokenizer.get_vocab()

    # Each block gets its own seed, as diffusers' own tests do, so that a change
    # to one block's shape does not change the weights of the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = build_tiny_vae(seed=seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    for model in (unet, text_encoder):
        _round_to_float16(model)
    checker, processor = build_tiny_safety_checker() if safety_checker else (None, None)
    return assemble_pipeline(
        {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}, checker, processor
    )


def assemble_pipeline(models: dict[str, Any], checker: Any = None, processor: Any = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around ``models`` (vae, text_encoder, tokenizer, unet), with SD 1.5's scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        **models,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=checker is not None,
    )


def write_tiny_model(
    directory: Path, *, safety_checker: bool = False, single_file: bool = False, controlnet: bool = False
) -> Path:
    """Save the tiny pipeline (with a tiny safety checker if asked) to ``directory``; return it.

    With ``single_file``, also write ``CHECKPOINT_FILE`` and ``VAE_FILE`` into it; with ``controlnet``,
    the ControlNets of ``write_tiny_controlnets`` (see the module's doc).
    """
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as workdir:
        pipeline = build_tiny_pipeline(Path(workdir), safety_checker=safety_checker)
    pipeline.save_pretrained(directory)
    if single_file:
        write_single_files(pipeline, directory)
    if controlnet:
        write_tiny_controlnets(directory)
    return directory


def write_tiny_models(directory: Path) -> Path:
    """Write ``MODELS``, tiny models with weights of their own, into ``directory`` as MODELS_DIR holds them; return it.

    Each has the tiny pipeline's shapes (so the tiny model's folder is their MODEL_CONFIG), with weights drawn
    from another seed: the single files in the LDM layout, the folder saved with ``save_pretrained``.
    """
    from builder import single_file

    directory = Path(directory)
    for name, seed in MODELS.items():
        with tempfile.TemporaryDirectory() as workdir:
            pipeline = build_tiny_pipeline(Path(workdir), seed=seed)
        if name.endswith(".safetensors"):
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            single_file.save(single_file.checkpoint_state_dict(pipeline), directory / name)
        else:
            pipeline.save_pretrained(directory / name)
    return directory


def write_single_files(pipeline: StableDiffusionPipeline, directory: Path) -> tuple[Path, Path]:
    """Write ``pipeline`` as ``directory/CHECKPOINT_FILE`` and another VAE as ``directory/VAE_FILE``."""
    from builder import single_file

    checkpoint = single_file.save(single_file.checkpoint_state_dict(pipeline), directory / CHECKPOINT_FILE)
    vae = single_file.save(single_file.vae_state_dict(build_tiny_vae(seed=1), prefix=""), directory / VAE_FILE)
    return checkpoint, vae


def write_tiny_controlnets(model_dir: Path) -> Path:
    """Write ``CONTROLNET_ENTRIES`` into ``model_dir / CONTROLNET_FOLDER``; return that folder.

    ``model_dir`` holds the tiny pipeline; the ControlNets are copied from its UNet as it was saved,
    so their shapes are the pipeline's.

    Raises:
        FileNotFoundError: ``model_dir`` holds no ``unet/`` folder (write the tiny model there first).
    """
    from diffusers import UNet2DConditionModel

    from builder import single_file

    model_dir = Path(model_dir)
    if not (model_dir / "unet").is_dir():
        raise FileNotFoundError(f"{model_dir}: no unet/ folder; write the tiny model there first")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    folder = model_dir / CONTROLNET_FOLDER
    controlnet = build_tiny_controlnet(unet, seed=0)
    controlnet.save_pretrained(folder / CONTROLNET_DIFFUSERS)
    single_file.save(single_file.controlnet_state_dict(controlnet), folder / CONTROLNET_FILE)
    single_file.save(single_file.controlnet_state_dict(build_tiny_controlnet(unet, seed=1)), folder / CONTROLNET_B_FILE)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="folder to write the pipeline into")
    parser.add_argument("--safety-checker", action="store_true", help="include a tiny random safety checker")
    parser.add_argument(
        "--single-file",
        action="store_true",
        help=f"also write the weights as one LDM-layout checkpoint ({CHECKPOINT_FILE}) and a VAE file ({VAE_FILE})",
    )
    parser.add_argument(
        "--models",
        action="store_true",
        help=f"also write tiny models with weights of their own into {MODELS_FOLDER}/, for MODELS_DIR "
        f"({', '.join(MODELS)})",
    )
    parser.add_argument(
        "--controlnet",
        action="store_true",
        help=f"also write tiny ControlNets into {CONTROLNET_FOLDER}/ ({', '.join(CONTROLNET_ENTRIES)})",
    )
    parser.add_argument(
        "--loras", action="store_true", help=f"also write tiny LoRAs into {LORA_FOLDER}/ (tiny-peft-0, tiny-kohya-1)"
    )
    parser.add_argument(
        "--upscalers",
        action="store_true",
        help=f"also write tiny upscalers into {UPSCALER_FOLDER}/ (tiny-esrgan-4x, tiny-compact-2x; needs spandrel)",
    )
    args = parser.parse_args(argv)
    # Keep the terminal quiet: no torchvision notice (no image processor is used) and no
    # progress bars for writing a 4 MB model.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    path = write_tiny_model(
        args.directory, safety_checker=args.safety_checker, single_file=args.single_file, controlnet=args.controlnet
    )
    print(f"tiny SD 1.5-shaped pipeline written to {path}")
    if args.single_file:
        print(f"as one checkpoint file: {path / CHECKPOINT_FILE}")
        print(f"a VAE file with other weights: {path / VAE_FILE}")
    if args.controlnet:
        print(f"tiny ControlNets ({', '.join(CONTROLNET_ENTRIES)}) written to {path / CONTROLNET_FOLDER}")
    _write_extras(path, models=args.models, loras=args.loras, upscalers=args.upscalers)
    return 0


def _write_extras(path: Path, *, models: bool, loras: bool, upscalers: bool) -> None:
    """What --models, --loras and --upscalers add beside the pipeline in ``path``, each said in a line."""
    if models:
        print(f"tiny models for MODELS_DIR (MODEL_CONFIG={path}): {write_tiny_models(path / MODELS_FOLDER)}")
    if loras:
        from builder.tiny_lora import write_test_loras

        names = ", ".join(lora.stem for lora in write_test_loras(path, path / LORA_FOLDER))
        print(f"tiny LoRAs for LORA_DIR ({names}) written to {path / LORA_FOLDER}")
    if upscalers:
        from builder.tiny_upscalers import TINY, write_tiny_upscalers

        folder = write_tiny_upscalers(path / UPSCALER_FOLDER)
        print(f"tiny upscalers for UPSCALER_DIR ({', '.join(TINY)}) written to {folder}")


if __name__ == "__main__":
    sys.exit(main())
