"""How jobs overlap in one worker: each blocking stage in a thread, a cap on jobs in host memory, cancellation.

runpod awaits the handler on its event loop, with up to ``CONCURRENCY`` jobs at once. Each stage of a job
blocks, so each runs in a thread and the loop stays free to take jobs, post results and hear stop signals:
``prepare`` (reading, fetching and decoding its inputs) and ``finish`` (encoding and uploading its images)
in a pool of threads, many jobs at once; ``run`` (the GPU) in one thread of its own, jobs one after
another in the order they got there. All GPU work, and the large tensors torch allocates and frees for it,
stay on that one thread: its memory is reused job after job instead of spread over the pool's threads'
allocator arenas. A job holds one of ``MAX_JOBS_IN_MEMORY`` slots from its first stage to its last, which
bounds the decoded inputs and encoded outputs held at once.

When runpod stops a job (``task.cancel()``), a stage that has not started is dropped; one that runs cannot
be interrupted: the job's ``cancelled`` event is set, the engine stops the job at its next step, and the job
leaves only once its thread has ended, so that its memory and the GPU are free when runpod counts it gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")

# Each job runs one CPU stage at a time, and CONCURRENCY is at most 8: more threads would never be used.
_CPU_THREADS = 8
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# Set on the GPU's thread, and only there.
_gpu_thread = threading.local()


def _mark_gpu_thread() -> None:
    _gpu_thread.marked = True


def _pool(name: str) -> ThreadPoolExecutor:
    """The threads of a kind of stage, started on first use: ``cpu`` (prepare, finish) or ``gpu`` (run)."""
    with _pools_lock:
        if name not in _pools:
            threads = 1 if name == "gpu" else _CPU_THREADS
            _pools[name] = ThreadPoolExecutor(
                max_workers=threads,
                thread_name_prefix=f"job-{name}",
                initializer=_mark_gpu_thread if name == "gpu" else None,
            )
        return _pools[name]


def on_gpu_thread(stage: Callable[[], T]) -> T:
    """Run ``stage`` on the GPU's thread, the one that runs the jobs' ``run`` stages, and return what it returns;
    on that thread already (an engine loaded by a job's first ``run``), it runs there and then."""
    if getattr(_gpu_thread, "marked", False):
        return stage()
    return _pool("gpu").submit(stage).result()


async def in_thread(stage: Callable[[], T], cancelled: threading.Event, *, gpu: bool = False) -> T:
    """Run ``stage`` in a thread (the GPU's own when ``gpu``) and return what it returns.

    If the awaiting task is cancelled meanwhile, a stage still waiting for its thread is dropped; a running
    one gets ``cancelled`` set, and the cancellation goes on once it has ended (whatever it returned or
    raised is dropped), however many more times the task is cancelled while it waits: until then the job
    still holds the GPU, its memory and its files.
    """
    work = _pool("gpu" if gpu else "cpu").submit(stage)
    result = asyncio.wrap_future(work)
    try:
        return await asyncio.shield(result)
    except asyncio.CancelledError:
        cancelled.set()
        if not work.cancel():
            while not result.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([result])
            if not result.cancelled():
                result.exception()  # retrieved: the job is gone, and its end is no one's to report
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
