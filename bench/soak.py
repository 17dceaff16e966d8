"""A soak run: the worker's real job loop, every task, several clients, its memory and file descriptors over time.

    python -m bench.soak                         # 30 minutes of jobs, 3 clients, CONCURRENCY=2
    python -m bench.soak --minutes 5
    python -m bench.soak --minutes 0.25 --out DIR  # the test suite's run

Writes soak.json (the summary, every job and every sample), soak.md (its tables) and soak.png (latency, RSS
and open file descriptors over time) into ``--out`` (default bench/results), with the command, the CPU, the
load average before and after, and the run's wall time.

The worker runs as it does on RunPod: ``python handler.py``, no arguments, in its own process, with the
``RUNPOD_*`` variables of a fake of RunPod's job API on 127.0.0.1 (``bench.runpod_api.RunPodAPI``), so jobs
go through runpod's own job loop: take, run, post the result, the stop channel. Its model is the tiny one
(``builder.tiny_model``) with its ControlNets and two tiny LoRAs, and its bucket is a moto S3 server on
127.0.0.1; nothing leaves the machine.

1. Startup: one small job, answered once the model is loaded; its latency is the worker's start.
2. Reference pass: each job of the mix (``job_mix``) that makes an image once, one at a time: its images
   are the references. Then each bad input once.
3. Soak: ``--clients`` threads submit jobs from the mix in a fixed rotation until ``--minutes`` have passed
   after the reference pass (each client sends at least one job) or ``--max-jobs``
   were submitted; each waits for its job's answer before the next, except a job to cancel, which it cancels
   and leaves: ``cancel`` once the job runs (its first progress post has come), ``cancel-at-take`` as soon
   as the worker has taken it.
4. Then each job is judged (``JobRecord.status``):

   - ``ok``: its image has the same pixels as the reference pass's for the same input (an S3 job's object,
     read back from the bucket, those of the same job answered inline);
   - ``expected-error``: a bad input answered with an error naming its field (``width=500: ...``);
   - ``cancelled``: a cancelled job with no result, or an error; ``not-stopped``: its image came back anyway,
     the same as the reference (the stop reached the worker before the job started or after it ended);
   - ``wrong``: another image, an error for a good input, or a bad input's error naming another field;
   - ``lost``: no answer within ``JOB_TIMEOUT_S``, or the worker died; ``duplicated``: posted or taken twice.

Meanwhile a thread samples the worker's RSS (``/proc/PID/statm``), open file descriptors (``/proc/PID/fd``)
and threads every ``SAMPLE_INTERVAL_S``, and each answered job records them at its end. The RSS slope is the
least-squares slope of RSS against the answered jobs' order, after the first ``WARMUP_FRACTION`` of the soak's
jobs; the file descriptors' growth is the fewest open in the last fifth of the soak less the fewest in the first
(the fewest: connections come and go with each request, a leaked descriptor stays).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from bench.machine import load_average, median_range, report_header
from bench.run import RESULTS

if TYPE_CHECKING:
    from bench.runpod_api import RunPodAPI

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "soak"
BUCKET_PREFIX = "soak/"
# Answers later than this count as lost.
JOB_TIMEOUT_S = 600.0
# The first job waits for the model to load.
STARTUP_TIMEOUT_S = 600.0
# A job to cancel that is not taken (or not running) within this is left to run.
TAKE_TIMEOUT_S = 60.0
# After the last answer, posts still arriving (a duplicate, a cancelled job's result) are waited for this long.
SETTLE_S = 3.0
SAMPLE_INTERVAL_S = 1.0
# The soak's first jobs, by answer order, left out of the RSS slope: allocator pools and caches still grow.
WARMUP_FRACTION = 0.1
# The goals of a soak run (the figures for a 30-minute run on a 2-core CPU).
RSS_SLOPE_GOAL_MIB_PER_JOB = 0.1
P99_OVER_P50_GOAL = 1.5
# The fewest open file descriptors may differ by this many between the soak's first and last fifth.
FD_GROWTH_MARGIN = 2
# Fake credentials for the moto server; nothing else accepts them.
ACCESS_KEY, SECRET_KEY = "soak-access-key", "soak-secret-key"
TASKS = (
    "txt2img",
    "img2img",
    "inpaint",
    "outpaint",
    "hires",
    "lora",
    "controlnet",
    "long-prompt",
    "s3",
    "bad-input",
    "cancel",
    "cancel-at-take",
)
LONG_PROMPT = (
    "a red fox in a snowy forest at dawn, (detailed fur:1.2), soft light, pine trees heavy with snow, "
    "frost on the branches, a frozen stream in the distance, mist rising between the trunks, "
    "[golden:silver:0.5] sky, low sun behind the hills, long blue shadows on the snow, BREAK "
    "tracks in the fresh powder leading towards the viewer, a few snowflakes still falling, "
    "(shallow depth of field:0.8), wildlife photography, telephoto lens, sharp eyes, warm breath in the cold air, "
    "quiet winter morning, muted colours, fine grain, high detail, natural light, award-winning photograph"
)


# --- the job mix -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One job of the mix: its input is the same every time it is sent, so each answer has one right value."""

    name: str
    task: str
    input: dict[str, Any]
    # A bad input: the field its error must name.
    error_field: str | None = None
    # An S3 job: the job whose inline image its object must equal.
    same_image_as: str | None = None
    # A job to cancel: once it runs ("running") or once it is taken ("taken").
    cancel: str | None = None


def _picture(width: int, height: int) -> Image.Image:
    """A smooth picture with some grain, the same every run."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = np.random.default_rng(0).normal(0, 8, (height, width, 3))
    pixels = np.stack([x / width * 255, y / height * 255, (np.sin(x / 9) * np.cos(y / 13) + 1) * 127], axis=-1)
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8), mode="RGB")


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def job_mix() -> list[Spec]:
    """Every task at 64 to 128 pixels and 2 to 4 steps (the jobs to cancel: 40), each with its own seed;
    the bad inputs, each naming the field its error must name."""
    picture = _png_base64(_picture(128, 128))
    narrow = _png_base64(_picture(64, 128))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    small = {"width": 128, "height": 128, "num_inference_steps": 4, "output_type": "base64"}
    # Long enough that a stop reaches it while it runs: runpod polls its stop channel about once a second.
    long_job = {"prompt": "a long job", **small, "num_inference_steps": 40, "seed": 91}
    txt2img = {"prompt": "a red fox in a snowy forest", **small, "seed": 11}
    good = [
        Spec("txt2img", "txt2img", txt2img),
        Spec(
            "txt2img-euler-a",
            "txt2img",
            {"prompt": "a lighthouse at night", **small, "width": 64, "scheduler": "Euler a", "seed": 12},
        ),
        Spec(
            "img2img",
            "img2img",
            {"prompt": "a fox, oil painting", **small, "image": picture, "strength": 0.6, "seed": 21},
        ),
        Spec(
            "inpaint",
            "inpaint",
            {"prompt": "a red scarf", **small, "image": picture, "mask": _png_base64(mask), "seed": 31},
        ),
        Spec(
            "outpaint",
            "outpaint",
            {
                "prompt": "a snowy forest",
                "num_inference_steps": 4,
                "output_type": "base64",
                "image": narrow,
                "outpaint": {"right": 64},
                "strength": 1.0,
                "seed": 41,
            },
        ),
        Spec(
            "hires",
            "hires",
            {
                "prompt": "a fox",
                **small,
                "width": 64,
                "height": 64,
                "num_inference_steps": 3,
                "hires": {"scale": 2.0, "steps": 2},
                "seed": 51,
            },
        ),
        Spec(
            "lora",
            "lora",
            {
                "prompt": "a fox <lora:tiny-kohya-1:0.8>",
                **small,
                "num_inference_steps": 3,
                "loras": [{"name": "tiny-peft-0", "scale": 0.5}],
                "seed": 61,
            },
        ),
        Spec(
            "controlnet",
            "controlnet",
            {
                "prompt": "a fox",
                **small,
                "num_inference_steps": 3,
                "controlnets": [{"model": "tiny-controlnet", "image": picture, "preprocess": "canny"}],
                "seed": 71,
            },
        ),
        Spec("long-prompt", "long-prompt", {"prompt": LONG_PROMPT, **small, "num_inference_steps": 3, "seed": 81}),
        Spec("s3", "s3", {**txt2img, "output_type": "s3"}, same_image_as="txt2img"),
        Spec("cancel", "cancel", long_job, cancel="running"),
        Spec("cancel-at-take", "cancel-at-take", long_job, same_image_as="cancel", cancel="taken"),
    ]
    plain = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "output_type": "base64"}
    bad = [
        ("width", {**plain, "width": 500}),
        ("num_inference_steps", {**plain, "num_inference_steps": 0}),
        ("strength", {**plain, "strength": 0.5}),
        ("steps", {**plain, "steps": 4}),
        ("guidance_scale", {**plain, "guidance_scale": 99}),
        ("loras.0.name", {**plain, "loras": [{"name": "no-such-lora"}]}),
        ("controlnets.0.model", {**plain, "controlnets": [{"model": "no-such-controlnet", "image": picture}]}),
        ("image", {**plain, "image": base64.b64encode(b"not an image at all").decode()}),
    ]
    return good + [Spec(f"bad-{name.replace('.', '-')}", "bad-input", job, error_field=name) for name, job in bad]


class Rotation:
    """Which job each client sends next: every task in turn, the bad inputs taking turns in their one slot.

    Client k starts k / clients of the way through the turn, so the clients send different tasks at once.
    """

    def __init__(self, specs: Sequence[Spec], clients: int) -> None:
        self.bad = [spec for spec in specs if spec.task == "bad-input"]
        self.turn: list[Spec | None] = [spec for spec in specs if spec.task != "bad-input"]
        self.turn.insert(len(self.turn) // 2, None)  # the bad inputs' slot
        self.clients = clients

    def job(self, client: int, step: int) -> Spec:
        position = step + client * len(self.turn) // self.clients
        spec = self.turn[position % len(self.turn)]
        if spec is None:
            return self.bad[(position // len(self.turn) + client) % len(self.bad)]
        return spec


# --- the worker and what it is given ------------------------------------------------------------------------


def write_assets(folder: Path) -> dict[str, Path]:
    """The tiny model with its ControlNets, and two tiny LoRAs (``tiny-peft-0``, ``tiny-kohya-1``)."""
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from builder.tiny_lora import write_test_loras
    from builder.tiny_model import CONTROLNET_FOLDER, write_tiny_model

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    model = write_tiny_model(folder / "model", controlnet=True)
    write_test_loras(model, folder / "loras", count=2)
    return {"model": model, "loras": folder / "loras", "controlnets": model / CONTROLNET_FOLDER}


def worker_environment(
    assets: dict[str, Path], api_env: dict[str, str], s3_url: str, hf_home: Path, concurrency: int
) -> dict[str, str]:
    """The worker's variables: the tiny model, LoRAs, ControlNets and bucket, no hub, and RunPod's variables
    pointing at the fake API; none of this shell's settings or RunPod variables."""
    from src.settings import Settings

    ours = {str(field.alias) for field in Settings.model_fields.values()}
    env = {key: value for key, value in os.environ.items() if key not in ours and not key.startswith("RUNPOD_")}
    env.update(
        MODEL_ID=str(assets["model"]),
        LORA_DIR=str(assets["loras"]),
        CONTROLNET_DIR=str(assets["controlnets"]),
        DEVICE="cpu",
        DTYPE="float32",
        HF_HOME=str(hf_home),
        # A closed port on loopback: any attempt to reach the hub fails at once.
        HF_ENDPOINT="http://127.0.0.1:9",
        BUCKET_NAME=BUCKET,
        BUCKET_ENDPOINT_URL=s3_url,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
        BUCKET_SECRET_ACCESS_KEY=SECRET_KEY,
        BUCKET_PREFIX=BUCKET_PREFIX,
        CONCURRENCY=str(concurrency),
        PYTHONUNBUFFERED="1",
        **api_env,
    )
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server() -> Iterator[tuple[str, Any]]:
    """A moto S3 server on 127.0.0.1 holding the empty bucket; yields its URL and a client."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    # moto's server logs every request through werkzeug.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        client.create_bucket(Bucket=BUCKET)
        yield url, client
    finally:
        server.stop()


@dataclass
class Sample:
    seconds: float
    rss_mib: float
    fds: int
    threads: int


def read_process(pid: int) -> Sample | None:
    """The process's RSS, open file descriptors and threads now, from /proc; None once it has exited."""
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text(encoding="utf-8").split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except (FileNotFoundError, ProcessLookupError):
        return None
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return Sample(0.0, resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, fds, threads)


class Sampler(threading.Thread):
    """Samples a process every ``interval`` seconds until stopped or the process exits."""

    def __init__(self, pid: int, started: float, interval: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid, self.started, self.interval = pid, started, interval
        self.samples: list[Sample] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            sample = read_process(self.pid)
            if sample is None:
                return
            sample.seconds = time.monotonic() - self.started
            self.samples.append(sample)
            self.stopped.wait(self.interval)


# --- one run --------------------------------------------------------------------------------------------------


@dataclass
class JobRecord:
    """One job as sent and as answered; times in seconds from the worker's start."""

    id: str
    spec: str
    task: str
    phase: str
    client: int
    submitted: float
    ended: float | None = None
    latency_s: float | None = None
    cancelled_at: float | None = None
    status: str = "pending"
    detail: str = ""
    rss_mib: float | None = None
    fds: int | None = None
    # The worker's own account of the job (metadata.timings_ms): queue, inputs, inference, encode, upload, total.
    worker_ms: dict[str, float] | None = None


def names_field(error: str, name: str) -> bool:
    """Whether ``error`` names the field ``name`` as the worker writes it: ``name=value`` or ``name: rule``."""
    return re.search(rf"(?<![\w.]){re.escape(name)}[=:]", error) is not None


def pixels(data: bytes) -> np.ndarray:
    """An image file's pixels, as RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"))


def max_difference(first: np.ndarray, second: np.ndarray) -> int | None:
    """The largest difference of one channel of one pixel, 0 to 255; None when the sizes differ."""
    if first.shape != second.shape:
        return None
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


class Soak:
    """The clients, the checks and the records of one run against one worker."""

    def __init__(self, api: RunPodAPI, s3: Any, worker: subprocess.Popen[bytes], started: float) -> None:
        self.api, self.s3, self.worker, self.started = api, s3, worker, started
        self.specs = {spec.name: spec for spec in job_mix()}
        self.references: dict[str, np.ndarray] = {}
        self.records: list[JobRecord] = []
        self.lock = threading.Lock()
        self.counter = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    def submit(self, spec: Spec, phase: str, client: int) -> JobRecord:
        with self.lock:
            self.counter += 1
            record = JobRecord(f"{spec.name}-{self.counter:05d}", spec.name, spec.task, phase, client, self.now())
            self.records.append(record)
        self.api.submit(spec.input, record.id)
        return record

    def answer(self, record: JobRecord, spec: Spec, timeout_s: float) -> None:
        """Wait for the record's job to be answered, then judge it; ``lost`` when it is not, or the worker died."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result = self.api.wait_for([record.id], timeout_s=min(5.0, max(deadline - time.monotonic(), 0.1)))
                break
            except TimeoutError:
                if time.monotonic() >= deadline or self.worker.poll() is not None:
                    record.status = "lost"
                    record.detail = "no answer" if self.worker.poll() is None else "the worker exited"
                    return
        record.ended = self.now()
        record.latency_s = record.ended - record.submitted
        sample = read_process(self.worker.pid)
        if sample is not None:
            record.rss_mib, record.fds = sample.rss_mib, sample.fds
        record.status, record.detail = self.judge(spec, result[record.id])
        timings = result[record.id].get("output", {}).get("metadata", {}).get("timings_ms")
        if isinstance(timings, dict):
            record.worker_ms = {name: value for name, value in timings.items() if value is not None}

    def image_of(self, result: dict[str, Any]) -> np.ndarray:
        """The pixels of a result's first image, inline or read back from the bucket."""
        image = result["output"]["images"][0]
        if "key" in image:
            return pixels(self.s3.get_object(Bucket=BUCKET, Key=image["key"])["Body"].read())
        return pixels(base64.b64decode(image["image"]))

    def judge(self, spec: Spec, result: dict[str, Any]) -> tuple[str, str]:
        """A status and its detail for one answer to ``spec`` (see the module's doc)."""
        error = result.get("error")
        if spec.error_field is not None:
            return self.judge_error(spec.error_field, error)
        if error is not None:
            return "wrong", f"failed: {str(error)[:300]}"
        reference = self.references.get(spec.same_image_as or spec.name)
        if reference is None:  # the reference pass itself
            self.references[spec.name] = self.image_of(result)
            return "ok", "reference"
        difference = max_difference(self.image_of(result), reference)
        if difference == 0:
            return "ok", ""
        return "wrong", f"differs from the reference: max pixel difference {difference}"

    @staticmethod
    def judge_error(field_name: str, error: Any) -> tuple[str, str]:
        if error is None:
            return "wrong", "a bad input answered without an error"
        if names_field(str(error), field_name):
            return "expected-error", str(error)[:200]
        return "wrong", f"the error does not name {field_name}: {str(error)[:200]}"

    def run_startup(self) -> None:
        """One small job, answered once the model has loaded.

        Raises:
            RuntimeError: no answer within ``STARTUP_TIMEOUT_S``, or the worker exited.
        """
        first = Spec("startup", "startup", {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 1})
        startup = self.submit(first, "startup", -1)
        self.answer(startup, first, STARTUP_TIMEOUT_S)
        if startup.status == "lost":
            raise RuntimeError(f"the worker answered no first job ({startup.detail})")

    def run_reference_pass(self) -> None:
        """Each job of the mix that makes an image alone, in order, its S3 job after the inline one it must
        equal; then the bad inputs, all at once: an error depends on no other job."""
        # The S3 job runs here too, to be checked before the soak; the second job to cancel does not.
        good = [spec for spec in self.specs.values() if spec.error_field is None and spec.task != "cancel-at-take"]
        for spec in sorted(good, key=lambda spec: spec.same_image_as is not None):
            self.answer(self.submit(spec, "reference", -1), spec, JOB_TIMEOUT_S)
        bad = [(self.submit(spec, "reference", -1), spec) for spec in self.specs.values() if spec.error_field]
        for record, spec in bad:
            self.answer(record, spec, JOB_TIMEOUT_S)

    def run_clients(self, clients: int, until: float, max_jobs: int | None) -> None:
        rotation = Rotation(list(self.specs.values()), clients)
        sent = Counter[str]()

        def claim(index: int) -> bool:
            with self.lock:
                # Each client sends one job however late it is, so that the clients' jobs always overlap.
                late = time.monotonic() >= until and sent[f"client-{index}"] > 0
                if late or self.worker.poll() is not None:
                    return False
                if max_jobs is not None and sent["soak"] >= max_jobs:
                    return False
                sent["soak"] += 1
                sent[f"client-{index}"] += 1
                return True

        def client(index: int) -> None:
            step = 0
            while claim(index):
                spec = rotation.job(index, step)
                step += 1
                record = self.submit(spec, "soak", index)
                if spec.cancel:
                    self.cancel_when(record, spec.cancel)
                else:
                    self.answer(record, spec, JOB_TIMEOUT_S)

        threads = [threading.Thread(target=client, args=(index,), name=f"client-{index}") for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def cancel_when(self, record: JobRecord, when: str) -> None:
        """Cancel the job once the worker has taken it (``taken``) or once it runs (``running``: its first
        progress post has come); its outcome is read at the end (``settle``)."""
        deadline = time.monotonic() + TAKE_TIMEOUT_S
        seen = self.api.taken if when == "taken" else self.api.progress
        while record.id not in seen:
            if time.monotonic() >= deadline or self.worker.poll() is not None or record.id in self.api.results:
                record.detail = f"not {when} in time, so not cancelled"
                return
            time.sleep(0.02)
        self.api.cancel(record.id)
        record.cancelled_at = self.now()

    def settle(self) -> None:
        """Judge the cancelled jobs and count every job's posts and takes, once late posts have had time."""
        time.sleep(SETTLE_S)
        for record in self.records:
            posts = self.api.results.get(record.id, [])
            if record.status == "pending":  # a job to cancel
                self.judge_cancelled(record, posts)
            if len(posts) > 1 or self.api.taken.get(record.id, 0) > 1:
                record.status = "duplicated"
                record.detail = f"posted {len(posts)} times, taken {self.api.taken.get(record.id, 0)} times"

    def judge_cancelled(self, record: JobRecord, posts: list[dict[str, Any]]) -> None:
        if record.cancelled_at is None:
            record.status = "lost"
            if posts:
                record.status, record.detail = self.judge(self.specs[record.spec], posts[-1])
            return
        if not posts:
            record.status = "cancelled"
        elif "error" in posts[-1]:
            record.status, record.detail = "cancelled", f"answered with an error: {str(posts[-1]['error'])[:200]}"
        else:
            status, detail = self.judge(self.specs[record.spec], posts[-1])
            record.status = "not-stopped" if status == "ok" else status
            record.detail = detail or "the image came back: the stop did not reach the running job"


# --- figures --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def latency_by_task(records: Sequence[JobRecord]) -> dict[str, dict[str, Any]]:
    """Per task: jobs, the reference pass's latency (alone), and the soak's p50, p99 and their ratio."""
    figures: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        soak = [r.latency_s for r in records if r.task == task and r.phase == "soak" and r.latency_s is not None]
        # The bad inputs' reference jobs are sent together, so they have no latency alone.
        alone = [
            r.latency_s
            for r in records
            if r.task == task and r.phase == "reference" and r.latency_s is not None and task != "bad-input"
        ]
        jobs = sum(1 for r in records if r.task == task and r.phase == "soak")
        entry: dict[str, Any] = {"jobs": jobs, "answered": len(soak), "alone_s": alone}
        if soak:
            p50, p99 = percentile(soak, 50), percentile(soak, 99)
            entry.update(p50_s=round(p50, 3), p99_s=round(p99, 3), p99_over_p50=round(p99 / p50, 3))
        figures[task] = entry
    return figures


def rss_slope(records: Sequence[JobRecord]) -> dict[str, Any]:
    """The least-squares slope of the worker's RSS at each soak job's answer against the answers' order,
    leaving out the first ``WARMUP_FRACTION`` of them."""
    answered = sorted(
        (r for r in records if r.phase == "soak" and r.rss_mib is not None and r.ended is not None),
        key=lambda r: r.ended or 0.0,
    )
    warmup = int(len(answered) * WARMUP_FRACTION)
    kept = answered[warmup:]
    entry: dict[str, Any] = {"answered_jobs": len(answered), "warmup_jobs": warmup, "jobs_fitted": len(kept)}
    if len(kept) >= 3:
        x = np.arange(warmup, len(answered), dtype=float)
        y = np.asarray([r.rss_mib for r in kept], dtype=float)
        entry["slope_mib_per_job"] = round(float(np.polyfit(x, y, 1)[0]), 5)
        entry["first_mib"], entry["last_mib"] = round(float(y[0]), 1), round(float(y[-1]), 1)
    return entry


def during(samples: Sequence[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.seconds <= end]


def resource_figures(samples: Sequence[Sample], soak_start: float, soak_end: float) -> dict[str, Any]:
    """RSS, open file descriptors and threads at the soak's start and end, their maxima, and the fds' growth."""
    window = during(samples, soak_start, soak_end)
    if not window:
        return {}
    fifth = (soak_end - soak_start) / 5
    early = during(window, soak_start, soak_start + fifth) or window[:1]
    late = during(window, soak_end - fifth, soak_end) or window[-1:]
    figures: dict[str, Any] = {}
    for name in ("rss_mib", "fds", "threads"):
        values = [getattr(s, name) for s in window]
        figures[name] = {"start": values[0], "end": values[-1], "max": max(values), "min": min(values)}
    for name in ("fds", "threads"):
        figures[name]["growth"] = min(getattr(s, name) for s in late) - min(getattr(s, name) for s in early)
    return figures


def goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal with what was measured, whether it was met, and its kind: ``correctness`` goals hold in a
    run of any length; ``figure`` goals (RSS slope, latency spread) need a long run on a quiet machine."""
    counts, tasks, resources, bad = report["counts"], report["tasks"], report["resources"], report["bad_inputs"]
    lost_or_duplicated = counts.get("lost", 0) + counts.get("duplicated", 0)
    ratios = [entry.get("p99_over_p50") for entry in tasks.values() if entry["answered"]]
    slope = report["rss"].get("slope_mib_per_job")
    fd_growth = resources.get("fds", {}).get("growth")
    return {
        "no lost or duplicated jobs": {
            "kind": "correctness",
            "measured": lost_or_duplicated,
            "met": lost_or_duplicated == 0,
        },
        "no wrong answers": {"kind": "correctness", "measured": counts.get("wrong", 0), "met": not counts.get("wrong")},
        "every bad input's error names its field": {
            "kind": "correctness",
            "measured": f"{sum(entry['named'] for entry in bad.values())} of {len(bad)}",
            "met": all(entry["named"] for entry in bad.values()),
        },
        f"open fds grow by at most {FD_GROWTH_MARGIN}": {
            "kind": "correctness",
            "measured": fd_growth,
            "met": fd_growth is not None and fd_growth <= FD_GROWTH_MARGIN,
        },
        f"RSS slope after warm-up under {RSS_SLOPE_GOAL_MIB_PER_JOB} MiB/job": {
            "kind": "figure",
            "measured": slope,
            "met": slope is not None and slope < RSS_SLOPE_GOAL_MIB_PER_JOB,
        },
        f"p99 within {P99_OVER_P50_GOAL}x p50 for each task": {
            "kind": "figure",
            "measured": max((ratio for ratio in ratios if ratio is not None), default=None),
            "met": bool(ratios) and all(ratio is not None and ratio <= P99_OVER_P50_GOAL for ratio in ratios),
        },
    }


def bad_inputs(records: Sequence[JobRecord], specs: dict[str, Spec]) -> dict[str, dict[str, Any]]:
    """Per bad input: its field, how often it was sent, and whether every answer named the field."""
    entries: dict[str, dict[str, Any]] = {}
    for spec in specs.values():
        if spec.error_field is None:
            continue
        sent = [r for r in records if r.spec == spec.name]
        errors = [r.detail for r in sent if r.status == "expected-error"]
        entries[spec.name] = {
            "field": spec.error_field,
            "sent": len(sent),
            "named": bool(sent) and len(errors) == len(sent),
            "error": errors[0] if errors else next((r.detail for r in sent), ""),
        }
    return entries


def summarize(
    soak: Soak, samples: Sequence[Sample], phases: dict[str, float], worker: dict[str, Any]
) -> dict[str, Any]:
    records = soak.records
    report: dict[str, Any] = {
        "phases_s": {name: round(value, 2) for name, value in phases.items()},
        "worker": worker,
        "jobs_sent": {phase: sum(1 for r in records if r.phase == phase) for phase in ("startup", "reference", "soak")},
        "counts": dict(Counter(r.status for r in records)),
        "tasks": latency_by_task(records),
        "rss": rss_slope(records),
        "resources": resource_figures(samples, phases["soak_start"], phases["soak_end"]),
        "bad_inputs": bad_inputs(records, soak.specs),
        "cancels": {
            spec.task: dict(Counter(r.status for r in records if r.spec == spec.name and r.phase == "soak"))
            for spec in soak.specs.values()
            if spec.cancel
        },
        "posts_for_unknown_jobs": sorted(set(soak.api.results) - {r.id for r in records}),
        "pings": len(soak.api.pings),
    }
    report["goals"] = goals(report)
    report["jobs"] = [asdict(r) for r in records]
    report["samples"] = [[round(s.seconds, 2), round(s.rss_mib, 2), s.fds, s.threads] for s in samples]
    return report


# --- the report --------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"Machine: {report['machine']} ({report['cpu']}); Python {report['python']}, "
        f"torch {report['versions']['torch']}, runpod {report['versions']['runpod']}; {report['date']}.",
        f"Command: `{report['command']}`, {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after.",
        f"Worker: `python handler.py` under runpod's job loop, CONCURRENCY={settings['concurrency']}, the tiny model "
        f"on the CPU; {settings['clients']} clients; first job answered {report['phases_s']['ready']:.1f} s after "
        f"the start; {report['jobs_sent']['soak']} jobs in {report['phases_s']['soak']:.0f} s of soak "
        f"after {report['jobs_sent']['reference']} reference jobs; SIGTERM at the end: exit status "
        f"{report['worker']['exit_status_on_sigterm']}.",
        "",
        "| status | jobs |",
        "| --- | --- |",
    ]
    lines += [f"| {status} | {count} |" for status, count in sorted(report["counts"].items())]
    lines += [
        "",
        "| task | soak jobs | alone (reference pass), median (min-max) | p50 | p99 | p99 / p50 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, entry in report["tasks"].items():
        alone = median_range(entry["alone_s"]) if entry["alone_s"] else "-"
        if "p50_s" in entry:
            figures = f"{entry['p50_s']:.2f} s | {entry['p99_s']:.2f} s | {entry['p99_over_p50']:.2f}"
        else:
            figures = "- | - | -"
        lines.append(f"| {task} | {entry['jobs']} | {alone} | {figures} |")
    resources, rss = report["resources"], report["rss"]
    lines += ["", "| worker, during the soak | start | end | max | growth |", "| --- | --- | --- | --- | --- |"]
    if resources:
        lines += [
            f"| RSS | {resources['rss_mib']['start']:.1f} MiB | {resources['rss_mib']['end']:.1f} MiB | "
            f"{resources['rss_mib']['max']:.1f} MiB | slope {rss.get('slope_mib_per_job', float('nan')):.4f} MiB/job "
            f"over jobs {rss['warmup_jobs'] + 1}-{rss['answered_jobs']} |",
            f"| open file descriptors | {resources['fds']['start']} | {resources['fds']['end']} | "
            f"{resources['fds']['max']} | {resources['fds']['growth']:+d} (fewest, last fifth against first) |",
            f"| threads | {resources['threads']['start']} | {resources['threads']['end']} | "
            f"{resources['threads']['max']} | {resources['threads']['growth']:+d} (fewest, last fifth against first) |",
        ]
    lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]
    for goal, entry in report["goals"].items():
        lines.append(f"| {goal} | {entry['measured']} | {'yes' if entry['met'] else 'no'} |")
    lines += ["", "| job to cancel | cancelled | not stopped | not cancelled |", "| --- | --- | --- | --- |"]
    for task, counts in report["cancels"].items():
        others = sum(count for status, count in counts.items() if status not in ("cancelled", "not-stopped"))
        lines.append(f"| {task} | {counts.get('cancelled', 0)} | {counts.get('not-stopped', 0)} | {others} |")
    lines += ["", "| bad input | field | sent | error |", "| --- | --- | --- | --- |"]
    for name, entry in report["bad_inputs"].items():
        error = entry["error"].replace("|", "\\|")
        lines.append(f"| {name} | `{entry['field']}` | {entry['sent']} | {error} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency per job by task, the worker's RSS, and its open file descriptors and threads, over time.

    The startup and the reference pass are shaded; the RSS axis spans the soak's range, so that a slope shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phases_s"]
    figure, (latency, rss, counts) = plt.subplots(3, 1, figsize=(11, 9), sharex=True, height_ratios=(3, 2, 1.5))
    colours = plt.get_cmap("tab20")
    for index, task in enumerate(TASKS):
        jobs = [job for job in report["jobs"] if job["task"] == task and job["latency_s"] is not None]
        if jobs:
            latency.scatter(
                [job["ended"] / 60 for job in jobs],
                [job["latency_s"] for job in jobs],
                s=10,
                color=colours(index % colours.N),
                label=task,
            )
    latency.set_ylabel("latency, submit to answer (s)")
    latency.set_title(f"{report['command']}  ({report['date']}, {report['cpu']})", fontsize="medium")
    latency.legend(loc="upper left", ncols=4, fontsize="small")
    samples = np.asarray(report["samples"], dtype=float).reshape(-1, 4)
    minutes = samples[:, 0] / 60
    rss.plot(minutes, samples[:, 1], color="tab:blue")
    soaking = samples[samples[:, 0] >= phases["soak_start"]]
    if len(soaking):
        low, high = soaking[:, 1].min(), soaking[:, 1].max()
        rss.set_ylim(low - max(0.5 * (high - low), 5), high + max(0.5 * (high - low), 5))
    rss.set_ylabel("worker RSS (MiB)")
    counts.plot(minutes, samples[:, 2], color="tab:red", label="open file descriptors")
    counts.plot(minutes, samples[:, 3], color="tab:green", label="threads")
    counts.set_ylim(0, max(samples[:, 2:].max() * 1.2, 1))
    counts.legend(loc="lower right", ncols=2, fontsize="small")
    counts.set_xlabel("minutes since the worker started (shaded: startup and reference pass)")
    for axes in (latency, rss, counts):
        axes.axvspan(0, phases["soak_start"] / 60, color="0.9", zorder=0)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- main -----------------------------------------------------------------------------------------------------


def stop_worker(worker: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then SIGKILL after 15 s; the exit status, or None if it had to be killed."""
    if worker.poll() is not None:
        return worker.returncode
    worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(timeout=15)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        return None


def soak_run(args: argparse.Namespace, workdir: Path, log: Path) -> dict[str, Any]:
    from bench.runpod_api import RunPodAPI

    print("writing the tiny model, its ControlNets and LoRAs", file=sys.stderr, flush=True)
    writing = time.monotonic()
    assets = write_assets(workdir)
    assets_s = time.monotonic() - writing
    with s3_server() as (s3_url, s3), RunPodAPI() as api, log.open("wb") as log_file:
        env = worker_environment(assets, api.worker_env(), s3_url, workdir / "hf-home", args.concurrency)
        started = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "handler.py"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        sampler = Sampler(worker.pid, started, SAMPLE_INTERVAL_S)
        sampler.start()
        soak = Soak(api, s3, worker, started)
        phases: dict[str, float] = {}
        try:
            print(f"worker {worker.pid} started", file=sys.stderr, flush=True)
            soak.run_startup()
            phases["ready"] = soak.now()
            soak.run_reference_pass()
            # The soak lasts --minutes from here: on a busy machine a slow reference pass would otherwise leave
            # it a few jobs, too few for the growth of descriptors and threads to mean anything.
            until = time.monotonic() + args.minutes * 60
            phases["soak_start"] = soak.now()
            print(f"reference pass done; {args.clients} clients until {args.minutes} min", file=sys.stderr, flush=True)
            soak.run_clients(args.clients, until, args.max_jobs)
            phases["soak_end"] = soak.now()
            phases["soak"] = phases["soak_end"] - phases["soak_start"]
            soak.settle()
            alive_at_end = worker.poll() is None
        finally:
            sampler.stopped.set()
            stopping = time.monotonic()
            exit_status = stop_worker(worker)
            phases["stop"] = time.monotonic() - stopping
            sampler.join()
    phases["assets"] = assets_s
    worker_end = {"alive_at_end": alive_at_end, "exit_status_on_sigterm": exit_status}
    return summarize(soak, sampler.samples, phases, worker_end)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "runpod")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=30.0,
        help="how long jobs are sent from the worker's first answer, the reference pass included (default 30)",
    )
    parser.add_argument("--clients", type=int, default=3, help="client threads sending jobs (default 3)")
    parser.add_argument("--max-jobs", type=int, help="stop sending after this many soak jobs (default: no limit)")
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's CONCURRENCY (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for soak.json, soak.md and soak.png")
    parser.add_argument("--log", type=Path, help="keep the worker's log in this file (default: a temporary file)")
    args = parser.parse_args(argv)
    started = time.time()
    report: dict[str, Any] = {**report_header(), "versions": versions()}
    report["command"] = " ".join(["python -m bench.soak", *argv])
    report["settings"] = {
        "minutes": args.minutes,
        "clients": args.clients,
        "max_jobs": args.max_jobs,
        "concurrency": args.concurrency,
        "sample_interval_s": SAMPLE_INTERVAL_S,
        "warmup_fraction": WARMUP_FRACTION,
    }
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        log = args.log or Path(workdir) / "worker.log"
        try:
            report.update(soak_run(args, Path(workdir), log))
        except Exception:
            tail = log.read_text(encoding="utf-8", errors="replace")[-4000:] if log.is_file() else ""
            print(f"the worker's log ends:\n{tail}", file=sys.stderr)
            raise
    report["load_average_after"] = load_average()
    report["seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (args.out / "soak.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / "soak.md").write_text(table, encoding="utf-8")
    plot(report, args.out / "soak.png")
    print(table)
    print(f"written to {args.out / 'soak.md'}, soak.json and soak.png in {report['seconds']:.0f} s")
    # The exit status says whether the answers were right; the figures are for the reader.
    return 0 if all(entry["met"] for entry in report["goals"].values() if entry["kind"] == "correctness") else 1


if __name__ == "__main__":
    sys.exit(main())
