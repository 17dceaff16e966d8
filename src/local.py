"""Local runs: one job through runpod's own job wrapper, images to files, a short summary.

runpod's local mode logs the whole result, base64 and all. This runs the job
through the same ``run_job`` wrapper that RunPod uses, then writes each image
into an output folder and prints a summary of a few lines instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from src.outputs import FORMATS

DEFAULT_TEST_INPUT = Path("test_input.json")


def is_local_run(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> bool:
    """True when runpod would run one local test job (its ``worker._is_local`` rule),
    rather than serve its HTTP API or take jobs from RunPod."""
    environ = os.environ if environ is None else environ
    if "--rp_serve_api" in argv or environ.get("RUNPOD_REALTIME_PORT"):
        return False
    asks_test_input = any(arg == "--test_input" or arg.startswith("--test_input=") for arg in argv)
    return asks_test_input or not environ.get("RUNPOD_WEBHOOK_GET_JOB")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python handler.py", description="Run one job locally.")
    parser.add_argument(
        "--test_input", help=f"the job as JSON, such as '{{\"input\": {{...}}}}'; default: {DEFAULT_TEST_INPUT}"
    )
    parser.add_argument("--output_dir", type=Path, default=Path("output"), help="where images are written")
    parser.add_argument("--rp_log_level", help="runpod's log level (default: WARN in local runs)")
    return parser.parse_args(argv)


def _load_job(test_input: str | None) -> dict[str, Any]:
    """The job to run, from --test_input or test_input.json. Raises ValueError when unusable."""
    if test_input is None:
        if not DEFAULT_TEST_INPUT.is_file():
            raise ValueError(f"no --test_input given and no {DEFAULT_TEST_INPUT} in {Path.cwd()}")
        source, text = str(DEFAULT_TEST_INPUT), DEFAULT_TEST_INPUT.read_text(encoding="utf-8")
    else:
        source, text = "--test_input", test_input
    try:
        job = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(job, dict):
        raise ValueError(f'{source} must be a JSON object such as {{"input": {{"prompt": "a fox"}}}}')
    return job


def write_images(output: Mapping[str, Any], folder: Path) -> list[str]:
    """Write each inline image of a job's output to ``folder``; return one summary line per image."""
    lines = []
    metadata = output.get("metadata", {})
    size = f"{metadata.get('width')}x{metadata.get('height')}"
    extension = FORMATS[metadata.get("output_format", "png")].extension
    for index, item in enumerate(output.get("images", [])):
        if "image" in item:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index}-{item['seed']}.{extension}"
            path.write_bytes(base64.b64decode(item["image"]))
            where = str(path)
        else:
            where = str(item.get("url", "?"))
        flagged = "  flagged nsfw" if item.get("nsfw") else ""
        lines.append(f"  {where}  {size}  seed {item['seed']}{flagged}")
    return lines


def summarize(job_id: str, output: Mapping[str, Any], image_lines: list[str]) -> str:
    """A few lines a person reads: where the images are, their seeds, how long it took."""
    metadata = output.get("metadata", {})
    timings = metadata.get("timings_ms", {})
    lines = [
        f"job {job_id}: COMPLETED, {len(image_lines)} image(s) in {timings.get('total', 0):.0f} ms "
        f"(inference {timings.get('inference', 0):.0f} ms, encode {timings.get('encode', 0):.0f} ms)",
        *image_lines,
        f"  model {metadata.get('model')} on {metadata.get('device')} ({metadata.get('dtype')}, "
        f"{metadata.get('memory_profile')} profile), "
        f"{metadata.get('scheduler')}, {metadata.get('num_inference_steps')} steps, "
        f"guidance {metadata.get('guidance_scale')}",
    ]
    lines += [f"  warning: {warning}" for warning in metadata.get("warnings", [])]
    return "\n".join(lines)


def run_local(handler: Callable[[Any], Any], argv: Sequence[str]) -> int:
    """Run one job locally. Returns the exit status: 0 done, 1 the job failed, 2 bad invocation."""
    from runpod.serverless.modules.rp_job import run_job
    from runpod.serverless.modules.rp_logger import RunPodLogger

    args = _parse_args(argv)
    RunPodLogger().set_level(args.rp_log_level or "WARN")
    try:
        job = _load_job(args.test_input)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    job_id = str(job.setdefault("id", time.strftime("local-%Y%m%d-%H%M%S")))

    result = asyncio.run(run_job(handler, job))
    if "error" in result:
        print(f"job {job_id}: FAILED: {result['error']}", file=sys.stderr)
        return 1
    output = result.get("output", {})
    print(summarize(job_id, output, write_images(output, args.output_dir / job_id)))
    return 0
