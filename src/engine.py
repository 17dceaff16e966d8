"""The warm pipeline: loaded once, shared by every request, one request on it at a time.

Each request gets its own scheduler and its own light pipeline object around
the shared models, so nothing shared is mutated per request. Each image gets
its own CPU ``torch.Generator`` seeded with its own seed, so a seed means the
same image on every device and image i of a batch can be regenerated alone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from src.loader import load_pipeline, resolve_device, resolve_dtype
from src.schedulers import make_scheduler
from src.schema import GenerateRequest
from src.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """What one request produced, before encoding."""

    images: list[Image.Image]
    seeds: list[int]
    inference_ms: float
    warnings: list[str] = field(default_factory=list)


class Engine:
    """Owns the loaded pipeline and runs requests on it."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        settings: Settings,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self._pipeline = pipeline
        # Serializes GPU work: one request holds the models at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Resolve the device and dtype, and load the model named by ``settings``.

        Raises:
            ModelLoadError: the model cannot be loaded; the message says what to do.
        """
        started = time.perf_counter()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        pipeline = load_pipeline(settings, device, dtype)
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            settings.model_id,
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        return cls(pipeline, settings=settings, device=device, dtype=dtype)

    @property
    def model_name(self) -> str:
        """The model as the response reports it: MODEL_ID, with @revision when one is set."""
        revision = self.settings.model_revision
        return f"{self.settings.model_id}@{revision}" if revision else self.settings.model_id

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def generate(self, request: GenerateRequest) -> Generation:
        """Run one request and return its images, in seed order.

        Raises whatever the pipeline raises; the caller decides how to answer.
        """
        # 1. Say what the text encoder will not see.
        warnings = self._prompt_warnings(request)

        # 2. A pipeline object of the request's own, around the shared models.
        pipeline = self._pipeline_for(request.scheduler)

        # 3. One CPU generator per image, so that image i depends on seed i alone.
        seeds = request.seeds
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]

        # 4. Encode the prompt, denoise and decode, one request at a time.
        with self._lock:
            started = time.perf_counter()
            output = pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=request.width,
                height=request.height,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.num_images,
                generator=generators,
                output_type="pil",
            )
            inference_ms = (time.perf_counter() - started) * 1000
        return Generation(images=list(output.images), seeds=seeds, inference_ms=inference_ms, warnings=warnings)

    def _pipeline_for(self, scheduler_name: str) -> StableDiffusionPipeline:
        """A new pipeline object sharing the loaded models, with a fresh scheduler.

        Building it costs about a millisecond; it copies no weights.
        """
        base = self._pipeline
        scheduler = make_scheduler(scheduler_name, base.scheduler.config)
        pipeline = type(base)(
            **{**base.components, "scheduler": scheduler},
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _prompt_warnings(self, request: GenerateRequest) -> list[str]:
        tokenizer = self._pipeline.tokenizer
        limit = tokenizer.model_max_length
        warnings = []
        for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            tokens = len(tokenizer(text, truncation=False).input_ids)
            if tokens > limit:
                warnings.append(
                    f"{name} is {tokens} tokens; CLIP reads the first {limit} "
                    "(start and end markers included) and ignores the rest"
                )
        return warnings
