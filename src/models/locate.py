"""Where the model is: which weights the settings name, found and checked before torch is imported.

``locate_model`` answers from files, file headers and, for a hub id that is not in the local cache, one quick
look-up on the hub. The worker calls it before it imports torch and diffusers (seconds of a start), so a model
that cannot be found or served stops the start in about a second, with a message that says what to do; the
loader (``src.models.loader``) calls it again and loads what it found. The checks that need the model's
classes (a checkpoint's shapes, a VAE's, the safety checker a pipeline holds) stay in the loader.

Importing this module does not import torch.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from huggingface_hub import constants as hub_constants
from huggingface_hub import model_info, try_to_load_from_cache

from src.errors import ModelLoadError
from src.models.checkpoints import ModelFile, check_checkpoint_kind, is_file_path, read_shapes
from src.settings import Settings, redact_url

HUB_PROBE_TIMEOUT_S = 5.0
# Written by builder/cache_model.py next to the weights it bakes, and into each MODEL_CACHE_DIR conversion.
BAKED_SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class BakedSource:
    """Which model, revision and file variant a baked folder holds.

    A folder converted from a single-file checkpoint also names that ``checkpoint``
    (``name``, ``sha256``, and the file's ``file``/``path``/``size``/``mtime_ns`` it was read as), the
    ``url`` it was downloaded from (query hidden, for messages) with its ``url_key`` (``url_key``: what tells
    the URL apart, query included), and a ``vae`` baked in place of its own (``name``, ``sha256``, ``url``,
    ``url_key``). A label an older build wrote has no key (``baked_from`` says how it is read).
    """

    model_id: str
    revision: str | None
    variant: str | None
    safety_checker: bool
    checkpoint: dict[str, Any] | None = None
    url: str | None = None
    vae: dict[str, Any] | None = None
    url_key: str | None = None

    def holds(self, model_id: str, revision: str | None) -> bool:
        """Whether the folder holds this model at this revision, whatever else it holds."""
        return (self.model_id, self.revision) == (model_id, revision)

    def matches(self, model_id: str, revision: str | None, safety_checker: bool) -> bool:
        """Whether the folder holds everything a worker with these settings loads."""
        return self.holds(model_id, revision) and (self.safety_checker or not safety_checker)

    def holds_url(self, url: str) -> bool:
        """Whether the folder holds the checkpoint downloaded from ``url`` (``baked_from``)."""
        return baked_from(self.url, self.url_key, url)

    def holds_vae_url(self, url: str) -> bool:
        """Whether the folder's VAE was baked from ``url`` (``baked_from``)."""
        vae = self.vae or {}
        return baked_from(vae.get("url"), vae.get("url_key"), url)

    @property
    def checkpoint_file(self) -> ModelFile | None:
        return ModelFile(self.checkpoint["name"], self.checkpoint["sha256"]) if self.checkpoint else None

    @property
    def vae_file(self) -> ModelFile | None:
        return ModelFile(self.vae["name"], self.vae["sha256"]) if self.vae else None

    def write(self, folder: Path) -> None:
        (folder / BAKED_SOURCE_FILE).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")


def url_key(url: str) -> str:
    """The key a label keeps of a URL: the SHA-256 of the URL without its credentials, its query kept.

    The query can pick the file (Civitai's ``fp=fp16``/``size=pruned``, S3's ``versionId``), so two URLs that
    differ only there are two files; a ``user:password@`` picks none and never enters the key, which the image
    holds. A token or a signature in the query is part of the URL: a new one makes a new key.
    """
    parts = urlsplit(url)
    plain = parts._replace(netloc=parts.netloc.rpartition("@")[2], fragment="").geturl()
    return hashlib.sha256(plain.encode()).hexdigest()


def baked_from(shown: str | None, key: str | None, url: str) -> bool:
    """Whether a label's URL (``shown``, query hidden, and its ``key``) is ``url``.

    A label without a key, written by an older build, is taken to match only a URL without a query: its hidden
    form cannot tell two queries apart, so a URL with one is baked again (at build) or refused (at startup).
    """
    if key is not None:
        return key == url_key(url)
    return shown is not None and shown == redact_url(url) and not urlsplit(url).query


def read_baked_source(folder: Path) -> BakedSource | None:
    """The baked folder's ``source.json``, or None when there is no usable one."""
    try:
        return BakedSource(**json.loads((folder / BAKED_SOURCE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class Location:
    """The model the settings name, as ``locate_model`` found it.

    ``way`` is how it loads: ``baked-url`` (MODEL_DIR holds the checkpoint the build downloaded from MODEL_URL),
    ``checkpoint`` (MODEL_ID is a single file), ``baked`` (MODEL_DIR holds MODEL_ID at its revision), ``folder``
    (MODEL_ID is a local diffusers folder) or ``hub`` (MODEL_ID is a hub id). ``path`` is the folder or file it
    loads from (None for a hub id); ``label`` is that folder's ``source.json``, when it has one.
    """

    way: Literal["baked-url", "checkpoint", "baked", "folder", "hub"]
    path: Path | None
    label: BakedSource | None = None


def locate_model(settings: Settings) -> Location:
    """Find the model the settings name, in the loader's order, and check what can be checked without torch.

    The order: MODEL_DIR when the build baked MODEL_URL (or MODEL_ID at its revision) there; a single-file
    checkpoint at MODEL_ID; a local diffusers folder; a hub id, in the local cache or on the hub. VAE_URL must
    be baked into the folder found, and VAE_ID must exist.

    Raises:
        ModelLoadError: the weights are missing, unreachable, or not SD 1.5; the message says what to do.
    """
    model_dir = Path(settings.model_dir)
    baked = read_baked_source(model_dir)
    # The image keeps no URL in its environment (a query may hold a token): MODEL_DIR's label says it holds a
    # MODEL_URL checkpoint, and that is the model unless MODEL_ID names another.
    baked_url = baked is not None and baked.url is not None and "model_id" not in settings.model_fields_set
    if settings.model_url is not None or baked_url:
        location = Location("baked-url", model_dir, _check_baked_url(settings, baked))
    elif is_file_path(settings.model_id) and not (baked is not None and baked.holds(settings.model_id, None)):
        path = Path(settings.model_id).expanduser()
        check_checkpoint_kind(path, Path(settings.model_config_folder))
        location = Location("checkpoint", path)
    else:
        location = _locate_diffusers(settings, baked)
    _check_vae(settings, location.label)
    return location


def _check_baked_url(settings: Settings, baked: BakedSource | None) -> BakedSource:
    """MODEL_DIR's label, when MODEL_DIR holds the checkpoint the build downloaded: MODEL_URL's, when it is set
    (the whole URL, its query included: ``baked_from``)."""
    url = redact_url(settings.model_url) if settings.model_url is not None else baked and baked.url
    if baked is None or baked.url is None or (settings.model_url and not baked.holds_url(settings.model_url)):
        holds = f"holds {baked.url or baked.model_id}" if baked is not None else "holds no baked model"
        if baked is not None and baked.url == url:
            holds += ", downloaded from a URL with another query (or baked by an older build, which kept no key of it)"
        raise ModelLoadError(
            f"MODEL_URL={url!r} is downloaded and converted at build time, and MODEL_DIR={settings.model_dir!r} "
            f"{holds}. Bake it: `docker build --build-arg MODEL_URL=...`, or `MODEL_URL=... python -m "
            "builder.cache_model` with this MODEL_DIR (a network volume, say); or set MODEL_ID to the file"
        )
    held = baked.checkpoint_file
    if settings.model_sha256 is not None and held is not None and held.sha256 != settings.model_sha256:
        raise ModelLoadError(
            f"MODEL_SHA256={settings.model_sha256}, but MODEL_DIR={settings.model_dir!r} holds {url} with SHA-256 "
            f"{held.sha256}; bake it again"
        )
    _require_checker(settings, baked)
    return baked


def _locate_diffusers(settings: Settings, baked: BakedSource | None) -> Location:
    """MODEL_ID as MODEL_DIR's baked folder, a local diffusers folder, or a hub id."""
    model_id, revision = settings.model_id, settings.revision
    folder = Path(model_id).expanduser()
    if baked is not None and baked.holds(model_id, revision):
        _require_checker(settings, baked)
        if settings.model_sha256 is not None:
            raise ModelLoadError(
                f"MODEL_SHA256={settings.model_sha256}: it checks a single-file checkpoint, and MODEL_DIR="
                f"{settings.model_dir!r} holds the hub repo {model_id!r}, which has none; unset MODEL_SHA256"
            )
        return Location("baked", Path(settings.model_dir), baked)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"MODEL_ID={model_id!r} is a folder but not a diffusers pipeline: it has no "
                f"model_index.json. {ways_out(model_id)}"
            )
        return Location("folder", folder, read_baked_source(folder))
    if model_id.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(
            f"MODEL_ID={model_id!r} looks like a path, but no such folder exists. {ways_out(model_id)}"
        )
    if not isinstance(try_to_load_from_cache(model_id, "model_index.json", revision=revision), str):
        probe_hub(model_id, revision)
    return Location("hub", None)


def _require_checker(settings: Settings, baked: BakedSource) -> None:
    if settings.safety_checker and not baked.safety_checker:
        raise ModelLoadError(
            f"SAFETY_CHECKER=true, but MODEL_DIR={settings.model_dir!r} holds {baked.url or baked.model_id} baked "
            "without the safety checker. Bake it with the checker: `docker build --build-arg "
            "SAFETY_CHECKER=true ...`, or `SAFETY_CHECKER=true python -m builder.cache_model` with this "
            "MODEL_DIR; or set SAFETY_CHECKER=false"
        )


def _check_vae(settings: Settings, label: BakedSource | None) -> None:
    """VAE_URL baked into the folder found (``label`` is its source.json), and VAE_ID a file or folder that exists."""
    vae_url = settings.vae_url
    if vae_url is not None and settings.vae_id is None and not (label is not None and label.holds_vae_url(vae_url)):
        raise ModelLoadError(
            f"VAE_URL={redact_url(vae_url)!r} is baked into MODEL_DIR at build time, and the model "
            "loaded does not hold it. Bake it: `docker build --build-arg VAE_URL=...`, or "
            "`VAE_URL=... python -m builder.cache_model` with this MODEL_DIR; or use VAE_ID"
        )
    if settings.vae_id is not None:
        check_vae_path(settings.vae_id)


def check_vae_path(vae_id: str) -> Path:
    """VAE_ID's path: a safetensors file (checked by its header's format only) or an existing folder.

    Raises:
        ModelLoadError: no such file or folder, or a file that is not safetensors.
    """
    path = Path(vae_id).expanduser()
    if is_file_path(vae_id):
        read_shapes(path, "VAE_ID")
    elif not path.is_dir():
        raise ModelLoadError(f"VAE_ID={vae_id!r}: no such file or folder; give a VAE folder or a .safetensors VAE")
    return path


def ways_out(model_id: str) -> str:
    return (
        "Ways out: (1) cache the weights at build time, into the image "
        "(see the README's Model weights section); (2) point MODEL_ID at a local diffusers folder "
        "or a single-file .safetensors checkpoint; "
        f"(3) for a smoke test with no weights, `python -m builder.tiny_model /tmp/tiny` "
        f"and MODEL_ID=/tmp/tiny. The model asked for was MODEL_ID={model_id!r}."
    )


def probe_hub(model_id: str, revision: str | None) -> None:
    """Ask the hub about the repo with a hard deadline, so that startup cannot hang.

    The request runs in a worker thread because name resolution is not covered
    by the HTTP client's own timeout.

    Raises:
        ModelLoadError: the hub is off (HF_HUB_OFFLINE), did not answer in time, or could not provide the repo.
    """
    if hub_constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{model_id!r} is not on this machine and HF_HUB_OFFLINE is set. {ways_out(model_id)}")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-probe")
    future = pool.submit(model_info, model_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    try:
        future.result(timeout=HUB_PROBE_TIMEOUT_S + 5)
    except concurrent.futures.TimeoutError:
        raise ModelLoadError(
            f"{model_id!r} is not on this machine and the Hugging Face hub did not answer within "
            f"{HUB_PROBE_TIMEOUT_S + 5:.0f} s. {ways_out(model_id)}"
        ) from None
    except Exception as error:  # any failure of the look-up means the same thing to the user
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ModelLoadError(
            f"{model_id!r} is not on this machine and the Hugging Face hub could not provide it "
            f"({type(error).__name__}: {reason}). {ways_out(model_id)}"
        ) from error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
