"""Where a job's time on the device goes: text encoding, denoising, decoding, the pictures made.

On a GPU each mark is a CUDA event recorded on the stream, so timing costs no synchronisation: the times are
read once the job's pictures are on the host, when the stream has reached every mark. On the CPU each mark is
the clock. A phase's time is from the mark before it to its own; a phase marked twice (the denoising of each
pass, each sub-batch) adds up.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# The phases, in the order a job passes through them.
PHASES = ("text_encoding", "denoising", "hires_upscale", "decoding", "to_images")


class Phases:
    """Marks at the end of each phase of one job, on ``device``'s clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        """The job has the device: its first phase begins."""
        self._marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        """``phase`` ends now (and the next begins)."""
        if self._marks:
            self._marks.append((phase, self._now()))

    def milliseconds(self) -> dict[str, float]:
        """Each phase's time, in ``PHASES`` order; only the phases the job went through. Waits for the device to
        reach the last mark."""
        if len(self._marks) < 2:
            return {}
        if self.cuda:
            self._marks[-1][1].synchronize()
        spent: dict[str, float] = {}
        for (_, before), (phase, after) in zip(self._marks, self._marks[1:], strict=False):
            elapsed = before.elapsed_time(after) if self.cuda else (after - before) * 1000
            spent[phase] = spent.get(phase, 0.0) + elapsed
        return {phase: round(spent[phase], 1) for phase in PHASES if phase in spent}
