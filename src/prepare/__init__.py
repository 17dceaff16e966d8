"""Stage 1 of a job, on the CPU before the GPU lock: the input checked and everything the GPU stage needs.

``prepare`` validates the input (``schema``), looks up the LoRAs and ControlNets it names (the adapters'
``Catalog``), reads its images (``images``: base64, URL or ``s3://``, checked), brings them to the job's
size and makes the control maps (``canvas``, ``preprocessors``), plans the pipeline calls (``passes``),
reads the prompts' syntax (``prompts``) and checks that the answer can be delivered (``delivery``). The LoRAs
and models it names by URL are downloaded first (``downloads``, through ``http``). An upscale job, which
generates nothing, is made ready by ``upscale``.
Everything a bad input can break fails here, before the job waits for the GPU, and what comes out is one
immutable ``JobPlan``.

It holds no GPU state and loads no model: jobs may be prepared while another job runs. It may import
errors, settings, storage, schema, models, prompts and adapters, never ``run`` or ``finish``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from src.prepare.canvas import ControlMaps, TaskImages
from src.prepare.delivery import check_inline_fits
from src.prepare.downloads import Downloaded, Downloads, Lease, fetch_named_files
from src.prepare.inputs import Inputs, prepare_inputs
from src.prepare.passes import Pass, plan_passes
from src.prepare.upscale import UpscalePlan, prepare_upscale
from src.prompts.syntax import PromptError, TextPlan, plan_texts
from src.schema import A1111Call, GenerateRequest, InputError, names_upscale, parse_input, read_a1111

if TYPE_CHECKING:
    from src.adapters.catalog import Catalog
    from src.settings import Settings
    from src.storage import S3Storage

__all__ = ["JobPlan", "UpscalePlan", "plan_job", "prepare"]


@dataclass(frozen=True)
class JobPlan:
    """One job as the GPU stage runs it and the finish stage reports it."""

    # The request with its size settled, and its images and control maps at that size.
    inputs: Inputs
    # The pipeline calls the job makes, in order.
    passes: tuple[Pass, ...]
    # The texts prompt editing makes of both prompts, for each step of each pass.
    texts: TextPlan
    # The files the request named by URL, downloaded and checked, and the lease that keeps them in the cache
    # until the job ends (``release``).
    downloaded: tuple[Downloaded, ...] = ()
    lease: Lease = field(default_factory=Lease, compare=False)
    # The A1111 request the job came as, to be answered in A1111's shape; None for this worker's own.
    a1111: A1111Call | None = None

    def release(self) -> None:
        """The job has ended: its downloaded files may be evicted from the cache again."""
        self.lease.release()

    @property
    def request(self) -> GenerateRequest:
        return self.inputs.request

    @property
    def images(self) -> TaskImages | None:
        return self.inputs.images

    @property
    def controls(self) -> ControlMaps | None:
        return self.inputs.controls


def prepare(
    job: Any,
    settings: Settings,
    *,
    catalog: Callable[[], Catalog],
    storage: S3Storage | None,
    downloads: Callable[[], Downloads] | None = None,
    cancelled: threading.Event | None = None,
) -> JobPlan | UpscalePlan:
    """A RunPod job's input, checked and made ready for the GPU; call the plan's ``release`` when the job ends.
    An upscale job (``"task": "upscale"``) gives an ``UpscalePlan`` (``prepare_upscale``); any other, a ``JobPlan``.

    ``catalog`` gives the worker's LoRAs and ControlNets; it is asked only once the input is valid, so a
    malformed job never waits for the model to load. ``downloads`` gives the download cache, for the LoRAs
    and models the request names by URL; their downloads stop once ``cancelled`` is set.

    Raises:
        InputError: the input breaks the contract, names what the worker does not have, holds an image
            or a file by URL that cannot be read or used, or a prompt that cannot be parsed; the message
            names each field.
        ResponseTooLargeError: the answer could not fit inline.
        JobCancelledError: ``cancelled`` was set during a download.
    """
    call = read_a1111(job)
    if call is None:
        return _prepare(job, settings, catalog=catalog, storage=storage, downloads=downloads, cancelled=cancelled)
    # An A1111 request: this worker's input made of it, its errors naming A1111's fields, its answer A1111's.
    native = {**job, "input": call.input}
    try:
        plan = _prepare(
            native,
            settings,
            catalog=catalog,
            storage=storage,
            downloads=downloads,
            cancelled=cancelled,
            answered_inline=call.send_images,
        )
    except InputError as error:
        raise InputError(call.renamed(str(error))) from None
    return dataclasses.replace(plan, a1111=call)


def _prepare(
    job: Any,
    settings: Settings,
    *,
    catalog: Callable[[], Catalog],
    storage: S3Storage | None,
    downloads: Callable[[], Downloads] | None,
    cancelled: threading.Event | None,
    answered_inline: bool = True,
) -> JobPlan | UpscalePlan:
    """``prepare`` for a job in this worker's own input. ``answered_inline`` false: the answer leaves the images out
    (A1111's ``send_images: false``), so their size is no reason to refuse the job."""
    if names_upscale(job):
        return prepare_upscale(job, settings, catalog=catalog, storage=storage)
    request = parse_input(job, settings)
    problems = catalog().problems(request)
    if problems:
        raise InputError(f"invalid input: {'; '.join(problems)}")
    lease = Lease()
    try:
        # Files by URL, then input images, are read before the job waits for the GPU: a slow download never
        # holds it.
        request, downloaded = fetch_named_files(request, settings, downloads, lease, cancelled)
        inputs = prepare_inputs(request, settings, storage)
        if answered_inline:
            check_inline_fits(inputs, settings)
        return dataclasses.replace(plan_job(inputs, settings), downloaded=downloaded, lease=lease)
    except BaseException:
        lease.release()
        raise


def plan_job(inputs: Inputs, settings: Settings) -> JobPlan:
    """The passes and prompt texts of a job whose inputs are ready.

    Raises:
        InputError: a prompt nests too deep or makes more than MAX_PROMPT_TEXTS texts.
    """
    request = inputs.request
    passes = tuple(plan_passes(request, inputs.images, inputs.controls))
    try:
        texts = plan_texts(
            [
                (step.prompt or request.prompt_text, step.negative_prompt or request.negative_prompt, step.prompt_span)
                for step in passes
            ],
            max_texts=settings.max_prompt_texts,
        )
    except PromptError as error:
        raise InputError(f"invalid input: {error}") from None
    return JobPlan(inputs=inputs, passes=passes, texts=texts)
