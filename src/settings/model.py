"""Where the model comes from and what it runs on: the checkpoint and VAE, the build's download tokens, device and
dtype."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator

from src.settings.urls import http_url

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The commit of DEFAULT_MODEL_ID that builds bake and runs load, so that both agree
# and a change upstream never changes the images silently.
DEFAULT_MODEL_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
# Build secrets that name their hosts, and the hosts each token is sent to: exactly these, not their subdomains.
# Hugging Face serves a file from another host after a redirect (cdn-lfs.huggingface.co, cas-bridge.xethub.hf.co)
# with a presigned URL; no token follows a redirect to another host.
TOKEN_HOSTS = {"HF_TOKEN": ("huggingface.co", "hf.co"), "CIVITAI_TOKEN": ("civitai.com",)}


@dataclass(frozen=True)
class HostToken:
    """A download token and the one host it is for: ``scope`` is ``host`` (any port) or ``host:port``. With
    ``https_only`` (the tokens of TOKEN_HOSTS, whose hosts serve HTTPS only) it never goes over plain HTTP, where
    anyone on the way would read it; an operator's own host (DOWNLOAD_TOKENS) may be a mirror on plain HTTP."""

    scope: str
    token: str = field(repr=False)
    variable: str  # the variable that gave it, for messages
    https_only: bool = False

    @property
    def host(self) -> str:
        return _host_and_port(self.scope)[0]

    @property
    def port(self) -> int | None:
        return _host_and_port(self.scope)[1]

    def applies_to(self, url: str) -> bool:
        """Whether ``url``'s host (and port, when the scope names one) is this token's, and its scheme one the
        token may travel by."""
        try:
            parts = urlsplit(url)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        except ValueError:
            return False
        if self.https_only and parts.scheme.lower() != "https":
            return False
        return parts.hostname == self.host and self.port in (None, port)


def _host_and_port(scope: str) -> tuple[str, int | None]:
    """``host`` or ``host:port`` (``[v6]:port``) as a lower-case host and a port; ValueError when it is not one."""
    parts = urlsplit(f"//{scope}")
    port = parts.port  # ValueError when it is not a number from 0 to 65535
    if not parts.hostname or "@" in parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(scope)
    return parts.hostname, port


def _items(value: SecretStr | None) -> list[str]:
    """A list variable's items: split at commas and white space, blanks dropped."""
    return (value.get_secret_value() if value is not None else "").replace(",", " ").split()


class ModelSettings(BaseModel):
    """The model's variables: ``MODEL_ID`` to ``DTYPE``."""

    model_id: str = Field(
        DEFAULT_MODEL_ID,
        alias="MODEL_ID",
        min_length=1,
        description="Hub id of a diffusers SD 1.5 repo, a path to a local diffusers folder, or a path to a "
        "single-file SD 1.5 checkpoint (`.safetensors`; see Your own checkpoint).",
    )
    model_revision: str | None = Field(
        None,
        alias="MODEL_REVISION",
        description="Hub revision (branch, tag or commit). Unset: a pinned commit for the default model, "
        "the default branch for any other.",
    )
    model_dir: str = Field(
        "/models/sd15",
        alias="MODEL_DIR",
        min_length=1,
        description="Folder `builder/cache_model.py` fills at build time. When it holds MODEL_ID at its revision, "
        "the worker loads it from there, offline.",
    )
    model_url: str | None = Field(
        None,
        alias="MODEL_URL",
        description="`http(s)://` URL of a single-file SD 1.5 checkpoint that `builder/cache_model.py` downloads and "
        "converts into MODEL_DIR at build time; the worker then serves that folder, offline. When set, it is "
        "the model, whatever MODEL_ID says. Unset (as in the image, which keeps no URL), a MODEL_DIR baked from a "
        "URL is served unless MODEL_ID is set.",
    )
    model_sha256: str | None = Field(
        None,
        alias="MODEL_SHA256",
        description="SHA-256 (64 hex digits) the checkpoint file (MODEL_URL, or MODEL_ID's file) must have; "
        "checked where the file is read, at build or at startup.",
    )
    model_config_dir: str | None = Field(
        None,
        alias="MODEL_CONFIG",
        description="Diffusers SD 1.5 folder whose configs and tokenizer a single-file checkpoint is built with, "
        "offline. Unset: MODEL_DIR.",
    )
    model_cache_dir: str | None = Field(
        None,
        alias="MODEL_CACHE_DIR",
        description="Folder (such as one on a network volume) where a checkpoint converted at startup is kept as "
        "a diffusers folder, and found again by the next workers. Unset: converted at every start.",
    )
    models_dir: str | None = Field(
        None,
        alias="MODELS_DIR",
        description="Folder (such as `/runpod-volume/models`) of more SD 1.5 models a request may name in `model`: "
        "single-file `.safetensors` checkpoints and diffusers folders, scanned at startup by name (`sub/name`, "
        "without the extension). MODEL_ID stays the default. Unset: MODEL_ID only.",
    )
    vae_dir: str | None = Field(
        None,
        alias="VAE_DIR",
        description="Folder of VAEs a request may name in `vae`: single-file `.safetensors` VAEs and diffusers VAE "
        "folders, scanned at startup by name (`sub/name`, without the extension). Unset: each model's own VAE "
        "(or VAE_ID's).",
    )
    models_preload: str | None = Field(
        None,
        alias="MODELS_PRELOAD",
        description="Names from MODELS_DIR, comma-separated, read into the host cache at startup. Unset: each "
        "model is read at its first use.",
    )
    model_cache_ram_mb: int | None = Field(
        None,
        alias="MODEL_CACHE_RAM_MB",
        ge=0,
        description="Host memory for the weights of MODELS_DIR's models, most recently used kept (the default "
        "model's are always kept). Unset: a quarter of the machine's memory; refused above 80% of it.",
    )
    vae_id: str | None = Field(
        None,
        alias="VAE_ID",
        description="A VAE that replaces the model's: a diffusers VAE folder or a single-file VAE (`.safetensors`, "
        "such as the ft-MSE VAE). Unset: the model's own.",
    )
    vae_url: str | None = Field(
        None,
        alias="VAE_URL",
        description="`http(s)://` URL of a single-file VAE that `builder/cache_model.py` bakes into MODEL_DIR in "
        "place of the model's; the worker then serves it, unless VAE_ID replaces it at run time.",
    )
    vae_sha256: str | None = Field(
        None, alias="VAE_SHA256", description="SHA-256 (64 hex digits) the VAE_URL file must have."
    )
    hf_token: SecretStr | None = Field(
        None,
        alias="HF_TOKEN",
        description="Hugging Face token. The hub client sends it for gated or private repos; the build sends it "
        "with MODEL_URL, VAE_URL, CONTROLNETS and UPSCALERS URLs, and the worker with a request's download URLs, "
        "on `huggingface.co` and `hf.co` only. Never logged.",
    )
    civitai_token: SecretStr | None = Field(
        None,
        alias="CIVITAI_TOKEN",
        description="Civitai token, sent by the build with MODEL_URL, VAE_URL, CONTROLNETS and UPSCALERS URLs, "
        "and by the worker with a request's download URLs, on `civitai.com` only. Never logged.",
    )
    download_tokens: SecretStr | None = Field(
        None,
        alias="DOWNLOAD_TOKENS",
        description="Tokens for other download hosts, as `host=token` items separated by commas, such as "
        "`models.example.com=abc,127.0.0.1:8080=def`: each is sent by the build, and with a request's download "
        "URLs, to that host only (that port too, when given), never to its subdomains. Never logged.",
    )
    download_token: SecretStr | None = Field(
        None,
        alias="DOWNLOAD_TOKEN",
        description="One token, sent by the build to MODEL_URL's host only (the older form of DOWNLOAD_TOKENS); "
        "refused without MODEL_URL. Never logged.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", alias="DEVICE", description="`auto` uses CUDA when a GPU is visible, else the CPU."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        alias="DTYPE",
        description="`auto` is float16 on CUDA and float32 on the CPU. float16 and bfloat16 also run on the CPU, "
        "several times slower than float32 there.",
    )

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("model_url", "vae_url")
    @classmethod
    def _download_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = http_url(value)
        if url is None:
            raise ValueError("must be an http:// or https:// URL")
        value = url
        if "@" in urlsplit(value).netloc:
            raise ValueError("must not carry credentials; pass a token as a build secret (see Your own checkpoint)")
        return value

    @field_validator("download_tokens")
    @classmethod
    def _scoped_tokens(cls, value: SecretStr | None) -> SecretStr | None:
        for number, item in enumerate(_items(value), 1):
            scope, equals, token = item.partition("=")
            if not equals or not token:
                raise ValueError(f"item {number} is not host=token")
            try:
                _host_and_port(scope)
            except ValueError:
                # The item is not quoted: a token pasted without its host, or before it, would be printed.
                raise ValueError(
                    f"item {number}: the part before '=' is not a host, nor host:port (no scheme, no path)"
                ) from None
        return value

    @field_validator("model_sha256", "vae_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be a SHA-256: 64 hex digits")
        return value.lower()

    @property
    def host_tokens(self) -> list[HostToken]:
        """The build's download tokens, each with the one host it is for.

        HF_TOKEN and CIVITAI_TOKEN go to their hosts (TOKEN_HOSTS), DOWNLOAD_TOKENS' items to theirs, and
        DOWNLOAD_TOKEN to MODEL_URL's host (and its port, when MODEL_URL names one).
        """
        tokens = [
            HostToken(host, secret.get_secret_value(), variable, https_only=True)
            for variable, secret in (("HF_TOKEN", self.hf_token), ("CIVITAI_TOKEN", self.civitai_token))
            if secret is not None and secret.get_secret_value()
            for host in TOKEN_HOSTS[variable]
        ]
        for item in _items(self.download_tokens):
            scope, _, token = item.partition("=")
            tokens.append(HostToken(scope.lower(), token, "DOWNLOAD_TOKENS"))
        if self.download_token is not None and self.model_url is not None:
            netloc = urlsplit(self.model_url).netloc.lower()
            tokens.append(HostToken(netloc, self.download_token.get_secret_value(), "DOWNLOAD_TOKEN"))
        return tokens

    @property
    def preload_names(self) -> list[str]:
        """MODELS_PRELOAD's names, in order."""
        return [name.strip() for name in (self.models_preload or "").split(",") if name.strip()]

    @property
    def model_config_folder(self) -> str:
        """Where a single-file checkpoint's configs and tokenizer come from: MODEL_CONFIG, else MODEL_DIR."""
        return self.model_config_dir or self.model_dir

    @property
    def revision(self) -> str | None:
        """The hub revision to use: MODEL_REVISION, else the pinned one for the default model."""
        if self.model_revision is not None:
            return self.model_revision
        return DEFAULT_MODEL_REVISION if self.model_id == DEFAULT_MODEL_ID else None
