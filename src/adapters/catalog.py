"""What the worker has, by name: the models, LoRAs and ControlNets a request may name, torch-free.

Built once, at startup, from the folders' scans (``scan_loras``, and ``ControlNets``' checked entries),
and read by ``prepare`` before a job waits for the GPU: a request naming a LoRA or a ControlNet the
worker does not have, or cannot use, is refused there, each problem naming its field. The catalog holds
file descriptions only, never a model, so the stages beside the GPU stage may read it at any time.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from src.schema import HIRES_BUILT_IN, LATENT_VARIANTS, UPSCALE_BUILT_IN

if TYPE_CHECKING:
    from src.adapters.controlnets import ControlNetEntry, ControlNetRef
    from src.adapters.loras import LoraFile, LoraRef
    from src.adapters.upscalers import UpscalerEntry
    from src.models.library import ModelEntry

# An unknown name's error lists at most this many of the names there are.
NAMES_SHOWN = 20


class AdapterRequest(Protocol):
    """The part of a request that names the model and adapters."""

    @property
    def model(self) -> object: ...  # a name (str), a download (checked once downloaded), or None
    @property
    def vae(self) -> str | None: ...
    @property
    def loras(self) -> Sequence[LoraRef]: ...
    @property
    def controlnets(self) -> Sequence[ControlNetRef]: ...


@dataclass(frozen=True)
class Catalog:
    """The models of MODELS_DIR, the LoRAs of LORA_DIR and the ControlNets of CONTROLNET_DIR, by name, as their
    scans found them."""

    loras: Mapping[str, LoraFile] = field(default_factory=dict)
    # A1111's names for LoRAs (``loras.lora_aliases``), to their names.
    lora_aliases: Mapping[str, str] = field(default_factory=dict)
    controlnets: Mapping[str, ControlNetEntry] = field(default_factory=dict)
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    vaes: Mapping[str, ModelEntry] = field(default_factory=dict)
    upscalers: Mapping[str, UpscalerEntry] = field(default_factory=dict)

    @property
    def lora_names(self) -> list[str]:
        """The usable LoRAs' names."""
        return [name for name, item in self.loras.items() if item.problem is None]

    @property
    def controlnet_names(self) -> list[str]:
        return sorted(self.controlnets)

    def problems(self, request: AdapterRequest) -> list[str]:
        """The model, and each LoRA and ControlNet, the request names that the worker does not have, or cannot use."""
        model = self.model_problem(request.model) if isinstance(request.model, str) else None
        vae = self.model_problem(request.vae, field="vae") if request.vae is not None else None
        hires = getattr(request, "hires", None)
        hires_model = self.model_problem(hires.model, field="hires.model") if hires and hires.model else None
        found = [problem for problem in (model, vae, hires_model) if problem]
        found += self.upscaler_problems(request)
        return found + self.lora_problems(request.loras) + self.controlnet_problems(request.controlnets)

    def upscaler_problems(self, request: AdapterRequest) -> list[str]:
        """The hires upscaler, when it is neither built in nor a usable file of UPSCALER_DIR."""
        hires = getattr(request, "hires", None)
        problem = self.upscaler_problem(hires.upscaler, "hires.upscaler") if hires is not None else None
        return [problem] if problem else []

    def upscaler_problem(self, name: str, field: str) -> str | None:
        """Why ``name``, given as ``field``, is neither built in (``hires.upscaler``'s latent and lanczos, an
        upscale job's lanczos and nearest) nor a usable file of UPSCALER_DIR; None when it is one of them."""
        built_in = HIRES_BUILT_IN if field.startswith("hires.") else UPSCALE_BUILT_IN
        if name in built_in or (field.startswith("hires.") and name in LATENT_VARIANTS):
            return None
        entry = self.upscalers.get(name)
        if entry is None:
            usable = sorted(key for key, item in self.upscalers.items() if item.problem is None)
            closest = difflib.get_close_matches(name, usable, n=3, cutoff=0.5)
            hint = (
                f"the closest are {', '.join(closest)}"
                if closest
                else f"the upscalers are: {', '.join([*built_in, *usable])}"
            )
            return f"{field}={name!r}: neither {', '.join(built_in)} nor an upscaler in UPSCALER_DIR; {hint}"
        if entry.problem:
            return f"{field}={name!r}: {entry.path.name} cannot be used: {entry.problem}"
        return None

    def model_problem(self, name: str, field: str = "model") -> str | None:
        """Why ``name`` is not a usable model of MODELS_DIR (``field`` vae: VAE of VAE_DIR), naming the field;
        None when it is one."""
        entries, folder, kind = (
            (self.vaes, "VAE_DIR", "VAE") if field == "vae" else (self.models, "MODELS_DIR", "model")
        )
        entry = entries.get(name)
        if entry is None:
            usable = sorted(key for key, item in entries.items() if item.problem is None)
            closest = difflib.get_close_matches(name, usable, n=3, cutoff=0.5)
            hint = (
                f"the closest are {', '.join(closest)}"
                if closest
                else f"the {kind}s are: {_shown(usable, ' and {} more') or 'none'}"
            )
            return f"{field}={name!r}: not a {kind} in {folder}; {hint}"
        if entry.problem:
            return f"{field}={name!r}: {entry.path.name} cannot be used: {entry.problem}"
        return None

    def lora_problems(self, refs: Sequence[LoraRef]) -> list[str]:
        """Each unknown LoRA name, with the names there are (a file known to be unusable is refused when
        the job loads it, naming the file and why); a LoRA by URL is checked once downloaded."""
        names, aliases = self.lora_names, self.lora_aliases
        listed = f"the LoRAs are: {_shown(names, ' and {} more')}" if names else "LORA_DIR holds no usable LoRA"
        return [
            f"loras.{index}.name={ref.name!r}: not a LoRA in LORA_DIR; {listed}"
            for index, ref in enumerate(refs)
            if ref.name is not None and ref.name not in self.loras and ref.name not in aliases
        ]

    def controlnet_problems(self, units: Sequence[ControlNetRef]) -> list[str]:
        """Each unit's unknown or unusable model, naming its field."""
        named = ((index, self.controlnet_problem(unit.model)) for index, unit in enumerate(units))
        return [f"controlnets.{index}.model={units[index].model!r}: {problem}" for index, problem in named if problem]

    def controlnet_problem(self, name: str) -> str | None:
        """Why ``name`` is not a usable ControlNet of the folder; None when it is one."""
        entry = self.controlnets.get(name)
        if entry is None:
            shown = _shown(self.controlnet_names, " (and {} more)") or "none"
            return f"not a ControlNet in CONTROLNET_DIR; the ControlNets are: {shown}"
        if entry.problem:
            return f"{entry.path.name} cannot be used: {entry.problem}"
        return None


def _shown(names: list[str], more: str) -> str:
    """The first NAMES_SHOWN names, and how many more there are."""
    extra = more.format(len(names) - NAMES_SHOWN) if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + extra
