"""Jobs that overlap in one worker, inside runpod's own job loop: the handler is a coroutine, each stage of a
job runs in a thread, a job waiting for its input does not hold back the next one, MAX_JOBS_IN_MEMORY bounds
the jobs in host memory, and a cancelled job stops at its next step and frees the GPU.

The jobs run through ``rp_scale.JobScaler.run_jobs``, the loop runpod runs on RunPod (a task per job, each
awaiting ``rp_job.run_job``), on the tiny model. Order is decided by events, never by the clock: an image
server on loopback holds its answer until the test releases it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from runpod.serverless.modules import rp_job, rp_scale

import handler
from bench.overlap import ImageServer, input_png
from src import job_loop
from tests.test_resilience import WatchedLock, injected

pytestmark = pytest.mark.usefixtures("worker")

TEXT = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
# How long the image server holds an answer at most: a bound for a test that fails, never a speed assumption.
HOLD_LIMIT_S = 60.0


class HeldImages(ImageServer):
    """An image server that holds each answer until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__(input_png(64), lambda _path: self.release.wait(HOLD_LIMIT_S))


@pytest.fixture
def images(configure: Callable[..., None]) -> Iterator[HeldImages]:
    configure(IMAGE_URLS_ALLOW_PRIVATE="true", CONCURRENCY="2")
    server = HeldImages()
    try:
        yield server
    finally:
        server.release.set()
        server.close()


class _StoppedAtCreation(dict):  # type: ignore[type-arg]
    """runpod's ``jobs_tasks``, which stops the jobs named in ``stopped`` the moment runpod files their task,
    before the task's first step: a stop that lands in that window."""

    def __init__(self, scaler: Any, stopped: tuple[str, ...]) -> None:
        super().__init__()
        self.scaler, self.stopped = scaler, stopped

    def __setitem__(self, job_id: str, task: Any) -> None:
        super().__setitem__(job_id, task)
        if job_id in self.stopped:
            stop = self.scaler.stop_job(job_id)
            with pytest.raises(StopIteration) as done:  # stop_job awaits nothing that suspends
                stop.send(None)
            assert done.value.value, f"runpod dropped the stop for {job_id}"


def run_in_runpods_loop(
    jobs: list[dict[str, Any]],
    on_result: Callable[[str, dict[str, Any]], None] = lambda _id, _result: None,
    stopped: tuple[str, ...] = (),
    stopped_at_start: tuple[str, ...] = (),
) -> list[tuple[str, dict[str, Any]]]:
    """``jobs`` through runpod's ``JobScaler.run_jobs`` at concurrency 2, as taken from RunPod at once;
    returns each job's id and result, in the order they ended. ``on_result`` is called as each ends; the
    jobs named in ``stopped`` are stopped (``JobScaler.stop_job``) once taken, before runpod starts them,
    those in ``stopped_at_start`` as runpod creates their task. Every job has left runpod's count after."""
    ended: list[tuple[str, dict[str, Any]]] = []

    async def handle(_session: Any, _config: dict[str, Any], job: dict[str, Any]) -> None:
        result = await rp_job.run_job(handler.handler, job)
        ended.append((job["id"], result))
        on_result(job["id"], result)

    async def run() -> None:
        scaler = rp_scale.JobScaler({"handler": handler.handler})
        scaler.jobs_handler = handle
        scaler.jobs_tasks = _StoppedAtCreation(scaler, stopped_at_start)
        scaler.current_concurrency = 2
        scaler.jobs_queue = asyncio.Queue(maxsize=len(jobs))
        for job in jobs:
            scaler.job_progress.add(job)
            await scaler.jobs_queue.put(job)
        for job_id in stopped:
            assert await scaler.stop_job(job_id), f"runpod dropped the stop for {job_id}"
        scaler._shutdown_event.set()  # run_jobs drains the queue, then returns
        await scaler.run_jobs(None)  # type: ignore[arg-type]
        left = [job["id"] for job in jobs if scaler.job_progress.get(job["id"]) is not None]
        assert not left, f"runpod still counts {left} in progress: the worker would take no more jobs"

    asyncio.run(run())
    return ended


def img2img_from(url: str, job_id: str = "from-url") -> dict[str, Any]:
    return {"id": job_id, "input": {**TEXT, "image": url, "strength": 0.5}}


def test_the_handler_is_a_coroutine_that_runpod_awaits() -> None:
    assert inspect.iscoroutinefunction(handler.handler)


def test_a_job_waiting_for_its_input_image_does_not_hold_back_the_next(images: HeldImages) -> None:
    """Job 1 waits for its image; job 2 (text only) runs and ends meanwhile, and only then is the image sent."""

    def release_after_text(job_id: str, _result: dict[str, Any]) -> None:
        if job_id == "text":
            images.release.set()

    ended = run_in_runpods_loop(
        [img2img_from(f"{images.url}/a.png"), {"id": "text", "input": TEXT}], release_after_text
    )

    assert [job_id for job_id, _ in ended] == ["text", "from-url"]
    assert all("output" in result and "images" in result["output"] for _, result in ended), ended


def test_max_jobs_in_memory_keeps_the_next_job_out_until_one_ends(
    images: HeldImages, configure: Callable[..., None]
) -> None:
    """With one slot, job 2 does not even ask for its image while job 1 waits for its own; the server lets
    go after a while. Without the bound both requests arrive at once (and the job above ends first)."""
    configure(MAX_JOBS_IN_MEMORY="1")
    released_by_timer = threading.Timer(2.0, images.release.set)
    released_by_timer.start()
    try:
        ended = run_in_runpods_loop(
            [img2img_from(f"{images.url}/a.png", "a"), img2img_from(f"{images.url}/b.png", "b")]
        )
    finally:
        released_by_timer.cancel()

    assert images.events == ["request /a.png", "answer /a.png", "request /b.png", "answer /b.png"]
    assert [job_id for job_id, _ in ended] == ["a", "b"]


def test_jobs_that_overlap_give_the_bytes_they_give_one_at_a_time(configure: Callable[..., None]) -> None:
    configure(CONCURRENCY="2")
    jobs = [{"id": f"seed-{seed}", "input": {**TEXT, "seed": seed, "num_images": 2}} for seed in (1, 2, 3, 4)]
    alone = {job["id"]: asyncio.run(handler.handler(job))["images"] for job in jobs}

    together = dict(run_in_runpods_loop(jobs))

    assert {job_id: result["output"]["images"] for job_id, result in together.items()} == alone


def test_a_cancelled_job_stops_at_its_next_step_and_frees_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """runpod stops a job by cancelling its task: the job's thread stops at the next denoising step, the task
    ends cancelled (runpod posts no result for it), and the next job gets the GPU."""
    engine = handler.get_engine()
    steps = 50
    first_step, cancel_sent = threading.Event(), threading.Event()
    unet_calls = [0]

    def count(_call: int, _inputs: Any, output: Any) -> Any:
        unet_calls[0] += 1
        first_step.set()
        # The job stays in its first step until the cancellation is sent: however fast the machine.
        cancel_sent.wait(HOLD_LIMIT_S)
        return output

    async def cancel_while_running() -> None:
        task = asyncio.create_task(handler.handler({"id": "long", "input": {**TEXT, "num_inference_steps": steps}}))
        await asyncio.to_thread(first_step.wait, HOLD_LIMIT_S)
        task.cancel()
        # One turn of the loop: the task takes the cancellation, which sets the job's event, before the held step
        # returns (the loop runs ready callbacks in order, so this is the order, not a matter of speed).
        await asyncio.sleep(0)
        cancel_sent.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    with injected(engine._pipeline.unet, count):
        asyncio.run(cancel_while_running())
        calls_when_cancelled = unet_calls[0]

    assert first_step.is_set()
    # The task ends only once its thread has stopped, so the count is final: the job stopped after its first step.
    assert calls_when_cancelled == 1
    assert not engine._lock.locked()
    after = asyncio.run(handler.handler({"id": "next", "input": TEXT}))
    assert "images" in after, after


def test_a_job_stopped_twice_leaves_only_once_its_gpu_stage_has_ended() -> None:
    """runpod may stop a job twice (a re-sent stop, a cancel then a timeout): the task keeps waiting for its
    thread, which still holds the GPU, its memory and its files, until the thread ends."""
    engine = handler.get_engine()
    in_step, step_may_end = threading.Event(), threading.Event()

    def hold(_call: int, _inputs: Any, output: Any) -> Any:
        in_step.set()
        step_may_end.wait(HOLD_LIMIT_S)
        return output

    async def stop_twice() -> None:
        task = asyncio.create_task(handler.handler({"id": "twice", "input": {**TEXT, "num_inference_steps": 20}}))
        await asyncio.to_thread(in_step.wait, HOLD_LIMIT_S)
        for _ in range(2):
            task.cancel()
            for _turn in range(5):
                await asyncio.sleep(0)
        assert not task.done(), "the job left while its thread still held the GPU"
        step_may_end.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    with injected(engine._pipeline.unet, hold):
        asyncio.run(stop_twice())
    assert not engine._lock.locked()


def test_a_job_cancelled_while_it_waits_for_the_gpu_leaves_without_running(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = handler.get_engine()
    lock = WatchedLock(waiters=1)
    monkeypatch.setattr(engine, "_lock", lock)
    unet_calls = [0]

    def count(_call: int, _inputs: Any, output: Any) -> Any:
        unet_calls[0] += 1
        return output

    async def cancel_while_waiting() -> None:
        task = asyncio.create_task(handler.handler({"id": "waiting", "input": TEXT}))
        assert await asyncio.to_thread(lock.waiting.wait, HOLD_LIMIT_S), "the job never waited for the GPU"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with injected(engine._pipeline.unet, count), lock:  # another job holds the GPU meanwhile
        asyncio.run(cancel_while_waiting())

    assert unet_calls[0] == 0
    assert not lock.locked()


@pytest.mark.parametrize(
    "when",
    [
        # runpod 1.12 drops a stop for a job it has taken but not started (no task to cancel): the job would run.
        pytest.param("stopped", id="before-its-task"),
        # runpod 1.12 cancels a task that has not run its first step: its handle_job never runs, so the job would
        # stay in runpod's count for good and a worker at CONCURRENCY=1 would take no more jobs.
        pytest.param("stopped_at_start", id="as-its-task-is-made"),
    ],
)
def test_a_job_stopped_before_it_started_ends_without_a_result_and_frees_its_slot(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """The worker keeps such a stop (``job_loop.remember_stops_before_start``, applied by ``serve``), and the job
    ends as a stopped one when runpod starts it: no result, runpod's count freed, the next job runs."""
    monkeypatch.setattr(rp_scale.JobScaler, "stop_job", rp_scale.JobScaler.stop_job)  # restored after the test
    job_loop.remember_stops_before_start()

    with caplog.at_level(logging.INFO, logger="handler"):
        ended = run_in_runpods_loop(
            [{"id": "early", "input": TEXT}, {"id": "next", "input": TEXT}], **{when: ("early",)}
        )

    assert [job_id for job_id, _ in ended] == ["next"]
    assert re.search(r"job early CANCELLED in \d+ ms", caplog.text)
    assert not job_loop.stopped_before_start("early"), "the stop is forgotten once used"
