"""The warm pipeline: loaded once, shared by every request, one request on it at a time.

Each request gets its own scheduler and its own light pipeline object around
the shared models, so nothing shared is mutated per request. Each image gets
its own CPU ``torch.Generator`` seeded with its own seed, so a seed means the
same image on every device and image i of a batch can be regenerated alone.

Around that, the engine keeps a job from hurting the worker: admission by
estimated memory (sub-batches, or a refusal before any work), one frugal retry
after an out-of-memory error, a deadline checked at every denoising step, a
float32 re-decode when the VAE gives NaN, and progress reports.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from src import prompts
from src.adapters.controlnets import ControlNets, scan_controlnets
from src.adapters.embeddings import Embedding, load_embeddings
from src.adapters.loras import Applied, Loras, scan_loras
from src.errors import BadImageError, GenerationTimeoutError, OutOfMemoryError
from src.models.loader import load_model, named_identity, resolve_device, resolve_dtype
from src.models.schedulers import make_scheduler
from src.prepare import canvas
from src.prepare import passes as tasks
from src.prepare.canvas import ControlMaps, TaskImages
from src.run.memory import GIB, Plan, Profile, Setup, choose_profile, plan_sub_batch, setup_for, sub_batches
from src.schema import GenerateRequest, InputError
from src.settings import Settings

log = logging.getLogger(__name__)

# At most one progress report per this many seconds.
PROGRESS_INTERVAL_S = 1.0
# The profiles that keep the models in host memory, with accelerate's hooks moving them to the GPU.
OFFLOADING = (Profile.LOW, Profile.MINIMAL)

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Generation:
    """What one request produced, before encoding."""

    images: list[Image.Image]
    seeds: list[int]
    inference_ms: float
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


@dataclass
class _Job:
    """The state of one request while it runs: its deadline, progress and warnings.

    Steps are counted as the user asked for them. Second-order schedulers (Heun,
    DPM2) run the UNet about twice per step and PNDM once more than asked, so the
    pipeline's own step index is mapped onto the request's steps.
    """

    request: GenerateRequest
    # The pipeline calls it makes, and its input images at its size (None for text-to-image).
    passes: list[tasks.Pass]
    images: TaskImages | None
    timeout_s: float
    total_steps: int
    on_progress: ProgressCallback | None
    warnings: list[str]
    # Seconds, monotonic: the engine's clock.
    clock: Callable[[], float] = time.monotonic
    # Set when the job gets the GPU: time spent waiting for it is not the job's.
    # Both prompts' embeddings for every step of every pass, encoded once the job has the GPU.
    schedule: prompts.Schedule | None = None
    # The job's ControlNet units as one model for its pipelines, while it holds the GPU.
    controlnet: Any = None
    deadline: float = float("inf")
    # Steps of the pipeline call running now, and of those finished before it, as the request counts them.
    run_steps: int = 0
    steps_before: int = 0
    last_report: float = 0.0
    last_reported_step: int = 0

    def start(self) -> None:
        """Start the clock: the job holds the GPU from now on."""
        self.deadline = self.clock() + self.timeout_s

    def count_again(self, total_steps: int) -> None:
        """Count from the first step again, for the frugal retry; the deadline stays as it was."""
        self.total_steps = total_steps
        self.steps_before = self.last_reported_step = 0
        self.last_report = 0.0

    def run_started(self, steps: int) -> None:
        """A pipeline call of ``steps`` denoising steps begins."""
        self.run_steps = steps

    def on_step_end(self, pipeline: Any, index: int, _timestep: object, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end``, called after each of the pipeline's ``num_timesteps`` iterations."""
        self.step_finished(self.steps_before + self.steps_in_run(pipeline, index))
        return tensors

    def steps_in_run(self, pipeline: Any, index: int) -> int:
        """Steps of the current run done once the pipeline's iteration ``index`` has ended."""
        iterations = max(int(pipeline.num_timesteps), 1)
        # Rounded down, so the run's last step is counted at its last iteration, not before.
        return min((index + 1) * self.run_steps // iterations, self.run_steps)

    def run_finished(self) -> None:
        self.steps_before += self.run_steps

    def step_finished(self, steps_done: int) -> None:
        """Record progress, report it now and then, and stop the job when it is late."""
        now = self.clock()
        advanced = steps_done > self.last_reported_step
        due = now - self.last_report >= PROGRESS_INTERVAL_S or steps_done == self.total_steps
        if self.on_progress and advanced and due:
            self.last_report, self.last_reported_step = now, steps_done
            self.on_progress({"step": steps_done, "total_steps": self.total_steps})
        self._check_deadline(now, f"at denoising step {max(steps_done, 1)} of {self.total_steps}")

    def texts_encoded(self, done: int, total: int) -> None:
        """``done`` of the job's ``total`` prompt texts are encoded: stop the job when it is late."""
        self._check_deadline(self.clock(), f"while encoding the prompts ({done} of {total} texts)")

    def _check_deadline(self, now: float, where: str) -> None:
        if now > self.deadline:
            raise GenerationTimeoutError(
                f"generation stopped: it ran past GENERATION_TIMEOUT_SECONDS={self.timeout_s:g} {where}"
            )


class Engine:
    """Owns the loaded pipeline and runs requests on it."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
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
        """Resolve device, dtype and memory profile, load the model and place it.

        Raises:
            ModelLoadError: the model cannot be loaded; the message says what to do.
            AdapterError: a file in EMBEDDINGS_DIR cannot be used; the message names it.
        """
        started = time.perf_counter()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        gpu_bytes = _gpu_bytes(settings) if device.type == "cuda" else None
        profile = choose_profile(device.type, gpu_bytes, settings.memory_profile)
        pipeline, identity = load_model(settings, dtype)
        _drop_long_prompt_warnings()
        if profile in OFFLOADING:
            apply_offload(pipeline, profile, device)
        else:
            # On the CPU in half precision diffusers warns that it "will fail"; torch 2.13 runs it.
            pipeline.to(device, silence_dtype_warnings=True)
        embeddings = load_embeddings(settings.embeddings_dir, int(pipeline.text_encoder.config.hidden_size))
        fast = settings.fast_mode and _fast_mode_applies(device, profile)
        # Between jobs, cached LoRAs wait in host memory; offloading profiles move weights themselves.
        offload_to = device if device.type == "cuda" and profile in (Profile.HIGH, Profile.BALANCED) else None
        loras = Loras(
            pipeline,
            scan_loras(settings.lora_dir),
            cache_bytes=int(settings.lora_cache_mb * 1e6),
            offload_to=offload_to,
            slots=settings.max_loras if fast else 0,
            # Sequential offload keeps weights off the device, where they cannot be merged into.
            merge=profile is not Profile.MINIMAL,
            offload=functools.partial(apply_offload, pipeline, profile, device) if profile in OFFLOADING else None,
        )
        controlnets = ControlNets(
            pipeline,
            scan_controlnets(settings.controlnet_dir),
            device=device,
            dtype=dtype,
            cache_bytes=int(settings.controlnet_cache_mb * 1e6),
            offload=profile in OFFLOADING,
        )
        controlnets.preload(settings.controlnet_preload_names)
        if fast:
            _apply_fast_mode(pipeline, loras)
        log.info(
            "loaded %s on %s (%s, %s profile%s) in %.1f s",
            identity.name,
            device,
            str(dtype).removeprefix("torch."),
            profile.value,
            f", {gpu_bytes / GIB:.1f} GiB" if gpu_bytes else "",
            time.perf_counter() - started,
        )
        engine = cls(pipeline, settings=settings, device=device, dtype=dtype, profile=profile, gpu_bytes=gpu_bytes)
        engine.identity = identity
        engine.embeddings = embeddings
        engine.loras = loras
        engine.controlnets = controlnets
        if fast:
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

    def generate(
        self,
        request: GenerateRequest,
        *,
        images: TaskImages | None = None,
        controls: ControlMaps | None = None,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> Generation:
        """Run one request and return its images, in seed order.

        ``images`` are the request's input images at its size (``canvas.prepare``), for every
        task but text-to-image, whose request has its size resolved. ``timeout_s`` bounds the work
        from the moment the job gets the GPU; ``on_progress``
        receives ``{"step", "total_steps"}`` about once a second, and at the last step.

        Raises:
            AdmissionError: the request cannot fit on this GPU even one image at a time.
            GenerationTimeoutError: it ran past GENERATION_TIMEOUT_SECONDS.
            OutOfMemoryError: the GPU ran out of memory, twice.
            BadImageError: the images hold NaN even after a float32 decode.
        """
        # 1. Admission: the LoRAs exist, and how many images fit at once (LoRAs included), or a refusal
        # before any work, sized by the largest pass.
        problems = self.loras.check(request.loras) + self.controlnets.check(request.controlnets)
        if problems:
            raise InputError(f"invalid input: {'; '.join(problems)}")
        width, height = request.output_size
        passes = tasks.passes(request, images, controls)
        texts = self._plan_texts(request, passes)
        plan = plan_sub_batch(
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
            prompt_bytes=self._prompt_bytes(texts),
        )
        steps = sum(step.denoising_steps for step in passes)
        job = _Job(
            request=request,
            passes=passes,
            images=images,
            timeout_s=timeout_s,
            total_steps=steps * len(sub_batches(request.num_images, plan.batch)),
            on_progress=on_progress,
            warnings=[],
            clock=self.clock,
        )

        # 2. Wait for the GPU: one request at a time. The deadline starts once it is ours.
        queued = time.perf_counter()
        with self._lock, torch.inference_mode(), self._models_offloaded_after():
            started = time.perf_counter()
            job.start()
            # 3. The job's LoRAs on and its ControlNets on the device, for this job only: off again when it
            # ends, however it ends.
            guidance = request.guidance_scale > 1
            with (
                self.loras.applied(request.loras) as loras,
                self.controlnets.for_job(request.controlnets, guidance=guidance) as job.controlnet,
            ):
                # 4. Encode the prompts as A1111 reads them (the text encoder is shared, so under the lock).
                job.schedule = self._encode_prompts(request, texts, job)

                # 5. Generate; after an OOM, free memory and retry frugally once.
                result = self._attempt(job, plan, frugal=False)
                if result is None:
                    # Outside the except block, so the failed run's tensors went with its traceback.
                    self._release_memory()
                    job.warnings.append(
                        "the GPU ran out of memory; the job was retried one image at a time with VAE tiling"
                    )
                    log.warning("out of GPU memory at %dx%d x%d; retrying frugally", width, height, request.num_images)
                    job.count_again(steps * request.num_images)
                    result = self._attempt(job, Plan(batch=1, vae_tiling=True), frugal=True)
                    if result is None:
                        self._release_memory()
                        raise OutOfMemoryError(self._oom_message(request))
            pictures, nsfw = result
            inference_ms = (time.perf_counter() - started) * 1000
        return Generation(
            images=pictures,
            seeds=request.seeds,
            inference_ms=inference_ms,
            queue_ms=(started - queued) * 1000,
            warnings=job.warnings,
            nsfw=nsfw,
            prompt_tokens=job.schedule.first.counts if job.schedule else {},
            embeddings={name: self.embeddings[name].short_hash for name in job.schedule.embeddings}
            if job.schedule
            else {},
            loras=loras,
        )

    def _plan_texts(self, request: GenerateRequest, passes: list[tasks.Pass]) -> prompts.TextPlan:
        """The texts prompt editing makes of both prompts in each pass, read before the GPU lock; a prompt
        that nests too deep or makes more than MAX_PROMPT_TEXTS texts is an input error."""
        try:
            return prompts.plan_texts(
                request.prompt_text,
                request.negative_prompt,
                [step.prompt_span for step in passes],
                max_texts=self.settings.max_prompt_texts,
            )
        except prompts.PromptError as error:
            raise InputError(f"invalid input: {error}") from None

    def _prompt_bytes(self, texts: prompts.TextPlan) -> int:
        """GPU memory the job's prompt embeddings may take: each text at MAX_PROMPT_CHUNKS chunks (its
        length is known only once tokenized, under the lock)."""
        width = int(self._pipeline.text_encoder.config.hidden_size)
        rows = self.settings.max_prompt_chunks * (prompts.CHUNK_TOKENS + 2)
        return len(texts.texts()) * rows * width * self.dtype.itemsize

    def _encode_prompts(self, request: GenerateRequest, texts: prompts.TextPlan, job: _Job) -> prompts.Schedule:
        """Both prompts' embeddings for each step of each pass, A1111's syntax read, each distinct text
        once; a prompt that cannot be encoded is an input error, and the deadline is checked after each text."""
        pipeline = self._pipeline
        try:
            return prompts.encode_schedule(
                texts,
                tokenizer=pipeline.tokenizer,
                text_encoder=pipeline.text_encoder,
                device=pipeline._execution_device,
                clip_skip=request.clip_skip,
                max_chunks=self.settings.max_prompt_chunks,
                embeddings=self.embeddings,
                on_encoded=job.texts_encoded,
            )
        except prompts.PromptError as error:
            raise InputError(f"invalid input: {error}") from None

    def _attempt(self, job: _Job, plan: Plan, *, frugal: bool) -> tuple[list[Image.Image], list[bool] | None] | None:
        """``_run``, or None when the GPU ran out of memory."""
        try:
            return self._run(job, plan, frugal=frugal)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if is_out_of_memory(error):
                return None
            raise

    def _run(self, job: _Job, plan: Plan, *, frugal: bool) -> tuple[list[Image.Image], list[bool] | None]:
        """Denoise and decode the request in sub-batches, as admission planned, pass after pass."""
        request = job.request
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
                    latents = self._denoise(job, index, latents, generators, indices)
                assert latents is not None
                decoded = self._decode(latents, indices, job.warnings)
            chunk_images, chunk_flags = self._finish(decoded, indices, job.warnings)
            chunk_flags = chunk_flags or [False] * len(indices)
            # A flagged image stays black: nothing of the input is pasted onto it.
            results += [
                image if flagged else canvas.paste_back(request, job.images, image)
                for image, flagged in zip(chunk_images, chunk_flags, strict=True)
            ]
            flags += chunk_flags
        return results, (flags if self._pipeline.safety_checker is not None else None)

    def _denoise(
        self,
        job: _Job,
        pass_index: int,
        previous: torch.Tensor | None,
        generators: list[torch.Generator],
        indices: list[int],
    ) -> torch.Tensor:
        """One pipeline call (the pass ``pass_index``) for the images ``indices``; returns its latents."""
        request, schedule, step = job.request, job.schedule, job.passes[pass_index]
        assert schedule is not None, "the prompts are encoded before the first pass"
        encoded = schedule.at(pass_index, 0)
        switches = len(schedule.passes[pass_index]) > 1
        arguments = step.arguments_for(len(indices))
        if step.upscale_to is not None:
            assert previous is not None, "an upscaling pass follows another"
            arguments["image"] = self._upscaled(previous, step, indices, job.warnings)
        pipeline = self._pipeline_for(
            request.scheduler, step.pipeline_class, job.controlnet if step.controlled else None
        )
        job.run_started(step.denoising_steps)
        latents = pipeline(
            prompt_embeds=encoded.prompt_embeds,
            negative_prompt_embeds=encoded.negative_prompt_embeds,
            num_inference_steps=step.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=len(indices),
            generator=generators,
            output_type="latent",
            callback_on_step_end=_PromptSwitch(job, pass_index, len(indices)) if switches else job.on_step_end,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"] if switches else ["latents"],
            **arguments,
        ).images
        job.run_finished()
        return latents

    def _upscaled(
        self, latents: torch.Tensor, step: tasks.Pass, indices: list[int], warnings: list[str]
    ) -> torch.Tensor | list[Image.Image]:
        """The previous pass's result at the hires size: latents enlarged, or images decoded and enlarged."""
        assert step.upscale_to is not None
        if step.upscaler == "latent":
            return tasks.upscale_latents(latents, step.upscale_to, self._pipeline.vae_scale_factor)
        images = self._pipeline.image_processor.postprocess(self._decode(latents, indices, warnings), output_type="pil")
        return [image.resize(step.upscale_to, Image.Resampling.LANCZOS) for image in images]

    def _decode(self, latents: torch.Tensor, indices: list[int], warnings: list[str]) -> torch.Tensor:
        """Latents -> images in [-1, 1]; a float32 decode again when fp16 overflowed to NaN or inf."""
        vae = self._pipeline.vae
        scaled = latents / vae.config.scaling_factor
        decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if bool(torch.isfinite(decoded).all()):
            return decoded
        dtype = str(vae.dtype).removeprefix("torch.")
        warnings.append(
            f"the VAE decode of image(s) {_listed(indices)} gave NaN or infinity in {dtype} "
            "(black images on some cards); they were decoded again in float32"
        )
        log.warning("NaN in the VAE decode of images %s; decoding again in float32", indices)
        original = vae.dtype
        # torch's own Module.to: diffusers' override warns on every cast about fp32 modules the VAE does not have.
        try:
            torch.nn.Module.to(vae, dtype=torch.float32)
            decoded = vae.decode(scaled.to(torch.float32), return_dict=False)[0]
        finally:
            torch.nn.Module.to(vae, dtype=original)
        if not bool(torch.isfinite(decoded).all()):
            raise BadImageError(
                f"image(s) {_listed(indices)} hold NaN or infinity even after a float32 VAE decode; "
                "try another seed or scheduler"
            )
        return decoded

    def _finish(
        self, decoded: torch.Tensor, indices: list[int], warnings: list[str]
    ) -> tuple[list[Image.Image], list[bool] | None]:
        """Run the safety checker when it is on, and turn the tensors into PIL images."""
        pipeline = self._pipeline
        # The checker's own dtype: after a float32 re-decode the images are float32, the checker is not.
        checker = pipeline.safety_checker
        checker_dtype = checker.dtype if checker is not None else self.dtype
        checked, flags = pipeline.run_safety_checker(decoded, self.device, checker_dtype)
        if flags is None:
            images = pipeline.image_processor.postprocess(decoded, output_type="pil")
        else:
            flags = [bool(flag) for flag in flags]
            # Flagged images were zeroed by the checker; not denormalizing them keeps them black.
            images = pipeline.image_processor.postprocess(
                checked, output_type="pil", do_denormalize=[not flag for flag in flags]
            )
            flagged = [index for index, flag in zip(indices, flags, strict=True) if flag]
            if flagged:
                warnings.append(f"image(s) {_listed(flagged)} flagged by the safety checker and blacked out")
        for index, image, flag in zip(indices, images, flags or [False] * len(indices), strict=True):
            if not flag and image.getextrema() in (((0, 0),) * 3, ((0, 0),)):
                warnings.append(f"image {index} is entirely black")
        return images, flags

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

    def _pipeline_for(
        self,
        scheduler_name: str,
        pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline,
        controlnet: Any = None,
    ) -> Any:
        """A new pipeline object of ``pipeline_class`` sharing the loaded models, with a fresh scheduler.

        Building it costs about a millisecond; it copies no weights. Every task's class takes
        the same components, so one copy of the weights serves them all.
        """
        base = self._pipeline
        scheduler = make_scheduler(scheduler_name, base.scheduler.config)
        components = {**base.components, "scheduler": scheduler}
        if controlnet is not None:
            components["controlnet"] = controlnet
        pipeline = pipeline_class(**components, requires_safety_checker=base.safety_checker is not None)
        pipeline.set_progress_bar_config(disable=not self.show_progress_bar, file=sys.stderr)
        return pipeline


class _PromptSwitch:
    """``callback_on_step_end`` for a pass whose prompts change (A1111's prompt editing): the job's own
    step-end work, then, when the next step's prompts differ, they replace the pipeline's embeddings."""

    def __init__(self, job: _Job, pass_index: int, images: int) -> None:
        assert job.schedule is not None
        self.job, self.pass_index, self.images = job, pass_index, images
        self.schedule = job.schedule
        self.current = self.schedule.at(pass_index, 0)

    def __call__(self, pipeline: Any, index: int, timestep: object, tensors: dict[str, Any]) -> dict[str, Any]:
        tensors = self.job.on_step_end(pipeline, index, timestep, tensors)
        # The next step's index from 0 is the number of steps done.
        upcoming = self.schedule.at(self.pass_index, self.job.steps_in_run(pipeline, index))
        if upcoming is not self.current:
            self.current = upcoming
            # As the pipeline lays them out: each prompt once per image, the negatives first under guidance.
            positive = upcoming.prompt_embeds.repeat(self.images, 1, 1)
            if pipeline.do_classifier_free_guidance:
                negative = upcoming.negative_prompt_embeds.repeat(self.images, 1, 1)
                positive = torch.cat([negative, positive])
            tensors["prompt_embeds"] = positive
        return tensors


def apply_offload(pipeline: DiffusionPipeline, profile: Profile, device: torch.device) -> None:
    """The CPU offload of ``profile`` on ``pipeline``, onto ``device``: the models in host memory and
    accelerate's hooks on them, model by model (low) or layer by layer (minimal). Called again, it
    rebuilds the hooks and sends every model back to host memory."""
    if profile is Profile.LOW:
        pipeline.enable_model_cpu_offload(device=device)
    elif profile is Profile.MINIMAL:
        pipeline.enable_sequential_cpu_offload(device=device)


def _fast_mode_applies(device: torch.device, profile: Profile) -> bool:
    """Whether FAST_MODE's speed-ups help here; says why not in the log.

    Pascal has no tensor cores and Triton does not support it, so it never gets them;
    offloaded models cannot be compiled in place.
    """
    if device.type != "cuda":
        log.warning("FAST_MODE ignored: it needs a CUDA GPU, and this worker runs on %s", device.type)
        return False
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 0):
        log.warning("FAST_MODE ignored on compute capability %d.%d (Pascal or older)", *capability)
        return False
    if profile in OFFLOADING:
        log.warning("FAST_MODE ignored with the %s profile: CPU offload and compilation do not mix", profile.value)
        return False
    return True


def _apply_fast_mode(pipeline: StableDiffusionPipeline, loras: Loras) -> None:
    """FAST_MODE's speed-ups: channels_last suits tensor cores; fused QKV projections make one
    matmul of three; regional compilation compiles the UNet's repeated transformer block once,
    so the compile costs seconds, not minutes.

    With LoRAs, the QKV projections stay apart (a fused ``to_qkv`` would bypass the LoRA layers
    on ``to_q``, ``to_k`` and ``to_v``), the UNet gets its hot-swap slots before it is compiled,
    and the compile may break the graph where PEFT's layers need it.
    """
    pipeline.unet.to(memory_format=torch.channels_last)
    pipeline.vae.to(memory_format=torch.channels_last)
    if loras.files:
        loras.prepare_slots()
        # Each transformer block is compiled for each width and for each number of LoRAs on (none, 1, 2, ...):
        # more variants than torch.compile keeps by default (8), after which it would run them uncompiled.
        limit = 8 * (loras.slot_count + 2)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        pipeline.unet.compile_repeated_blocks(fullgraph=False)
        log.info("FAST_MODE: channels_last, compiled UNet blocks with LoRA hot-swap slots; QKV projections unfused")
    else:
        pipeline.fuse_qkv_projections()
        pipeline.unet.compile_repeated_blocks(fullgraph=True)
        log.info("FAST_MODE: channels_last, fused QKV projections, compiled UNet blocks")


def _gpu_bytes(settings: Settings) -> int:
    """The GPU memory this worker may use: the card's, or GPU_MEMORY_GB, which also caps the process."""
    total = torch.cuda.get_device_properties(0).total_memory
    if settings.gpu_memory_gb is None:
        return int(total)
    allowed = min(int(settings.gpu_memory_gb * GIB), total)
    torch.cuda.set_per_process_memory_fraction(allowed / total)
    return allowed


class _LongPromptWarningFilter(logging.Filter):
    """Drops transformers' warning that a token sequence is longer than CLIP's 77.

    src/prompts.py tokenizes a long prompt whole and encodes it in chunks of 75, so
    nothing is cut, and the warning would tell the log the opposite.
    """

    MESSAGE = "Token indices sequence length is longer than the specified maximum"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGE)


_LONG_PROMPT_FILTER = _LongPromptWarningFilter()
_LONG_PROMPT_LOGGERS = ("transformers.tokenization_utils_base",)


def _drop_long_prompt_warnings() -> None:
    for name in _LONG_PROMPT_LOGGERS:
        logger = logging.getLogger(name)
        if _LONG_PROMPT_FILTER not in logger.filters:
            logger.addFilter(_LONG_PROMPT_FILTER)


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


def _listed(indices: list[int]) -> str:
    return ", ".join(str(index) for index in indices)
