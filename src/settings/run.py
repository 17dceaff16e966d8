"""How a job runs: prompt encoding limits, GPU memory, the deadline, the safety checker, concurrency, fast mode."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class RunSettings(BaseModel):
    """The run's variables: ``MAX_PROMPT_CHUNKS`` to ``COMPILE_CACHE_DIR``."""

    max_prompt_chunks: int = Field(
        8,
        alias="MAX_PROMPT_CHUNKS",
        ge=1,
        le=64,
        description="Most chunks of 75 tokens a prompt may encode to (8: 600 tokens); 1 to 64.",
    )
    max_prompt_texts: int = Field(
        64,
        alias="MAX_PROMPT_TEXTS",
        ge=2,
        le=1000,
        description="Most distinct texts prompt editing (`[a:b:when]`, `[a|b]`) may make of one job's prompt and "
        "negative prompt over all its passes, each encoded by CLIP before the first step; 2 to 1000.",
    )
    memory_profile: Literal["auto", "high", "balanced", "low", "minimal"] = Field(
        "auto",
        alias="MEMORY_PROFILE",
        description="`auto` picks by GPU memory: `high` 10 GiB or more, `balanced` 5.5 to 10 GiB "
        "(a GTX 1060 6GB reports 5.93 GiB), `low` 4 to 5.5 GiB, `minimal` below 4 GiB; then down to the first "
        "of those that takes one 512² image in the worker's `DTYPE` (`float32` doubles the weights).",
    )
    gpu_memory_gb: float | None = Field(
        None,
        alias="GPU_MEMORY_GB",
        gt=0,
        description="Use at most this much GPU memory, in GiB (2^30 bytes), such as `7.5`; "
        "it caps this process. Unset: the whole card.",
    )
    generation_timeout_seconds: float = Field(
        300.0,
        alias="GENERATION_TIMEOUT_SECONDS",
        gt=0,
        description="A job still denoising this long after it got the GPU is stopped at its next step and "
        "answered with an error. Time spent waiting for the GPU does not count.",
    )
    safety_checker: bool = Field(
        False,
        alias="SAFETY_CHECKER",
        description="Load SD's safety checker; each image then carries `nsfw` and flagged images are blacked out.",
    )
    concurrency: int = Field(
        1,
        alias="CONCURRENCY",
        ge=1,
        le=8,
        description="Jobs runpod takes for this worker at once. They overlap where they can: while one job "
        "holds the GPU, the others read and decode their inputs or encode and upload their images; the GPU "
        "runs one job at a time (docs/memory.md, Concurrency). 2 keeps a GPU busy when jobs fetch images "
        "or upload to S3.",
    )
    max_jobs_in_memory: int | None = Field(
        None,
        alias="MAX_JOBS_IN_MEMORY",
        ge=1,
        le=8,
        description="Most jobs that may hold decoded input images or encoded outputs in host memory at once; "
        "the others wait before reading their inputs. Unset: CONCURRENCY.",
    )
    fast_mode: bool = Field(
        False,
        alias="FAST_MODE",
        description="On GPUs of compute capability 7.0 or newer: channels_last, fused QKV, the whole UNet compiled "
        "with dynamic shapes and, in the high memory profile, replayed as CUDA graphs; the VAE decoder compiled; "
        "a warm-up at start that compiles, and falls back to the uncompiled modules if compiling fails. Not yet "
        "timed on a GPU (BENCHMARKS.md); its earlier form, compiled transformer blocks, ran 0.82x to 0.90x plain "
        "diffusers' speed on an H200. Ignored, with a warning, elsewhere.",
    )
    compile_cache_dir: str | None = Field(
        None,
        alias="COMPILE_CACHE_DIR",
        description="Folder (such as `/runpod-volume/compile-cache`) where FAST_MODE keeps what torch.compile made "
        "at its warm-up (torch's cache artifacts), one file per GPU, compute capability, torch version, dtype and "
        "UNet shape; the next workers load it before they compile, so their cold start skips most of the "
        "compilation. Unset: compiled at every start.",
    )

    @property
    def jobs_in_memory(self) -> int:
        """How many jobs may hold their images in host memory at once (MAX_JOBS_IN_MEMORY, else CONCURRENCY)."""
        return self.max_jobs_in_memory or self.concurrency

    @field_validator("memory_profile", mode="before")
    @classmethod
    def _lower_memory_profile(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value
