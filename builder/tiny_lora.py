"""Write random-weight LoRA files for an SD 1.5-shaped pipeline.

Usage::

    python -m builder.tiny_lora MODEL_DIR OUT_DIR [--count N] [--rank R] [--layout peft|kohya] [--seed S] [--unet-only]

``MODEL_DIR`` is a diffusers folder: the tiny pipeline from ``python -m
builder.tiny_model DIR``, or SD 1.5's architecture with random weights
(``bench/sd15_random.py``). The LoRAs fit its UNet and text encoder, so tests,
smoke runs and benchmarks load LoRAs offline through the same diffusers code
that loads published ones. Nothing is downloaded. The weights are random: a
LoRA changes the images, it teaches them nothing. Tensors are stored as float32.

Two key layouts are written, the two that published SD 1.5 LoRAs use:

- ``peft``: diffusers' own, ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``
  and ``text_encoder.text_model.<module>.lora_A.weight``. (``save_lora_weights`` after
  ``convert_state_dict_to_diffusers``, as diffusers' training scripts call it, writes the
  older ``.lora.down`` / ``.lora_linear_layer.down`` spelling; diffusers loads both.)
- ``kohya``: A1111 / Civitai files from kohya-ss, ``lora_unet_<module_with_underscores>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, and ``lora_te_text_model_<...>`` for the
  text encoder. diffusers converts them on load.

Text encoder keys keep the ``text_model.`` level that published files have,
although transformers 5 dropped that level from ``CLIPTextModel``; diffusers
strips it on load.

Both layouts built from one seed are the same LoRA: every module gets the same
weight change ``up @ down * alpha / rank``. The kohya files store
``alpha = rank / 2`` and up weights twice as large, so that loading them only
gives the right image when the loader applies ``alpha / rank``, as real kohya
files (alpha is often 1 or rank / 2) need.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

Layout = Literal["peft", "kohya"]
Targets = Literal["attention", "all"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
TARGETS: tuple[str, ...] = get_args(Targets)

# Module name endings, matched after a dot. "attention" is what most published SD 1.5
# LoRAs train; "all" adds the feed-forward layers and the transformers' 1x1 conv
# projections (linear in SD 2), as kohya-ss does by default.
UNET_TARGETS = {
    "attention": (".to_q", ".to_k", ".to_v", ".to_out.0"),
    "all": (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out"),
}
TEXT_ENCODER_TARGETS = {
    "attention": (".q_proj", ".k_proj", ".v_proj", ".out_proj"),
    "all": (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".mlp.fc1", ".mlp.fc2"),
}

# Per-output standard deviation of the change up @ down @ x for inputs of unit scale.
# A default-initialised Linear gives outputs of about 0.58 (1/sqrt(3)). At scale 1, 0.25
# moves the tiny model's 2-step 64x64 images by about 0.02 of their 0..1 range on average
# (about 5 of 255 levels); the change grows about linearly up to scale 2, and images stay
# finite up to scale 32 at least. On full-size random SD 1.5 (float32) it changes the
# UNet's noise prediction by about 40% and the text encoder's output by about 110% (norms).
UP_STD = 0.25
# kohya files store alpha and the loader scales by alpha / rank; see the module docstring.
KOHYA_ALPHA_FRACTION = 0.5


def _lora_modules(model: torch.nn.Module, endings: tuple[str, ...]) -> list[tuple[str, torch.Size]]:
    """Name and weight shape of each Linear or Conv2d in ``model`` whose name ends in ``endings``.

    They come in model order, which fixes the order of the random draws.

    A module that already carries a PEFT adapter counts as its base layer, so a model
    with a LoRA loaded still gives the same names and shapes.
    """
    import torch

    found = []
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if f".{name}".endswith(endings) and isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
            found.append((name, base.weight.shape))
    return found


def _random_pair(
    weight_shape: torch.Size, rank: int, scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Down and up weights for a module of ``weight_shape``, shaped as PEFT shapes them.

    The down weights are scaled by 1/sqrt(fan_in), so ``down @ x`` has unit scale whatever
    the layer's width, and the same ``UP_STD`` suits the tiny model and full-size SD 1.5.
    """
    import torch

    out_features, in_features, *kernel = weight_shape
    fan_in = in_features * math.prod(kernel)
    down = torch.randn((rank, in_features, *kernel), generator=generator) / math.sqrt(fan_in)
    up = torch.randn((out_features, rank, *(1 for _ in kernel)), generator=generator)
    return down, up * (UP_STD * scale / math.sqrt(rank))


def build_lora_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    *,
    rank: int = 4,
    seed: int = 0,
    layout: str = "peft",
    text_encoder_layers: bool = True,
    targets: str = "attention",
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet`` (a UNet2DConditionModel) and ``text_encoder`` (a CLIPTextModel), float32.

    Args:
        unet: the UNet whose module names and shapes the LoRA follows.
        text_encoder: the text encoder; may be None when ``text_encoder_layers`` is False.
        rank: the LoRA rank.
        seed: seeds the weights; the UNet's are drawn first, so they do not depend on
            ``text_encoder_layers``.
        layout: ``"peft"`` (diffusers keys) or ``"kohya"`` (A1111 keys); see the module docstring.
        text_encoder_layers: whether to include text encoder layers.
        targets: ``"attention"`` (attention projections) or ``"all"`` (also feed-forward
            layers and the transformers' projections).
        scale: multiplies the up weights, and so the LoRA's effect.

    Raises:
        ValueError: an argument is out of range, or a model has no module to target.
    """
    import torch

    problems = []
    if rank < 1:
        problems.append(f"rank={rank}: must be at least 1")
    if layout not in LAYOUTS:
        problems.append(f"layout={layout!r}: must be one of {', '.join(LAYOUTS)}")
    if targets not in TARGETS:
        problems.append(f"targets={targets!r}: must be one of {', '.join(TARGETS)}")
    if not math.isfinite(scale):
        problems.append(f"scale={scale}: must be finite")
    if text_encoder_layers and text_encoder is None:
        problems.append("text_encoder=None: a text encoder is needed when text_encoder_layers is True")
    if problems:
        raise ValueError("; ".join(problems))

    components: list[tuple[str, torch.nn.Module, str]] = [("unet", unet, "")]
    if text_encoder_layers and text_encoder is not None:
        # Published files name the text encoder's modules under text_model (transformers 4).
        prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
        components.append(("text_encoder", text_encoder, prefix))

    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for component, model, prefix in components:
        modules = _lora_modules(model, (UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS)[targets])
        if not modules:
            raise ValueError(f"{component}: no module matches targets={targets!r}; is it an SD 1.5-shaped model?")
        for name, weight_shape in modules:
            down, up = _random_pair(weight_shape, rank, scale, generator)
            state_dict.update(_keys(layout, component, prefix + name, down, up))
    return state_dict


def _keys(
    layout: str, component: str, module_name: str, down: torch.Tensor, up: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One module's entries in ``layout``."""
    import torch

    if layout == "peft":
        return {f"{component}.{module_name}.lora_A.weight": down, f"{component}.{module_name}.lora_B.weight": up}
    rank = down.shape[0]
    alpha = rank * KOHYA_ALPHA_FRACTION
    stem = f"lora_{'unet' if component == 'unet' else 'te'}_{module_name.replace('.', '_')}"
    return {
        f"{stem}.lora_down.weight": down,
        f"{stem}.lora_up.weight": up * (rank / alpha),
        f"{stem}.alpha": torch.tensor(alpha, dtype=torch.float32),
    }


def save_lora(state_dict: dict[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` to the ``.safetensors`` file ``path`` (folders are created); return the path.

    ``metadata`` goes into the file's header, after ``format: pt`` as diffusers writes it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: tensor.contiguous() for key, tensor in state_dict.items()},
        str(path),
        metadata={"format": "pt", **(metadata or {})},
    )
    return path


def write_test_loras(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    count: int = 2,
    rank: int = 4,
    layout: str | None = None,
    seed: int = 0,
    text_encoder_layers: bool = True,
) -> list[Path]:
    """Write ``count`` LoRAs for the pipeline in ``model_dir`` into ``out_dir``; return their paths.

    LoRA k has seed ``seed + k`` and is named ``tiny-<layout>-<seed>.safetensors``. Its layout
    is ``layout``, or, when that is None, peft and kohya in turn, starting with peft.

    Raises:
        ValueError: ``count`` is below 1, or from ``build_lora_state_dict``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if count < 1:
        raise ValueError(f"count={count}: must be at least 1")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder") if text_encoder_layers else None
    paths = []
    for index in range(count):
        lora_seed = seed + index
        lora_layout = layout or LAYOUTS[index % len(LAYOUTS)]
        state_dict = build_lora_state_dict(
            unet, text_encoder, rank=rank, seed=lora_seed, layout=lora_layout, text_encoder_layers=text_encoder_layers
        )
        path = Path(out_dir) / f"tiny-{lora_layout}-{lora_seed}.safetensors"
        metadata = {"generator": "builder.tiny_lora", "layout": lora_layout, "rank": str(rank), "seed": str(lora_seed)}
        paths.append(save_lora(state_dict, path, metadata=metadata))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.tiny_lora", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="diffusers folder of an SD 1.5-shaped pipeline")
    parser.add_argument("out_dir", type=Path, help="folder to write the .safetensors files into")
    parser.add_argument("--count", type=int, default=2, help="how many LoRAs to write (default 2)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--layout", choices=LAYOUTS, help="key layout of every file (default: peft and kohya in turn)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first LoRA, counting up (default 0)")
    parser.add_argument("--unet-only", action="store_true", help="leave the text encoder out")
    args = parser.parse_args(argv)
    # Keep the terminal to the paths: no torchvision notice and no loading progress bars.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    paths = write_test_loras(
        args.model_dir,
        args.out_dir,
        count=args.count,
        rank=args.rank,
        layout=args.layout,
        seed=args.seed,
        text_encoder_layers=not args.unet_only,
    )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
