"""How much jobs overlap on runpod's own job loop: sequential (CONCURRENCY=1) against CONCURRENCY=2 and 4.

Every job is an img2img whose input image comes from a loopback server that takes ``--fetch-s`` seconds
to answer (a slow image host), and whose output goes to S3 (``moto_server`` on loopback, its own process),
or inline with ``--no-s3`` (where moto is missing, as on the GPU machine: ``--model`` names the model).
Each mode runs in a fresh worker process, the jobs handed to ``runpod.serverless``'s own loop
(``rp_scale.JobScaler``: its job-taking loop, a task per job, ``rp_job.run_job``) by its local-test seams:
``jobs_fetcher`` hands out this benchmark's jobs instead of RunPod's job-take, ``jobs_handler`` records
each result instead of posting it. runpod's loop sleeps 1 s before it asks again when all its slots are
full, so a freed slot is refilled up to 1 s later in every mode, as on RunPod.

Measured per mode: the wall time (first job taken to last result), the time inside the engine's GPU lock
(the engine's lock wrapped to record each hold), its busy fraction of the wall time and of the time from
the first lock entry (when the first input has arrived) to the last exit, and each image's SHA-256 as
stored in S3, which must be the same in every mode. On the CPU the "GPU" stage is the tiny model
denoising on the same two cores that decode and encode images, so the stages compete there as they would
not on a GPU.

    python -m bench.overlap                       # 10 jobs per mode, 128², 40 steps, 1 s per input
    python -m bench.overlap --steps 12 --name overlap-short   # a GPU stage shorter than fetch + upload
    python -m bench.overlap --smoke --out /tmp/o  # every part, small: what the suite runs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.machine import report_header, run_child, write_results

RESULTS = Path(__file__).resolve().parent / "results"
MODES = (1, 2, 4)
BUCKET = "overlap"
CREDENTIALS = {"BUCKET_ACCESS_KEY_ID": "bench", "BUCKET_SECRET_ACCESS_KEY": "bench"}


class TimedLock:
    """A real ``threading.Lock`` that records when each hold began and ended (``time.perf_counter``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holds: list[tuple[float, float]] = []
        self._since = 0.0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._since = time.perf_counter()
        return got

    def release(self) -> None:
        self.holds.append((self._since, time.perf_counter()))
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


# --- the worker, in a child process --------------------------------------------------------------------------


def _child(mode: int, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run ``jobs`` through runpod's JobScaler with CONCURRENCY=``mode`` and return the measurements."""
    from runpod.serverless.modules import rp_job, rp_scale

    import handler

    engine = handler.get_engine()
    handler.get_storage()
    # One job first, untimed, as a warm worker has run: the pipeline's lazy first-call work is not the loop's.
    warm_up = {**jobs[0], "id": "warm-up", "input": {**jobs[0]["input"], "output_type": "base64"}}
    for field in ("image", "strength"):
        warm_up["input"].pop(field)
    asyncio.run(handler.handler(warm_up))
    lock = TimedLock()
    engine._lock = lock  # type: ignore[assignment]
    waiting = list(jobs)
    ended: dict[str, dict[str, Any]] = {}
    scaler: rp_scale.JobScaler

    async def take(_session: Any, wanted: int) -> list[dict[str, Any]] | None:
        if not waiting:
            await asyncio.sleep(0.05)  # RunPod holds an empty job-take open; so does this
            return None
        return [waiting.pop(0) for _ in range(min(wanted, len(waiting)))]

    async def record(_session: Any, config: dict[str, Any], job: dict[str, Any]) -> None:
        result = await rp_job.run_job(config["handler"], job)
        ended[job["id"]] = {"at": time.perf_counter(), "result": result}
        if len(ended) == len(jobs):
            scaler.kill_worker()

    async def no_stop_signals(_session: Any) -> list[str]:
        await asyncio.sleep(0.2)
        return []

    scaler = rp_scale.JobScaler(
        {
            "handler": handler.handler,
            "concurrency_modifier": lambda _current: mode,
            "jobs_fetcher": take,
            "jobs_handler": record,
            "stop_signals_fetcher": no_stop_signals,
        }
    )
    started = time.perf_counter()
    asyncio.run(scaler.run())
    return _measurements(started, lock.holds, ended)


def _measurements(started: float, holds: list[tuple[float, float]], ended: dict[str, dict[str, Any]]) -> dict[str, Any]:
    last = max(entry["at"] for entry in ended.values())
    busy = sum(end - begin for begin, end in holds)
    first_in, last_out = min(begin for begin, _ in holds), max(end for _, end in holds)
    errors = {job_id: entry["result"]["error"] for job_id, entry in ended.items() if "error" in entry["result"]}
    return {
        "wall_s": round(last - started, 3),
        "lock_busy_s": round(busy, 3),
        "lock_holds_s": [round(end - begin, 3) for begin, end in holds],
        "busy_of_wall": round(busy / (last - started), 3),
        "busy_once_input_arrived": round(busy / (last_out - first_in), 3),
        "first_lock_entry_s": round(first_in - started, 3),
        "errors": errors,
        "images": {
            job_id: [_stored(image) for image in entry["result"]["output"]["images"]]
            for job_id, entry in ended.items()
            if "output" in entry["result"]
        },
    }


def _stored(image: dict[str, Any]) -> dict[str, str]:
    """Where an answered image is: its S3 key, or the SHA-256 of its inline bytes."""
    if "key" in image:
        return {"key": image["key"]}
    return {"sha256": hashlib.sha256(base64.b64decode(image["image"])).hexdigest()}


# --- the servers and the driver, in the parent ---------------------------------------------------------------


class ImageServer:
    """Serves one PNG on 127.0.0.1 at any path; ``before_answer(path)`` runs before each answer (a delay, a
    wait for the test's signal), and ``events`` lists each request and answer in order (``"request /a.png"``)."""

    def __init__(self, body: bytes, before_answer: Callable[[str], object]) -> None:
        self.events: list[str] = []
        events = self.events

        class Serve(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                events.append(f"request {self.path}")
                before_answer(self.path)
                events.append(f"answer {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def input_png(side: int) -> bytes:
    """A PNG of random pixels, ``side`` pixels square."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _start_s3() -> tuple[subprocess.Popen[bytes], str, Any]:
    import boto3

    from tests.conftest import free_port

    port = free_port()
    server = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["BUCKET_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["BUCKET_SECRET_ACCESS_KEY"],
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return server, endpoint, client
        except Exception:  # not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.2)


def _jobs(mode: int, args: argparse.Namespace, url: str, output_type: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"c{mode}-job{index}",
            "input": {
                "prompt": "a red fox in the snow",
                "image": url,
                "strength": 1.0,  # every step runs, as in text-to-image
                "width": args.side,
                "height": args.side,
                "num_inference_steps": args.steps,
                "seed": 100 + index,
                "output_type": output_type,
            },
        }
        for index in range(args.jobs)
    ]


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    started = time.perf_counter()
    output = "inline (base64)" if args.no_s3 else "S3"
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.overlap", *sys.argv[1:]]),
        **report_header(),
        "jobs": args.jobs,
        "job": {"side": args.side, "steps": args.steps, "fetch_s": args.fetch_s, "task": f"img2img, output {output}"},
        "modes": {},
    }
    images = ImageServer(input_png(args.side), lambda _path: time.sleep(args.fetch_s))
    s3 = None if args.no_s3 else _start_s3()
    try:
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith(("RUNPOD_", "BUCKET_"))},
            "MODEL_ID": str(model),
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "IMAGE_URLS_ALLOW_PRIVATE": "true",
        }
        if s3 is not None:
            env.update(CREDENTIALS, BUCKET_ENDPOINT_URL=s3[1], BUCKET_NAME=BUCKET)
        digests: dict[int, list[list[str]]] = {}
        for mode in MODES:
            jobs = _jobs(mode, args, f"{images.url}/input.png", "base64" if s3 is None else "s3")
            result = run_child("bench.overlap", "--child", json.dumps(jobs), env={**env, "CONCURRENCY": str(mode)})
            if result["errors"]:
                raise RuntimeError(f"CONCURRENCY={mode}: jobs failed: {result['errors']}")
            client = None if s3 is None else s3[2]
            digests[mode] = [[_digest(client, stored) for stored in result["images"][job["id"]]] for job in jobs]
            report["modes"][str(mode)] = {key: value for key, value in result.items() if key != "images"}
    finally:
        images.close()
        if s3 is not None:
            s3[0].terminate()
            s3[0].wait(timeout=30)
    sequential = report["modes"]["1"]["wall_s"]
    for entry in report["modes"].values():
        entry["wall_vs_sequential"] = round(entry["wall_s"] / sequential, 3)
    report["same_images_in_every_mode"] = all(digests[mode] == digests[1] for mode in MODES)
    report["goals"] = {
        "lock_busy_at_concurrency_2": ">= 0.90 once the first input has arrived",
        "wall_at_concurrency_2": "<= 0.60 x sequential",
        "met": report["modes"]["2"]["busy_once_input_arrived"] >= 0.9
        and report["modes"]["2"]["wall_vs_sequential"] <= 0.6,
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _digest(client: Any, stored: dict[str, str]) -> str:
    """The SHA-256 of an answered image: read back from S3, or as the worker answered it inline."""
    if "key" in stored:
        return hashlib.sha256(client.get_object(Bucket=BUCKET, Key=stored["key"])["Body"].read()).hexdigest()
    return stored["sha256"]


def markdown(report: dict[str, Any]) -> str:
    job = report["job"]
    lines = [
        f"{report['jobs']} img2img jobs per mode, {job['side']}², {job['steps']} steps, each input image "
        f"{job['fetch_s']} s away on a loopback server, output {job['task'].split('output ')[1]}"
        f"{' (moto_server on loopback)' if job['task'].endswith('S3') else ''}, through runpod's own job loop.",
        "",
        "| CONCURRENCY | wall | vs sequential | GPU lock busy (of wall) | GPU lock busy once the first input "
        "arrived | lock hold per job (median) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, entry in report["modes"].items():
        holds = sorted(entry["lock_holds_s"])
        lines.append(
            f"| {mode} | {entry['wall_s']:.1f} s | {entry['wall_vs_sequential']:.2f}x | "
            f"{entry['busy_of_wall']:.0%} | {entry['busy_once_input_arrived']:.0%} | {holds[len(holds) // 2]:.2f} s |"
        )
    same = "the same" if report["same_images_in_every_mode"] else "NOT the same"
    where = "S3 object" if job["task"].endswith("S3") else "image answered inline"
    lines += [
        "",
        f"Images: {same} bytes in every mode (SHA-256 of each {where}). Goals at CONCURRENCY=2 "
        f"(lock busy >= 90% once the first input arrived, wall <= 0.6x sequential): "
        f"{'met' if report['goals']['met'] else 'not met'}.",
        "",
        f"Command: `{report['command']}`; {report['date']}; {report['machine']}, {report['cpu']}; "
        f"load average before {report['load_average_before']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10, help="jobs per mode (default 10)")
    parser.add_argument("--side", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=40, help="denoising steps per job (default 40)")
    parser.add_argument("--fetch-s", type=float, default=1.0, help="seconds the image server takes (default 1)")
    parser.add_argument("--model", type=Path, help="a diffusers folder (default: the tiny model, written here)")
    parser.add_argument("--no-s3", action="store_true", help="answer inline instead of uploading (no moto_server)")
    parser.add_argument("--smoke", action="store_true", help="3 jobs, 64², 2 steps, 0.2 s inputs: every part")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    parser.add_argument("--name", default="overlap", help="the results files' name: NAME.json, NAME.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(int(os.environ["CONCURRENCY"]), json.loads(args.child))))
        return
    if args.smoke:
        args.jobs, args.side, args.steps, args.fetch_s = 3, 64, 2, 0.2
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from builder.tiny_model import write_tiny_model

            model = write_tiny_model(Path(folder) / "tiny-sd15")
        report = run(args, model)
    write_results(args.out, args.name, report, markdown(report))


if __name__ == "__main__":
    main()
