"""ControlNet per request: the models in ``CONTROLNET_DIR``, loaded on first use, kept while they fit, one job's units.

At startup ``scan_controlnets`` lists the folder: each diffusers ControlNet folder (with
a ``config.json``) and each single ``.safetensors`` file, named by its folder or file name
without the extension. A file is judged from its header before any weight is read, and
its shapes, converted as diffusers converts them, must be those of a ControlNet for this
pipeline's UNet; anything else is listed as unusable, and a request naming it is refused
saying what it looks like.

``ControlNets`` owns the loaded models. A job's units become a per-request
``MultiControlNetModel`` of thin wrappers (``_Unit``) around the shared models: the
wrapper carries the unit's control mode, so no per-request state ever sits on a shared
model. Loaded models stay on the GPU while they fit ``CONTROLNET_CACHE_MB``; the least
recently used goes back to host memory, where as much again is kept, and then is dropped.
With model offload (the small-card profiles) they wait in host memory and visit the GPU
for their job only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from src.errors import AdapterError, first_line
from src.models.checkpoints import PICKLE_SUFFIXES, looks_like
from src.models.safetensors_header import SafetensorsError, read_header, tensor_shapes

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# The prefix of a ControlNet's tensors in the original checkpoints (control_v11p_sd15_*); some files have none.
LDM_PREFIX = "control_model."
# What marks a file as a ControlNet: its hint encoder and its zero convolutions.
_MARKERS = ("input_hint_block.0.weight", "zero_convs.0.0.weight")
# The weights diffusers writes into a ControlNet folder, plain or as the fp16 variant.
_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


class ControlNetRef(Protocol):
    """What ``ControlNets`` reads of a request's unit (``schema.ControlNetUnit``)."""

    @property
    def model(self) -> str: ...
    @property
    def control_mode(self) -> str: ...


@dataclass(frozen=True)
class ControlNetEntry:
    """One model of CONTROLNET_DIR: a diffusers folder or a single file, and why it cannot be used, if so."""

    name: str
    path: Path
    problem: str | None = None
    # A single .safetensors file; otherwise a diffusers folder.
    single_file: bool = True


def scan_controlnets(folder: str | None) -> dict[str, ControlNetEntry]:
    """The ControlNets of ``folder`` by name, judged by their names alone; ``ControlNets`` checks their shapes.

    Raises:
        AdapterError: the folder does not exist.
    """
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise AdapterError(f"CONTROLNET_DIR={folder}: not a folder")
    entries: dict[str, ControlNetEntry] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if (path / "config.json").is_file():
                entries[path.name] = ControlNetEntry(path.name, path, _folder_problem(path), single_file=False)
            continue
        suffix = path.suffix.lower()
        if suffix == SUFFIX:
            clash = "a folder and a file share this name; rename one" if path.stem in entries else None
            entries[path.stem] = ControlNetEntry(path.stem, path, clash)
        elif suffix in PICKLE_SUFFIXES:
            problem = (
                f"a pickle ({suffix}), which is never opened; convert it to .safetensors (README: Your own checkpoint)"
            )
            entries.setdefault(path.stem, ControlNetEntry(path.stem, path, problem))
    for entry in entries.values():
        if entry.problem:
            log.warning("CONTROLNET_DIR: %s (%s) cannot be used: %s", entry.name, entry.path.name, entry.problem)
    # By name, as the LoRA line lists them, so that the log says what a request can name.
    names = f": {', '.join(sorted(entries))}" if entries else ""
    log.info("CONTROLNET_DIR=%s: %d ControlNets%s", folder, len(entries), names)
    return entries


def _folder_problem(path: Path) -> str | None:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its config.json cannot be read"
    if config.get("_class_name") != "ControlNetModel":
        return f"its config.json is a {config.get('_class_name', 'model of no class')}'s, not a ControlNetModel's"
    weights = [path / name for name in _FOLDER_WEIGHTS if (path / name).is_file()]
    if not weights:
        return "it holds no diffusion_pytorch_model.safetensors (a .bin is a pickle, never opened)"
    try:
        read_header(weights[0])
    except SafetensorsError as error:
        return f"{weights[0].name}: {str(error).removeprefix(f'{weights[0]}: ')}"
    return None


class ControlNets:
    """The loaded ControlNets of one pipeline, their cache, and one job's units."""

    def __init__(
        self,
        pipeline: Any,
        entries: dict[str, ControlNetEntry],
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_bytes: int,
        offload: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.dtype = dtype
        self.cache_bytes = cache_bytes
        # With model offload (or on the CPU) the models wait in host memory and only a job's visit the GPU.
        self.resident_on_device = device.type == "cuda" and not offload
        # Loaded models, least recently used first.
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        # Loaded models a job sent to host memory to make room (``to_host``), until a job uses them again.
        self._made_room: set[str] = set()
        self.entries = {name: self._checked(entry) for name, entry in entries.items()} if entries else {}

    # --- the folder ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def _checked(self, entry: ControlNetEntry) -> ControlNetEntry:
        """``entry`` with a problem when its shapes are not those of a ControlNet for this pipeline's UNet."""
        if entry.problem:
            return entry
        try:
            if entry.single_file:
                problem = _file_problem(entry.path, self._expected_shapes)
            else:
                problem = self._folder_misfit(entry)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"cannot be read ({type(error).__name__}: {first_line(error)})"
        if problem:
            log.warning("CONTROLNET_DIR: %s (%s) cannot be used: %s", entry.name, entry.path.name, problem)
        return replace(entry, problem=problem)

    @functools.cached_property
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of a ControlNet built from this pipeline's UNet, worked out without memory."""
        from accelerate import init_empty_weights
        from diffusers import ControlNetModel

        with init_empty_weights():
            model = ControlNetModel.from_unet(self.pipeline.unet, load_weights_from_unet=False)
        return {key: tuple(value.shape) for key, value in model.state_dict().items()}

    def _folder_misfit(self, entry: ControlNetEntry) -> str | None:
        from accelerate import init_empty_weights
        from diffusers import ControlNetModel

        with init_empty_weights():
            model = ControlNetModel.from_config(ControlNetModel.load_config(entry.path))
        return _misfit({key: tuple(value.shape) for key, value in model.state_dict().items()}, self._expected_shapes)

    # --- loading and the cache ----------------------------------------------------------------

    def preload(self, names: Sequence[str]) -> None:
        """Load these ControlNets now (CONTROLNET_PRELOAD), as a first use would.

        Raises:
            AdapterError: a name is not a usable ControlNet of CONTROLNET_DIR.
        """
        from src.adapters.catalog import Catalog  # the catalog names these entries' type: imported here

        catalog = Catalog(controlnets=self.entries)
        problems = [
            f"CONTROLNET_PRELOAD: {name!r}: {problem}"
            for name in names
            if (problem := catalog.controlnet_problem(name))
        ]
        if problems:
            raise AdapterError("; ".join(problems))
        for name in names:
            self._get(name)
        self._settle()

    def gpu_bytes(self, units: Sequence[ControlNetRef], *, cached: bool = True) -> int:
        """GPU memory the ControlNets take during a job with ``units``: the job's own, and with ``cached`` those
        the cache keeps there."""
        if self.device.type != "cuda":
            return 0
        job = {unit.model for unit in units}
        resident = set(self._loaded) - self._made_room if self.resident_on_device and cached else set()
        return sum(self._bytes_of(name) for name in job | resident)

    def to_host(self, units: Sequence[ControlNetRef]) -> None:
        """Move the cached ControlNets that ``units`` do not use to host memory, to make room for a job that would
        not fit beside them; they wait there until a job uses one again. Under the GPU lock."""
        job = {unit.model for unit in units}
        for name, net in self._loaded.items():
            if name not in job:
                _move(net, torch.device("cpu"))
                self._made_room.add(name)

    @contextlib.contextmanager
    def for_job(self, units: Sequence[ControlNetRef], *, guidance: bool) -> Iterator[Any]:
        """The job's units as one ``MultiControlNetModel`` on the device; None without units.

        After the job, however it ends, the cache is brought back within its budget. ``guidance``
        says whether the pipeline runs classifier-free guidance (its batch holds the negative half).
        """
        if not units:
            yield None
            return
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        names = {unit.model for unit in units}
        self._made_room -= names  # back on the device for this job, and kept there by the cache's rule
        try:
            nets = {name: self._get(name) for name in names}
            for net in nets.values():
                _move(net, self.device)
            yield MultiControlNetModel([_Unit(nets[unit.model], unit.control_mode, guidance) for unit in units])
        finally:
            self._settle()

    def _get(self, name: str) -> Any:
        """The loaded model ``name``, now the most recently used; loaded from disk on first use."""
        net = self._loaded.pop(name, None)
        if net is None:
            started = time.perf_counter()
            net = self._load(self.entries[name])
            log.info("loaded ControlNet %s in %.2f s", name, time.perf_counter() - started)
        self._loaded[name] = net
        return net

    def _load(self, entry: ControlNetEntry) -> Any:
        from diffusers import ControlNetModel

        try:
            if not entry.single_file:
                variant = "fp16" if not (entry.path / _FOLDER_WEIGHTS[0]).is_file() else None
                return ControlNetModel.from_pretrained(
                    entry.path, dtype=self.dtype, variant=variant, local_files_only=True, use_safetensors=True
                ).eval()
            from accelerate import init_empty_weights
            from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
            from safetensors.torch import load_file

            # Built without memory and given the file's tensors as they are: no random initialisation to
            # overwrite, no second copy.
            with init_empty_weights():
                net = ControlNetModel.from_unet(self.pipeline.unet, load_weights_from_unet=False)
            state = convert_controlnet_checkpoint(load_file(str(entry.path)), net.config)
            net.load_state_dict(state, strict=True, assign=True)
            return torch.nn.Module.to(net, dtype=self.dtype).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise AdapterError(
                f"ControlNet {entry.name!r} ({entry.path.name}) cannot be loaded: {type(error).__name__}: "
                f"{first_line(error)}"
            ) from None

    def _settle(self) -> None:
        """Keep the most recently used models on the device within the budget, the next in host memory within
        as much again, and drop the rest."""
        on_device, in_host = 0, 0
        for name in reversed(self._loaded):
            size = self._bytes_of(name)
            # One sent to host memory to make room waits there until a job uses it.
            if self.resident_on_device and name not in self._made_room and on_device + size <= self.cache_bytes:
                on_device += size
                _move(self._loaded[name], self.device)  # a job's are there already; CONTROLNET_PRELOAD's are not
                continue
            if in_host + size <= self.cache_bytes:
                in_host += size
                _move(self._loaded[name], torch.device("cpu"))
                continue
            log.info("ControlNet %s dropped from the cache", name)
            del self._loaded[name]
            self._made_room.discard(name)

    def _bytes_of(self, name: str) -> int:
        net = self._loaded.get(name)
        if net is not None:
            return sum(parameter.numel() * parameter.element_size() for parameter in net.parameters())
        return sum(_numel(shape) for shape in self._expected_shapes.values()) * self.dtype.itemsize

    @property
    def loaded(self) -> list[str]:
        """The names of the loaded models, least recently used first."""
        return list(self._loaded)


class _Unit(torch.nn.Module):
    """One unit of a job: a shared ControlNet and the unit's control mode, for this request only.

    ``prompt`` and ``controlnet`` (A1111's "My prompt is more important" and "ControlNet is
    more important") scale the ControlNet's outputs from 0.1 at the UNet's outer layers to 1
    in the middle, as diffusers' guess mode does inside the model; ``controlnet`` also leaves
    the negative half of guidance without control, as diffusers' guess mode does in its pipeline.
    """

    def __init__(self, net: Any, control_mode: str, guidance: bool) -> None:
        super().__init__()
        self.net = net
        self.control_mode = control_mode
        self.guidance = guidance
        # The last cross-attention mask read, and its rows' lengths (``_each_text_alone``).
        self._read: tuple[torch.Tensor, list[int]] | None = None

    @property
    def config(self) -> Any:
        return self.net.config

    def forward(
        self,
        *args: Any,
        guess_mode: bool = False,
        return_dict: bool = True,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        soft = guess_mode or self.control_mode != "balanced"
        if encoder_attention_mask is None:
            down, mid = self.net(*args, guess_mode=soft, return_dict=False, **kwargs)
        else:
            assert not args, "diffusers calls each ControlNet of a MultiControlNetModel by keyword"
            down, mid = self._each_text_alone(encoder_attention_mask, guess_mode=soft, **kwargs)
        # In diffusers' guess mode (a ControlNet whose config pools its conditions) the pipeline gives it the
        # prompt's rows alone: there is no negative half to leave without control.
        if self.control_mode == "controlnet" and self.guidance and not guess_mode:
            half = mid.shape[0] // 2
            down = [torch.cat([torch.zeros_like(sample[:half]), sample[half:]]) for sample in down]
            mid = torch.cat([torch.zeros_like(mid[:half]), mid[half:]])
        return down, mid

    def _each_text_alone(self, mask: torch.Tensor, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet on the rows of each length of text apart, each row reading its own tokens (``mask``'s
        ones, from the first; ``src.run.cross_attention``), as A1111 runs its ControlNet in each of its two calls:
        diffusers' ControlNetModel takes no mask for its cross-attention."""
        # A pass's mask is one tensor (``KeyMask`` keeps it): read on the host once, not at each step's call.
        if self._read is None or self._read[0] is not mask:
            self._read = (mask, [int(length) for length in mask.sum(dim=1).tolist()])
        lengths = self._read[1]
        batch = len(lengths)
        down: list[torch.Tensor] = []
        mid = torch.empty(0)
        for length in dict.fromkeys(lengths):
            rows = torch.tensor([row for row, own in enumerate(lengths) if own == length], device=mask.device)
            part = {
                name: value.index_select(0, rows) if _per_row(value, batch) else value for name, value in kwargs.items()
            }
            part["encoder_hidden_states"] = part["encoder_hidden_states"][:, :length]
            part_down, part_mid = self.net(**part, return_dict=False)
            if not down:
                down = [sample.new_zeros((batch, *sample.shape[1:])) for sample in part_down]
                mid = part_mid.new_zeros((batch, *part_mid.shape[1:]))
            for whole, sample in zip([*down, mid], [*part_down, part_mid], strict=True):
                whole.index_copy_(0, rows, sample)
        return down, mid


def _per_row(value: Any, batch: int) -> bool:
    """Whether ``value`` is a tensor of one entry per row of a batch of ``batch``."""
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch


def _file_problem(path: Path, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a single file is not a ControlNet of the expected shapes, from its header; None when it is one."""
    try:
        header, _start = read_header(path)
    except SafetensorsError as error:
        return str(error).removeprefix(f"{path}: ")
    shapes = tensor_shapes(header)
    own = {key.removeprefix(LDM_PREFIX): shape for key, shape in shapes.items()}
    kind = _kind_problem(shapes, own)
    if kind is not None:
        return kind
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    stand_in = {key: torch.empty(shape, device="meta") for key, shape in own.items()}
    try:
        converted = convert_controlnet_checkpoint(stand_in, {"layers_per_block": 2, **_layers_per_block(own)})
    except (KeyError, IndexError, RuntimeError, ValueError) as error:
        return f"its tensors do not follow a ControlNet's layout ({type(error).__name__}: {first_line(error)})"
    return _misfit({key: tuple(value.shape) for key, value in converted.items()}, expected)


def _kind_problem(shapes: dict[str, tuple[int, ...]], own: dict[str, tuple[int, ...]]) -> str | None:
    """What the file is when it is not an SD 1.5 ControlNet, from its tensor names; None when it looks like one."""
    if not all(marker in own for marker in _MARKERS):
        kind = looks_like(shapes)
        if kind is None:
            return "a base SD 1.5 checkpoint (model.diffusion_model.*), not a ControlNet; it goes in MODEL_ID"
        return f"not a ControlNet: {kind}"
    cross = own.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if any(key.startswith("label_emb.") for key in own) or (cross and cross[-1] == 2048):
        return "an SDXL ControlNet (label_emb, cross-attention 2048 wide); this worker serves SD 1.5"
    if cross and cross[-1] == 1024:
        return "an SD 2.x ControlNet (cross-attention 1024 wide); this worker serves SD 1.5"
    return None


def _layers_per_block(own: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The UNet's layers per block, from where the first downsampler sits (input_blocks.{layers + 1}.0.op)."""
    for index in range(1, 12):
        if f"input_blocks.{index}.0.op.weight" in own:
            return {"layers_per_block": index - 1}
    return {}


def _misfit(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    missing = [key for key in expected if key not in found]
    wrong = [key for key in expected if key in found and found[key] != expected[key]]
    if missing:
        return f"not shaped as this pipeline's ControlNets: it lacks {len(missing)} tensors, such as {missing[0]}"
    if wrong:
        key = wrong[0]
        return (
            f"not shaped as this pipeline's ControlNets: {len(wrong)} tensors differ, such as {key}: "
            f"{list(found[key])} here, {list(expected[key])} for this UNet"
        )
    return None


def _move(net: Any, device: torch.device) -> None:
    if next(net.parameters()).device != device:
        torch.nn.Module.to(net, device=device)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    return count
