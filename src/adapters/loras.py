"""LoRA per request: the files in ``LORA_DIR``, loaded on first use, on for one job, off after it.

At startup ``scan_loras`` lists the folder's ``.safetensors`` files by name (the path
below the folder, without the extension) and reads each one's header only: a file
that is not a LoRA, or is a LyCORIS kind diffusers cannot load, or is cut short, is
listed as unusable. A request can name only listed files.

``Loras`` owns the LoRA state of the shared pipeline. A job's LoRAs are loaded
with diffusers' ``load_lora_weights`` (PEFT), switched on with their scales for
the job, and switched off in a ``finally`` under the GPU lock, so a job without
LoRA runs exactly the layers a worker that never loaded one runs. A loaded
adapter stays cached, off, while the cache fits ``LORA_CACHE_MB`` (least recently
used evicted); on a GPU the cached adapters wait in host memory and only the
job's are on the card, but with model offload (the ``low`` memory profile), which
moves each model whole, cached adapters and all: admission counts them. With
``FAST_MODE``'s compiled UNet, the UNet's adapters live in fixed slots whose
weights are hot-swapped, so a new LoRA does not recompile; see ``_Slots``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_safetensors

from src.adapters.folders import a1111_aliases, named_files
from src.errors import AdapterError, first_line
from src.models.safetensors_header import SafetensorsError, parse_header, read_header

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
# Key fragments of the LoRA layouts diffusers loads: kohya/A1111, PEFT, and diffusers' older attention processors.
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")
# LyCORIS and other network kinds diffusers' loader cannot read, by a key fragment each uses.
_UNSUPPORTED = {
    "hada_w1": "LyCORIS LoHa",
    "lokr_w1": "LyCORIS LoKr",
    "oft_": "OFT",
    "dora_scale": "DoRA",
    "lora_mid": "LyCORIS LoCon with a Tucker (CP) decomposition",
    ".diff": "a full weight difference (LyCORIS 'full')",
    "ia3": "IA3",
}
_SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.")
# kohya files that name the UNet's blocks as the original (LDM) code does; SDXL's do, and a few SD 1.5 ones.
_LDM_MARKERS = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")
# The pipeline's models a LoRA can have layers in.
MODELS = ("unet", "text_encoder")


class LoraRef(Protocol):
    """A LoRA a request names: the schema's ``LoraRequest`` (its ``name`` None for one by URL, until the
    prepare stage has downloaded it and named it by its key)."""

    @property
    def name(self) -> str | None: ...
    @property
    def scale(self) -> float: ...


@dataclass(frozen=True)
class LoraFile:
    """One ``.safetensors`` file of LORA_DIR, as its header describes it."""

    name: str
    path: Path
    # Values in the file (for its memory once loaded), in the layers it changes (whose weights a job
    # with it backs up), and its largest rank (for hot-swap slots).
    parameters: int
    rank: int
    layer_parameters: int = 0
    # Why it cannot be used, when it cannot; None for a LoRA diffusers can load.
    problem: str | None = None
    # The URL it was downloaded from (no query), for a LoRA a request named by URL.
    url: str | None = None
    # The name its kohya metadata gives it (``ss_output_name``), which A1111 takes as its alias.
    output_name: str | None = None


def scan_loras(folder: str | None) -> dict[str, LoraFile]:
    """Every ``.safetensors`` file under ``folder``, by name (``sub/name`` in a subfolder), checked by header.

    Raises:
        AdapterError: the folder does not exist.
    """
    if folder is None:
        return {}
    files = {name: describe_lora(name, path) for name, path in named_files(folder, "LORA_DIR", (LORA_SUFFIX,)).items()}
    files = dict(sorted(files.items()))
    usable = [item.name for item in files.values() if item.problem is None]
    log.info("LoRAs in %s: %d usable%s", folder, len(usable), f": {', '.join(usable)}" if usable else "")
    for item in files.values():
        if item.problem is not None:
            log.warning("LoRA %s (%s) cannot be used: %s", item.name, item.path, item.problem)
    return files


def lora_aliases(files: Mapping[str, LoraFile]) -> dict[str, str]:
    """A1111's names for LORA_DIR's LoRAs (``a1111_aliases``), from their names and their ``ss_output_name``."""
    return a1111_aliases({name: file.output_name for name, file in files.items()})


def describe_lora(name: str, path: Path, url: str | None = None) -> LoraFile:
    """The LoRA file at ``path`` as its header describes it, named ``name``; its ``problem`` says why it cannot
    be used, when it cannot."""
    try:
        header, _start = read_header(path)  # every tensor's entry checked: a dtype, a shape, two offsets
    except SafetensorsError as error:
        problem = str(error).removeprefix(f"{path}: ")
        return LoraFile(name, path, parameters=0, rank=0, problem=problem, url=url)
    except OSError as error:
        return LoraFile(name, path, parameters=0, rank=0, problem=f"it cannot be read: {error.strerror}", url=url)
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    metadata = header.get("__metadata__")
    output_name = metadata.get("ss_output_name") if isinstance(metadata, dict) else None
    parameters = sum(_numel(entry.get("shape", [])) for entry in tensors.values())
    ranks, layer_parameters = [], 0
    for key, entry in tensors.items():
        shape = entry.get("shape") or []
        if _rank_axis(key) == 0 and len(shape) >= 2:
            ranks.append(int(shape[0]))
            up = tensors.get(_up_key(key), {}).get("shape") or []
            # The layer's weight: (out, in, *kernel), from the up weight's out and the down weight's in and kernel.
            layer_parameters += (int(up[0]) if up else 0) * _numel(shape[1:])
    return LoraFile(
        name,
        path,
        parameters=parameters,
        rank=max(ranks, default=0),
        problem=_problem(list(tensors)),
        layer_parameters=layer_parameters,
        url=url,
        output_name=output_name if isinstance(output_name, str) and output_name.strip() else None,
    )


def _up_key(down_key: str) -> str:
    """The up (B) weight's name for a down (A) weight's, in each layout."""
    for down, up in (("lora_down", "lora_up"), ("lora_A", "lora_B"), ("lora.down", "lora.up")):
        if down in down_key:
            return down_key.replace(down, up)
    return down_key


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    return count


def _problem(keys: list[str]) -> str | None:
    """Why a file with these tensor names cannot be loaded as an SD 1.5 LoRA, or None."""
    for marker, kind in _UNSUPPORTED.items():
        if any(marker in key for key in keys):
            return f"it is {kind}, which diffusers' LoRA loader cannot read"
    if not any(marker in key for key in keys for marker in _LORA_MARKERS):
        example = f" (its first key is {keys[0]!r})" if keys else " (it holds no tensors)"
        return f"not a LoRA: none of its keys is a LoRA weight{example}"
    if any(marker in key for key in keys for marker in _SDXL_MARKERS):
        return "it is a LoRA for SDXL, not SD 1.5"
    if any(marker in key for key in keys for marker in _LDM_MARKERS):
        return (
            "its UNet layers have the original code's block names (input_blocks_...), which diffusers' SD 1.5 "
            "LoRA loader cannot read (SDXL LoRAs have them too)"
        )
    return None


def short_hash(data: bytes, data_start: int) -> str:
    """A1111's ``Lora hashes`` value for a safetensors file: the first 12 hex digits of the
    SHA-256 of its tensor data, the header left out (kohya's "addnet" hash, Civitai's AutoV3)."""
    return hashlib.sha256(memoryview(data)[data_start:]).hexdigest()[:12]


@dataclass
class _Adapter:
    """One LoRA loaded into the pipeline."""

    file: LoraFile
    # The adapter's name inside the models; LoRA names may hold "/" and ".", which PEFT's names may not.
    adapter: str
    short_hash: str
    # Bytes of its weights in the models, counted once loaded.
    size: int
    # Which models it has layers in: "unet", "text_encoder".
    models: frozenset[str]
    # With hot-swap slots: the UNet's part and its alphas, kept in memory and copied into a slot per job.
    unet_part: tuple[dict[str, torch.Tensor], dict[str, float] | None] | None = None


@dataclass(frozen=True)
class Applied:
    """The LoRAs one job runs with, as the metadata reports them."""

    name: str
    scale: float
    short_hash: str
    url: str | None = None


@dataclass
class _State:
    cached: OrderedDict[str, _Adapter] = field(default_factory=OrderedDict)
    loaded: int = 0


class Loras:
    """The LoRAs of LORA_DIR and the shared pipeline's LoRA state. Every method but ``gpu_bytes`` runs
    under the engine's GPU lock."""

    def __init__(
        self,
        pipeline: Any,
        files: dict[str, LoraFile],
        *,
        cache_bytes: int,
        offload_to: torch.device | None = None,
        slots: int = 0,
        merge: bool = True,
        offload: Callable[[], None] | None = None,
        cache_rides_along: bool = False,
    ) -> None:
        """``offload_to`` is the GPU whose cached adapters wait in host memory between jobs (None: no moves);
        ``cache_rides_along`` says that the cached adapters go to the GPU with their models in every job (model
        offload moves a model whole), so that ``gpu_bytes`` counts them.
        ``offload`` puts the memory profile's CPU offload (accelerate's hooks) on the pipeline; loading a
        LoRA takes the hooks off and calls it after, whatever happens (None: the profile has no offload).
        ``slots`` above 0 puts the UNet's LoRA layers in that many hot-swapped slots (``prepare_slots``).
        ``merge`` merges a job's LoRAs into the weights of the layers they change for the job (the
        layers' weights are copied first, and the copies put back after it); off, or with slots,
        PEFT's layers add the LoRAs at every step."""
        self.pipeline = pipeline
        self.files = files
        # A LoRA by A1111's names for it (``a1111_aliases``): the same file, loaded once.
        self.aliases = lora_aliases(files)
        # LoRAs requests named by URL, by key: added by the jobs that downloaded them (``add_downloaded``).
        self.downloaded: dict[str, LoraFile] = {}
        self.cache_bytes = cache_bytes
        self.offload_to = offload_to
        self._state = _State()
        self._slots = _Slots(pipeline.unet, slots) if slots else None
        self.merge = merge and self._slots is None
        self.offload = offload
        self.cache_rides_along = cache_rides_along
        self._merged = _Merged()

    def prepare_slots(self) -> None:
        """Give the UNet its hot-swap slots, before it is compiled: see ``_Slots``."""
        if self._slots is not None:
            usable = [item for item in self.files.values() if item.problem is None]
            self._slots.prepare(self.pipeline, usable)

    @property
    def has_slots(self) -> bool:
        return self.slot_count > 0

    @property
    def slot_count(self) -> int:
        return self._slots.count if self._slots is not None else 0

    @property
    def slot_shape(self) -> dict[str, Any]:
        """What the slots make of the UNet's graph, for the compiled kernels' cache key: count, rank, layers."""
        if self._slots is None or not self.files or not self.has_slots:
            return {"count": 0}
        layers = hashlib.sha256("\n".join(self._slots.layers).encode()).hexdigest()[:16]
        return {"count": self.slot_count, "rank": self._slots.rank, "layers": layers}

    @contextlib.contextmanager
    def first_slot_on(self) -> Iterator[None]:
        """Slot 0 on, holding zeros, for the ``with`` block: a warm-up then compiles the one-LoRA graph
        as well, and the images do not change."""
        from diffusers.utils.peft_utils import set_adapter_layers

        assert self._slots is not None
        self._slots.activate([self._slots.names[0]])
        try:
            yield
        finally:
            set_adapter_layers(self.pipeline.unet, enabled=False)

    @property
    def names(self) -> list[str]:
        return [name for name, item in self.files.items() if item.problem is None]

    @property
    def cached(self) -> list[str]:
        """The cached LoRAs' names, least recently used first."""
        return list(self._state.cached)

    def add_downloaded(self, key: str, file: LoraFile) -> None:
        """A LoRA a request named by URL, downloaded and checked, under ``key`` (which no request can name)."""
        self.downloaded = {**self.downloaded, key: file}

    def _file(self, name: str) -> LoraFile | None:
        return self.files.get(self.aliases.get(name, name)) or self.downloaded.get(name)

    def gpu_bytes(self, refs: Sequence[LoraRef], dtype_bytes: int) -> int:
        """The GPU memory a job's LoRAs take, for admission: their weights, the copies of the layers they change
        that merging keeps, and the other cached adapters when they ride along (``cache_rides_along``)."""
        files = [file for ref in refs if ref.name is not None and (file := self._file(ref.name)) is not None]
        backups = sum(item.layer_parameters for item in files) if self.merge else 0
        job = {self.aliases.get(ref.name, ref.name) for ref in refs if ref.name is not None}
        cached = self._state.cached.items()
        riding = sum(item.size for name, item in cached if name not in job) if self.cache_rides_along else 0
        return (sum(item.parameters for item in files) + backups) * dtype_bytes + riding

    @contextlib.contextmanager
    def applied(self, refs: Sequence[LoraRef]) -> Iterator[list[Applied]]:
        """The job's LoRAs on, with their scales, for the ``with`` block; off after it, whatever happens.

        Raises:
            AdapterError: a file cannot be loaded; the message names the field (``loras.N.name``), the file
                and why. The state is clean after.
        """
        if not refs:
            yield []
            return
        try:
            adapters = []
            for index, ref in enumerate(refs):
                assert ref.name is not None, "a LoRA by URL is named by its key once downloaded"
                try:
                    adapters.append(self._load(ref.name))
                except AdapterError as error:
                    file = self._file(ref.name)
                    where = f"url={file.url!r}" if file is not None and file.url else f"name={ref.name!r}"
                    raise AdapterError(f"loras.{index}.{where}: {error}") from None
            self._switch_on(adapters, [ref.scale for ref in refs])
            # Named as the job named them: the parameters' tags and hashes then read as the prompt's.
            yield [
                Applied(
                    ref.name if ref.name in self.aliases else item.file.name, ref.scale, item.short_hash, item.file.url
                )
                for ref, item in zip(refs, adapters, strict=True)
            ]
        finally:
            self._switch_off()
            self._evict()

    def _load(self, name: str) -> _Adapter:
        """The LoRA ``name`` (or A1111's name for it), from the cache or from its file."""
        name = self.aliases.get(name, name)
        cached = self._state.cached.get(name)
        if cached is not None:
            self._state.cached.move_to_end(name)
            return cached
        file = self._file(name)
        if file is None:
            raise AdapterError("not a LoRA of LORA_DIR, nor one downloaded for this job")
        if file.problem is not None:
            raise AdapterError(f"{file.path.name} cannot be used: {file.problem}")
        started = time.perf_counter()
        data, header, start, tensors = _read(file)
        # Before diffusers touches the models: a file whose layers do not fit them (a LoRA for SD 2.x) is
        # refused from its shapes alone.
        _refuse_misfit(self.pipeline, file, header)
        self._state.loaded += 1
        adapter = f"lora{self._state.loaded}"
        unet_part = None
        try:
            with _expected_noise_dropped(adapter), self._offload_lifted():
                if self._slots is None:
                    self.pipeline.load_lora_weights(tensors, adapter_name=adapter)
                else:
                    unet_part = self._slots.load_apart(self.pipeline, tensors, adapter)
        except Exception as error:  # noqa: BLE001 - whatever diffusers or PEFT raise, the file is refused by name
            _delete_adapter(self.pipeline, adapter)
            raise AdapterError(
                f"{file.path.name} cannot be loaded into this SD 1.5 model: {type(error).__name__}: {first_line(error)}"
            ) from None
        kept = unet_part[0] if unet_part else {}
        try:
            models = _models_taking_whole(self.pipeline, file, adapter, tensors, kept)
        except AdapterError:
            _delete_adapter(self.pipeline, adapter)
            raise
        size = _adapter_bytes(self.pipeline, adapter) + sum(
            tensor.numel() * tensor.element_size() for tensor in kept.values()
        )
        item = _Adapter(file, adapter, short_hash(data, start), size, models, unet_part)
        if self.offload_to is not None and self._state.cached:
            # diffusers' loader ends with the text encoder moved whole to its device: back to host memory, the others.
            self.pipeline.set_lora_device([other.adapter for other in self._state.cached.values()], "cpu")
        self._state.cached[name] = item
        log.info(
            "LoRA %s loaded (%s, %.1f MB) in %.2f s",
            name,
            " and ".join(sorted(models)),
            item.size / 1e6,
            time.perf_counter() - started,
        )
        return item

    @contextlib.contextmanager
    def _offload_lifted(self) -> Iterator[None]:
        """accelerate's offload hooks off the models for the ``with`` block, and the profile's offload back
        on after it, whatever happens.

        diffusers' loaders take the hooks off themselves, but put them back only after a load that
        succeeded: one that raised would leave the models without hooks, and every later job on the
        wrong device. With no hook found, they leave the offload to this.
        """
        if self.offload is None:
            yield
            return
        self.pipeline.remove_all_hooks()
        try:
            yield
        finally:
            self.offload()

    def _switch_on(self, adapters: list[_Adapter], scales: list[float]) -> None:
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        if self.offload_to is not None:
            self.pipeline.set_lora_device([item.adapter for item in adapters], self.offload_to)
        if self._slots is not None:
            self._slots.switch_on(self.pipeline, adapters, scales)
        for model_name in MODELS:
            if model_name == "unet" and self._slots is not None:
                continue
            model = getattr(self.pipeline, model_name)
            pairs = zip(adapters, scales, strict=True)
            chosen = [(item.adapter, scale) for item, scale in pairs if model_name in item.models]
            if chosen:
                names = [name for name, _ in chosen]
                set_weights_and_activate_adapters(model, names, [scale for _, scale in chosen])
                set_adapter_layers(model, enabled=True)
                if self.merge:
                    self._merged.merge(model, names)

    def _switch_off(self) -> None:
        """Every adapter layer off and every merged weight put back: the models compute as if no LoRA
        had been loaded."""
        from diffusers.utils.peft_utils import set_adapter_layers

        self._merged.unmerge()
        for model_name in MODELS:
            model = getattr(self.pipeline, model_name)
            if _adapter_names(model):
                set_adapter_layers(model, enabled=False)
        cached = [item.adapter for item in self._state.cached.values()]
        if self.offload_to is not None and cached:
            self.pipeline.set_lora_device(cached, "cpu")

    def _evict(self) -> None:
        """Drop the least recently used adapters until the cache fits LORA_CACHE_MB."""
        cached = self._state.cached
        while cached and sum(item.size for item in cached.values()) > self.cache_bytes:
            name, item = cached.popitem(last=False)
            _delete_adapter(self.pipeline, item.adapter)
            log.info("LoRA %s evicted from the cache (LORA_CACHE_MB)", name)


class _Merged:
    """The weights that merging a job's LoRAs changed, each with its copy from before the merge."""

    def __init__(self) -> None:
        self._backups: list[tuple[Any, torch.Tensor]] = []

    def merge(self, model: Any, names: list[str]) -> None:
        """Add the active LoRAs into the weights of the layers they change, after copying those weights.

        A merged layer costs nothing per step: at 512² on an H200, PEFT's unmerged layers made a
        job with one LoRA 1.8 times as long as a plain one (bench/results/gpu-lora-unmerged.md).
        A1111 merges LoRAs into the weights too.
        """
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                present = [name for name in names if name in module.lora_A]
                if present:
                    base: Any = module.get_base_layer()
                    self._backups.append((module, base.weight.detach().clone()))
                    module.merge(adapter_names=present)

    def unmerge(self) -> None:
        """Put back the weights as they were before the merge, bit for bit."""
        while self._backups:
            module, backup = self._backups.pop()
            module.get_base_layer().weight.data.copy_(backup)
            module.merged_adapters.clear()


def _read(file: LoraFile) -> tuple[bytes, dict[str, Any], int, dict[str, torch.Tensor]]:
    """The file's bytes, its header, the offset its tensor data starts at, and its tensors.

    Raises:
        AdapterError: it cannot be read.
    """
    try:
        data = file.path.read_bytes()
        header, start = parse_header(data, len(data), file.path)
        tensors = load_safetensors(data)
    except (AdapterError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{file.path.name} cannot be read: {first_line(error)}") from None
    return data, header, start, _alphas_folded(tensors)


# Each layout's down and up weights, under the name the layer's ``.alpha`` key shares with them.
_PAIRS = (
    ("lora_down.weight", "lora_up.weight"),
    ("lora_A.weight", "lora_B.weight"),
    ("lora.down.weight", "lora.up.weight"),
)


def _alphas_folded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each layer's ``alpha / rank`` multiplied into its up weight and its ``.alpha`` key dropped.

    A1111 scales each layer by its own alpha / rank (its ``NetworkModule.calc_scale``). diffusers hands the alphas
    to PEFT by names that miss the attention and text-encoder layers (``...processor.to_q_lora...``), which then
    take the file's most common alpha: a LoRA whose alpha varies by layer (kohya's resized, dynamic-rank files)
    came out too strong or too weak there. Folded, every layer has its own scale and PEFT applies 1.
    """
    folded = dict(tensors)
    for key in [key for key in tensors if key.endswith(".alpha")]:
        stem = key.removesuffix("alpha")
        for down_name, up_name in _PAIRS:
            down, up = tensors.get(stem + down_name), tensors.get(stem + up_name)
            if down is not None and up is not None and down.ndim >= 2 and tensors[key].numel() == 1:
                scale = float(tensors[key]) / down.shape[0]
                folded[stem + up_name] = (up.float() * scale).to(up.dtype)
                del folded[key]
                break
    return folded


def _refuse_misfit(pipeline: Any, file: LoraFile, header: dict[str, Any]) -> None:
    """Refuse ``file`` when its layers, by their shapes in its header, do not fit the pipeline's.

    Raises:
        AdapterError: they do not fit, or cannot be read.
    """
    try:
        misfit = _misfit(pipeline, _lora_shapes(pipeline, header))
    except Exception as error:  # noqa: BLE001 - diffusers' conversion of the names refuses the file by name
        misfit = f"its layers cannot be read ({type(error).__name__}: {first_line(error)})"
    if misfit is not None:
        raise AdapterError(
            f"{file.path.name} cannot be loaded into this SD 1.5 model: {misfit}; "
            "is it a LoRA for another model (SDXL, SD 2.x)?"
        )


def _models_taking_whole(
    pipeline: Any, file: LoraFile, adapter: str, tensors: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]
) -> frozenset[str]:
    """The models that took ``adapter``, just loaded from ``file``; ``kept`` is its UNet part that waits for a
    hot-swap slot.

    Raises:
        AdapterError: it matches no layer, or some of its layers match none; the caller deletes it.
    """
    models = frozenset(model for model in MODELS if adapter in _adapter_names(getattr(pipeline, model)))
    if kept:
        models |= {"unet"}
    if not models:
        raise AdapterError(
            f"{file.path.name} matches no layer of this SD 1.5 model; is it a LoRA for another model (SDXL, SD 2.x)?"
        )
    layers = _layer_count(pipeline, adapter) + sum(1 for key in kept if _rank_axis(key) == 0)
    in_file = sum(1 for key in tensors if _rank_axis(key) == 0)
    if layers < in_file:
        # diffusers skips what it cannot place with a warning at most: a LoRA applied in part is not
        # what was asked for.
        raise AdapterError(
            f"{file.path.name} cannot be used whole: {in_file - layers} of its {in_file} "
            "layers match no layer of this model that diffusers can load them into (layers of another "
            "model, or of a kind diffusers does not map)"
        )
    return models


def _delete_adapter(pipeline: Any, adapter: str) -> None:
    from diffusers.utils.peft_utils import delete_adapter_layers

    for model_name in MODELS:
        model = getattr(pipeline, model_name)
        if adapter in _adapter_names(model):
            with warnings.catch_warnings():
                # PEFT says so when the adapter it deletes was the active one: it is off, and goes.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                delete_adapter_layers(model, adapter)
            # transformers' models drop the name themselves; diffusers' keep it in their config.
            getattr(model, "peft_config", {}).pop(adapter, None)


def _layer_count(pipeline: Any, adapter: str) -> int:
    """How many layers of the models took the adapter."""
    return sum(
        1
        for model_name in MODELS
        for module in getattr(pipeline, model_name).modules()
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and adapter in module.lora_A
    )


def _adapter_bytes(pipeline: Any, adapter: str) -> int:
    """Bytes of the adapter's weights, in every model it is in."""
    total = 0
    for model_name in MODELS:
        for module in getattr(pipeline, model_name).modules():
            for table_name in ("lora_A", "lora_B"):
                table = getattr(module, table_name, None)
                if isinstance(table, torch.nn.ModuleDict) and adapter in table:
                    total += sum(p.numel() * p.element_size() for p in table[adapter].parameters())
    return total


class _ExpectedNoiseFilter(logging.Filter):
    """Drops what loading one more adapter always logs: diffusers' note that a LoRA has no
    text-encoder layers (most are UNet-only, and the worker checks itself that a LoRA matches
    some layer), and transformers' load report listing the other adapters' weights as missing
    (it counts every key holding "lora" as this adapter's). A report naming ``adapter`` passes."""

    def __init__(self, adapter: str) -> None:
        super().__init__()
        self.adapter = f".{adapter}."

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("No LoRA keys associated to"):
            return False
        return not ("LOAD REPORT" in message and self.adapter not in message)


_NOISY_LOGGERS = ("diffusers.loaders.lora_base", "transformers.integrations.peft")


@contextlib.contextmanager
def _expected_noise_dropped(adapter: str) -> Iterator[None]:
    """Loading one more adapter is what the cache does; what every such load logs would be noise."""
    quiet = _ExpectedNoiseFilter(adapter)
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            # diffusers deletes an adapter that failed to load; the worker refuses the file itself.
            warnings.filterwarnings(
                "ignore", message="Adapter .* was active which is now deleted", category=UserWarning
            )
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _Slots:
    """The UNet's LoRA layers for a compiled UNet (FAST_MODE): a fixed set of adapters whose weights change.

    Adding or removing an adapter changes the UNet's modules and makes torch.compile compile it
    again. So, before compiling, the UNet gets ``count`` slot adapters covering every layer any
    LoRA of the folder touches, at the folder's largest rank, with their scalings held in tensors
    (PEFT's ``prepare_model_for_compiled_hotswap``). A job's LoRA i is hot-swapped into slot i
    (diffusers' ``hotswap=True``), and its scale is written into the scaling tensors in place,
    so neither a new LoRA nor a new scale recompiles. A job with n LoRAs runs slots 0 to n-1:
    each n compiles once, the first time it is seen. A LoRA that touches a layer no slot has, or
    whose alphas vary by layer differently from the slot's, cannot be hot-swapped: its slot is
    made again for it, and the UNet compiles again (said in the log).
    """

    def __init__(self, unet: Any, count: int) -> None:
        self.unet = unet
        self.count = count
        self.names = [f"slot{index}" for index in range(count)]
        # Which LoRA's weights each slot holds now, by adapter name, and each layer's scaling for scale 1.
        self.holds: list[str | None] = [None] * count
        self.unit_scaling: list[dict[str, float]] = [{} for _ in range(count)]
        self.rank = 1
        self.layers: list[str] = []

    def prepare(self, pipeline: Any, files: list[LoraFile]) -> None:
        """Make the slots: zero LoRAs on the union of the folder's UNet layers, padded to its largest rank."""
        from diffusers.utils.peft_utils import set_adapter_layers
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                found = {
                    key: shape
                    for key, shape in _lora_shapes(pipeline, read_header(file.path)[0]).items()
                    if key.startswith("unet.")
                }
                misfit = _misfit(pipeline, found)
            except Exception as error:  # noqa: BLE001 - that LoRA's slot will be made for it when it is used
                misfit = f"its layers cannot be read ({first_line(error)})"
            if misfit is None:
                shapes.update(found)
            else:
                log.warning("LoRA %s is left out of the hot-swap slots: %s", file.name, misfit)
        if not shapes:
            self.count = 0
            return
        self.rank = max(max((item.rank for item in files), default=1), 1)
        self.layers = sorted(shapes)
        prototype = {key: torch.zeros(shape, dtype=self.unet.dtype) for key, shape in shapes.items()}
        for name in self.names:
            with _expected_noise_dropped(name):
                pipeline.load_lora_into_unet(prototype, None, self.unet, adapter_name=name, _pipeline=pipeline)
        prepare_model_for_compiled_hotswap(self.unet, target_rank=self.rank, check_compiled="ignore")
        # Off until a job turns slots on: the warm-up then compiles the graph that plain jobs run.
        set_adapter_layers(self.unet, enabled=False)
        log.info("LoRA hot-swap: %d UNet slots of rank %d on %d layers", self.count, self.rank, len(shapes) // 2)

    @staticmethod
    def load_apart(
        pipeline: Any, tensors: dict[str, torch.Tensor], adapter: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, float] | None] | None:
        """Load the text encoder's part as ``adapter``; return the UNet's part and alphas, for the slots."""
        state, alphas = pipeline.lora_state_dict(tensors)
        dtype = pipeline.unet.dtype  # a walk over every parameter: once, not once per key
        parts = {}
        for prefix in ("unet.", "text_encoder."):
            part_alphas = {key: value for key, value in (alphas or {}).items() if key.startswith(prefix)}
            parts[prefix] = (
                # Copies: the file's tensors are views into its bytes, which need not be aligned.
                {key: value.to(dtype, copy=True) for key, value in state.items() if key.startswith(prefix)},
                part_alphas or None,
            )
        text_state, text_alphas = parts["text_encoder."]
        if text_state:
            pipeline.load_lora_into_text_encoder(
                text_state, text_alphas, pipeline.text_encoder, adapter_name=adapter, _pipeline=pipeline
            )
        return parts["unet."] if parts["unet."][0] else None

    def switch_on(self, pipeline: Any, adapters: list[_Adapter], scales: list[float]) -> None:
        """The job's LoRAs into slots 0, 1, ... (hot-swapped where they are not there yet), at their scales."""
        active: list[str] = []
        for item, scale in zip(adapters, scales, strict=True):
            if not item.unet_part:
                continue
            slot = len(active)
            if self.holds[slot] != item.adapter:
                self._fill(pipeline, slot, item)
            self._scale(slot, scale)
            active.append(self.names[slot])
        if active:
            self.activate(active)

    def activate(self, names: list[str]) -> None:
        """Only the slots ``names`` on."""
        from diffusers.utils.peft_utils import set_adapter_layers

        for module in self.unet.modules():
            if hasattr(module, "set_adapter") and hasattr(module, "scaling"):
                module.set_adapter(names)
        set_adapter_layers(self.unet, enabled=True)

    def _fill(self, pipeline: Any, slot: int, item: _Adapter) -> None:
        assert item.unet_part is not None
        name = self.names[slot]
        state, alphas = item.unet_part
        try:
            pipeline.load_lora_into_unet(state, alphas, self.unet, adapter_name=name, _pipeline=pipeline, hotswap=True)
        except Exception as error:  # noqa: BLE001 - the slot is made again for this LoRA, which recompiles
            from peft.utils.hotswap import prepare_model_for_compiled_hotswap

            log.warning(
                "LoRA %s cannot be hot-swapped into %s (%s); the slot is made again for it, and the compiled "
                "UNet compiles again",
                item.file.name,
                name,
                first_line(error),
            )
            self.unet.delete_adapters(name)
            with _expected_noise_dropped(name):
                pipeline.load_lora_into_unet(state, alphas, self.unet, adapter_name=name, _pipeline=pipeline)
            prepare_model_for_compiled_hotswap(self.unet, target_rank=self.rank, check_compiled="ignore")
        self.holds[slot] = item.adapter
        self.unit_scaling[slot] = {
            module_name: float(module.scaling[name])
            for module_name, module in self.unet.named_modules()
            if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling
        }

    def _scale(self, slot: int, scale: float) -> None:
        """Each layer's scaling of ``slot`` = its scale-1 value x ``scale``, written in place."""
        name = self.names[slot]
        unit = self.unit_scaling[slot]
        for module_name, module in self.unet.named_modules():
            if module_name in unit:
                value = module.scaling[name]
                if isinstance(value, torch.Tensor):
                    value.fill_(unit[module_name] * scale)
                else:
                    module.scaling[name] = unit[module_name] * scale


def _lora_shapes(pipeline: Any, header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The layers a LoRA file touches, by its header: diffusers' names for its weights (``unet.`` and
    ``text_encoder.``), each with its shape but a rank of 1, so that no value of the file is needed."""
    stand_in = {
        key: torch.zeros([1 if index == _rank_axis(key) else int(side) for index, side in enumerate(entry["shape"])])
        for key, entry in header.items()
        if key != "__metadata__"
    }
    state, _alphas = pipeline.lora_state_dict(stand_in)
    return {key: tuple(value.shape) for key, value in state.items()}


def _misfit(pipeline: Any, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why LoRA weights of these shapes (``_lora_shapes``) do not fit the layers of the pipeline's UNet
    and text encoder, or None when they do."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    def part(prefix: str) -> dict[str, tuple[int, ...]]:
        return {key.removeprefix(prefix): shape for key, shape in shapes.items() if key.startswith(prefix)}

    # In PEFT's names, converted as diffusers converts them to load them: "...attn1.processor.to_k_lora.down"
    # is "...attn1.to_k.lora_A".
    models = [("unet", pipeline.unet, convert_unet_state_dict_to_peft(part("unet.")))]
    text = part("text_encoder.")
    if text:
        text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
        if not hasattr(pipeline.text_encoder, "text_model"):
            # transformers 5's CLIPTextModel has no text_model level; diffusers drops it from the names.
            text = {key.removeprefix("text_model."): shape for key, shape in text.items()}
        models.append(("text_encoder", pipeline.text_encoder, text))
    for model_name, model, weights in models:
        for key, shape in weights.items():
            axis = _rank_axis(key)
            if axis is None:
                continue
            module_name = key.split(".lora")[0]
            try:
                weight = getattr(model.get_submodule(module_name), "weight", None)
            except AttributeError:
                return f"the {model_name} has no layer {module_name}"
            if weight is None:
                return f"{model_name}.{module_name} has no weight"
            # The down weight takes the layer's input (and kernel), the up weight gives its output.
            side, lora_side, layer_side = (
                ("input", shape[1:], weight.shape[1:]) if axis == 0 else ("output", shape[:1], weight.shape[:1])
            )
            if tuple(lora_side) != tuple(layer_side):
                return (
                    f"{model_name}.{key} is for a layer of {side} {_dims(lora_side)}, "
                    f"and the layer's {side} is {_dims(layer_side)}"
                )
    return None


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(side)) for side in shape)


def _rank_axis(key: str) -> int | None:
    """Which axis of a LoRA weight is its rank: 0 for the down (A) weight, 1 for the up (B) weight."""
    if any(marker in key for marker in ("lora_down", "lora_A", "lora.down", "lora_linear_layer.down")):
        return 0
    if any(marker in key for marker in ("lora_up", "lora_B", "lora.up", "lora_linear_layer.up")):
        return 1
    return None


def _adapter_names(model: Any) -> set[str]:
    return set(getattr(model, "peft_config", None) or {})
