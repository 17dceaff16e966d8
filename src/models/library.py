"""MODELS_DIR's models and VAE_DIR's VAEs by name: scanned at startup, judged from their headers, read on first use.

A request's ``model`` is a name from the scan, never a path: ``sub/name`` for ``MODELS_DIR/sub/name.safetensors``
or for the diffusers folder ``MODELS_DIR/sub/name``. A file is judged by the checks MODEL_ID's file gets
(``checkpoints.check_checkpoint``: SD 1.5 only, pickles refused unopened), a folder by its configs;
one that fails is kept in the scan with its reason, so a request naming it is told why.

``read_weights`` reads a model as the worker reads MODEL_ID (``loader.load_model``: the conversion cache of
MODEL_CACHE_DIR, the hash once per file) and keeps only its weights: the state dicts of its UNet, text encoder
and VAE, which ``run.models`` copies into the modules on the device.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from src.errors import ModelLoadError
from src.models.checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, ModelFile, check_checkpoint, check_vae_file
from src.models.loader import ModelIdentity, load_model, load_vae
from src.settings import Settings

log = logging.getLogger(__name__)

# The modules whose weights differ from one SD 1.5 model to the next; the tokenizer, scheduler and safety
# checker are the same for all.
PARTS = ("unet", "text_encoder", "vae")
# PEFT's names for a LoRA-wrapped layer: the model's own weight is ``<layer>.base_layer.weight``.
_PEFT_BASE = re.compile(r"\.base_layer(?=\.)")
_PEFT_ADAPTER = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")
# FAST_MODE's fused projections (``fuse_qkv_projections``): copies of ``to_q``, ``to_k`` and ``to_v`` joined,
# not weights of their own. Left out of snapshots, and joined again from the copied weights after a swap.
_FUSED = re.compile(r"\.(to_qkv|to_kv)\.")
# The config keys that give a diffusers folder's models their shapes: the UNet's input channels (9 for an
# inpainting model) and cross-attention width (768 for SD 1.5, 1024 for SD 2.x, 2048 for SDXL) among them.
_SHAPING_KEYS = {
    "unet": ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels", "layers_per_block"),
    "text_encoder": ("hidden_size", "num_hidden_layers", "vocab_size"),
    "vae": ("block_out_channels", "latent_channels"),
}


@dataclass(frozen=True)
class ModelEntry:
    """A model of MODELS_DIR: its name, its file or folder, and why it cannot be used (None when it can)."""

    name: str
    path: Path
    problem: str | None = None
    # The URL it was downloaded from (no query), for a model a request named by URL.
    url: str | None = None


@dataclass(frozen=True)
class Weights:
    """One model's weights in host memory, by part, under the names of a module without LoRA layers."""

    identity: ModelIdentity
    parts: dict[str, dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for part in self.parts.values() for tensor in part.values())


def scan_models(folder: Path, config_folder: Path) -> dict[str, ModelEntry]:
    """Every model file and diffusers folder under ``folder`` (MODELS_DIR), by name, each with its problem if it
    has one: a file judged by its header as MODEL_ID's is, a folder by its configs against MODEL_CONFIG's.

    Raises:
        ModelLoadError: ``folder`` is not a folder.
    """
    entries = _scan(
        folder,
        "MODELS_DIR",
        "model_index.json",
        judge_file=lambda path: model_file_problem(path, config_folder),
        judge_folder=lambda path: _folder_problem(path, config_folder),
    )
    log.info("MODELS_DIR: %d models (%d usable)", len(entries), sum(not entry.problem for entry in entries.values()))
    return entries


def model_file_problem(path: Path, config_folder: Path) -> str | None:
    """Why the single-file checkpoint at ``path`` cannot be served (judged from its header as MODEL_ID's file is:
    SD 1.5 only, pickles refused unopened); None when it can."""
    return _refusal(check_checkpoint, path, config_folder, setting="MODELS_DIR")


def scan_vaes(folder: Path, config_folder: Path) -> dict[str, ModelEntry]:
    """Every VAE file and diffusers VAE folder under ``folder`` (VAE_DIR), by name, each with its problem if it
    has one: a file judged by its header against MODEL_CONFIG's VAE, as VAE_ID's file is; a folder when it is read.

    Raises:
        ModelLoadError: ``folder`` is not a folder.
    """
    try:
        vae_config = json.loads((config_folder / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        vae_config = None

    def judge_file(path: Path) -> str | None:
        if vae_config is None:
            return f"the config folder {config_folder} (MODEL_CONFIG) has no readable vae/config.json"
        return _refusal(check_vae_file, path, vae_config, setting="VAE_DIR")

    return _scan(folder, "VAE_DIR", "config.json", judge_file=judge_file, judge_folder=lambda path: None)


def _scan(
    folder: Path,
    setting: str,
    marker: str,
    *,
    judge_file: Callable[[Path], str | None],
    judge_folder: Callable[[Path], str | None],
) -> dict[str, ModelEntry]:
    """The diffusers folders (those holding ``marker``) and weight files under ``folder``, by name, judged; a file
    inside such a folder, or hidden (a conversion being written, say), is not one. The refused are logged."""
    if not folder.is_dir():
        raise ModelLoadError(f"{setting}={str(folder)!r}: no such folder")
    folders = sorted(found.parent for found in folder.rglob(marker) if not _hidden(found, folder))
    entries = {path.relative_to(folder).as_posix(): path for path in folders}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            continue
        if _hidden(path, folder) or any(parent in folders for parent in path.parents):
            continue
        name = path.relative_to(folder).with_suffix("").as_posix()
        if name in entries:
            # A pickle (refused) never hides a safetensors file of its name, which sorts after it.
            held = entries[name]
            if held.suffix.lower() in PICKLE_SUFFIXES and path.suffix.lower() in SAFETENSORS_SUFFIXES:
                entries[name] = path
            log.warning("%s: %s and %s have one name, %r; %s is served", setting, held, path, name, entries[name])
            continue
        entries[name] = path
    judged = {
        name: ModelEntry(name, path, judge_folder(path) if path.is_dir() else judge_file(path))
        for name, path in entries.items()
    }
    for entry in judged.values():
        if entry.problem:
            log.warning("%s: %s is not served: %s", setting, entry.name, entry.problem)
    return judged


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _refusal(check: Callable[..., None], path: Path, *args: Any, setting: str) -> str | None:
    """Why ``check`` refuses the file, without the ``SETTING='path': `` its message starts with; None if it passes."""
    try:
        check(path, *args, setting=setting)
    except ModelLoadError as error:
        return str(error).removeprefix(f"{setting}={str(path)!r}: ")
    return None


def _folder_problem(path: Path, config_folder: Path) -> str | None:
    """Why a diffusers folder's models are not shaped as the config folder's (SD 1.5's), from their configs."""
    for part, keys in _SHAPING_KEYS.items():
        try:
            found = json.loads((path / part / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"a diffusers folder without a readable {part}/config.json"
        try:
            expected = json.loads((config_folder / part / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"the config folder {config_folder} (MODEL_CONFIG) has no readable {part}/config.json to judge it by"
        for key in keys:
            if found.get(key) != expected.get(key):
                return f"its {part} has {key}={found.get(key)!r}, SD 1.5's (MODEL_CONFIG) has {expected.get(key)!r}"
    return None


# What reading a file of MODELS_DIR or VAE_DIR that changed or broke since its scan may raise: the loader's own
# refusals, and diffusers', transformers' and safetensors' errors for data that does not match its header.
_UNREADABLE = (ModelLoadError, SafetensorError, OSError, ValueError, KeyError, RuntimeError)


def _reason(error: Exception, setting: str, path: Path) -> str:
    """Why a file could not be read, without the setting a job's field did not use (``MODEL_ID='...': ``)."""
    if isinstance(error, ModelLoadError):
        return str(error).removeprefix(f"{setting}={str(path)!r}: ")
    return f"cannot be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]})"


def read_vae(entry: ModelEntry, current: Any, dtype: torch.dtype, *, pin: bool) -> Weights:
    """Read VAE_DIR's ``entry`` as VAE_ID is read, shaped like ``current`` (the pipeline's VAE), in ``dtype``.

    Raises:
        ModelLoadError: it is gone, unreadable, or not shaped as the model's VAE; the message names the field.
    """
    if entry.problem:
        raise ModelLoadError(f"vae={entry.name!r}: {entry.problem}")
    if not entry.path.exists():
        raise ModelLoadError(f"vae={entry.name!r}: its file is no longer in VAE_DIR ({entry.path.name})")
    try:
        vae, _name, file = load_vae(str(entry.path), current, dtype)
    except _UNREADABLE as error:
        raise ModelLoadError(f"vae={entry.name!r}: {_reason(error, 'VAE_ID', entry.path)}") from None
    vae_file = ModelFile(entry.name, file.sha256) if file is not None else None
    return Weights(ModelIdentity(entry.name, vae=entry.name, vae_file=vae_file), {"vae": snapshot(vae, pin=pin)})


def read_weights(entry: ModelEntry, settings: Settings, dtype: torch.dtype, *, pin: bool) -> Weights:
    """Read ``entry`` as MODEL_ID would be read, in ``dtype``, and keep its weights (pinned when ``pin``).

    Raises:
        ModelLoadError: the file or folder is gone, or cannot be read; the message names the model.
    """
    if entry.problem:
        raise ModelLoadError(f"model={entry.name!r}: {entry.problem}")
    if not entry.path.exists():
        raise ModelLoadError(f"model={entry.name!r}: its file is no longer in MODELS_DIR ({entry.path.name})")
    # MODEL_ID's own rules, for this file: no URL, no checksum, no baked VAE; VAE_ID still replaces every VAE.
    own = settings.model_copy(
        update={"model_id": str(entry.path), "model_url": None, "model_sha256": None, "vae_url": None}
    )
    try:
        pipeline, identity = load_model(own, dtype)
    except _UNREADABLE as error:
        raise ModelLoadError(f"model={entry.name!r}: {_reason(error, 'MODEL_ID', entry.path)}") from None
    parts = {part: snapshot(getattr(pipeline, part), pin=pin) for part in PARTS}
    return Weights(ModelIdentity(entry.name, identity.checkpoint, identity.vae, identity.vae_file, entry.url), parts)


def snapshot(module: Any, *, pin: bool = False) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s weights in host memory, named as in a module without LoRA layers."""
    copied = {}
    for name, tensor in _own_tensors(module).items():
        host = tensor.detach().to("cpu", copy=True)
        copied[name] = host.pin_memory() if pin else host
    return copied


def copy_into(module: Any, targets: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into ``module``'s own tensors (``fitting_targets``) in place, then its fused projections:
    every graph, hook and LoRA layer that holds them stays valid."""
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(weights[name], non_blocking=True)
        for attention in module.modules():
            if getattr(attention, "fused_projections", False):
                _join_projections(attention)


def _join_projections(attention: Any) -> None:
    """Refill an attention's fused ``to_qkv`` (self-attention) or ``to_kv`` (cross-attention) from its ``to_q``,
    ``to_k`` and ``to_v``, in place, as diffusers' ``fuse_projections`` made them."""
    parts: tuple[Any, ...] = (attention.to_k, attention.to_v)
    if attention.is_cross_attention:
        fused = attention.to_kv
    else:
        fused, parts = attention.to_qkv, (attention.to_q, *parts)
    fused.weight.copy_(torch.cat([part.weight for part in parts]))
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([part.bias for part in parts]))


def fitting_targets(module: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module``'s own tensors, once checked to take ``weights`` by name and shape, each holding its values.

    Raises:
        ModelLoadError: they do not (another architecture), or the module's weights are not on it (sequential
            CPU offload keeps them in its hooks).
    """
    check_swappable(module)
    targets = _own_tensors(module)
    if targets.keys() != weights.keys():
        missing = sorted(targets.keys() - weights.keys())[:3]
        extra = sorted(weights.keys() - targets.keys())[:3]
        raise ModelLoadError(f"the weights do not fit the model's modules: missing {missing}, unexpected {extra}")
    for name, target in targets.items():
        if weights[name].shape != target.shape:
            raise ModelLoadError(f"{name} is {list(weights[name].shape)}, the model's is {list(target.shape)}")
    return targets


def check_swappable(module: Any) -> None:
    """Refuse a module whose weights are not on it: sequential CPU offload (the minimal memory profile) keeps them
    in its hooks and leaves the module's own on the meta device, with no data to copy from or into.

    Raises:
        ModelLoadError: they are not.
    """
    if any(tensor.device.type == "meta" for tensor in _own_tensors(module).values()):
        raise ModelLoadError(
            "another model cannot be swapped in while sequential CPU offload holds the weights (the minimal "
            "memory profile); use the low or balanced profile"
        )


def _own_tensors(module: Any) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers, LoRA adapters' and fused projections left out, under their
    names without PEFT's ``base_layer``."""
    own = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if _PEFT_ADAPTER.search(name) or _FUSED.search(name):
            continue
        own[_PEFT_BASE.sub("", name)] = tensor
    return own
