"""What the worker changes in runpod's job loop (runpod 1.12.0, pinned), applied when it starts serving.

runpod posts each result, and each progress report, through aiohttp_retry's ``FibonacciRetry(attempts=3)``
given no exception types, and aiohttp_retry retries only the types it is given: a 5xx answer is retried,
but a connection that drops before RunPod answers loses the job's result (runpod logs "Failed to return
job results" and goes on). ``retry_dropped_result_posts`` has runpod's poster retry those too, with the
same three attempts and backoff; tests/test_job_loop.py drops a result post's connection and sees the
result arrive once. A post that RunPod received but could not answer is then sent twice, which RunPod
takes as one result for the job.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp_retry import FibonacciRetry, RetryClient

# The failures of a post that say nothing reached RunPod's answer: the connection refused, reset or dropped,
# the answer cut short, or no answer in time.
RETRIED_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


async def _transmit(client_session: aiohttp.ClientSession, url: str, job_data: str) -> None:
    """runpod's ``rp_http._transmit``, retrying ``RETRIED_ERRORS`` as well as 5xx answers."""
    retry_client = RetryClient(
        client_session=client_session, retry_options=FibonacciRetry(attempts=3, exceptions=set(RETRIED_ERRORS))
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
