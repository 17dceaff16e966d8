"""Stage 2 of a job, under the GPU lock: the warm pipeline, loaded once, and the guard rails around a job.

``Engine.run`` takes a ``JobPlan`` from ``prepare`` and returns its pictures. Around the pipeline calls
(``pipelines``) it keeps a job from hurting the worker: admission by estimated memory (sub-batches, or a
refusal before any work), one job on the GPU at a time, a deadline from the moment the job gets the GPU,
the job's adapters on for the job only, one frugal retry after an out-of-memory error, and progress.

Each image gets its own CPU ``torch.Generator`` seeded with its own seed, so a seed (with its variation seed)
means the same image on every device and image i of a batch can be regenerated alone. It may import
everything before it in the stages (errors, settings, schema, models, prompts, adapters, prepare), never
``finish``.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from src.adapters.catalog import Catalog
from src.adapters.controlnets import ControlNets
from src.adapters.embeddings import Embedding
from src.adapters.loras import Applied, LoraFile, Loras
from src.adapters.upscalers import upscalers_from
from src.errors import AdmissionError, JobCancelledError, OutOfMemoryError
from src.models.loader import ModelIdentity, named_identity
from src.prepare import JobPlan, plan_job
from src.prepare.canvas import ControlMaps, TaskImages
from src.prepare.inputs import Inputs
from src.prompts.syntax import CHUNK_TOKENS, TextPlan
from src.run import fast_path, pipelines
from src.run.compile_cache import CompileCache
from src.run.job import JobState, ProgressCallback
from src.run.memory import GIB, Plan, Profile, plan_sub_batch
from src.run.models import Models
from src.run.phases import Phases
from src.run.startup import apply_offload, load_parts, models_offloaded_after
from src.schema import GenerateRequest, InputError, ModelDownload
from src.settings import Settings

__all__ = ["Engine", "Generation", "apply_offload", "is_out_of_memory"]

log = logging.getLogger(__name__)

# How often a job waiting for the GPU looks whether it was cancelled, in seconds.
_CANCEL_POLL_S = 0.2


@dataclass(frozen=True)
class Generation:
    """What one job produced, before encoding, and what produced it."""

    images: list[Image.Image]
    seeds: list[int]
    inference_ms: float
    # The model, as responses and image parameters name it; the device, dtype and memory profile it ran on.
    model: ModelIdentity
    device: str
    dtype: str
    memory_profile: str
    # Time spent waiting for the GPU while another job held it.
    queue_ms: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # One flag per image when the safety checker is on; None when it is off.
    nsfw: list[bool] | None = None
    # {"prompt": {"tokens", "chunks"}, "negative_prompt": {...}}: what CLIP read.
    prompt_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    # Whether a prompt and a negative of different lengths were read padded to one (A1111's "Pad conds").
    padded_conds: bool = False
    # The textual-inversion embeddings the prompts named, with A1111's short hash of each file.
    embeddings: dict[str, str] = field(default_factory=dict)
    # The LoRAs the job ran with, in the order asked.
    loras: list[Applied] = field(default_factory=list)
    # Milliseconds of each phase of its time on the device (src/run/phases.py).
    phases_ms: dict[str, float] = field(default_factory=dict)


class Engine:
    """Owns the loaded pipeline and runs prepared jobs on it, one at a time."""

    def __init__(
        self,
        pipeline: Any,
        *,
        settings: Settings,
        device: torch.device,
        dtype: torch.dtype,
        profile: Profile,
        gpu_bytes: int | None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.profile = profile
        self.gpu_bytes = gpu_bytes
        self._pipeline = pipeline
        # Serializes GPU work: one request holds the models at a time.
        self._lock = threading.Lock()
        # diffusers' tqdm bar on stderr, for a person at a terminal (local one-shot runs); off in a worker.
        self.show_progress_bar = False
        # Reads deadlines and progress intervals; a seam through which tests control time.
        self.clock: Callable[[], float] = time.monotonic
        # What the model is, as responses and image parameters name it.
        self.identity = named_identity(settings)
        # Textual-inversion embeddings by name, from EMBEDDINGS_DIR.
        self.embeddings: dict[str, Embedding] = {}
        # LoRAs from LORA_DIR, and the pipeline's LoRA state.
        self.loras = Loras(pipeline, {}, cache_bytes=0)
        # ControlNets from CONTROLNET_DIR, and UPSCALER_DIR's upscalers, loaded on first use and cached.
        self.controlnets = ControlNets(pipeline, {}, device=device, dtype=dtype, cache_bytes=0)
        self.upscalers = upscalers_from(settings, device, dtype)
        # MODELS_DIR's models, swapped into the pipeline's modules when a job names one.
        self.models = Models(
            pipeline, {}, settings=settings, dtype=dtype, pin=False, cache_bytes=0, default=self.identity
        )

    @classmethod
    def load(cls, settings: Settings, *, run_on: Callable[[Callable[[], None]], None] | None = None) -> Engine:
        """Resolve device, dtype and memory profile, load the model and place it (``startup.load_parts``).
        FAST_MODE's warm-up goes through ``run_on`` to the jobs' thread (CUDA graphs are per thread); None: here.

        Raises:
            ModelLoadError: the model cannot be loaded; the message says what to do.
            AdapterError: a file in EMBEDDINGS_DIR cannot be used; the message names it.
        """
        parts = load_parts(settings)
        engine = cls(
            parts.pipeline,
            settings=settings,
            device=parts.device,
            dtype=parts.dtype,
            profile=parts.profile,
            gpu_bytes=parts.gpu_bytes,
        )
        engine.identity, engine.embeddings = parts.identity, parts.embeddings
        engine.loras = parts.loras
        engine.controlnets = parts.controlnets
        engine.models = Models.from_settings(
            parts.pipeline, settings, dtype=parts.dtype, pin=parts.device.type == "cuda", default=parts.identity
        )
        if parts.fast:
            (run_on or _right_here)(functools.partial(_warm_up, engine, parts.compile_cache))
        return engine

    @property
    def catalog(self) -> Catalog:
        """The LoRAs and ControlNets this worker has, by name, for ``prepare`` to look requests up in."""
        return Catalog(
            loras=self.loras.files,
            lora_aliases=self.loras.aliases,
            controlnets=self.controlnets.entries,
            models=self.models.entries,
            vaes=self.models.vaes,
            upscalers=self.upscalers.entries,
        )

    def generate(
        self,
        request: GenerateRequest,
        *,
        images: TaskImages | None = None,
        controls: ControlMaps | None = None,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> Generation:
        """``run`` for a request whose images are ready (``inputs.prepare_inputs``): its names looked up and
        its plan made here, as ``prepare`` does for a job. For callers that hold a request, not a job.

        Raises:
            InputError: the request names a file by URL, a LoRA or ControlNet the worker lacks, or a prompt
                that cannot be parsed. And whatever ``run`` raises.
        """
        problems = self.catalog.problems(request) + _by_url(request)
        if problems:
            raise InputError(f"invalid input: {'; '.join(problems)}")
        plan = plan_job(Inputs(request=request, images=images, controls=controls), self.settings)
        return self.run(plan, timeout_s=timeout_s, on_progress=on_progress)

    def run(
        self,
        plan: JobPlan,
        *,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> Generation:
        """Run one prepared job and return its images, in seed order. ``timeout_s`` bounds the work from when
        the job gets the GPU; ``on_progress`` gets ``{"step", "total_steps"}`` about once a second and at the last
        step; once ``cancelled`` is set (from another thread), the job stops waiting for the GPU, or at its next step.

        Raises:
            AdmissionError: the job cannot fit on this GPU even one image at a time.
            GenerationTimeoutError, JobCancelledError: it ran past GENERATION_TIMEOUT_SECONDS, or was cancelled.
            OutOfMemoryError, BadImageError: out of GPU memory twice; NaN in the images even after a float32 decode.
            AdapterError, ModelLoadError: a LoRA, ControlNet or MODELS_DIR model cannot be loaded (named).
        """
        request = plan.request
        _know_downloads(self, plan)  # the files it named by URL, known by their keys from now on
        # 1. Admission: how many images fit at once, or a refusal before any work, sized by the largest pass.
        admitted, make_room = _admit(self, plan)
        job = JobState.for_plan(plan, batch=admitted.batch, timeout_s=timeout_s, on_progress=on_progress)
        job.clock, job.cancelled, job.phases = self.clock, cancelled, Phases(self.device)
        # 2. Wait for the GPU: one job at a time. The deadline starts once it is ours.
        with self.gpu(cancelled) as queue_ms, torch.inference_mode(), models_offloaded_after(self._pipeline):
            started = time.perf_counter()
            job.start()
            if make_room:  # admitted only without the cached ControlNets and upscalers it does not use
                _make_room(self, request)
            # 3. The job's model swapped in, its LoRAs and ControlNets on for the job only.
            with _model_and_adapters(self, request, job) as (model, loras):
                # 4. Encode the prompts as A1111 reads them (the text encoder is shared, so under the lock).
                limit, embeddings = self.settings.max_prompt_chunks, self.embeddings
                job.schedule = schedule = pipelines.encode_prompts(
                    self._pipeline, plan.texts, job, max_chunks=limit, embeddings=embeddings
                )
                job.before_pass = _hires_model(self, plan, job)
                # 5. Generate; after an OOM, free memory and retry frugally once.
                pictures, nsfw = self._generate(job, admitted)
            inference_ms = (time.perf_counter() - started) * 1000
        return Generation(
            images=pictures,
            seeds=request.seeds,
            inference_ms=inference_ms,
            model=model,
            device=self.device.type,
            dtype=str(self.dtype).removeprefix("torch."),
            memory_profile=self.profile.value,
            queue_ms=queue_ms,
            warnings=job.warnings,
            nsfw=nsfw,
            prompt_tokens=schedule.first.counts,
            padded_conds=schedule.padded,
            embeddings={name: self.embeddings[name].short_hash for name in schedule.embeddings},
            loras=loras,
            phases_ms=job.phases.milliseconds(),
        )

    @contextmanager
    def gpu(self, cancelled: threading.Event | None) -> Iterator[float]:
        """Hold the GPU lock, giving the milliseconds waited for it; while waiting, give up when ``cancelled``
        is set.

        Raises:
            JobCancelledError: ``cancelled`` was set before the lock was ours.
        """
        queued = time.perf_counter()
        if cancelled is None:
            self._lock.acquire()
        else:
            while not self._lock.acquire(timeout=_CANCEL_POLL_S):
                if cancelled.is_set():
                    raise JobCancelledError("the job was cancelled while it waited for the GPU")
        try:
            yield (time.perf_counter() - queued) * 1000
        finally:
            self._lock.release()

    def _generate(self, job: JobState, admitted: Plan) -> tuple[list[Image.Image], list[bool] | None]:
        """The job's pictures as admission planned them; after an out-of-memory error, once more one image
        at a time with VAE tiling.

        Raises:
            OutOfMemoryError: the frugal retry ran out of memory too.
        """
        kept = len(job.warnings)
        result = self._attempt(job, admitted, frugal=False)
        if result is None:
            # Outside the except block, so the failed run's tensors went with its traceback.
            self._release_memory()
            del job.warnings[kept:]  # the retry makes every image again, and says again what it finds
            request = job.request
            tile = self.upscalers.frugal_tile() if _model_upscaler(request) else None
            job.warnings.append(f"the GPU ran out of memory; the job was retried {_frugally(tile)}")
            width, height = request.output_size
            log.warning("out of GPU memory at %dx%d x%d; retrying frugally", width, height, request.num_images)
            job.count_again(job.steps_per_image * request.num_images)
            result = self._attempt(job, Plan(batch=1, vae_tiling=True, upscale_tile=tile), frugal=True)
            if result is None:
                self._release_memory()
                raise OutOfMemoryError(_oom_message(request, self.profile, self.gpu_bytes, tile))
        return result

    def _attempt(
        self, job: JobState, plan: Plan, *, frugal: bool
    ) -> tuple[list[Image.Image], list[bool] | None] | None:
        """The job's pictures (``pipelines.run_passes``), or None when the GPU ran out of memory."""
        try:
            return pipelines.run_passes(
                self._pipeline,
                job,
                plan,
                profile=self.profile,
                frugal=frugal,
                device=self.device,
                dtype=self.dtype,
                show_progress=self.show_progress_bar,
            )
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if is_out_of_memory(error):
                return None
            raise

    def _release_memory(self) -> None:
        """After an OOM: collect what the failed run left, and hand the cache back to the driver."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _by_url(request: GenerateRequest) -> list[str]:
    """A request's files by URL: downloaded by a job's prepare stage, not by ``generate``."""
    if isinstance(request.model, ModelDownload) or any(lora.url for lora in request.loras):
        return ["a model or LoRA by URL is downloaded by a job's prepare stage: run it as a job"]
    return []


def _know_downloads(engine: Engine, plan: JobPlan) -> None:
    """The files the prepare stage downloaded for the job, known by their keys from now on."""
    for item in plan.downloaded:
        if isinstance(item.entry, LoraFile):
            engine.loras.add_downloaded(item.key, item.entry)
        else:
            engine.models.add_downloaded(item.key, item.entry)


@contextmanager
def _model_and_adapters(
    engine: Engine, request: GenerateRequest, job: JobState
) -> Iterator[tuple[ModelIdentity, list[Applied]]]:
    """The job's model in the modules (``run.models``: swapped in place when the job names another), and its
    LoRAs, ControlNets and tiling on for the job only: off again however it ends. Under the GPU lock."""
    models = engine.models
    assert not isinstance(request.model, ModelDownload), "a model by URL is named by its key once downloaded"
    model = models.use(request.model, request.vae) if models.swappable else engine.identity
    job.upscalers = engine.upscalers
    with (
        engine.loras.applied(request.loras) as loras,
        engine.controlnets.for_job(request.controlnets, guidance=request.guidance_scale > 1) as job.controlnet,
        pipelines.circular_padding([engine._pipeline.unet, engine._pipeline.vae], request.tiling),
    ):
        yield model, loras


def _hires_model(engine: Engine, plan: JobPlan, job: JobState) -> Callable[[int], None] | None:
    """With ``hires.model``, what runs before each pass: the modules made to hold the pass's model (the job's
    for the first, hires.model for the second; swapped in place, under the GPU lock), and the job's prompts as
    that model's text encoder reads them (each model's encoded once). None when every pass has the job's."""
    request = plan.request
    names = [step.model if step.model is not None else request.model for step in plan.passes]
    if all(name == names[0] for name in names):
        return None
    assert job.schedule is not None, "the first model's prompts are encoded"
    assert not any(isinstance(name, ModelDownload) for name in names), "a model by URL is named by its key"
    schedules = {names[0]: job.schedule}

    def before(index: int) -> None:
        name = names[index]
        assert not isinstance(name, ModelDownload)
        engine.models.use(name, request.vae)
        if name not in schedules:
            schedules[name] = pipelines.encode_prompts(
                engine._pipeline,
                plan.texts,
                job,
                max_chunks=engine.settings.max_prompt_chunks,
                embeddings=engine.embeddings,
            )
        job.schedule = schedules[name]

    return before


def _right_here(stage: Callable[[], None]) -> None:
    stage()


def _warm_up(engine: Engine, compile_cache: CompileCache | None = None) -> None:
    """Compile and record before the first job, inside the cold start: the production shape (512², one image,
    the default scheduler), then a second shape (two images, 448x512), which makes torch compile the dynamic
    graphs every other size and batch replays, its prompt two chunks long (``BREAK``) against an empty
    negative's one, for the graphs with a cross-attention mask (``src.run.cross_attention``); with LoRA slots,
    both again with the first slot on. Then keep what was compiled (COMPILE_CACHE_DIR) for the next workers, and
    log how far the compiled image is from the uncompiled one. A warm-up that fails costs FAST_MODE, never the
    worker: it serves on uncompiled."""
    started = time.perf_counter()
    first = {"prompt": "warm-up", "num_inference_steps": 2, "seed": 0}
    second = {**first, "num_images": min(2, engine.settings.max_images), "width": 448}
    if engine.settings.max_prompt_chunks > 1:
        second["prompt"] = "warm-up BREAK warm-up"
    requests = [GenerateRequest.model_validate(job, context={"limits": engine.settings}) for job in (first, second)]
    try:
        compiled = [engine.generate(request, timeout_s=3600) for request in requests]
        if engine.loras.has_slots:
            with engine.loras.first_slot_on():
                for request in requests:
                    engine.generate(request, timeout_s=3600)
    except Exception:  # whatever the compiler raised, the worker serves on without it
        log.exception("FAST_MODE's warm-up failed: the worker serves on without FAST_MODE's compiled modules")
        fast_path.drop_fast_mode(engine._pipeline)
        return
    log.info("warmed up in %.1f s", time.perf_counter() - started)
    if compile_cache is not None:
        compile_cache.save()
    with fast_path.uncompiled(*fast_path.compiled_modules(engine._pipeline)):
        reference = engine.generate(requests[0], timeout_s=3600)
    mean, largest = fast_path.grey_levels_apart(compiled[0].images, reference.images)
    log.info("FAST_MODE: the warm-up image is %.2f grey levels from the uncompiled one, %d at most", mean, largest)


def _admit(engine: Engine, plan: JobPlan) -> tuple[Plan, bool]:
    """How many of the job's images run at once, with which memory switches; and whether the cached
    ControlNets and upscalers the job does not use must leave the GPU first: a job that fits whole only without
    them runs without them, so what a worker ran before never shrinks or refuses a job.

    Raises:
        AdmissionError: not one image fits, even without the cached ones; the message names the size.
    """
    request = plan.request
    try:
        beside = _plan(engine, plan, cached=True)
    except AdmissionError:
        beside = None
    if beside == Plan(request.num_images):
        return beside, False
    try:
        alone = _plan(engine, plan, cached=False)
    except AdmissionError as error:
        if request.hires is None:
            raise
        width, height = request.output_size
        raise AdmissionError(
            f"{error}; {width}x{height} is the hires pass's size, from {request.width}x{request.height}"
        ) from None
    return (alone, beside != alone) if beside is not None else (alone, True)


def _plan(engine: Engine, plan: JobPlan, *, cached: bool) -> Plan:
    """``plan_sub_batch`` for the job, counting the adapters the caches keep on the GPU when ``cached``."""
    request, upscaler = plan.request, plan.request.hires.upscaler if plan.request.hires else None
    width, height = request.output_size
    adapters = {
        "LoRA": engine.loras.gpu_bytes(request.loras, engine.dtype.itemsize),
        "ControlNet": engine.controlnets.gpu_bytes(request.controlnets, cached=cached),
        "upscaler": engine.upscalers.gpu_bytes(upscaler, engine.dtype.itemsize, cached=cached),
    }
    return plan_sub_batch(
        engine.profile,
        width,
        height,
        request.num_images,
        gpu_bytes=engine.gpu_bytes,
        dtype_bytes=engine.dtype.itemsize,
        safety_checker=engine._pipeline.safety_checker is not None,
        adapter_bytes=sum(adapters.values()),
        adapter_parts=adapters,
        control_units=len(request.controlnets),
        prompt_bytes=_prompt_bytes(
            plan.texts,
            int(engine._pipeline.text_encoder.config.hidden_size),
            engine.settings.max_prompt_chunks,
            engine.dtype.itemsize,
        ),
    )


def _make_room(engine: Engine, request: GenerateRequest) -> None:
    """The cached ControlNets and upscalers ``request`` does not use off the GPU. Under the GPU lock."""
    engine.controlnets.to_host(request.controlnets)
    engine.upscalers.drop_others(request.hires.upscaler if request.hires else None)


def _prompt_bytes(texts: TextPlan, width: int, max_chunks: int, dtype_bytes: int) -> int:
    """GPU memory a job's prompt embeddings may take: each text at MAX_PROMPT_CHUNKS chunks of ``width``
    values (its length is known only once tokenized, under the lock)."""
    return len(texts.texts()) * max_chunks * (CHUNK_TOKENS + 2) * width * dtype_bytes


def _model_upscaler(request: GenerateRequest) -> str | None:
    """The upscaler model of the job's hires pass; None for Lanczos, a latent upscaler, or no hires pass."""
    upscaler = request.hires.upscaler if request.hires else None
    if upscaler is None or upscaler == "lanczos" or upscaler in pipelines.LATENT_MODES:
        return None
    return upscaler


def _frugally(tile: int | None) -> str:
    """How the frugal retry runs a job, its hires upscaler's tiles (if a model) of ``tile`` pixels."""
    tiles = f" and the hires upscaler in tiles of {tile} pixels" if tile else ""
    return f"one image at a time with VAE tiling{tiles}"


def _oom_message(request: GenerateRequest, profile: Profile, gpu_bytes: int | None, tile: int | None) -> str:
    """The error of a job that ran out of memory in its frugal retry too, whose hires upscaler (if a model) ran in
    tiles of ``tile`` pixels then."""
    memory = f"{gpu_bytes / GIB:.1f} GiB" if gpu_bytes else "this device's memory"
    width, height = request.output_size
    message = (
        f"{width}x{height} x{request.num_images} ran out of GPU memory ({memory}, "
        f"{profile.value} profile) even {_frugally(tile)}; ask for a smaller size"
    )
    upscaler = _model_upscaler(request)
    if upscaler is None:
        return message
    return f"{message}, or a hires upscaler other than {upscaler!r} (a lower UPSCALE_TILE takes less memory)"


# How cuBLAS, cuDNN and the CUDA runtime word an allocation failure that torch raises as a plain RuntimeError.
_OUT_OF_MEMORY_MARKERS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the GPU ran out of memory, whichever library noticed first."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _OUT_OF_MEMORY_MARKERS)
