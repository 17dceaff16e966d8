"""The files of an adapter folder (LORA_DIR, UPSCALER_DIR) by the names requests give them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
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


def basename_aliases(names: Iterable[str]) -> dict[str, str]:
    """A1111's names for the files of a folder's subfolders: A1111 names a LoRA by its file's name alone,
    wherever it lies, so a prompt written there says ``<lora:name:1>`` for this worker's ``sub/name``. Each such
    file name that no other name here ends with (at the top or in another subfolder), to its name."""
    names = list(names)
    counts = Counter(name.rsplit("/", 1)[-1] for name in names)
    return {base: name for name in names if counts[base := name.rsplit("/", 1)[-1]] == 1 and base != name}
