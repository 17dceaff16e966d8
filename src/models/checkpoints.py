"""Single-file checkpoints and VAEs: what a file is, its hash, and its conversion to a diffusers pipeline.

Fine-tunes of SD 1.5 are shared as one ``.safetensors`` file in the original (LDM)
layout, their VAEs as another. Before any weight is read, a file is checked from its
header alone: its tensor names say what it is (a LoRA, an SDXL or SD 2.x checkpoint,
a VAE, an inpainting UNet), and its shapes, converted the way diffusers converts
them, must be those of the SD 1.5 pipeline in the config folder (``MODEL_CONFIG``).
Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused unopened: loading one
runs whatever code it holds.

A checked checkpoint is converted with diffusers' ``from_single_file``, every config
and the tokenizer read from the config folder, offline. ``convert_checkpoint``
converts in float16, whether the result is then saved (``builder.cache_model``,
``MODEL_CACHE_DIR``) or used at once, so a baked checkpoint and one converted at
startup hold the same numbers.

Importing this module does not import torch: the worker checks a checkpoint's header before torch is
imported (``src.models.locate``), so a file it cannot serve stops the start in about a second.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from src.errors import ModelLoadError
from src.models.safetensors_header import SafetensorsError, read_header, tensor_shapes

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# How a pickled checkpoint becomes a safetensors one, on a machine that trusts the file (README: Your own checkpoint).
CONVERT_PICKLE = (
    'python -c "import sys,torch;from safetensors.torch import save_file;'
    "s=torch.load(sys.argv[1],map_location='cpu',weights_only=True);s=s.get('state_dict',s);"
    "save_file({k:v.clone(memory_format=torch.contiguous_format) for k,v in s.items() "
    'if isinstance(v,torch.Tensor)},sys.argv[2])" model.ckpt model.safetensors'
)
# The parts of an SD 1.5 checkpoint, by the prefix of their tensor names in the LDM layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# What a config folder must hold for from_single_file to build SD 1.5 from a checkpoint.
CONFIG_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
)
# A shape mismatch message names at most this many tensors.
SHOWN = 3
# What a pipeline loads with when SAFETY_CHECKER is off. SD 1.5's model_index.json names a safety checker and its
# feature extractor, which a folder baked without the checker does not hold: diffusers would look for both (and
# fail on the extractor's missing preprocessor_config.json) unless they are given as None. requires_safety_checker
# False keeps it from warning on every load.
WITHOUT_SAFETY_CHECKER: Mapping[str, Any] = MappingProxyType(
    {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
)

# sha256_file's results, by (resolved path, size, modification time in ns).
_HASHED: dict[tuple[str, int, int], str] = {}
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A.", "lora_B.", "lora.down", "lora.up", "hada_w1", "lokr_w1")
_VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight")


@dataclass(frozen=True)
class ModelFile:
    """A checkpoint or VAE file as A1111 names it: its name without the extension, and its SHA-256."""

    name: str
    sha256: str

    @property
    def short_hash(self) -> str:
        """A1111's ``Model hash``/``VAE hash``: the first 10 hex digits of the file's SHA-256."""
        return self.sha256[:10]


def is_file_path(value: str) -> bool:
    """Whether a ``MODEL_ID``/``VAE_ID`` names a single file rather than a folder or a hub id."""
    path = Path(value).expanduser()
    return path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or path.is_file()


def sha256_file(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """The file's SHA-256, read in chunks (checkpoints are GBs); once per file and version in a process: kept by
    the file's path, size and modification time, so that a model read again (MODELS_DIR's, after the host cache
    dropped it) is not hashed again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                digest.update(chunk)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def read_shapes(path: Path, setting: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a single-file checkpoint or VAE, from its header.

    Raises:
        ModelLoadError: the path is missing, a folder, a pickle, empty, not safetensors, or cut short;
            the message names ``setting`` and the path.
    """
    where = f"{setting}={str(path)!r}"
    if not path.exists():
        raise ModelLoadError(f"{where}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{where}: a folder, not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{where}: a pickled checkpoint ({path.suffix}); pickles can run code when loaded, so they are refused "
            "unopened. Convert it to .safetensors once, on a machine that trusts the file: "
            f"`{CONVERT_PICKLE}` (README: Your own checkpoint), or download the .safetensors release"
        )
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        kind = path.suffix or "without an extension"
        raise ModelLoadError(f"{where}: only .safetensors files are read; this one is {kind}")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{where}: the file is empty (0 bytes); was its download interrupted?")
    try:
        header, _start = read_header(path)
        return tensor_shapes(header)
    except SafetensorsError as error:
        problem = str(error).removeprefix(f"{path}: ")
        hint = "; was its download interrupted?" if "cut short" in problem else ""
        raise ModelLoadError(f"{where}: {problem}{hint}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise ModelLoadError(f"{where}: not a safetensors file (its header cannot be read: {error})") from None


def looks_like(shapes: dict[str, tuple[int, ...]]) -> str | None:  # noqa: PLR0911 - one answer per kind of file
    """What a file whose tensors have these names and shapes is, when it is not an SD 1.5 checkpoint; else None."""
    keys = list(shapes)
    if not keys:
        return "a safetensors file that holds no tensors"
    if any(marker in key for key in keys for marker in _LORA_MARKERS):
        return "a LoRA (its tensors are low-rank up/down pairs), not a checkpoint; LoRAs go in LORA_DIR"
    if any(key in ("emb_params", "string_to_param", "clip_l", "clip_g") for key in keys):
        return "a textual-inversion embedding, not a checkpoint; embeddings go in EMBEDDINGS_DIR"
    if any(key.startswith("control_model.") or "input_hint_block" in key or "zero_convs" in key for key in keys):
        return "a ControlNet (it has input_hint_block/zero_convs tensors), not a checkpoint"
    if any(key.startswith("conditioner.embedders.") for key in keys) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        return (
            "an SDXL checkpoint (its text encoders are conditioner.embedders.*, and its UNet takes size "
            "conditioning, label_emb); this worker serves SD 1.5 only"
        )
    cross = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if any(key.startswith("cond_stage_model.model.") for key in keys) or (cross and cross[-1] == 1024):
        return (
            "an SD 2.x checkpoint (its text encoder is OpenCLIP, cond_stage_model.model.*, and its "
            "cross-attention is 1024 wide; SD 1.5's is CLIP's 768); this worker serves SD 1.5 only"
        )
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        return _without_unet(keys)
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 9:
        return (
            "an inpainting checkpoint (its UNet takes 9 input channels: latents, mask and masked image; SD 1.5's "
            "takes 4); this worker inpaints with a regular SD 1.5 checkpoint: use that one's base model"
        )
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        return f"not a text-to-image SD 1.5 checkpoint: its UNet takes {conv_in[1]} input channels, SD 1.5's takes 4"
    if not any(key.startswith(TEXT_PREFIX) for key in keys):
        return "a UNet without its CLIP text encoder (no cond_stage_model.transformer.* tensors), not a checkpoint"
    if not any(key.startswith(VAE_PREFIX) for key in keys):
        return "a checkpoint without its VAE (no first_stage_model.* tensors); this worker needs a whole checkpoint"
    return None


def _without_unet(keys: list[str]) -> str:
    if any(key.removeprefix(VAE_PREFIX) in _VAE_KEYS for key in keys):
        return "a VAE alone, not a checkpoint; a VAE file goes in VAE_ID"
    if any(key.startswith(("down_blocks.", "mid_block.", "conv_in.", "encoder.down_blocks.")) for key in keys):
        return (
            "one model of a diffusers folder (a diffusion_pytorch_model.safetensors), not a checkpoint; "
            "point MODEL_ID at the whole diffusers folder instead"
        )
    if any(key.startswith(("text_model.", "embeddings.token_embedding", TEXT_PREFIX)) for key in keys):
        return "a CLIP text encoder alone, not a checkpoint"
    if any(key.startswith(("transformer_blocks.", "double_blocks.", "joint_blocks.")) for key in keys):
        return "a transformer-based model (SD 3 or Flux style), not SD 1.5"
    return (
        f"not an SD 1.5 checkpoint: none of its {len(keys)} tensors is a UNet's ({UNET_PREFIX}*); "
        f"its first are {', '.join(sorted(keys)[:SHOWN])}"
    )


def check_config_folder(folder: Path, setting: str) -> Path:
    """``folder`` when it holds what ``from_single_file`` needs to build SD 1.5.

    Raises:
        ModelLoadError: it does not; the message says how to get one.
    """
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"{setting}={str(folder)!r} is not an SD 1.5 config folder (it lacks {', '.join(missing[:SHOWN])}), and "
            "a single-file checkpoint needs one for its configs and tokenizer, read offline. Ways out: use the full "
            "image, whose MODEL_DIR holds SD 1.5 (MODEL_CONFIG defaults to it); or set MODEL_CONFIG to any diffusers "
            "SD 1.5 folder (`python -m builder.cache_model` with network writes one into MODEL_DIR); or bake the "
            "checkpoint at build time (MODEL_URL, README: Your own checkpoint)"
        )
    return folder


def check_checkpoint_kind(path: Path, config_folder: Path, setting: str = "MODEL_ID") -> dict[str, tuple[int, ...]]:
    """Refuse a file that is not an SD 1.5 checkpoint by what its header says it is, and a config folder that
    cannot build one; return the file's tensor shapes. Needs no torch.

    Raises:
        ModelLoadError: what the file is instead, or what the config folder lacks; the message names the file.
    """
    shapes = read_shapes(path, setting)
    kind = looks_like(shapes)
    if kind is not None:
        raise ModelLoadError(f"{setting}={str(path)!r}: {kind}")
    check_config_folder(config_folder, "MODEL_CONFIG")
    return shapes


def check_checkpoint(path: Path, config_folder: Path, setting: str = "MODEL_ID") -> None:
    """Refuse a file that is not an SD 1.5 checkpoint shaped as the config folder's pipeline, by its header.

    Raises:
        ModelLoadError: what the file is instead, or which tensors do not fit; the message names the file.
    """
    shapes = check_checkpoint_kind(path, config_folder, setting)
    problems = _misfits(shapes, config_folder)
    if problems:
        raise ModelLoadError(
            f"{setting}={str(path)!r}: not shaped as SD 1.5 (the pipeline in {config_folder}): {'; '.join(problems)}"
        )


def check_vae_file(path: Path, vae_config: dict[str, Any], setting: str = "VAE_ID") -> None:
    """Refuse a file that is not a VAE of the shapes ``vae_config`` builds, by its header.

    Raises:
        ModelLoadError: what the file is instead, or which tensors do not fit.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    shapes = read_shapes(path, setting)
    where = f"{setting}={str(path)!r}"
    if any(key.startswith(UNET_PREFIX) for key in shapes):
        raise ModelLoadError(f"{where}: a whole checkpoint, not a VAE; set MODEL_ID to it, or VAE_ID to a VAE file")
    if not any(key.removeprefix(VAE_PREFIX) in _VAE_KEYS for key in shapes):
        kind = looks_like(shapes) or "not a VAE"
        raise ModelLoadError(f"{where}: {kind.removesuffix('; a VAE file goes in VAE_ID')}, not a VAE")
    problems = _compare("VAE", _converted(convert_ldm_vae_checkpoint, shapes, vae_config), AutoencoderKL, vae_config)
    if problems:
        raise ModelLoadError(f"{where}: not shaped as this model's VAE: {'; '.join(problems)}")


def convert_checkpoint(
    path: Path,
    config_folder: Path,
    *,
    safety_checker: bool = False,
    dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline:
    """Build the pipeline from a checked checkpoint, configs and tokenizer from ``config_folder``, offline.

    Weights are converted in ``dtype``, float16 unless told otherwise, as they are baked; the caller casts to
    the dtype it runs in. With ``safety_checker``, the checker and its feature extractor come from the config
    folder.

    Raises:
        ModelLoadError: the config folder lacks the safety checker asked for.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = dtype or torch.float16

    options: dict[str, Any] = dict(WITHOUT_SAFETY_CHECKER)
    if safety_checker:
        options = _safety_checker_from(config_folder, dtype)
    noise = logging.getLogger("diffusers.models.modeling_utils")
    noise.addFilter(_empty_fp32_warning)
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_folder), local_files_only=True, dtype=dtype, **options
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        # The header check passed, so this is a file whose data does not match its header, or a layout
        # variant diffusers does not read; either way the worker cannot start on it.
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        raise ModelLoadError(f"MODEL_ID={str(path)!r}: cannot be converted ({reason})") from None
    finally:
        noise.removeFilter(_empty_fp32_warning)


def _empty_fp32_warning(record: logging.LogRecord) -> bool:
    """Drop diffusers' warning about keeping no modules (``[]``) in float32, which ``from_single_file`` triggers."""
    return not record.getMessage().startswith("There are modules in") or ": []." not in record.getMessage()


def load_vae_file(path: Path, vae_config: dict[str, Any], dtype: torch.dtype) -> AutoencoderKL:
    """A checked single-file VAE, built from ``vae_config`` and converted as diffusers converts one."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_config(vae_config)
    try:
        vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(path)), vae_config), strict=True)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
        # The header check passed: a file whose data does not match its header, or one cut or changed since.
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        raise ModelLoadError(f"VAE_ID={str(path)!r}: cannot be read ({reason})") from None
    return cast(vae, dtype).eval()


def cast(module: Any, dtype: torch.dtype) -> Any:
    """``module`` in ``dtype``, through torch's own ``to``: diffusers' warns on every dtype cast (0.42 checks
    ``_keep_in_fp32_modules or []`` against None), though SD 1.5's models keep nothing in float32."""
    import torch

    return torch.nn.Module.to(module, dtype=dtype)


def _safety_checker_from(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    if not (folder / "safety_checker").is_dir() or not (folder / "feature_extractor").is_dir():
        raise ModelLoadError(
            f"SAFETY_CHECKER=true, but the config folder {folder} has no safety_checker and feature_extractor "
            "for the checkpoint; bake SD 1.5 with the checker (`docker build --build-arg SAFETY_CHECKER=true`) "
            "or set SAFETY_CHECKER=false"
        )
    checker = StableDiffusionSafetyChecker.from_pretrained(folder, subfolder="safety_checker", dtype=dtype)
    extractor = CLIPImageProcessor.from_pretrained(folder, subfolder="feature_extractor")
    return {"safety_checker": checker, "feature_extractor": extractor, "requires_safety_checker": True}


def _misfits(shapes: dict[str, tuple[int, ...]], config_folder: Path) -> list[str]:
    """How the checkpoint's UNet, VAE and text encoder differ from the config folder's, once converted."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = dict(UNet2DConditionModel.load_config(config_folder, subfolder="unet"))
    vae_config = dict(AutoencoderKL.load_config(config_folder, subfolder="vae"))
    text_config = CLIPTextConfig.from_pretrained(config_folder, subfolder="text_encoder")
    unet = _converted(convert_ldm_unet_checkpoint, shapes, unet_config)
    vae = _converted(convert_ldm_vae_checkpoint, shapes, vae_config)
    # diffusers reads the text encoder under transformers' current names only (``...transformer.text_model.*``).
    text = {
        key.removeprefix(TEXT_PREFIX + "text_model."): shape
        for key, shape in shapes.items()
        if key.startswith(TEXT_PREFIX + "text_model.")
    }
    return (
        _compare("UNet", unet, UNet2DConditionModel, unet_config)
        + _compare("VAE", vae, AutoencoderKL, vae_config)
        + _compare("text encoder", text, CLIPTextModel, text_config)
    )


def _converted(convert: Any, shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The diffusers names and shapes ``convert`` gives tensors of these shapes, worked out on the meta device."""
    import torch

    stand_in = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    try:
        return {key: tuple(value.shape) for key, value in convert(stand_in, config).items()}
    except (KeyError, IndexError, RuntimeError, ValueError):
        # Tensors diffusers cannot convert give none of the model's: the comparison says how many are lacking.
        return {}


def _compare(part: str, found: dict[str, tuple[int, ...]], build: Any, config: Any) -> list[str]:
    """Problems of ``found`` against the parameters of the model ``build(config)`` makes, built without memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build.from_config(config) if hasattr(build, "from_config") else build(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in found]
    wrong = [key for key in expected if key in found and found[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"its {part} lacks {len(missing)} of {len(expected)} tensors, such as {missing[0]}")
    for key in wrong[:SHOWN]:
        problems.append(f"{part} {key} is {list(found[key])}, expected {list(expected[key])}")
    if len(wrong) > SHOWN:
        problems.append(f"and {len(wrong) - SHOWN} more {part} tensors of other shapes")
    return problems
