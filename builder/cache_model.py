"""Bake SD 1.5 into the image at build time, then prove it loads offline.

    python -m builder.cache_model                 # MODEL_ID at its revision into MODEL_DIR (/models/sd15)
    python -m builder.cache_model --verify-only   # only check that MODEL_DIR loads offline

It reads MODEL_ID, MODEL_REVISION, MODEL_DIR and SAFETY_CHECKER through the
worker's own settings, so the build and the runtime cannot disagree on the
model. It downloads only the fp16 safetensors (no .ckpt, no .bin, no full
precision copy), and the safety checker only when SAFETY_CHECKER=true, into
MODEL_DIR itself rather than HF_HOME, which a network volume may later hide.
Transient network failures are retried; everything else stops the build with
a message saying what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from src.loader import BAKED_SOURCE_FILE, BakedSource, read_baked_source
from src.settings import Settings, SettingsError, load_settings

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
    """Download MODEL_ID at its revision into ``destination``, retrying transient failures.

    Raises:
        CacheError: the repo, the revision or the access is wrong, or the network stayed down.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    model_id, revision = settings.model_id, settings.revision
    for attempt in range(1, ATTEMPTS + 1):
        try:
            snapshot_download(
                model_id,
                revision=revision,
                local_dir=destination,
                allow_patterns=allow_patterns(settings.safety_checker),
            )
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
    """Download, verify and label MODEL_DIR. Returns the folder."""
    destination = Path(settings.model_dir)
    baked = read_baked_source(destination)
    if baked is not None and baked.matches(settings.model_id, settings.revision, settings.safety_checker):
        log.info("%s already holds %s@%s; verifying", destination, settings.model_id, settings.revision)
    else:
        destination.mkdir(parents=True, exist_ok=True)
        download(settings, destination)
    verify(destination, VARIANT, settings.safety_checker)
    source = BakedSource(settings.model_id, settings.revision, VARIANT, settings.safety_checker)
    (destination / BAKED_SOURCE_FILE).write_text(json.dumps(asdict(source), indent=2), encoding="utf-8")
    return destination


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
            print(f"{settings.model_id}@{settings.revision} baked into {folder} and verified")
    except (SettingsError, CacheError) as error:
        print(f"cache_model: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
