"""Bake the model into the image at build time, then prove it loads offline.

    python -m builder.cache_model                 # MODEL_ID at its revision into MODEL_DIR (/models/sd15)
    MODEL_URL=https://... python -m builder.cache_model   # a single-file checkpoint, converted into MODEL_DIR
    MODEL_ID=/path/model.safetensors python -m builder.cache_model   # the same, from a file
    python -m builder.cache_model --verify-only   # only check that MODEL_DIR loads offline

It reads MODEL_ID, MODEL_REVISION, MODEL_URL, MODEL_SHA256, VAE_URL, VAE_SHA256,
MODEL_CONFIG, MODEL_DIR and SAFETY_CHECKER through the worker's own settings, so
the build and the runtime cannot disagree on the model.

From the hub it downloads only the fp16 safetensors (no .ckpt, no .bin, no full
precision copy), and the safety checker only when SAFETY_CHECKER=true, into
MODEL_DIR itself rather than HF_HOME, which a network volume may later hide.

A single-file checkpoint (MODEL_URL, downloaded with resume and retries, the
token in DOWNLOAD_TOKEN; or a file at MODEL_ID) is checked and converted once,
into a float16 diffusers folder labelled with the file's SHA-256, so the worker
starts from the converted folder. Its configs and tokenizer come from
MODEL_CONFIG when that is an SD 1.5 folder, else from SD 1.5's repo on the hub
(config files only). VAE_URL bakes a VAE file in place of the model's.

Transient network failures are retried; everything else stops the build with
a message saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from builder.download import DownloadError, download_to_folder
from src.checkpoints import check_checkpoint, check_config_folder, check_vae_file, convert_checkpoint, load_vae_file
from src.checkpoints import sha256_file as file_sha256
from src.errors import ModelLoadError
from src.loader import BakedSource, hidden_query, read_baked_source
from src.settings import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, Settings, SettingsError, load_settings

log = logging.getLogger("cache_model")

VARIANT = "fp16"
ATTEMPTS = 4
# What SD 1.5's pipeline needs, in fp16 safetensors only.
FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    f"text_encoder/model.{VARIANT}.safetensors",
    "unet/config.json",
    f"unet/diffusion_pytorch_model.{VARIANT}.safetensors",
    "vae/config.json",
    f"vae/diffusion_pytorch_model.{VARIANT}.safetensors",
]
# What a single-file checkpoint is converted with: SD 1.5's configs and tokenizer, no weights.
CONFIG_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
]
SAFETY_FILES = [
    "safety_checker/config.json",
    f"safety_checker/model.{VARIANT}.safetensors",
    "feature_extractor/preprocessor_config.json",
]


class CacheError(RuntimeError):
    """Baking failed; the message says what to do."""


def allow_patterns(safety_checker: bool) -> list[str]:
    """The repo files to download."""
    return FILES + (SAFETY_FILES if safety_checker else [])


def download(settings: Settings, destination: Path) -> None:
    """Download MODEL_ID at its revision into ``destination``, retrying transient failures."""
    download_repo(settings.model_id, settings.revision, destination, allow_patterns(settings.safety_checker))


def download_repo(model_id: str, revision: str | None, destination: Path, patterns: list[str]) -> None:
    """Download the files of a hub repo matching ``patterns`` into ``destination``, retrying transient failures.

    Raises:
        CacheError: the repo, the revision or the access is wrong, or the network stayed down.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    for attempt in range(1, ATTEMPTS + 1):
        try:
            snapshot_download(model_id, revision=revision, local_dir=destination, allow_patterns=patterns)
            return
        except GatedRepoError:
            raise CacheError(
                f"{model_id} is gated: accept its license on the hub and build with a token "
                "(docker build --secret id=hf_token,env=HF_TOKEN ...)"
            ) from None
        except RepositoryNotFoundError:
            raise CacheError(f"{model_id} does not exist on the hub (or is private): check MODEL_ID") from None
        except RevisionNotFoundError:
            raise CacheError(f"{model_id} has no revision {revision!r}: check MODEL_REVISION") from None
        except Exception as error:  # network errors come in many types; all are retried the same way
            if attempt == ATTEMPTS:
                raise CacheError(
                    f"downloading {model_id}@{revision} failed {ATTEMPTS} times ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); check the network and build again"
                ) from error
            wait = 2**attempt
            log.warning("download attempt %d failed (%s); retrying in %d s", attempt, type(error).__name__, wait)
            time.sleep(wait)


def verify(folder: Path, variant: str | None, safety_checker: bool = False) -> None:
    """Load ``folder`` the way the worker will, offline, on the CPU.

    Raises:
        CacheError: the folder does not load; the message names what is missing.
    """
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise CacheError(f"{folder} does not load: it holds no model_index.json. Run `python -m builder.cache_model`")
    options: dict[str, object] = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, variant=variant, **options
        )
    except (OSError, ValueError) as error:
        raise CacheError(
            f"{folder} does not load as a diffusers pipeline: {str(error).splitlines()[0].rstrip('.')}. "
            f"Delete {folder} and run `python -m builder.cache_model` again"
        ) from None
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipeline, name, None) is None]
    if missing:
        raise CacheError(f"{folder} loads without {', '.join(missing)}; delete it and bake again")


def bake(settings: Settings) -> Path:
    """Download (or convert), verify and label MODEL_DIR. Returns the folder."""
    from src.checkpoints import is_file_path

    if settings.model_url is not None or is_file_path(settings.model_id):
        return bake_checkpoint(settings)
    destination = Path(settings.model_dir)
    baked = read_baked_source(destination)
    if baked is not None and baked.matches(settings.model_id, settings.revision, settings.safety_checker):
        log.info("%s already holds %s@%s; verifying", destination, settings.model_id, settings.revision)
    else:
        destination.mkdir(parents=True, exist_ok=True)
        download(settings, destination)
    source = BakedSource(settings.model_id, settings.revision, VARIANT, settings.safety_checker)
    if settings.vae_url is not None:
        source = bake_vae(settings, destination, source)
    verify(destination, VARIANT, settings.safety_checker)
    source.write(destination)
    return destination


def bake_checkpoint(settings: Settings) -> Path:
    """Convert the single-file checkpoint (MODEL_URL, else the file at MODEL_ID) into MODEL_DIR, labelled.

    Raises:
        CacheError: the download, the check or the conversion failed; the message says why.
    """
    destination = Path(settings.model_dir)
    url = hidden_query(settings.model_url) if settings.model_url else None
    baked = read_baked_source(destination)
    if baked is not None and _holds_checkpoint(baked, settings, url):
        log.info("%s already holds %s; verifying", destination, url or settings.model_id)
        verify(destination, baked.variant, settings.safety_checker)
        return destination
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as scratch:
        if settings.model_url is not None:
            path, sha256 = _fetch(settings.model_url, destination.parent / ".downloads", settings.model_sha256)
        else:
            path = Path(settings.model_id).expanduser()
            sha256 = file_sha256(path) if path.is_file() else ""
            if settings.model_sha256 is not None and sha256 != settings.model_sha256:
                expected = settings.model_sha256
                raise CacheError(f"MODEL_ID={str(path)!r}: its SHA-256 is {sha256}, MODEL_SHA256 says {expected}")
        config = _config_folder(settings, Path(scratch) / "config")
        try:
            check_checkpoint(path, config)
            log.info("converting %s (SHA-256 %s) with the configs in %s", path.name, sha256[:10], config)
            pipeline = convert_checkpoint(path, config, safety_checker=settings.safety_checker)
        except ModelLoadError as error:
            raise CacheError(str(error)) from None
        source = BakedSource(
            model_id=settings.model_id if url is None else url,
            revision=None,
            variant=None,
            safety_checker=settings.safety_checker,
            checkpoint={"name": path.stem, "sha256": sha256, "file": path.name},
            url=url,
        )
        if destination.exists():
            shutil.rmtree(destination)
        pipeline.save_pretrained(destination, safe_serialization=True)
        if settings.model_url is not None:
            path.unlink()
    if settings.vae_url is not None:
        source = bake_vae(settings, destination, source)
    verify(destination, None, settings.safety_checker)
    source.write(destination)
    return destination


def _holds_checkpoint(baked: BakedSource, settings: Settings, url: str | None) -> bool:
    if baked.checkpoint is None or (settings.safety_checker and not baked.safety_checker):
        return False
    if settings.model_sha256 is not None and baked.checkpoint.get("sha256") != settings.model_sha256:
        return False
    vae_url = hidden_query(settings.vae_url) if settings.vae_url else None
    if (baked.vae or {}).get("url") != vae_url:
        return False
    return baked.url == url if url is not None else baked.holds(settings.model_id, None)


def bake_vae(settings: Settings, destination: Path, source: BakedSource) -> BakedSource:
    """Download VAE_URL, check it against the baked model's VAE and save it in its place; the new label."""
    from diffusers import AutoencoderKL

    assert settings.vae_url is not None
    path, sha256 = _fetch(settings.vae_url, destination.parent / ".downloads", settings.vae_sha256)
    variant = source.variant
    config = dict(AutoencoderKL.load_config(destination, subfolder="vae"))
    try:
        check_vae_file(path, config, setting="VAE_URL")
    except ModelLoadError as error:
        raise CacheError(str(error)) from None
    import torch

    vae = load_vae_file(path, config, torch.float16)
    shutil.rmtree(destination / "vae")
    vae.save_pretrained(destination / "vae", safe_serialization=True, variant=variant)
    path.unlink()
    log.info("baked the VAE %s (SHA-256 %s) in place of the model's", path.stem, sha256[:10])
    vae_label = {"name": path.stem, "sha256": sha256, "url": hidden_query(settings.vae_url)}
    return BakedSource(**{**source.__dict__, "vae": vae_label})


def _fetch(url: str, folder: Path, sha256: str | None) -> tuple[Path, str]:
    """Download ``url`` into ``folder`` (resuming an earlier try's part), with DOWNLOAD_TOKEN when set."""
    try:
        return download_to_folder(url, folder, sha256=sha256, token=os.environ.get("DOWNLOAD_TOKEN") or None)
    except DownloadError as error:
        raise CacheError(str(error)) from None


def _config_folder(settings: Settings, scratch: Path) -> Path:
    """MODEL_CONFIG when it is an SD 1.5 folder; else SD 1.5's configs and tokenizer, fetched into ``scratch``."""
    configured = Path(settings.model_config_folder)
    try:
        return check_config_folder(configured, "MODEL_CONFIG")
    except ModelLoadError as error:
        if settings.model_config_dir is not None:
            raise CacheError(str(error)) from None
    log.info("fetching SD 1.5's configs and tokenizer (%s, no weights) to convert with", DEFAULT_MODEL_ID)
    patterns = CONFIG_FILES + (SAFETY_FILES if settings.safety_checker else [])
    download_repo(DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, scratch, patterns)
    if settings.safety_checker:
        _drop_variant(scratch / "safety_checker")
    return scratch


def _drop_variant(folder: Path) -> None:
    """Rename ``model.fp16.safetensors`` to ``model.safetensors``: from_single_file loads components unvaried."""
    for path in folder.glob(f"*.{VARIANT}.safetensors"):
        path.rename(path.with_name(path.name.replace(f".{VARIANT}", "")))


def _describe(settings: Settings) -> str:
    if settings.model_url is not None:
        return hidden_query(settings.model_url)
    return f"{settings.model_id}@{settings.revision}" if settings.revision else settings.model_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.cache_model", description=__doc__.splitlines()[0])
    parser.add_argument("--verify-only", action="store_true", help="only check that MODEL_DIR loads offline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        settings = load_settings()
        if args.verify_only:
            baked = read_baked_source(Path(settings.model_dir))
            verify(Path(settings.model_dir), baked.variant if baked else None, settings.safety_checker)
            print(f"{settings.model_dir} loads offline")
        else:
            folder = bake(settings)
            print(f"{_describe(settings)} baked into {folder} and verified")
    except (SettingsError, CacheError) as error:
        print(f"cache_model: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
