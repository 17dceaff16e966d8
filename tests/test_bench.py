"""The benchmark scripts run, and the random-weight SD 1.5 really has SD 1.5's architecture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.gpu_bench import KIT_S, kit_left_s
from bench.machine import CODE, FORK_CHILDREN, FORKED_NOTE, code_version
from bench.sd15_random import PUBLISHED_MILLIONS, build_sd15_random, check_parameter_counts
from tests.conftest import ROOT
from tests.forked import run_module


def test_random_sd15_has_sd15_parameter_counts() -> None:
    # The modules the benchmarks build, on the meta device: the same architecture, without 2 GB of random weights.
    pipeline = build_sd15_random("meta", torch.float16)

    counts = check_parameter_counts(pipeline)

    assert counts.keys() == PUBLISHED_MILLIONS.keys()
    assert pipeline.vae_scale_factor == 8


def run_bench(module: str, *args: str, fork_children: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m module args` from the project root, as the README says, in a process forked with torch and
    diffusers already imported (tests/forked.py); fails with its stderr. With ``fork_children``, the benchmark's
    own child processes (its cold starts, say) are forked too (BENCH_FORK_CHILDREN=1): each still runs its code
    in a process of its own, without the imports a new interpreter pays."""
    env = {**os.environ, FORK_CHILDREN: "1"} if fork_children else None
    result = run_module(module, *args, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_gpu_check_smoke_runs_on_the_cpu_with_the_tiny_model(tiny_model_dir: Path) -> None:
    result = run_bench("bench.gpu_check", "--tiny", str(tiny_model_dir), "--steps", "1")

    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 8, result.stdout
    assert all("| yes |" in row for row in rows[1:])
    assert "ControlNet unit" in rows[-1]


def test_encode_benchmark_prints_every_format() -> None:
    result = run_bench("bench.encode", "--repeat", "1")

    for name in ("| png |", "| jpeg |", "| webp |"):
        assert name in result.stdout


def test_cpu_benchmark_smoke_run_writes_the_table_and_the_json(tmp_path: Path) -> None:
    # --smoke runs every part of the benchmark (cold starts, warm jobs, peak RSS) at 64², 2 steps, once.
    run_bench("bench.run", "--smoke", "--out", str(tmp_path), fork_children=True)

    report = json.loads((tmp_path / "cpu.json").read_text())
    assert set(report["ratios"]["tiny"]) == {"cold_start", "handler_overhead_64", "peak_rss"}
    assert report["command"] == f"python -m bench.run --smoke --out {tmp_path}"
    table = (tmp_path / "cpu.md").read_text()
    assert "| tiny | 64² | 2 |" in table
    assert f"Command: `{report['command']}`" in table
    # Forked children are no cold starts, and the results say so.
    assert report["children"] == FORKED_NOTE
    assert FORKED_NOTE in table


def test_tasks_benchmark_smoke_run_writes_every_task_and_the_rss_ratio(tmp_path: Path) -> None:
    # The tiny model at 128², one timed job per side and task after the warm-ups, and the two RSS processes.
    run_bench("bench.tasks", "--repeat", "1", "--out", str(tmp_path), fork_children=True)

    report = json.loads((tmp_path / "tasks.json").read_text())
    assert set(report["ratios"]) == {"txt2img", "img2img", "inpaint", "outpaint", "hires", "peak_rss"}
    assert report["rss"]["txt2img"]["jobs"] == ["txt2img"] * 5
    assert report["rss"]["all"]["jobs"] == ["txt2img", "img2img", "inpaint", "outpaint", "hires"]
    assert report["command"] == f"python -m bench.tasks --repeat 1 --out {tmp_path}"
    table = (tmp_path / "tasks.md").read_text()
    rows = ("| tiny txt2img | 128² | 10 |", "| tiny inpaint | 128² | 8 |", "| tiny hires | 128² → 256² | 10 + 10 |")
    for row in rows:
        assert row in table
    assert f"Command: `{report['command']}`" in table


def test_prompts_benchmark_writes_parse_and_encode_times(tmp_path: Path) -> None:
    run_bench("bench.prompts", "--repeat", "1", "--out", str(tmp_path))

    report = json.loads((tmp_path / "prompts.json").read_text())
    assert len(report["parse_ms"]) == 4
    assert {"worker", "diffusers_encode_prompt"} <= set(next(iter(report["encode_ms"].values())))
    assert "Command: `python -m bench.prompts --repeat 1" in (tmp_path / "prompts.md").read_text()


def test_loras_benchmark_smoke_run_writes_every_case_and_the_lora_file(tmp_path: Path) -> None:
    # The tiny model at 128², one round of each case after their warm-ups: three workers, 30 small LoRA files.
    run_bench("bench.loras", "--repeat", "1", "--out", str(tmp_path))

    report = json.loads((tmp_path / "loras.json").read_text())
    assert set(report["ratios"]) == {
        "plain_fresh",
        "one_uncached",
        "one_cached",
        "three_cached",
        "plain_after",
        "plain_crowded",
        "one_cached_crowded",
    }
    assert report["ratios"]["plain_fresh"] == 1.0
    assert len(report["cases"]["one_uncached"]["load_s"]) == 1
    # A job without LoRA computes the same image on a worker with cached adapters as on a fresh one.
    assert report["cases"]["plain_after"]["max_pixel_difference"] == 0
    assert report["crowded"]["cases"]["plain_crowded"]["max_pixel_difference"] == 0
    assert report["cases"]["one_cached"]["max_pixel_difference"] > 0
    assert report["command"] == f"python -m bench.loras --repeat 1 --out {tmp_path}"
    table = (tmp_path / "loras.md").read_text()
    for row in (
        "| tiny | 3 LoRAs, cached | 3 (",
        "| tiny | no LoRA, on the worker holding 29 cached | 29 (",
        "| tiny | rank 32,",
    ):
        assert row in table
    assert f"Command: `{report['command']}`" in table


def test_checkpoint_benchmark_smoke_run_writes_every_variant(tmp_path: Path) -> None:
    # The tiny model as a folder and as one checkpoint file, its bake, the cache's first fill, one start of each.
    run_bench("bench.checkpoint", "--tiny", "--repeat", "1", "--out", str(tmp_path), fork_children=True)

    report = json.loads((tmp_path / "checkpoint-tiny.json").read_text())
    assert set(report["runs"]) == {"folder", "baked", "startup", "cached"}
    assert all(len(runs) == 1 for runs in report["runs"].values())
    assert report["ratios"]["folder"] == 1.0
    assert report["files"]["baked"].keys() == report["files"]["cached"].keys()
    assert report["command"] == f"python -m bench.checkpoint --tiny --repeat 1 --out {tmp_path}"
    table = (tmp_path / "checkpoint-tiny.md").read_text()
    for row in (
        "| diffusers folder | ",
        "| converted folder (baked) | ",
        "| single file, converted at startup | ",
        "| single file, MODEL_CACHE_DIR already filled | ",
        "| bake: `python -m builder.cache_model`, its whole process",
    ):
        assert row in table
    assert f"Command: `{report['command']}`" in table


def test_controlnet_benchmark_smoke_run_writes_every_unit_count_and_the_first_use(tmp_path: Path) -> None:
    # The tiny model at 128² with two tiny ControlNets (folders, and one as a file), one round after the warm-ups.
    run_bench("bench.controlnet", "--repeat", "1", "--out", str(tmp_path))

    report = json.loads((tmp_path / "controlnet.json").read_text())
    assert set(report["units"]) == {"0", "1", "2"}
    assert set(report["first_use"]) == {"first_use_folder", "first_use_file"}
    assert all(len(entry["load_s"]) == 1 for entry in report["first_use"].values())
    # The worker computes the very image bare diffusers does, and a ControlNet's file gives its folder's image.
    assert [entry["max_pixel_difference"] for entry in report["units"].values()] == [0, 0, 0]
    assert [entry["max_pixel_difference"] for entry in report["first_use"].values()] == [0, 0]
    assert report["command"] == f"python -m bench.controlnet --repeat 1 --out {tmp_path}"
    table = (tmp_path / "controlnet.md").read_text()
    for row in (
        "| tiny | 0 | ",
        "| tiny | 2 | ",
        "| tiny | diffusers folder, not cached (CONTROLNET_CACHE_MB=0) | ",
        "| tiny | single .safetensors file, not cached (CONTROLNET_CACHE_MB=0) | ",
        "| tiny | cached (loaded by an earlier job) | ",
    ):
        assert row in table
    assert f"Command: `{report['command']}`" in table


def test_models_benchmark_smoke_run_writes_every_measurement(tmp_path: Path) -> None:
    # The tiny model and two tiny checkpoints: each first use, the cached swaps, the jobs, the fresh worker.
    run_bench("bench.models", "--tiny", "--repeat", "1", "--jobs", "1", "--steps", "2", "--out", str(tmp_path))

    report = json.loads((tmp_path / "models-tiny.json").read_text())
    assert set(report["first_use"]) == {"no_cache", "cache_filled_now", "cache_already_filled"}
    assert {way: len(times) for way, times in report["cached_swap_s"].items()} == {"to_checkpoint": 1, "to_default": 1}
    # A swapped-in model draws the image of a worker started with it.
    assert report["fresh_worker"]["max_pixel_difference"] == 0
    assert report["command"] == f"python -m bench.models --tiny --repeat 1 --jobs 1 --steps 2 --out {tmp_path}"
    table = (tmp_path / "models-tiny.md").read_text()
    for row in (
        "| from host memory: a checkpoint into the modules (1 times) | ",
        "| first use, MODEL_CACHE_DIR filled: the conversion read; then the copy | ",
        "| 64², 2 steps, the model already in the modules | ",
    ):
        assert row in table
    assert f"Command: `{report['command']}`" in table


def test_upscalers_benchmark_smoke_run_writes_every_model(tmp_path: Path) -> None:
    # The builder's tiny models; spandrel imported with the tests' torchvision stand-in (tests/forked.py's PRELOAD).
    run_bench("bench.upscalers", "--tiny", "--repeat", "1", "--out", str(tmp_path))

    report = json.loads((tmp_path / "upscalers-tiny.json").read_text())
    assert {name: model["scale"] for name, model in report["models"].items()} == {
        "ESRGAN (RRDB)": 4,
        "Real-ESRGAN compact": 2,
    }
    assert set(report["jobs"]["ESRGAN (RRDB)"]) == {"inputs", "inference", "encode", "total"}
    table = (tmp_path / "upscalers-tiny.md").read_text()
    assert "| ESRGAN (RRDB) | 0.23 M | 4x | " in table
    assert "| Real-ESRGAN compact | " in table.split("| model | whole job |")[1]
    assert f"Command: `{report['command']}`" in table


def test_gpu_speed_benchmark_runs_its_harness_on_the_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bench.gpu_bench's interleaved rounds, phases, A/A control and report, on the CPU with the tiny model."""
    result = run_bench(
        "bench.gpu_bench", "--device", "cpu", "--model", str(tiny_model_dir), "--side", "64", "--steps", "2",
        "--repeat", "2", "--warmup", "1", "--batches", "1", "2", "--modes", "plain,worker", "--out", str(tmp_path),
    )  # fmt: skip
    # Its progress, in the order the files were written (a kit's time limit would leave them as they were then).
    progress = [line.split(" at ")[0] for line in result.stdout.splitlines() if " at " in line and " s" in line]
    assert progress == [
        "loaded",
        "measured batch 1: 1 rounds",
        "measured batch 1: 2 rounds",
        "measured batch 1: 2 rounds, batch 2: 1 rounds",
        "measured batch 1: 2 rounds, batch 2: 2 rounds",
    ], "written after every round"
    record = json.loads((tmp_path / "gpu-speed.json").read_text())
    for batch in ("batch 1", "batch 2"):
        entry = record["report"][batch]
        assert entry["rounds"] == 2
        assert set(entry["modes"]) == {"plain", "worker", "plain (again)"}
        assert isinstance(entry["conclusive"], bool)
        assert abs(entry["aa_ratio"] - 1) <= 0.03 or not entry["conclusive"]
        for row in entry["modes"].values():
            assert {"job_ms", "text_encoding", "denoising", "decoding", "to_images", "encode"} <= set(row)
            assert row["job_ms"]["q1"] <= row["job_ms"]["median"] <= row["job_ms"]["q3"]
            assert row["unet_steps_per_s"]["median"] > 0
        samples = record["samples_ms"][batch]
        assert all(len(series["jobs"]) == 2 for series in samples.values())
    assert record["cold_starts"]["plain"]["load_s"] > 0, "plain's cold start in a process of its own"
    assert record["kernel_ms"]["plain"] > 0
    assert record["kernel_ms"]["worker"] > 0
    table = (tmp_path / "gpu-speed.md").read_text()
    assert "| worker | " in table.split("Kernel time")[1]
    assert "A/A control (plain against itself)" in table
    assert "| plain | " in table.split("Cold starts")[1]
    assert "| 1 | worker |" in table
    assert "| 2 | plain (again) |" in table
    assert record["code"] == code_version(), "the code it measured: this checkout's commit and digest"
    assert f"Code: commit {record['code']['commit']}, code digest {record['code']['digest']}" in table


def test_the_gpu_benchmark_plans_within_what_the_gpu_kit_has_left(tmp_path: Path) -> None:
    """Run by the kit (an ancestor ``bash .gpu/run.sh``), the benchmark reads how long the kit has run and ends
    before the kit's call does; run by itself, it keeps its own deadline."""
    kit = tmp_path / ".gpu" / "run.sh"
    kit.parent.mkdir()
    probe = "from bench.gpu_bench import kit_left_s; print(kit_left_s())"
    kit.write_text(f"sleep 2\nbash -c '{sys.executable} -c \"{probe}\"'\n")
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(kit)], capture_output=True, text=True, timeout=600, check=True, cwd=ROOT, env=os.environ
    )
    took = time.monotonic() - started
    # The kit had run its 2 s of sleep, and at most as long as this test waited for it (whatever the machine's
    # speed); /proc counts in clock ticks, hence the 0.1 s.
    assert 2 - 0.1 <= KIT_S - float(done.stdout.strip()) <= took + 0.1
    assert kit_left_s() is None, "not under the kit"


def test_the_code_digest_names_a_copy_without_git_history_as_its_checkout(tmp_path: Path) -> None:
    """The GPU machine gets the files without .git: the digest, which a checkout prints, still names the code."""
    here = code_version()
    for pattern in CODE:
        for path in ROOT.glob(pattern):
            if "__pycache__" not in path.parts:
                (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp_path / path.relative_to(ROOT))
    (tmp_path / "src" / "__pycache__").mkdir()
    (tmp_path / "src" / "__pycache__" / "stale.py").write_text("compiled leftovers do not count")

    assert code_version(tmp_path) == {"digest": here["digest"]}, "no git history: the digest alone, the same"
    printed = subprocess.run(
        [sys.executable, "-m", "bench.machine"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(printed) == here
    (tmp_path / "src" / "errors.py").write_text((tmp_path / "src" / "errors.py").read_text() + "\n# changed\n")
    assert code_version(tmp_path)["digest"] != here["digest"]


def test_speed_options_benchmark_writes_each_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_bench(
        "bench.speed_options", "--model", str(tiny_model_dir), "--side", "64", "--steps", "4", "--out", str(tmp_path)
    )  # fmt: skip
    report = json.loads((tmp_path / "speed-options.json").read_text())
    assert [(row["option"], row["value"]) for row in report["rows"]] == [
        ("default", None),
        ("deepcache_interval", 2),
        ("deepcache_interval", 3),
        ("deepcache_interval", 5),
        ("tome_ratio", 0.3),
        ("tome_ratio", 0.5),
    ]
    assert report["rows"][0]["mean_difference"] == 0
    assert all(row["denoising_ms"] > 0 for row in report["rows"])
    assert "| tome_ratio 0.5 |" in (tmp_path / "speed-options.md").read_text()
