"""Stage 3 of a job, on the CPU after the GPU lock: the pictures become the answer.

``finish`` encodes each image with A1111's parameters inside (``outputs``, ``parameters``), delivers it
inline or to S3 and assembles the response with its metadata (``response``); an upscale job's answer is
``upscaled``'s, and an A1111 request's is put in A1111's shape (``a1111``). It holds no GPU state: jobs
may finish while another job runs. It may import every stage before it, and nothing imports it but
``handler`` and the tools (``local``, ``docs``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

from src.finish.a1111 import a1111_answer, a1111_upscale_answer
from src.finish.response import Route, check_answer_size, encode_response
from src.finish.upscaled import encode_upscale_response
from src.prepare import UpscalePlan

if TYPE_CHECKING:
    from src.prepare import JobPlan
    from src.run.engine import Generation
    from src.run.upscale import Upscaled
    from src.settings import Settings
    from src.storage import S3Storage

__all__ = ["encode_response", "encode_upscale_response", "finish"]


def finish(
    plan: JobPlan | UpscalePlan,
    generation: Generation | Upscaled,
    *,
    settings: Settings,
    storage: S3Storage | None,
    job_id: str,
    started: float,
    cancelled: threading.Event | None = None,
) -> dict[str, Any]:
    """The job's response as RunPod returns it: its images inline or uploaded, and its metadata.

    ``started`` is the ``time.perf_counter()`` reading taken when the job arrived; once ``cancelled`` is set, no
    image is uploaded.

    Raises:
        StorageError: an upload failed and the request asked for ``s3`` explicitly.
        ResponseTooLargeError: the inline answer (an A1111 answer's echoed payload included) is over
            ``MAX_RESPONSE_MB``.
        JobCancelledError: the job was cancelled before its images were uploaded.
    """
    route = Route(settings, storage, job_id, cancelled)
    if isinstance(plan, UpscalePlan):  # its run gave an Upscaled
        answer = encode_upscale_response(plan, cast("Upscaled", generation), route, started=started)
        if plan.a1111 is None:
            return answer.model_dump(exclude_none=True)
        return check_answer_size(a1111_upscale_answer(plan.a1111, plan, answer), plan.request, settings)
    made = cast("Generation", generation)
    # An A1111 answer is measured whole, as it goes: with send_images false it holds no image.
    response = encode_response(
        plan.request, made, route, started=started, inputs=plan.inputs, measured=plan.a1111 is None
    )
    if plan.a1111 is None:
        return response.model_dump(exclude_none=True)
    return check_answer_size(a1111_answer(plan.a1111, plan, made, response), plan.inputs, settings)
