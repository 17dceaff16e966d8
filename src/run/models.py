"""Stage 2: the model a job names, swapped in place under the GPU lock.

The pipeline keeps one UNet, text encoder and VAE on the device whatever the number of models; a job that
names another model has that model's weights copied into them (``library.copy_into``), so compiled graphs,
LoRA layers, offload hooks and ControlNet wrappers stay valid. Weights come from a host-memory cache,
least recently used dropped first within MODEL_CACHE_RAM_MB, or from MODELS_DIR on a first use. The
default model's weights are copied to host memory before the first swap away from it, and are never
dropped: it stays the default, and stays warm.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from src.errors import ModelLoadError
from src.models.library import (
    PARTS,
    ModelEntry,
    Weights,
    check_swappable,
    copy_into,
    fitting_targets,
    read_vae,
    read_weights,
    scan_models,
    scan_vaes,
    snapshot,
)
from src.models.loader import ModelIdentity
from src.settings import Settings

log = logging.getLogger(__name__)

MIB = 1 << 20
# MODEL_CACHE_RAM_MB unset: this share of the machine's memory; set, at most this share.
DEFAULT_RAM_SHARE = 0.25
MAX_RAM_SHARE = 0.8
# What the modules hold while a copy is under way; a failed copy leaves them so, and the next job restores.
_UNKNOWN = "\0unknown"
# A VAE of VAE_DIR in the host cache, under this prefix and its name: no model's name starts with a NUL.
_VAE_KEY = "\0vae/"
_T = TypeVar("_T")


def machine_memory_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_budget(settings: Settings, total_bytes: int) -> int:
    """MODEL_CACHE_RAM_MB in bytes, or its default from ``total_bytes``, the machine's memory.

    Raises:
        ModelLoadError: the setting is more than the machine can hold.
    """
    if settings.model_cache_ram_mb is None:
        return int(total_bytes * DEFAULT_RAM_SHARE)
    wanted = settings.model_cache_ram_mb * MIB
    if wanted > total_bytes * MAX_RAM_SHARE:
        raise ModelLoadError(
            f"MODEL_CACHE_RAM_MB={settings.model_cache_ram_mb}: more than {MAX_RAM_SHARE:.0%} of this machine's "
            f"{total_bytes // MIB} MiB of memory; set at most {int(total_bytes * MAX_RAM_SHARE) // MIB}"
        )
    return wanted


class Models:
    """The models a job may name, and which one the pipeline's modules hold."""

    def __init__(
        self,
        pipeline: Any,
        entries: Mapping[str, ModelEntry],
        *,
        settings: Settings,
        dtype: torch.dtype,
        pin: bool,
        cache_bytes: int,
        default: ModelIdentity,
    ) -> None:
        self.entries = dict(entries)
        # VAE_DIR's VAEs, by name.
        self.vaes: dict[str, ModelEntry] = {}
        # Models requests named by URL, by key: added by the jobs that downloaded them (``add_downloaded``).
        self.downloaded: dict[str, ModelEntry] = {}
        self.cache_bytes = cache_bytes
        # How many times each model (and each VAE, as "vae:<name>") was read: once, while it stays in the cache.
        self.reads: Counter[str] = Counter()
        self._pipeline = pipeline
        self._settings = settings
        self._dtype = dtype
        self._pin = pin
        self._default_identity = default
        self._default: Weights | None = None
        self._cache: OrderedDict[str, Weights] = OrderedDict()
        # The identity of every model read, cached or dropped since: its hash, for the describe job.
        self._seen: dict[str, ModelIdentity] = {}
        # What each part's module holds: None the default model's, else a cache key (a model's name, or a VAE's).
        self._held: dict[str, str | None] = dict.fromkeys(PARTS)
        # The identity of the model the UNet holds, and of all the modules hold (its VAE's name and hash included).
        self._model_identity = self._identity = default

    @classmethod
    def from_settings(
        cls, pipeline: Any, settings: Settings, *, dtype: torch.dtype, pin: bool, default: ModelIdentity
    ) -> Models:
        """MODELS_DIR's models (none when it is unset), with MODELS_PRELOAD's read into the cache.

        Raises:
            ModelLoadError: MODELS_DIR is not a folder, MODEL_CACHE_RAM_MB is more than the machine holds,
                or a preloaded model is unknown or cannot be read.
        """
        entries: dict[str, ModelEntry] = {}
        if settings.models_dir is not None:
            entries = scan_models(Path(settings.models_dir).expanduser(), Path(settings.model_config_folder))
        budget = cache_budget(settings, machine_memory_bytes())
        models = cls(pipeline, entries, settings=settings, dtype=dtype, pin=pin, cache_bytes=budget, default=default)
        if settings.vae_dir is not None:
            models.vaes = scan_vaes(Path(settings.vae_dir).expanduser(), Path(settings.model_config_folder))
        for name in settings.preload_names:
            if name not in entries:
                raise ModelLoadError(f"MODELS_PRELOAD names {name!r}, which is not a model in MODELS_DIR")
            models._weights(name)
        return models

    @property
    def cached(self) -> list[str]:
        """The models whose weights are in host memory, least recently used first."""
        return [key for key in self._cache if not key.startswith(_VAE_KEY)]

    def add_downloaded(self, key: str, entry: ModelEntry) -> None:
        """A model a request named by URL, downloaded and checked, under ``key`` (which no request can name)."""
        self.downloaded = {**self.downloaded, key: entry}

    @property
    def swappable(self) -> bool:
        """Whether a job may hold another model than the default, or another VAE."""
        return bool(self.entries or self.vaes or self.downloaded)

    def known(self, name: str) -> ModelIdentity | None:
        """Model ``name``'s identity (its hash among it) when this worker has read it, else None."""
        return self._seen.get(name)

    def use(self, name: str | None, vae: str | None = None) -> ModelIdentity:
        """Make the modules hold model ``name`` (None: the default), with VAE_DIR's ``vae`` in place of its own
        when one is named; the identity of what they hold. Call it under the GPU lock.

        Raises:
            ModelLoadError: ``name`` or ``vae`` is not usable, or its file is gone or unreadable; the modules
                then hold what they held.
        """
        wanted = dict.fromkeys(PARTS, name)
        if vae is not None:
            wanted["vae"] = _VAE_KEY + vae
        if wanted == self._held:
            return self._identity
        started = time.perf_counter()
        changed = [part for part in PARTS if wanted[part] != self._held[part]]
        for part in changed:  # before anything is read or copied
            self._named(wanted[part], check_swappable, getattr(self._pipeline, part))
        if self._default is None and all(key is None for key in self._held.values()):
            parts = {part: snapshot(getattr(self._pipeline, part), pin=self._pin) for part in PARTS}
            self._default = Weights(self._default_identity, parts)
        sources = {part: self._source(wanted[part]) for part in changed}
        # Checked whole before the first copy, so that weights that do not fit change nothing.
        targets = {part: self._fitting(part, wanted[part], sources[part]) for part in changed}
        for part in changed:
            self._held[part] = _UNKNOWN
            copy_into(getattr(self._pipeline, part), targets[part], sources[part].parts[part])
            self._held[part] = wanted[part]
        if any(tensor.is_cuda for tensor in self._pipeline.unet.parameters()):
            torch.cuda.synchronize()
        if "unet" in changed:
            self._model_identity = sources["unet"].identity
        model = self._model_identity
        if vae is None:
            self._identity = model
        elif "vae" in changed or "unet" in changed:
            own = sources["vae"].identity if "vae" in changed else self._identity
            self._identity = replace(model, vae=own.vae, vae_file=own.vae_file)
        swapped = ", ".join(str(wanted[part]).replace(_VAE_KEY, "VAE ") for part in changed)
        log.info("swapped in %s in %.2f s", swapped, time.perf_counter() - started)
        return self._identity

    def _fitting(self, part: str, key: str | None, source: Weights) -> dict[str, torch.Tensor]:
        """``part``'s module's tensors that take ``source``'s weights; refused naming the model or VAE."""
        return self._named(key, fitting_targets, getattr(self._pipeline, part), source.parts[part])

    @staticmethod
    def _named(key: str | None, check: Callable[..., _T], *args: Any) -> _T:
        """``check(*args)``, its refusal naming the model or VAE that ``key`` stands for."""
        try:
            return check(*args)
        except ModelLoadError as error:
            field = f"vae={key.removeprefix(_VAE_KEY)!r}" if key and key.startswith(_VAE_KEY) else f"model={key!r}"
            raise ModelLoadError(f"{field}: {error}") from None

    def _source(self, key: str | None) -> Weights:
        """The weights a cache key names: the default model's (None), a VAE's, or a model's."""
        if key is None:
            assert self._default is not None
            return self._default
        return self._vae(key.removeprefix(_VAE_KEY)) if key.startswith(_VAE_KEY) else self._weights(key)

    def _vae(self, name: str) -> Weights:
        """VAE_DIR's ``name``, from the cache, or read and cached."""
        entry = self.vaes.get(name)
        if entry is None:
            raise ModelLoadError(f"vae={name!r}: not a VAE in VAE_DIR")
        return self._cached(
            _VAE_KEY + name, entry, lambda: read_vae(entry, self._pipeline.vae, self._dtype, pin=self._pin)
        )

    def _weights(self, name: str) -> Weights:
        """Model ``name``'s weights, from the cache, or read from MODELS_DIR and cached."""
        entry = self.entries.get(name) or self.downloaded.get(name)
        if entry is None:
            raise ModelLoadError(f"model={name!r}: not a model in MODELS_DIR")
        return self._cached(name, entry, lambda: read_weights(entry, self._settings, self._dtype, pin=self._pin))

    def _cached(self, key: str, entry: ModelEntry, read: Callable[[], Weights]) -> Weights:
        """The cache's weights under ``key``, now the most recently used; else ``read()``'s, cached."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        started = time.perf_counter()
        weights = read()
        self.reads[key.replace(_VAE_KEY, "vae:")] += 1
        self._seen[key] = weights.identity
        seconds, mib = time.perf_counter() - started, weights.nbytes // MIB
        log.info("read %s from %s in %.1f s (%d MiB)", entry.name, entry.path, seconds, mib)
        self._cache[key] = weights
        self._evict(keep=key)
        return weights

    def _evict(self, keep: str) -> None:
        """Drop the least recently used weights until the cache fits its budget; ``keep`` stays whatever it costs."""
        while sum(weights.nbytes for weights in self._cache.values()) > self.cache_bytes:
            oldest = next(iter(self._cache))
            if oldest == keep:
                return
            del self._cache[oldest]
            log.info("dropped %s from the model cache (MODEL_CACHE_RAM_MB)", oldest)
