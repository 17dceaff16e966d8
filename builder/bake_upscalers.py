"""Bake UPSCALERS into UPSCALER_DIR at build time, then read each as the worker will.

    UPSCALER_DIR=/models/upscalers \\
    UPSCALERS=https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth \\
      python -m builder.cache_model

``builder/cache_model.py`` calls ``bake_upscalers`` after the model and its ControlNets. Each item of
UPSCALERS is the http(s) URL of one ``.pth`` or ``.safetensors`` file. Before anything is downloaded, an item
that is no such URL, a URL naming a file of another kind (a ``.pt``, ``.ckpt`` or ``.bin``, which the worker
never reads) and two items of one name are refused. Each file is downloaded as MODEL_URL is (resumed, retried,
sent its own host's token only) and stored unchanged in UPSCALER_DIR under the name the download gives
(Content-Disposition's, else the URL's); one already there is kept. Then each is listed and read as the worker
does it (``scan_upscalers``, ``read_upscaler``: a ``.pth`` with torch's weights-only loader, which never builds
an object; spandrel recognises the architecture): one the worker could not use (not recognised, not a
super-resolution model, a pickle that builds objects) is deleted and stops the build, named.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.cache_model import CacheError, _fetch, refuse_same_names, same_name, url_file_name
from src.adapters.upscalers import REFUSED_SUFFIXES, SUFFIXES, read_upscaler, scan_upscalers
from src.errors import AdapterError
from src.settings import Settings, redact_url

log = logging.getLogger("cache_model")

WANTED = "give the URL of a .pth or .safetensors file"


@dataclass(frozen=True)
class UpscalerSource:
    """One item of UPSCALERS: the http(s) URL of a ``.pth`` or ``.safetensors`` file."""

    url: str

    @property
    def shown(self) -> str:
        """The URL as messages and logs show it: without its credentials and query."""
        return redact_url(self.url)

    @property
    def file_name(self) -> str:
        """The file name the URL gives (Content-Disposition may name the download otherwise); "" for none."""
        return url_file_name(self.url)

    @property
    def name(self) -> str | None:
        """The name the worker will list it by, when known before downloading: the URL's file name without
        its suffix; None for a URL that names no .pth or .safetensors file."""
        path = Path(self.file_name)
        return path.stem if path.suffix.lower() in SUFFIXES else None


def upscaler_sources(items: list[str]) -> list[UpscalerSource]:
    """UPSCALERS' items, checked before anything is downloaded.

    Raises:
        CacheError: an item is not an http(s) URL, a URL names a file that is neither ``.pth`` nor
            ``.safetensors``, or two items would get the same name in UPSCALER_DIR.
    """
    sources: list[UpscalerSource] = []
    for item in items:
        source = UpscalerSource(item)
        if not item.lower().startswith(("http://", "https://")):
            raise CacheError(f"UPSCALERS: {source.shown!r} is not an http(s):// URL; {WANTED}")
        suffix = Path(source.file_name).suffix.lower()
        if suffix and suffix not in SUFFIXES:
            raise CacheError(f"UPSCALERS: {source.shown} names {source.file_name!r} ({_unread(suffix)}); {WANTED}")
        sources.append(source)
    refuse_same_names("UPSCALERS", "upscaler", sources)
    return sources


def bake_upscalers(settings: Settings) -> list[str]:
    """Bake UPSCALERS into UPSCALER_DIR and read each as the worker will; their names, in order.

    Raises:
        CacheError: an item is malformed, its download failed, or the worker could not use it (it is then
            deleted); the message names the item and says why.
    """
    sources = upscaler_sources(settings.upscalers_to_bake_list)
    if not sources:
        return []
    assert settings.upscaler_dir is not None  # the settings refuse UPSCALERS without UPSCALER_DIR
    folder = Path(settings.upscaler_dir)
    folder.mkdir(parents=True, exist_ok=True)
    baked: dict[str, UpscalerSource] = {}
    for source in sources:
        baked[bake_upscaler(source, folder, settings, baked)] = source
    verify_upscalers(settings.upscaler_dir, baked)
    return list(baked)


def bake_upscaler(source: UpscalerSource, folder: Path, settings: Settings, baked: dict[str, UpscalerSource]) -> str:
    """Download the upscaler at ``source`` into ``folder``, unchanged, unless it is already there; its name.

    The download goes through MODEL_URL's folder of downloads, beside ``folder``, with resume and retries; it
    is copied into ``folder`` under a hidden name, then renamed, so that no file there is ever half written.

    Raises:
        CacheError: the download failed, it is neither a .pth nor a .safetensors file, or it has the name of
            one of ``baked``, the items baked before it; it is then deleted unopened.
    """
    if source.name is not None and (folder / source.file_name).is_file():
        log.info("%s already holds the upscaler %s; keeping it", folder, source.file_name)
        return source.name
    path, sha256 = _fetch(settings, source.url, folder.parent / ".downloads", None)
    try:
        if path.suffix.lower() not in SUFFIXES:
            raise CacheError(
                f"UPSCALERS: {source.shown} sent the file {path.name!r} ({_unread(path.suffix.lower())}); it was "
                "deleted unopened. Give the URL of a .pth or .safetensors file"
            )
        if path.stem in baked:
            raise CacheError(same_name("UPSCALERS", "upscaler", baked[path.stem], source, path.stem))
        temporary = folder / f".{path.name}.tmp"
        shutil.copyfile(path, temporary)  # a copy: the downloads may be another file system (a build cache)
        os.replace(temporary, folder / path.name)
    finally:
        path.unlink(missing_ok=True)
    log.info("baked the upscaler %s from %s (SHA-256 %s) into %s", path.name, source.shown, sha256[:10], folder)
    return path.stem


def verify_upscalers(folder: str, baked: dict[str, UpscalerSource]) -> None:
    """List ``folder`` with ``scan_upscalers`` and read each baked upscaler with ``read_upscaler``, as the
    worker does; delete each that the worker could not use.

    Raises:
        CacheError: an upscaler is not listed or cannot be used; the message names each and says why.
    """
    try:
        listed = scan_upscalers(folder)
    except AdapterError as error:
        raise CacheError(str(error)) from None
    problems: list[str] = []
    for name, source in baked.items():
        entry = listed.get(name)
        if entry is None or entry.problem is not None:
            problems.append(f"{source.shown} ({name}) is baked, yet not served from {folder}")
            continue
        try:
            model = read_upscaler(entry.path)
        except AdapterError as error:
            entry.path.unlink()
            problems.append(f"{source.shown} cannot be used: {error}")
            continue
        log.info("the upscaler %s reads as %s, %dx", name, model.architecture.name, model.scale)
    if problems:
        raise CacheError(
            f"UPSCALERS: {'; '.join(problems)}. What cannot be used was deleted: bake image super-resolution models "
            "that spandrel recognises (ESRGAN, Real-ESRGAN, SwinIR, ...), such as RealESRGAN_x4plus.pth"
        )


def _unread(suffix: str) -> str:
    """Why a file of ``suffix`` is not baked."""
    if suffix in REFUSED_SUFFIXES:
        return f"a {suffix} file, which the worker never reads: it reads .pth files, as tensors only, and .safetensors"
    return "neither .pth nor .safetensors"
