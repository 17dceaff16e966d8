"""RunPod serverless handler for Stable Diffusion 1.5: text-to-image, img2img, inpaint, outpaint, hires fix, upscale.

A job goes through three stages: ``prepare_job`` (the input checked, its images read, its plan made, on the
CPU), ``engine.run`` (the plan run under the GPU lock) and ``finish`` (the images encoded and delivered,
the response). ``handler`` is a coroutine that runs each stage in a thread (``src.concurrency``), so that
runpod's loop overlaps the CPU stages of some jobs with the GPU stage of another. Settings are read once
and the engine is loaded once. Run it as a program to preload the model and serve jobs; import it to get
``handler`` with nothing loaded until the first job.

    python handler.py                        # runs test_input.json, writes images to output/
    python handler.py --test_input '{"input": {"prompt": "a fox"}}'
    python handler.py --rp_serve_api         # runpod's local HTTP API
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from src.concurrency import JobSlots, in_thread, on_gpu_thread
from src.errors import WorkerError, breaks_the_gpu, first_line
from src.finish import finish
from src.finish.png_info import png_info
from src.job_loop import remember_stops_before_start, retry_dropped_result_posts, stopped_before_start
from src.prepare import JobPlan, UpscalePlan
from src.prepare import prepare as prepare_job
from src.prepare.images import load_as_sent
from src.run.a1111_listings import answer_listing
from src.run.describe import describe
from src.schema import InputError, check_limits, parse_a1111_listing, parse_a1111_png_info, parse_describe
from src.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from src.adapters.catalog import Catalog
    from src.prepare.downloads import Downloads
    from src.run.engine import Engine, Generation
    from src.run.upscale import Upscaled
    from src.storage import S3Storage

log = logging.getLogger("handler")

_lock = threading.Lock()
_settings: Settings | None = None
_engine: Engine | None = None
_storage: S3Storage | None = None
_downloads: Downloads | None = None
# Sends progress to RunPod; set by main() only when RunPod is there to receive it.
_send_progress: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
# The first line of the CUDA error that left this process's GPU unusable; None while it works.
_gpu_failure: str | None = None
# Jobs holding decoded inputs or encoded outputs in host memory: at most MAX_JOBS_IN_MEMORY.
_jobs_in_memory = JobSlots()


def get_settings() -> Settings:
    """The process's settings, read from the environment on first use and checked
    against the request contract (the schema cannot import the settings, nor the reverse)."""
    global _settings
    with _lock:
        if _settings is None:
            settings = load_settings()
            try:
                check_limits(settings)
            except ValueError as error:
                raise SettingsError(f"invalid configuration: {error}") from None
            _settings = settings
        return _settings


def get_engine() -> Engine:
    """The process's engine, loaded on first use (or preloaded by ``main``)."""
    # Imported here, not at the top, so that `import handler` stays cheap: torch
    # and diffusers take seconds to import, and tests of the contract need neither.
    from src.run.engine import Engine

    global _engine
    settings = get_settings()
    with _lock:
        if _engine is None:
            # FAST_MODE's warm-up on the GPU's thread, where the jobs replay the CUDA graphs it records. Only from
            # the main thread (the preload): a lazy load from a stage's thread warms up there, for the GPU's thread
            # may itself be waiting for this lock.
            preload = threading.current_thread() is threading.main_thread()
            _engine = Engine.load(settings, run_on=on_gpu_thread if preload else None)
        return _engine


def get_catalog() -> Catalog:
    """The LoRAs and ControlNets the process's engine has, by name (loading the engine on first use)."""
    return get_engine().catalog


def get_downloads() -> Downloads:
    """The process's download cache (DOWNLOAD_CACHE_DIR), for the LoRAs and models requests name by URL."""
    from src.prepare.downloads import Downloads
    from src.prepare.http import system_resolve

    global _downloads
    settings = get_settings()
    with _lock:
        if _downloads is None:
            _downloads = Downloads(settings, system_resolve)
        return _downloads


def get_storage() -> S3Storage | None:
    """The process's S3 client, created on first use; None when no bucket is configured."""
    global _storage
    settings = get_settings()
    if not settings.bucket_configured:
        return None
    from src.storage import S3Storage

    with _lock:
        if _storage is None:
            _storage = S3Storage(settings)
        return _storage


def _progress_reporter(job: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    """Progress for this job goes to RunPod when running there; elsewhere nowhere."""
    send = _send_progress
    if send is None:
        return None
    return lambda progress: send(job, progress)


def _unexpected(job: Any, error: Exception) -> dict[str, str]:
    """Log an unexpected failure with its traceback, and answer it in short."""
    log.exception("job %s failed", job.get("id") if isinstance(job, dict) else None)
    reason = (str(error).splitlines() or [""])[0][:300]
    return {"error": f"generation failed: {type(error).__name__}: {reason} (traceback in the worker log)"}


def _gpu_failed(job: Any, error: Exception) -> dict[str, Any]:
    """Answer a job whose CUDA error broke the GPU, and have RunPod replace the worker.

    After an illegal memory access or a device-side assert, every later CUDA call in this process fails
    the same way; only a new process has a working GPU. ``refresh_worker`` makes runpod send RunPod
    ``stopPod`` with this job's error, and RunPod then replaces the worker.
    """
    global _gpu_failure
    log.critical(
        "job %s broke the GPU; this worker cannot serve another job and asks RunPod to replace it",
        job.get("id") if isinstance(job, dict) else None,
        exc_info=error,
    )
    _gpu_failure = f"{type(error).__name__}: {first_line(error)}"
    return {
        "error": f"generation failed: {_gpu_failure} (traceback in the worker log); the GPU cannot be used "
        "again in this process, so the worker is being replaced: retry the job",
        "refresh_worker": True,
    }


async def handler(job: Any) -> dict[str, Any] | list[Any]:
    """Run one RunPod job. Returns the response, or ``{"error": message}``; never raises but when cancelled.

    Its end is logged in one line, with no payload: the id, COMPLETED, FAILED or CANCELLED, the time, the
    error's first line. A cancelled job (runpod's stop signal) gets no answer: runpod posts none for it.
    """
    started = time.perf_counter()
    job_id = job.get("id") if isinstance(job, dict) else None
    try:
        if stopped_before_start(job_id):
            raise asyncio.CancelledError  # as runpod ends a job it stops: its task cancelled, no result posted
        response = await _answer(job, started)
    except asyncio.CancelledError:
        log.info("job %s CANCELLED in %.0f ms", job_id, (time.perf_counter() - started) * 1000)
        raise
    elapsed_ms = (time.perf_counter() - started) * 1000
    if isinstance(response, dict) and "error" in response:
        reason = (str(response["error"]).splitlines() or [""])[0][:300]
        log.info("job %s FAILED in %.0f ms: %s", job_id, elapsed_ms, reason)
    else:
        log.info("job %s COMPLETED in %.0f ms", job_id, elapsed_ms)
    return response


async def _answer(job: Any, started: float) -> dict[str, Any] | list[Any]:
    if _gpu_failure is not None:
        # RunPod may hand the worker more jobs before it stops it; trying them on the GPU would only fail.
        return {
            "error": f"not run: an earlier job on this worker broke its GPU ({_gpu_failure}), and the worker is "
            "being replaced: retry the job",
            "refresh_worker": True,
        }
    cancelled = threading.Event()
    try:
        settings = get_settings()
        if (answer := _what_the_worker_has(job)) is not None:
            return await in_thread(answer, cancelled)
        async with _jobs_in_memory.held(settings.jobs_in_memory):
            plan = await in_thread(lambda: _prepare(job, settings, cancelled), cancelled)
            try:
                queued = time.perf_counter()
                generation = await in_thread(lambda: _run(job, plan, settings, cancelled, queued), cancelled, gpu=True)
                return await in_thread(
                    lambda: _finish(job, plan, generation, settings, started=started, cancelled=cancelled), cancelled
                )
            finally:
                plan.release()
    except Exception as error:  # noqa: BLE001 - answered; an unexpected one is logged with its traceback
        if breaks_the_gpu(error):  # a WorkerError too: a LoRA's refusal may wrap the CUDA error that broke the GPU
            return _gpu_failed(job, error)
        if isinstance(error, (InputError, SettingsError, WorkerError)):
            return {"error": str(error)}
        return _unexpected(job, error)


def _what_the_worker_has(job: Any) -> Callable[[], dict[str, Any] | list[Any]] | None:
    """For a describe job, a GET of one of A1111's listings, or A1111's PNG Info: what answers it, from the engine's
    state or the image sent (no slot, no GPU); None for any other job."""
    if parse_describe(job) is not None:
        return lambda: describe(get_engine())
    if (listing := parse_a1111_listing(job)) is not None:
        return lambda: answer_listing(get_engine(), listing)
    if (image := parse_a1111_png_info(job)) is not None:
        field = "payload.image"
        return lambda: png_info(load_as_sent(image, field, get_settings(), get_storage()).image, field)
    return None


def _prepare(job: Any, settings: Settings, cancelled: threading.Event) -> JobPlan | UpscalePlan:
    """Stage 1, on the CPU: the input checked, its images read (its files by URL downloaded, until the job is
    cancelled), its plan made."""
    downloads = get_downloads if settings.downloads_on else None
    return prepare_job(
        job, settings, catalog=get_catalog, storage=get_storage(), downloads=downloads, cancelled=cancelled
    )


def _run(
    job: Any, plan: JobPlan | UpscalePlan, settings: Settings, cancelled: threading.Event, queued: float
) -> Generation | Upscaled:
    """Stage 2, on the GPU's thread: the plan's pictures, or its image enlarged. Its wait for that thread, since
    ``queued``, is part of the job's queue time, with any wait for the engine's lock."""
    waited_ms = (time.perf_counter() - queued) * 1000
    result: Generation | Upscaled
    if isinstance(plan, UpscalePlan):
        from src.run.upscale import upscale_job

        result = upscale_job(get_engine(), plan, timeout_s=settings.generation_timeout_seconds, cancelled=cancelled)
    else:
        result = get_engine().run(
            plan,
            timeout_s=settings.generation_timeout_seconds,
            on_progress=_progress_reporter(job),
            cancelled=cancelled,
        )
    return dataclasses.replace(result, queue_ms=result.queue_ms + waited_ms)


def _finish(
    job: Any,
    plan: JobPlan | UpscalePlan,
    generation: Generation | Upscaled,
    settings: Settings,
    *,
    started: float,
    cancelled: threading.Event,
) -> dict[str, Any]:
    """Stage 3, on the CPU: the images encoded and delivered (none uploaded once the job is cancelled), the
    response."""
    job_id = str(job.get("id") or "")
    return finish(
        plan, generation, settings=settings, storage=get_storage(), job_id=job_id, started=started, cancelled=cancelled
    )


# The worker's own loggers, which LOG_LEVEL sets. The libraries' stay at INFO or above: at DEBUG urllib3 and botocore
# log every request's URL whole, presigned signatures and download tokens in its query included.
OWN_LOGGERS = ("handler", "src", "builder")


def configure_logging(level: str) -> None:
    """Log lines to stderr: the worker's own at ``level`` (LOG_LEVEL), every other library's at INFO or above."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(max(logging.INFO, logging.getLevelNamesMapping()[level]))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


def prepare() -> Settings:
    """Everything the worker does before it can take a job: settings, logging, the model found, the engine,
    the S3 client.

    runpod takes about 1.7 s to import, alone; in a thread while the model loads it adds
    about 0.7 s (bench/run.py measures it).

    Raises:
        SettingsError: a variable breaks its rule.
        WorkerError: the model or the S3 client cannot be set up.
    """
    settings = get_settings()
    configure_logging(settings.log_level)
    # Where the model is, found before torch is imported: a model that cannot be served stops the start here.
    from src.models.locate import locate_model

    locate_model(settings)
    if (unnamed := settings.bucket_without_a_name) is not None:
        log.warning("%s", unnamed)
    # transformers warns at import, twice per class, that torchvision is missing and
    # it will use PIL image processors; this worker uses no image processor at all.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    runpod_import = threading.Thread(target=importlib.import_module, args=("runpod",), name="import-runpod")
    runpod_import.start()
    try:
        get_engine()
        get_storage()
        if settings.downloads_on:
            get_downloads()
    finally:
        runpod_import.join()
    return settings


def serve(settings: Settings) -> None:
    """Take jobs the way RunPod gives them: from RunPod itself, or runpod's local HTTP API."""
    global _send_progress
    import runpod
    from runpod.serverless.modules.rp_logger import RunPodLogger

    retry_dropped_result_posts()
    remember_stops_before_start()
    # runpod logs at DEBUG unless told otherwise, and at DEBUG it prints every
    # job's output: 4 KB of base64 per job. Keep its default for those who ask.
    if not (os.environ.get("RUNPOD_LOG_LEVEL") or os.environ.get("RUNPOD_DEBUG_LEVEL")):
        RunPodLogger().set_level("INFO")
    # progress_update posts to RunPod's output webhook; with none (the local HTTP API) it would only fail.
    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        _send_progress = runpod.serverless.progress_update
    # On RunPod, a worker whose torch cannot use its GPU refuses jobs instead of failing each one.
    if _engine is not None and _engine.device.type == "cuda":
        import torch

        from src.run import gpu

        runpod.serverless.register_fitness_check(gpu.check_kernels)
        # Only where fp16 runs: its advice is DTYPE=float32, which a worker that follows it must pass.
        if _engine.dtype == torch.float16:
            runpod.serverless.register_fitness_check(gpu.check_fp16)
    # Up to CONCURRENCY jobs at once, their CPU stages overlapping; the GPU runs one at a time (docs/memory.md).
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda _current: settings.concurrency})


def main() -> int:
    """Read the command line, preload the model, then run one job locally or serve jobs.

    Returns the exit status: 2 for bad settings, 1 when the model does not load. ``--help``
    and a bad command line exit (0 and 2) before anything is loaded.
    """
    from src import local

    run = local.read_command_line(sys.argv[1:])
    try:
        settings = prepare()
    except SettingsError as error:
        print(f"startup failed: {error}", file=sys.stderr)
        return 2
    except WorkerError as error:
        log.error("startup failed: %s", error)
        return 1
    except Exception:  # what no check foresaw still ends in a line a log search finds, with its traceback
        log.exception("startup failed: an unexpected error while loading the model")
        return 1
    if run is None:
        serve(settings)
        return 0
    # diffusers' progress bar, on a terminal only: in a log it is noise.
    if sys.stderr.isatty():
        get_engine().show_progress_bar = True
    return local.run_local(handler, run)


if __name__ == "__main__":
    sys.exit(main())
