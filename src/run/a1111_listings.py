"""A1111's GET endpoints (``A1111_LISTINGS``), answered in A1111's shapes from what the worker has: the engine's
state, never the GPU, as the describe job reads it.

A client written for A1111 (or for RunPod's A1111 workers, which pass these requests on) fills its pickers from
them and names what they list in its requests: a checkpoint's ``title`` in
``override_settings.sd_model_checkpoint``, a sampler with a schedule, an upscaler, a LoRA in a ``<lora:...>``
tag, a ControlNet model in a unit. Only what this worker serves is listed: its samplers and schedules, Lanczos
and Nearest and UPSCALER_DIR's models, MODELS_DIR's checkpoints after the default. Files are named by their
file names, not their paths on the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.run.describe import usable_names
from src.schema import (
    A1111_NOISE_SOURCE,
    HIRES_UPSCALER_NAMES,
    LATENT_VARIANTS,
    SCHEDULER_ALIASES,
    SCHEDULER_NAMES,
    UPSCALE_BUILT_IN,
)

if TYPE_CHECKING:
    from src.models.checkpoints import ModelFile
    from src.run.engine import Engine

# A1111's names for the samplers whose name here differs.
_A1111_SAMPLER_NAMES = {"PNDM": "PLMS"}
# Each sampler's own schedule in A1111 (1.9 and later), where it is not Uniform: its options' "scheduler".
_OWN_SCHEDULE = {"DPM++ 2M": "karras", "DPM++ 2M SDE": "exponential", "DPM2": "karras", "DPM2 a": "karras"}
# The schedules a sampler may be named with here (A1111's schedulers list): (name, label, default rho).
_SCHEDULES = (
    ("automatic", "Automatic", -1.0),
    ("uniform", "Uniform", -1.0),
    ("karras", "Karras", 7.0),
    ("exponential", "Exponential", -1.0),
)
# The ControlNet extension's preprocessors this worker runs.
_CONTROLNET_MODULES = ("none", "canny")


def answer_listing(engine: Engine, endpoint: str) -> list[Any] | dict[str, Any]:
    """The answer to a GET of ``endpoint`` (a key of ``A1111_LISTINGS``), as A1111 gives it."""
    return _LISTINGS[endpoint](engine)


def _checkpoints(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``sd-models``: the default model, then MODELS_DIR's usable checkpoints."""
    identity, models = engine.identity, engine.models
    listed = [_checkpoint(identity.name, identity.checkpoint, None)]
    for name in usable_names(models.entries):
        known = models.known(name)
        listed.append(_checkpoint(name, known.checkpoint if known else None, models.entries[name].path))
    return listed


def _checkpoint(name: str, file: ModelFile | None, path: Path | None) -> dict[str, Any]:
    """One checkpoint as A1111 lists it: its title is the file's name and short hash, as A1111's override takes it."""
    file_name = f"{name}{path.suffix}" if path is not None and path.is_file() else name
    short = file.short_hash if file is not None else None
    return {
        "title": f"{file_name} [{short}]" if short else file_name,
        "model_name": name,
        "hash": short,
        "sha256": file.sha256 if file is not None else None,
        "filename": file_name,
        "config": None,
    }


def _vaes(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``sd-vae``: the VAE the worker loaded with its model (VAE_ID), then VAE_DIR's."""
    identity, vaes = engine.identity, engine.models.vaes
    loaded = [{"model_name": identity.vae, "filename": identity.vae}] if identity.vae else []
    return loaded + [{"model_name": name, "filename": vaes[name].path.name} for name in usable_names(vaes)]


def _samplers(_engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``samplers``: each sampler once, without its schedule (``schedulers`` lists those)."""
    listed = []
    for name in SCHEDULER_NAMES:
        if name.endswith(" Karras"):
            continue
        aliases = sorted(alias for alias, target in SCHEDULER_ALIASES.items() if target == name)
        options = {"scheduler": _OWN_SCHEDULE[name]} if name in _OWN_SCHEDULE else {}
        listed.append({"name": _A1111_SAMPLER_NAMES.get(name, name), "aliases": aliases, "options": options})
    return listed


def _schedules(_engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``schedulers``: the schedules a sampler may be named with here."""
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
        for name, label, rho in _SCHEDULES
    ]


def _upscalers(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``upscalers``: Lanczos, Nearest, then UPSCALER_DIR's models (their scale known once loaded)."""
    built_in = [
        {"name": name.capitalize(), "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in UPSCALE_BUILT_IN
    ]
    entries = engine.upscalers.entries
    return built_in + [
        {"name": name, "model_name": name, "model_path": entries[name].path.name, "model_url": None, "scale": None}
        for name in engine.upscalers.names
    ]


def _latent_modes(_engine: Engine) -> list[dict[str, str]]:
    """A1111's ``latent-upscale-modes``: its latent hires upscalers, by its names."""
    return [{"name": HIRES_UPSCALER_NAMES[name]} for name in ("latent", *LATENT_VARIANTS)]


def _loras(engine: Engine) -> list[dict[str, Any]]:
    """A1111's ``loras`` (its Lora extension's): LORA_DIR's usable LoRAs, each by the names a ``<lora:...>`` tag
    takes as A1111's do: ``name``, a LoRA in a subfolder by its file's name alone (unless another LoRA has that
    name too), and ``alias``, its metadata's ``ss_output_name`` (unless another LoRA has that name)."""
    loras = engine.loras
    listed = []
    for name in usable_names(loras.files):
        file = loras.files[name]
        base = name.rsplit("/", 1)[-1]
        shown = base if loras.aliases.get(base) == name else name
        alias = file.output_name if file.output_name and loras.aliases.get(file.output_name) == name else shown
        listed.append({"name": shown, "alias": alias, "path": file.path.name, "metadata": {}})
    return listed


def _embeddings(engine: Engine) -> dict[str, Any]:
    """A1111's ``embeddings``: EMBEDDINGS_DIR's, each with its vectors' width and count."""
    loaded = {
        name: {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": int(embedding.vectors.shape[1]),
            "vectors": int(embedding.vectors.shape[0]),
        }
        for name, embedding in sorted(engine.embeddings.items())
    }
    return {"loaded": loaded, "skipped": {}}


def _options(engine: Engine) -> dict[str, Any]:
    """A1111's ``options``, those this worker has: the ones a request's ``override_settings`` takes, at the
    values a job without them runs with."""
    return {
        "sd_model_checkpoint": _checkpoints(engine)[0]["title"],
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "pad_cond_uncond": False,
        "pad_cond_uncond_v0": False,
        "samples_format": "png",
        "eta_noise_seed_delta": 0,
        "randn_source": A1111_NOISE_SOURCE,
    }


def _controlnet_models(engine: Engine) -> dict[str, list[str]]:
    """The ControlNet extension's ``model_list``: CONTROLNET_DIR's usable models."""
    return {"model_list": usable_names(engine.controlnets.entries)}


def _controlnet_modules(_engine: Engine) -> dict[str, list[str]]:
    """The ControlNet extension's ``module_list``: the preprocessors this worker runs."""
    return {"module_list": list(_CONTROLNET_MODULES)}


_LISTINGS: Mapping[str, Callable[[Engine], Any]] = {
    "/sdapi/v1/sd-models": _checkpoints,
    "/sdapi/v1/sd-vae": _vaes,
    "/sdapi/v1/samplers": _samplers,
    "/sdapi/v1/schedulers": _schedules,
    "/sdapi/v1/upscalers": _upscalers,
    "/sdapi/v1/latent-upscale-modes": _latent_modes,
    "/sdapi/v1/loras": _loras,
    "/sdapi/v1/embeddings": _embeddings,
    "/sdapi/v1/options": _options,
    "/controlnet/model_list": _controlnet_models,
    "/controlnet/module_list": _controlnet_modules,
}
