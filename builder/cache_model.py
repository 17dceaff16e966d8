"""Bake the model into the image at build time, then prove it loads offline.

    python -m builder.cache_model                 # MODEL_ID at its revision into MODEL_DIR (/models/sd15)
    MODEL_URL=https://... python -m builder.cache_model   # a single-file checkpoint, converted into MODEL_DIR
    MODEL_ID=/path/model.safetensors python -m builder.cache_model   # the same, from a file
    CONTROLNET_DIR=/models/controlnets CONTROLNETS=lllyasviel/control_v11p_sd15_canny,https://... \
      python -m builder.cache_model               # and ControlNets into CONTROLNET_DIR
    UPSCALER_DIR=/models/upscalers UPSCALERS=https://.../RealESRGAN_x4plus.pth \
      python -m builder.cache_model               # and upscalers into UPSCALER_DIR (builder/bake_upscalers.py)
    python -m builder.cache_model --verify-only   # only check that MODEL_DIR loads offline
    python -m builder.cache_model --hub-cache DIR # hub repos through a download cache (the Dockerfile's)

It reads MODEL_ID, MODEL_REVISION, MODEL_URL, MODEL_SHA256, VAE_URL, VAE_SHA256,
MODEL_CONFIG, MODEL_DIR, SAFETY_CHECKER, CONTROLNETS, CONTROLNET_DIR, UPSCALERS and
UPSCALER_DIR through the worker's own settings, so the build and the runtime cannot
disagree on the model.

From the hub it downloads only the fp16 safetensors (no .ckpt, no .bin, no full
precision copy), and the safety checker only when SAFETY_CHECKER=true, into
MODEL_DIR itself rather than HF_HOME, which a network volume may later hide.

A single-file checkpoint (MODEL_URL, downloaded with resume and retries, each
URL sent only its own host's token: HF_TOKEN, CIVITAI_TOKEN, DOWNLOAD_TOKENS;
or a file at MODEL_ID) is checked and converted once, into a float16 diffusers
folder labelled with the file's SHA-256, so the worker
starts from the converted folder. Its configs and tokenizer come from
MODEL_CONFIG when that is an SD 1.5 folder, else from SD 1.5's repo on the hub
(config files only). VAE_URL bakes a VAE file in place of the model's.

CONTROLNETS are baked after the model, each into CONTROLNET_DIR in float16: a hub id
(``owner/name``) becomes the folder ``name/`` holding its config.json and its fp16
safetensors (its full-precision safetensors, converted, when it has none; a .bin is a
pickle and is never downloaded); a URL of a single ``.safetensors`` file is downloaded
like MODEL_URL and rewritten in float16 when it is not. One already there is kept. Then
each is checked as the worker checks it at startup, against MODEL_DIR's UNet, and one
the worker could not use (an SDXL ControlNet, a LoRA) stops the build, named.

UPSCALERS, URLs of ``.pth`` and ``.safetensors`` files, are baked last, unchanged, into
UPSCALER_DIR, and each is read as the worker reads it (builder/bake_upscalers.py).

Transient network failures are retried; everything else stops the build with
a message saying what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from builder.download import DownloadError, download_to_folder, file_name_from
from src.errors import AdapterError, ModelLoadError
from src.models.checkpoints import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    WITHOUT_SAFETY_CHECKER,
    check_checkpoint,
    check_config_folder,
    check_vae_file,
    convert_checkpoint,
    load_vae_file,
)
from src.models.checkpoints import sha256_file as file_sha256
from src.models.locate import BakedSource, read_baked_source, url_key
from src.models.safetensors_header import SafetensorsError, read_header
from src.settings import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, Settings, SettingsError, load_settings, redact_url

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

# A ControlNet repo's files: its config and its float16 weights; its full-precision safetensors only when it
# has no float16 ones, to convert. Never a .bin: pickles are never downloaded.
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONTROLNET_FP16_WEIGHTS = f"diffusion_pytorch_model.{VARIANT}.safetensors"
CONTROLNET_FILES = ["config.json", CONTROLNET_FP16_WEIGHTS]
CONTROLNET_FULL_FILES = ["config.json", CONTROLNET_WEIGHTS]
SAFETENSORS = ".safetensors"
# A hub repo id, owner/name; neither part starts with a dot, so the name is a plain folder name.
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


class CacheError(RuntimeError):
    """Baking failed; the message says what to do."""


def allow_patterns(safety_checker: bool) -> list[str]:
    """The repo files to download."""
    return FILES + (SAFETY_FILES if safety_checker else [])


def download(settings: Settings, destination: Path, hub_cache: Path | None = None) -> None:
    """Download MODEL_ID at its revision into ``destination``, retrying transient failures."""
    patterns = allow_patterns(settings.safety_checker)
    download_repo(settings.model_id, settings.revision, destination, patterns, hub_cache=hub_cache)


def download_repo(
    model_id: str,
    revision: str | None,
    destination: Path,
    patterns: list[str],
    setting: str = "MODEL_ID",
    *,
    hub_cache: Path | None = None,
) -> None:
    """Download the files of a hub repo matching ``patterns`` into ``destination``, retrying transient failures.

    ``setting`` is the variable that named the repo, for the messages. With ``hub_cache`` (the hub client's
    cache layout, a build cache in the Dockerfile) the files are downloaded there, or found there from an earlier
    build, and copied into ``destination``.

    Raises:
        CacheError: the repo, the revision or the access is wrong, or the network stayed down.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    for attempt in range(1, ATTEMPTS + 1):
        try:
            if hub_cache is None:
                snapshot_download(model_id, revision=revision, local_dir=destination, allow_patterns=patterns)
            else:
                snapshot = snapshot_download(model_id, revision=revision, cache_dir=hub_cache, allow_patterns=patterns)
                copy_snapshot(Path(snapshot), destination, patterns)
            return
        except GatedRepoError:
            raise CacheError(
                f"{model_id} is gated: accept its license on the hub and build with a token "
                "(docker build --secret id=hf_token,env=HF_TOKEN ...)"
            ) from None
        except RepositoryNotFoundError:
            raise CacheError(f"{model_id} does not exist on the hub (or is private): check {setting}") from None
        except RevisionNotFoundError:
            raise CacheError(f"{model_id} has no revision {revision!r}: check MODEL_REVISION") from None
        except Exception as error:  # network errors come in many types; all are retried the same way
            if attempt == ATTEMPTS:
                shown = f"{model_id}@{revision}" if revision else model_id
                raise CacheError(
                    f"downloading {shown} failed {ATTEMPTS} times ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); check the network and build again"
                ) from error
            wait = 2**attempt
            log.warning("download attempt %d failed (%s); retrying in %d s", attempt, type(error).__name__, wait)
            time.sleep(wait)


def copy_snapshot(snapshot: Path, destination: Path, patterns: list[str]) -> None:
    """Copy the files of a cached ``snapshot`` that match ``patterns`` into ``destination``, as files: the
    cache holds links to its blobs, and an earlier build may have cached more of the repo than these."""
    from huggingface_hub.utils import filter_repo_objects

    files = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    for name in filter_repo_objects(sorted(files), allow_patterns=patterns):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snapshot / name, target)


def verify(folder: Path, variant: str | None, safety_checker: bool = False) -> None:
    """Load ``folder`` the way the worker will, offline, on the CPU.

    Raises:
        CacheError: the folder does not load; the message names what is missing.
    """
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise CacheError(f"{folder} does not load: it holds no model_index.json. Run `python -m builder.cache_model`")
    options: dict[str, object] = {} if safety_checker else dict(WITHOUT_SAFETY_CHECKER)
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


def bake(settings: Settings, hub_cache: Path | None = None) -> Path:
    """Download (or convert), verify and label MODEL_DIR. Returns the folder. Hub files go through ``hub_cache``
    when it is given (``download_repo``).

    The new folder is built beside MODEL_DIR and takes its place only once verified and labelled
    (``_put_in_place``): a bake that fails leaves MODEL_DIR as it was, its label over its own files.

    Raises:
        CacheError: a download, a check or the verification failed; MODEL_SHA256 was given for a hub repo.
    """
    from src.models.checkpoints import is_file_path

    _refuse_pickle_url("MODEL_URL", settings.model_url)
    _refuse_pickle_url("VAE_URL", settings.vae_url)
    if settings.model_url is not None or is_file_path(settings.model_id):
        return bake_checkpoint(settings, hub_cache)
    if settings.model_sha256 is not None:
        raise CacheError(
            f"MODEL_SHA256={settings.model_sha256}: it checks a single-file checkpoint (MODEL_URL's download, or "
            f"the file at MODEL_ID), and MODEL_ID={settings.model_id!r} is a hub repo, which it cannot check; "
            "unset MODEL_SHA256, or set MODEL_URL to the checkpoint's URL"
        )
    destination = Path(settings.model_dir)
    baked = read_baked_source(destination)
    if baked is not None and baked.matches(settings.model_id, settings.revision, settings.safety_checker):
        if _holds_vae(baked, settings):
            log.info("%s already holds %s; verifying", destination, _describe(settings))
            verify(destination, baked.variant, settings.safety_checker)
            return destination
        log.info("%s holds another VAE than asked for (VAE_URL's, else the repo's own); baking again", destination)
    staging = _staging(destination, f"{settings.model_id}@{settings.revision}")
    shutil.rmtree(staging / "vae", ignore_errors=True)  # a VAE an earlier, failed bake put there
    download(settings, staging, hub_cache)
    source = BakedSource(settings.model_id, settings.revision, VARIANT, settings.safety_checker)
    return _finish(settings, staging, source, destination)


def bake_checkpoint(settings: Settings, hub_cache: Path | None = None) -> Path:
    """Convert the single-file checkpoint (MODEL_URL, else the file at MODEL_ID) into MODEL_DIR, labelled.

    A download is deleted once converted or refused.

    Raises:
        CacheError: the download, the check or the conversion failed; the message says why.
    """
    destination = Path(settings.model_dir)
    url = settings.model_url
    baked = read_baked_source(destination)
    if baked is not None and _holds_checkpoint(baked, settings):
        log.info("%s already holds %s; verifying", destination, _describe(settings))
        verify(destination, baked.variant, settings.safety_checker)
        return destination
    staging = _staging(destination, "")
    try:
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as scratch:
            config = _config_folder(settings, Path(scratch) / "config", hub_cache)
            path, sha256 = _checkpoint_file(settings)
            try:
                path = _safetensors_download(path, "MODEL_URL", redact_url(url)) if url is not None else path
                _convert(settings, path, sha256, config, staging)
            finally:
                if url is not None:
                    path.unlink(missing_ok=True)
        source = BakedSource(
            model_id=settings.model_id if url is None else redact_url(url),
            revision=None,
            variant=None,
            safety_checker=settings.safety_checker,
            checkpoint={"name": path.stem, "sha256": sha256, "file": path.name},
            url=redact_url(url) if url is not None else None,
            url_key=url_key(url) if url is not None else None,
        )
        return _finish(settings, staging, source, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what a refused bake built; gone once put in place


def _checkpoint_file(settings: Settings) -> tuple[Path, str]:
    """MODEL_URL, downloaded into the build's folder of downloads beside MODEL_DIR, else the file at MODEL_ID;
    with its SHA-256, checked against MODEL_SHA256 when given.

    Raises:
        CacheError: the download failed, or the file's SHA-256 is not MODEL_SHA256.
    """
    if settings.model_url is not None:
        folder = Path(settings.model_dir).parent / ".downloads"
        return _fetch(settings, settings.model_url, folder, settings.model_sha256, "MODEL_URL")
    path = Path(settings.model_id).expanduser()
    sha256 = file_sha256(path) if path.is_file() else ""
    if settings.model_sha256 is not None and sha256 != settings.model_sha256:
        expected = settings.model_sha256
        raise CacheError(f"MODEL_ID={str(path)!r}: its SHA-256 is {sha256}, MODEL_SHA256 says {expected}")
    return path, sha256


def _convert(settings: Settings, path: Path, sha256: str, config: Path, folder: Path) -> None:
    """Check the checkpoint at ``path`` and save it, converted, into ``folder``.

    Raises:
        CacheError: it is not an SD 1.5 checkpoint shaped as ``config``'s; the message names MODEL_URL (its URL
            shown without its query) or MODEL_ID.
    """
    setting = "MODEL_URL" if settings.model_url is not None else "MODEL_ID"
    shown = redact_url(settings.model_url) if settings.model_url is not None else str(path)
    try:
        check_checkpoint(path, config, setting)
        log.info("converting %s (SHA-256 %s) with the configs in %s", path.name, sha256[:10], config)
        pipeline = convert_checkpoint(path, config, safety_checker=settings.safety_checker)
    except ModelLoadError as error:
        raise _named(error, setting, path, shown) from None
    pipeline.save_pretrained(folder, safe_serialization=True)


def _holds_checkpoint(baked: BakedSource, settings: Settings) -> bool:
    """Whether MODEL_DIR's label is of the checkpoint the settings name: the same whole URL (its query
    included) or file, the same SHA-256 when MODEL_SHA256 is given, the same VAE."""
    if baked.checkpoint is None or (settings.safety_checker and not baked.safety_checker):
        return False
    if settings.model_sha256 is not None and baked.checkpoint.get("sha256") != settings.model_sha256:
        return False
    if not _holds_vae(baked, settings):
        return False
    return baked.holds_url(settings.model_url) if settings.model_url else baked.holds(settings.model_id, None)


def _holds_vae(baked: BakedSource, settings: Settings) -> bool:
    """Whether MODEL_DIR's VAE is the one the settings ask for: VAE_URL's (and VAE_SHA256's), else the model's own."""
    if settings.vae_url is None:
        return baked.vae is None
    expected = settings.vae_sha256
    return baked.holds_vae_url(settings.vae_url) and expected in (None, (baked.vae or {}).get("sha256"))


def bake_vae(settings: Settings, folder: Path, source: BakedSource) -> BakedSource:
    """Download VAE_URL, check it against the VAE of the model in ``folder`` and save it in its place; the new
    label. The download is deleted, used or refused.

    Raises:
        CacheError: the download failed, or the file is not a VAE of the model's shapes.
    """
    from diffusers import AutoencoderKL

    assert settings.vae_url is not None
    shown = redact_url(settings.vae_url)
    config = dict(AutoencoderKL.load_config(folder, subfolder="vae"))
    path, sha256 = _fetch(settings, settings.vae_url, folder.parent / ".downloads", settings.vae_sha256, "VAE_URL")
    try:
        path = _safetensors_download(path, "VAE_URL", shown)
        try:
            check_vae_file(path, config, setting="VAE_URL")
        except ModelLoadError as error:
            raise _named(error, "VAE_URL", path, shown) from None
        import torch

        vae = load_vae_file(path, config, torch.float16)
    finally:
        path.unlink(missing_ok=True)
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae", safe_serialization=True, variant=source.variant)
    log.info("baked the VAE %s (SHA-256 %s) in place of the model's", path.stem, sha256[:10])
    vae_label = {"name": path.stem, "sha256": sha256, "url": shown, "url_key": url_key(settings.vae_url)}
    return BakedSource(**{**source.__dict__, "vae": vae_label})


def _finish(settings: Settings, staging: Path, source: BakedSource, destination: Path) -> Path:
    """Bake VAE_URL into the ``staging`` folder, verify it, label it, and put it in ``destination``'s place."""
    if settings.vae_url is not None:
        source = bake_vae(settings, staging, source)
    verify(staging, source.variant, settings.safety_checker)
    source.write(staging)
    _put_in_place(staging, destination)
    return destination


def _staging(destination: Path, resumable: str) -> Path:
    """The hidden folder beside ``destination`` that a new bake is built in.

    A hub download (``resumable``: its model and revision) takes over what an earlier, failed bake of the same
    left there, whose files the hub client checks; anything else starts from an empty folder.
    """
    key = hashlib.sha256(resumable.encode()).hexdigest()[:12] if resumable else "new"
    staging = destination.with_name(f".{destination.name}.bake-{key}")
    for stale in destination.parent.glob(f".{destination.name}.bake-*"):
        if stale != staging or not resumable:
            shutil.rmtree(stale)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _put_in_place(staging: Path, destination: Path) -> None:
    """Rename the whole, labelled ``staging`` to ``destination``, the folder there moved aside first and then
    deleted: at no moment does a label stand over another model's files."""
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # the hub client's download records
    old = destination.with_name(f".{destination.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        destination.rename(old)
    staging.rename(destination)
    shutil.rmtree(old, ignore_errors=True)


def _refuse_pickle_url(setting: str, url: str | None) -> None:
    """Refuse a URL that names a pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) before any request.

    Raises:
        CacheError: it does; the message says how to get a safetensors file.
    """
    name = url_file_name(url) if url is not None else ""
    if url is not None and Path(name).suffix.lower() in PICKLE_SUFFIXES:
        raise CacheError(
            f"{setting}={redact_url(url)!r} names {name!r}, a pickle, which can run code when loaded: it is never "
            "downloaded or opened. Give the URL of the model's .safetensors release, or convert the file once on a "
            "machine that trusts it (README: Your own checkpoint)"
        )


def _safetensors_download(path: Path, setting: str, shown: str) -> Path:
    """The downloaded ``path``, named ``<name>.safetensors`` when its name has no weights extension and it is a
    safetensors file (a URL such as ``/api/download/models/128713`` names none): a file is judged by its
    content, never by its name.

    Raises:
        CacheError: the server sent an HTML page, or a file with another extension that is not safetensors.
    """
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return path  # refused unopened by the checks
    try:
        read_header(path)
    except SafetensorsError as error:
        if _is_html(path):
            raise CacheError(
                f"{setting}={shown!r}: the server sent an HTML page ({path.name!r}), not the file: a login or error "
                "page? Check that the URL downloads the file, and that the build has its host's token"
            ) from None
        if suffix in SAFETENSORS_SUFFIXES:
            return path  # the checks say what is wrong with it
        problem = str(error).removeprefix(f"{path}: ")
        raise CacheError(
            f"{setting}={shown!r}: the file it sent, {path.name!r}, is not safetensors: {problem}"
        ) from None
    if suffix in SAFETENSORS_SUFFIXES:
        return path
    named = path.with_name(f"{path.name}{SAFETENSORS}")
    path.replace(named)
    log.info("%s: %r has no .safetensors extension, yet is a safetensors file; named %r", shown, path.name, named.name)
    return named


def _is_html(path: Path) -> bool:
    """Whether the file starts as an HTML page does (after white space and a byte order mark): ``<``."""
    with path.open("rb") as file:
        return file.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _named(error: ModelLoadError, setting: str, path: Path, shown: str) -> CacheError:
    """``error``, a check's refusal of the download ``path``, naming the URL ``shown`` instead of the path."""
    where = f"{setting}={str(path)!r}"
    return CacheError(str(error).replace(where, f"{setting}={shown!r} (the file {path.name!r})"))


def _fetch(
    settings: Settings, url: str, folder: Path, sha256: str | None, setting: str | None = None
) -> tuple[Path, str]:
    """Download ``url`` into ``folder`` (resuming an earlier try's part of it), sending the token the settings
    give for its host, if any, and no other. ``setting``, the variable that gave the URL, names it in messages.

    Raises:
        CacheError: the download failed; the message shows the URL without its query.
    """
    try:
        return download_to_folder(url, folder, sha256=sha256, tokens=settings.host_tokens)
    except DownloadError as error:
        if setting is None:
            raise CacheError(str(error)) from None
        shown, message = redact_url(url), str(error)
        if message.startswith(shown):
            raise CacheError(f"{setting}={shown!r}{message.removeprefix(shown)}") from None
        raise CacheError(f"{setting}={shown!r}: {message}") from None


def _config_folder(settings: Settings, scratch: Path, hub_cache: Path | None) -> Path:
    """MODEL_CONFIG when it is an SD 1.5 folder; else SD 1.5's configs and tokenizer, fetched into ``scratch``."""
    configured = Path(settings.model_config_folder)
    try:
        return check_config_folder(configured, "MODEL_CONFIG")
    except ModelLoadError as error:
        if settings.model_config_dir is not None:
            raise CacheError(str(error)) from None
    log.info("fetching SD 1.5's configs and tokenizer (%s, no weights) to convert with", DEFAULT_MODEL_ID)
    patterns = CONFIG_FILES + (SAFETY_FILES if settings.safety_checker else [])
    download_repo(DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, scratch, patterns, hub_cache=hub_cache)
    if settings.safety_checker:
        _drop_variant(scratch / "safety_checker")
    return scratch


def _drop_variant(folder: Path) -> None:
    """Rename ``model.fp16.safetensors`` to ``model.safetensors``: from_single_file loads components unvaried."""
    for path in folder.glob(f"*.{VARIANT}.safetensors"):
        path.rename(path.with_name(path.name.replace(f".{VARIANT}", "")))


# --- ControlNets: CONTROLNETS into CONTROLNET_DIR, in float16 -------------------------------------


@dataclass(frozen=True)
class ControlNetSource:
    """One item of CONTROLNETS: a hub repo (``owner/name``) or the URL of a single ``.safetensors`` file."""

    item: str
    is_url: bool

    @property
    def shown(self) -> str:
        """The item as messages and logs show it: a URL without its credentials and query."""
        return redact_url(self.item) if self.is_url else self.item

    @property
    def file_name(self) -> str:
        """The file name a URL gives (``url_file_name``); "" for a hub id."""
        return url_file_name(self.item) if self.is_url else ""

    @property
    def name(self) -> str | None:
        """The name the worker will list it by, when known before downloading: the repo's name, or the URL's
        file name without ``.safetensors``; None for a URL that names no .safetensors file."""
        if not self.is_url:
            return self.item.split("/")[1]
        return self.file_name[: -len(SAFETENSORS)] if self.file_name.lower().endswith(SAFETENSORS) else None


def url_file_name(url: str) -> str:
    """The file name ``url`` gives, as the download takes it (Content-Disposition may name it otherwise); ""
    for a URL whose path ends in ``/``."""
    return file_name_from(url, None) if urlsplit(url).path.rsplit("/", 1)[-1] else ""


def controlnet_sources(items: list[str]) -> list[ControlNetSource]:
    """CONTROLNETS' items, told apart and checked before anything is downloaded.

    Raises:
        CacheError: an item is neither a hub id nor an http(s) URL, a URL names a file that is not
            ``.safetensors``, or two items would get the same name in CONTROLNET_DIR.
    """
    sources: list[ControlNetSource] = []
    for item in items:
        source = ControlNetSource(item, item.lower().startswith(("http://", "https://")))
        if not source.is_url and not _HUB_ID.fullmatch(item):
            raise CacheError(
                f"CONTROLNETS: {redact_url(item)!r} is neither a hub id (owner/name) nor an http(s):// URL"
            )
        suffix = Path(source.file_name).suffix.lower()
        if source.is_url and suffix and suffix != SAFETENSORS:
            kind = "a pickle, which is never downloaded or opened" if suffix in PICKLE_SUFFIXES else "not safetensors"
            raise CacheError(
                f"CONTROLNETS: {source.shown} names {source.file_name!r} ({kind}); give the URL of a .safetensors file"
            )
        sources.append(source)
    refuse_same_names("CONTROLNETS", "ControlNet", sources)
    return sources


class NamedSource(Protocol):
    """An item of CONTROLNETS or UPSCALERS: how it is shown, and the name the worker will list it by (None
    while only its download can tell)."""

    @property
    def shown(self) -> str: ...

    @property
    def name(self) -> str | None: ...


def refuse_same_names(setting: str, kind: str, sources: Sequence[NamedSource]) -> None:
    """Refuse two of ``sources``, the items of ``setting``, that would both be the ``kind`` of one name.

    Raises:
        CacheError: the first two of one name, named.
    """
    named: dict[str, NamedSource] = {}
    for source in sources:
        if source.name is not None and source.name in named:
            raise CacheError(same_name(setting, kind, named[source.name], source, source.name))
        if source.name is not None:
            named[source.name] = source


def same_name(setting: str, kind: str, first: NamedSource, second: NamedSource, name: str) -> str:
    """The message refusing ``first`` and ``second``, items of ``setting``, that would both be the ``kind`` ``name``."""
    return f"{setting}: {first.shown} and {second.shown} would both be the {kind} {name!r}; keep one"


def bake_controlnets(settings: Settings, hub_cache: Path | None = None) -> list[str]:
    """Bake CONTROLNETS into CONTROLNET_DIR in float16 and check them as the worker will; their names, in order.

    Raises:
        CacheError: an item is malformed, its download or conversion failed, or the worker could not use it.
    """
    sources = controlnet_sources(settings.controlnets_to_bake_list)
    if not sources:
        return []
    assert settings.controlnet_dir is not None  # the settings refuse CONTROLNETS without CONTROLNET_DIR
    folder = Path(settings.controlnet_dir)
    folder.mkdir(parents=True, exist_ok=True)
    baked: dict[str, ControlNetSource] = {}
    for source in sources:
        if source.is_url:
            name = bake_url_controlnet(source, folder, settings)
        else:
            name = bake_hub_controlnet(source.item, folder, hub_cache)
        if name in baked:
            raise CacheError(same_name("CONTROLNETS", "ControlNet", baked[name], source, name))
        baked[name] = source
    verify_controlnets(settings, baked)
    return list(baked)


def bake_hub_controlnet(repo_id: str, folder: Path, hub_cache: Path | None = None) -> str:
    """Download the diffusers ControlNet ``repo_id`` into ``folder/<its name>``, in float16; the name.

    The download goes to a hidden folder beside it, which the worker does not list, and takes
    its place once whole.

    Raises:
        CacheError: the download failed, or the repo holds no config.json or no safetensors weights.
    """
    name = repo_id.split("/")[1]
    target = folder / name
    if _holds_float16_folder(target):
        log.info("%s already holds the ControlNet %s; keeping it", target, name)
        return name
    staging = folder / f".{name}.download"
    download_repo(repo_id, None, staging, CONTROLNET_FILES, setting="CONTROLNETS", hub_cache=hub_cache)
    if not any((staging / weights).is_file() for weights in (CONTROLNET_FP16_WEIGHTS, CONTROLNET_WEIGHTS)):
        log.info("%s has no float16 safetensors; downloading its full-precision ones to convert", repo_id)
        download_repo(repo_id, None, staging, CONTROLNET_FULL_FILES, setting="CONTROLNETS", hub_cache=hub_cache)
    finish_hub_controlnet(staging, repo_id)
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # the hub client's download records
    if target.is_dir():
        log.info("replacing %s, which held no float16 ControlNet", target)
        shutil.rmtree(target)
    staging.rename(target)
    log.info("baked the ControlNet %s from %s into %s", name, repo_id, target)
    return name


def finish_hub_controlnet(folder: Path, repo_id: str) -> None:
    """Leave the downloaded ``folder`` as config.json and a float16 ``diffusion_pytorch_model.safetensors``.

    The fp16 variant takes the plain name; full-precision weights are converted in place.

    Raises:
        CacheError: the repo gave no config.json or no safetensors weights.
    """
    weights = folder / CONTROLNET_WEIGHTS
    if (folder / CONTROLNET_FP16_WEIGHTS).is_file():
        (folder / CONTROLNET_FP16_WEIGHTS).replace(weights)
    missing = [name for name in ("config.json", CONTROLNET_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise CacheError(
            f"CONTROLNETS: {repo_id} has no {' and no '.join(missing)} (nor {CONTROLNET_FP16_WEIGHTS}): it is not a "
            "diffusers ControlNet repo with safetensors weights (a .bin is a pickle, never downloaded); use one "
            "that is, or the URL of a single .safetensors file"
        )
    write_float16(weights, weights, repo_id)


def bake_url_controlnet(source: ControlNetSource, folder: Path, settings: Settings) -> str:
    """Download the single-file ControlNet at ``source`` into ``folder``, in float16; its name.

    The download goes through MODEL_URL's folder of downloads, beside ``folder``, with resume and
    retries; the file is written into ``folder`` only once it is a whole float16 safetensors file.

    Raises:
        CacheError: the download failed, or it is not a safetensors file (which is then deleted unopened).
    """
    if source.name is not None and _holds_float16_file(folder / source.file_name):
        log.info("%s already holds the ControlNet %s; keeping it", folder, source.file_name)
        return source.name
    path, sha256 = _fetch(settings, source.item, folder.parent / ".downloads", None)
    try:
        if not path.name.lower().endswith(SAFETENSORS):
            raise CacheError(
                f"CONTROLNETS: {source.shown} sent the file {path.name!r}, not a .safetensors file; it was deleted "
                "unopened. Give the URL of a .safetensors file"
            )
        write_float16(path, folder / path.name, source.shown)
    finally:
        path.unlink(missing_ok=True)
    name = path.name[: -len(SAFETENSORS)]
    log.info("baked the ControlNet %s from %s (SHA-256 %s) into %s", name, source.shown, sha256[:10], folder)
    return name


def write_float16(source: Path, target: Path, shown: str) -> None:
    """Write the safetensors file ``source`` to ``target`` with every floating tensor in float16, through a
    hidden temporary name, so that ``target`` is never half written; ``source`` may be ``target``.

    Raises:
        CacheError: ``source`` is not a whole safetensors file.
    """
    try:
        header, _start = read_header(source)
    except SafetensorsError as error:
        raise CacheError(f"CONTROLNETS: {shown}: {str(error).removeprefix(f'{source}: ')}") from None
    temporary = target.with_name(f".{target.name}.tmp")
    if _float_dtypes(header) <= {"F16"}:
        if source == target:
            return
        shutil.copyfile(source, temporary)
    else:
        log.info("%s: storing its %s tensors in float16", shown, "/".join(sorted(_float_dtypes(header) - {"F16"})))
        _save_float16(source, temporary)
    os.replace(temporary, target)


def _save_float16(source: Path, destination: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: _as_float16(handle.get_tensor(key)) for key in handle.keys()}  # noqa: SIM118 - not a dict
    save_file(tensors, str(destination), metadata=metadata)


def _as_float16(tensor: Any) -> Any:
    import torch

    return tensor.to(torch.float16) if tensor.is_floating_point() else tensor


def _float_dtypes(header: dict[str, Any]) -> set[str]:
    """The floating dtypes of a safetensors header's tensors (F16, BF16, F32, F64, F8_*)."""
    dtypes = {str(entry.get("dtype")) for key, entry in header.items() if key != "__metadata__"}
    return {dtype for dtype in dtypes if dtype.startswith(("F", "BF"))}


def _holds_float16_file(path: Path) -> bool:
    try:
        return path.is_file() and _float_dtypes(read_header(path)[0]) <= {"F16"}
    except SafetensorsError:
        return False


def _holds_float16_folder(folder: Path) -> bool:
    weights = [folder / name for name in (CONTROLNET_WEIGHTS, CONTROLNET_FP16_WEIGHTS) if (folder / name).is_file()]
    return (folder / "config.json").is_file() and bool(weights) and all(map(_holds_float16_file, weights))


@dataclass(frozen=True)
class _UNetOnly:
    """What ``ControlNets`` reads of a pipeline to check the shapes of ControlNets: its UNet."""

    unet: Any


def verify_controlnets(settings: Settings, baked: dict[str, ControlNetSource]) -> None:
    """Check the baked ControlNets as the worker does at startup: listed by ``scan_controlnets``, then shaped
    for MODEL_DIR's UNet by ``ControlNets``, from headers and configs alone.

    Raises:
        CacheError: a ControlNet is not listed or cannot be used; the message names each and says why.
    """
    import torch

    from src.adapters.controlnets import ControlNets, scan_controlnets

    try:
        listed = scan_controlnets(settings.controlnet_dir)
    except AdapterError as error:
        raise CacheError(str(error)) from None
    missing = [f"{source.shown} ({name})" for name, source in baked.items() if name not in listed]
    if missing:
        raise CacheError(f"CONTROLNETS: {', '.join(missing)}: baked, yet not listed in {settings.controlnet_dir}")
    pipeline = _UNetOnly(_unet_without_weights(settings))
    entries = {name: listed[name] for name in baked}
    checked = ControlNets(pipeline, entries, device=torch.device("cpu"), dtype=torch.float16, cache_bytes=0)
    problems = [
        f"{baked[name].shown} ({entry.path.name}) cannot be used: {entry.problem}"
        for name, entry in checked.entries.items()
        if entry.problem
    ]
    if problems:
        raise CacheError(
            f"CONTROLNETS: {'; '.join(problems)}. Bake SD 1.5 ControlNets only, such as control_v11p_sd15_*"
        )


def _unet_without_weights(settings: Settings) -> Any:
    """MODEL_DIR's UNet (else MODEL_CONFIG's), built from its config alone, its weights on no device.

    Raises:
        CacheError: neither folder holds unet/config.json.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    for model in dict.fromkeys((settings.model_dir, settings.model_config_folder)):
        unet = Path(model) / "unet"
        if (unet / "config.json").is_file():
            with init_empty_weights():
                return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet))
    raise CacheError(
        f"MODEL_DIR={settings.model_dir} holds no unet/config.json to check the ControlNets against; "
        "bake the model first"
    )


def _describe(settings: Settings) -> str:
    if settings.model_url is not None:
        return redact_url(settings.model_url)
    return f"{settings.model_id}@{settings.revision}" if settings.revision else settings.model_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.cache_model", description=__doc__.splitlines()[0])
    parser.add_argument("--verify-only", action="store_true", help="only check that MODEL_DIR loads offline")
    parser.add_argument(
        "--hub-cache",
        type=Path,
        metavar="DIR",
        help="download hub repos into this cache (the hub client's layout) and copy them out, so that a later "
        "bake finds them there instead of downloading them again; the Dockerfile gives its build cache",
    )
    args = parser.parse_args(argv)
    # Here, not at the top: builder.bake_upscalers imports this module (its CacheError, _fetch and checks).
    from builder.bake_upscalers import bake_upscalers

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
            folder = bake(settings, args.hub_cache)
            print(f"{_describe(settings)} baked into {folder} and verified")
            controlnets = bake_controlnets(settings, args.hub_cache)
            if controlnets:
                print(f"ControlNets {', '.join(controlnets)} baked into {settings.controlnet_dir} and verified")
            upscalers = bake_upscalers(settings)
            if upscalers:
                print(f"Upscalers {', '.join(upscalers)} baked into {settings.upscaler_dir} and verified")
    except (SettingsError, CacheError) as error:
        print(f"cache_model: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
