"""The request contract (src/schema/): every rule, its message, and the defaults.

Pure pydantic: no model and no torch, except the scheduler-mapping tests at the
end, which build real diffusers schedulers on the CPU.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from src.schema import (
    CONFIGURED_DEFAULT,
    CONFIGURED_MAXIMUM,
    SCHEDULER_ALIASES,
    SCHEDULER_NAMES,
    GenerateRequest,
    InputError,
    ModelDownload,
    canonical_scheduler,
    check_limits,
    parse_input,
    resolve_size,
)
from src.settings import Settings, SettingsError, load_settings

LIMITS = load_settings({})
PROMPT = {"prompt": "a fox in the snow"}
ALL_FIELDS = (
    "prompt, negative_prompt, width, height, num_inference_steps, guidance_scale, seed, subseed, subseed_strength, "
    "seed_resize_from_w, seed_resize_from_h, num_images, scheduler"
)


def parse(data: Any, limits: Settings = LIMITS) -> GenerateRequest:
    return parse_input({"input": data}, limits)


def error_of(data: Any, limits: Settings = LIMITS) -> str:
    with pytest.raises(InputError) as caught:
        parse(data, limits)
    return str(caught.value)


def with_prompt(**fields: Any) -> dict[str, Any]:
    return {**PROMPT, **fields}


# (input, field the message must name, exact text it must contain: value and rule where the value is short)
BAD_INPUTS = [
    # prompt
    pytest.param({}, "prompt", "prompt: required", id="prompt-missing"),
    pytest.param({"prompt": ""}, "prompt", "prompt='': must not be blank", id="prompt-empty"),
    pytest.param({"prompt": "   "}, "prompt", "prompt='   ': must not be blank", id="prompt-spaces"),
    pytest.param({"prompt": " \t\n "}, "prompt", ": must not be blank", id="prompt-whitespace"),
    pytest.param({"prompt": 42}, "prompt", "prompt=42: must be a valid string", id="prompt-int"),
    pytest.param({"prompt": ["a fox"]}, "prompt", "prompt=['a fox']: must be a valid string", id="prompt-list"),
    pytest.param({"prompt": None}, "prompt", "prompt=None: must be a valid string", id="prompt-null"),
    pytest.param({"prompt": "x" * 2001}, "prompt", "must have at most 2000 characters", id="prompt-2001-chars"),
    # negative_prompt
    pytest.param(
        with_prompt(negative_prompt="n" * 2001),
        "negative_prompt",
        "must have at most 2000 characters",
        id="negative-2001-chars",
    ),
    pytest.param(
        with_prompt(negative_prompt=5),
        "negative_prompt",
        "negative_prompt=5: must be a valid string",
        id="negative-int",
    ),
    pytest.param(
        with_prompt(negative_prompt=None),
        "negative_prompt",
        "negative_prompt=None: must be a valid string",
        id="negative-null",
    ),
    # width and height
    pytest.param(with_prompt(width=500), "width", "width=500: must be a multiple of 64", id="width-500"),
    pytest.param(with_prompt(width=0), "width", "width=0: must be greater than or equal to 64", id="width-0"),
    pytest.param(with_prompt(width=-64), "width", "width=-64: must be greater than or equal to 64", id="width-neg"),
    pytest.param(with_prompt(width=1088), "width", "width=1088: must be at most 1024 (MAX_SIDE)", id="width-1088"),
    pytest.param(with_prompt(width=2048), "width", "width=2048: must be at most 1024 (MAX_SIDE)", id="width-2048"),
    pytest.param(with_prompt(width=True), "width", "width=True: must be a valid integer", id="width-bool"),
    pytest.param(with_prompt(width=512.5), "width", "width=512.5: must be a valid integer", id="width-512.5"),
    pytest.param(with_prompt(width=512.0), "width", "width=512.0: must be a valid integer", id="width-512.0"),
    pytest.param(with_prompt(width="512"), "width", "width='512': must be a valid integer", id="width-str"),
    pytest.param(with_prompt(width=None), "width", "width=None: must be a valid integer", id="width-null"),
    pytest.param(with_prompt(height=500), "height", "height=500: must be a multiple of 64", id="height-500"),
    pytest.param(with_prompt(height=0), "height", "height=0: must be greater than or equal to 64", id="height-0"),
    pytest.param(with_prompt(height=1088), "height", "height=1088: must be at most 1024 (MAX_SIDE)", id="height-1088"),
    pytest.param(with_prompt(height=True), "height", "height=True: must be a valid integer", id="height-bool"),
    pytest.param(with_prompt(height="512"), "height", "height='512': must be a valid integer", id="height-str"),
    # num_inference_steps
    pytest.param(
        with_prompt(num_inference_steps=0),
        "num_inference_steps",
        "num_inference_steps=0: must be greater than or equal to 1",
        id="steps-0",
    ),
    pytest.param(
        with_prompt(num_inference_steps=-1),
        "num_inference_steps",
        "num_inference_steps=-1: must be greater than or equal to 1",
        id="steps-neg",
    ),
    pytest.param(
        with_prompt(num_inference_steps=151),
        "num_inference_steps",
        "num_inference_steps=151: must be at most 150 (MAX_STEPS)",
        id="steps-151",
    ),
    pytest.param(
        with_prompt(num_inference_steps=1.5),
        "num_inference_steps",
        "num_inference_steps=1.5: must be a valid integer",
        id="steps-float",
    ),
    pytest.param(
        with_prompt(num_inference_steps=True),
        "num_inference_steps",
        "num_inference_steps=True: must be a valid integer",
        id="steps-bool",
    ),
    pytest.param(
        with_prompt(num_inference_steps="25"),
        "num_inference_steps",
        "num_inference_steps='25': must be a valid integer",
        id="steps-str",
    ),
    # guidance_scale
    pytest.param(
        with_prompt(guidance_scale=-0.1),
        "guidance_scale",
        "guidance_scale=-0.1: must be greater than or equal to 0",
        id="guidance-neg",
    ),
    pytest.param(
        with_prompt(guidance_scale=30.5),
        "guidance_scale",
        "guidance_scale=30.5: must be less than or equal to 30",
        id="guidance-30.5",
    ),
    pytest.param(
        with_prompt(guidance_scale=math.nan),
        "guidance_scale",
        "guidance_scale=nan: must be a finite number",
        id="guidance-nan",
    ),
    pytest.param(
        with_prompt(guidance_scale=math.inf),
        "guidance_scale",
        "guidance_scale=inf: must be a finite number",
        id="guidance-inf",
    ),
    pytest.param(
        with_prompt(guidance_scale=-math.inf),
        "guidance_scale",
        "guidance_scale=-inf: must be a finite number",
        id="guidance-neg-inf",
    ),
    pytest.param(
        with_prompt(guidance_scale=True),
        "guidance_scale",
        "guidance_scale=True: must be a valid number",
        id="guidance-bool",
    ),
    pytest.param(
        with_prompt(guidance_scale="7.5"),
        "guidance_scale",
        "guidance_scale='7.5': must be a valid number",
        id="guidance-str",
    ),
    pytest.param(
        with_prompt(guidance_scale=None),
        "guidance_scale",
        "guidance_scale=None: must be a valid number",
        id="guidance-null",
    ),
    # seed
    pytest.param(
        with_prompt(seed=-2), "seed", "seed=-2: must be 0 to 4294967295, or -1 or null for a random seed", id="seed-neg"
    ),
    pytest.param(with_prompt(seed=2**32), "seed", "seed=4294967296: must be 0 to 4294967295", id="seed-2**32"),
    pytest.param(with_prompt(seed=1.5), "seed", "seed=1.5: must be a valid integer", id="seed-float"),
    pytest.param(with_prompt(seed=True), "seed", "seed=True: must be a valid integer", id="seed-bool"),
    pytest.param(with_prompt(seed="42"), "seed", "seed='42': must be a valid integer", id="seed-str"),
    # num_images
    pytest.param(
        with_prompt(num_images=0), "num_images", "num_images=0: must be greater than or equal to 1", id="images-0"
    ),
    pytest.param(
        with_prompt(num_images=5), "num_images", "num_images=5: must be at most 4 (MAX_IMAGES)", id="images-5"
    ),
    pytest.param(
        with_prompt(num_images=True), "num_images", "num_images=True: must be a valid integer", id="images-bool"
    ),
    pytest.param(with_prompt(num_images=2.0), "num_images", "num_images=2.0: must be a valid integer", id="images-2.0"),
    # width x height x num_images
    pytest.param(
        with_prompt(width=1024, height=1024, num_images=2),
        "num_images",
        "width x height x num_images = 1024 x 1024 x 2 = 2097152 pixels: must be at most 1048576 (MAX_PIXELS)",
        id="pixels-1024x1024x2",
    ),
    pytest.param(
        with_prompt(width=768, height=768, num_images=2),
        "num_images",
        "= 1179648 pixels: must be at most 1048576 (MAX_PIXELS)",
        id="pixels-768x768x2",
    ),
    # scheduler
    pytest.param(
        with_prompt(scheduler="foo"), "scheduler", "scheduler='foo': unknown scheduler; The", id="scheduler-foo"
    ),
    pytest.param(with_prompt(scheduler=""), "scheduler", "scheduler='': unknown scheduler; The", id="scheduler-empty"),
    pytest.param(with_prompt(scheduler=3), "scheduler", "scheduler=3: must be a valid string", id="scheduler-int"),
    pytest.param(
        with_prompt(scheduler=None), "scheduler", "scheduler=None: must be a valid string", id="scheduler-null"
    ),
    # unknown fields
    pytest.param(with_prompt(steps=30), "steps", "steps=30: unknown field; the fields are: ", id="unknown-steps"),
    pytest.param({"Prompt": "a fox"}, "Prompt", "Prompt='a fox': unknown field", id="unknown-Prompt"),
    pytest.param(with_prompt(cfg=7), "cfg", "cfg=7: unknown field", id="unknown-cfg"),
    pytest.param(
        with_prompt(subseed_strength=0.5, seed_resize_from_w=64, seed_resize_from_h=8),
        "seed_resize_from_h",
        "seed_resize_from_h=8 with subseed_strength=0.5: must be at least 16 (two rows of latents)",
        id="seed-resize-one-latent-row",  # A1111's slerp would divide by zero: NaN noise
    ),
]


@pytest.mark.parametrize(("bad", "field", "expected"), BAD_INPUTS)
def test_bad_input_is_refused_with_field_and_rule(bad: dict[str, Any], field: str, expected: str) -> None:
    message = error_of(bad)
    assert message.startswith("invalid input: ")
    assert field in message
    assert expected in message


def test_bad_input_table_is_large_and_distinct() -> None:
    assert len(BAD_INPUTS) >= 35
    assert len({param.id for param in BAD_INPUTS}) == len(BAD_INPUTS)


def test_unknown_field_message_lists_the_real_fields() -> None:
    assert f"unknown field; the fields are: {ALL_FIELDS}" in error_of(with_prompt(steps=30))


def test_misspelled_prompt_is_unknown_and_prompt_still_required() -> None:
    message = error_of({"Prompt": "a fox"})
    assert "prompt: required" in message
    assert "Prompt='a fox': unknown field" in message


def test_every_bad_field_is_named_in_one_message() -> None:
    bad = {
        "prompt": "",
        "negative_prompt": 1,
        "width": 500,
        "height": 2048,
        "num_inference_steps": 0,
        "guidance_scale": "high",
        "seed": -5,
        "num_images": 9,
        "scheduler": "foo",
        "steps": 30,
    }
    message = error_of(bad)
    for field in bad:
        assert f"{field}=" in message, field
    assert message.count("; ") >= len(bad) - 1
    assert "more problems" not in message


def test_thousands_of_unknown_fields_give_a_short_error() -> None:
    bad = with_prompt(**{f"extra_{index:04d}": "v" * 1000 for index in range(3000)})
    message = error_of(bad)
    assert len(message) <= 2048
    assert message.startswith("invalid input: extra_0000='vvv")
    assert "extra_0001='vvv" in message
    assert "v" * 100 not in message
    assert message.count("the fields are: ") == 1
    assert message.count(ALL_FIELDS) == 1
    shown = message.count(": unknown field")
    assert 5 <= shown < 3000
    assert f"... and {3000 - shown} more problems" in message


def test_every_field_wrong_with_huge_names_and_values_still_fits() -> None:
    huge = "x" * 100_000
    bad = {
        "prompt": huge,
        "negative_prompt": huge,
        "width": 500,
        "height": 2048,
        "num_inference_steps": huge,
        "guidance_scale": huge,
        "seed": huge,
        "num_images": huge,
        "scheduler": huge,
        "output_format": huge,
        "output_quality": huge,
        "output_type": huge,
        **{f"{index}{huge}": [huge] * 10 for index in range(1000)},
    }
    message = error_of(bad)
    assert len(message) <= 2048
    assert "x" * 100 not in message
    assert message.startswith("invalid input: prompt='xxx")
    assert "negative_prompt=" in message
    assert "more problems" in message


def test_long_bad_value_is_abbreviated() -> None:
    message = error_of({"prompt": "x" * 10_000})
    assert len(message) < 300
    assert "x" * 100 not in message
    assert "must have at most 2000 characters" in message


def test_bad_scheduler_message_lists_every_name() -> None:
    message = error_of(with_prompt(scheduler="Euler b"))
    for name in SCHEDULER_NAMES:
        assert name in message
    assert f"The schedulers are: {', '.join(SCHEDULER_NAMES)}" in message


@pytest.mark.parametrize(
    ("job", "mentions"),
    [
        pytest.param(None, "job", id="none"),
        pytest.param([{"input": PROMPT}], "job", id="list"),
        pytest.param("a fox", "job", id="string"),
        pytest.param({}, "input", id="no-input"),
        pytest.param({"inputs": PROMPT}, "input", id="misspelled-input"),
        pytest.param({"input": None}, "input", id="input-null"),
        pytest.param({"input": "a fox"}, "input", id="input-string"),
        pytest.param({"input": [1, 2]}, "input", id="input-list"),
        pytest.param({"input": 5}, "input", id="input-int"),
    ],
)
def test_broken_job_is_refused(job: Any, mentions: str) -> None:
    with pytest.raises(InputError, match=mentions):
        parse_input(job, LIMITS)


def test_input_of_wrong_type_says_what_it_got() -> None:
    with pytest.raises(InputError, match=r"^input='a fox': must be an object .* got str$"):
        parse("a fox")
    with pytest.raises(InputError, match=r"got null$"):
        parse(None)


def test_defaults() -> None:
    request = parse({"prompt": "a fox"})
    assert request.prompt == "a fox"
    assert request.negative_prompt == ""
    assert (request.width, request.height) == (512, 512)
    assert request.num_inference_steps == 25
    assert request.guidance_scale == 7.5
    assert request.num_images == 1
    assert request.scheduler == "DPM++ 2M Karras"
    assert request.seed is not None
    assert 0 <= request.seed < 2**32


def test_full_valid_request_is_kept() -> None:
    data = {
        "prompt": "a fox",
        "negative_prompt": "blurry",
        "width": 640,
        "height": 384,
        "num_inference_steps": 30,
        "guidance_scale": 5.5,
        "seed": 42,
        "num_images": 2,
        "scheduler": "Euler a",
        "output_format": "webp",
        "output_quality": 70,
        "output_type": "base64",
    }
    assert parse(data).model_dump(include=set(data)) == data
    assert parse(data).task == "txt2img"


def test_integer_guidance_scale_becomes_float() -> None:
    request = parse(with_prompt(guidance_scale=7))
    assert request.guidance_scale == 7.0
    assert isinstance(request.guidance_scale, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("width", 64, id="width-64"),
        pytest.param("width", 1024, id="width-1024"),
        pytest.param("height", 64, id="height-64"),
        pytest.param("height", 1024, id="height-1024"),
        pytest.param("num_inference_steps", 1, id="steps-1"),
        pytest.param("num_inference_steps", 150, id="steps-150"),
        pytest.param("guidance_scale", 0, id="guidance-0"),
        pytest.param("guidance_scale", 0.0, id="guidance-0.0"),
        pytest.param("guidance_scale", 30, id="guidance-30"),
        pytest.param("seed", 0, id="seed-0"),
        pytest.param("seed", 4294967295, id="seed-max"),
        pytest.param("num_images", 4, id="images-4"),
        pytest.param("negative_prompt", "n" * 2000, id="negative-2000-chars"),
        pytest.param("prompt", "x" * 2000, id="prompt-2000-chars"),
    ],
)
def test_boundary_is_accepted(field: str, value: Any) -> None:
    request = parse({**PROMPT, field: value})
    assert getattr(request, field) == value


def test_largest_request_within_max_pixels_is_accepted() -> None:
    request = parse(with_prompt(width=1024, height=1024, num_images=1))
    assert request.width * request.height * request.num_images == LIMITS.max_pixels
    request = parse(with_prompt(width=512, height=512, num_images=4))
    assert len(request.seeds) == 4


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(PROMPT, id="absent"),
        pytest.param(with_prompt(seed=None), id="null"),
        pytest.param(with_prompt(seed=-1), id="minus-one"),
    ],
)
def test_random_seed_is_drawn(data: dict[str, Any]) -> None:
    seeds = {parse(data).seed for _ in range(3)}
    assert all(seed is not None and 0 <= seed < 2**32 for seed in seeds)
    assert len(seeds) > 1  # three equal draws from 2**32 would be a broken generator


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        pytest.param("euler A", "Euler a", id="euler-A"),
        pytest.param("dpm++ 2m karras", "DPM++ 2M Karras", id="lowercase"),
        pytest.param("DPM++ 2M SDE KARRAS", "DPM++ 2M SDE Karras", id="uppercase"),
        pytest.param("unipc", "UniPC", id="unipc"),
        pytest.param("  DDIM  ", "DDIM", id="padded"),
    ],
)
def test_scheduler_matched_without_case(given: str, canonical: str) -> None:
    assert parse(with_prompt(scheduler=given)).scheduler == canonical
    assert canonical_scheduler(given) == canonical


def test_every_canonical_name_maps_to_itself() -> None:
    for name in SCHEDULER_NAMES:
        assert canonical_scheduler(name) == name


# k-diffusion names as A1111 spells them internally, and ComfyUI's sampler_name values,
# alone or joined to ComfyUI's scheduler "karras".
SCHEDULER_SPELLINGS = {
    "Euler a": ["euler_a", "k_euler_a", "euler_ancestral", "k_euler_ancestral", "Euler Ancestral", "EULER-A"],
    "Euler": ["euler", "k_euler"],
    "Heun": ["heun", "k_heun"],
    "DPM2": ["dpm_2", "k_dpm_2", "dpm2"],
    "DPM2 a": ["dpm_2_ancestral", "k_dpm_2_a", "k_dpm_2_ancestral", "dpm2_a", "dpm_2_a"],
    "DPM2 Karras": ["k_dpm_2_ka", "dpm_2_karras", "dpm_2 karras"],
    "DPM2 a Karras": ["k_dpm_2_a_ka", "dpm_2_ancestral_karras", "DPM2 a (Karras)"],
    "LMS": ["lms", "k_lms"],
    "LMS Karras": ["lms_karras", "k_lms_karras", "k_lms_ka", "lms karras"],
    "DPM++ 2M": ["dpmpp_2m", "k_dpmpp_2m", "dpm++_2m", "DPMPP 2M"],
    "DPM++ 2M Karras": [
        "dpmpp_2m_karras",
        "k_dpmpp_2m_karras",
        "k_dpmpp_2m_ka",
        "dpmpp_2m karras",
        "dpmpp_2m:karras",
        "DPM++ 2M (Karras)",
        "dpm++_2m_karras",
    ],
    "DPM++ 2M SDE": ["dpmpp_2m_sde", "k_dpmpp_2m_sde"],
    "DPM++ 2M SDE Karras": ["dpmpp_2m_sde_karras", "k_dpmpp_2m_sde_karras", "k_dpmpp_2m_sde_ka", "dpmpp_2m_sde karras"],
    "DDIM": ["ddim"],
    "PNDM": ["pndm", "plms", "PLMS"],
    "UniPC": ["uni_pc", "unipc", "UNI-PC"],
}


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        pytest.param(alias, canonical, id=alias)
        for canonical, aliases in SCHEDULER_SPELLINGS.items()
        for alias in aliases
    ],
)
def test_scheduler_alias_becomes_the_canonical_name(alias: str, canonical: str) -> None:
    assert canonical_scheduler(alias) == canonical
    assert canonical_scheduler(f"  {alias.upper()} ") == canonical
    assert parse(with_prompt(scheduler=alias)).scheduler == canonical


def test_every_listed_alias_reaches_its_own_canonical_name() -> None:
    """Spellings are folded (case, spaces, underscores, hyphens); no two may fold onto different names."""
    assert set(SCHEDULER_ALIASES.values()) <= set(SCHEDULER_NAMES)
    for alias, canonical in SCHEDULER_ALIASES.items():
        assert canonical_scheduler(alias) == canonical, alias
    assert canonical_scheduler("DPM2") != canonical_scheduler("DPM2 a")
    assert canonical_scheduler("Euler") != canonical_scheduler("Euler a")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("jpg", "jpeg"),
        ("JPG", "jpeg"),
        ("jpe", "jpeg"),
        ("jpeg", "jpeg"),
        (" Jpeg ", "jpeg"),
        ("png", "png"),
        ("PNG", "png"),
        ("webp", "webp"),
        ("WebP", "webp"),
    ],
)
def test_output_format_alias_becomes_the_canonical_name(given: str, canonical: str) -> None:
    assert parse(with_prompt(output_format=given)).output_format == canonical


def test_output_format_schema_lists_only_canonical_names() -> None:
    prop = GenerateRequest.model_json_schema()["properties"]["output_format"]
    assert prop["enum"] == ["png", "jpeg", "webp"]
    assert "jpg" in prop["description"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"scheduler": "Eulr a"},
            "scheduler='Eulr a': unknown scheduler; did you mean 'Euler a'? The schedulers are: DPM++ 2M, ",
            id="eulr-a",
        ),
        pytest.param({"scheduler": "dpmpp_2m_karas"}, "did you mean 'DPM++ 2M Karras'?", id="comfy-typo"),
        pytest.param({"scheduler": "euler_ancestrl"}, "did you mean 'Euler a'?", id="alias-typo"),
        pytest.param({"scheduler": "k_heunn"}, "did you mean 'Heun'?", id="k-heunn"),
        pytest.param(
            {"output_format": "pnj"},
            "output_format='pnj': unknown output format; did you mean 'png'? The output formats are: png, jpeg, webp",
            id="pnj",
        ),
        pytest.param({"output_format": "jgp"}, "did you mean 'jpeg'?", id="jgp"),
    ],
)
def test_unknown_name_suggests_the_closest(fields: dict[str, Any], expected: str) -> None:
    assert expected in error_of(with_prompt(**fields))


@pytest.mark.parametrize("fields", [{"scheduler": "foo"}, {"output_format": "gif"}], ids=["scheduler", "format"])
def test_unknown_name_with_nothing_close_suggests_nothing(fields: dict[str, Any]) -> None:
    message = error_of(with_prompt(**fields))
    assert "unknown" in message
    assert "did you mean" not in message


def test_default_scheduler_may_be_an_alias() -> None:
    limits = load_settings({"DEFAULT_SCHEDULER": "k_dpmpp_2m_karras"})
    check_limits(limits)
    assert parse(PROMPT, limits).scheduler == "DPM++ 2M Karras"


@pytest.mark.parametrize(
    ("seed", "num_images", "seeds"),
    [
        pytest.param(42, 1, [42], id="one"),
        pytest.param(42, 3, [42, 43, 44], id="three"),
        pytest.param(4294967295, 3, [4294967295, 0, 1], id="wraps"),
        pytest.param(4294967294, 2, [4294967294, 4294967295], id="reaches-max"),
        pytest.param(0, 4, [0, 1, 2, 3], id="zero"),
    ],
)
def test_seeds_are_consecutive_and_wrap(seed: int, num_images: int, seeds: list[int]) -> None:
    assert parse(with_prompt(seed=seed, num_images=num_images)).seeds == seeds


def test_request_is_frozen() -> None:
    request = parse(PROMPT)
    with pytest.raises(ValueError, match="frozen"):
        request.width = 1024  # type: ignore[misc]


def test_model_needs_limits() -> None:
    with pytest.raises(RuntimeError, match="parse_input"):
        GenerateRequest.model_validate(PROMPT)


def test_configured_fields_name_real_settings() -> None:
    for field, setting in {**CONFIGURED_MAXIMUM, **CONFIGURED_DEFAULT}.items():
        assert field in GenerateRequest.model_fields
        assert setting in Settings.model_fields


# Limits from settings, not from constants in the schema.
CUSTOM = load_settings(
    {
        "MAX_SIDE": "768",
        "MAX_STEPS": "50",
        "MAX_IMAGES": "2",
        "MAX_PIXELS": str(768 * 768),
        "DEFAULT_STEPS": "30",
        "DEFAULT_SCHEDULER": "euler a",
    }
)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        pytest.param(with_prompt(width=832), "width=832: must be at most 768 (MAX_SIDE)", id="width"),
        pytest.param(with_prompt(height=1024), "height=1024: must be at most 768 (MAX_SIDE)", id="height"),
        pytest.param(
            with_prompt(num_inference_steps=51), "num_inference_steps=51: must be at most 50 (MAX_STEPS)", id="steps"
        ),
        pytest.param(with_prompt(num_images=3), "num_images=3: must be at most 2 (MAX_IMAGES)", id="images"),
        pytest.param(
            with_prompt(width=768, height=768, num_images=2),
            "= 1179648 pixels: must be at most 589824 (MAX_PIXELS)",
            id="pixels",
        ),
    ],
)
def test_custom_limits_are_enforced(bad: dict[str, Any], expected: str) -> None:
    assert expected in error_of(bad, CUSTOM)


def test_custom_limits_accept_their_maximum() -> None:
    request = parse(with_prompt(width=768, height=768, num_inference_steps=50), CUSTOM)
    assert (request.width, request.height, request.num_inference_steps) == (768, 768, 50)
    request = parse(with_prompt(width=384, height=768, num_images=2), CUSTOM)
    assert request.num_images == 2


def test_custom_defaults_come_from_settings() -> None:
    request = parse(PROMPT, CUSTOM)
    assert request.num_inference_steps == 30
    assert request.scheduler == "Euler a"


def test_request_overrides_configured_defaults() -> None:
    request = parse(with_prompt(num_inference_steps=10, scheduler="DDIM"), CUSTOM)
    assert (request.num_inference_steps, request.scheduler) == (10, "DDIM")


def test_max_side_cannot_be_set_below_the_default_size() -> None:
    """A bare request is 512x512, so MAX_SIDE below 512 would refuse every request that gives no size."""
    with pytest.raises(SettingsError, match="MAX_SIDE='256': must be greater than or equal to 512"):
        load_settings({"MAX_SIDE": "256"})


@pytest.mark.parametrize("name", ["foo", "", "Euler b"])
def test_unknown_default_scheduler_is_refused_at_startup(name: str) -> None:
    with pytest.raises(ValueError, match=f"DEFAULT_SCHEDULER={name!r}: unknown scheduler; .*The schedulers are: DPM"):
        check_limits(load_settings({}).model_copy(update={"default_scheduler": name}))


def test_default_scheduler_in_any_case_is_accepted() -> None:
    limits = load_settings({"DEFAULT_SCHEDULER": "euler A"})
    check_limits(limits)
    assert parse(PROMPT, limits).scheduler == "Euler a"


# The mapping from A1111 names to diffusers classes (diffusers is imported only here).
EXPECTED_CLASSES = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Karras": "DPMSolverMultistepScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 Karras": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM2 a Karras": "KDPM2AncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "LMS Karras": "LMSDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PNDM": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "LCMScheduler",
}


def _kdiffusion_sigmas(steps: int, schedule: str) -> list[float]:
    """k-diffusion's sigmas for SD 1.5, as A1111 gets them (written here from its CompVisDenoiser and
    get_sigmas_karras / get_sigmas_exponential): ``uniform`` at timesteps linspace(999, 0), then 0."""
    import numpy as np

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    table = ((1 - np.cumprod(1 - betas)) / np.cumprod(1 - betas)) ** 0.5
    low, high = table[0], table[-1]
    if schedule == "uniform":
        sigmas = np.exp(np.interp(np.linspace(999, 0, steps), np.arange(1000), np.log(table)))
    elif schedule == "karras":
        ramp = np.linspace(0, 1, steps)
        sigmas = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    else:
        sigmas = np.exp(np.linspace(np.log(high), np.log(low), steps))
    return [*sigmas.tolist(), 0.0]


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("Euler", "uniform"),
        ("Euler a", "uniform"),
        ("LMS", "uniform"),
        ("LMS Karras", "karras"),
        ("DPM++ 2M", "uniform"),
        ("DPM++ 2M Karras", "karras"),
        ("DPM++ 2M SDE", "exponential"),
        ("DPM++ 2M SDE Karras", "karras"),
    ],
)
def test_each_k_diffusion_sampler_runs_a1111s_sigmas(name: str, schedule: str) -> None:
    """SD 1.5's config says 'leading' spacing, which k-diffusion never used: Euler started at 11.0, not 14.6. At 1
    step, k-diffusion starts from the largest sigma too, where diffusers' linspace of one timestep is timestep 0."""
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler

    for steps in (1, 20):
        scheduler = make_scheduler(name, SD15_SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps)
        expected = _kdiffusion_sigmas(steps, schedule)
        assert scheduler.sigmas.tolist() == pytest.approx(expected, rel=1e-3, abs=1e-4), f"{steps} steps"


@pytest.mark.parametrize("name", ["Euler", "Euler a", "Heun", "LMS", "LMS Karras"])
def test_one_step_starts_from_the_largest_sigma_at_timestep_999(name: str) -> None:
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler

    scheduler = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    assert scheduler.sigmas.tolist() == pytest.approx(_kdiffusion_sigmas(1, "uniform"), rel=1e-3, abs=1e-4)
    assert scheduler.timesteps.tolist() == [999]
    assert scheduler.init_noise_sigma == pytest.approx(14.6146, rel=1e-4)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [("DPM2", "uniform"), ("DPM2 a", "uniform"), ("DPM2 Karras", "karras"), ("DPM2 a Karras", "karras")],
)
def test_dpm2_runs_a1111s_sigmas_with_the_next_to_last_dropped(name: str, schedule: str) -> None:
    """A1111's DPM2 and DPM2 a (``discard_next_to_last_sigma``): steps + 1 sigmas of the schedule, less the
    smallest above 0; Karras is their own schedule there (1.9 and later), Uniform is named."""
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler

    for steps in (1, 2, 20):
        scheduler = make_scheduler(name, SD15_SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps)
        a1111 = _kdiffusion_sigmas(steps + 1, schedule)
        a1111 = [*a1111[:-2], a1111[-1]]
        # Each step's sigma, once: diffusers repeats each but the first for its second-order half-steps.
        sigmas = [scheduler.sigmas[0].item(), *scheduler.sigmas[1:-1:2].tolist()]
        assert sigmas == pytest.approx(a1111, rel=1e-3, abs=1e-4), f"{steps} steps"
        assert len(scheduler.timesteps) == 2 * steps - 1, "two model calls a step, one for the last, as k-diffusion"


def _smooth_model(seed: int = 0) -> Any:
    """A smooth stand-in for the guided UNet's noise prediction, ``eps(x, t)``."""
    import torch

    weights = torch.randn((4, 4), generator=torch.Generator().manual_seed(seed)) * 0.3

    def eps(x: Any, t: Any) -> Any:
        return torch.tanh(torch.einsum("ij,bj...->bi...", weights.to(x.dtype), x) + 0.5 * (t / 1000).to(x.dtype))

    return eps


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_dpmpp_2m_samples_as_k_diffusions_on_a1111s_uniform_schedule(steps: int) -> None:
    """k-diffusion's sample_dpmpp_2m (written here from its source) on A1111's Uniform sigmas, its model the
    stand-in at k-diffusion's scaling and timestep of each sigma, against the worker's plain DPM++ 2M."""
    import numpy as np
    import torch

    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler

    eps = _smooth_model()
    scheduler = make_scheduler("DPM++ 2M", SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)).double()
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample

    sigmas = torch.tensor(_kdiffusion_sigmas(steps, "uniform"), dtype=torch.float64)
    times = torch.from_numpy(np.linspace(999, 0, steps))
    # From diffusers' start, noise x 1 in its variance-preserving space: k-diffusion's is noise x sigma_max in its
    # own, 0.23% less (docs/a1111.md).
    y, previous = noise * (sigmas[0] ** 2 + 1) ** 0.5, None
    for i in range(steps):
        sigma, following = sigmas[i], sigmas[i + 1]
        denoised = y - sigma * eps(y / (sigma**2 + 1) ** 0.5, times[i])
        if following == 0:
            y = denoised
        else:
            h = sigma.log() - following.log()
            if previous is not None:
                r = (sigmas[i - 1].log() - sigma.log()) / h
                denoised, previous = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous, denoised
            else:
                previous = denoised
            y = (following / sigma) * y - torch.expm1(-h) * denoised
    torch.testing.assert_close(x.double(), y, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("steps", [3, 4, 7, 20])
def test_unipc_samples_as_a1111s(steps: int) -> None:
    """A1111's UniPC at its default options (bh1, order 3, time-uniform from timestep 999 to 0, unrounded), written
    out in tests/a1111_unipc.py, on a smooth stand-in for the guided UNet: the same latents to float32's rounding.
    diffusers' own UniPC (bh2, order 2, from 951 on SD 1.5's "leading" config) lands elsewhere."""
    import torch
    from diffusers import UniPCMultistepScheduler

    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler
    from tests.a1111_unipc import a1111_unipc

    eps = _smooth_model()

    def sampled(scheduler: Any) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(eps(x, t), t, x).prev_sample
        return x.double()

    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    ours = make_scheduler("UniPC", SD15_SCHEDULER_CONFIG)
    a1111 = a1111_unipc(eps, noise, ours.alphas_cumprod, steps)
    torch.testing.assert_close(sampled(ours), a1111, atol=1e-4, rtol=1e-5)
    assert (sampled(UniPCMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)) - a1111).abs().max() > 0.01


def test_unipc_at_one_step_starts_from_timestep_999() -> None:
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler

    scheduler = make_scheduler("UniPC", SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999.0]
    assert scheduler.sigmas.tolist() == pytest.approx(_kdiffusion_sigmas(2, "uniform")[:2], rel=1e-4)


def test_scheduler_names_and_mapping_agree() -> None:
    from src.models.schedulers import SCHEDULERS

    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)
    assert set(SCHEDULER_NAMES) == set(EXPECTED_CLASSES)
    assert len(SCHEDULER_NAMES) == len(set(SCHEDULER_NAMES))
    assert load_settings({}).default_scheduler in SCHEDULER_NAMES


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_make_scheduler_builds_the_mapped_class(name: str) -> None:
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import SCHEDULERS, make_scheduler

    scheduler = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    assert type(scheduler) is SCHEDULERS[name][0]
    assert EXPECTED_CLASSES[name] in [kind.__name__ for kind in type(scheduler).__mro__]
    assert scheduler.config.num_train_timesteps == 1000
    # DPM2's schedules, Uniform's too, are made in diffusers' Karras conversion (src/models/schedulers.py).
    assert scheduler.config.get("use_karras_sigmas", False) is ("Karras" in name or name.startswith("DPM2"))
    if "SDE" in name:
        assert scheduler.config.algorithm_type == "sde-dpmsolver++"
    if name == "DDIM":
        assert scheduler.config.clip_sample is False
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_make_scheduler_returns_a_new_object_each_time() -> None:
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler

    first = make_scheduler("Euler a", SD15_SCHEDULER_CONFIG)
    second = make_scheduler("Euler a", SD15_SCHEDULER_CONFIG)
    assert first is not second
    assert SD15_SCHEDULER_CONFIG.get("use_karras_sigmas") is None  # the base config is not modified


# --- image inputs: img2img, inpaint, outpaint, hires fix ------------------------------------------

IMAGE = {**PROMPT, "image": "aGVsbG8="}

BAD_IMAGE_INPUTS = [
    pytest.param(with_prompt(image=""), "image='': must not be empty", id="image-empty"),
    pytest.param(with_prompt(image=42), "image=42: must be a valid string", id="image-int"),
    pytest.param({**IMAGE, "mask": " "}, "mask=' ': must not be empty", id="mask-blank"),
    pytest.param({**IMAGE, "strength": 0}, "strength=0: must be greater than 0", id="strength-0"),
    pytest.param({**IMAGE, "strength": 1.5}, "strength=1.5: must be less than or equal to 1", id="strength-1.5"),
    pytest.param({**IMAGE, "strength": "0.5"}, "strength='0.5': must be a valid number", id="strength-str"),
    pytest.param(with_prompt(strength=0.5), "strength: needs an image", id="strength-without-image"),
    pytest.param(with_prompt(mask="aGVsbG8="), "mask: needs an image", id="mask-without-image"),
    pytest.param(with_prompt(resize_mode="crop"), "resize_mode: needs an image", id="resize-mode-without-image"),
    pytest.param(with_prompt(outpaint={"left": 64}), "outpaint: needs an image", id="outpaint-without-image"),
    pytest.param(with_prompt(mask_blur=8), "mask_blur: needs an image and a mask or outpaint", id="blur-txt2img"),
    pytest.param({**IMAGE, "mask_blur": 8}, "mask_blur: needs a mask or outpaint", id="blur-img2img"),
    pytest.param({**IMAGE, "keep_unmasked": False}, "keep_unmasked: needs a mask or outpaint", id="keep-img2img"),
    pytest.param({**IMAGE, "inpaint_area": "masked"}, "inpaint_area: needs a mask or outpaint", id="area-img2img"),
    pytest.param({**IMAGE, "mask_blur": -1}, "mask_blur=-1: must be greater than or equal to 0", id="blur-negative"),
    pytest.param({**IMAGE, "mask_blur": 65}, "mask_blur=65: must be less than or equal to 64", id="blur-65"),
    pytest.param({**IMAGE, "inpaint_area": "all"}, "inpaint_area='all': must be 'whole' or 'masked'", id="area-bad"),
    pytest.param({**IMAGE, "resize_mode": "squash"}, "resize_mode='squash': unknown resize mode", id="resize-bad"),
    pytest.param({**IMAGE, "resize_mode": 3}, "resize_mode=3: unknown resize mode", id="resize-3"),
    pytest.param({**IMAGE, "outpaint": {"left": 50}}, "outpaint.left=50: must be a multiple of 64", id="outpaint-50"),
    pytest.param({**IMAGE, "outpaint": {}}, "must add pixels on at least one side", id="outpaint-empty"),
    pytest.param({**IMAGE, "outpaint": {"middle": 64}}, "outpaint.middle=64: unknown field", id="outpaint-unknown"),
    pytest.param(
        {**IMAGE, "mask": "aGVsbG8=", "outpaint": {"left": 64}}, "mask: not with outpaint", id="mask-and-outpaint"
    ),
    pytest.param(
        {**IMAGE, "width": 1024, "height": 512, "outpaint": {"left": 64}, "num_inference_steps": 10},
        "",
        id="outpaint-fits",
    ),
    pytest.param(
        {**IMAGE, "width": 512, "height": 512, "outpaint": {"left": 512}},
        "outpaint: a 512x512 result with 512 and 0 pixels added leaves 0x512 for the image",
        id="outpaint-leaves-nothing",
    ),
    pytest.param(
        {**IMAGE, "outpaint": {"left": 2048, "right": 2048}},
        "outpaint: left=2048 + right=2048 adds 4096 pixels to the width; with at least 64 of image that is "
        "4160, over MAX_SIDE=1024: left + right may add at most 960",
        id="outpaint-margins-past-max-side",
    ),
    pytest.param(
        {**IMAGE, "width": 1024, "height": 1024, "outpaint": {"top": 1024}},
        "outpaint: top=1024 + bottom=0 adds 1024 pixels to the height; with at least 64 of image that is "
        "1088, over MAX_SIDE=1024: top + bottom may add at most 960",
        id="outpaint-margin-past-max-side-with-a-size",
    ),
    pytest.param({**IMAGE, "hires": {"scale": 1.5}}, "hires: is for text-to-image", id="hires-with-image"),
    pytest.param(with_prompt(hires={"scale": 2.5}), "hires.scale=2.5: must be less than or equal to 2", id="hires-2.5"),
    pytest.param(with_prompt(hires={"scale": 0.5}), "hires.scale=0.5: must be greater than or equal to 1", id="h-0.5"),
    pytest.param(
        with_prompt(hires={"scale": 1.9}), "512x512 x 1.9 = 972x972: both sides must be multiples of 8", id="h-1.9"
    ),
    pytest.param(
        with_prompt(width=768, height=768, hires={"scale": 1.5}),
        "768x768 x 1.5 = 1152x1152: each side must be at most 1024 (MAX_SIDE)",
        id="hires-past-max-side",
    ),
    pytest.param(
        with_prompt(width=1024, height=640, hires={"scale": 1.5}),
        "hires.scale: 1024x640 x 1.5 = 1536x960",
        id="hires-past-max-side-wide",
    ),
    pytest.param(
        with_prompt(width=512, height=512, num_images=4, hires={"scale": 2.0}),
        "1024x1024 x 4 images = 4194304 pixels: must be at most 1048576 (MAX_PIXELS)",
        id="hires-past-max-pixels",
    ),
    pytest.param(with_prompt(hires={"scale": 1.5, "steps": -1}), "hires.steps=-1: must be greater than", id="hs--1"),
    pytest.param(
        with_prompt(hires={"scale": 1.5, "steps": 0.0}), "hires.steps=0.0: must be a valid integer", id="hs-0.0"
    ),
    pytest.param(with_prompt(hires={"scale": 1.5, "steps": 151}), "hires.steps=151: must be at most 150", id="hs-151"),
    pytest.param(
        with_prompt(hires={"scale": 1.5, "steps": 150, "strength": 0.1}),
        "steps / strength = 150 / 0.1 stretches the second pass's schedule to 1500 steps: at most 1000",
        id="hires-schedule-past-1000",
    ),
    pytest.param(with_prompt(hires={"scale": 1.5, "upscaler": "esrgan"}), "hires.upscaler='esrgan'", id="hu-bad"),
    pytest.param(with_prompt(width=None), "width=None: must be a valid integer", id="width-null-without-image"),
]


@pytest.mark.parametrize(("data", "expected"), BAD_IMAGE_INPUTS)
def test_image_fields_are_checked(data: dict[str, Any], expected: str) -> None:
    if not expected:
        parse(data)
        return
    assert expected in error_of(data)


def test_the_task_follows_from_the_fields() -> None:
    assert parse(PROMPT).task == "txt2img"
    assert parse(with_prompt(hires={})).task == "txt2img"
    assert parse(IMAGE).task == "img2img"
    assert parse({**IMAGE, "mask": "bWFzaw=="}).task == "inpaint"
    assert parse({**IMAGE, "outpaint": {"top": 64}}).task == "outpaint"


@pytest.mark.parametrize(
    ("steps", "strength", "runs"),
    [(20, 0.75, 16), (20, 1.0, 20), (20, 0.999, 20), (3, 0.3, 1), (4, 0.6, 3), (25, 0.5, 13), (1, 0.01, 1)],
)
def test_img2img_runs_a1111s_count_of_steps(steps: int, strength: float, runs: int) -> None:
    """A1111's setup_img2img_steps: t_enc = int(steps x min(strength, 0.999)), and sample_img2img runs the last
    t_enc + 1 steps of the schedule (its sigmas[steps - t_enc - 1:])."""
    assert parse({**IMAGE, "num_inference_steps": steps, "strength": strength}).denoising_steps == runs


def test_image_defaults_are_a1111s() -> None:
    request = parse({**IMAGE, "mask": "bWFzaw=="})
    assert (request.strength, request.resize_mode, request.mask_blur) == (0.75, "resize", 4)
    assert (request.inpaint_area, request.inpaint_padding, request.keep_unmasked) == ("whole", 32, True)
    assert (request.width, request.height) == (None, None), "an image job takes the image's size"
    hires = parse(with_prompt(num_inference_steps=30, hires={})).hires
    assert hires is not None
    assert (hires.scale, hires.steps, hires.strength, hires.upscaler) == (2.0, 30, 0.5, "latent")
    # A1111's Hires steps 0: as many as the first pass.
    zero = parse(with_prompt(num_inference_steps=30, hires={"steps": 0})).hires
    assert zero is not None
    assert zero.steps == 30


@pytest.mark.parametrize(
    ("given", "mode"),
    [(0, "resize"), (1, "crop"), (2, "fill"), ("Crop and resize", "crop"), ("FILL", "fill"), ("Just resize", "resize")],
)
def test_resize_mode_takes_a1111_numbers_and_labels(given: Any, mode: str) -> None:
    assert parse({**IMAGE, "resize_mode": given}).resize_mode == mode


def test_task_fields_name_only_what_the_task_used() -> None:
    assert parse(PROMPT).task_fields() == {"task": "txt2img"}
    assert parse(IMAGE).task_fields() == {"task": "img2img", "strength": 0.75, "resize_mode": "resize"}
    outpaint = parse({**IMAGE, "outpaint": {"left": 64}}).task_fields()
    assert outpaint["outpaint"].model_dump() == {"left": 64, "right": 0, "top": 0, "bottom": 0}
    assert outpaint["mask_blur"] == 4


@pytest.mark.parametrize(
    ("image_size", "fields", "size", "warned"),
    [
        pytest.param((512, 512), {}, (512, 512), False, id="kept"),
        pytest.param((1500, 1000), {}, (1024, 640), True, id="fit-max-side"),
        pytest.param((700, 500), {}, (640, 448), True, id="rounded-down"),
        pytest.param((1024, 1024), {"num_images": 4}, (512, 512), True, id="fit-max-pixels-per-batch"),
        pytest.param((40, 30), {}, (64, 64), True, id="tiny-is-raised-to-64"),
        pytest.param((1024, 768), {"width": 512}, (512, 384), False, id="height-follows-width"),
        pytest.param((1024, 768), {"height": 384}, (512, 384), False, id="width-follows-height"),
        pytest.param((512, 512), {"outpaint": {"left": 128}}, (640, 512), False, id="outpaint-grows"),
        pytest.param((1024, 1024), {"outpaint": {"left": 128}}, (1024, 896), True, id="outpaint-fits-max-side"),
        pytest.param((333, 333), {"width": 640, "height": 448}, (640, 448), False, id="given-size-wins"),
    ],
)
def test_resolve_size_takes_the_image_size_within_the_limits(
    image_size: tuple[int, int], fields: dict[str, Any], size: tuple[int, int], warned: bool
) -> None:
    resolved, warnings = resolve_size(parse({**IMAGE, **fields}), image_size, LIMITS)

    assert resolved.size == size
    assert bool(warnings) is warned
    assert all("MAX_SIDE" in warning and "MAX_PIXELS" in warning for warning in warnings)


def test_resolve_size_names_the_outpaint_margins_that_pass_max_side() -> None:
    # The height follows the image's proportions at width 512, then the top margin is added.
    request = parse({**IMAGE, "width": 512, "outpaint": {"top": 128}})
    with pytest.raises(InputError) as raised:
        resolve_size(request, (512, 1024), LIMITS)
    assert str(raised.value) == (
        "invalid input: height=1152: must be at most 1024 (MAX_SIDE): 1024 for the image plus outpaint "
        "top=128 + bottom=0 (the image is 512x1024)"
    )


def test_resolve_size_refuses_an_outpaint_past_the_limits() -> None:
    request = parse({**IMAGE, "width": 1024, "outpaint": {"top": 448, "bottom": 448}})
    with pytest.raises(InputError) as raised:
        resolve_size(request, (1024, 1024), LIMITS)
    assert "outpaint top=448 + bottom=448" in str(raised.value)
    assert "MAX_SIDE" in str(raised.value)
    assert "the image is 1024x1024" in str(raised.value)


# --- URLs in errors: the log and the response never show a query or credentials ---------------------------

SECRET = "tok-in-a-url-5e2a"
DOWNLOADS = load_settings({"DOWNLOAD_HOSTS": "civitai.com", "LORA_DIR": "/tmp"})


@pytest.mark.parametrize(
    ("data", "limits", "expected"),
    [
        pytest.param(
            {"model": f"https://civitai.com/api/download/models/1?token={SECRET}"},
            LIMITS,
            "model: 'https://civitai.com/api/download/models/1?<hidden>': this worker downloads no files",
            id="model-downloads-off",
        ),
        pytest.param(
            {"loras": [{"url": f"https://civitai.com/m/1?token={SECRET}"}] * 2},
            DOWNLOADS,
            "loras.1.url='https://civitai.com/m/1?<hidden>': named twice",
            id="lora-url-twice",
        ),
        pytest.param(
            {"model": f"ftp://user:{SECRET}@civitai.com/x"},
            DOWNLOADS,
            "model='ftp://<hidden>': a name from MODELS_DIR, not a URL",
            id="model-userinfo",
        ),
        pytest.param(
            {"loras": [{}, {"url": f"ftp://civitai.com/a.safetensors?token={SECRET}"}]},
            DOWNLOADS,
            "loras.1.url='ftp://civitai.com/a.safetensors?<hidden>': must be an http:// or https:// URL",
            id="nested-lora-url",
        ),
        pytest.param(
            {"loras": [{"url": f"user:{SECRET}@civitai.com/a.safetensors"}]},
            DOWNLOADS,
            "loras.0.url='<hidden>': must be an http:// or https:// URL",
            id="lora-userinfo-no-scheme",
        ),
        pytest.param(
            {"model": {"url": f"https://civitai.com/m/1?token={SECRET}", "sha256": "xyz", "x": 1}},
            DOWNLOADS,
            "model.ModelDownload.sha256='xyz'",
            id="model-object",
        ),
        pytest.param(
            {"model": [f"https://civitai.com/m/1#{SECRET}"]},
            DOWNLOADS,
            "model.str=['https://civitai.com/m/1?<hidden>']",
            id="model-list",
        ),
        pytest.param(
            {"image": f"https://cdn.example/a.png?X-Amz-Signature={SECRET}", "strength": 9},
            DOWNLOADS,
            "strength=9",
            id="image-url-beside",
        ),
    ],
)
def test_a_url_in_an_error_shows_no_query_and_no_credentials(
    data: dict[str, Any], limits: Settings, expected: str
) -> None:
    message = error_of({**PROMPT, **data}, limits)

    assert expected in message, message
    assert SECRET not in message, message


def test_a_bad_value_with_a_url_in_it_shows_the_url_redacted() -> None:
    message = error_of({"prompt": f"see https://x.example/a?sig={SECRET} " + "x" * 2000})

    assert "prompt='see https://x.example/a?<hidden> xxx" in message, message
    assert SECRET not in message


def test_the_loras_field_says_what_each_form_needs() -> None:
    description = str(GenerateRequest.model_fields["loras"].description)
    by_url = parse(
        with_prompt(loras=[{"url": "https://civitai.com/a.safetensors"}]),
        load_settings({"DOWNLOAD_HOSTS": "civitai.com"}),
    )

    assert "A `name` needs `LORA_DIR`, a `url` needs `DOWNLOAD_HOSTS`" in description
    assert by_url.loras[0].url == "https://civitai.com/a.safetensors", "a LoRA by URL needs no LORA_DIR"


def test_a_url_scheme_in_upper_case_is_a_url() -> None:
    # Schemes ignore case: HTTPS://host is https://host, and was refused as "must be an http:// or https:// URL".
    request = parse(
        with_prompt(loras=[{"url": "HTTPS://civitai.com/a.safetensors"}], model="Https://civitai.com/m.safetensors"),
        load_settings({"DOWNLOAD_HOSTS": "civitai.com"}),
    )

    assert request.loras[0].url == "https://civitai.com/a.safetensors"
    assert isinstance(request.model, ModelDownload)
    assert request.model.url == "https://civitai.com/m.safetensors"
