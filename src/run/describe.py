"""What the worker has, for a ``{"describe": true}`` job: read from the engine's state, never from the GPU.

A client builds its pickers from it: the models (the default first, then MODELS_DIR's, each with its hash when
it is known and whether its weights are in host memory), the VAE, LoRAs, ControlNets and embeddings by name,
the schedulers with the other names they are known by, the hires upscalers, the request limits, and the
device and memory profile. Files a scan refused are listed apart, with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

from src import __version__
from src.schema import SCHEDULER_ALIASES, SCHEDULER_NAMES, Hires

if TYPE_CHECKING:
    from src.run.engine import Engine

# The settings a request is checked against, by the name the settings table gives them.
LIMITS = (
    "max_side",
    "max_pixels",
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
    settings = engine.settings
    models = engine.models
    identity = engine.identity
    listed: list[dict[str, Any]] = [
        {"name": identity.name, "hash": identity.model_hash, "default": True, "cached": True}
    ]
    for name, entry in sorted(models.entries.items()):
        if entry.problem is None:
            known = models.known(name)
            listed.append(
                {
                    "name": name,
                    "hash": known.model_hash if known else None,
                    "default": False,
                    "cached": name in models.cached,
                }
            )
    refused = [
        {"kind": "model", "name": name, "problem": entry.problem}
        for name, entry in sorted(models.entries.items())
        if entry.problem is not None
    ]
    refused += [
        {"kind": "lora", "name": name, "problem": item.problem}
        for name, item in sorted(engine.loras.files.items())
        if item.problem is not None
    ]
    refused += [
        {"kind": "controlnet", "name": name, "problem": entry.problem}
        for name, entry in sorted(engine.controlnets.entries.items())
        if entry.problem is not None
    ]
    aliases: dict[str, list[str]] = {name: [] for name in SCHEDULER_NAMES}
    for alias, target in SCHEDULER_ALIASES.items():
        aliases[target].append(alias)
    return {
        "describe": {
            "version": __version__,
            "device": engine.device.type,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "memory_profile": engine.profile.value,
            "models": listed,
            "vaes": [{"name": identity.vae, "hash": identity.vae_hash}] if identity.vae else [],
            "loras": sorted(name for name, item in engine.loras.files.items() if item.problem is None),
            "controlnets": sorted(name for name, entry in engine.controlnets.entries.items() if entry.problem is None),
            "embeddings": sorted(engine.embeddings),
            "schedulers": [{"name": name, "aliases": sorted(aliases[name])} for name in SCHEDULER_NAMES],
            "hires_upscalers": list(get_args(Hires.model_fields["upscaler"].annotation)),
            "limits": {name: getattr(settings, name) for name in LIMITS},
            "refused": refused,
        }
    }
