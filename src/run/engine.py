"""Stage 2 of a job, under the GPU lock: the warm pipeline, loaded once, and the guard rails around a job.

``Engine.run`` takes a ``JobPlan`` from ``prepare`` and returns its pictures. Around the pipeline calls
(``pipelines``) it keeps a job from hurting the worker: admission by estimated memory (sub-batches, or a
refusal before any work), one job on the GPU at a time, a deadline from the moment the job gets the GPU,
the job's adapters on for the job only, one frugal retry after an out-of-memory error, and progress.

Each image gets its own CPU ``torch.Generator`` seeded with its own seed, so a seed means the same image
on every device and image i of a batch can be regenerated alone. It may import everything before it in
the stages (errors, settings, schema, models, prompts, adapters, prepare), never ``finish``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from src.adapters.catalog import Catalog
from src.adapters.controlnets import ControlNets
from src.adapters.embeddings import Embedding
from src.adapters.loras import Applied, Loras
from src.errors import OutOfMemoryError
from src.models.loader import ModelIdentity, named_identity
from src.prepare import JobPlan, plan_job
from src.prepare.canvas import ControlMaps, Inputs, TaskImages, paste_back
from src.prompts import CHUNK_TOKENS, PromptError, Schedule, TextPlan, encode_schedule
from src.run import pipelines
from src.run.job import JobState, ProgressCallback
from src.run.memory import GIB, Plan, Profile, Setup, plan_sub_batch, setup_for, sub_batches
from src.run.startup import apply_offload, load_parts
from src.schema import GenerateRequest, InputError
from src.settings import Settings

__all__ = ["Engine", "Generation", "apply_offload", "is_out_of_memory"]

log = logging.getLogger(__name__)


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
    # The textual-inversion embeddings the prompts named, with A1111's short hash of each file.
    embeddings: dict[str, str] = field(default_factory=dict)
    # The LoRAs the job ran with, in the order asked.
    loras: list[Applied] = field(default_factory=list)


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
        # ControlNets from CONTROLNET_DIR, loaded on first use and cached.
        self.controlnets = ControlNets(pipeline, {}, device=device, dtype=dtype, cache_bytes=0)

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Resolve device, dtype and memory profile, load the model and place it (``startup.load_parts``).

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
        engine.identity = parts.identity
        engine.embeddings = parts.embeddings
        engine.loras = parts.loras
        engine.controlnets = parts.controlnets
        if parts.fast:
            engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """Run the production shape once (512², one image, the default scheduler) so that compilation
        and CUDA's lazy start happen before the first job, inside the cold start."""
        started = time.perf_counter()
        request = GenerateRequest.model_validate(
            {"prompt": "warm-up", "num_inference_steps": 2, "seed": 0}, context={"limits": self.settings}
        )
        self.generate(request, timeout_s=3600)
        if self.loras.has_slots:
            with self.loras.first_slot_on():
                self.generate(request, timeout_s=3600)
        log.info("warmed up in %.1f s", time.perf_counter() - started)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def catalog(self) -> Catalog:
        """The LoRAs and ControlNets this worker has, by name, for ``prepare`` to look requests up in."""
        return Catalog(loras=self.loras.files, controlnets=self.controlnets.entries)

    def generate(
        self,
        request: GenerateRequest,
        *,
        images: TaskImages | None = None,
        controls: ControlMaps | None = None,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> Generation:
        """``run`` for a request whose images are ready (``canvas.prepare_inputs``): its names looked up and
        its plan made here, as ``prepare`` does for a job. For callers that hold a request, not a job.

        Raises:
            InputError: the request names a LoRA or ControlNet the worker lacks, or a prompt cannot be parsed.
            And whatever ``run`` raises.
        """
        problems = self.catalog.problems(request)
        if problems:
            raise InputError(f"invalid input: {'; '.join(problems)}")
        plan = plan_job(Inputs(request=request, images=images, controls=controls), self.settings)
        return self.run(plan, timeout_s=timeout_s, on_progress=on_progress)

    def run(self, plan: JobPlan, *, timeout_s: float, on_progress: ProgressCallback | None = None) -> Generation:
        """Run one prepared job and return its images, in seed order.

        ``timeout_s`` bounds the work from the moment the job gets the GPU; ``on_progress`` receives
        ``{"step", "total_steps"}`` about once a second, and at the last step.

        Raises:
            AdmissionError: the job cannot fit on this GPU even one image at a time.
            GenerationTimeoutError: it ran past GENERATION_TIMEOUT_SECONDS.
            OutOfMemoryError: the GPU ran out of memory, twice.
            BadImageError: the images hold NaN even after a float32 decode.
            AdapterError: a LoRA or ControlNet file cannot be loaded; the message names its field.
        """
        request = plan.request
        # 1. Admission: how many images fit at once (adapters and prompts included), or a refusal before any
        # work, sized by the largest pass.
        admitted = self._admit(plan)
        steps = sum(step.denoising_steps for step in plan.passes)
        job = JobState(
            request=request,
            passes=plan.passes,
            images=plan.images,
            timeout_s=timeout_s,
            total_steps=steps * len(sub_batches(request.num_images, admitted.batch)),
            on_progress=on_progress,
            warnings=[],
            clock=self.clock,
        )

        # 2. Wait for the GPU: one job at a time. The deadline starts once it is ours.
        queued = time.perf_counter()
        with self._lock, torch.inference_mode(), self._models_offloaded_after():
            started = time.perf_counter()
            job.start()
            # 3. The job's LoRAs on and its ControlNets on the device, for this job only: off again when it
            # ends, however it ends.
            with (
                self.loras.applied(request.loras) as loras,
                self.controlnets.for_job(request.controlnets, guidance=request.guidance_scale > 1) as job.controlnet,
            ):
                # 4. Encode the prompts as A1111 reads them (the text encoder is shared, so under the lock).
                job.schedule = schedule = self._encode_prompts(plan.texts, job)
                # 5. Generate; after an OOM, free memory and retry frugally once.
                pictures, nsfw = self._generate(job, admitted, steps)
            inference_ms = (time.perf_counter() - started) * 1000
        return Generation(
            images=pictures,
            seeds=request.seeds,
            inference_ms=inference_ms,
            model=self.identity,
            device=self.device.type,
            dtype=self.dtype_name,
            memory_profile=self.profile.value,
            queue_ms=(started - queued) * 1000,
            warnings=job.warnings,
            nsfw=nsfw,
            prompt_tokens=schedule.first.counts,
            embeddings={name: self.embeddings[name].short_hash for name in schedule.embeddings},
            loras=loras,
        )

    def _admit(self, plan: JobPlan) -> Plan:
        """How many of the job's images run at once, with which memory switches.

        Raises:
            AdmissionError: not even one image at a time fits.
        """
        request = plan.request
        width, height = request.output_size
        return plan_sub_batch(
            self.profile,
            width,
            height,
            request.num_images,
            gpu_bytes=self.gpu_bytes,
            dtype_bytes=self.dtype.itemsize,
            safety_checker=self._pipeline.safety_checker is not None,
            adapter_bytes=self.loras.gpu_bytes(request.loras, self.dtype.itemsize)
            + self.controlnets.gpu_bytes(request.controlnets),
            control_units=len(request.controlnets),
            prompt_bytes=self._prompt_bytes(plan.texts),
        )

    def _prompt_bytes(self, texts: TextPlan) -> int:
        """GPU memory the job's prompt embeddings may take: each text at MAX_PROMPT_CHUNKS chunks (its
        length is known only once tokenized, under the lock)."""
        width = int(self._pipeline.text_encoder.config.hidden_size)
        rows = self.settings.max_prompt_chunks * (CHUNK_TOKENS + 2)
        return len(texts.texts()) * rows * width * self.dtype.itemsize

    def _encode_prompts(self, texts: TextPlan, job: JobState) -> Schedule:
        """Both prompts' embeddings for each step of each pass, A1111's syntax read, each distinct text
        once; a prompt that cannot be encoded is an input error, and the deadline is checked after each text."""
        pipeline = self._pipeline
        try:
            return encode_schedule(
                texts,
                tokenizer=pipeline.tokenizer,
                text_encoder=pipeline.text_encoder,
                device=pipeline._execution_device,
                clip_skip=job.request.clip_skip,
                max_chunks=self.settings.max_prompt_chunks,
                embeddings=self.embeddings,
                on_encoded=job.texts_encoded,
            )
        except PromptError as error:
            raise InputError(f"invalid input: {error}") from None

    def _generate(self, job: JobState, admitted: Plan, steps: int) -> tuple[list[Image.Image], list[bool] | None]:
        """The job's pictures as admission planned them; after an out-of-memory error, once more one image
        at a time with VAE tiling.

        Raises:
            OutOfMemoryError: the frugal retry ran out of memory too.
        """
        result = self._attempt(job, admitted, frugal=False)
        if result is None:
            # Outside the except block, so the failed run's tensors went with its traceback.
            self._release_memory()
            job.warnings.append("the GPU ran out of memory; the job was retried one image at a time with VAE tiling")
            request = job.request
            width, height = request.output_size
            log.warning("out of GPU memory at %dx%d x%d; retrying frugally", width, height, request.num_images)
            job.count_again(steps * request.num_images)
            result = self._attempt(job, Plan(batch=1, vae_tiling=True), frugal=True)
            if result is None:
                self._release_memory()
                raise OutOfMemoryError(self._oom_message(request))
        return result

    def _attempt(
        self, job: JobState, plan: Plan, *, frugal: bool
    ) -> tuple[list[Image.Image], list[bool] | None] | None:
        """``_sub_batches``, or None when the GPU ran out of memory."""
        try:
            return self._sub_batches(job, plan, frugal=frugal)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if is_out_of_memory(error):
                return None
            raise

    def _sub_batches(self, job: JobState, plan: Plan, *, frugal: bool) -> tuple[list[Image.Image], list[bool] | None]:
        """Denoise and decode the job in sub-batches, as admission planned, pass after pass."""
        request, base = job.request, self._pipeline
        width, height = request.output_size
        results: list[Image.Image] = []
        flags: list[bool] = []
        for chunk in sub_batches(request.num_images, plan.batch):
            indices = list(chunk)
            # One generator per image, carried through every pass: image i depends on its seed alone.
            generators = [torch.Generator(device="cpu").manual_seed(request.seeds[index]) for index in indices]
            setup = setup_for(self.profile, width, height, len(indices), frugal=frugal, tiling=plan.vae_tiling)
            with self._switches(setup):
                latents: torch.Tensor | None = None
                for index in range(len(job.passes)):
                    latents = pipelines.denoise(
                        base,
                        job,
                        index,
                        latents,
                        generators=generators,
                        indices=indices,
                        show_progress=self.show_progress_bar,
                    )
                assert latents is not None
                decoded = pipelines.decode(base, latents, indices, job.warnings)
            chunk_images, chunk_flags = pipelines.checked_pictures(
                base, decoded, indices, job.warnings, device=self.device, dtype=self.dtype
            )
            chunk_flags = chunk_flags or [False] * len(indices)
            # A flagged image stays black: nothing of the input is pasted onto it.
            results += [
                image if flagged else paste_back(request, job.images, image)
                for image, flagged in zip(chunk_images, chunk_flags, strict=True)
            ]
            flags += chunk_flags
        return results, (flags if base.safety_checker is not None else None)

    @contextlib.contextmanager
    def _switches(self, setup: Setup) -> Iterator[None]:
        """Apply a profile's switches to the shared models for one run, and undo them after.

        Safe because the caller holds the lock: no other request sees them.
        """
        vae = self._pipeline.vae
        vae.use_slicing, vae.use_tiling = setup.vae_slicing, setup.vae_tiling
        try:
            yield
        finally:
            vae.use_slicing = vae.use_tiling = False

    @contextlib.contextmanager
    def _models_offloaded_after(self) -> Iterator[None]:
        """With model offload (low), every model back in host memory after the job, however it ends.

        A diffusers pipeline does it at the end of its call (``maybe_free_model_hooks``), but the hooks
        belong to the shared pipeline, never to the per-request ones that run: without this, the last
        model a job ran (the VAE, or the UNet or text encoder after a timeout) would stay on the GPU
        through the next job, beside what admission counts.
        """
        try:
            yield
        finally:
            # Each hook of enable_model_cpu_offload moves its model to host memory; sequential offload
            # (minimal) moves each layer back after its forward itself, and has none of these.
            for hook in getattr(self._pipeline, "_all_hooks", None) or []:
                hook.offload()

    def _release_memory(self) -> None:
        """After an OOM: collect what the failed run left, and hand the cache back to the driver."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_message(self, request: GenerateRequest) -> str:
        memory = f"{self.gpu_bytes / GIB:.1f} GiB" if self.gpu_bytes else "this device's memory"
        width, height = request.output_size
        return (
            f"{width}x{height} x{request.num_images} ran out of GPU memory ({memory}, "
            f"{self.profile.value} profile) even one image at a time with VAE tiling; "
            "ask for a smaller size"
        )


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
