"""A1111's PNG Info (``POST /sdapi/v1/png-info``): the parameters an image carries, read as A1111 reads them.

The answer is A1111 1.10's: ``info``, the parameters text (a PNG's ``parameters`` chunk, or a JPEG's or WebP's EXIF
UserComment, as ``images.read_info_from_image`` finds it); ``items``, the image's other metadata; and
``parameters``, that text parsed as ``infotext_utils.parse_generation_parameters`` parses it, with the values it
gives what the text leaves out. The reverse of ``src.finish.parameters``, so a client that reads A1111's answer
reads this worker's images, and any other A1111 image, the same way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from packaging import version
from PIL import ExifTags, Image

from src.prompts.syntax import BREAK, parse_prompt_attention
from src.schema import InputError

# The longest parameters text read: A1111's hold a few thousand characters, and a text chunk may hold megabytes.
MAX_PARAMETERS_TEXT = 65536
# A1111's re_param and re_imagesize (its infotext_utils), with a key of at most 256 characters: unbounded, a long line
# without a colon takes time in the square of its length (minutes for a text chunk a PNG may carry).
_PARAM = re.compile(r'\s*(\w[\w \-/]{1,255}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
# The metadata A1111 leaves out of ``items`` (its images.IGNORED_INFO_KEYS).
_IGNORED_INFO_KEYS = frozenset(
    {
        "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
        "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
    }
)  # fmt: skip
# An EXIF UserComment's 8-byte prefix and the text's encoding (piexif.helper.UserComment, which A1111 reads it with).
_USER_COMMENT_ENCODINGS = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf_16_be"}
# What parse_generation_parameters sets when the text leaves it out, in its order (the First pass size, hires and
# FP8 cases are worked out in ``parse_parameters``).
_DEFAULTS_BEFORE_HIRES: tuple[tuple[str, Any], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_DEFAULTS_AFTER_HIRES: tuple[tuple[str, Any], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def png_info(image: Image.Image, field: str = "image") -> dict[str, Any]:
    """A1111's answer to ``png-info`` for ``image``: ``info``, ``items`` and ``parameters``.

    Raises:
        InputError: the parameters text is longer than ``MAX_PARAMETERS_TEXT`` (``field`` names the image).
    """
    text, items = read_info(image)
    if text is not None and len(text) > MAX_PARAMETERS_TEXT:
        raise InputError(
            f"invalid input: {field}: its parameters text is {len(text)} characters, over the {MAX_PARAMETERS_TEXT} "
            "this worker reads (A1111's hold a few thousand)"
        )
    return {"info": text or "", "items": items, "parameters": parse_parameters(text or "")}


def read_info(image: Image.Image) -> tuple[str | None, dict[str, Any]]:
    """The parameters text ``image`` carries (None: none), and its other metadata, as A1111's
    ``read_info_from_image``: a JPEG's or WebP's EXIF UserComment wins over a ``parameters`` chunk."""
    items = dict(image.info or {})
    text = items.pop("parameters", None)
    if "exif" in items:
        text = _user_comment(image) or text
    elif "comment" in items:  # a GIF's
        comment = items["comment"]
        text = comment.decode("utf8", errors="ignore") if isinstance(comment, bytes) else comment
    for key in _IGNORED_INFO_KEYS:
        items.pop(key, None)
    return text, {str(key): _as_json(value) for key, value in items.items()}


def parse_parameters(text: str) -> dict[str, Any]:
    """``text`` (A1111's parameters) as A1111 1.10's ``parse_generation_parameters`` returns it, with its default
    options (no saved styles to take out of the prompts, backward compatibility by the text's ``Version``)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative = _prompts(lines)
    found: dict[str, Any] = _fields(last)
    _hires_prompts(found, prompt, negative)
    found["Prompt"], found["Negative prompt"] = prompt, negative
    found.setdefault("Clip skip", "1")
    if (hypernet := found.get("Hypernet")) is not None:
        found["Prompt"] += f"<hypernet:{hypernet}:{found.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in found:
        found["Hires resize-1"], found["Hires resize-2"] = 0, 0
    for key, default in _DEFAULTS_BEFORE_HIRES:
        found.setdefault(key, default)
    _first_pass_size(found)
    for key, default in _DEFAULTS_AFTER_HIRES:
        found.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in found and found["FP8 weight"] != "Disable":
        found["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in found and (_emphasised(prompt) or _emphasised(negative)):
        found["Emphasis"] = "Original"
    found.setdefault("Refiner switch by sampling steps", False)
    _backward_compatible(found)
    return found


def _hires_prompts(found: dict[str, Any], prompt: str, negative: str) -> None:
    """A1111's hires prompts, as its styles' check leaves them when there are no styles: empty when the same as the
    job's (for a text from A1111 1.8.0-139 or later, or of no version)."""
    if "Hires prompt" not in found and "Hires negative prompt" not in found:
        return
    made_by = _version(found.get("Version"))
    if made_by is not None and not made_by > version.parse("1.8.0-139"):
        return
    hires_prompt, hires_negative = found.get("Hires prompt", prompt), found.get("Hires negative prompt", negative)
    found["Hires prompt"] = "" if hires_prompt == prompt else hires_prompt
    found["Hires negative prompt"] = "" if hires_negative == negative else hires_negative


def _emphasised(text: str) -> bool:
    """Whether ``text`` weighs any of its words, as A1111 tells it (a weight other than 1, BREAK aside)."""
    return any(weight != 1.0 and piece != BREAK[0] for piece, weight in parse_prompt_attention(text))


def _prompts(lines: list[str]) -> tuple[str, str]:
    """The prompt and the negative prompt, from the lines before the fields: the negative from the line that starts
    ``Negative prompt:``."""
    prompt, negative, in_negative = "", "", False
    for line in (line.strip() for line in lines):
        text = line
        if text.startswith("Negative prompt:"):
            in_negative = True
            text = text[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + text
        else:
            prompt += ("" if prompt == "" else "\n") + text
    return prompt, negative


def _fields(line: str) -> dict[str, str]:
    """The fields of the last line: quoted values unquoted, a size ``WxH`` as ``key-1`` and ``key-2``."""
    found: dict[str, str] = {}
    for key, raw in _PARAM.findall(line):
        if not raw:
            continue  # A1111's parse fails on an empty value and leaves the key out
        value = _unquoted(raw) if raw[0] == '"' and raw[-1] == '"' else raw
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            found[f"{key}-1"], found[f"{key}-2"] = size.group(1), size.group(2)
        else:
            found[key] = value
    return found


def _unquoted(text: str) -> str:
    """A1111's ``unquote``: a JSON string's value, or the text as it is when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _first_pass_size(found: dict[str, Any]) -> None:
    """A1111's ``restore_old_hires_fix_params``: an old infotext's ``First pass size`` becomes the size, and the
    size the hires resize (0x0: the first pass its old algorithm made, about 512² pixels in multiples of 64)."""
    first_width, first_height = found.get("First pass size-1"), found.get("First pass size-2")
    if first_width is None or first_height is None:
        return
    try:
        first_width, first_height = int(first_width), int(first_height)
        width, height = int(found.get("Size-1", 512)), int(found.get("Size-2", 512))
        if first_width == 0 or first_height == 0:
            scale = math.sqrt(512 * 512 / (width * height))
            first_width, first_height = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    except (ValueError, ZeroDivisionError):
        return  # a size that is not one (A1111 fails on it): the fields as they are
    found["Size-1"], found["Size-2"] = first_width, first_height
    found["Hires resize-1"], found["Hires resize-2"] = width, height


def _backward_compatible(found: dict[str, Any]) -> None:
    """A1111's ``infotext_versions.backcompat``: the options an image made by an older A1111 ran with."""
    made_by = _version(found.get("Version"))
    if made_by is None:
        return
    if made_by < version.parse("1.6.0") and "[" in found.get("Prompt", ""):
        found["Old prompt editing timelines"] = True
    if made_by < version.parse("1.6.0") and found.get("Sampler", "") in ("DDIM", "PLMS"):
        found["Pad conds v0"] = True
    if made_by < version.parse("v1.7.0-225"):
        found["Downcast alphas_cumprod"] = True
    if made_by < version.parse("1.8.0") and found.get("Refiner"):
        found["Refiner switch by sampling steps"] = True


def _version(text: Any) -> version.Version | None:
    if not isinstance(text, str):
        return None
    if match := re.match(r"([^-]+-[^-]+)-.*", text):
        text = match.group(1)
    try:
        return version.parse(text)
    except version.InvalidVersion:
        return None


def _user_comment(image: Image.Image) -> str:
    """The text of ``image``'s EXIF UserComment ('' when it has none), as A1111 reads it with piexif: by its
    prefix's encoding, else as UTF-8."""
    try:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment, b"")
    except (OSError, SyntaxError, ValueError):
        return ""  # EXIF that cannot be read: A1111's piexif gives up on it too
    if isinstance(comment, str):
        return comment
    if not isinstance(comment, bytes):
        return ""
    encoding = _USER_COMMENT_ENCODINGS.get(comment[:8])
    if encoding is None:
        return comment.decode("utf8", errors="ignore")
    return comment[8:].decode(encoding, errors="replace")


def _as_json(value: Any) -> Any:
    """A metadata value as A1111's JSON answer carries it: bytes as UTF-8, a tuple as a list, what JSON has no
    value for as text."""
    if isinstance(value, bytes):
        return value.decode("utf8", errors="replace")
    if isinstance(value, tuple | list):
        return [_as_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
