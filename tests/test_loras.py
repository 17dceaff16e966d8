"""LoRA per request on the tiny real pipeline: the wire contract through handler.handler, the rest on Engines.

The LoRA files are random ones from builder/tiny_lora.py, written once per module:
both key layouts (PEFT and kohya), UNet-only and UNet + text encoder, ranks 1, 4 and
16, and files the worker must refuse (an embedding, a cut-short file, junk, an SDXL
LoRA, a LyCORIS LoHa). Faults are injected as in tests/test_resilience.py: forward
hooks on the real UNet that raise an OOM or advance the engine's clock.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import handler
from builder.tiny_lora import build_lora_state_dict, save_lora, write_test_loras
from src.adapters.loras import Loras, scan_loras
from src.errors import AdapterError, AdmissionError, GenerationTimeoutError, OutOfMemoryError
from src.run.a1111_listings import answer_listing
from src.run.engine import Engine, Generation
from src.schema import parse_input
from src.settings import load_settings
from tests.conftest import decode_png, rss_bytes
from tests.test_resilience import CUDA_OOM, FakeClock, clock_moves, injected, raises_on

JOB = {
    "prompt": "a red fox in the snow",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "seed": 5,
    "num_images": 1,
}

# The usable LoRAs of the module's folder, by name: (layout, rank, text encoder layers).
USABLE = {
    "a": ("peft", 4, True),
    "a-kohya": ("kohya", 4, True),  # the same LoRA as "a" (same seed), in kohya's layout
    "b": ("kohya", 4, True),
    "sub/c": ("peft", 16, True),
    "unet-only": ("kohya", 1, False),
    "unet-only-peft": ("peft", 16, False),
    "te-only": ("peft", 4, True),  # its UNet weights are zeros
    "te-keys-only": ("peft", 4, True),  # no UNet key at all
}
SEEDS = {"a": 0, "a-kohya": 0, "b": 1, "sub/c": 2, "unet-only": 3, "unet-only-peft": 4, "te-only": 5, "te-keys-only": 6}
# Files a request may name but the worker cannot use, and what the refusal says about each.
UNUSABLE = {
    "bad/embedding": "not a LoRA: none of its keys is a LoRA weight (its first key is 'emb_params')",
    "bad/truncated": "the file is cut short",
    "bad/junk": "not a safetensors file",
    "bad/sdxl": "it is a LoRA for SDXL, not SD 1.5",
    "bad/ldm-names": "its UNet layers have the original code's block names (input_blocks_...)",
    "bad/loha": "it is LyCORIS LoHa, which diffusers' LoRA loader cannot read",
    # Headers safetensors itself refuses: each is refused at the scan, not at the GPU stage.
    "bad/shape-null": "not a safetensors file (its header cannot be read): its entry 'unet.x.lora_down.weight'",
    "bad/no-shape": "not a safetensors file (its header cannot be read): its entry 'unet.x.lora_down.weight'",
    "bad/nested": "not a safetensors file (its header is not JSON)",
}
# Headers of those files, each with 4 bytes of data after it.
MALFORMED_HEADERS = {
    "shape-null": b'{"unet.x.lora_down.weight": {"dtype": "F32", "shape": null, "data_offsets": [0, 4]}}',
    "no-shape": b'{"unet.x.lora_down.weight": {"dtype": "F32", "data_offsets": [0, 4]}}',
    "nested": b'{"unet.x.lora_down.weight": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


# --- the files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny model's UNet and text encoder, to shape LoRA state dicts (never loaded into)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    return unet, text_encoder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, models: tuple[Any, Any]) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    unet, text_encoder = models
    for name, (layout, rank, text_layers) in USABLE.items():
        state = build_lora_state_dict(
            unet, text_encoder, rank=rank, seed=SEEDS[name], layout=layout, text_encoder_layers=text_layers
        )
        if name == "te-only":
            state = {key: torch.zeros_like(value) if key.startswith("unet.") else value for key, value in state.items()}
        if name == "te-keys-only":
            state = {key: value for key, value in state.items() if key.startswith("text_encoder.")}
        save_lora(state, folder / f"{name}.safetensors")

    bad = folder / "bad"
    bad.mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, bad / "embedding.safetensors")
    whole = (folder / "a.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(whole[: len(whole) - 1000])
    (bad / "junk.safetensors").write_bytes(b"this is not a safetensors file at all" * 4)
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
        },
        bad / "sdxl.safetensors",
    )
    save_file(
        {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        },
        bad / "ldm-names.safetensors",
    )
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{stem}.{part}": torch.zeros(4, 32) for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        | {f"{stem}.alpha": torch.tensor(4.0)},
        bad / "loha.safetensors",
    )
    for name, header in MALFORMED_HEADERS.items():
        (bad / f"{name}.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    # Not .safetensors: never listed.
    (folder / "notes.txt").write_text("not a LoRA")
    (folder / "old.ckpt").write_bytes(b"pickle")
    return folder


@pytest.fixture(scope="module")
def six_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Six LoRAs of one size (PEFT, rank 4): tiny-peft-10 to tiny-peft-15."""
    folder = tmp_path_factory.mktemp("six-loras")
    write_test_loras(tiny_model_dir, folder, count=6, rank=4, layout="peft", seed=10)
    return folder


SIX = [f"tiny-peft-{seed}" for seed in range(10, 16)]


@pytest.fixture(scope="module")
def misfit_dir(tmp_path_factory: pytest.TempPathFactory, models: tuple[Any, Any], lora_dir: Path) -> Path:
    """LoRAs whose keys name SD 1.5 layers but which do not fit them, as LoRAs for SD 2.x do, and "a".

    Their headers look like any LoRA's, so they are listed; loading them is what fails.
    """
    folder = tmp_path_factory.mktemp("misfit-loras")
    shutil.copyfile(lora_dir / "a.safetensors", folder / "a.safetensors")
    unet, text_encoder = models
    state = build_lora_state_dict(unet, text_encoder, rank=4, seed=7)

    def wider(prefix: str) -> dict[str, torch.Tensor]:
        """The LoRA with the down weights of ``prefix``'s layers one input wider than the model's."""
        return {
            key: torch.randn(value.shape[0], value.shape[1] + 1)
            if key.startswith(prefix) and ".lora_A." in key
            else value
            for key, value in state.items()
        }

    # One layer's up weight of rank 3 for a down weight of rank 4: the shapes fit the layer, PEFT refuses it.
    unequal = dict(state)
    up = next(key for key in unequal if key.startswith("unet.") and ".lora_B." in key)
    unequal[up] = unequal[up][:, :3]
    save_lora(unequal, folder / "unequal-ranks.safetensors")
    save_lora(wider("text_encoder."), folder / "wider-text-encoder.safetensors")
    save_lora(wider("unet."), folder / "wider-unet.safetensors")
    save_lora(
        {
            "unet.no_such_block.to_q.lora_A.weight": torch.randn(4, 32),
            "unet.no_such_block.to_q.lora_B.weight": torch.randn(32, 4),
        },
        folder / "no-layer.safetensors",
    )
    return folder


def lora_bytes(folder: Path, name: str) -> int:
    """What one loaded LoRA of ``folder`` takes in float32: its values x 4 bytes, from the file's header."""
    return scan_loras(str(folder))[name].parameters * 4


def a1111_short_hash(path: Path) -> str:
    """A1111's ``Lora hashes`` value, as its ``addnet_hash_safetensors`` computes it: the SHA-256 of the
    bytes after the header (8 bytes of little-endian length, then that much JSON), first 12 hex digits."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


# --- engines and jobs --------------------------------------------------------------------------------


def load_engine(tiny_model_dir: Path, **variables: str) -> Engine:
    engine = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), **variables}))
    engine.clock = FakeClock()
    return engine


@pytest.fixture(scope="module")
def plain_engine(tiny_model_dir: Path) -> Engine:
    """A fresh worker's engine: no LORA_DIR, never loads a LoRA."""
    return load_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir: Path, lora_dir: Path) -> Engine:
    return load_engine(tiny_model_dir, LORA_DIR=str(lora_dir))


def generate(engine: Engine, timeout_s: float = 600, **fields: Any) -> Generation:
    request = parse_input({"input": {**JOB, **fields}}, engine.settings)
    return engine.generate(request, timeout_s=timeout_s)


def pixels(generation: Generation) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in generation.images])


def loras(*pairs: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"name": name, "scale": scale} for name, scale in pairs]


@pytest.fixture(scope="module")
def fresh(plain_engine: Engine) -> np.ndarray:
    """JOB's pixels on a worker that never loaded a LoRA."""
    return pixels(generate(plain_engine))


def adapter_layers(engine: Engine) -> dict[str, int]:
    """How many PEFT adapters each model holds, and how many LoRA A-weights in all: what loading left behind."""
    pipeline = engine._pipeline
    counts = {}
    for model_name in ("unet", "text_encoder"):
        model = getattr(pipeline, model_name)
        counts[model_name] = len(getattr(model, "peft_config", None) or {})
        counts[f"{model_name}_weights"] = sum(
            len(module.lora_A)
            for module in model.modules()
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
        )
    return counts


# --- the handler ---------------------------------------------------------------------------------------


@pytest.fixture
def lora_worker(
    configure: Callable[..., None], lora_engine: Engine, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., None]:
    """handler.handler with LORA_DIR set and the module's engine; returns ``configure`` for more variables."""
    configure(LORA_DIR=str(lora_dir))
    monkeypatch.setattr(handler, "_engine", lora_engine)
    lora_engine.clock = FakeClock()
    return configure


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "lora-job", "input": {**JOB, **fields}}))


def ok(**fields: Any) -> dict[str, Any]:
    result = run(**fields)
    assert "error" not in result, result["error"]
    return result


def files_of(result: dict[str, Any]) -> list[str]:
    return [item["image"] for item in result["images"]]


def on_a_fresh_worker(monkeypatch: pytest.MonkeyPatch, engine: Engine, **fields: Any) -> list[str]:
    """The base64 files a worker that never loaded a LoRA answers for JOB with ``fields``."""
    current = handler._engine
    monkeypatch.setattr(handler, "_engine", engine)
    try:
        return files_of(ok(**fields))
    finally:
        monkeypatch.setattr(handler, "_engine", current)


# --- LoRA off, the folder, names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"loras": [{"name": "a"}]}, id="field"),
        pytest.param({"prompt": "a fox <lora:a:0.8>"}, id="tag"),
    ],
)
def test_without_lora_dir_a_request_naming_a_lora_is_refused(
    configure: Callable[..., None], fields: dict[str, Any]
) -> None:
    configure()

    assert run(**fields) == {"error": "invalid input: loras: LoRA is off on this worker: LORA_DIR is not set"}
    assert "error" not in run()


def test_the_folder_is_listed_at_startup_by_name_with_subfolders(lora_engine: Engine) -> None:
    assert sorted(lora_engine.loras.names) == sorted(USABLE)
    assert set(lora_engine.loras.files) == set(USABLE) | set(UNUSABLE), "only .safetensors files, all of them"


def test_the_startup_log_names_each_unusable_file(
    tiny_model_dir: Path, lora_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="src.adapters.loras"):
        load_engine(tiny_model_dir, LORA_DIR=str(lora_dir))

    warned = [record.getMessage() for record in caplog.records if record.name == "src.adapters.loras"]
    assert len(warned) == len(UNUSABLE)
    for name, problem in UNUSABLE.items():
        path = lora_dir / f"{name}.safetensors"
        assert any(
            message.startswith(f"LoRA {name} ({path}) cannot be used: ") and problem in message for message in warned
        ), name


def test_a_lora_dir_that_is_not_a_folder_stops_startup(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"LORA_DIR=.*missing: not a folder"):
        load_engine(tiny_model_dir, LORA_DIR=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"loras": [{"name": "nope"}]}, id="field"),
        pytest.param({"prompt": "a fox <lora:nope:0.5>"}, id="tag"),
    ],
)
def test_an_unknown_name_is_refused_listing_at_most_20_names(
    configure: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    lora_dir: Path,
    tmp_path: Path,
    fields: dict[str, Any],
) -> None:
    for index in range(25):
        shutil.copyfile(lora_dir / "a.safetensors", tmp_path / f"copy-{index:02}.safetensors")
    configure(LORA_DIR=str(tmp_path))
    monkeypatch.setattr(handler, "_engine", None)  # a worker started with this folder

    result = run(**fields)

    listed = ", ".join(f"copy-{index:02}" for index in range(20))
    assert result == {
        "error": f"invalid input: loras.0.name='nope': not a LoRA in LORA_DIR; the LoRAs are: {listed} and 5 more"
    }
    assert ok(loras=[{"name": "copy-24"}])["metadata"]["loras"][0]["name"] == "copy-24"


def test_a_lora_in_a_subfolder_is_named_by_its_file_name_alone_as_in_a1111(
    configure: Callable[..., None], monkeypatch: pytest.MonkeyPatch, lora_dir: Path, tmp_path: Path
) -> None:
    # A1111 names a LoRA by its file's name wherever it lies: its prompts say <lora:a:0.8> for styles/a.
    for name in ("styles/a", "one/b", "two/b"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(lora_dir / "a.safetensors", tmp_path / f"{name}.safetensors")
    # And by the name kohya's metadata gives it, which A1111 takes as its alias.
    tensors = load_file(lora_dir / "b.safetensors")
    save_file(tensors, tmp_path / "styles" / "wc.safetensors", metadata={"ss_output_name": "watercolor_v2"})
    configure(LORA_DIR=str(tmp_path))
    monkeypatch.setattr(handler, "_engine", None)  # a worker started with this folder

    by_its_file_name = ok(prompt="a fox <lora:a:0.8>")
    assert by_its_file_name["metadata"]["loras"][0]["name"] == "a"
    parameters = decode_png(by_its_file_name["images"][0]["image"]).text["parameters"]
    assert parameters.startswith("a fox <lora:a:0.8>\n"), "the prompt's tag, and no second one for styles/a"
    assert f'Lora hashes: "a: {by_its_file_name["metadata"]["loras"][0]["hash"]}"' in parameters
    by_its_path = ok(prompt="a fox <lora:styles/a:0.8>")
    assert [decode_png(item).tobytes() for item in files_of(by_its_path)] == [
        decode_png(item).tobytes() for item in files_of(by_its_file_name)
    ], "the same file's pixels"
    assert handler.get_engine().loras.cached == ["styles/a"], "loaded once, under its own name"
    # Two LoRAs of that file name: neither is A1111's "b" here, and the job is refused naming both.
    error = run(prompt="a fox <lora:b:1>")["error"]
    assert error.startswith("invalid input: loras.0.name='b': not a LoRA in LORA_DIR; the LoRAs are: "), error
    assert "one/b" in error
    assert "two/b" in error
    by_alias = ok(prompt="a fox <lora:watercolor_v2:0.5>")
    assert by_alias["metadata"]["loras"][0]["name"] == "watercolor_v2"
    assert files_of(ok(prompt="a fox <lora:wc:0.5>"))[0] != files_of(by_its_file_name)[0], "another LoRA's pixels"
    listed = answer_listing(handler.get_engine(), "/sdapi/v1/loras")
    assert [(item["name"], item["alias"]) for item in listed] == [
        ("one/b", "one/b"),
        ("a", "a"),
        ("wc", "watercolor_v2"),
        ("two/b", "two/b"),
    ], "by the files' order"


def test_an_unknown_name_lists_the_usable_loras_only(lora_worker: Callable[..., None]) -> None:
    error = run(prompt="a fox <lora:sub/d>", loras=[{"name": "a"}])["error"]

    prefix = "invalid input: loras.1.name='sub/d': not a LoRA in LORA_DIR; the LoRAs are: "
    assert error.startswith(prefix)
    assert sorted(error.removeprefix(prefix).split(", ")) == sorted(USABLE)


# --- refusals, and the next job --------------------------------------------------------------------------

REFUSED = [
    pytest.param(
        {"loras": [{"name": "../x"}]},
        "loras.0.name='../x': must be a LoRA's name: its file name in LORA_DIR without .safetensors "
        "(sub/name in a subfolder), not a path or a URL",
        id="dot-dot",
    ),
    pytest.param(
        {"loras": [{"name": "sub/../a"}]}, "loras.0.name='sub/../a': must be a LoRA's name", id="inner-dot-dot"
    ),
    pytest.param({"loras": [{"name": "/etc/passwd"}]}, "loras.0.name='/etc/passwd': must be a LoRA's name", id="abs"),
    pytest.param(
        {"loras": [{"name": "https://example.com/x.safetensors"}]},
        "loras.0.name='https://example.com/x.safetensors': must be a LoRA's name",
        id="url",
    ),
    pytest.param({"loras": [{"name": "sub\\c"}]}, "loras.0.name='sub\\\\c': must be a LoRA's name", id="backslash"),
    pytest.param(
        {"loras": [{"name": "a.safetensors"}]},
        "loras.0.name='a.safetensors': not a LoRA in LORA_DIR; the LoRAs are: ",
        id="not-in-folder",
    ),
    pytest.param({"loras": [{"name": ""}]}, "loras.0.name='': must have at least 1 character", id="empty-name"),
    pytest.param(
        {"loras": [{"name": "a", "scale": float("nan")}]}, "loras.0.scale=nan: must be a finite number", id="nan"
    ),
    pytest.param(
        {"loras": [{"name": "a", "scale": 1e9}]},
        "loras.0.scale=1000000000.0: must be less than or equal to 4",
        id="1e9",
    ),
    pytest.param(
        {"loras": [{"name": "a", "scale": -4.5}]}, "loras.0.scale=-4.5: must be greater than or equal to -4", id="-4.5"
    ),
    pytest.param({"loras": [{"name": "a", "scale": "1"}]}, "loras.0.scale='1': must be a valid number", id="string"),
    pytest.param({"loras": [{"name": "a", "scale": True}]}, "loras.0.scale=True: must be a valid number", id="bool"),
    pytest.param({"loras": "a"}, "loras='a': must be a valid list", id="not-a-list"),
    pytest.param(
        {"loras": [{"name": name} for name in ("a", "b", "sub/c", "unet-only", "te-only")]},
        "loras: 5 LoRAs asked for, with the prompt's <lora:...> tags: at most 4 (MAX_LORAS)",
        id="five",
    ),
    pytest.param(
        {"prompt": "<lora:a> <lora:b> <lora:sub/c> fox", "loras": [{"name": "unet-only"}, {"name": "te-only"}]},
        "loras: 5 LoRAs asked for, with the prompt's <lora:...> tags: at most 4 (MAX_LORAS)",
        id="five-with-tags",
    ),
    pytest.param(
        {"loras": [{"name": "a"}, {"name": "a", "scale": 0.5}]},
        "loras.1.name='a': named twice; name each LoRA once",
        id="twice",
    ),
    pytest.param(
        {"prompt": "a fox <lora:a> <lora:a:0.5>"}, "loras.1.name='a': named twice; name each LoRA once", id="tag-twice"
    ),
    pytest.param(
        {"prompt": "a fox <lora:a:0.5>", "loras": [{"name": "a"}]},
        "loras: 'a' is named in loras and as a <lora:a> tag in prompt; name it once",
        id="field-and-tag",
    ),
    pytest.param(
        {"negative_prompt": "blurry <lora:a:0.5>"},
        "negative_prompt: <lora:...> tags are read only in prompt; a LoRA applies to the whole job",
        id="negative-tag",
    ),
    pytest.param(
        {"prompt": "a fox <lora:a:abc>"},
        "prompt: <lora:a:abc>: the scale 'abc' must be a finite number from -4 to 4",
        id="tag-scale-abc",
    ),
    pytest.param(
        {"prompt": "a fox <lora:a:9>"},
        "prompt: <lora:a:9>: the scale '9' must be a finite number from -4 to 4",
        id="tag-9",
    ),
    pytest.param(
        {"prompt": "a fox <lora:a:nan>"},
        "prompt: <lora:a:nan>: the scale 'nan' must be a finite number from -4 to 4",
        id="tag-nan",
    ),
    pytest.param(
        {"prompt": "a fox <lora:a:1:2>"},
        "prompt: <lora:a:1:2>: a LoRA tag takes a name and at most one scale, <lora:name:scale>",
        id="tag-three-parts",
    ),
    pytest.param(
        {"prompt": "a fox <hypernet:x>"},
        "prompt: <hypernet:x>: only <lora:name> and <lora:name:scale> tags are read; <hypernet:...> is not",
        id="hypernet",
    ),
    pytest.param(
        {"prompt": "a fox <lora:../a>"},
        "loras.0.name='../a': must be a LoRA's name",
        id="tag-path",
    ),
    *(
        pytest.param(
            {"loras": [{"name": "a"}, {"name": name}]},
            f"loras.1.name={name!r}: {name.split('/')[-1]}.safetensors cannot be used: {problem}",
            id=name.split("/")[-1],
        )
        for name, problem in UNUSABLE.items()
    ),
]


def test_a_hires_prompt_may_repeat_the_prompts_tags_and_no_other(lora_worker: Callable[..., None]) -> None:
    hires = {"scale": 1.5, "steps": 1}
    tagged = "a red fox in the snow <lora:a:0.8>"
    plain = ok(prompt=tagged, hires=hires)
    copied = ok(prompt=tagged, hires={**hires, "prompt": tagged})
    sharper = ok(prompt=tagged, hires={**hires, "prompt": "a sharp red fox <lora:a:0.8>"})
    own = ok(prompt=tagged, hires={**hires, "prompt": "a sharp red fox"})

    def drawn(result: dict[str, Any]) -> bytes:
        return decode_png(files_of(result)[0]).tobytes()

    assert files_of(copied) == files_of(plain), "the prompt again, tags and all, is the prompt: the same file"
    assert drawn(sharper) == drawn(own), "the tags repeated change nothing"
    assert drawn(sharper) != drawn(plain)
    for other in ("a fox <lora:b:0.8>", "a fox <lora:a:0.5>", "a fox <lora:a:0.8> <lora:b:1>"):
        error = run(prompt=tagged, hires={**hires, "prompt": other})["error"]
        assert f"hires.prompt={other!r}: <lora:...> tags are read only in prompt" in error, error
    ok()


@pytest.mark.parametrize(("fields", "says"), REFUSED)
def test_a_refused_lora_request_names_the_field_and_rule_and_the_next_job_is_clean(
    lora_worker: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    plain_engine: Engine,
    fields: dict[str, Any],
    says: str,
) -> None:
    result = run(**fields)

    assert set(result) == {"error"}
    assert says in result["error"], result["error"]
    assert files_of(ok()) == on_a_fresh_worker(monkeypatch, plain_engine)
    assert "error" not in run(loras=[{"name": "a"}])


def test_an_unknown_key_in_a_lora_names_a_loras_fields(lora_worker: Callable[..., None]) -> None:
    error = run(loras=[{"name": "a", "weight": 0.5}])["error"]

    assert error.startswith("invalid input: loras.0.weight=0.5: unknown field")
    assert "the fields are: prompt" not in error
    assert "name, url, sha256, scale" in error


# --- what a LoRA does to the image ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "a-kohya", "b", "sub/c", "unet-only", "unet-only-peft"])
def test_every_layout_rank_and_part_loads_and_changes_the_image(
    tiny_model_dir: Path, lora_dir: Path, fresh: np.ndarray, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    engine = load_engine(tiny_model_dir, LORA_DIR=str(lora_dir))  # so that this LoRA is loaded now, from its file

    with caplog.at_level(logging.INFO, logger="src.adapters.loras"):
        result = generate(engine, loras=loras((name, 1.0)))

    assert not np.array_equal(pixels(result), fresh)
    parts = "text_encoder and unet" if USABLE[name][2] else "unet"
    assert f"LoRA {name} loaded ({parts}, " in caplog.text
    assert np.array_equal(pixels(generate(engine)), fresh)


def test_kohya_and_peft_files_of_one_lora_give_the_same_image(lora_engine: Engine) -> None:
    peft = pixels(generate(lora_engine, loras=loras(("a", 0.8))))
    kohya = pixels(generate(lora_engine, loras=loras(("a-kohya", 0.8))))

    # kohya's alpha / rank is applied: without it the kohya file would act twice as strong.
    assert np.abs(peft - kohya).max() <= 1


def test_a_kohya_lora_whose_alpha_varies_by_layer_is_scaled_layer_by_layer_as_a1111(
    tiny_model_dir: Path, lora_dir: Path, lora_engine: Engine, tmp_path: Path
) -> None:
    """kohya's resized (dynamic-rank) files give each layer its own alpha; A1111 scales each by its own
    alpha / rank. "a-kohya" rewritten with alphas of 1, 2 and 8 in turn (up weights changed to keep
    up x alpha / rank) is the same LoRA, so it must give the pixels of "a"."""
    with safe_open(lora_dir / "a-kohya.safetensors", framework="pt") as opened:
        state = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118 - safe_open is no dict
    alphas = [key for key in sorted(state) if key.endswith(".alpha")]
    for index, key in enumerate(alphas):
        stem, alpha = key.removesuffix("alpha"), (1.0, 2.0, 8.0)[index % 3]
        state[stem + "lora_up.weight"] *= float(state[key]) / alpha
        state[key] = torch.tensor(alpha)
    assert {key.startswith("lora_te_") for key in alphas[::3]} == {False, True}, "both models vary"
    save_lora(state, tmp_path / "a-varied.safetensors")

    varied = pixels(generate(load_engine(tiny_model_dir, LORA_DIR=str(tmp_path)), loras=loras(("a-varied", 0.8))))
    same = pixels(generate(lora_engine, loras=loras(("a", 0.8))))
    assert np.abs(varied - same).max() <= 1


def test_scale_0_gives_the_pixels_of_no_lora_and_scale_1_does_not(lora_engine: Engine, fresh: np.ndarray) -> None:
    assert np.array_equal(pixels(generate(lora_engine, loras=loras(("a", 0.0)))), fresh)
    assert np.array_equal(pixels(generate(lora_engine, loras=loras(("a", 0.0), ("b", 0.0)))), fresh)
    assert not np.array_equal(pixels(generate(lora_engine, loras=loras(("a", 1.0)))), fresh)
    assert not np.array_equal(pixels(generate(lora_engine, loras=loras(("a", -1.0)))), fresh)


def test_scale_0_through_the_handler_gives_the_same_file_without_embedded_parameters(
    lora_worker: Callable[..., None], monkeypatch: pytest.MonkeyPatch, plain_engine: Engine
) -> None:
    with_parameters = ok(loras=[{"name": "a", "scale": 0}])
    assert files_of(with_parameters) != on_a_fresh_worker(monkeypatch, plain_engine), "the parameters name the LoRA"
    assert (
        decode_png(files_of(with_parameters)[0]).tobytes()
        == decode_png(on_a_fresh_worker(monkeypatch, plain_engine)[0]).tobytes()
    )

    lora_worker(EMBED_PARAMETERS="false")
    assert files_of(ok(loras=[{"name": "a", "scale": 0}])) == on_a_fresh_worker(monkeypatch, plain_engine)


def test_two_loras_differ_from_each_one_alone(lora_engine: Engine) -> None:
    a = pixels(generate(lora_engine, loras=loras(("a", 1.0))))
    b = pixels(generate(lora_engine, loras=loras(("b", 1.0))))
    both = pixels(generate(lora_engine, loras=loras(("a", 1.0), ("b", 1.0))))

    assert not np.array_equal(both, a)
    assert not np.array_equal(both, b)
    assert not np.array_equal(a, b)


def test_a_text_encoder_only_lora_changes_the_image(lora_engine: Engine, fresh: np.ndarray) -> None:
    """te-only's UNet weights are zeros: only its text-encoder layers, read by src/prompts/, can change the image."""
    assert not np.array_equal(pixels(generate(lora_engine, loras=loras(("te-only", 1.0)))), fresh)
    assert not np.array_equal(pixels(generate(lora_engine, loras=loras(("te-keys-only", 1.0)))), fresh)


def test_tags_and_the_loras_field_give_identical_files(lora_worker: Callable[..., None]) -> None:
    tagged = ok(prompt="a red fox in the snow <lora:a:0.8>")
    listed = ok(loras=[{"name": "a", "scale": 0.8}])
    # The tag is not encoded as text: the images are the same; and the parameters text too, since the
    # loras field is written back as the same tag at the prompt's end.
    assert files_of(tagged) == files_of(listed)
    assert tagged["metadata"]["loras"] == listed["metadata"]["loras"]

    bare_tag = ok(prompt="a red fox in the snow <lora:a>")
    assert bare_tag["metadata"]["loras"][0]["scale"] == 1.0
    assert decode_png(files_of(bare_tag)[0]).tobytes() == decode_png(files_of(ok(loras=[{"name": "a"}]))[0]).tobytes()

    # Tags are merged after the field's LoRAs.
    merged = ok(prompt="a red fox in the snow <lora:b:0.5>", loras=[{"name": "a", "scale": 0.8}])
    both = ok(loras=[{"name": "a", "scale": 0.8}, {"name": "b", "scale": 0.5}])
    assert [item["name"] for item in merged["metadata"]["loras"]] == ["a", "b"]
    assert decode_png(files_of(merged)[0]).tobytes() == decode_png(files_of(both)[0]).tobytes()


# --- a job without LoRA after jobs with -------------------------------------------------------------------


def test_a_job_without_lora_after_lora_jobs_is_byte_identical_to_a_fresh_workers(
    lora_worker: Callable[..., None], monkeypatch: pytest.MonkeyPatch, plain_engine: Engine
) -> None:
    for fields in (
        {"loras": [{"name": "a"}]},
        {"loras": [{"name": "b", "scale": -2.0}, {"name": "sub/c", "scale": 3.0}]},
        {"prompt": "a fox <lora:te-only:4>"},
        {"loras": [{"name": "unet-only"}]},
    ):
        ok(**fields)

    for fields in ({}, {"num_images": 2, "seed": 9}):
        assert files_of(ok(**fields)) == on_a_fresh_worker(monkeypatch, plain_engine, **fields)


def test_after_a_lora_job_that_timed_out_the_next_job_is_clean(lora_engine: Engine, fresh: np.ndarray) -> None:
    lora_engine.clock = FakeClock()
    with (
        injected(lora_engine._pipeline.unet, clock_moves(lora_engine, 100, from_call=2)),
        pytest.raises(GenerationTimeoutError) as raised,
    ):
        generate(lora_engine, timeout_s=60, num_inference_steps=10, loras=loras(("a", 1.0), ("b", 1.0)))

    assert str(raised.value) == (
        "generation stopped: it ran past GENERATION_TIMEOUT_SECONDS=60 at denoising step 2 of 10"
    )
    assert np.array_equal(pixels(generate(lora_engine)), fresh)


def test_after_a_lora_job_out_of_memory_on_every_try_the_next_job_is_clean(
    lora_engine: Engine, fresh: np.ndarray
) -> None:
    with (
        injected(lora_engine._pipeline.unet, raises_on(lambda _call: True, CUDA_OOM)),
        pytest.raises(OutOfMemoryError),
    ):
        generate(lora_engine, loras=loras(("a", 1.0), ("unet-only", 2.0)))

    assert np.array_equal(pixels(generate(lora_engine)), fresh)
    oom_runtime = RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
    with (
        injected(lora_engine._pipeline.unet, raises_on(lambda _call: True, oom_runtime)),
        pytest.raises(OutOfMemoryError),
    ):
        generate(lora_engine, loras=loras(("sub/c", 1.0)))

    assert np.array_equal(pixels(generate(lora_engine)), fresh)


def test_a_lora_job_that_ran_out_of_memory_once_recovers_with_the_lora_applied(lora_engine: Engine) -> None:
    clean = generate(lora_engine, loras=loras(("a", 0.7), ("b", 1.3)))

    with injected(lora_engine._pipeline.unet, raises_on(lambda call: call == 1, CUDA_OOM)):
        retried = generate(lora_engine, loras=loras(("a", 0.7), ("b", 1.3)))

    assert any("ran out of memory" in warning for warning in retried.warnings)
    assert np.array_equal(pixels(retried), pixels(clean))


# --- the cache ---------------------------------------------------------------------------------------------


def test_100_jobs_over_6_loras_with_room_for_3_keep_memory_flat(tiny_model_dir: Path, six_dir: Path) -> None:
    size = lora_bytes(six_dir, SIX[0])
    engine = load_engine(tiny_model_dir, LORA_DIR=str(six_dir), LORA_CACHE_MB=str(3.5 * size / 1e6))
    fast = {"num_inference_steps": 1, "guidance_scale": 1.0}
    first: dict[str, np.ndarray] = {}

    def job(index: int) -> None:
        name = SIX[index % len(SIX)]
        image = pixels(generate(engine, loras=loras((name, 1.0)), **fast))
        assert np.array_equal(image, first.setdefault(name, image)), f"job {index}: {name} gave another image"

    for index in range(12):  # warm up: each LoRA loaded and evicted twice
        job(index)
    before = rss_bytes()
    for index in range(12, 100):
        job(index)
    growth = rss_bytes() - before

    assert growth < 50 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 88 jobs"
    assert engine.loras.cached == [SIX[97 % 6], SIX[98 % 6], SIX[99 % 6]], "the last 3 used"
    layers = adapter_layers(engine)
    assert layers["unet"] == layers["text_encoder"] == 3, "evicted adapters are deleted from the models"
    with safe_open(six_dir / f"{SIX[0]}.safetensors", "pt") as file:
        keys = list(file.keys())
    for model_name in ("unet", "text_encoder"):
        per_lora = sum(key.startswith(f"{model_name}.") and ".lora_A." in key for key in keys)
        assert layers[f"{model_name}_weights"] == 3 * per_lora, f"{model_name}: 3 LoRAs' layers, no more"


def test_the_cache_evicts_the_least_recently_used(tiny_model_dir: Path, six_dir: Path) -> None:
    size = lora_bytes(six_dir, SIX[0])
    engine = load_engine(tiny_model_dir, LORA_DIR=str(six_dir), LORA_CACHE_MB=str(3.5 * size / 1e6))
    a, b, c, d, e, _f = SIX

    for name in (a, b, c, d):
        generate(engine, loras=loras((name, 1.0)))
    assert engine.loras.cached == [b, c, d], "A is gone, least recently used first"

    generate(engine, loras=loras((b, 1.0)))
    assert engine.loras.cached == [c, d, b]
    generate(engine, loras=loras((e, 1.0)))
    assert engine.loras.cached == [d, b, e]

    # A job with more LoRAs than fit runs with all of them, then keeps the 3 it used last.
    generate(engine, loras=loras((a, 1.0), (b, 1.0), (c, 1.0), (d, 1.0)))
    assert engine.loras.cached == [b, c, d]


def test_exactly_room_for_3_keeps_3(tiny_model_dir: Path, six_dir: Path) -> None:
    size = lora_bytes(six_dir, SIX[0])
    engine = load_engine(tiny_model_dir, LORA_DIR=str(six_dir), LORA_CACHE_MB=str(3 * size / 1e6))

    for name in SIX[:4]:
        generate(engine, loras=loras((name, 1.0)))

    assert engine.loras.cached == SIX[1:4]


def copy_folder(source: Path, target: Path, names: list[str]) -> Path:
    target.mkdir()
    for name in names:
        shutil.copyfile(source / f"{name}.safetensors", target / f"{name}.safetensors")
    return target


def test_a_cached_lora_is_not_read_again(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path, fresh: np.ndarray
) -> None:
    folder = copy_folder(lora_dir, tmp_path / "loras", ["a", "b"])
    engine = load_engine(tiny_model_dir, LORA_DIR=str(folder))
    first = pixels(generate(engine, loras=loras(("a", 1.0))))

    (folder / "a.safetensors").unlink()
    (folder / "b.safetensors").unlink()

    assert np.array_equal(pixels(generate(engine, loras=loras(("a", 1.0)))), first), "from the cache"
    with pytest.raises(AdapterError) as raised:
        generate(engine, loras=loras(("a", 1.0), ("b", 1.0)))
    assert str(raised.value).startswith("loras.1.name='b': b.safetensors cannot be read: [Errno 2] No such file")
    assert np.array_equal(pixels(generate(engine)), fresh)
    assert np.array_equal(pixels(generate(engine, loras=loras(("a", 1.0)))), first)


def test_lora_cache_mb_0_keeps_nothing_between_jobs(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path, fresh: np.ndarray
) -> None:
    folder = copy_folder(lora_dir, tmp_path / "loras", ["a"])
    engine = load_engine(tiny_model_dir, LORA_DIR=str(folder), LORA_CACHE_MB="0")
    first = pixels(generate(engine, loras=loras(("a", 1.0))))

    assert engine.loras.cached == []
    assert adapter_layers(engine) == {"unet": 0, "unet_weights": 0, "text_encoder": 0, "text_encoder_weights": 0}
    assert np.array_equal(pixels(generate(engine, loras=loras(("a", 1.0)))), first), "read from its file again"
    assert np.array_equal(pixels(generate(engine)), fresh)

    (folder / "a.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"^loras\.0\.name='a': a\.safetensors cannot be read: "):
        generate(engine, loras=loras(("a", 1.0)))


def with_model_offload(engine: Engine, folder: Path) -> Engine:
    """``engine`` with the low profile's model offload, on the CPU: accelerate's hooks move each model
    between "cpu" and the execution device "cpu:0" as they would between host memory and a GPU, and its
    LoRAs of ``folder`` put the offload back after a load, as an engine of the low profile does."""
    from src.run.engine import apply_offload
    from src.run.memory import Profile

    restore = functools.partial(apply_offload, engine._pipeline, Profile.LOW, torch.device("cpu"))
    restore()
    engine.loras = Loras(engine._pipeline, scan_loras(str(folder)), cache_bytes=10**9, offload=restore)
    return engine


def offload_hooks(engine: Engine) -> dict[str, str]:
    """The accelerate hook on each model of the engine's pipeline, by kind."""
    models = engine._pipeline.components.items()
    return {name: type(getattr(model, "_hf_hook", None)).__name__ for name, model in models if hasattr(model, "to")}


@pytest.mark.parametrize("offload", [False, True], ids=["", "model-offload"])
@pytest.mark.parametrize(
    ("name", "error"),
    [
        pytest.param(
            "wider-text-encoder",
            "text_encoder.encoder.layers.0.self_attn.k_proj.lora_A.weight is for a layer of input 33, "
            "and the layer's input is 32",
            id="text-encoder",
        ),
        pytest.param("wider-unet", "unet.down_blocks.", id="unet"),
        pytest.param("no-layer", "the unet has no layer no_such_block.to_q", id="no-layer"),
        # The shapes fit the layers, so only PEFT's load finds out, after diffusers took the offload hooks off.
        pytest.param("unequal-ranks", "RuntimeError: Error(s) in loading state_dict", id="peft-refuses"),
    ],
)
def test_a_lora_that_does_not_fit_the_model_is_refused_and_its_partial_load_undone(
    tiny_model_dir: Path, misfit_dir: Path, fresh: np.ndarray, name: str, error: str, *, offload: bool
) -> None:
    """A file whose shapes do not fit is refused from its header, before diffusers' loader touches the models;
    one that fails inside PEFT is undone. Either way the profile's offload hooks are on the models after it
    (diffusers' loaders take them off and put them back only after a load that succeeded)."""
    engine = load_engine(tiny_model_dir, LORA_DIR=str(misfit_dir))
    if offload:
        with_model_offload(engine, misfit_dir)
    hooks = offload_hooks(engine)
    with_a = pixels(generate(engine, loras=loras(("a", 1.0))))
    layers_with_a = adapter_layers(engine)

    with pytest.raises(AdapterError) as raised:
        generate(engine, loras=loras(("a", 1.0), (name, 1.0)))

    refused = f"loras.1.name={name!r}: {name}.safetensors cannot be loaded into this SD 1.5 model: "
    assert str(raised.value).startswith(refused)
    assert error in str(raised.value)
    assert offload_hooks(engine) == hooks, "the offload hooks are as the profile put them"
    assert (set(hooks.values()) == {"CpuOffload"}) is offload
    assert adapter_layers(engine) == layers_with_a, "nothing of the refused file stays in the models"
    assert engine.loras.cached == ["a"]
    assert np.array_equal(pixels(generate(engine)), fresh)
    assert np.array_equal(pixels(generate(engine, loras=loras(("a", 1.0)))), with_a)
    assert offload_hooks(engine) == hooks


def _with_extra_layer(tiny_model_dir: Path, path: Path, layer: str, *, down: torch.Tensor, up: torch.Tensor) -> None:
    """A kohya LoRA of the tiny model with one more layer, ``lora_unet_<layer>``."""
    unet = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir)}))._pipeline.unet
    state = build_lora_state_dict(unet, None, rank=4, seed=11, layout="kohya", text_encoder_layers=False)
    state[f"lora_unet_{layer}.lora_down.weight"] = down
    state[f"lora_unet_{layer}.lora_up.weight"] = up
    state[f"lora_unet_{layer}.alpha"] = torch.tensor(4.0)
    save_lora(state, path)


@pytest.fixture(scope="module")
def partial_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoCon (a LoRA on a resnet's 3x3 convolution too), and a LoRA with one layer the UNet does not have."""
    folder = tmp_path_factory.mktemp("partial")
    conv = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir)}))._pipeline.unet.down_blocks[0].resnets[0].conv1
    out_channels, in_channels, kernel, _ = conv.weight.shape
    generator = torch.Generator().manual_seed(5)
    _with_extra_layer(
        tiny_model_dir,
        folder / "locon.safetensors",
        "down_blocks_0_resnets_0_conv1",
        down=torch.randn(4, in_channels, kernel, kernel, generator=generator) * 0.2,
        up=torch.randn(out_channels, 4, 1, 1, generator=generator) * 0.2,
    )
    _with_extra_layer(
        tiny_model_dir, folder / "stray.safetensors", "bogus_layer_0", down=torch.randn(4, 8), up=torch.randn(8, 4)
    )
    return folder


@pytest.mark.parametrize("slots", [0, 2], ids=["merged", "hot-swap slots"])
def test_a_locon_loads_its_convolution_and_a_lora_with_a_stray_layer_is_refused_whole(
    tiny_model_dir: Path, partial_dir: Path, fresh: np.ndarray, slots: int
) -> None:
    """diffusers skips a layer it cannot place with a warning at most: the worker refuses such a file rather
    than apply part of it. LoCon's convolutions do load, into the resnet's conv layer."""
    engine = load_engine(tiny_model_dir, LORA_DIR=str(partial_dir))
    if slots:
        engine.loras = Loras(engine._pipeline, scan_loras(str(partial_dir)), cache_bytes=10**9, slots=slots)
        engine.loras.prepare_slots()

    # The slots check the UNet's layers before loading, and name the one that is missing.
    refused = r"cannot be used whole: 1 of its |cannot be loaded into this SD 1.5 model: the unet has no layer"
    with pytest.raises(AdapterError, match=rf"^loras\.0\.name='stray': stray\.safetensors ({refused})"):
        generate(engine, loras=loras(("stray", 1.0)))
    assert engine.loras.cached == []
    locon = pixels(generate(engine, loras=loras(("locon", 1.0))))
    assert np.abs(locon - fresh).max() > 0
    conv = engine._pipeline.unet.down_blocks[0].resnets[0].conv1
    assert "lora_A" in vars(conv)["_modules"], "the resnet's convolution took the LoRA"
    assert np.array_equal(pixels(generate(engine)), fresh)


# --- metadata -------------------------------------------------------------------------------------------------


def test_metadata_and_png_parameters_name_each_lora_with_a1111s_short_hash(
    lora_worker: Callable[..., None], lora_dir: Path
) -> None:
    prompt = "a red fox <lora:sub/c:0.5> in the snow"
    result = ok(prompt=prompt, loras=[{"name": "a", "scale": 0.8}, {"name": "unet-only"}])

    digests = {name: a1111_short_hash(lora_dir / f"{name}.safetensors") for name in ("a", "unet-only", "sub/c")}
    assert all(len(digest) == 12 for digest in digests.values())
    metadata = result["metadata"]
    assert metadata["prompt"] == prompt
    assert metadata["loras"] == [
        {"name": "a", "scale": 0.8, "hash": digests["a"]},
        {"name": "unet-only", "scale": 1.0, "hash": digests["unet-only"]},
        {"name": "sub/c", "scale": 0.5, "hash": digests["sub/c"]},
    ]
    parameters = decode_png(files_of(result)[0]).text["parameters"]
    first_line, settings_line = parameters.split("\n")
    assert first_line == f"{prompt} <lora:a:0.8> <lora:unet-only:1>"
    assert settings_line.endswith(
        f'Lora hashes: "a: {digests["a"]}, unet-only: {digests["unet-only"]}, sub/c: {digests["sub/c"]}"'
    )
    assert "Sampler: " in settings_line


def test_a_job_without_lora_reports_none(lora_worker: Callable[..., None]) -> None:
    result = ok()

    assert "loras" not in result["metadata"]
    assert "Lora hashes" not in decode_png(files_of(result)[0]).text["parameters"]


# --- threads ----------------------------------------------------------------------------------------------------


def test_concurrent_lora_jobs_match_sequential_ones(lora_worker: Callable[..., None]) -> None:
    jobs = {
        "a": {"loras": [{"name": "a"}]},
        "b": {"prompt": "a red fox in the snow <lora:b:0.6>"},
        "none": {},
        "a+b": {"loras": [{"name": "a", "scale": 0.5}, {"name": "b", "scale": -1.0}]},
    }
    sequential = {key: files_of(ok(**fields)) for key, fields in jobs.items()}
    concurrent: dict[str, list[str]] = {}
    threads = [
        threading.Thread(target=lambda k=key, f=fields: concurrent.__setitem__(k, files_of(ok(**f))))
        for key, fields in jobs.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert concurrent == sequential
    assert len(set(map(tuple, sequential.values()))) == 4


# --- hot-swap slots (FAST_MODE's path) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slot_engine(tiny_model_dir: Path, lora_dir: Path) -> Engine:
    """An engine whose UNet LoRAs go through 4 hot-swap slots, made before its first job as FAST_MODE makes them."""
    engine = load_engine(tiny_model_dir, LORA_DIR=str(lora_dir))
    slots = Loras(engine._pipeline, scan_loras(str(lora_dir)), cache_bytes=10**9, slots=4)
    slots.prepare_slots()
    assert slots.has_slots
    engine.loras = slots
    return engine


SLOT_SEQUENCE = [
    [],
    [("a", 1.0)],
    [("b", 0.7)],
    [("a", 1.0), ("b", 1.0), ("sub/c", 1.0)],
    [("sub/c", 1.0), ("a", -1.0)],
    [],
    # A LoRA of the same alpha / rank into a slot last run at another scale.
    [("a", 0.5)],
    [("sub/c", 1.0)],
    [("a-kohya", 2.0), ("b", 0.3), ("unet-only", 1.0), ("unet-only-peft", -0.5)],
    [],
]


def same_picture(swapped: np.ndarray, normal: np.ndarray) -> bool:
    """Equal but for float rounding: at most 2 levels of 255, in under 1% of the values.

    The slots hold each LoRA zero-padded to the folder's largest rank, and matrix products of
    another shape round differently (a few values move by one level). A LoRA at a wrong scale,
    missing or left over moves most values by several levels.
    """
    difference = np.abs(swapped - normal)
    return bool(difference.max() <= 2 and (difference > 0).mean() < 0.01)


def test_hot_swap_slots_give_the_pixels_of_the_normal_path(
    slot_engine: Engine, lora_engine: Engine, fresh: np.ndarray
) -> None:
    for pairs in SLOT_SEQUENCE:
        swapped = pixels(generate(slot_engine, loras=loras(*pairs)))
        normal = pixels(generate(lora_engine, loras=loras(*pairs)))
        if pairs:
            assert np.abs(normal - fresh).mean() > 1, f"{pairs} changes the image"
            assert same_picture(swapped, normal), pairs
        else:
            assert np.array_equal(swapped, fresh), "a job without LoRA runs no slot"


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([("unet-only", 1.0), ("te-keys-only", 1.0)], id="unet-then-te"),
        pytest.param([("te-keys-only", 1.0), ("unet-only", 1.0)], id="te-then-unet"),
        pytest.param([("te-keys-only", 2.0), ("te-only", 1.0), ("unet-only-peft", 0.5)], id="two-te"),
        pytest.param([("te-keys-only", -1.5)], id="te-alone"),
    ],
)
def test_hot_swap_slots_mix_unet_only_and_text_encoder_loras(
    slot_engine: Engine, lora_engine: Engine, fresh: np.ndarray, pairs: list[tuple[str, float]]
) -> None:
    swapped = pixels(generate(slot_engine, loras=loras(*pairs)))
    normal = pixels(generate(lora_engine, loras=loras(*pairs)))

    assert np.abs(normal - fresh).mean() > 1
    assert same_picture(swapped, normal)
    assert np.array_equal(pixels(generate(slot_engine)), fresh)


def test_hot_swap_slots_survive_a_lora_whose_unet_layers_do_not_fit(
    tiny_model_dir: Path, misfit_dir: Path, fresh: np.ndarray
) -> None:
    engine = load_engine(tiny_model_dir, LORA_DIR=str(misfit_dir))
    slots = Loras(engine._pipeline, scan_loras(str(misfit_dir)), cache_bytes=10**9, slots=2)
    slots.prepare_slots()
    engine.loras = slots

    assert np.array_equal(pixels(generate(engine)), fresh)
    with pytest.raises(AdapterError, match=r"^loras\.0\.name='wider-unet': wider-unet\.safetensors cannot be"):
        generate(engine, loras=loras(("wider-unet", 1.0)))
    assert np.abs(pixels(generate(engine, loras=loras(("a", 1.0)))) - fresh).mean() > 1


# --- schedulers and admission --------------------------------------------------------------------------------------


def test_with_model_offload_admission_counts_the_cached_adapters_that_ride_along(
    tiny_model_dir: Path, six_dir: Path
) -> None:
    """Model offload (the low profile) moves each model to the GPU whole, with every adapter cached in it: the
    cached LoRAs a job does not use are counted besides the job's own."""
    from src.run.engine import apply_offload
    from src.run.memory import Profile

    engine = load_engine(tiny_model_dir, LORA_DIR=str(six_dir))
    restore = functools.partial(apply_offload, engine._pipeline, Profile.LOW, torch.device("cpu"))
    restore()
    files = scan_loras(str(six_dir))
    engine.loras = Loras(engine._pipeline, files, cache_bytes=10**9, offload=restore, cache_rides_along=True)
    generate(engine, loras=loras((SIX[0], 1.0), (SIX[1], 0.5)))

    def refs(*names: str) -> Any:
        request = {"input": {"prompt": "a fox", "loras": loras(*((name, 1.0) for name in names))}}
        return parse_input(request, engine.settings).loras

    cache_empty = Loras(engine._pipeline, files, cache_bytes=10**9, cache_rides_along=True)  # the job's own only
    sizes = {name: engine.loras._state.cached[name].size for name in SIX[:2]}
    assert engine.loras.cached == SIX[:2]
    assert all(size > 0 for size in sizes.values())
    assert engine.loras.gpu_bytes(refs(), 2) == sizes[SIX[0]] + sizes[SIX[1]]
    assert engine.loras.gpu_bytes(refs(SIX[0]), 2) == cache_empty.gpu_bytes(refs(SIX[0]), 2) + sizes[SIX[1]]
    assert engine.loras.gpu_bytes(refs(*SIX[:2]), 2) == cache_empty.gpu_bytes(refs(*SIX[:2]), 2)
    stays = Loras(engine._pipeline, files, cache_bytes=10**9)  # other profiles: cached adapters wait in host memory
    assert stays.gpu_bytes(refs(), 2) == 0


@pytest.mark.parametrize("scheduler", ["LCM", "lcm"])
def test_the_lcm_scheduler_runs_with_a_lora(lora_worker: Callable[..., None], scheduler: str) -> None:
    result = ok(scheduler=scheduler, num_inference_steps=4, guidance_scale=1.5, loras=[{"name": "a"}])

    assert result["metadata"]["scheduler"] == "LCM"
    assert result["metadata"]["loras"][0]["name"] == "a"
    assert "Sampler: LCM" in decode_png(files_of(result)[0]).text["parameters"]


def test_a_cuda_error_that_breaks_the_gpu_while_a_lora_loads_asks_for_a_new_worker(
    lora_worker: Callable[..., None], tiny_model_dir: Path, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoRA's refusal wraps whatever diffusers raised while loading it; when that was a CUDA error that broke the
    GPU, the job is answered as any such error is (refresh_worker), and the next job is not run."""
    del lora_worker
    monkeypatch.setattr(handler, "_gpu_failure", None)  # this process's record, put back after the test
    engine = load_engine(tiny_model_dir, LORA_DIR=str(lora_dir))  # its own: the module's may have cached every LoRA
    monkeypatch.setattr(handler, "_engine", engine)
    engine.clock = FakeClock()

    def load_lora_weights(*_args: Any, **_kwargs: Any) -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine._pipeline, "load_lora_weights", load_lora_weights)

    answer = run(loras=[{"name": engine.loras.names[0]}])

    assert answer["refresh_worker"] is True, answer
    assert "AdapterError" in answer["error"]
    assert "an illegal memory access was encountered" in answer["error"]
    assert run()["error"].startswith("not run: an earlier job on this worker broke its GPU")


def test_admission_counts_the_adapters_bytes() -> None:
    from src.run.memory import GIB, Profile, estimate_peak_bytes, plan_sub_batch

    # A card on which exactly four 512² images fit without LoRA.
    budget = int(estimate_peak_bytes(Profile.HIGH, 512, 512, 4) / 0.95) + 1
    assert plan_sub_batch(Profile.HIGH, 512, 512, 4, gpu_bytes=budget).batch == 4
    with_adapters = plan_sub_batch(Profile.HIGH, 512, 512, 4, gpu_bytes=budget, adapter_bytes=300 * 10**6)
    assert with_adapters.batch < 4
    # Adapters that leave no room for even one tiled image: refused, naming them.
    small_card = int(estimate_peak_bytes(Profile.HIGH, 512, 512, 1, tiling=True) / 0.95) + 1
    with pytest.raises(AdmissionError, match="MB of LoRA weights included"):
        plan_sub_batch(Profile.HIGH, 512, 512, 1, gpu_bytes=small_card, adapter_bytes=GIB)
