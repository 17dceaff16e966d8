"""Find the weights and load the SD 1.5 pipeline: device, dtype, local folder or hub.

Loading never hangs: a hub id whose weights are not on disk is looked up on
the hub with a short timeout first, and a failed look-up ends startup with a
message that says what to do.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import constants as hub_constants
from huggingface_hub import model_info
from transformers.utils import logging as transformers_logging

from src.errors import ModelLoadError
from src.settings import Settings

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 5.0

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU.

    Raises:
        ModelLoadError: ``cuda`` was asked for and torch sees no CUDA device.
    """
    has_cuda = torch.cuda.is_available()
    if setting == "cuda" and not has_cuda:
        raise ModelLoadError(
            f"DEVICE='cuda': torch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda or 'none'}); set DEVICE=auto or DEVICE=cpu, "
            "or run on a GPU host with the CUDA build of torch"
        )
    if setting == "cpu" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 on the CPU; any other setting is used as it is.

    float32 is the CPU's default because half precision there is several times slower;
    float16 and bfloat16 still run on the CPU (torch's CPU kernels have them), which lets
    the half-precision paths be exercised without a GPU.
    """
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


def _ways_out(model_id: str) -> str:
    return (
        "Ways out: (1) cache the weights at build time, into the image "
        "(see the README's Model weights section); (2) point MODEL_ID at a local diffusers folder; "
        f"(3) for a smoke test with no weights, `python -m builder.tiny_model /tmp/tiny` "
        f"and MODEL_ID=/tmp/tiny. The model asked for was MODEL_ID={model_id!r}."
    )


def _probe_hub(model_id: str, revision: str | None) -> None:
    """Ask the hub about the repo with a hard deadline, so that startup cannot hang.

    The request runs in a worker thread because name resolution is not covered
    by the HTTP client's own timeout.
    """
    if hub_constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{model_id!r} is not on this machine and HF_HUB_OFFLINE is set. {_ways_out(model_id)}")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-probe")
    future = pool.submit(model_info, model_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    try:
        future.result(timeout=HUB_PROBE_TIMEOUT_S + 5)
    except concurrent.futures.TimeoutError:
        raise ModelLoadError(
            f"{model_id!r} is not on this machine and the Hugging Face hub did not answer within "
            f"{HUB_PROBE_TIMEOUT_S + 5:.0f} s. {_ways_out(model_id)}"
        ) from None
    except Exception as error:  # any failure of the look-up means the same thing to the user
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ModelLoadError(
            f"{model_id!r} is not on this machine and the Hugging Face hub could not provide it "
            f"({type(error).__name__}: {reason}). {_ways_out(model_id)}"
        ) from error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# Written by builder/cache_model.py next to the weights it downloads: what they are.
BAKED_SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class BakedSource:
    """Which model, revision and file variant a baked folder holds."""

    model_id: str
    revision: str | None
    variant: str | None
    safety_checker: bool

    def holds(self, model_id: str, revision: str | None) -> bool:
        """Whether the folder holds this model at this revision, whatever else it holds."""
        return (self.model_id, self.revision) == (model_id, revision)

    def matches(self, model_id: str, revision: str | None, safety_checker: bool) -> bool:
        """Whether the folder holds everything a worker with these settings loads."""
        return self.holds(model_id, revision) and (self.safety_checker or not safety_checker)


def read_baked_source(folder: Path) -> BakedSource | None:
    """The baked folder's ``source.json``, or None when there is no usable one."""
    try:
        return BakedSource(**json.loads((folder / BAKED_SOURCE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def load_pipeline(settings: Settings, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load ``settings.model_id`` (a local folder or a hub id) in ``dtype``, on the CPU.

    The engine places it on the device, as its memory profile says.

    MODEL_ID at its revision is loaded from MODEL_DIR, offline, when the build baked
    it there. Otherwise a hub id is read from the local cache when it is there, and
    downloaded only after the hub has answered a quick look-up.

    Raises:
        ModelLoadError: the folder is not a diffusers pipeline, or the weights are
            neither on disk nor reachable.
    """
    # Progress bars are for humans at a terminal; in a worker they are log noise.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    model_id, revision = settings.model_id, settings.revision
    options: dict[str, Any] = {"dtype": dtype}
    if not settings.safety_checker:
        # Off by default (see the README). Without requires_safety_checker=False,
        # diffusers warns about it on every load.
        options.update(safety_checker=None, requires_safety_checker=False)
    folder = Path(model_id).expanduser()
    baked = read_baked_source(Path(settings.model_dir))
    if baked is not None and baked.holds(model_id, revision) and settings.safety_checker and not baked.safety_checker:
        raise ModelLoadError(
            f"SAFETY_CHECKER=true, but MODEL_DIR={settings.model_dir!r} holds {model_id}@{revision} baked "
            "without the safety checker. Bake it with the checker: `docker build --build-arg "
            "SAFETY_CHECKER=true ...`, or `SAFETY_CHECKER=true python -m builder.cache_model` with this "
            "MODEL_DIR; or set SAFETY_CHECKER=false"
        )
    if baked is not None and baked.matches(model_id, revision, settings.safety_checker):
        log.info("loading %s@%s from %s, baked at build time", model_id, revision, settings.model_dir)
        pipeline = StableDiffusionPipeline.from_pretrained(
            settings.model_dir, local_files_only=True, use_safetensors=True, variant=baked.variant, **options
        )
    elif folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"MODEL_ID={model_id!r} is a folder but not a diffusers pipeline: it has no "
                f"model_index.json. {_ways_out(model_id)}"
            )
        pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **options)
    elif model_id.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(
            f"MODEL_ID={model_id!r} looks like a path, but no such folder exists. {_ways_out(model_id)}"
        )
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                model_id, local_files_only=True, revision=revision, **options
            )
            log.info("loaded %s from the local Hugging Face cache", model_id)
        except OSError:
            log.info("%s is not in the local cache; asking the hub", model_id)
            _probe_hub(model_id, revision)
            pipeline = StableDiffusionPipeline.from_pretrained(model_id, revision=revision, **options)
    if settings.safety_checker and getattr(pipeline, "safety_checker", None) is None:
        raise ModelLoadError(
            f"SAFETY_CHECKER=true, but MODEL_ID={model_id!r} has no safety_checker and feature_extractor; "
            "use a model that ships them (SD 1.5 does) or set SAFETY_CHECKER=false"
        )
    return pipeline
