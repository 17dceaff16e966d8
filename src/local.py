"""Local runs: one job through runpod's own job wrapper, images to files, a short summary.

runpod's local mode logs the whole result, base64 and all. This runs the job
through the same ``run_job`` wrapper that RunPod uses, then writes each image
into an output folder and prints a summary of a few lines instead. The command
line is read here too, before anything heavy is imported, so that ``--help`` or
a bad flag answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.finish.outputs import FORMATS
from src.schema import a1111_endpoint, names_a1111

DEFAULT_TEST_INPUT = Path("test_input.json")
# A job id becomes one folder name: anything else turns into "-", so "../x" or "/abs" cannot lead out.
_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class LocalRun:
    """One job to run here, and the folder its images go to."""

    job: dict[str, Any]
    folder: Path
    rp_log_level: str | None


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line: the local-run flags, and runpod's own, which ``runpod.serverless.start``
    reads again from ``sys.argv`` (same names, types and defaults as runpod 1.12's parser)."""
    parser = argparse.ArgumentParser(
        prog="python handler.py",
        description="Stable Diffusion 1.5 worker for RunPod. Off RunPod and without --rp_serve_api, it runs one "
        "job, writes its images to files and exits.",
        epilog="Exit status of a local run: 0 the job completed, 1 it failed or the model did not load, "
        "2 the command line or a setting is wrong.",
        allow_abbrev=False,  # runpod sees the same argv: a shortened flag would mean one thing here, another there
    )
    local = parser.add_argument_group("local run (one job, then exit)")
    local.add_argument(
        "--test_input", help=f"the job as JSON, such as '{{\"input\": {{...}}}}'; default: {DEFAULT_TEST_INPUT}"
    )
    local.add_argument(
        "--output_dir", type=Path, default=Path("output"), help="where images are written (default: output)"
    )
    local.add_argument(
        "--image",
        type=Path,
        metavar="FILE",
        help="an image file, sent as the job's `image` (img2img, inpaint, outpaint); replaces one in the JSON",
    )
    local.add_argument("--mask", type=Path, metavar="FILE", help="an image file, sent as the job's `mask`")
    runpod = parser.add_argument_group("runpod (passed through to runpod.serverless.start)")
    runpod.add_argument("--rp_serve_api", action="store_true", help="serve runpod's local HTTP API instead")
    runpod.add_argument("--rp_api_host", default="localhost", help="the API's host (default: localhost)")
    runpod.add_argument("--rp_api_port", type=int, default=8000, help="the API's port (default: 8000)")
    runpod.add_argument(
        "--rp_api_concurrency",
        type=int,
        default=1,
        help="the API's uvicorn workers: 1 only (runpod hands uvicorn an app, which one process serves); "
        "CONCURRENCY sets the jobs run at once",
    )
    runpod.add_argument(
        "--rp_log_level", help="runpod's log level: ERROR, WARN, INFO or DEBUG (default: WARN in local runs, else INFO)"
    )
    runpod.add_argument(
        "--rp_debugger",
        action="store_true",
        help="refused: runpod 1.12's debugger output loses every failed job's result (the job hangs until "
        "RunPod's timeout); metadata.timings_ms and phases_ms say where a job's time went",
    )
    return parser


def is_local_run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> bool:
    """True when runpod would run one local test job (its ``worker._is_local`` rule),
    rather than serve its HTTP API or take jobs from RunPod."""
    environ = os.environ if environ is None else environ
    if args.rp_serve_api or environ.get("RUNPOD_REALTIME_PORT"):
        return False
    return args.test_input is not None or not environ.get("RUNPOD_WEBHOOK_GET_JOB")


def read_command_line(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> LocalRun | None:
    """Parse and check the command line; cheap, so it runs before torch is imported or the model loads.

    Returns the job to run once here, or None when runpod takes the jobs (its HTTP API, or RunPod).
    Exits as argparse does: 0 after ``--help``; 2 with the usage for an unknown flag, a bad value,
    an unusable job or no job at all.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rp_api_concurrency != 1:
        parser.error(
            f"--rp_api_concurrency {args.rp_api_concurrency}: must be 1 (uvicorn cannot run several workers of the "
            "app runpod gives it); set CONCURRENCY for the jobs run at once"
        )
    if args.rp_debugger:
        parser.error(
            "--rp_debugger: runpod 1.12 loses the result of every failed job with it (a KeyError in its "
            "handle_job); metadata.timings_ms and phases_ms say where a job's time went"
        )
    if not is_local_run(args, environ):
        if args.image or args.mask:
            parser.error("--image and --mask are for a local run; over the HTTP API, send the image in the JSON")
        return None
    try:
        job = _load_job(args.test_input)
        _attach_files(job, {"image": args.image, "mask": args.mask})
        local_id = time.strftime("local-%Y%m%d-%H%M%S")
        if not job.get("id"):
            job["id"] = local_id
        folder = job_folder(args.output_dir, str(job["id"]), fallback=local_id)
    except ValueError as error:
        parser.error(str(error))
    return LocalRun(job=job, folder=folder, rp_log_level=args.rp_log_level)


def job_folder(output_dir: Path, job_id: str, fallback: str) -> Path:
    """The folder for one job's images: ``output_dir`` / the job id made into one safe name.

    Characters outside ``A-Z a-z 0-9 . _ -`` become ``-`` and leading dots go: ``../x`` gives
    ``-x`` and ``/abs`` gives ``-abs``; an id with nothing left gives ``fallback``.

    Raises:
        ValueError: the folder still resolves outside ``output_dir`` (a link inside it leads out).
    """
    folder = output_dir / (_UNSAFE_IN_NAMES.sub("-", job_id).lstrip(".") or fallback)
    if not folder.resolve().is_relative_to(output_dir.resolve()):
        raise ValueError(f"job id {job_id!r}: its folder {folder} resolves outside {output_dir}")
    return folder


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


def _attach_files(job: dict[str, Any], files: Mapping[str, Path | None]) -> None:
    """Put each given file into the job's input as base64. Raises ValueError when one cannot be read."""
    for field, path in files.items():
        if path is None:
            continue
        if not isinstance(job.get("input"), dict):
            raise ValueError(f'--{field} needs a job whose input is an object, such as {{"input": {{...}}}}')
        try:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError as error:
            raise ValueError(f"--{field} {path}: cannot be read: {error.strerror or error}") from None
        target, name, value = _a1111_place(job["input"], field, data)
        target[name] = value


def _a1111_place(job_input: dict[str, Any], field: str, data: str) -> tuple[dict[str, Any], str, Any]:
    """Where a file given as ``--image`` or ``--mask`` goes: the input's own field, or, in an A1111 request, its
    payload's (an img2img's ``init_images``, a list of one)."""
    if not names_a1111(job_input):
        return job_input, field, data
    payload = job_input.get("payload") if "api" in job_input else job_input
    if not isinstance(payload, dict):
        return job_input, field, data  # refused by the schema, with its own message
    if field == "image" and a1111_endpoint(job_input) != "extra-single-image":
        return payload, "init_images", [data]
    return payload, field, data


def write_images(output: Mapping[str, Any], folder: Path) -> list[str]:
    """Write each inline image of a job's output to ``folder``; return one summary line per image."""
    lines = []
    metadata = output.get("metadata", {})
    scale = (metadata.get("hires") or {}).get("scale", 1)
    size = f"{int(metadata.get('width', 0) * scale)}x{int(metadata.get('height', 0) * scale)}"
    extension = FORMATS[metadata.get("output_format", "png")].extension
    # A batch of variations shares one seed: each image is told apart by its variation seed.
    subseeds = metadata.get("subseeds", []) if metadata.get("subseed_strength", 0) > 0 else []
    for index, item in enumerate(_listed_images(output)):
        if "image" in item:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index}-{item.get('seed', 'upscaled')}.{extension}"
            path.write_bytes(base64.b64decode(item["image"]))
            where = str(path)
        else:
            where = str(item.get("url", "?"))
        flagged = "  flagged nsfw" if item.get("nsfw") else ""
        made = f"seed {item['seed']}" if "seed" in item else "upscaled"
        if index < len(subseeds):
            made += f", variation seed {subseeds[index]}"
        lines.append(f"  {where}  {size}  {made}{flagged}")
    return lines


def _listed_images(output: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The output's images as this worker lists them, from A1111's shape too (base64 or URL strings, with the
    seeds in ``metadata``; an ``extra-single-image`` answer's one ``image``)."""
    listed = output.get("images", []) if "html_info" not in output else [output["image"]] if output.get("image") else []
    seeds = output.get("metadata", {}).get("seeds", [])
    images = []
    for index, item in enumerate(listed):
        if not isinstance(item, str):
            images.append(item)
            continue
        where = "url" if item.startswith(("https://", "http://")) else "image"
        images.append({where: item, **({"seed": seeds[index]} if index < len(seeds) else {})})
    return images


def summarize(job_id: str, output: Mapping[str, Any], image_lines: list[str]) -> str:
    """A few lines a person reads: where the images are, their seeds, how long it took."""
    metadata = output.get("metadata", {})
    timings = metadata.get("timings_ms", {})
    lines = [
        f"job {job_id}: COMPLETED, {len(image_lines)} image(s) in {timings.get('total', 0):.0f} ms "
        f"(inference {timings.get('inference', 0):.0f} ms, encode {timings.get('encode', 0):.0f} ms)",
        *image_lines,
        _upscaled_line(metadata)
        if metadata.get("task") == "upscale"
        else f"  model {metadata.get('model')} on {metadata.get('device')} ({metadata.get('dtype')}, "
        f"{metadata.get('memory_profile')} profile), "
        f"{metadata.get('task', 'txt2img')}, {metadata.get('scheduler')}, {metadata.get('num_inference_steps')} steps, "
        f"guidance {metadata.get('guidance_scale')}",
    ]
    lines += [f"  warning: {warning}" for warning in metadata.get("warnings", [])]
    return "\n".join(lines)


def _upscaled_line(metadata: Mapping[str, Any]) -> str:
    """An upscale job's line: the upscaler, the factor, the passes, the device."""
    dtype = f" ({metadata['dtype']})" if metadata.get("dtype") else ""
    return (
        f"  upscale from {metadata.get('source_width')}x{metadata.get('source_height')} by {metadata.get('scale'):g} "
        f"with {metadata.get('upscaler')} ({metadata.get('upscaler_passes')} model passes) on "
        f"{metadata.get('device')}{dtype}"
    )


def run_local(handler: Callable[[Any], Any], run: LocalRun) -> int:
    """Run one job locally. Returns the exit status: 0 done, 1 the job failed."""
    from runpod.serverless.modules.rp_job import run_job
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(run.rp_log_level or "WARN")
    job_id = str(run.job["id"])

    result = asyncio.run(run_job(handler, run.job))
    if "error" in result:
        print(f"job {job_id}: FAILED: {result['error']}", file=sys.stderr)
        return 1
    output = result.get("output", {})
    if not isinstance(output, dict) or not output.keys() & {"images", "image"}:  # describe, an A1111 listing: whole
        print(json.dumps(output, indent=2))
        return 0
    print(summarize(job_id, output, write_images(output, run.folder)))
    return 0
