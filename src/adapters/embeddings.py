"""Files from the allow-listed folders: textual-inversion embeddings from ``EMBEDDINGS_DIR``.

Loaded once, at startup, and used by name. ``.safetensors`` files are read as
tensors; A1111's ``.pt`` and ``.bin`` files with ``torch.load(weights_only=True)``
only, so a pickle that holds anything but tensors, numbers and strings is
refused without running a line of it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from src.errors import AdapterError

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: its vectors, one per token it stands for."""

    name: str
    vectors: torch.Tensor  # (tokens, width), float32
    # A1111's short hash: the first 12 hex digits of the file's SHA-256.
    short_hash: str


def load_embeddings(folder: str | None, width: int) -> dict[str, Embedding]:
    """Every embedding in ``folder`` (and its subfolders), by file name without extension.

    Raises:
        AdapterError: a file is not an embedding for a text encoder of ``width``.
    """
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise AdapterError(f"EMBEDDINGS_DIR={folder}: not a folder")
    embeddings: dict[str, Embedding] = {}
    files: dict[str, Path] = {}
    # One file per name: a .safetensors file before a pickle of that name (A1111 folders often hold both), then
    # the first path.
    found = [path for path in root.rglob("*") if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file()]
    for path in sorted(found, key=lambda path: (path.suffix.lower() != ".safetensors", str(path))):
        name = path.stem
        if name in files:
            log.warning("%s is not used: %s is the embedding named %r", path, files[name], name)
            continue
        files[name] = path
    for name, path in sorted(files.items(), key=lambda item: str(item[1])):
        vectors = _vectors(path, width)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        embeddings[name] = Embedding(name=name, vectors=vectors, short_hash=digest)
    if embeddings:
        listed = ", ".join(f"{item.name} ({len(item.vectors)} vectors)" for item in embeddings.values())
        log.info("embeddings from %s: %s", folder, listed)
    return embeddings


def _vectors(path: Path, width: int) -> torch.Tensor:
    """The file's vectors as a (tokens, width) float32 tensor."""
    try:
        if path.suffix.lower() == ".safetensors":
            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read names the file; nothing else is run
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise AdapterError(f"{path}: cannot be read as an embedding ({type(error).__name__}: {reason})") from None
    tensor = _the_tensor(data)
    if tensor is None:
        raise AdapterError(
            f"{path}: holds no embedding tensor (expected A1111's string_to_param, emb_params, "
            "or one tensor, as diffusers saves it)"
        )
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[1] != width:
        raise AdapterError(
            f"{path}: its vectors are {tuple(tensor.shape)}, and this model's text encoder needs (n, {width}); "
            "is it an embedding for another model (SD 2.x or SDXL)?"
        )
    return tensor.detach().to(torch.float32)


def _the_tensor(data: Any) -> torch.Tensor | None:
    """The vectors in A1111's (``string_to_param``, ``emb_params``) or diffusers' (one tensor) layouts."""
    if isinstance(data, torch.Tensor):
        return data
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("string_to_param"), dict):
        params = list(data["string_to_param"].values())
        return params[0] if params and isinstance(params[0], torch.Tensor) else None
    if isinstance(data.get("emb_params"), torch.Tensor):
        return data["emb_params"]
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None
