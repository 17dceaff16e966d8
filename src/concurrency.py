"""How jobs overlap in one worker: each blocking stage in a thread, a cap on jobs in host memory, cancellation.

runpod awaits the handler on its event loop, with up to ``CONCURRENCY`` jobs at once. Each stage of a job
(``prepare``: reading, fetching and decoding its inputs; ``run``: the GPU, under the engine's lock;
``finish``: encoding and uploading its images) blocks, so each runs in a thread of one pool, and the loop
stays free to take jobs, post results and hear stop signals. A job holds one of ``MAX_JOBS_IN_MEMORY`` slots
from its first stage to its last, which bounds the decoded inputs and encoded outputs held at once.

When runpod stops a job (``task.cancel()``), the stage running in its thread cannot be interrupted: the job's
``cancelled`` event is set, the engine stops the job at its next step (or while it waits for the GPU), and the
job leaves only once its thread has ended, so that its memory and the GPU are free when runpod counts it gone.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")

# Each job runs one stage at a time, and CONCURRENCY is at most 8: more threads would never be used.
_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _stages_pool() -> ThreadPoolExecutor:
    """The threads jobs' stages run in, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="job")
        return _pool


async def in_thread(stage: Callable[[], T], cancelled: threading.Event) -> T:
    """Run ``stage`` in a thread and return what it returns.

    If the awaiting task is cancelled meanwhile, ``cancelled`` is set for the stage to see, and the
    cancellation goes on once the stage has ended (whatever it returned or raised is dropped).
    """
    future = asyncio.get_running_loop().run_in_executor(_stages_pool(), stage)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancelled.set()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the job is gone, and its end is no one's to report
        raise


class JobSlots:
    """At most ``limit`` jobs at once between ``held`` and its end, counted per event loop.

    runpod runs one loop for the worker's life; tests and local runs may start a loop per job, and an
    ``asyncio.Semaphore`` belongs to the loop that first waits on it.
    """

    def __init__(self) -> None:
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )

    @asynccontextmanager
    async def held(self, limit: int) -> AsyncIterator[None]:
        """Wait for a free slot of ``limit``, hold it in the block, free it after."""
        loop = asyncio.get_running_loop()
        known = self._semaphores.get(loop)
        if known is None or known[0] != limit:
            known = self._semaphores[loop] = (limit, asyncio.Semaphore(limit))
        async with known[1]:
            yield
