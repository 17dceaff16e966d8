"""runpod's local HTTP API, started as a real subprocess the way the README says."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, decode_png, free_port, wait_for_port


@pytest.fixture(scope="module")
def api_url(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "handler.py"),
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        cwd=Path(tmp_path_factory.mktemp("api")),
        env=offline_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(api_url: str, payload: dict) -> dict:
    response = requests.post(f"{api_url}/runsync", json=payload, timeout=120)
    response.raise_for_status()
    return response.json()


def test_runsync_completes_with_images(api_url: str) -> None:
    body = post(api_url, {"input": {"prompt": "a fox", "width": 128, "height": 64, "num_inference_steps": 2}})

    assert body["status"] == "COMPLETED"
    [item] = body["output"]["images"]
    assert decode_png(item["image"]).size == (128, 64)
    assert body["output"]["metadata"]["seeds"] == [item["seed"]]


def test_runsync_bad_input_fails_then_the_next_job_completes(api_url: str) -> None:
    bad = post(api_url, {"input": {"prompt": "", "guidance_scale": 99}})
    assert bad["status"] == "FAILED"
    assert "prompt" in bad["error"]
    assert "guidance_scale=99" in bad["error"]

    good = post(api_url, {"input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 1}})
    assert good["status"] == "COMPLETED"
