"""`python handler.py` run as a program, the way the README says: files, a short summary, exit codes.

What a local run does with a job (file names, folders, tasks from flags, a failed job) is checked in this
process on the warm tiny model (``run_here``); the program itself, started as the README says, in the rest.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import requests
from PIL import Image

import handler
from src import local
from tests.conftest import ROOT, SPANDREL_SITE, free_port, run_handler_cli, wait_for_port

FOX = json.dumps({"input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 11}})


@dataclass(frozen=True)
class Ran:
    """What a local run gave: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_here(
    worker: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Ran]:
    """`python handler.py ARGS` from ``tmp_path`` (or ``cwd``), in this process: the same command line
    (``local.read_command_line``) and the same local run (``local.run_local`` through runpod's ``run_job``), on the
    session's warm tiny model.

    For what the local run does with a job; the tests that start ``python handler.py`` as a program cover the rest:
    the program's startup, its exit codes before a job, the progress bar, and the README's commands as written.
    """
    del worker

    def run(args: list[str], cwd: Path = tmp_path) -> Ran:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        local_run = local.read_command_line(args, environ={})
        assert local_run is not None, "a local run"
        returncode = local.run_local(handler.handler, local_run)
        printed = capsys.readouterr()
        return Ran(returncode, printed.out, printed.err)

    return run


def test_acceptance_command_writes_a_png_and_a_short_summary(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The issue's own command, run in a shell exactly as written."""
    command = (
        't=$(mktemp -d) && "$PYTHON" -m builder.tiny_model "$t" && MODEL_ID="$t" "$PYTHON" '
        f'{ROOT / "handler.py"} --test_input \'{{"input": {{"prompt": "a fox", "num_inference_steps": 2}}}}\''
    )
    # The command leaves its mktemp folder behind (the README's blocks remove theirs): keep it in tmp_path.
    env = {**offline_env, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    env.pop("MODEL_ID")

    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )

    assert result.returncode == 0, result.stderr[-3000:]
    written = list((tmp_path / "output").rglob("*.png"))
    assert len(written) == 1
    with Image.open(written[0]) as image:
        assert image.size == (512, 512)
    printed = result.stdout + result.stderr
    assert len(printed.encode()) < 2048, printed
    assert str(written[0].relative_to(tmp_path)) in result.stdout
    # stderr is a pipe here, not a terminal: diffusers' progress bar is not drawn into it.
    assert not any(bar in result.stderr for bar in ("it/s", "s/it", "2/2")), result.stderr


def test_test_input_flag_names_files_by_seed(tmp_path: Path, run_here: Callable[..., Ran]) -> None:
    result = run_here(["--test_input", FOX, "--output_dir", str(tmp_path / "out")])

    assert result.returncode == 0, result.stderr[-3000:]
    [png] = (tmp_path / "out").rglob("*.png")
    assert png.name == "0-11.png"
    assert "seed 11" in result.stdout
    assert "iVBOR" not in result.stdout + result.stderr, "no base64 in the terminal"


def test_a_variation_batch_prints_each_images_variation_seed(tmp_path: Path, run_here: Callable[..., Ran]) -> None:
    job = {"prompt": "a fox", "num_inference_steps": 2, "seed": 11, "num_images": 2, "width": 64, "height": 64}
    varied = json.dumps({"input": {**job, "subseed": 5, "subseed_strength": 0.5}})
    result = run_here(["--test_input", varied, "--output_dir", str(tmp_path / "out")])

    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(png.name for png in (tmp_path / "out").rglob("*.png")) == ["0-11.png", "1-11.png"]
    assert "seed 11, variation seed 5" in result.stdout
    assert "seed 11, variation seed 6" in result.stdout
    plain = run_here(["--test_input", json.dumps({"input": {**job, "subseed": 5}})])
    assert "variation seed" not in plain.stdout, "without a strength the variation seed does nothing"


def test_a_describe_job_prints_what_the_worker_serves(tmp_path: Path, run_here: Callable[..., Ran]) -> None:
    result = run_here(["--test_input", json.dumps({"input": {"describe": True}})])

    assert result.returncode == 0, result.stderr[-3000:]
    described = json.loads(result.stdout)["describe"]
    assert described["device"] == "cpu"
    assert "models" in described
    assert not (tmp_path / "output").exists(), "no images, no folder"


def test_no_arguments_runs_test_input_json(tmp_path: Path, run_here: Callable[..., Ran]) -> None:
    """The project's test_input.json, made small: 512² at 25 steps is a minute of the tiny model on a busy CPU.

    That the file itself is a valid request is checked in tests/test_docs.py.
    """
    job = json.loads((ROOT / "test_input.json").read_text())
    job["input"].update(width=64, height=128, num_inference_steps=2)
    (tmp_path / "test_input.json").write_text(json.dumps(job))

    result = run_here([])

    assert result.returncode == 0, result.stderr[-3000:]
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.name == f"0-{job['input']['seed']}.png"
    with Image.open(png) as image:
        assert image.size == (64, 128)


@pytest.mark.parametrize("job_id", ["../escaped", "/absolute/escaped"], ids=["parent", "absolute"])
def test_job_id_cannot_write_outside_the_output_folder(
    tmp_path: Path, run_here: Callable[..., Ran], job_id: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if job_id.startswith("/"):
        job_id = str(tmp_path / "escaped")
    job = {"id": job_id, "input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2}}

    result = run_here(["--test_input", json.dumps(job)], cwd=work)

    assert result.returncode == 0, result.stderr[-3000:]
    [png] = tmp_path.rglob("*.png")
    assert png.parent.parent == work / "output"
    assert png.parent.name.endswith("-escaped")
    assert str(png.relative_to(work)) in result.stdout


@pytest.mark.parametrize(
    ("job_id", "folder"),
    [
        ("run-7", "run-7"),
        ("a b/c:d", "a-b-c-d"),
        ("../x", "-x"),
        ("/abs", "-abs"),
        (".hidden", "hidden"),
        ("..", None),
        ("", None),
        ("ünï", "-n-"),
    ],
)
def test_job_folder_is_one_safe_name_inside_the_output_folder(tmp_path: Path, job_id: str, folder: str | None) -> None:
    path = local.job_folder(tmp_path / "output", job_id, fallback="local-1")

    assert path == tmp_path / "output" / (folder or "local-1")


def test_job_folder_refuses_a_link_that_leads_out(tmp_path: Path) -> None:
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "job").symlink_to(tmp_path)

    with pytest.raises(ValueError, match="outside"):
        local.job_folder(tmp_path / "output", "job", fallback="local-1")


@pytest.mark.skipif(
    "show_progress_bar" not in (ROOT / "src" / "run" / "engine.py").read_text(encoding="utf-8"),
    reason="Engine.show_progress_bar is not in src/run/engine.py yet",
)
def test_progress_bar_on_a_terminal(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """stderr on a pseudo-terminal: diffusers' bar is drawn there; stdout, a pipe, holds only the summary."""
    job = json.dumps({"input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2}})
    controller, terminal = pty.openpty()
    # A new pseudo-terminal is 0x0, and tqdm draws nothing in no columns; give it a real terminal's size.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "handler.py"), "--test_input", job],
            cwd=tmp_path,
            env=offline_env,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        drawn = bytearray()
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            drawn += chunk
        stdout, _ = process.communicate(timeout=120)
    finally:
        os.close(controller)

    assert process.returncode == 0, drawn.decode(errors="replace")[-3000:]
    on_terminal = drawn.decode(errors="replace")
    assert "2/2" in on_terminal
    assert "it/s" in on_terminal or "s/it" in on_terminal
    assert "it/s" not in stdout
    assert "COMPLETED" in stdout


def test_failed_job_exits_non_zero_with_the_error(tmp_path: Path, run_here: Callable[..., Ran]) -> None:
    bad = json.dumps({"input": {"prompt": "a fox", "width": 500}})

    result = run_here(["--test_input", bad])

    assert result.returncode == 1
    assert "width=500: must be a multiple of 64" in result.stderr
    assert not (tmp_path / "output").exists()


def test_unparseable_test_input_exits_2(tmp_path: Path, offline_env: dict[str, str]) -> None:
    result = run_handler_cli(["--test_input", "{not json"], offline_env, tmp_path)

    assert result.returncode == 2
    assert "not valid JSON" in result.stderr


def test_bad_setting_stops_startup_naming_the_variable(tmp_path: Path, offline_env: dict[str, str]) -> None:
    result = run_handler_cli(["--test_input", FOX], {**offline_env, "MAX_SIDE": "1000"}, tmp_path)

    assert result.returncode == 2
    assert "MAX_SIDE='1000': must be a multiple of 64" in result.stderr


@pytest.mark.parametrize(
    ("model_id", "named"),
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("/no/such/folder", "/no/such/folder"),
    ],
    ids=["hub-id", "missing-folder"],
)
def test_unreachable_model_fails_before_torch_is_imported_with_the_ways_out(
    tmp_path: Path, offline_env: dict[str, str], model_id: str, named: str
) -> None:
    # No wall-clock bound: the subprocess limit catches a hang, with room for a busy machine. Python lists
    # every module it imports (PYTHONPROFILEIMPORTTIME) on stderr.
    env = {**offline_env, "MODEL_ID": model_id, "PYTHONPROFILEIMPORTTIME": "1"}
    result = run_handler_cli(["--test_input", FOX], env, tmp_path, timeout=120)

    assert result.returncode == 1
    assert named in result.stderr
    assert "Ways out" in result.stderr
    assert "builder.tiny_model" in result.stderr
    assert "Traceback" not in result.stderr
    imported = re.findall(r"^import time:.*\| +(\S+)$", result.stderr, re.MULTILINE)
    assert "src.models.locate" in imported
    assert not {"torch", "diffusers", "transformers"} & set(imported), "found out before torch was imported"


def test_silent_hub_cannot_hang_startup(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """A hub that accepts connections and never answers: startup still ends, with the model's error.

    The probe's own deadline is 10 s; the subprocess limit of 120 s is what catches a hang,
    with room for a slow import on a busy machine.
    """
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host, port = silent.getsockname()
        env = {**offline_env, "MODEL_ID": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
        env["HF_ENDPOINT"] = f"http://{host}:{port}"

        result = run_handler_cli(["--test_input", FOX], env, tmp_path, timeout=120)

    assert result.returncode == 1
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr
    assert "Ways out" in result.stderr


def test_s3_run_as_the_readme_says(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """moto_server on loopback, the BUCKET_* variables, one job with output_type s3, the URL fetched."""
    port = free_port()
    server = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, server)
        endpoint = f"http://127.0.0.1:{port}"
        credentials = {"BUCKET_ACCESS_KEY_ID": "test", "BUCKET_SECRET_ACCESS_KEY": "test"}
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket="renders")
        env = {**offline_env, **credentials, "BUCKET_ENDPOINT_URL": endpoint, "BUCKET_NAME": "renders"}
        job = json.dumps(
            {"input": {"prompt": "a fox", "num_inference_steps": 2, "output_type": "s3", "seed": 3, "width": 128}}
        )

        result = run_handler_cli(["--test_input", job], env, tmp_path)

        assert result.returncode == 0, result.stderr[-3000:]
        [url] = [word for word in result.stdout.split() if word.startswith(endpoint)]
        response = requests.get(url, timeout=10)
        assert response.headers["Content-Type"] == "image/png"
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.size == (128, 512)
            assert "Seed: 3" in image.text["parameters"]
    finally:
        server.terminate()
        server.wait(timeout=20)


# (flags with files, input fields) -> (task, image size)
CLI_TASKS = [
    pytest.param((["--image", "photo.png"], {}), ("img2img", (128, 64)), id="img2img"),
    pytest.param((["--image", "photo.png", "--mask", "mask.png"], {}), ("inpaint", (128, 64)), id="inpaint"),
    pytest.param((["--image", "photo.png"], {"outpaint": {"top": 64}}), ("outpaint", (128, 128)), id="outpaint"),
    pytest.param(([], {"width": 64, "height": 64, "hires": {"scale": 1.5}}), ("txt2img", (96, 96)), id="hires"),
    pytest.param(
        (
            [],
            {"width": 64, "height": 64, "tiling": True, "subseed": 5, "subseed_strength": 0.5}
            | {"seed_resize_from_w": 128, "seed_resize_from_h": 64},
        ),
        ("txt2img", (64, 64)),
        id="a1111-options",
    ),
    pytest.param(
        ([], {"width": 64, "height": 64, "hires": {"scale": 1.5, "sampler": "Euler a", "prompt": "a red fox"}}),
        ("txt2img", (96, 96)),
        id="hires-options",
    ),
]


@pytest.mark.parametrize(("command", "expected"), CLI_TASKS)
def test_each_task_from_the_command_line(
    tmp_path: Path,
    run_here: Callable[..., Ran],
    command: tuple[list[str], dict[str, object]],
    expected: tuple[str, tuple[int, int]],
) -> None:
    (files, fields), (task, size) = command, expected
    Image.new("RGB", (128, 64), (30, 90, 160)).save(tmp_path / "photo.png")
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 64, 64))
    mask.save(tmp_path / "mask.png")
    job = json.dumps({"input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 11, **fields}})

    result = run_here([*files, "--test_input", job, "--output_dir", "out"])

    assert result.returncode == 0, result.stderr[-3000:]
    [png] = (tmp_path / "out").rglob("*.png")
    with Image.open(png) as image:
        assert image.size == size
    assert f", {task}, " in result.stdout
    assert f"{size[0]}x{size[1]}" in result.stdout


def test_an_unreadable_image_file_exits_2(tmp_path: Path, offline_env: dict[str, str]) -> None:
    result = run_handler_cli(["--image", "missing.png", "--test_input", FOX], offline_env, tmp_path)

    assert result.returncode == 2
    assert "--image missing.png: cannot be read" in result.stderr


def run_readme_block(after: str, tmp_path: Path, offline_env: dict[str, str], *, spandrel: bool = False) -> str:
    """Run the README's bash block that follows ``after``, as written there, in ``tmp_path``; check that it
    removed the folders it made; return the parameters inside the one PNG it writes. With ``spandrel``, its
    programs import spandrel at start as the test processes do (tests/stand_ins/spandrel_loader.py)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = (
        block.replace("\\\n", " ").replace("python ", '"$PYTHON" ').replace("handler.py", str(ROOT / "handler.py"))
    )
    # mktemp -d makes its folder under TMPDIR: a block that cleans up leaves this one empty.
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    python_path = os.pathsep.join([str(ROOT), *([str(SPANDREL_SITE)] if spandrel else [])])
    env = {**offline_env, "PYTHON": sys.executable, "PYTHONPATH": python_path, "TMPDIR": str(scratch)}
    env.pop("MODEL_ID")

    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in scratch.iterdir()] == [], "the block left its temporary folders behind"
    [png] = (tmp_path / "output").rglob("*.png")
    with Image.open(png) as image:
        return str(image.text["parameters"])


def test_the_readme_lora_smoke_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The README's LoRA smoke run, as written there: a tiny model, tiny LoRAs, and a job with a tag."""
    parameters = run_readme_block("A smoke run with a tiny LoRA on the tiny model:", tmp_path, offline_env)

    assert "<lora:tiny-peft-0:0.8>" in parameters
    assert 'Lora hashes: "tiny-peft-0: ' in parameters


def test_the_readme_checkpoint_smoke_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The README's single-file smoke run, as written there: the tiny model as one checkpoint and a VAE file."""
    parameters = run_readme_block(
        "A smoke run with the tiny model written as one checkpoint file", tmp_path, offline_env
    )

    assert re.search(r"Model: tiny-sd15, Model hash: [0-9a-f]{10}, VAE: tiny-vae, VAE hash: [0-9a-f]{10}", parameters)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    written = re.search(r"`Model: tiny-sd15, Model hash:\s+(\w+), VAE: tiny-vae, VAE hash: (\w+)`", readme)
    assert written is not None
    assert f"Model hash: {written[1]}, VAE: tiny-vae, VAE hash: {written[2]}" in parameters, "the README's hashes"


def test_the_readme_controlnet_smoke_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The README's ControlNet smoke run, as written there: the tiny model, its ControlNets, one unit."""
    parameters = run_readme_block("A smoke run with the tiny model and its tiny ControlNets", tmp_path, offline_env)

    assert 'ControlNet 0: "Module: none, Model: tiny-controlnet, Weight: 1.0' in parameters


def test_the_readme_many_models_smoke_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The README's MODELS_DIR smoke run, as written there: the tiny model, its tiny models, one named by a job."""
    parameters = run_readme_block(
        "A smoke run with the tiny model and its tiny models for `MODELS_DIR`", tmp_path, offline_env
    )

    assert re.search(r"Model: styles/tiny-b, Model hash: [0-9a-f]{10}", parameters)
    assert "Hires checkpoint: tiny-c" in parameters


def test_the_readme_upscale_smoke_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The README's upscale smoke run, as written there: a picture made, then enlarged through the tiny ESRGAN."""
    parameters = run_readme_block(
        "A smoke run with the tiny model and its tiny upscalers", tmp_path, offline_env, spandrel=True
    )

    assert "a lighthouse\nSteps: 2, " in parameters
    assert "Seed: 1, " in parameters
    assert "Hires upscaler: tiny-compact-2x" in parameters
    [png] = (tmp_path / "output").rglob("0-upscaled.png")
    with Image.open(png) as image:
        assert image.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: tiny-esrgan-4x"
        assert image.size == (256, 256)


def test_an_a1111_payload_runs_from_the_command_line(tmp_path: Path, run_here: Callable[..., Ran]) -> None:
    """A wrapped txt2img payload and a flat extra-single-image one: images written as for a native job."""
    txt2img = {
        "api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"},
        "payload": {"prompt": "a fox", "steps": 2, "seed": 12, "batch_size": 2, "width": 64, "height": 64},
    }
    result = run_here(["--test_input", json.dumps({"id": "a1111", "input": txt2img}), "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "a1111").glob("*.png")) == ["0-12.png", "1-13.png"]
    assert "seed 12" in result.stdout
    assert "iVBOR" not in result.stdout + result.stderr

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(buffer, "PNG")
    extras = {
        "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "upscaler_1": "Lanczos",
        "upscaling_resize": 2,
    }
    result = run_here(["--test_input", json.dumps({"id": "extras", "input": extras}), "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    [png] = (tmp_path / "extras").glob("*.png")
    with Image.open(png) as image:
        assert image.size == (64, 64)


def test_image_flag_fills_an_a1111_payloads_init_images_or_extras_image(
    tmp_path: Path, run_here: Callable[..., Ran]
) -> None:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "olive").save(photo)
    img2img = {"prompt": "a fox", "steps": 2, "seed": 4, "width": 64, "height": 64, "denoising_strength": 0.5}
    result = run_here(["--image", str(photo), "--test_input", json.dumps({"id": "flat", "input": img2img})])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img2img" in result.stdout
    extras = {
        "api": {"method": "POST", "endpoint": "/sdapi/v1/extra-single-image"},
        "payload": {"upscaler_1": "Lanczos"},
    }
    result = run_here(["--image", str(photo), "--test_input", json.dumps({"id": "extras", "input": extras})])
    assert result.returncode == 0, result.stderr[-3000:]
    [png] = (tmp_path / "output" / "extras").glob("*.png")
    with Image.open(png) as image:
        assert image.size == (128, 128)
