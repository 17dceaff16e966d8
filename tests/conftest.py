"""Shared fixtures: the tiny real SD 1.5-shaped pipeline, built once per test session.

boto3 and moto are imported inside the fixtures that use them: the GPU machine
has neither, and `pytest -m gpu` must still collect there (tests/test_gpu_kit.py).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

import handler
from builder.tiny_model import write_tiny_model
from src.settings import Settings
from tests.stand_ins.spandrel_loader import import_spandrel

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

    from src.run.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


# One torch (OpenMP) thread in each test process and in every process a test starts, unless the shell says
# otherwise: the README runs the suite on four processes (pytest-xdist's ``-n 4``) on 2 cores, where two
# OpenMP threads per process wait on each other far longer than one works (tests/test_job_loop.py's ONE_THREAD).
TORCH_THREADS = "1"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", TORCH_THREADS)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import_spandrel()
    if "gpu" in (config.option.markexpr or ""):
        config.pluginmanager.register(LinePerTest(config), "line-per-test")


class LinePerTest:
    """With ``-m gpu``: a line as each test starts and one as it ends (its outcome, phase and seconds).

    The GPU kit runs these tests under a time limit (../shared/gpu/run.sh); a run the limit cuts short still
    says which tests passed, which failed, and which one was running.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def write_line(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        # On a line of its own, below the previous test's progress character.
        self.write_line(f"\nSTART {nodeid}")

    @pytest.hookimpl(tryfirst=True)  # before pytest's progress character
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.write_line(f"{report.outcome.upper()} {report.nodeid} ({report.when}, {report.duration:.1f} s)")


# Subprocesses that serve upscalers put this folder on PYTHONPATH (its sitecustomize imports spandrel).
SPANDREL_SITE = Path(__file__).resolve().parent / "stand_ins" / "site"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare pyproject's ``timeout`` key where pytest-timeout is missing (the GPU machine),
    so that ``--strict-config`` does not stop the run; there it has no effect."""
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        parser.addini("timeout", "pytest-timeout's per-test limit; ignored: pytest-timeout is not installed")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight pipeline saved with save_pretrained, as `python -m builder.tiny_model` does."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def offline_env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment for subprocesses: the tiny model, an empty hub cache, no hub."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPOD_", "MODEL_", "HF_"))}
    env.update(
        MODEL_ID=str(tiny_model_dir),
        HF_HOME=str(tmp_path_factory.mktemp("hf-home")),
        # A closed port on loopback: any attempt to reach the hub fails at once.
        HF_ENDPOINT="http://127.0.0.1:9",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def worker(tiny_model_dir: Path) -> Iterator[None]:
    """`handler.handler` backed by the tiny model, loaded on the first job as in production."""
    with pytest.MonkeyPatch.context() as patch:
        for field in Settings.model_fields.values():
            patch.delenv(str(field.alias), raising=False)
        patch.setenv("MODEL_ID", str(tiny_model_dir))
        patch.setattr(handler, "_settings", None)
        patch.setattr(handler, "_engine", None)
        yield


def decode_png(data: str) -> Image.Image:
    """Decode a base64 PNG from a response, checking that it is one."""
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels: every pixel differs, so a changed one shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A black mask with a white box: repaint the box, keep the rest."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_handler_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `python handler.py ARGS` the way the README says, from ``cwd``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "handler.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for_port(port: int, process: subprocess.Popen[str], deadline_s: float = 120) -> None:
    """Wait until something listens on 127.0.0.1:port, or fail with the process's output."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"server exited with {process.returncode}:\n{output[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listened on port {port} within {deadline_s} s")


SECRET = "test-secret-never-printed-8c1f"
ACCESS_KEY = "test-access-key"


@dataclass
class S3Server:
    """A real S3 server (moto's server mode) on 127.0.0.1, and a client for checking it."""

    server: ThreadedMotoServer
    url: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET,
        )


@pytest.fixture
def s3_server() -> Iterator[S3Server]:
    """A fresh S3 server per test, so a test may stop it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(server, f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def configure(worker: None) -> Iterator[Callable[..., None]]:
    """Set worker variables for one test: the settings and the S3 client are rebuilt, the model is kept."""
    del worker
    with pytest.MonkeyPatch.context() as patch:

        def apply(**variables: str) -> None:
            for name, value in variables.items():
                patch.setenv(name, value)
            patch.setattr(handler, "_settings", None)
            patch.setattr(handler, "_storage", None)

        apply()
        yield apply


@pytest.fixture
def bucket(s3_server: S3Server, configure: Callable[..., None]) -> str:
    """A bucket on the test server, with the worker configured to upload to it."""
    name = "renders"
    s3_server.client().create_bucket(Bucket=name)
    configure(
        BUCKET_NAME=name,
        BUCKET_ENDPOINT_URL=s3_server.url,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
        BUCKET_SECRET_ACCESS_KEY=SECRET,
        BUCKET_PREFIX="test/",
    )
    return name


@pytest.fixture(scope="session")
def tiny_model_with_checker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tiny random safety checker and its CLIP image processor."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-sd15-checker"), safety_checker=True)


# How SD 1.5's model_index.json on the hub names the safety checker and its feature extractor.
HUB_CHECKER_ENTRIES = {
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}


def as_baked_without_the_checker(model: Path, folder: Path) -> Path:
    """A copy of the tiny model in ``folder`` as SD 1.5 is baked without the checker (the default): its
    model_index.json names the safety checker and feature extractor, as the hub's does, and their folders are
    not there."""
    shutil.copytree(model, folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    (folder / "model_index.json").write_text(json.dumps({**index, **HUB_CHECKER_ENTRIES}), encoding="utf-8")
    return folder


def rss_bytes() -> int:
    """This process's resident set size, from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def held_rss_bytes() -> int:
    """The resident set size once glibc has given its free pages back (``malloc_trim``, every arena): what the
    process holds, without what the allocator keeps for later. In a test process whose threads earlier tests
    left running, a leak shows in it above the allocator's noise. (A ``gc.collect`` would take 0.3 s a reading
    with the models loaded; a job's memory goes by reference counting.)"""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the plain figure
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def split_by_admission(engine: Engine, width: int, height: int, images: int) -> Engine:
    """An engine on ``engine``'s pipeline whose admission, as on a GPU in the balanced profile with room for
    ``images`` - 1 ``width`` x ``height`` images at once and not ``images``, splits a job of ``images`` in two."""
    from src.run.engine import Engine
    from src.run.memory import Profile, estimate_peak_bytes

    fewer, more = (
        estimate_peak_bytes(Profile.BALANCED, width, height, count, engine.dtype.itemsize)
        for count in (images - 1, images)
    )
    assert fewer < more, "at this size the VAE's sliced decode outweighs the UNet: ask for more images"
    return Engine(
        engine._pipeline,
        settings=engine.settings,
        device=engine.device,
        dtype=engine.dtype,
        profile=Profile.BALANCED,
        gpu_bytes=int((fewer + more) / 2 / 0.95),
    )


def encoding_at_the_vae_mean(pipeline_class: type) -> type:
    """``pipeline_class`` (bare diffusers) encoding its input image to the mean of the VAE's latent distribution,
    drawing nothing from the images' generators, as the worker does and A1111 (whose VAE sample does not draw from
    the image's generator): each pass's noise is then its generators' first draw."""

    def mean(encoder_output: Any, generator: Any = None, sample_mode: str = "sample") -> Any:
        return encoder_output.latent_dist.mode()

    class AtTheMean(pipeline_class):  # type: ignore[misc, valid-type]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            modules = [sys.modules[kind.__module__] for kind in type(self).__mro__]
            with pytest.MonkeyPatch.context() as patch:
                for module in (module for module in modules if hasattr(module, "retrieve_latents")):
                    patch.setattr(module, "retrieve_latents", mean)  # none in text-to-image's
                return super().__call__(*args, **kwargs)

    return AtTheMean
