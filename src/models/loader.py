"""Load the SD 1.5 pipeline: device, dtype, baked folder, local folder, hub, single file, VAE.

Where the weights are is found first, without torch (``src.models.locate``). Loading never hangs: a hub id
whose weights are not on disk is looked up on the hub with a short timeout first, and a failed look-up ends
startup with a message that says what to do. A single-file checkpoint is checked, then
converted with configs from a local folder, never the network
(``src.models.checkpoints``); with ``MODEL_CACHE_DIR`` the conversion is kept for the
next workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from src.errors import ModelLoadError, first_line
from src.models.checkpoints import (
    WITHOUT_SAFETY_CHECKER,
    ModelFile,
    cast,
    check_checkpoint,
    check_vae_file,
    convert_checkpoint,
    is_file_path,
    load_vae_file,
    sha256_file,
)
from src.models.locate import (
    BAKED_SOURCE_FILE,
    BakedSource,
    Location,
    check_vae_path,
    locate_model,
    probe_hub,
    read_baked_source,
)
from src.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU.

    Raises:
        ModelLoadError: ``cuda`` was asked for and torch sees no CUDA device.
    """
    has_cuda = torch.cuda.is_available()
    if setting == "cuda" and not has_cuda:
        raise ModelLoadError(
            f"DEVICE='cuda': torch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda or 'none'}); set DEVICE=auto or DEVICE=cpu, "
            "or run on a GPU host with the CUDA build of torch"
        )
    if setting == "cpu" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 on the CPU; any other setting is used as it is.

    float32 is the CPU's default because half precision there is several times slower;
    float16 and bfloat16 still run on the CPU (torch's CPU kernels have them), which lets
    the half-precision paths be exercised without a GPU.
    """
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


@dataclass(frozen=True)
class ModelIdentity:
    """The model as responses and image parameters name it, as A1111 does for a checkpoint and a VAE."""

    name: str
    checkpoint: ModelFile | None = None
    vae: str | None = None
    vae_file: ModelFile | None = None
    # A model a request named by URL: that URL, without its query.
    url: str | None = None

    @property
    def model_hash(self) -> str | None:
        return self.checkpoint.short_hash if self.checkpoint else None

    @property
    def vae_hash(self) -> str | None:
        return self.vae_file.short_hash if self.vae_file else None


def load_pipeline(settings: Settings, dtype: torch.dtype) -> StableDiffusionPipeline:
    """``load_model``'s pipeline."""
    return load_model(settings, dtype)[0]


def load_model(settings: Settings, dtype: torch.dtype) -> tuple[StableDiffusionPipeline, ModelIdentity]:
    """Load the model the settings name in ``dtype``, on the CPU, and say what it is.

    The engine places it on the device, as its memory profile says. ``locate_model`` finds the model (and says
    in which order); a hub id is read from the local cache when it is there and downloaded only after the hub
    has answered a quick look-up. VAE_ID then replaces the VAE.

    Raises:
        ModelLoadError: the weights are missing, unreachable, or not SD 1.5; the message says what to do.
    """
    # Progress bars are for humans at a terminal; in a worker they are log noise.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    options: dict[str, Any] = {"dtype": dtype}
    if not settings.safety_checker:  # off by default (see the README)
        options.update(WITHOUT_SAFETY_CHECKER)
    location = locate_model(settings)
    source = location.label
    if location.way == "checkpoint":
        pipeline, source = _load_checkpoint(settings, dtype, options)
    elif location.way in ("baked-url", "baked") and location.label is not None:
        pipeline = _load_baked(settings, location, location.label, options)
    elif location.way == "folder" and location.path is not None:
        pipeline = _from_folder(location.path, f"MODEL_ID={settings.model_id!r}", options)
    else:
        pipeline = _load_hub(settings, options)
    if settings.safety_checker and getattr(pipeline, "safety_checker", None) is None:
        raise ModelLoadError(
            f"SAFETY_CHECKER=true, but MODEL_ID={settings.model_id!r} has no safety_checker and feature_extractor; "
            "use a model that ships them (SD 1.5 does) or set SAFETY_CHECKER=false"
        )
    identity = _identity(settings, source)
    if settings.vae_id is not None:
        vae, name, vae_file = load_vae(settings.vae_id, pipeline.vae, dtype)
        pipeline.register_modules(vae=vae)
        identity = ModelIdentity(identity.name, identity.checkpoint, name, vae_file)
    return pipeline, identity


def named_identity(settings: Settings) -> ModelIdentity:
    """A diffusers model's identity: MODEL_ID, with @revision when one is set."""
    revision = settings.revision
    return ModelIdentity(f"{settings.model_id}@{revision}" if revision else settings.model_id)


def _identity(settings: Settings, source: BakedSource | None) -> ModelIdentity:
    vae = source.vae_file if source is not None else None
    checkpoint = source.checkpoint_file if source is not None else None
    name = checkpoint.name if checkpoint is not None else named_identity(settings).name
    return ModelIdentity(name, checkpoint, vae.name if vae else None, vae)


def _load_baked(
    settings: Settings, location: Location, baked: BakedSource, options: dict[str, Any]
) -> StableDiffusionPipeline:
    """MODEL_DIR as the build baked it (``baked`` is its label): safetensors only, its file variant, offline."""
    if location.way == "baked-url":
        if settings.model_url is not None and "model_id" in settings.model_fields_set:
            log.warning("MODEL_URL is set, so it is the model; MODEL_ID=%s is not used", settings.model_id)
        held = baked.checkpoint_file
        log.info("loading %s (%s) from %s, baked at build time", held and held.name, baked.url, settings.model_dir)
    else:
        log.info("loading %s from %s, baked at build time", named_identity(settings).name, settings.model_dir)
    return _from_folder(
        Path(settings.model_dir),
        f"MODEL_DIR={settings.model_dir!r}",
        {**options, "use_safetensors": True, "variant": baked.variant},
    )


def _from_folder(folder: Path, setting: str, options: dict[str, Any]) -> StableDiffusionPipeline:
    """The diffusers folder ``folder``, offline.

    Raises:
        ModelLoadError: a file of it cannot be read (cut short, as on a volume still being written); the message
            names ``setting`` and the error.
    """
    try:
        return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **options)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"{setting}: the diffusers folder {folder} cannot be loaded ({type(error).__name__}: {first_line(error)}); "
            "is a file cut short or still being written?"
        ) from None


def _load_hub(settings: Settings, options: dict[str, Any]) -> StableDiffusionPipeline:
    """MODEL_ID as a hub id: from the local cache, else downloaded once the hub has answered a quick look-up."""
    model_id, revision = settings.model_id, settings.revision
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            model_id, local_files_only=True, revision=revision, **options
        )
        log.info("loaded %s from the local Hugging Face cache", model_id)
    except OSError:
        log.info("%s is not in the local cache; asking the hub", model_id)
        probe_hub(model_id, revision)
        pipeline = StableDiffusionPipeline.from_pretrained(model_id, revision=revision, **options)
    return pipeline


def _load_checkpoint(
    settings: Settings, dtype: torch.dtype, options: dict[str, Any]
) -> tuple[StableDiffusionPipeline, BakedSource]:
    """MODEL_ID as a single-file checkpoint: checked, hashed once, then converted or found converted.

    With MODEL_CACHE_DIR, a conversion of this very file (same path, size and modification time,
    or same SHA-256) is loaded from there; otherwise the conversion is written there for the next
    workers. Without it, the checkpoint is converted in memory.
    """
    path = Path(settings.model_id).expanduser()
    config = Path(settings.model_config_folder)
    check_checkpoint(path, config)
    cache = Path(settings.model_cache_dir) if settings.model_cache_dir else None
    found = _find_conversion(cache, path, settings.safety_checker) if cache is not None else None
    if found is None:
        started = time.perf_counter()
        sha256 = sha256_file(path)
        log.info("%s: SHA-256 %s (%.1f s)", path.name, sha256[:10], time.perf_counter() - started)
        _check_sha256(settings, sha256, path)
        if cache is not None:
            found = _find_conversion(cache, path, settings.safety_checker, sha256=sha256)
    if found is not None:
        folder, source = found
        # Named by the file asked for: a copy under another name, found by its SHA-256, is that name.
        source = dataclasses.replace(source, checkpoint={**(source.checkpoint or {}), "name": path.stem})
        _check_sha256(settings, source.checkpoint["sha256"] if source.checkpoint else "", path)
        log.info("loading %s converted earlier, from %s", path.name, folder)
        return _from_folder(folder, f"MODEL_CACHE_DIR={str(cache)!r}", options), source
    started = time.perf_counter()
    pipeline = convert_checkpoint(path, config, safety_checker=settings.safety_checker)
    stat = path.stat()
    source = BakedSource(
        model_id=settings.model_id,
        revision=None,
        variant=None,
        safety_checker=settings.safety_checker,
        checkpoint={
            "name": path.stem,
            "sha256": sha256,
            "file": path.name,
            "path": str(path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        },
    )
    log.info("converted %s with the configs in %s in %.1f s", path.name, config, time.perf_counter() - started)
    if cache is not None:
        save_conversion(pipeline, source, cache / f"{path.stem}-{sha256[:10]}")
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        if getattr(pipeline, name, None) is not None:
            cast(getattr(pipeline, name), dtype)
    return pipeline, source


def _check_sha256(settings: Settings, sha256: str, path: Path) -> None:
    if settings.model_sha256 is not None and sha256 != settings.model_sha256:
        raise ModelLoadError(
            f"MODEL_ID={str(path)!r}: its SHA-256 is {sha256}, and MODEL_SHA256 says {settings.model_sha256}; "
            "the file is not the one expected"
        )


def _find_conversion(
    cache: Path, path: Path, safety_checker: bool, sha256: str | None = None
) -> tuple[Path, BakedSource] | None:
    """A conversion of ``path`` in ``cache``: by the file's full path, size and modification time (two files of one
    name in two folders often have one size, pruned SD 1.5 files all do), or by its SHA-256."""
    stat = path.stat()
    for label in sorted(cache.glob(f"*/{BAKED_SOURCE_FILE}")):
        source = read_baked_source(label.parent)
        if source is None or source.checkpoint is None or (safety_checker and not source.safety_checker):
            continue
        if sha256 is not None:
            if source.checkpoint.get("sha256") == sha256:
                return label.parent, source
        elif (source.checkpoint.get("path"), source.checkpoint.get("size"), source.checkpoint.get("mtime_ns")) == (
            str(path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
        ):
            return label.parent, source
    return None


def save_conversion(pipeline: StableDiffusionPipeline, source: BakedSource, folder: Path) -> Path:
    """Save a converted checkpoint as a diffusers folder, labelled; written aside, then renamed into place.

    Workers starting together may convert the same file; the first rename wins and the others'
    copies are dropped. A failure to write (a full or read-only volume) is logged: the worker still
    serves the conversion it holds.
    """
    scratch = folder.parent / f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pipeline.save_pretrained(scratch, safe_serialization=True)
        source.write(scratch)
        os.replace(scratch, folder) if not folder.exists() else shutil.rmtree(scratch)
        log.info("kept the conversion in %s for the next workers", folder)
    except OSError as error:
        log.warning("could not keep the conversion in %s (%s); converting again at the next start", folder, error)
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def load_vae(vae_id: str, current: Any, dtype: torch.dtype) -> tuple[Any, str, ModelFile | None]:
    """VAE_ID as a VAE shaped like ``current`` (the model's): the VAE, its name, and its file when it is one.

    Raises:
        ModelLoadError: VAE_ID is missing, not a VAE, or of other shapes than the model's VAE.
    """
    from diffusers import AutoencoderKL

    config = dict(current.config)
    path = check_vae_path(vae_id)
    if is_file_path(vae_id):
        check_vae_file(path, config)
        vae = load_vae_file(path, config, dtype)
        return vae, path.stem, ModelFile(path.stem, sha256_file(path))
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if not (path / (subfolder or "") / "config.json").is_file():
        raise ModelLoadError(f"VAE_ID={vae_id!r}: a folder without a VAE (no config.json nor vae/config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"VAE_ID={vae_id!r}: cannot be loaded as a diffusers VAE ({first_line(error)})") from None
    expected = {key: tuple(value.shape) for key, value in current.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in vae.state_dict().items()}
    if found != expected:
        wrong = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        raise ModelLoadError(
            f"VAE_ID={vae_id!r}: not shaped as this model's VAE ({len(wrong)} tensors differ, such as {wrong[0]}: "
            f"{list(found.get(wrong[0], ()))} here, {list(expected.get(wrong[0], ()))} in the model)"
        )
    return vae, path.name, None
