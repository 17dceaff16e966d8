"""One job while it holds the GPU: its deadline, its progress, and the prompts that change between steps.

The job's clock starts when it gets the GPU; every denoising step and every encoded prompt text checks
the deadline and whether the job was cancelled, and progress goes out about once a second, counted in
the steps the request asked for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from src.errors import GenerationTimeoutError, JobCancelledError
from src.prepare import JobPlan
from src.prepare.canvas import TaskImages
from src.prepare.passes import Pass
from src.prompts.encoding import Schedule
from src.run.memory import sub_batches
from src.run.phases import Phases
from src.schema import GenerateRequest

# At most one progress report per this many seconds.
PROGRESS_INTERVAL_S = 1.0

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class JobState:
    """The state of one request while it runs: its deadline, progress and warnings.

    Steps are counted as the user asked for them. Second-order schedulers (Heun,
    DPM2) run the UNet about twice per step and PNDM once more than asked, so the
    pipeline's own step index is mapped onto the request's steps.
    """

    request: GenerateRequest
    # The pipeline calls it makes, and its input images at its size (None for text-to-image).
    passes: tuple[Pass, ...]
    images: TaskImages | None
    timeout_s: float
    total_steps: int
    on_progress: ProgressCallback | None
    warnings: list[str]
    # Seconds, monotonic: the engine's clock.
    clock: Callable[[], float] = time.monotonic
    # Set from another thread when the job is cancelled; the job stops at its next check.
    cancelled: threading.Event | None = None
    # Set when the job gets the GPU: time spent waiting for it is not the job's.
    # Both prompts' embeddings for every step of every pass, encoded once the job has the GPU.
    schedule: Schedule | None = None
    # The job's ControlNet units as one model for its pipelines, while it holds the GPU.
    controlnet: Any = None
    # The engine's upscalers, for a hires pass through a model of UPSCALER_DIR.
    upscalers: Any = None
    # Called with a pass's index before its pipeline call (after the previous pass's image is decoded and
    # enlarged): the engine swaps in the pass's model (hires.model) and its prompts' embeddings.
    before_pass: Callable[[int], None] | None = None
    # Where its time on the device goes (src/run/phases.py); None: not timed.
    phases: Phases | None = None
    deadline: float = float("inf")
    # Steps of the pipeline call running now, and of those finished before it, as the request counts them.
    run_steps: int = 0
    steps_before: int = 0
    last_report: float = 0.0
    last_reported_step: int = 0

    @classmethod
    def for_plan(cls, plan: JobPlan, *, batch: int, timeout_s: float, on_progress: ProgressCallback | None) -> JobState:
        """The state of ``plan`` before it runs, its images in sub-batches of ``batch``."""
        request = plan.request
        return cls(
            request=request,
            passes=plan.passes,
            images=plan.images,
            timeout_s=timeout_s,
            total_steps=sum(step.denoising_steps for step in plan.passes) * len(sub_batches(request.num_images, batch)),
            on_progress=on_progress,
            warnings=[],
        )

    @property
    def steps_per_image(self) -> int:
        """The denoising steps of one image, all passes together."""
        return sum(step.denoising_steps for step in self.passes)

    def start(self) -> None:
        """Start the clock: the job holds the GPU from now on.

        Raises:
            JobCancelledError: the job was cancelled while it waited for the GPU.
        """
        self.deadline = self.clock() + self.timeout_s
        self._stop_if_cancelled_or_late(self.clock(), "before its first step")
        if self.phases is not None:
            self.phases.start()

    def phase_ended(self, phase: str) -> None:
        """One of ``PHASES`` ends now (src/run/phases.py)."""
        if self.phases is not None:
            self.phases.mark(phase)

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
        self._stop_if_cancelled_or_late(now, f"at denoising step {max(steps_done, 1)} of {self.total_steps}")

    def texts_encoded(self, done: int, total: int) -> None:
        """``done`` of the job's ``total`` prompt texts are encoded: stop the job when it is late."""
        self._stop_if_cancelled_or_late(self.clock(), f"while encoding the prompts ({done} of {total} texts)")

    def _stop_if_cancelled_or_late(self, now: float, where: str) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise JobCancelledError(f"the job was cancelled; it stopped {where}")
        if now > self.deadline:
            raise GenerationTimeoutError(
                f"generation stopped: it ran past GENERATION_TIMEOUT_SECONDS={self.timeout_s:g} {where}"
            )


class PromptSwitch:
    """``callback_on_step_end`` for a pass whose prompts change (A1111's prompt editing): the job's own
    step-end work, then, when the next step's prompts differ, they replace the pipeline's embeddings."""

    def __init__(self, job: JobState, pass_index: int, images: int) -> None:
        assert job.schedule is not None
        self.job, self.pass_index, self.images = job, pass_index, images
        self.schedule = job.schedule
        self.current = self.schedule.at(pass_index, 0)

    def __call__(self, pipeline: Any, index: int, timestep: object, tensors: dict[str, Any]) -> dict[str, Any]:
        tensors = self.job.on_step_end(pipeline, index, timestep, tensors)
        # A1111 compares its denoiser's count of model calls so far: each of the pipeline's iterations is one
        # call, in k-diffusion's order (a second-order sampler's span counts calls, ``src.prepare.passes``).
        upcoming = self.schedule.at(self.pass_index, index + 1)
        if upcoming is not self.current:
            self.current = upcoming
            # As the pipeline lays them out: each prompt once per image, the negatives first under guidance.
            positive = upcoming.prompt_embeds.repeat(self.images, 1, 1)
            if pipeline.do_classifier_free_guidance:
                negative = upcoming.negative_prompt_embeds.repeat(self.images, 1, 1)
                positive = torch.cat([negative, positive])
            tensors["prompt_embeds"] = positive
        return tensors
