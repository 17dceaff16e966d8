"""FAST_MODE's compiled kernels kept between workers (COMPILE_CACHE_DIR): torch's cache artifacts in one file.

torch.compile spends most of a FAST_MODE cold start compiling (Triton kernels, their autotuning, the graphs
around them). What it made can be serialised (``torch.compiler.save_cache_artifacts``) and loaded by another
process before it compiles (``load_cache_artifacts``), which then finds each kernel instead of making it. The
artifacts are only valid for the same GPU, compute capability, torch version, dtype and UNet shape, so the file's
name carries them all: a worker on another card or torch simply finds no file and compiles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileCache:
    """The cache file of this worker's compiled UNet, and the artifacts loaded from it at startup (none when it
    was not there)."""

    path: Path
    loaded: frozenset[tuple[str, str]] = frozenset()

    @property
    def found(self) -> bool:
        return bool(self.loaded)

    def save(self) -> None:
        """Write what torch.compile made and found so far (torch records the artifacts it finds too), when that
        holds one the file did not: a worker that found everything leaves the file as it was, and one that had to
        compile more (its file was from before a change its key does not see) keeps the more. A failed write is
        logged, never raised: the worker serves on."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            log.info("COMPILE_CACHE_DIR: nothing compiled to keep")
            return
        data, info = saved
        if _keys(info) <= self.loaded:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a worker that starts meanwhile reads no half file.
            with tempfile.NamedTemporaryFile(dir=self.path.parent, delete=False, suffix=".part") as part:
                part.write(data)
            os.replace(part.name, self.path)
        except OSError as error:
            log.warning("COMPILE_CACHE_DIR: cannot keep the compiled kernels in %s: %s", self.path, error)
            return
        log.info("COMPILE_CACHE_DIR: kept %.1f MB of compiled kernels in %s", len(data) / 1e6, self.path)


def _keys(info: Any) -> frozenset[tuple[str, str]]:
    """The artifacts a ``torch.compiler`` CacheInfo names, by kind and key."""
    return frozenset((kind, key) for kind, keys in info.artifacts.items() for key in keys)


def cache_key(device: str, capability: tuple[int, int], dtype: torch.dtype, shape: dict[str, Any]) -> str:
    """The file name for compiled kernels of a UNet of ``shape`` on ``device`` (its name) in ``dtype``."""
    card = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"
    version = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{card}-sm{capability[0]}{capability[1]}-torch{version}-{str(dtype).removeprefix('torch.')}-{digest}.bin"


def open_cache(folder: str | None, unet: Any, dtype: torch.dtype, extra: dict[str, Any]) -> CompileCache | None:
    """The cache of this worker's compiled UNet in ``folder`` (COMPILE_CACHE_DIR), loaded when it is there;
    None without a folder. ``extra`` is what else shapes the compiled graphs (the LoRA slots)."""
    if folder is None:
        return None
    if torch.cuda.is_available():
        device, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    else:
        device, capability = "cpu", (0, 0)
    shape = {"unet": dict(unet.config), **extra}
    path = Path(folder) / cache_key(device, capability, dtype, shape)
    if not path.is_file():
        log.info("COMPILE_CACHE_DIR: no compiled kernels for this GPU and model yet (%s); compiling", path.name)
        return CompileCache(path)
    try:
        # None for a file torch cannot read (it says why in its own warning); it raises for one it cannot open.
        loaded: Any = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - a bad file costs a compile, never the worker
        loaded, problem = None, str(error)
    else:
        problem = "not torch's cache artifacts, or another torch's"
    if loaded is None:
        log.warning("COMPILE_CACHE_DIR: %s cannot be loaded (%s); compiling, then writing it again", path, problem)
        return CompileCache(path)
    log.info("COMPILE_CACHE_DIR: loaded the compiled kernels of %s", path.name)
    return CompileCache(path, loaded=_keys(loaded))
