"""GPU self-check: can this machine run the worker, and how big may images be?

    python -m builder.selfcheck          # a readable report
    python -m builder.selfcheck --json   # the same, as JSON
    python -m builder.selfcheck --quick  # skip the tiny-model generation
    python -m builder.selfcheck --liveness  # only: is the worker (PID 1) running? (the image's HEALTHCHECK)

Exit codes: 0 all good, 1 a check failed, 2 no usable GPU.

``--liveness`` reads /proc and nothing else: no torch, no CUDA context. The
HEALTHCHECK runs every minute next to a worker that may hold 95% of the card,
and a CUDA context takes GPU memory of its own.

It reports torch and CUDA versions, the GPU and its compute capability,
whether this torch build has kernels for it (a GTX 1060 under a CUDA 12.8+
build does not: it is told to install the CUDA 12.6 build), total and free
memory, whether fp16 math gives finite numbers, a real tiny-model generation
on the GPU with its time, and the memory profile and largest image size it
recommends. The decisions are pure functions, tested on a table of cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file, `python builder/selfcheck.py`: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.errors import AdmissionError
from src.run.gpu import fp16_finite, kernel_advice
from src.run.memory import GIB, Profile, choose_profile, plan_sub_batch

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
LARGEST_SIDE_CHECKED = 2048


# --- decisions: pure functions of capability, arch list and memory (see also src/run/gpu.py) ------------


def recommend(total_bytes: int) -> tuple[Profile, int]:
    """The memory profile for a card, and the largest square side (a multiple of 64) it takes."""
    profile = choose_profile("cuda", total_bytes)
    largest = 0
    for side in range(64, LARGEST_SIDE_CHECKED + 1, 64):
        try:
            plan_sub_batch(profile, side, side, 1, gpu_bytes=total_bytes)
        except AdmissionError:
            break
        largest = side
    return profile, largest


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    status: str = "ok"
    exit_code: int = EXIT_OK
    problems: list[str] = field(default_factory=list)
    torch: str = ""
    cuda: str | None = None
    device: str | None = None
    capability: str | None = None
    arch_list: list[str] = field(default_factory=list)
    kernels: bool | None = None
    total_gib: float | None = None
    free_gib: float | None = None
    fp16_finite: bool | None = None
    generation_s: float | None = None
    profile: str | None = None
    largest_side: int | None = None

    def fail(self, problem: str, code: int = EXIT_FAILED) -> None:
        self.problems.append(problem)
        self.exit_code = max(self.exit_code, code)
        self.status = "no usable GPU" if self.exit_code == EXIT_NO_GPU else "check failed"


def tiny_generation_seconds() -> float:
    """Seconds for one 512x512, 4-step image from the tiny model, through the worker's engine on the GPU."""
    from builder.tiny_model import write_tiny_model
    from src.run.engine import Engine
    from src.schema import parse_input
    from src.settings import load_settings

    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings({"MODEL_ID": str(write_tiny_model(Path(folder))), "DEVICE": "cuda"})
        engine = Engine.load(settings)
        request = parse_input({"input": {"prompt": "self-check", "num_inference_steps": 4, "seed": 0}}, settings)
        engine.generate(request, timeout_s=120)  # the first run pays for CUDA's lazy start
        started = time.perf_counter()
        engine.generate(request, timeout_s=120)
        return time.perf_counter() - started


def check(quick: bool = False) -> Report:
    """Run every check this machine allows; never raises."""
    import torch

    report = Report(torch=torch.__version__, cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no NVIDIA GPU or driver is visible"
        report.fail(f"no usable GPU: {why}; the worker would run on the CPU, slowly", EXIT_NO_GPU)
        return report
    capability = torch.cuda.get_device_capability(0)
    report.device = torch.cuda.get_device_name(0)
    report.capability = f"{capability[0]}.{capability[1]}"
    report.arch_list = list(torch.cuda.get_arch_list())
    advice = kernel_advice(capability, report.arch_list, torch.version.cuda)
    report.kernels = advice is None
    free, total = torch.cuda.mem_get_info(0)
    report.total_gib, report.free_gib = round(total / GIB, 2), round(free / GIB, 2)
    profile, largest = recommend(total)
    report.profile, report.largest_side = profile.value, largest
    if advice is not None:
        report.fail(advice)
        return report  # any kernel launch would fail with "no kernel image is available"
    try:
        report.fp16_finite = fp16_finite(torch)
        if not report.fp16_finite:
            report.fail("an fp16 matmul gave NaN or infinity: set DTYPE=float32 on this GPU")
        if not quick:
            report.generation_s = round(tiny_generation_seconds(), 3)
    except Exception as error:  # noqa: BLE001 - a broken driver fails in many ways; report, never crash
        report.fail(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    return report


def liveness(pid: int = 1) -> tuple[bool, str]:
    """Whether process ``pid`` is the worker and running: not a zombie, not stopped, and its
    command line runs ``handler.py``. Returns the answer and a line saying why."""
    proc = Path("/proc") / str(pid)
    try:
        # The state follows the command name, which is in parentheses and may hold spaces or ")".
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        arguments = [arg.decode(errors="replace") for arg in (proc / "cmdline").read_bytes().split(b"\0") if arg]
    except FileNotFoundError:
        return False, f"no process {pid}"
    except OSError as error:
        return False, f"cannot read {proc}: {error}"
    if state in ("Z", "X", "T", "t"):
        return False, f"worker {pid} is not running (state {state})"
    if not any(Path(arg).name == "handler.py" for arg in arguments):
        return False, f"process {pid} is not the worker: {' '.join(arguments)[:200]}"
    return True, f"worker {pid} is running"


def render(report: Report) -> str:
    """The report for a person."""
    lines = [f"status: {report.status}", f"torch {report.torch}, CUDA {report.cuda or 'none (CPU build)'}"]
    if report.device:
        lines += [
            f"GPU: {report.device}, compute capability {report.capability}",
            f"kernels for it in this build: {'yes' if report.kernels else 'NO'}",
            f"memory: {report.total_gib} GiB total, {report.free_gib} GiB free",
            f"fp16 math finite: {report.fp16_finite}",
            f"tiny-model generation, 512x512, 4 steps: "
            f"{'skipped' if report.generation_s is None else f'{report.generation_s:.2f} s'}",
            f"recommended: MEMORY_PROFILE={report.profile}, images up to {report.largest_side}x{report.largest_side}",
        ]
    lines += [f"problem: {problem}" for problem in report.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument("--quick", action="store_true", help="skip the tiny-model generation")
    parser.add_argument(
        "--liveness", action="store_true", help="only check that the worker process runs; reads /proc, touches no GPU"
    )
    parser.add_argument("--pid", type=int, default=1, help="the worker's process id for --liveness (default: 1)")
    args = parser.parse_args(argv)
    if args.liveness:
        alive, why = liveness(args.pid)
        print(why)
        return EXIT_OK if alive else EXIT_FAILED
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    report = check(quick=args.quick)
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
