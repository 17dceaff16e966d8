"""The docs' generated tables, rendered from the schema and the settings so they cannot drift.

    python -m src.docs          # rewrite the tables in README.md and docs/*.md
    python -m src.docs --check  # exit 1 when one of them is out of date

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, in whichever
document uses it (the input table in docs/input.md, for instance); every table must appear somewhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from src.schema import (
    CONFIGURED_DEFAULT,
    GenerateRequest,
    InlineImage,
    Metadata,
    Timings,
    UploadedImage,
    UpscaleMetadata,
    UpscaleRequest,
)
from src.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def documents() -> list[Path]:
    """The documents that may hold generated tables: README.md and every page of docs/."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


_JSON_TYPES = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "array": "list",
    "object": "object",
}


def _json_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_json_type(option) for option in schema["anyOf"])
    if schema.get("type") == "null":
        return "null"
    if "$ref" in schema:
        return "object"
    if schema.get("type") == "array":
        return f"list of {_json_type(schema.get('items', {}))}"
    return _JSON_TYPES.get(schema.get("type", ""), "any")


def _row(*cells: str) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def input_table() -> str:
    """Markdown table of the request fields: type, default and rule."""
    schema = GenerateRequest.model_json_schema()
    lines = [_row("field", "type", "default", "rule"), _row("---", "---", "---", "---")]
    for name, prop in schema["properties"].items():
        if name in CONFIGURED_DEFAULT:
            setting = CONFIGURED_DEFAULT[name]
            default = f"`{setting.upper()}` ({_literal(Settings.model_fields[setting].default)})"
        else:
            default = _default_cell(name, prop, schema)
        lines.append(_row(f"`{name}`", _json_type(prop), default, prop.get("description", "")))
        # The fields of a nested object (hires, outpaint), each on its own row after it.
        annotation = GenerateRequest.model_fields[name].annotation
        nested = next((arg for arg in getattr(annotation, "__args__", ()) if isinstance(arg, type)), None)
        if nested is not None and issubclass(nested, BaseModel):
            lines += _nested_rows(nested, f"{name}.")
    return "\n".join(lines)


def upscale_input_table() -> str:
    """Markdown table of an upscale job's fields: type, default and rule."""
    lines = [_row("field", "type", "default", "rule"), _row("---", "---", "---", "---")]
    return "\n".join(lines + _nested_rows(UpscaleRequest, ""))


def _nested_rows(model: type[BaseModel], prefix: str) -> list[str]:
    schema = model.model_json_schema()
    return [
        _row(f"`{prefix}{name}`", _json_type(prop), _default_cell(name, prop, schema), prop.get("description", ""))
        for name, prop in schema["properties"].items()
    ]


def _default_cell(name: str, prop: dict[str, Any], schema: dict[str, Any]) -> str:
    """A field's default as the table shows it: its own words (``shown_default``), required, or the value."""
    if "shown_default" in prop:
        return str(prop["shown_default"])
    if name in schema.get("required", []):
        return "required"
    return f"`{_literal(prop.get('default'))}`"


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def settings_table() -> str:
    """Markdown table of the environment variables the worker reads."""
    lines = [_row("variable", "default", "meaning"), _row("---", "---", "---")]
    for field in Settings.model_fields.values():
        default = field.default
        if default is None:
            shown = "unset"
        elif default == "":
            shown = "empty"
        else:
            shown = f"`{str(default).lower() if isinstance(default, bool) else default}`"
        lines.append(_row(f"`{field.alias}`", shown, field.description or ""))
    return "\n".join(lines)


def _model_rows(model: type[BaseModel], prefix: str, note: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    schema = model.model_json_schema()
    return [
        _row(f"`{prefix}{name}`", _json_type(prop), note + prop.get("description", ""))
        for name, prop in schema["properties"].items()
        if name not in skip
    ]


def output_table() -> str:
    """Markdown table of what a successful job returns."""
    lines = [_row("field", "type", "meaning"), _row("---", "---", "---")]
    lines += _model_rows(InlineImage, "images[].")
    # seed and nsfw mean the same for both kinds of image: listed once, with the inline ones.
    lines += _model_rows(UploadedImage, "images[].", note="Uploaded only, in place of `image`. ", skip=("seed", "nsfw"))
    lines += _model_rows(Metadata, "metadata.")
    lines += _model_rows(Timings, "metadata.timings_ms.")
    return "\n".join(lines)


def upscale_output_table() -> str:
    """Markdown table of an upscale job's metadata (its image is as a generation's, without a seed)."""
    lines = [_row("field", "type", "meaning"), _row("---", "---", "---")]
    lines += _model_rows(UpscaleMetadata, "metadata.")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "inputs": input_table,
    "upscale_inputs": upscale_input_table,
    "settings": settings_table,
    "outputs": output_table,
    "upscale_outputs": upscale_output_table,
}


def tables_in(text: str) -> list[str]:
    """The names of the generated tables ``text`` holds, by their start markers."""
    return [name for name in TABLES if f"<!-- {name}:start -->\n" in text]


def render(text: str) -> str:
    """``text`` with every marked table it holds replaced by its freshly rendered version."""
    for name in tables_in(text):
        start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
        if end not in text:
            raise ValueError(f"{start.strip()} has no {end.strip()} marker")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + TABLES[name]() + end + tail
    return text


def missing_tables(texts: list[str]) -> list[str]:
    """The generated tables that none of ``texts`` holds."""
    held = {name for text in texts for name in tables_in(text)}
    return [name for name in TABLES if name not in held]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.docs", description="Render the docs' generated tables.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a document's tables are out of date")
    args = parser.parse_args(argv)
    texts = {path: path.read_text(encoding="utf-8") for path in documents()}
    missing = missing_tables(list(texts.values()))
    if missing:
        print(f"no document holds the table(s) {', '.join(missing)}: add their markers", file=sys.stderr)
        return 1
    stale = []
    for path, current in texts.items():
        fresh = render(current)
        if fresh == current:
            continue
        stale.append(path.relative_to(ROOT).as_posix())
        if not args.check:
            path.write_text(fresh, encoding="utf-8")
    if args.check and stale:
        print(f"tables out of date in {', '.join(stale)}: run `python -m src.docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
