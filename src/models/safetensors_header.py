"""Read a safetensors file's header, without its tensors: the names, dtypes and shapes say what a file is.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the tensor data. Reading the header alone
is enough to refuse a file that is not what it should be (a LoRA, a checkpoint of
another model, a file cut short) before any weight is loaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# A header larger than this is not a model's (SD 1.5 checkpoints have about 200 KB of header).
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
    """The file is not a whole safetensors file; the message starts with its path."""


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the offset its tensor data starts at, reading only the header.

    Raises:
        SafetensorsError: the file is not safetensors, or is shorter than its header says.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        return parse_header(prefix + handle.read(_header_length(prefix, size, path)), size, path)


def parse_header(data: bytes, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file of ``size`` bytes whose first bytes are ``data``, and the offset
    its tensor data starts at.

    Raises:
        SafetensorsError: the file is not safetensors, or is shorter than its header says.
    """
    length = _header_length(data[:8], size, path)
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        raise SafetensorsError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (its header is not an object)")
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if malformed := next((key for key, entry in tensors.items() if not _well_formed(entry)), None):
        raise SafetensorsError(
            f"{path}: not a safetensors file (its header cannot be read): its entry {malformed[:80]!r} gives no "
            "dtype, shape or two offsets"
        )
    end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if 8 + length + end > size:
        raise SafetensorsError(f"{path}: the file is cut short: {size} bytes, its header says {8 + length + end}")
    return header, 8 + length


def _well_formed(entry: Any) -> bool:
    """Whether a tensor's header entry is as safetensors reads one: a dtype's name, a shape of sizes, and the two
    offsets of its bytes. A file with another loads nowhere: a LoRA's failed at the GPU stage, every later job."""

    def counts(values: Any, length: int | None = None) -> bool:
        return (
            isinstance(values, list)
            and length in (None, len(values))
            and all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values)
        )

    if not isinstance(entry, dict):
        return False
    return isinstance(entry.get("dtype"), str) and counts(entry.get("shape")) and counts(entry.get("data_offsets"), 2)


def tensor_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, by name, from a header."""
    return {key: tuple(int(side) for side in entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def _header_length(prefix: bytes, size: int, path: Path) -> int:
    if len(prefix) < 8:
        raise SafetensorsError(f"{path}: not a safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: not a safetensors file (its header would be {length} bytes)")
    if length > size - 8:
        # A plausible header length the file cannot hold: a download cut off inside the header.
        raise SafetensorsError(f"{path}: the file is cut short: {size} bytes, its header alone says {length + 8}")
    return int(length)
