"""A1111's prompt syntax (src/prompts/): parsing, chunks of 75, weights, clip skip, through the handler."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

import handler
from builder.tiny_model import TEXT_WIDTH
from src.adapters.embeddings import load_embeddings
from src.errors import AdapterError, GenerationTimeoutError
from src.finish.parameters import a1111_parameters
from src.models.schedulers import make_scheduler
from src.prompts import (
    CHUNK_TOKENS,
    PromptError,
    Span,
    parse_prompt_attention,
    plan_texts,
    prompt_schedule,
    to_chunks,
)
from src.prompts.encoding import _weighted
from src.run.engine import Engine, Generation
from src.run.memory import Profile, estimate_peak_bytes
from src.schema import InputError, parse_input
from src.schema.adapters import without_comments
from src.settings import load_settings
from tests.conftest import decode_png, encoding_at_the_vae_mean
from tests.test_resilience import FakeClock, injected, load_engine

FAST = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}


# --- parsing ---------------------------------------------------------------------------------------

PARSED = [
    # The issue's own examples.
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("((text))", [("text", 1.1 * 1.1)]),
    ("", [("", 1.0)]),
    # A1111's own docstring, float bits and all.
    ("normal text", [("normal text", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # Brackets, escapes and weights.
    ("[text]", [("text", 1 / 1.1)]),
    ("(text:1.5)", [("text", 1.5)]),
    ("(text:1.0)", [("text", 1.0)]),
    ("\\(word\\)", [("(word)", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a lone \\ slash", [("a lone  slash", 1.0)]),
    ("unclosed ]) stray", [("unclosed ]) stray", 1.0)]),
    ("x: y", [("x: y", 1.0)]),
    ("(w:-1)", [("w", -1.0)]),
    ("(w:0)", [("w", 0.0)]),
    ("(w:1e3)", [("w:1e3", 1.1)]),  # "1e3" is no number in this syntax: the bracket is a plain 1.1
    ("(b:1.2.3)", [("b:1.2.3)", 1.1)]),
    # BREAK.
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1), ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_parse_prompt_attention_reads_as_a1111(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["(" * 2000, "(a" * 1000, "[a)" * 666, "\\" * 2000, ":" * 2000, ")" * 2000])
def test_parsing_tolerates_any_bracket_soup(text: str) -> None:
    runs = parse_prompt_attention(text)
    assert runs
    assert all(isinstance(piece, str) for piece, _ in runs)


# --- chunks ---------------------------------------------------------------------------------------


def tokenizer() -> Any:
    return handler.get_engine()._pipeline.tokenizer


@pytest.mark.usefixtures("worker")
def test_chunks_are_77_tokens_each_with_start_end_and_padding() -> None:
    words = "fox " * 60  # 2 tokens each on the tiny tokenizer: 120 tokens
    chunks = to_chunks(words, tokenizer())

    assert chunks.tokens == len(tokenizer()(words, add_special_tokens=False).input_ids)
    assert len(chunks.rows) == -(-chunks.tokens // CHUNK_TOKENS)
    for row in chunks.rows:
        assert len(row.ids) == len(row.weights) == 77
        assert row.ids[0] == tokenizer().bos_token_id
    assert chunks.rows[-1].ids[-1] == tokenizer().pad_token_id


@pytest.mark.usefixtures("worker")
def test_break_closes_a_chunk_and_weights_follow_their_tokens() -> None:
    chunks = to_chunks("a fox BREAK (a cat:1.5)", tokenizer())

    assert len(chunks.rows) == 2
    assert set(chunks.rows[1].weights) == {1.0, 1.5}
    assert set(chunks.rows[0].weights) == {1.0}
    assert len(to_chunks("BREAK a", tokenizer()).rows) == 2, "BREAK at the start leaves an empty first chunk"


# --- through the handler ---------------------------------------------------------------------------


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "prompt-job", "input": {"prompt": "a fox", **FAST, **fields}}))


def ok(**fields: Any) -> dict[str, Any]:
    result = run(**fields)
    assert "error" not in result, result["error"]
    return result


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pixels(result: dict[str, Any]) -> np.ndarray:
    return np.asarray(decode_png(result["images"][0]["image"]), dtype=np.int16)


def same_image(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """The same pixels, byte for byte (the files differ anyway: each embeds its own prompt)."""
    return np.array_equal(pixels(first), pixels(second))


pytestmark_worker = pytest.mark.usefixtures("worker")


@pytestmark_worker
def test_an_unweighted_prompt_gives_bare_diffusers_bytes() -> None:
    result = ok(prompt="a red fox in the snow", negative_prompt="blurry")
    base = handler.get_engine()._pipeline
    pipeline = StableDiffusionPipeline(
        **{**base.components, "scheduler": make_scheduler("DPM++ 2M Karras", base.scheduler.config)},
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    reference = pipeline(
        "a red fox in the snow",
        negative_prompt="blurry",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(5),
    ).images[0]

    assert np.array_equal(pixels(result), np.asarray(reference, dtype=np.int16))


@pytestmark_worker
def test_weights_change_the_image_and_a_weight_of_one_does_not() -> None:
    plain = ok(prompt="a fox in the snow")
    assert same_image(ok(prompt="a (fox:1.0) in the snow"), plain)
    assert not same_image(ok(prompt="a (fox:1.3) in the snow"), plain)
    assert not same_image(ok(prompt="a \\(fox\\) in the snow"), ok(prompt="a (fox) in the snow"))


@pytestmark_worker
def test_a_long_prompt_is_read_past_token_77() -> None:
    head = "a fox in the snow, " * 10  # past 100 tokens on the tiny tokenizer
    first, second = ok(prompt=head + "red fur"), ok(prompt=head + "blue fur")

    assert not same_image(first, second), "words after token 100 change the picture"
    assert first["metadata"]["warnings"] == []
    assert first["metadata"]["prompt_tokens"]["prompt"]["chunks"] >= 2


@pytestmark_worker
def test_clip_skip_2_differs_and_is_recorded_only_when_not_1() -> None:
    default, one, two = ok(), ok(clip_skip=1), ok(clip_skip=2)

    assert same_image(default, one)
    assert not same_image(one, two)
    assert two["metadata"]["clip_skip"] == 2
    assert "Clip skip: 2" in decode_png(two["images"][0]["image"]).text["parameters"]
    assert "Clip skip" not in decode_png(one["images"][0]["image"]).text["parameters"]


@pytestmark_worker
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param({"clip_skip": 0}, "clip_skip=0", id="clip-skip-0"),
        pytest.param({"clip_skip": 13}, "clip_skip=13", id="clip-skip-13"),
        pytest.param({"clip_skip": "2"}, "clip_skip='2'", id="clip-skip-str"),
        pytest.param({"clip_skip": True}, "clip_skip=True", id="clip-skip-bool"),
        pytest.param({"clip_skip": 3}, "clip_skip=3: this model's text encoder has 2 layers", id="past-the-layers"),
        pytest.param({"prompt": "fox " * 400}, "prompt: ", id="more-than-8-chunks"),
    ],
)
def test_bad_prompt_settings_name_the_field_and_the_next_job_runs(fields: dict[str, Any], named: str) -> None:
    result = run(**fields)

    assert set(result) == {"error"}
    assert named in result["error"]
    if "prompt" in fields:
        assert "chunks of 75; at most 8 (MAX_PROMPT_CHUNKS)" in result["error"]
    ok()


# As A1111's modules/processing_scripts/comments.py strips them (text in, text out).
COMMENTS = [
    ("a castle # TODO try a tower\nat night", "a castle \nat night"),
    ("# a note first\na fox", "\na fox"),
    ("a fox\n# a note last", "a fox\n"),
    ("a fox # one\n# two\nin snow", "a fox \nin snow"),
    ("no comment here", "no comment here"),
]


@pytest.mark.parametrize(("text", "expected"), COMMENTS)
def test_comments_are_removed_as_a1111_removes_them(text: str, expected: str) -> None:
    assert without_comments(text) == expected


@pytestmark_worker
def test_a_prompts_comments_change_nothing_and_a_tag_in_one_is_not_read() -> None:
    commented = ok(
        prompt="a fox # <lora:absent:0.8> try a wolf\nin the snow",
        negative_prompt="blurry # too soft?",
        hires={"scale": 1.5, "steps": 1, "prompt": "a fox # sharper\nin the snow"},
    )
    plain = ok(
        prompt="a fox \nin the snow",
        negative_prompt="blurry \n",
        hires={"scale": 1.5, "steps": 1, "prompt": "a fox \nin the snow"},
    )

    assert same_image(commented, plain)
    assert commented["metadata"]["prompt"] == "a fox \nin the snow", "the prompt as it was read"
    assert not commented["metadata"].get("loras"), "a commented-out tag is no tag"


@pytestmark_worker
def test_and_is_refused_in_a_prompt_not_as_a_word() -> None:
    error = run(prompt="a red cat :1.2 AND a blue ball :0.8")["error"]

    assert error.startswith("invalid input: prompt='a red cat :1.2 AND a blue ball :0.8': AND (A1111's composable")
    hires = run(hires={"scale": 1.5, "steps": 1, "prompt": "a cat AND a dog"})["error"]
    assert "hires.prompt='a cat AND a dog': AND" in hires
    ok(prompt="rock and roll, ANDROID, BRAND", negative_prompt="blurry AND soft")


# --- textual-inversion embeddings -----------------------------------------------------------------


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, TEXT_WIDTH, generator=generator) * 3}, folder / "tinyfox.safetensors")
    (folder / "styles").mkdir()
    torch.save(
        {"string_to_param": {"*": torch.randn(1, TEXT_WIDTH, generator=generator) * 3}, "name": "a1111style"},
        folder / "styles" / "a1111style.pt",
    )
    return folder


@pytest.fixture(scope="module")
def ti_engine(tiny_model_dir: Path, embeddings_dir: Path) -> Engine:
    return Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "EMBEDDINGS_DIR": str(embeddings_dir)}))


def ti_generate(engine: Engine, prompt: str, negative_prompt: str = "") -> Generation:
    request = parse_input({"input": {"prompt": prompt, "negative_prompt": negative_prompt, **FAST}}, engine.settings)
    return engine.generate(request, timeout_s=600)


def test_embeddings_load_at_startup_by_file_name(ti_engine: Engine) -> None:
    assert set(ti_engine.embeddings) == {"tinyfox", "a1111style"}
    assert ti_engine.embeddings["tinyfox"].vectors.shape == (2, TEXT_WIDTH)
    assert ti_engine.embeddings["a1111style"].vectors.shape == (1, TEXT_WIDTH)


def test_an_embedding_named_in_a_prompt_changes_the_image_and_is_reported(ti_engine: Engine) -> None:
    plain = ti_generate(ti_engine, "a fox in the snow")
    named = ti_generate(ti_engine, "a tinyfox in the snow")
    negative = ti_generate(ti_engine, "a fox in the snow", negative_prompt="a1111style")

    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(named.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(negative.images[0]))
    assert list(named.embeddings) == ["tinyfox"]
    assert list(negative.embeddings) == ["a1111style"]
    assert plain.embeddings == {}
    assert named.prompt_tokens["prompt"]["tokens"] < plain.prompt_tokens["prompt"]["tokens"] + 2


def test_an_embedding_not_named_changes_nothing(ti_engine: Engine) -> None:
    with_folder = ti_generate(ti_engine, "a fox in the snow, tinyfoxes")
    without = Engine.load(load_settings({"MODEL_ID": str(ti_engine.settings.model_id)}))
    reference = ti_generate(without, "a fox in the snow, tinyfoxes")

    assert with_folder.embeddings == {}, "only whole words are names"
    assert np.array_equal(np.asarray(with_folder.images[0]), np.asarray(reference.images[0]))


def a1111_ti_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_the_parameters_list_the_embeddings_as_a1111_does(ti_engine: Engine, embeddings_dir: Path) -> None:
    generation = ti_generate(ti_engine, "a tinyfox")
    request = parse_input({"input": {"prompt": "a tinyfox", **FAST}}, ti_engine.settings)
    text = a1111_parameters(request, 5, "tiny", embeddings=generation.embeddings)

    # A1111's textual_inversion hash: the SHA-256 of the whole file, its first 12 hex digits.
    digest = a1111_ti_hash(embeddings_dir / "tinyfox.safetensors")
    assert text.endswith(f'TI hashes: "tinyfox: {digest}"')


@pytest.mark.parametrize(
    ("write", "says"),
    [
        pytest.param(
            lambda path: torch.save({"x": _Pickled()}, path / "evil.pt"), "evil.pt: cannot be read", id="pickle"
        ),
        pytest.param(
            lambda path: save_file({"emb_params": torch.zeros(2, TEXT_WIDTH + 1)}, path / "wide.safetensors"),
            f"wide.safetensors: its vectors are (2, {TEXT_WIDTH + 1})",
            id="another-width",
        ),
        pytest.param(
            lambda path: (path / "junk.bin").write_bytes(b"not a pickle"), "junk.bin: cannot be read", id="junk"
        ),
        pytest.param(
            lambda path: save_file(
                {"a": torch.zeros(1, TEXT_WIDTH), "b": torch.zeros(1, TEXT_WIDTH)}, path / "two.safetensors"
            ),
            "two.safetensors: holds no embedding tensor",
            id="two-tensors",
        ),
    ],
)
def test_a_bad_embedding_file_stops_startup_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write: Any, says: str
) -> None:
    write(tmp_path)

    with pytest.raises(AdapterError) as raised:
        load_embeddings(str(tmp_path), TEXT_WIDTH)

    assert says in str(raised.value)
    assert "this must never run" not in capsys.readouterr().out


def test_a_pickle_and_a_safetensors_file_of_one_name_serve_the_safetensors_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A1111 folders often hold EasyNegative.pt beside EasyNegative.safetensors: the worker starts, with one."""
    torch.save({"string_to_param": {"*": torch.ones(1, TEXT_WIDTH)}}, tmp_path / "EasyNegative.pt")
    (tmp_path / "more").mkdir()
    save_file({"emb_params": torch.full((2, TEXT_WIDTH), 2.0)}, tmp_path / "more" / "EasyNegative.safetensors")

    with caplog.at_level(logging.WARNING):
        loaded = load_embeddings(str(tmp_path), TEXT_WIDTH)

    assert list(loaded) == ["EasyNegative"]
    assert torch.equal(loaded["EasyNegative"].vectors, torch.full((2, TEXT_WIDTH), 2.0))
    assert f"{tmp_path / 'EasyNegative.pt'} is not used" in caplog.text


def test_weighting_restores_the_mean_and_never_blows_a_chunk_up() -> None:
    hidden = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = [1.0] * 40 + [1.5] * 37
    weighted = _weighted(hidden, weights)
    assert torch.isclose(weighted.mean(), hidden.mean(), rtol=1e-4)

    balanced = torch.cat([torch.ones(1, 38, 8), -torch.ones(1, 39, 8)], dim=1)  # a mean near zero
    result = _weighted(balanced, [1.0] * 38 + [1.3] * 39)
    assert torch.isfinite(result).all()
    assert result.abs().max() <= 1.3


def test_weights_past_float16_are_refused_naming_the_field_and_weighted_in_float32_below(
    tiny_model_dir: Path,
) -> None:
    """On a float16 worker (a GPU's; float16 runs on the CPU too) a weight that takes a token's vector past 65504 is
    refused, naming the field and the weight; a weight below that is applied in float32 and cast, finite."""
    half = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "DTYPE": "float16"}))

    def generate(**fields: str) -> Generation:
        return half.generate(parse_input({"input": {**FAST, **fields}}, half.settings), timeout_s=600)

    for field in ("prompt", "negative_prompt"):
        with pytest.raises(InputError, match=rf"{field}: its weights \(the largest 1e\+08\) take its text encoding "
                           r"past what torch.float16 holds \(at most 65504\); use smaller weights"):  # fmt: skip
            generate(**{"prompt": "a fox", field: "a (fox:100000000)"})
    weighted = generate(prompt="a (fox:20)")
    assert not weighted.warnings, "finite embeddings, no black image"

    hidden = torch.full((1, 77, 8), 1000.0, dtype=torch.float16)
    weights = [1.0] * 76 + [100.0]  # 100000 in float16 is inf; the chunk, brought back to its mean, is not
    assert torch.isfinite(_weighted(hidden, weights)).all()


@pytest.mark.parametrize(
    ("text", "steps", "expected"),
    [
        ("a [cat:dog:0.5]", 4, [(2, "a cat"), (4, "a dog")]),
        ("a [cat:dog:2]", 4, [(2, "a cat"), (4, "a dog")]),
        ("a [dog:0.5]", 4, [(2, "a "), (4, "a dog")]),
        ("a [cat::0.5]", 4, [(2, "a cat"), (4, "a ")]),
        ("a [cat|dog]", 3, [(1, "a cat"), (2, "a dog"), (3, "a cat")]),
        ("[a:[b|c]:0.5] x", 4, [(2, "a x"), (3, "b x"), (4, "c x")]),
        ("[a:b:0.01]", 20, [(20, "b")]),
        # lark's SIGNED_NUMBER: a sign, an exponent (without a dot a step number: 1e1 is step 10, 5e-1 step 0).
        ("[a:b:+2]", 4, [(2, "a"), (4, "b")]),
        ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),
        ("[a:b:5e-1]", 4, [(4, "b")]),
        ("[a:b:-1]", 4, [(4, "b")]),
        ("[a:b:2.5E-1]", 4, [(1, "a"), (4, "b")]),
        # What A1111's grammar cannot parse, it edits nothing of (get_schedule's LarkError fallback).
        ("masterpiece | best quality, a [cat:dog:0.5]", 4, [(4, "masterpiece | best quality, a [cat:dog:0.5]")]),
        ("(a|b) [cat:dog:2]", 4, [(4, "(a|b) [cat:dog:2]")]),
        ("[a|b:c]", 3, [(3, "[a|b:c]")]),
        ("[a|(b] [cat:dog:2]", 4, [(4, "[a|(b] [cat:dog:2]")]),
        ("a [cat:dog:2] \\", 4, [(4, "a [cat:dog:2] \\")]),
        ("[a|(b:1.2)] \\\\", 2, [(1, "a \\\\"), (2, "(b:1.2) \\\\")]),
        ("a \\| b [cat:dog:2]", 4, [(2, "a \\| b cat"), (4, "a \\| b dog")]),
        ("[a|(b:1.2:3)] [x:y:2]", 4, [(4, "[a|(b:1.2:3)] [x:y:2]")]),  # one colon a round pair in an option
        ("a [cat:dog:2] \\\nb", 4, [(4, "a [cat:dog:2] \\\nb")]),  # a backslash before a line break
        ("[a:b:\u0663]", 4, [(4, "[a:b:\u0663]")]),  # lark's digits are ASCII
        ("[a:b:1e400]", 4, [(4, "a")]),
        ("[a:b:-1e400]", 4, [(4, "b")]),
        # A1111 parses these: options whose round brackets hold bracketed parts.
        (
            "a [cat|(dog, [blurry])], in a [forest:city:0.5]",
            4,
            [
                (1, "a cat, in a forest"),
                (2, "a (dog, [blurry]), in a forest"),
                (3, "a cat, in a city"),
                (4, "a (dog, [blurry]), in a city"),
            ],
        ),
        ("[cat|([dog:wolf:0.5]:1.2)]", 4, [(1, "cat"), (2, "(dog:1.2)"), (3, "cat"), (4, "(wolf:1.2)")]),
        ("(a [cat:dog:0.5]:1.2) [blurry]", 2, [(1, "(a cat:1.2) [blurry]"), (2, "(a dog:1.2) [blurry]")]),
        ("plain [blurry] (x:1.2)", 4, [(4, "plain [blurry] (x:1.2)")]),
        ("\\[a|b\\] [a:b:c] [unclosed|x", 4, [(4, "\\[a|b\\] [a:b:c] [unclosed|x")]),
    ],
)
def test_prompt_editing_schedules_as_a1111(text: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(text, steps) == expected


@pytest.mark.parametrize(
    ("text", "steps", "after", "expected"),
    [
        # A1111's own doctests for hires_steps: a fraction counts from 1.0, a step number from the first pass.
        ("a [b:.5] c", 10, 10, [(10, "a b c")]),
        ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
        ("a [cat:dog:15]", 10, 20, [(10, "a dog")]),
        ("a [cat:dog:25]", 10, 20, [(5, "a cat"), (10, "a dog")]),
        ("a [cat|dog]", 3, 20, [(1, "a cat"), (2, "a dog"), (3, "a cat")]),
    ],
)
def test_the_hires_pass_schedules_as_a1111(text: str, steps: int, after: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(text, steps, after=after) == expected


# --- what prompt editing may cost: nesting, texts, the deadline ------------------------------------------

DEEP = "[" * 500 + "a" + "]" * 500


class _GpuLockTaken:
    """Stands in for the engine's GPU lock: a job that takes it fails, naming the lock."""

    def __enter__(self) -> None:
        raise AssertionError("the job took the GPU lock")

    def __exit__(self, *_exc: object) -> None:
        return None


@pytestmark_worker
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        pytest.param({"prompt": DEEP}, "prompt: square brackets nest 500 deep", id="prompt"),
        pytest.param({"negative_prompt": DEEP}, "negative_prompt: square brackets nest 500 deep", id="negative"),
        pytest.param({"prompt": DEEP, "hires": {"scale": 1.5}}, "prompt: square brackets nest 500 deep", id="hires"),
        pytest.param({"prompt": "[" * 2000}, "prompt: square brackets nest 2000 deep", id="unclosed"),
        pytest.param(
            {"prompt": "a [" + "|".join(f"w{index}" for index in range(65)) + "]", "num_inference_steps": 65},
            "prompt: prompt editing makes 66 distinct texts",
            id="texts",
        ),
        pytest.param(
            {"negative_prompt": "[" + "|".join(f"w{index}" for index in range(64)) + "]", "num_inference_steps": 64},
            "negative_prompt: prompt editing makes 65 distinct texts",
            id="negative-texts",
        ),
        pytest.param(
            # 40 texts in the first pass (always "x"), 30 more in the hires pass (which switches to "y" at its step 10).
            {
                "prompt": "[x:y:50] [" + "|".join(f"w{index}" for index in range(40)) + "]",
                "num_inference_steps": 40,
                "hires": {"scale": 1.5},
            },
            "prompt: prompt editing makes 71 distinct texts",
            id="hires-texts",
        ),
    ],
)
def test_a_prompt_too_costly_to_read_is_refused_before_the_gpu_lock(
    fields: dict[str, Any], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = handler.get_engine()
    with monkeypatch.context() as patch:
        patch.setattr(engine, "_lock", _GpuLockTaken())
        result = run(**fields)

    assert set(result) == {"error"}
    assert result["error"].startswith(f"invalid input: {says}")
    if "texts" in says:
        assert result["error"].endswith("at most 64 (MAX_PROMPT_TEXTS)")
    ok()


def test_nesting_up_to_the_limit_is_read() -> None:
    nested = "[" * 31 + "[cat:dog:0.5]" + "]" * 31
    plan = plan_texts([(nested, "", Span(4))], max_texts=64)

    assert [positive for _, positive, _ in plan.passes[0]] == ["[" * 31 + word + "]" * 31 for word in ("cat", "dog")]
    with pytest.raises(PromptError, match="prompt: square brackets nest 33 deep"):
        plan_texts([("[" + nested + "]", "", Span(4))], max_texts=64)


class _CountingTokenizer:
    """The tiny tokenizer, counting the calls that read its whole vocabulary."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.vocabulary_reads = 0

    def get_vocab(self) -> dict[str, int]:
        self.vocabulary_reads += 1
        return self.inner.get_vocab()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytestmark_worker
def test_the_vocabulary_is_read_once_per_tokenizer(ti_engine: Engine) -> None:
    counting = _CountingTokenizer(tokenizer())
    for text in ("a fox, in the snow", "a tinyfox, (red:1.2)", "BREAK a cat"):
        to_chunks(text, counting, ti_engine.embeddings)

    assert counting.vocabulary_reads == 1


@pytestmark_worker
def test_admission_counts_the_embeddings_of_every_text(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = handler.get_engine()
    # Each text is counted at MAX_PROMPT_CHUNKS chunks of 77 vectors: its length is known only once tokenized.
    per_text = 8 * 77 * engine._pipeline.text_encoder.config.hidden_size * engine.dtype.itemsize
    plain = estimate_peak_bytes(Profile.HIGH, 64, 64, 1, engine.dtype.itemsize, prompt_bytes=2 * per_text)
    monkeypatch.setattr(engine, "profile", Profile.HIGH)
    monkeypatch.setattr(engine, "gpu_bytes", int((plain + 4 * per_text) / 0.95))

    assert "error" not in run(prompt="a fox", negative_prompt="blurry")
    edited = run(prompt="a [" + "|".join(f"w{index}" for index in range(10)) + "]", num_inference_steps=10)

    assert set(edited) == {"error"}
    assert "needs about" in edited["error"]


def test_the_deadline_is_checked_while_the_prompts_are_encoded(tiny_model_dir: Path) -> None:
    engine = load_engine(tiny_model_dir, "float32")
    clock = engine.clock
    assert isinstance(clock, FakeClock)

    def slow_text(_call: int, _inputs: Any, output: Any) -> Any:
        clock.advance(10)  # each text takes 10 s of the 35 s allowed
        return output

    unet_calls: list[int] = []
    prompt = "a [" + "|".join(f"w{index}" for index in range(10)) + "]"
    request = parse_input({"input": {"prompt": prompt, **FAST, "num_inference_steps": 10}}, engine.settings)
    with (
        injected(engine._pipeline.text_encoder, slow_text),
        injected(engine._pipeline.unet, lambda call, _inputs, output: unet_calls.append(call) or output),
        pytest.raises(GenerationTimeoutError) as raised,
    ):
        engine.generate(request, timeout_s=35)

    assert str(raised.value) == (
        "generation stopped: it ran past GENERATION_TIMEOUT_SECONDS=35 while encoding the prompts (4 of 11 texts)"
    )
    assert unet_calls == []


@pytestmark_worker
def test_prompt_editing_switches_the_prompt_during_the_run() -> None:
    steps = {"num_inference_steps": 4}
    cat, dog = ok(prompt="a cat", **steps), ok(prompt="a dog", **steps)
    switched = ok(prompt="a [cat:dog:0.5]", **steps)
    alternating = ok(prompt="a [cat|dog]", **steps)

    for edited in (switched, alternating):
        assert not same_image(edited, cat)
        assert not same_image(edited, dog)
    assert same_image(ok(prompt="a [cat:dog:1.0]", **steps), cat), "switching after the last step: never"
    assert same_image(ok(prompt="a [cat:dog:0.5]", **steps), switched)


# --- prompt editing, against pictures made without it ----------------------------------------------

EditSchedule = Callable[[int], tuple[str, str]]


def bare(pipeline_class: type[Any], scheduler_name: str = "DPM++ 2M Karras") -> Any:
    """A bare diffusers pipeline on the worker's weights, with the worker's default scheduler (or
    ``scheduler_name``), its input image encoded at the VAE's mean."""
    base = handler.get_engine()._pipeline
    scheduler = make_scheduler(scheduler_name, base.scheduler.config)
    components = {**base.components, "scheduler": scheduler}
    pipeline = encoding_at_the_vae_mean(pipeline_class)(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def by_hand(pipeline: Any, texts: EditSchedule, images: int, **arguments: Any) -> Any:
    """``pipeline`` called with the texts ``texts(index)`` gives for each step (index from 0), encoded by
    diffusers' own ``encode_prompt`` and swapped in by a ``callback_on_step_end`` written here."""

    def embeds(index: int, copies: int) -> torch.Tensor:
        """The negatives, then the prompts, ``copies`` of each: as the pipeline lays them out for guidance."""
        positive, negative = texts(index)
        encoded = pipeline.encode_prompt(positive, "cpu", copies, True, negative_prompt=negative)
        return torch.cat([encoded[1], encoded[0]])

    def swap(_pipeline: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        tensors["prompt_embeds"] = embeds(index + 1, images)
        return tensors

    negative, positive = embeds(0, 1)
    return pipeline(
        prompt_embeds=positive[None],
        negative_prompt_embeds=negative[None],
        num_images_per_prompt=images,
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        **arguments,
    ).images


def seeded(seed: int, images: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + index) for index in range(images)]


def all_pixels(result: dict[str, Any]) -> list[np.ndarray]:
    return [np.asarray(decode_png(item["image"]), dtype=np.int16) for item in result["images"]]


def same_as(result: dict[str, Any], images: list[Any]) -> bool:
    expected = [np.asarray(image, dtype=np.int16) for image in images]
    return all(np.array_equal(a, b) for a, b in zip(all_pixels(result), expected, strict=True))


@pytestmark_worker
@pytest.mark.parametrize(
    ("edited", "plain"),
    [
        pytest.param({"prompt": "a [cat:dog:0]"}, {"prompt": "a dog"}, id="to-from-the-start"),
        pytest.param({"prompt": "a [cat:dog:4]"}, {"prompt": "a cat"}, id="after-the-last-step"),
        pytest.param({"prompt": "a [cat:dog:0]", "num_images": 2}, {"prompt": "a dog", "num_images": 2}, id="batch"),
        pytest.param({"negative_prompt": "[blurry:ugly:0]"}, {"negative_prompt": "ugly"}, id="negative-from-the-start"),
        pytest.param(
            {"prompt": "a [cat:dog:0]", "hires": {"scale": 1.5, "steps": 3}},
            {"prompt": "a dog", "hires": {"scale": 1.5, "steps": 3}},
            id="hires",
        ),
    ],
)
def test_an_edit_that_never_switches_is_the_plain_texts_image(edited: dict[str, Any], plain: dict[str, Any]) -> None:
    assert same_as(
        ok(num_inference_steps=4, **edited),
        [decode_png(item["image"]) for item in ok(num_inference_steps=4, **plain)["images"]],
    )


def cat_then_dog(last_cat: int, negative: str = "") -> EditSchedule:
    return lambda index: ("a cat" if index <= last_cat else "a dog", negative)


@pytestmark_worker
@pytest.mark.parametrize("images", [1, 2], ids=["one", "batch"])
def test_an_edit_at_step_k_switches_where_a1111_does(images: int) -> None:
    # A1111 compares its denoiser's step counter (from 0) with the text's last step: "[cat:dog:2]" at 4 steps
    # draws cat at steps 0, 1 and 2 and dog at step 3.
    result = ok(prompt="a [cat:dog:2]", num_inference_steps=4, num_images=images)

    expected = by_hand(
        bare(StableDiffusionPipeline),
        cat_then_dog(2),
        images,
        width=64,
        height=64,
        num_inference_steps=4,
        generator=seeded(5, images),
    )
    assert same_as(result, expected)


@pytestmark_worker
@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "DPM2 a Karras"])
@pytest.mark.parametrize(
    ("prompt", "texts"),
    [
        # Over 4 steps' 8 calls (7 made: two a step, one at the last), "[cat:dog:3]" is cat for calls 0 to 3.
        pytest.param("a [cat:dog:3]", cat_then_dog(3), id="step"),
        pytest.param("a [cat:dog:0.25]", cat_then_dog(2), id="fraction"),
        # The text of step k serves its index k too (A1111's end_at_step from 1): cat, cat, dog, cat, dog...
        pytest.param("a [cat|dog]", lambda index: (("a cat", "a dog")[max(index - 1, 0) % 2], ""), id="alternation"),
    ],
)
def test_a_second_order_sampler_edits_by_model_call_as_a1111(sampler: str, prompt: str, texts: EditSchedule) -> None:
    """A1111 counts a second-order sampler's model calls (its denoiser's step counter), over twice the steps
    (SamplerData.total_steps); each iteration of diffusers' Heun and KDPM2 pipelines is one call, in order."""
    result = ok(prompt=prompt, num_inference_steps=4, scheduler=sampler)

    expected = by_hand(
        bare(StableDiffusionPipeline, sampler),
        texts,
        1,
        width=64,
        height=64,
        num_inference_steps=4,
        generator=seeded(5, 1),
    )
    assert same_as(result, expected)


@pytestmark_worker
def test_an_edit_in_the_negative_prompt_switches_where_a1111_does() -> None:
    result = ok(prompt="a fox", negative_prompt="[blurry:ugly:0.5]", num_inference_steps=4)

    expected = by_hand(
        bare(StableDiffusionPipeline),
        lambda index: ("a fox", "blurry" if index <= 2 else "ugly"),
        1,
        width=64,
        height=64,
        num_inference_steps=4,
        generator=seeded(5, 1),
    )
    assert same_as(result, expected)


@pytestmark_worker
@pytest.mark.parametrize(
    ("prompt", "hires_last_cat"),
    [
        # After 4 first-pass steps, A1111 1.6+ counts the hires pass on from step 4: "[cat:dog:4]" is dog throughout
        # it, "[cat:dog:6]" is cat at its steps 0 to 2 and dog at step 3.
        pytest.param("a [cat:dog:4]", -1, id="switched-before-hires"),
        pytest.param("a [cat:dog:6]", 2, id="switches-in-hires"),
    ],
)
def test_the_hires_pass_runs_its_steps_and_edits_as_a1111(prompt: str, hires_last_cat: int) -> None:
    result = ok(prompt=prompt, num_inference_steps=4, hires={"scale": 1.5, "steps": 4, "strength": 0.5})

    latents = by_hand(
        bare(StableDiffusionPipeline),
        cat_then_dog(3),
        1,
        width=64,
        height=64,
        num_inference_steps=4,
        generator=seeded(5, 1),
        output_type="latent",
    )
    # A1111's Latent upscaler, then its sample_hr_pass: exactly 4 steps, the last 4 of a schedule of 4 / 0.5 = 8.
    enlarged = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear", antialias=False)
    expected = by_hand(
        bare(StableDiffusionImg2ImgPipeline),
        cat_then_dog(hires_last_cat),
        1,
        image=enlarged,
        strength=0.5,
        num_inference_steps=8,
        generator=seeded(5, 1),  # as A1111's new ImageRNG for its hires pass: the seed's first draw
    )
    assert same_as(result, expected)
    assert result["metadata"]["hires"]["steps"] == 4


@pytestmark_worker
def test_img2img_edits_over_the_steps_asked_for_as_a1111() -> None:
    # A1111's img2img schedules the prompt over all 8 steps asked for and counts from the first step it runs:
    # "[cat:dog:0.25]" is cat for the run's steps 0 to 2 and dog for steps 3 and 4 (it runs int(8 x 0.5) + 1 = 5,
    # which diffusers runs at strength 0.625).
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    result = ok(prompt="a [cat:dog:0.25]", image=png_base64(image), num_inference_steps=8, strength=0.5)

    expected = by_hand(
        bare(StableDiffusionImg2ImgPipeline),
        cat_then_dog(2),
        1,
        image=image,
        strength=0.625,
        num_inference_steps=8,
        generator=seeded(5, 1),
    )
    assert same_as(result, expected)


@pytestmark_worker
def test_embeddings_through_the_handler(
    ti_engine: Engine, embeddings_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handler, "_engine", ti_engine)

    result = ok(prompt="a (tinyfox:1.2) in the snow", negative_prompt="a1111style")

    digests = {
        "tinyfox": a1111_ti_hash(embeddings_dir / "tinyfox.safetensors"),
        "a1111style": a1111_ti_hash(embeddings_dir / "styles" / "a1111style.pt"),
    }
    assert result["metadata"]["embeddings"] == digests
    parameters = decode_png(result["images"][0]["image"]).text["parameters"]
    assert f'TI hashes: "tinyfox: {digests["tinyfox"]}, a1111style: {digests["a1111style"]}"' in parameters
    assert "embeddings" not in ok(prompt="a fox")["metadata"]
