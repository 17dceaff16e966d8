"""`python handler.py` run as a program, the way the README says: files, a short summary, exit codes."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from PIL import Image

from tests.conftest import ROOT, free_port, run_handler_cli, wait_for_port

FOX = json.dumps({"input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 11}})


def test_acceptance_command_writes_a_png_and_a_short_summary(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The issue's own command, run in a shell exactly as written."""
    command = (
        't=$(mktemp -d) && "$PYTHON" -m builder.tiny_model "$t" && MODEL_ID="$t" "$PYTHON" '
        f'{ROOT / "handler.py"} --test_input \'{{"input": {{"prompt": "a fox", "num_inference_steps": 2}}}}\''
    )
    env = {**offline_env, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
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


def test_test_input_flag_names_files_by_seed(tmp_path: Path, offline_env: dict[str, str]) -> None:
    result = run_handler_cli(["--test_input", FOX, "--output_dir", str(tmp_path / "out")], offline_env, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    [png] = (tmp_path / "out").rglob("*.png")
    assert png.name == "0-11.png"
    assert "seed 11" in result.stdout
    assert "iVBOR" not in result.stdout + result.stderr, "no base64 in the terminal"


def test_no_arguments_runs_test_input_json(tmp_path: Path, offline_env: dict[str, str]) -> None:
    shutil.copy(ROOT / "test_input.json", tmp_path / "test_input.json")

    result = run_handler_cli([], offline_env, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((ROOT / "test_input.json").read_text())["input"]
    [png] = (tmp_path / "output").rglob("*.png")
    assert png.name == f"0-{expected['seed']}.png"
    with Image.open(png) as image:
        assert image.size == (expected["width"], expected["height"])


def test_failed_job_exits_non_zero_with_the_error(tmp_path: Path, offline_env: dict[str, str]) -> None:
    bad = json.dumps({"input": {"prompt": "a fox", "width": 500}})

    result = run_handler_cli(["--test_input", bad], offline_env, tmp_path)

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
def test_unreachable_model_fails_fast_with_the_ways_out(
    tmp_path: Path, offline_env: dict[str, str], model_id: str, named: str
) -> None:
    started = time.monotonic()

    result = run_handler_cli(["--test_input", FOX], {**offline_env, "MODEL_ID": model_id}, tmp_path, timeout=60)

    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert named in result.stderr
    assert "Ways out" in result.stderr
    assert "builder.tiny_model" in result.stderr
    assert "Traceback" not in result.stderr


def test_silent_hub_cannot_hang_startup(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """A hub that accepts connections and never answers: startup still ends, within 30 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host, port = silent.getsockname()
        env = {**offline_env, "MODEL_ID": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
        env["HF_ENDPOINT"] = f"http://{host}:{port}"
        started = time.monotonic()

        result = run_handler_cli(["--test_input", FOX], env, tmp_path, timeout=60)

    assert time.monotonic() - started < 30
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
        job = json.dumps({"input": {"prompt": "a fox", "num_inference_steps": 2, "output_type": "s3", "seed": 3}})

        result = run_handler_cli(["--test_input", job], env, tmp_path)

        assert result.returncode == 0, result.stderr[-3000:]
        [url] = [word for word in result.stdout.split() if word.startswith(endpoint)]
        response = requests.get(url, timeout=10)
        assert response.headers["Content-Type"] == "image/png"
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.size == (512, 512)
            assert "Seed: 3" in image.text["parameters"]
    finally:
        server.terminate()
        server.wait(timeout=20)
