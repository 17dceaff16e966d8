"""Adapters a job runs with: LoRAs (listed, or named by the prompt's ``<lora:...>`` tags) and ControlNet units."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from src.schema.core import EXTRA_NETWORK_TAG, LORA_TAG_KINDS, RequestLimits, canonical_name, names_by_key
from src.schema.images import canonical_resize_mode
from src.schema.passes import PassOptions

LORA_SCALE_LIMIT = 4.0
# A model's name in MODELS_DIR, such as "styles/anime-v3", is at most this long.
MODEL_NAME_MAX = 200


SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
URL_MAX = 2048


# Punctuation around a URL in a value's repr (quotes, brackets, commas): kept as it is, as it hides nothing.
_OPENING, _CLOSING = "'\"([{", "'\")]},"


def without_secrets(text: str) -> str:
    """``text`` with each URL in it (a word holding ``://``, or ``user@host``) shown without what may be a
    secret: its query and fragment as ``?<hidden>``, and all past the scheme when it holds an ``@``
    (``user:password@``). For every error that shows a value as it came in. The worker's ``redact_url`` is in the
    settings, which the schema may not import; this rule hides more (the host too, past an ``@``), never less."""

    def hidden(match: re.Match[str]) -> str:
        word = match.group(0)
        url = word.strip(_OPENING + _CLOSING)
        if not url:
            return word
        start = word.index(url)
        opening, closing = word[:start], word[start + len(url) :]
        scheme, separator, rest = url.partition("://")
        if not separator:
            scheme, rest = "", url
        if "@" in rest and (separator or not rest.startswith("@")):
            return f"{opening}{scheme}{separator}<hidden>{closing}"
        if not separator:
            return word
        base = re.split(r"[?#]", rest, maxsplit=1)[0]
        return f"{opening}{scheme}{separator}{base}{'?<hidden>' if base != rest else ''}{closing}"

    return re.sub(r"\S+", hidden, text)


def http_url(value: str) -> str | None:
    """``value`` with its scheme in lower case when it is an http:// or https:// URL, in any case (schemes ignore
    case: HTTPS://host is https://host); None when it is not one."""
    scheme, separator, rest = value.partition("://")
    return f"{scheme.lower()}://{rest}" if separator and scheme.lower() in ("http", "https") else None


def _download_url(value: str) -> str:
    url = http_url(value)
    if url is None:
        raise ValueError("must be an http:// or https:// URL")
    return url


class LoraRequest(BaseModel):
    """One LoRA for the job: a file of LORA_DIR by name, or a file by URL (from DOWNLOAD_HOSTS); and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="A LoRA's name: its file name in `LORA_DIR` without `.safetensors` (`sub/name` in a subfolder, "
        "or `name` alone, as A1111 names it, when no other LoRA has that file name), or A1111's alias for it, its "
        "metadata's `ss_output_name`. Give `name` or `url`.",
    )
    url: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=URL_MAX,
        description="A LoRA `.safetensors` file's http(s) URL, on a host of `DOWNLOAD_HOSTS`; downloaded once into "
        "the download cache. See Files by URL.",
    )
    sha256: StrictStr | None = Field(
        None,
        pattern=SHA256_PATTERN,
        description="With `url`: the SHA-256 the file must have (64 hex digits); a file that differs is refused.",
    )
    scale: float = Field(
        1.0,
        strict=True,
        ge=-LORA_SCALE_LIMIT,
        le=LORA_SCALE_LIMIT,
        allow_inf_nan=False,
        description=f"A finite number from {-LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}; 0 leaves the model as it is.",
    )

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.split("/")
        if "://" in value or "\\" in value or "\0" in value or any(part in ("", ".", "..") for part in parts):
            raise ValueError(
                "must be a LoRA's name: its file name in LORA_DIR without .safetensors (sub/name in a subfolder), "
                "not a path or a URL (a URL goes in url)"
            )
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _download_url(value)

    @field_validator("sha256")
    @classmethod
    def _lower_case(cls, value: str | None) -> str | None:
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _name_or_url(self) -> LoraRequest:
        if (self.name is None) == (self.url is None):
            raise ValueError("give a LoRA's name (a file of LORA_DIR) or its url, one of the two")
        if self.sha256 is not None and self.url is None:
            raise ValueError("sha256 goes with url: a file of LORA_DIR is named, not checked by its hash")
        return self

    @property
    def label(self) -> str:
        """How messages name it: its name, or its URL."""
        return self.name if self.name is not None else str(self.url)


class ModelDownload(BaseModel):
    """A checkpoint by URL (from DOWNLOAD_HOSTS), with the SHA-256 it must have, if given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: StrictStr = Field(
        min_length=1,
        max_length=URL_MAX,
        description="A single-file SD 1.5 `.safetensors` checkpoint's http(s) URL, on a host of `DOWNLOAD_HOSTS`.",
    )
    sha256: StrictStr | None = Field(
        None, pattern=SHA256_PATTERN, description="The SHA-256 the file must have (64 hex digits)."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _download_url(value)

    @field_validator("sha256")
    @classmethod
    def _lower_case(cls, value: str | None) -> str | None:
        return None if value is None else value.lower()


CONTROL_MODES: tuple[str, ...] = ("balanced", "prompt", "controlnet")
# A1111's labels and numbers for its control modes.
CONTROL_MODE_ALIASES: Mapping[str, str] = {
    "0": "balanced",
    "1": "prompt",
    "2": "controlnet",
    "my prompt is more important": "prompt",
    "controlnet is more important": "controlnet",
}
CONTROL_MODE_LABELS: Mapping[str, str] = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
}
_CONTROL_MODES_BY_KEY = names_by_key(CONTROL_MODES, CONTROL_MODE_ALIASES)
CONTROLNET_SCALE_MAX = 2.0
PROCESSOR_RES_MAX = 2048


class ControlNetUnit(BaseModel):
    """One ControlNet unit: a model of CONTROLNET_DIR, its control image, and how strongly and when it acts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: StrictStr = Field(
        min_length=1,
        max_length=255,
        description="A ControlNet's name: its folder or file name in `CONTROLNET_DIR`, without `.safetensors`.",
    )
    image: StrictStr | None = Field(
        None,
        min_length=1,
        description="The control image, in every form `image` takes (base64, data URI, URL, `s3://`), with the same "
        "limits; brought to the job's size by `resize_mode`. Unset: the job's own `image` (its outpaint canvas "
        "for an outpaint), as the ControlNet extension's img2img units take it; a text-to-image unit needs one.",
    )
    preprocess: Literal["none", "canny"] = Field(
        "none",
        description="`none`: the image is already a control map. `canny`: OpenCV's Canny edges of the image, with "
        "the thresholds `low` and `high`.",
    )
    low: StrictInt | None = Field(None, ge=0, le=255, description="Canny's low threshold, 0 to 255; default 100.")
    high: StrictInt | None = Field(None, ge=0, le=255, description="Canny's high threshold, 0 to 255; default 200.")
    processor_res: StrictInt | None = Field(
        None,
        ge=64,
        le=PROCESSOR_RES_MAX,
        description=f"Canny runs on the image with its short side this many pixels, 64 to {PROCESSOR_RES_MAX} "
        "(the ControlNet extension's `processor_res`). Unset: on the image at its own size.",
        json_schema_extra={"shown_default": "the image's"},
    )
    scale: float = Field(
        1.0,
        strict=True,
        ge=0.0,
        le=CONTROLNET_SCALE_MAX,
        allow_inf_nan=False,
        description=f"How strongly it guides (A1111's weight), 0 to {CONTROLNET_SCALE_MAX:g}.",
    )
    start: float = Field(
        0.0,
        strict=True,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="The fraction of the steps where it starts acting (A1111's guidance start), 0 to 1.",
    )
    end: float = Field(
        1.0,
        strict=True,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="The fraction of the steps where it stops (A1111's guidance end), 0 to 1, above `start`.",
    )
    resize_mode: Literal["resize", "crop", "fill"] | None = Field(
        None,
        description="How this unit's image meets the job's size, as the job's `resize_mode` (the ControlNet "
        "extension's per-unit resize mode). Unset: the job's `resize_mode`.",
        json_schema_extra={"shown_default": "`resize_mode`"},
    )
    control_mode: Literal["balanced", "prompt", "controlnet"] = Field(
        "balanced",
        description='`balanced`; `prompt` (A1111\'s "My prompt is more important": the control fades towards the '
        "UNet's outer layers); `controlnet` (\"ControlNet is more important\": the same, on the prompt's side of "
        "guidance only, as diffusers' guess mode). A1111's labels and 0, 1, 2 are accepted.",
    )

    @field_validator("model")
    @classmethod
    def _a_name_not_a_path(cls, value: str) -> str:
        if "://" in value or "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
            raise ValueError("must be a ControlNet's name in CONTROLNET_DIR (folder or file name), not a path or a URL")
        return value

    @field_validator("preprocess", mode="before")
    @classmethod
    def _preprocess_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _known_resize_mode(cls, value: Any) -> Any:
        return None if value is None else canonical_resize_mode(value)

    @field_validator("control_mode", mode="before")
    @classmethod
    def _known_control_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return value
        return canonical_name(str(value), _CONTROL_MODES_BY_KEY, "control mode", CONTROL_MODES)

    @model_validator(mode="after")
    def _consistent(self) -> ControlNetUnit:
        problems = []
        if self.start >= self.end:
            problems.append(f"start={self.start:g}, end={self.end:g}: start must be below end")
        if self.preprocess != "canny":
            given = [name for name in ("low", "high", "processor_res") if getattr(self, name) is not None]
            problems += [f"{name}: only with preprocess 'canny'" for name in given]
        elif self.canny_thresholds[0] > self.canny_thresholds[1]:
            low, high = self.canny_thresholds
            problems.append(f"low={low}, high={high}: low must not be above high")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def canny_thresholds(self) -> tuple[int, int]:
        """Canny's (low, high), with their defaults, 100 and 200."""
        return (100 if self.low is None else self.low, 200 if self.high is None else self.high)


def lora_tags(text: str) -> list[tuple[str, str]]:
    """A1111's extra-network tags in ``text``: (kind, arguments) for each ``<kind:arguments>``."""
    return [(match.group(1), match.group(2)) for match in EXTRA_NETWORK_TAG.finditer(text)]


def lora_tag_list(text: str) -> list[tuple[str, str]]:
    """The ``<lora:...>`` tags of ``text``, as (name, scale) text, in order: what two prompts are compared by."""
    found = []
    for kind, arguments in lora_tags(text):
        if kind.lower() in LORA_TAG_KINDS:
            name, _, scale = arguments.partition(":")
            found.append((name.strip(), scale.strip()))
    return found


# A1111's prompt comments (1.8 and later, "Enable comments", on by default): a line that starts with # goes whole; then
# from any other # to the end of its line.
_COMMENT_LINE = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_COMMENT = re.compile(r"#[^\n]*(\n|$)")


def without_comments(text: str) -> str:
    """``text`` as A1111 reads a prompt with comments on: from each ``#`` to the end of its line removed, the line
    break kept."""
    return _COMMENT.sub("\n", _COMMENT_LINE.sub("\n", text))


def without_lora_tags(text: str) -> str:
    """``text`` with its ``<lora:...>`` tags removed, as A1111 removes them before encoding."""
    return EXTRA_NETWORK_TAG.sub(lambda match: "" if match.group(1).lower() in LORA_TAG_KINDS else match.group(0), text)


def _loras_from_tags(prompt: str) -> list[dict[str, Any]]:
    """The LoRAs the prompt's ``<lora:name:scale>`` tags ask for.

    Raises:
        ValueError: a tag that is not a LoRA tag, or whose scale is not a number within the bounds.
    """
    found = []
    for kind, arguments in lora_tags(prompt):
        tag = f"<{kind}:{arguments}>"
        if kind.lower() not in LORA_TAG_KINDS:
            raise ValueError(
                f"prompt: {tag}: only <lora:name> and <lora:name:scale> tags are read; <{kind}:...> is not"
            )
        name, *rest = arguments.split(":")
        if len(rest) > 1:
            raise ValueError(
                f"prompt: {tag}: a LoRA tag takes a name and at most one scale, <lora:name:scale>; "
                "separate text-encoder and UNet scales are not supported"
            )
        scale = 1.0
        if rest:
            try:
                scale = float(rest[0])
            except ValueError:
                scale = float("nan")
            if not -LORA_SCALE_LIMIT <= scale <= LORA_SCALE_LIMIT:
                raise ValueError(
                    f"prompt: {tag}: the scale {rest[0]!r} must be a finite number from "
                    f"{-LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}"
                )
        found.append({"name": name.strip(), "scale": scale})
    return found


def merge_lora_tags(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the prompt's ``<lora:...>`` tags added to ``loras``, after the ones listed there.

    Raises:
        ValueError: a bad tag, a tag in the negative prompt, or a LoRA named both ways.
    """
    negative = data.get("negative_prompt")
    if isinstance(negative, str) and any(kind.lower() in LORA_TAG_KINDS for kind, _ in lora_tags(negative)):
        raise ValueError("negative_prompt: <lora:...> tags are read only in prompt; a LoRA applies to the whole job")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        return data
    tagged = _loras_from_tags(prompt)
    if not tagged:
        return data
    listed = data.get("loras") or []
    if not isinstance(listed, list):
        return data  # pydantic refuses it with its own message
    listed_names = {item.get("name") for item in listed if isinstance(item, dict) and isinstance(item.get("name"), str)}
    for item in tagged:
        if item["name"] in listed_names:
            raise ValueError(
                f"loras: {item['name']!r} is named in loras and as a <lora:{item['name']}> tag in prompt; name it once"
            )
    return {**data, "loras": [*listed, *tagged]}


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a name in MODELS_DIR or VAE_DIR (a path, a URL); None when it can be one."""
    if "://" in name or name.startswith(("http:", "https:")):
        return "a name from MODELS_DIR, not a URL"
    if name.startswith(("/", "~")) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return "a name from MODELS_DIR, not a path"
    if any(part in ("", ".", "..") for part in name.split("/")) or "\0" in name:
        return "a name from MODELS_DIR (`sub/name`), without `.`, `..` or empty parts"
    return None


def check_model(model: str | ModelDownload | None, vae: str | None, limits: RequestLimits) -> None:
    """Check that the worker serves more models than its default (MODELS_DIR's, or by URL from DOWNLOAD_HOSTS),
    or VAEs of VAE_DIR, when a job names one.

    Raises:
        ValueError: naming ``model`` or ``vae`` and the rule.
    """
    if isinstance(model, ModelDownload) and not limits.downloads_on:
        raise ValueError(
            f"model: {without_secrets(model.url)!r}: this worker downloads no files: DOWNLOAD_HOSTS is not set"
        )
    if isinstance(model, str) and limits.models_dir is None:
        raise ValueError(f"model={model!r}: this worker serves its default model only: MODELS_DIR is not set")
    if vae is not None and limits.vae_dir is None:
        raise ValueError(f"vae={vae!r}: this worker uses each model's own VAE: VAE_DIR is not set")


def check_loras(loras: Sequence[LoraRequest], limits: RequestLimits) -> None:
    """Check that the worker serves LoRAs, and that the job asks for few enough, each once.

    Raises:
        ValueError: naming ``loras`` (and the index of a LoRA named twice) and the rule.
    """
    if not loras:
        return
    for index, lora in enumerate(loras):
        if lora.url is not None and not limits.downloads_on:
            raise ValueError(f"loras.{index}.url: this worker downloads no files: DOWNLOAD_HOSTS is not set")
        if lora.name is not None and limits.lora_dir is None:
            raise ValueError("loras: LoRA is off on this worker: LORA_DIR is not set")
    if len(loras) > limits.max_loras:
        raise ValueError(
            f"loras: {len(loras)} LoRAs asked for, with the prompt's <lora:...> tags: "
            f"at most {limits.max_loras} (MAX_LORAS)"
        )
    seen: set[str] = set()
    for index, lora in enumerate(loras):
        field = "name" if lora.name is not None else "url"
        if lora.label in seen:
            label = lora.label if lora.url is None else without_secrets(lora.label)
            raise ValueError(f"loras.{index}.{field}={label!r}: named twice; name each LoRA once")
        seen.add(lora.label)


def check_controlnets(units: Sequence[ControlNetUnit], limits: RequestLimits) -> None:
    """Check that the worker serves ControlNets, and that the job asks for few enough units.

    Raises:
        ValueError: naming ``controlnets`` and the rule.
    """
    if not units:
        return
    if limits.controlnet_dir is None:
        raise ValueError("controlnets: ControlNet is off on this worker: CONTROLNET_DIR is not set")
    if len(units) > limits.max_controlnets:
        raise ValueError(
            f"controlnets: {len(units)} units asked for: at most {limits.max_controlnets} (MAX_CONTROLNETS)"
        )


class AdapterOptions(PassOptions):
    """The fields that name the model and adapters: ``model``, ``loras`` and ``controlnets``."""

    model: StrictStr | ModelDownload | None = Field(
        None,
        description="A model of `MODELS_DIR` by its name there (`sub/name`, without the extension), never a path; "
        "or, with `DOWNLOAD_HOSTS`, a checkpoint by URL: the URL itself, or `{url, sha256}`. Unset: the worker's "
        "default model (`MODEL_ID`). See Many models and Files by URL.",
        json_schema_extra={"shown_default": "MODEL_ID"},
    )

    loras: list[LoraRequest] = Field(
        default_factory=list,
        description="LoRAs for this job, `[{name, scale}]` or `[{url, sha256, scale}]`, at most `MAX_LORAS` with "
        f"the prompt's `<lora:name:scale>` tags, each once; scale {-LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}, "
        "default 1. A `name` needs `LORA_DIR`, a `url` needs `DOWNLOAD_HOSTS`; see LoRA and Files by URL.",
        json_schema_extra={"shown_default": "none"},
    )

    controlnets: list[ControlNetUnit] = Field(
        default_factory=list,
        description="ControlNet units for this job, at most `MAX_CONTROLNETS`: `[{model, image, preprocess, low, "
        "high, scale, start, end, control_mode}]`; see ControlNet. Every task takes them. Needs `CONTROLNET_DIR`.",
        json_schema_extra={"shown_default": "none"},
    )

    vae: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=MODEL_NAME_MAX,
        description="A VAE of `VAE_DIR` by its name there, in place of the model's own for this job. Unset: the "
        "model's own VAE (or `VAE_ID`'s). See Many models.",
        json_schema_extra={"shown_default": "the model's"},
    )

    @field_validator("model", mode="before")
    @classmethod
    def _a_url_is_a_download(cls, value: Any) -> Any:
        if isinstance(value, str) and (url := http_url(value)) is not None:
            return {"url": url}
        return value

    @field_validator("model", "vae")
    @classmethod
    def _model_is_a_name(cls, value: str | ModelDownload | None) -> str | ModelDownload | None:
        if isinstance(value, str):
            if len(value) > MODEL_NAME_MAX:
                raise ValueError(f"a name of at most {MODEL_NAME_MAX} characters")
            if problem := model_name_problem(value):
                raise ValueError(problem)
        return value
