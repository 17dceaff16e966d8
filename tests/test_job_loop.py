"""The worker run unchanged, as on RunPod: ``python handler.py`` against RunPod's job API on 127.0.0.1.

runpod 1.12.0's own job loop takes the jobs (``bench.runpod_api.RunPodAPI`` speaks RunPod's side of it),
posts results and progress, pings, stops jobs and shuts down on SIGTERM. Faults are the server's switches;
time is controlled by what the server holds (a long poll, a result post) and by the worker's log, never by
sleeping. One worker process serves the tests whose faults are independent; SIGTERM and a broken GPU get
processes of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.runpod_api import RunPodAPI
from tests.conftest import ROOT, decode_png

# One process runs this module's tests (``--dist loadgroup``): they share one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("job-loop")]

JOB = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2}
# A few seconds here (about 40 ms a step on one thread): progress goes out about once a second.
LONG_JOB = {**JOB, "num_inference_steps": 80}
# Runs until it is stopped: minutes here, far beyond every wait below. GENERATION_TIMEOUT_SECONDS ends it
# where a stop does not, so that a failing test does not hold the worker for ever.
ENDLESS_JOB = {**JOB, "width": 256, "height": 256, "num_images": 4, "num_inference_steps": 1000}
# One torch thread: on a busy 2-core machine two OpenMP threads wait on each other far longer than one works
# (40 steps of JOB: 1.5 s with one thread, 11 to 20 s with two, at a load average of 3.6).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHARED_WORKER = {**ONE_THREAD, "CONCURRENCY": "2", "MAX_STEPS": "1000", "GENERATION_TIMEOUT_SECONDS": "300"}
# Generous: waiting only, never a claim about speed. A worker starts in 10 to 20 s on 2 idle cores.
START_S = 240
WAIT_S = 120

# Starts the worker the way `python handler.py` does, after a forward hook on every module (a global one: the
# UNet is built inside handler.main) that raises on the UNet what a GPU raises after an illegal memory access.
BROKEN_GPU_LAUNCHER = f"""
import sys
import torch

sys.path.insert(0, {str(ROOT)!r})
import handler

def illegal_memory_access(module, inputs, output):
    if type(module).__name__ == "UNet2DConditionModel":
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

torch.nn.modules.module.register_module_forward_hook(illegal_memory_access)
sys.exit(handler.main())
"""


@dataclass
class Worker:
    """A worker process, its output (stdout and stderr) drained into ``lines`` by a thread."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)

    def logged(self, text: str) -> bool:
        return text in self.output()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group (runpod's ping process too) if it does not exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_worker(api: RunPodAPI, env: dict[str, str], cwd: Path, command: list[str] | None = None) -> Worker:
    """Start a worker with RunPod's variables for ``api`` and wait for its first job-take."""
    process = subprocess.Popen(
        command or [sys.executable, str(ROOT / "handler.py")],
        cwd=cwd,
        env={**env, **api.worker_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    worker = Worker(process)
    assert process.stdout is not None
    threading.Thread(target=lambda: worker.lines.extend(process.stdout or []), daemon=True).start()
    try:
        api.wait_until("the worker's first job-take", lambda: api.takes or process.poll() is not None, START_S)
    except TimeoutError:
        worker.stop()
        raise
    if process.poll() is not None:
        process.wait()
        pytest.fail(f"the worker exited with {process.returncode}:\n{worker.output()[-3000:]}")
    return worker


def seed_of(result: dict[str, Any]) -> int:
    """The seed of a result's only image, which is a 64x64 PNG."""
    assert set(result) == {"output"}, result.get("error")
    (image,) = result["output"]["images"]
    assert decode_png(image["image"]).size == (64, 64)
    return int(image["seed"])


@dataclass
class Loop:
    api: RunPodAPI
    worker: Worker


@pytest.fixture(scope="module")
def shared_loop(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    """One worker for the tests whose faults are independent, with two jobs at a time."""
    with RunPodAPI() as api:
        worker = start_worker(api, {**offline_env, **SHARED_WORKER}, tmp_path_factory.mktemp("shared-worker"))
        try:
            yield Loop(api, worker)
        finally:
            worker.stop()


@pytest.fixture
def loop(shared_loop: Loop) -> Iterator[Loop]:
    """The shared worker; after each test it is still serving, took no job twice and posted no result twice."""
    yield shared_loop
    api, worker = shared_loop.api, shared_loop.worker
    assert worker.process.poll() is None, f"the worker exited:\n{worker.output()[-3000:]}"
    assert {job_id: count for job_id, count in api.taken.items() if count != 1} == {}
    assert {job_id: len(posts) for job_id, posts in api.results.items() if len(posts) != 1} == {}
    assert api.unauthorized == []


# --- one worker, two jobs at a time --------------------------------------------------------------


def test_jobs_submitted_at_once_are_each_taken_once_and_answered_once(loop: Loop) -> None:
    api = loop.api
    seeds = {api.submit({**JOB, "seed": seed}): seed for seed in (101, 102, 103, 104)}

    results = api.wait_for(seeds, WAIT_S)

    assert {job_id: seed_of(result) for job_id, result in results.items()} == seeds
    assert all(api.taken[job_id] == 1 for job_id in seeds)
    # CONCURRENCY=2: runpod asks the batch endpoint for two jobs while it has none.
    assert {"path": "job-take-batch", "gpu": "test", "batch_size": "2", "job_in_progress": "0"} in api.takes


def test_a_multi_second_job_reports_progress_and_the_pings_name_it_while_it_runs(loop: Loop) -> None:
    api = loop.api
    # The job stays in progress while its result post is held: the seam for pings, which come once a second.
    api.slow_results(1, seconds=WAIT_S)
    job_id = api.submit({**LONG_JOB, "seed": 7})
    try:
        api.wait_until("the result post", lambda: api.results.get(job_id), WAIT_S)
        api.wait_until("a ping naming the job", lambda: any(ping.get("job_id") == job_id for ping in api.pings), WAIT_S)
        # One of two jobs in progress: runpod asks for one more, on the singular endpoint, saying it is busy.
        busy = {"path": "job-take", "gpu": "test", "job_in_progress": "1"}
        api.wait_until("a job-take saying a job is in progress", lambda: busy in api.takes, WAIT_S)
    finally:
        api.release_results()
    total = LONG_JOB["num_inference_steps"]
    last = {"step": total, "total_steps": total}
    # Progress posts come from threads of their own: the last step's may come after the result.
    api.wait_until("the last step's progress", lambda: last in api.progress.get(job_id, []), 30)

    assert seed_of(api.results[job_id][0]) == 7
    progress = api.progress[job_id]
    assert {"step": 1, "total_steps": total} in progress, "the first step is reported at once"
    assert all(set(report) == {"step", "total_steps"} and report["total_steps"] == total for report in progress)
    assert len({report["step"] for report in progress}) == len(progress), "no step reported twice"
    assert all(ping["runpod_version"] == "1.12.0" for ping in api.pings)


@pytest.mark.parametrize("fault", ["fail_takes", "drop_takes"])
def test_failed_job_takes_hand_out_no_job_and_the_worker_takes_the_next_one(loop: Loop, fault: str) -> None:
    api = loop.api
    before = len(api.takes)
    # 500 (fail_takes' default), or the connection closed without an answer.
    getattr(api, fault)(3)
    # The three takes after the call get the fault; runpod asks again at once after each.
    api.wait_until("three failed job-takes and one more", lambda: len(api.takes) >= before + 4, WAIT_S)

    job_id = api.submit({**JOB, "seed": 11})

    assert seed_of(api.wait_for([job_id], WAIT_S)[job_id]) == 11
    assert api.taken[job_id] == 1


def test_a_slow_result_post_is_posted_once_and_the_worker_goes_on(loop: Loop) -> None:
    api = loop.api
    api.slow_results(1, seconds=3.0)
    slow = api.submit({**JOB, "seed": 21})
    after = api.submit({**JOB, "seed": 22})

    results = api.wait_for([slow, after], WAIT_S)
    # runpod logs "Finished." once the post is answered (or given up): no second post can follow.
    api.wait_until("the slow post answered", lambda: loop.worker.logged(f"{slow} | Finished."), WAIT_S)

    assert [seed_of(results[slow]), seed_of(results[after])] == [21, 22]
    assert len(api.results[slow]) == 1


def test_a_result_post_whose_connection_drops_is_sent_again(loop: Loop) -> None:
    api = loop.api
    api.drop_results(1)
    dropped = api.submit({**JOB, "seed": 31})
    api.wait_until("the result posted or given up", lambda: loop.worker.logged(f"{dropped} | Finished."), WAIT_S)
    after = api.submit({**JOB, "seed": 32})

    assert seed_of(api.wait_for([after], WAIT_S)[after]) == 32, "the worker goes on"
    assert api.taken[dropped] == 1
    assert len(api.results[dropped]) == 1, f"{dropped}: {api.results.get(dropped)}"
    assert seed_of(api.results[dropped][0]) == 31


def test_a_job_stopped_while_it_runs_posts_nothing_and_the_next_job_completes(loop: Loop) -> None:
    api = loop.api
    stopped = api.submit({**ENDLESS_JOB, "seed": 41})
    api.wait_until("the job running", lambda: api.progress.get(stopped), WAIT_S)

    api.cancel(stopped)
    after = api.submit({**JOB, "seed": 42})

    # The next job needs the GPU lock, which the stopped job holds until its thread ends: the job stopped
    # within WAIT_S, not minutes later at its last step.
    assert seed_of(api.wait_for([after], WAIT_S)[after]) == 42
    api.wait_until("runpod's word that the job stopped", lambda: loop.worker.logged(f"{stopped} | Job stopped."), 30)
    assert loop.worker.logged(f"job {stopped} CANCELLED in ")
    assert stopped not in api.results
    assert api.taken[stopped] == 1
    assert all(report["step"] < report["total_steps"] for report in api.progress[stopped])


def test_a_second_job_is_taken_while_one_runs_and_can_be_stopped_before_it_gets_the_gpu(loop: Loop) -> None:
    api = loop.api
    running = api.submit({**ENDLESS_JOB, "seed": 51})
    api.wait_until("the first job running", lambda: api.progress.get(running), WAIT_S)
    waiting = api.submit({**JOB, "seed": 52})
    # Taken while the first runs: the jobs overlap, the second prepared and then waiting for the GPU lock.
    api.wait_until("the second job taken", lambda: api.taken.get(waiting), WAIT_S)
    # runpod drops a stop signal for a job it has taken but not started ("No in-progress job"): wait for its start.
    api.wait_until("the second job started", lambda: loop.worker.logged(f"{waiting} | Started."), WAIT_S)

    api.cancel(waiting)
    api.wait_until("the waiting job stopped", lambda: loop.worker.logged(f"{waiting} | Job stopped."), WAIT_S)
    api.cancel(running)
    after = api.submit({**JOB, "seed": 53})

    assert seed_of(api.wait_for([after], WAIT_S)[after]) == 53
    api.wait_until("the running job stopped", lambda: loop.worker.logged(f"{running} | Job stopped."), 30)
    assert loop.worker.logged(f"job {waiting} CANCELLED in ")
    assert running not in api.results
    assert waiting not in api.results
    assert waiting not in api.progress, "the stopped job never got the GPU"


# --- a worker of its own -------------------------------------------------------------------------


def test_sigterm_lets_the_job_in_hand_finish_and_post_then_the_worker_exits_0(
    offline_env: dict[str, str], tmp_path: Path
) -> None:
    # CONCURRENCY=1, the default: runpod then opens no job-take while a job is in hand. With more it does, and
    # runpod 1.12.0 loses a job that such a take returns after SIGTERM: run_jobs leaves its loop within 0.1 s
    # of the signal, once its queue is empty, and the job queued after that is never run or answered.
    # RUNPOD_LOG_LEVEL=DEBUG: runpod logs the signal's arrival only at DEBUG.
    with RunPodAPI() as api:
        worker = start_worker(api, {**offline_env, **ONE_THREAD, "RUNPOD_LOG_LEVEL": "DEBUG"}, tmp_path)
        try:
            # The job in hand stays in hand, whatever this machine's speed, until its result post is released.
            api.slow_results(1, seconds=WAIT_S)
            in_hand = api.submit({**LONG_JOB, "seed": 61})
            api.wait_until("the job running", lambda: api.progress.get(in_hand), WAIT_S)
            worker.process.send_signal(signal.SIGTERM)
            api.wait_until("the signal taken", lambda: worker.logged("Received shutdown signal: 15"), WAIT_S)
            api.wait_until("the job's result posted", lambda: api.results.get(in_hand), WAIT_S)
            late = api.submit({**JOB, "seed": 62})
            api.release_results()
            exit_code = worker.process.wait(timeout=WAIT_S)
        finally:
            worker.stop()

    assert exit_code == 0, worker.output()[-3000:]
    assert [seed_of(result) for result in api.results[in_hand]] == [61]
    assert late not in api.taken, "a worker that is shutting down takes no new job"


def test_a_job_that_breaks_the_gpu_answers_stop_pod_and_so_does_every_later_one(
    offline_env: dict[str, str], tmp_path: Path
) -> None:
    with RunPodAPI() as api:
        worker = start_worker(api, {**offline_env, **ONE_THREAD}, tmp_path, [sys.executable, "-c", BROKEN_GPU_LAUNCHER])
        try:
            broke = api.submit({**JOB, "seed": 81})
            broke_result = api.wait_for([broke], WAIT_S)[broke]
            later = api.submit({**JOB, "seed": 82})
            later_result = api.wait_for([later], WAIT_S)[later]
        finally:
            worker.stop()

    assert set(broke_result) == {"error", "stopPod"}
    assert broke_result["stopPod"] is True
    assert "AcceleratorError: CUDA error: an illegal memory access was encountered" in broke_result["error"]
    assert "the worker is being replaced: retry the job" in broke_result["error"]
    assert set(later_result) == {"error", "stopPod"}
    assert later_result["stopPod"] is True
    assert later_result["error"].startswith("not run: an earlier job on this worker broke its GPU")
    assert api.taken == {broke: 1, later: 1}
    assert {job_id: len(posts) for job_id, posts in api.results.items()} == {broke: 1, later: 1}
