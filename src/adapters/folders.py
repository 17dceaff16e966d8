"""The files of an adapter folder (LORA_DIR, UPSCALER_DIR) by the names requests give them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from src.errors import AdapterError


def named_files(folder: str, setting: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Every file under ``folder`` whose suffix is one of ``suffixes`` (any case), by name: its path below the
    folder without the extension (``sub/name`` in a subfolder), in name order.

    Raises:
        AdapterError: the folder does not exist; the message names ``setting``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AdapterError(f"{setting}={folder}: not a folder")
    return {
        path.relative_to(root).with_suffix("").as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.suffix.lower() in suffixes and path.is_file()
    }


def a1111_aliases(names: Mapping[str, str | None]) -> dict[str, str]:
    """The names A1111 gives a folder's files beside their names here (``names``: each name, to the alias its
    file's metadata gives it, or None). A1111 names a LoRA by its file's name alone, wherever it lies, and by its
    metadata's alias too, so a prompt written there says ``<lora:name:1>`` for this worker's ``sub/name``. Each such
    name that points to one file only and is no file's own name here, to that file's name."""
    owners: dict[str, set[str]] = defaultdict(set)
    for name, alias in names.items():
        for other in {name.rsplit("/", 1)[-1], alias}:
            if other:
                owners[other].add(name)
    return {alias: next(iter(named)) for alias, named in owners.items() if len(named) == 1 and alias not in names}
