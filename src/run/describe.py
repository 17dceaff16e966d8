"""What the worker has, for a ``{"describe": true}`` job: read from the engine's state, never from the GPU.

A client builds its pickers from it: the models (the default first, then MODELS_DIR's, each with its hash when
it is known and whether its weights are in host memory), the VAE, LoRAs, ControlNets and embeddings by name,
the schedulers with the other names they are known by, the hires upscalers, the request limits, and the
device and memory profile. Files a scan refused are listed apart, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from src import __version__
from src.schema import HIRES_BUILT_IN, LATENT_VARIANTS, SCHEDULER_ALIASES, SCHEDULER_NAMES, UPSCALE_BUILT_IN

if TYPE_CHECKING:
    from src.run.engine import Engine

# The settings a request is checked against, by the name the settings table gives them.
LIMITS = (
    "max_side",
    "max_pixels",
    "max_upscale_side",
    "max_images",
    "max_steps",
    "default_steps",
    "default_scheduler",
    "max_prompt_chunks",
    "max_loras",
    "max_controlnets",
)


def describe(engine: Engine) -> dict[str, Any]:
    """The answer to a describe job: ``{"describe": {...}}``."""
    identity, vaes = engine.identity, engine.models.vaes
    aliases: dict[str, list[str]] = {name: [] for name in SCHEDULER_NAMES}
    for alias, target in SCHEDULER_ALIASES.items():
        aliases[target].append(alias)
    return {
        "describe": {
            "version": __version__,
            "device": engine.device.type,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "memory_profile": engine.profile.value,
            "models": _models(engine),
            "vaes": ([{"name": identity.vae, "hash": identity.vae_hash, "default": True}] if identity.vae else [])
            + [{"name": name, "hash": None, "default": False} for name in usable_names(vaes)],
            "loras": usable_names(engine.loras.files),
            "controlnets": usable_names(engine.controlnets.entries),
            "embeddings": sorted(engine.embeddings),
            "schedulers": [{"name": name, "aliases": sorted(aliases[name])} for name in SCHEDULER_NAMES],
            "hires_upscalers": [*HIRES_BUILT_IN, *engine.upscalers.names],
            # Each enlarges the latents as "latent" does, with another of A1111's interpolations.
            "hires_latent_variants": list(LATENT_VARIANTS),
            "upscalers": [*UPSCALE_BUILT_IN, *engine.upscalers.names],
            "limits": {name: getattr(engine.settings, name) for name in LIMITS},
            "refused": _refused("model", engine.models.entries)
            + _refused("vae", vaes)
            + _refused("lora", engine.loras.files)
            + _refused("controlnet", engine.controlnets.entries)
            + _refused("upscaler", engine.upscalers.entries),
        }
    }


def _models(engine: Engine) -> list[dict[str, Any]]:
    """The default model, then MODELS_DIR's usable ones: each with its hash when known, and whether it is in
    host memory."""
    models, identity = engine.models, engine.identity
    listed = [{"name": identity.name, "hash": identity.model_hash, "default": True, "cached": True}]
    for name in usable_names(models.entries):
        known = models.known(name)
        hashed = known.model_hash if known else None
        listed.append({"name": name, "hash": hashed, "default": False, "cached": name in models.cached})
    return listed


def usable_names(entries: Mapping[str, Any]) -> list[str]:
    """The names of the entries (of a folder's scan) that have no problem, sorted."""
    return sorted(name for name, entry in entries.items() if entry.problem is None)


def _refused(kind: str, entries: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The entries a scan refused, with the reason."""
    return [
        {"kind": kind, "name": name, "problem": entry.problem}
        for name, entry in sorted(entries.items())
        if entry.problem is not None
    ]
