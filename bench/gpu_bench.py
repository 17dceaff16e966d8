"""GPU speed, measured so that a figure holds: plain diffusers against the worker, interleaved, with an A/A control.

    python -m bench.gpu_bench                      # one NVIDIA GPU; planned within what the GPU kit has left
    python -m bench.gpu_bench --device cpu --model DIR --side 64 --steps 2 --repeat 3 --batches 1 --modes plain,worker

SD 1.5's full architecture with random fp16 weights (bench/sd15_random.py), or the model folder ``--model``;
512², 25 steps, DPM++ 2M Karras, CFG 7.5 (two UNet evaluations a step), batch 1 and batch 4. The modes:

- ``plain``: bare diffusers (``from_pretrained``, ``.to(device)``, SDPA, the same scheduler and seeds), its job
  split at diffusers' own seams: ``encode_prompt``, the pipeline's denoising loop (``output_type="latent"``), the
  VAE decode, ``postprocess``, then the PNG files written;
- ``worker``: the worker's prepare, run and finish stages as the handler runs them, PNG files and base64 included;
- ``fast``: the same with FAST_MODE on (on cards of compute capability 7.0 and above): the UNet compiled whole
  and replayed as CUDA graphs, the VAE decoder compiled (src/run/fast_path.py);
- ``deepcache``: the worker's default mode with ``deepcache_interval`` 3 (an opt-in that changes the images);
- ``lcm``: the worker's default mode as an LCM-LoRA job runs, the LCM scheduler at 6 steps and CFG 1.5 (its UNet
  steps/s counts its own 6 steps).

Each mode is loaded once (its cold start timed, after the CUDA context exists). The timed jobs interleave the
modes, round after round: plain, worker, plain again, fast, deepcache, lcm; the two plain series are the A/A
control, whose ratio of medians must fall within +-3% or the run says that it is too noisy to conclude.
``--warmup`` untimed rounds come first; the timed rounds stop at ``--repeat`` or when the batch size's share of
``--budget-s`` is spent (at least 2 rounds), and the report says how many ran.

Then one more batch-1 job of each mode under torch.profiler: its kernels' time against the timed median says
whether the GPU's kernels or the gaps between them take the time. The report is written then, and again after
the cold starts, each in a process of its own with torch's compile caches empty: plain diffusers, and FAST_MODE
with the COMPILE_CACHE_DIR that the timed FAST_MODE filled (``--no-cold-starts`` skips them); the timed FAST_MODE's
own load is its uncached cold start.

Per job: its whole time (the clock, from the request to the encoded files), and on the device (CUDA events; the
clock on the CPU) text encoding, the denoising loop (UNet steps/s = steps / its seconds), the VAE decode and the
pictures made; then the image encoding. Figures are medians with the interquartile range. nvidia-smi's clocks,
temperature, power and the processes on the GPU are logged before and after.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.machine import code_version, describe_code

PROMPT = "a red fox in a snowy forest"
# The interval of the ``deepcache`` mode: the worker with deepcache_interval 3 (src/run/feature_reuse.py).
DEEPCACHE = 3
# The ``lcm`` mode: the worker as an LCM-LoRA job runs it (docs/lora.md), the LCM scheduler at 6 steps and CFG 1.5.
# With random weights no LoRA is loaded; a LoRA merged into the weights costs nothing per step (src/adapters/loras.py).
LCM = {"scheduler": "LCM", "num_inference_steps": 6, "guidance_scale": 1.5}
# The A/A control: two series of the same mode whose medians differ by more than this make the run inconclusive.
NOISE_LIMIT = 0.03
_SMI_GPU = "name,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu,memory.used"
_SMI_APPS = "pid,process_name,used_memory"


@dataclass
class Series:
    """One mode's timed jobs at one batch size: each job's milliseconds, whole and by phase."""

    jobs: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add(self, job_ms: float, phases: dict[str, float]) -> None:
        self.jobs.append(job_ms)
        for name, value in phases.items():
            self.phases.setdefault(name, []).append(value)


def spread(values: list[float]) -> dict[str, float]:
    """Median and interquartile range (first and third quartiles) of ``values``."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


class Plain:
    """Bare diffusers, its job timed at diffusers' own seams."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        from src.models.checkpoints import WITHOUT_SAFETY_CHECKER

        self.device, self.args = device, args
        started = time.perf_counter()
        pipeline = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, **WITHOUT_SAFETY_CHECKER).to(device)
        _synchronize(device)
        self.cold_start_s = time.perf_counter() - started
        pipeline.set_progress_bar_config(disable=True)
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config, use_karras_sigmas=True)
        self.pipeline = pipeline

    @torch.inference_mode()  # as the pipeline's own call runs: the decode and postprocess are outside it here
    def job(self, batch: int) -> tuple[float, dict[str, float]]:
        from src.run.phases import Phases

        pipeline, args = self.pipeline, self.args
        started = time.perf_counter()
        timer = Phases(self.device)
        timer.start()
        embeds, negative = pipeline.encode_prompt(PROMPT, self.device, batch, True, "")
        timer.mark("text_encoding")
        latents = pipeline(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=args.steps,
            width=args.side,
            height=args.side,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in range(batch)],
            output_type="latent",
        ).images
        timer.mark("denoising")
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
        timer.mark("decoding")
        pictures = pipeline.image_processor.postprocess(decoded, output_type="pil")
        timer.mark("to_images")
        phases = timer.milliseconds()
        encode_started = time.perf_counter()
        for picture in pictures:
            picture.save(io.BytesIO(), format="PNG")
        phases["encode"] = (time.perf_counter() - encode_started) * 1000
        return (time.perf_counter() - started) * 1000, phases


class Worker:
    """The worker's three stages, as the handler runs them, FAST_MODE on or off."""

    def __init__(
        self,
        folder: Path,
        device: torch.device,
        args: argparse.Namespace,
        *,
        fast: bool,
        compile_cache: Any = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        from src.run.engine import Engine
        from src.settings import load_settings

        variables = {"MODEL_ID": str(folder), "FAST_MODE": str(fast).lower(), "MAX_STEPS": str(max(args.steps, 150))}
        if compile_cache is not None:
            variables["COMPILE_CACHE_DIR"] = str(compile_cache)
        if device.type == "cuda":
            variables["MEMORY_PROFILE"] = "high"
        self.settings = load_settings(variables)
        self.device, self.args, self.fields = device, args, fields or {}
        started = time.perf_counter()
        self.engine = Engine.load(self.settings)  # FAST_MODE compiles and warms up in here
        _synchronize(device)
        self.cold_start_s = time.perf_counter() - started

    def job(self, batch: int) -> tuple[float, dict[str, float]]:
        from src.finish import finish
        from src.prepare import JobPlan, prepare

        args = self.args
        request = {
            "prompt": PROMPT,
            "num_images": batch,
            "seed": 0,
            "num_inference_steps": args.steps,
            "width": args.side,
            "height": args.side,
            "scheduler": "DPM++ 2M Karras",
            "output_type": "base64",
            **self.fields,
        }
        started = time.perf_counter()
        plan = prepare({"input": request}, self.settings, catalog=lambda: self.engine.catalog, storage=None)
        assert isinstance(plan, JobPlan)
        generation = self.engine.run(plan, timeout_s=600)
        answer = finish(plan, generation, settings=self.settings, storage=None, job_id="bench", started=started)
        job_ms = (time.perf_counter() - started) * 1000
        return job_ms, {**generation.phases_ms, "encode": answer["metadata"]["timings_ms"]["encode"]}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def nvidia_smi() -> dict[str, str]:
    """The GPU's clocks, temperature, power, use and memory, and the processes on it, as nvidia-smi says."""
    found = {}
    for name, query in (("gpu", f"--query-gpu={_SMI_GPU}"), ("processes", f"--query-compute-apps={_SMI_APPS}")):
        try:
            done = subprocess.run(
                ["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, timeout=20, check=False
            )
            found[name] = (done.stdout or done.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            found[name] = f"not available: {error}"
    return found


def load_modes(
    folder: Path, device: torch.device, dtype: torch.dtype, args: argparse.Namespace, kept: Path
) -> dict[str, Any]:
    """Each mode asked for, loaded once; the CUDA context made first, so that no cold start pays for it. FAST_MODE
    keeps what it compiled in ``kept`` (COMPILE_CACHE_DIR), for the cached cold start after."""
    if device.type == "cuda":
        torch.ones(1, device=device).sum().item()
    modes: dict[str, Any] = {}
    for name in args.modes:
        if name == "plain":
            modes["plain"] = Plain(folder, device, dtype, args)
        elif name == "worker":
            modes["worker"] = Worker(folder, device, args, fast=False)
        elif name == "fast" and (device.type != "cuda" or torch.cuda.get_device_capability() >= (7, 0)):
            modes["fast"] = Worker(folder, device, args, fast=True, compile_cache=kept)
        elif name == "deepcache":
            modes["deepcache"] = Worker(folder, device, args, fast=False, fields={"deepcache_interval": DEEPCACHE})
        elif name == "lcm":
            modes["lcm"] = Worker(folder, device, args, fast=False, fields=LCM)
    return modes


def rounds(
    modes: dict[str, Any],
    args: argparse.Namespace,
    clock: Callable[[], float],
    budget_s: float,
    after_round: Callable[[dict[str, Any]], None] = lambda _measured: None,
) -> dict[str, Any]:
    """The timed rounds, interleaved, per batch size: plain, worker, plain again (the A/A control), fast,
    deepcache, lcm. ``after_round`` gets what is measured so far, after each round: a run the kit's limit cuts
    short keeps every round it finished."""
    order = [("plain", "plain"), ("worker", "worker"), ("plain (again)", "plain"), ("fast", "fast")]
    order += [("deepcache", "deepcache"), ("lcm", "lcm")]
    order = [(label, mode) for label, mode in order if mode in modes and ("plain" in modes or label != "plain (again)")]
    measured: dict[str, Any] = {}
    for batch in args.batches:
        series = {label: Series() for label, _ in order}
        for _ in range(args.warmup):
            for _label, mode in order:
                modes[mode].job(batch)
        deadline = clock() + budget_s / len(args.batches)  # each batch size its share of the budget
        done = 0
        while done < args.repeat and (done < 2 or clock() < deadline):
            for label, mode in order:
                series[label].add(*modes[mode].job(batch))
            done += 1
            measured[f"batch {batch}"] = {"rounds": done, "series": series}
            after_round(measured)
    return measured


def summary(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Medians and quartiles of each series; steps/s of its denoising loop; ratios to plain; the A/A verdict."""
    report: dict[str, Any] = {}
    for batch, found in measured.items():
        rows = {}
        for label, series in found["series"].items():
            row = {"job_ms": spread(series.jobs), **{name: spread(v) for name, v in series.phases.items()}}
            if "denoising" in series.phases:
                steps = LCM["num_inference_steps"] if label == "lcm" else args.steps
                row["unet_steps_per_s"] = spread([steps * 1000 / value for value in series.phases["denoising"]])
            rows[label] = row
        entry: dict[str, Any] = {"rounds": found["rounds"], "modes": rows}
        if "plain (again)" in rows:
            ratio = rows["plain"]["job_ms"]["median"] / rows["plain (again)"]["job_ms"]["median"]
            entry["aa_ratio"] = ratio
            entry["conclusive"] = abs(ratio - 1) <= NOISE_LIMIT
        report[batch] = entry
    return report


def table(report: dict[str, Any], cold: dict[str, float]) -> list[str]:
    """The report as a Markdown table, one row per mode and batch size."""
    lines = [
        "| batch | mode | job ms (IQR) | vs plain | text ms | denoising ms | UNet steps/s (IQR) | vs plain | "
        "decode ms | to images ms | encode ms | cold start s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch, entry in report.items():
        modes = entry["modes"]
        base = modes.get("plain")
        for label, row in modes.items():
            lines.append(_row(batch.removeprefix("batch "), label, row, base, cold.get(label.split(" ")[0])))
    return lines


def _row(batch: str, label: str, row: dict[str, Any], base: dict[str, Any] | None, cold: float | None) -> str:
    def ms(name: str) -> str:
        return f"{row[name]['median']:.1f}" if name in row else ""

    job, steps = row["job_ms"], row.get("unet_steps_per_s")
    job_ratio = f"{base['job_ms']['median'] / job['median']:.2f}x" if base else ""
    steps_ratio = f"{steps['median'] / base['unet_steps_per_s']['median']:.2f}x" if base and steps else ""
    steps_cell = f"{steps['median']:.1f} ({steps['q1']:.1f}-{steps['q3']:.1f})" if steps else ""
    return (
        f"| {batch} | {label} | {job['median']:.1f} ({job['q1']:.1f}-{job['q3']:.1f}) | {job_ratio} | "
        f"{ms('text_encoding')} | {ms('denoising')} | {steps_cell} | {steps_ratio} | {ms('decoding')} | "
        f"{ms('to_images')} | {ms('encode')} | {'' if cold is None else f'{cold:.1f}'} |"
    )


def verdicts(report: dict[str, Any]) -> list[str]:
    lines = []
    for batch, entry in report.items():
        if "aa_ratio" not in entry:
            continue
        verdict = "conclusive" if entry["conclusive"] else "TOO NOISY TO CONCLUDE: rerun on a quieter machine"
        lines.append(
            f"- {batch}: A/A control (plain against itself) {entry['aa_ratio']:.3f}, limit +-{NOISE_LIMIT:.0%}: "
            f"{verdict}; {entry['rounds']} timed rounds"
        )
    return lines


def cold_start(args: argparse.Namespace) -> None:
    """``--cold-start MODE``: this process loads one mode and prints its cold start (a line of JSON)."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    folder = Path(args.model)
    if args.cold_start == "plain":
        mode: Any = Plain(folder, device, dtype, args)
    else:
        mode = Worker(folder, device, args, fast=args.cold_start == "fast", compile_cache=args.compile_cache)
    print(json.dumps({"load_s": mode.cold_start_s, "process_s": time.perf_counter() - started}))


def cold_starts(folder: Path, args: argparse.Namespace, workdir: Path, left_s: Callable[[], float]) -> dict[str, Any]:
    """Cold starts in processes of their own, torch's compile caches empty: plain diffusers, and FAST_MODE with the
    COMPILE_CACHE_DIR the timed FAST_MODE filled (whose own load, in this process, is the uncached cold start);
    each within what ``left_s`` says is left of the run's time."""
    found: dict[str, dict[str, Any]] = {}
    for label, mode in (("plain", "plain"), ("fast, cached", "fast")):
        if mode not in args.modes:
            continue
        if left_s() < 20:
            found[label] = {"error": f"skipped: the run's {args.deadline_s:.0f} s were spent"}
            continue
        scratch = Path(tempfile.mkdtemp(dir=workdir))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TRITON_CACHE_DIR": str(scratch)}
        command = [sys.executable, "-m", "bench.gpu_bench", "--cold-start", mode, "--model", str(folder)]
        command += ["--device", args.device, "--steps", str(args.steps), "--side", str(args.side)]
        if mode == "fast":
            command += ["--compile-cache", str(workdir / "compile-cache")]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=left_s(), check=False)
        except subprocess.TimeoutExpired:
            found[label] = {"error": f"stopped: the run's {args.deadline_s:.0f} s were spent"}
            continue
        found[label] = _child_result(done)
    return found


def _child_result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """A cold-start process's JSON line, or what went wrong: its last line of errors, or its output unread."""
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    lines = done.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        return {"error": f"no result line in its output ({len(lines)} lines)"}


# The GPU kit's device call (../shared/gpu/run.sh under the device tool's 560 s), less a margin for the step's
# own ending and the files' return.
KIT_S = 545


def kit_left_s(proc: Path = Path("/proc")) -> float | None:
    """Seconds left of the GPU kit's run (``bash .gpu/run.sh``, an ancestor of this process) within ``KIT_S``,
    from that process's start time; None when this process is not run by the kit (or there is no /proc)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        uptime = float((proc / "uptime").read_text().split()[0])
        pid = os.getppid()
        while pid > 1:
            command = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / str(pid) / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after the command's name, which may hold spaces
            if ".gpu/run.sh" in command:
                return KIT_S - (uptime - int(fields[19]) / ticks)
            pid = int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def kernel_time(modes: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Each mode's batch-1 job once more under torch.profiler: the milliseconds its GPU kernels ran (on the CPU,
    its operators). Set against the unprofiled job's median, it says whether the kernels or the gaps between
    them (launches, Python, synchronisation) take the time."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    found = {}
    for name, mode in modes.items():
        with profile(activities=[activity]) as profiler:
            mode.job(1)
        events = profiler.key_averages()
        if device.type == "cuda":
            found[name] = sum(event.self_device_time_total for event in events) / 1000
        else:
            found[name] = sum(event.self_cpu_time_total for event in events) / 1000
    return found


def model_folder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: Path) -> Path:
    """``--model``, or SD 1.5's architecture with random weights saved in ``workdir``."""
    if args.model is not None:
        return Path(args.model)
    from bench.sd15_random import build_sd15_random, check_parameter_counts

    folder = workdir / "sd15-random"
    model = build_sd15_random(str(device), dtype)
    check_parameter_counts(model)
    model.save_pretrained(folder)
    del model
    return folder


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", help="a diffusers folder; default: SD 1.5's architecture with random weights")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--modes", type=lambda text: text.split(","), default=["plain", "worker", "fast", "deepcache", "lcm"]
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch size first")
    parser.add_argument(
        "--budget-s", type=float, default=100, help="timed rounds stop after this many seconds (shared by the batches)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=240,
        help="the whole run's time, or less where the GPU kit (an ancestor .gpu/run.sh) has less left of its 545 s: "
        "the timed rounds shrink to fit, and cold starts that would not fit are skipped",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--no-cold-starts", action="store_true", help="skip the cold starts in processes of their own")
    parser.add_argument("--cold-start", choices=("plain", "worker", "fast"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-cache", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if args.cold_start is not None:
        cold_start(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu, or on one NVIDIA GPU")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    command = " ".join(["python -m bench.gpu_bench", *(sys.argv[1:] if argv is None else argv)])
    run: dict[str, Any] = {"device": name, "command": command, "dtype": dtype, "started": time.time()}
    run["code"] = code_version()
    # Within the GPU kit, the run ends before the kit's call does, whatever the earlier steps took.
    kit_left = kit_left_s()
    if kit_left is not None and kit_left < args.deadline_s:
        print(f"the GPU kit has {kit_left:.0f} s left: the run is planned in that", flush=True)
        args.deadline_s = max(kit_left, 30.0)
    run["deadline_s"] = args.deadline_s
    deadline = time.monotonic() + args.deadline_s

    def left_s() -> float:
        return deadline - time.monotonic()

    run["smi_before"] = nvidia_smi() if device.type == "cuda" else {}
    with tempfile.TemporaryDirectory() as workdir:
        # torch's compile caches of this run its own: the kit's earlier steps fill the default ones, and the
        # FAST_MODE load timed here is the uncached cold start.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(workdir) / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(Path(workdir) / "triton")
        folder = model_folder(args, device, dtype, Path(workdir))
        modes = load_modes(folder, device, dtype, args, Path(workdir) / "compile-cache")
        # Written as it comes, so that what the kit's time limit cuts short leaves what was measured before it.
        run |= {"measured": {}, "cold": {label: mode.cold_start_s for label, mode in modes.items()}, "kernels": {}}
        write(args, run)
        loads = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in run["cold"].items())
        print(f"loaded at {time.time() - run['started']:.0f} s: {loads}", flush=True)

        def after_round(measured: dict[str, Any]) -> None:
            run["measured"] = measured
            write(args, run)
            done = ", ".join(f"{batch}: {found['rounds']} rounds" for batch, found in measured.items())
            print(f"measured {done} at {time.time() - run['started']:.0f} s", flush=True)

        # The timed rounds get their budget, or what is left of the run's time but for the profile and the cold starts.
        budget_s = max(0.0, min(args.budget_s, left_s() - 60))
        run["measured"] = rounds(modes, args, time.monotonic, budget_s, after_round)
        run["kernels"] = kernel_time(modes, device)
        write(args, run)  # written now too: the cold starts may run past the kit's limit
        if not args.no_cold_starts:
            run["processes"] = cold_starts(folder, args, Path(workdir), left_s)
    run["smi_after"] = nvidia_smi() if device.type == "cuda" else {}
    print(write(args, run))


def write(args: argparse.Namespace, run: dict[str, Any]) -> str:
    """gpu-speed.md and gpu-speed.json in ``--out`` from what ``run`` holds so far; the Markdown returned."""
    measured, processes, kernels = run["measured"], run.get("processes", {}), run["kernels"]
    report = summary(measured, args)
    lines = [
        f"{run['device']}, torch {torch.__version__}, {datetime.date.today()}; "
        f"{'random' if args.model is None else args.model} {str(run['dtype']).removeprefix('torch.')} weights, "
        f"{args.side}², {args.steps} steps, DPM++ 2M Karras, CFG 7.5",
        f"Command: `{run['command']}`, {time.time() - run['started']:.0f} s; medians (interquartile range) of the "
        "timed rounds, each round the modes in turn.",
        f"Code: {describe_code(run['code'])}",
        "",
        *verdicts(report),
        "",
        *table(report, run["cold"]),
        "",
        "Kernel time: one more batch-1 job of each mode under torch.profiler, its kernels' milliseconds (on the CPU,"
        " its operators') against the timed median job; the rest is launches, Python and waiting:",
        "",
        "| mode | kernels ms | job ms (median) | kernels' share |",
        "| --- | --- | --- | --- |",
    ]
    for label, kernel_ms in kernels.items():
        job_ms = report.get("batch 1", {}).get("modes", {}).get(label, {}).get("job_ms", {}).get("median")
        share = f"{kernel_ms / job_ms:.0%}" if job_ms else ""
        lines.append(f"| {label} | {kernel_ms:.1f} | {'' if job_ms is None else f'{job_ms:.1f}'} | {share} |")
    if processes:
        lines += ["", "Cold starts, each in a process of its own with torch's compile caches empty:", ""]
        lines += ["| mode | load s | process s (imports included) |", "| --- | --- | --- |"]
        for label, found in processes.items():
            if "error" in found:
                lines.append(f"| {label} | not measured: {found['error']} | |")
            else:
                lines.append(f"| {label} | {found['load_s']:.1f} | {found['process_s']:.1f} |")
    for when in ("before", "after"):
        smi = run.get(f"smi_{when}")
        if smi:
            lines += ["", f"nvidia-smi {when}:", "", "```", smi["gpu"], smi["processes"], "```"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-speed.md").write_text(text + "\n", encoding="utf-8")
    raw = {
        batch: {label: vars(series) for label, series in found["series"].items()} for batch, found in measured.items()
    }
    record = {"device": run["device"], "command": run["command"], "code": run["code"], "cold_start_s": run["cold"]}
    record["report"] = report
    record |= {"kernel_ms": kernels, "samples_ms": raw, "cold_starts": processes}
    record["nvidia_smi"] = {"before": run["smi_before"], "after": run.get("smi_after", {})}
    (args.out / "gpu-speed.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
