"""``Settings``, composed of the variables' groups, and ``load_settings``, which reads it from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from src.settings.adapters import AdapterSettings
from src.settings.downloads import DownloadSettings
from src.settings.images import ImageSettings
from src.settings.limits import LimitSettings
from src.settings.model import ModelSettings
from src.settings.run import RunSettings
from src.settings.storage import StorageSettings
from src.settings.urls import redact_url

# Variables whose values never appear in a message.
_SECRETS = frozenset({"BUCKET_SECRET_ACCESS_KEY", "HF_TOKEN", "CIVITAI_TOKEN", "DOWNLOAD_TOKENS", "DOWNLOAD_TOKEN"})
# Variables holding URLs (CONTROLNETS, UPSCALERS: lists of them) shown in messages through redact_url only.
_URLS = frozenset({"BUCKET_ENDPOINT_URL", "MODEL_URL", "VAE_URL", "CONTROLNETS", "UPSCALERS"})

# The extensions that make MODEL_ID a single file, as src.models.checkpoints.is_file_path reads it (the settings
# import nothing of ours; tests/test_checkpoints.py holds the two together).
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl")

# Variables that name or fill what a folder variable gives: (the field, the folder's field, the rule when it is unset).
_NEEDS_FOLDER = (
    ("controlnets_to_bake", "controlnet_dir", "CONTROLNETS are baked into CONTROLNET_DIR, which is not set"),
    (
        "controlnet_preload",
        "controlnet_dir",
        "CONTROLNET_PRELOAD names ControlNets of CONTROLNET_DIR, which is not set",
    ),
    ("upscalers_to_bake", "upscaler_dir", "UPSCALERS are baked into UPSCALER_DIR, which is not set"),
    ("upscaler_preload", "upscaler_dir", "UPSCALER_PRELOAD names upscalers of UPSCALER_DIR, which is not set"),
)


class SettingsError(ValueError):
    """A configuration variable is missing a rule it must follow; startup stops."""


# The groups are listed last to first: pydantic takes the bases' fields in the reverse of this order (the MRO's),
# so MODEL_ID comes first and the README's settings table keeps its order.
class Settings(
    StorageSettings, DownloadSettings, ImageSettings, RunSettings, AdapterSettings, LimitSettings, ModelSettings
):
    """The worker's configuration. Field aliases are the environment variable names."""

    # No inf or nan: GPU_MEMORY_GB=inf passed `gt=0` and broke the start with an OverflowError naming nothing.
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid", allow_inf_nan=False)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        alias="LOG_LEVEL",
        description="Level of the worker's own log lines: DEBUG, INFO, WARNING or ERROR. "
        "The libraries' lines stay at INFO or above (at DEBUG they would log URLs whole, signatures included).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"DEFAULT_STEPS={self.default_steps}: must not exceed MAX_STEPS={self.max_steps}")
        if self.max_jobs_in_memory is not None and self.max_jobs_in_memory > self.concurrency:
            raise ValueError(
                f"MAX_JOBS_IN_MEMORY={self.max_jobs_in_memory}: must not exceed CONCURRENCY={self.concurrency}, "
                "the most jobs the worker holds at once"
            )
        if (self.bucket_access_key_id is None) != (self.bucket_secret_access_key is None):
            raise ValueError(
                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY: set both or neither "
                "(neither: boto3 finds credentials itself, e.g. from an instance role)"
            )
        for field, folder, rule in _NEEDS_FOLDER:
            if getattr(self, field) is not None and getattr(self, folder) is None:
                raise ValueError(rule)
        if self.upscale_tile_overlap >= self.upscale_tile:
            raise ValueError(
                f"UPSCALE_TILE_OVERLAP={self.upscale_tile_overlap}: must be less than UPSCALE_TILE={self.upscale_tile}"
            )
        if self.vae_sha256 is not None and self.vae_url is None:
            raise ValueError("VAE_SHA256 is checked against VAE_URL's download; set VAE_URL too")
        if self.model_sha256 is not None and not self._checkpoint_named():
            raise ValueError(
                f"MODEL_SHA256={self.model_sha256}: it checks the single-file checkpoint MODEL_URL downloads or "
                f"MODEL_ID names, and MODEL_ID={self.model_id!r} names a hub repo or a folder (MODEL_URL is not set); "
                "set MODEL_URL, point MODEL_ID at the file, or unset MODEL_SHA256"
            )
        if self.download_token is not None and self.model_url is None:
            raise ValueError(
                "DOWNLOAD_TOKEN is sent to MODEL_URL's host only, and MODEL_URL is not set; give each host its "
                "token: HF_TOKEN, CIVITAI_TOKEN or DOWNLOAD_TOKENS=host=token"
            )
        tokens = self.host_tokens
        for index, first in enumerate(tokens):
            for second in tokens[index + 1 :]:
                ports_meet = first.port is None or second.port is None or first.port == second.port
                if first.host == second.host and ports_meet and first.token != second.token:
                    raise ValueError(
                        f"{first.variable} and {second.variable} give different tokens for {first.host}; give one"
                    )
        return self

    def _checkpoint_named(self) -> bool:
        """Whether the settings name a single-file checkpoint: MODEL_URL, a MODEL_ID that is a file, or no MODEL_ID
        at all (the image's case: it keeps no MODEL_URL, and MODEL_DIR's label may name the checkpoint baked)."""
        if self.model_url is not None or "model_id" not in self.model_fields_set:
            return True
        path = Path(self.model_id).expanduser()
        return path.suffix.lower() in CHECKPOINT_SUFFIXES or path.is_file()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the worker's variables from ``environ`` (default: ``os.environ``).

    Unset and empty variables take their defaults.

    Raises:
        SettingsError: one message naming every bad variable, its value and its rule.
    """
    environ = os.environ if environ is None else environ
    names = [field.alias for field in Settings.model_fields.values() if field.alias]
    present = {name: environ[name].strip() for name in names if environ.get(name, "").strip()}
    try:
        return Settings.model_validate(present)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            name = str(item["loc"][0]) if item["loc"] else ""
            message = item["msg"].removeprefix("Value error, ")
            if name:
                value = present.get(name)
                if name in _SECRETS:
                    value = "<hidden>"
                elif name in _URLS and value is not None:
                    value = repr(",".join(redact_url(item) for item in value.split(",")))
                else:
                    value = repr(value)
                message = f"{name}={value}: {message.replace('Input should be', 'must be')}"
            problems.append(message)
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
