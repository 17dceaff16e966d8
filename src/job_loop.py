"""What the worker changes in runpod's job loop (runpod 1.12.0, pinned), applied when it starts serving.

**Dropped result posts.** runpod posts each result, and each progress report, through aiohttp_retry's
``FibonacciRetry(attempts=3)`` given no exception types, and aiohttp_retry retries only the types it is
given: a 5xx answer is retried, but a connection that drops before RunPod answers loses the job's result
(runpod logs "Failed to return job results" and goes on). ``retry_dropped_result_posts`` has runpod's
poster retry those too, with the same three attempts and backoff; tests/test_job_loop.py drops a result
post's connection and sees the result arrive once. A post that RunPod received but could not answer is then
sent twice, which RunPod takes as one result for the job.

**Stops before a job starts.** runpod stops a job by cancelling its task; a stop that arrives after runpod
took the job but before it started the job's task finds no task, and runpod drops it ("No in-progress job"),
so the job runs in full. And a stop that arrives once runpod has made the job's task but before the task's
first step cancels a coroutine that never ran: runpod's ``handle_job`` and its ``finally`` never run, the job
stays in runpod's count for good, and a worker at CONCURRENCY=1 takes no more jobs.
``remember_stops_before_start`` keeps such a stop instead, and the handler asks ``stopped_before_start`` as
the job begins: the job then ends as a stopped one, with no result posted.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Jobs RunPod stopped after runpod took them and before it started them; each is forgotten when it begins.
_stopped_before_start: set[str] = set()


async def _transmit(client_session: Any, url: str, job_data: str) -> None:
    """runpod's ``rp_http._transmit``, retrying a dropped connection or a timeout as well as 5xx answers."""
    import asyncio

    import aiohttp
    from aiohttp_retry import FibonacciRetry, RetryClient

    retried = {aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError}
    retry_client = RetryClient(
        client_session=client_session, retry_options=FibonacciRetry(attempts=3, exceptions=retried)
    )
    kwargs: dict[str, Any] = {
        "data": job_data,
        "headers": {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded"},
        "raise_for_status": True,
    }
    async with retry_client.post(url, **kwargs) as client_response:
        await client_response.text()


def retry_dropped_result_posts() -> None:
    """Have runpod retry a result or progress post whose connection dropped (see the module's docstring)."""
    from runpod.serverless.modules import rp_http

    rp_http._transmit = _transmit


def remember_stops_before_start() -> None:
    """Have runpod keep a stop for a job it took but has not started (see the module's docstring)."""
    from runpod.serverless.modules import rp_scale
    from runpod.serverless.modules.worker_state import JobsProgress

    stop_running_job = rp_scale.JobScaler.stop_job

    async def stop_job(self: rp_scale.JobScaler, job_id: str) -> bool:
        task = self.jobs_tasks.get(job_id)
        if task is None or _started(task):
            if await stop_running_job(self, job_id):
                return True
            if JobsProgress().get(job_id) is None:
                return False
        log.info("job %s stopped before it started; it will end when runpod starts it", job_id)
        _stopped_before_start.add(job_id)
        return True

    rp_scale.JobScaler.stop_job = stop_job


def _started(task: Any) -> bool:
    """Whether ``task`` has run its first step (a cancelled task that never ran skips its ``finally``)."""
    import inspect

    return task.done() or inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED


def stopped_before_start(job_id: str | None) -> bool:
    """Whether RunPod stopped job ``job_id`` before runpod started it (asked once, as the job begins)."""
    if job_id in _stopped_before_start:
        _stopped_before_start.discard(job_id)
        return True
    return False
