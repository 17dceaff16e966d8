"""Environment -> one validated ``Settings`` object, read once at startup.

Every variable the worker reads is declared here, with its default and its
rule. ``load_settings`` is called once per process; nothing else in the worker
reads ``os.environ`` for its own configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The commit of DEFAULT_MODEL_ID that builds bake and runs load, so that both agree
# and a change upstream never changes the images silently.
DEFAULT_MODEL_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
# Variables whose values never appear in a message.
_SECRETS = frozenset({"BUCKET_SECRET_ACCESS_KEY", "HF_TOKEN", "CIVITAI_TOKEN", "DOWNLOAD_TOKENS", "DOWNLOAD_TOKEN"})
# Variables holding URLs (CONTROLNETS: a list of them) shown in messages through redact_url only.
_URLS = frozenset({"BUCKET_ENDPOINT_URL", "MODEL_URL", "VAE_URL", "CONTROLNETS"})
# Build secrets that name their hosts, and the hosts each token is sent to: exactly these, not their subdomains.
# Hugging Face serves a file from another host after a redirect (cdn-lfs.huggingface.co, cas-bridge.xethub.hf.co)
# with a presigned URL; no token follows a redirect to another host.
TOKEN_HOSTS = {"HF_TOKEN": ("huggingface.co", "hf.co"), "CIVITAI_TOKEN": ("civitai.com",)}
# From the scheme's "://" (or the start) to the last "@": greedy, so a password holding "/" or "@" is hidden whole.
_USERINFO = re.compile(r"^([^:/?#]*://)?.*@")
_SCHEME = re.compile(r"^[^:/?#]*://")


def redact_url(url: str) -> str:
    """``url`` as every message, log and label shows it, even when it does not parse: ``user:password@`` as
    ``<hidden>@``, the query as ``?<hidden>`` (presigned URLs and ``?token=`` carry secrets), no fragment.

    The one place URLs are redacted: the settings, the loader, image inputs and the build's downloads use it.
    """
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    end = next((index for index, char in enumerate(url) if index >= start and char in "?#"), len(url))
    base, tail = url[:end], url[end:]
    if "@" in tail and "/" not in url[start:end]:
        # An "@" past a "?" or "#" while no "/" has closed the host: a password may hold them, so the host and
        # everything after it may be credentials. Show none of it.
        return f"{url[:start]}<hidden>"
    base = _USERINFO.sub(lambda match: f"{match.group(1) or ''}<hidden>@", base, count=1)
    query = tail.split("#", 1)[0] if tail.startswith("?") else ""
    return f"{base}?<hidden>" if len(query) > 1 else base


@dataclass(frozen=True)
class HostToken:
    """A download token and the one host it is for: ``scope`` is ``host`` (any port) or ``host:port``."""

    scope: str
    token: str = field(repr=False)
    variable: str  # the variable that gave it, for messages

    @property
    def host(self) -> str:
        return _host_and_port(self.scope)[0]

    @property
    def port(self) -> int | None:
        return _host_and_port(self.scope)[1]

    def applies_to(self, url: str) -> bool:
        """Whether ``url``'s host (and port, when the scope names one) is this token's."""
        try:
            parts = urlsplit(url)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        except ValueError:
            return False
        return parts.hostname == self.host and self.port in (None, port)


def _host_and_port(scope: str) -> tuple[str, int | None]:
    """``host`` or ``host:port`` (``[v6]:port``) as a lower-case host and a port; ValueError when it is not one."""
    parts = urlsplit(f"//{scope}")
    port = parts.port  # ValueError when it is not a number from 0 to 65535
    if not parts.hostname or "@" in parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(scope)
    return parts.hostname, port


# The characters AWS calls safe in an object key; a key is parts of them joined by "/".
_S3_KEY_PART = re.compile(r"[A-Za-z0-9!_.*'()-]+")
S3_KEY_RULE = (
    "a key is at most 1024 characters in parts joined by '/', each of A-Z a-z 0-9 and ! - _ . * ' ( ), "
    "none empty, '.' or '..'"
)


def s3_key_problem(key: str) -> str | None:
    """Why ``key`` is not a plain S3 key (``S3_KEY_RULE``), or None.

    Only AWS's safe characters pass, so no percent-encoding, backslash or look-alike Unicode can stand for
    "/" or "..", and no part is "." or "..", which a server or proxy on the way could resolve.
    """
    parts = key.split("/")
    if len(key) > 1024 or any(part in ("", ".", "..") or not _S3_KEY_PART.fullmatch(part) for part in parts):
        return S3_KEY_RULE
    return None


class SettingsError(ValueError):
    """A configuration variable is missing a rule it must follow; startup stops."""


class Settings(BaseModel):
    """The worker's configuration. Field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

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
        "with MODEL_URL, VAE_URL and CONTROLNETS URLs on `huggingface.co` and `hf.co` only. Never logged.",
    )
    civitai_token: SecretStr | None = Field(
        None,
        alias="CIVITAI_TOKEN",
        description="Civitai token, sent by the build with MODEL_URL, VAE_URL and CONTROLNETS URLs on "
        "`civitai.com` only. Never logged.",
    )
    download_tokens: SecretStr | None = Field(
        None,
        alias="DOWNLOAD_TOKENS",
        description="Tokens for other download hosts, as `host=token` items separated by commas, such as "
        "`models.example.com=abc,127.0.0.1:8080=def`: each is sent by the build to that host only (that port "
        "too, when given), never to its subdomains. Never logged.",
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
    max_side: int = Field(
        1024,
        alias="MAX_SIDE",
        ge=512,
        le=4096,
        multiple_of=64,
        description="Largest width or height a request may ask; a multiple of 64, from 512 (the default size) to 4096.",
    )
    max_steps: int = Field(
        150, alias="MAX_STEPS", ge=1, le=1000, description="Largest `num_inference_steps`; 1 to 1000."
    )
    max_images: int = Field(
        4, alias="MAX_IMAGES", ge=1, le=64, description="Largest `num_images` per request; 1 to 64."
    )
    max_pixels: int = Field(
        1_048_576,
        alias="MAX_PIXELS",
        ge=512 * 512,
        description="Largest width x height x num_images per request; at least 262144 (one default 512x512 image).",
    )
    default_steps: int = Field(
        25,
        alias="DEFAULT_STEPS",
        ge=1,
        description="`num_inference_steps` when a request gives none; at most `MAX_STEPS`.",
    )
    default_scheduler: str = Field(
        "DPM++ 2M Karras",
        alias="DEFAULT_SCHEDULER",
        min_length=1,
        description="`scheduler` when a request gives none; one of the `scheduler` names.",
    )
    default_clip_skip: int = Field(
        1,
        alias="DEFAULT_CLIP_SKIP",
        ge=1,
        le=12,
        description="`clip_skip` when a request gives none, 1 to 12; 2 for most anime checkpoints.",
    )
    embeddings_dir: str | None = Field(
        None,
        alias="EMBEDDINGS_DIR",
        description="Folder of textual-inversion embeddings (`.safetensors`, or A1111's `.pt`/`.bin` read as "
        "plain tensors only), loaded at startup; a word in a prompt that is a file's name stands for its vectors. "
        "Unset: none.",
    )
    lora_dir: str | None = Field(
        None,
        alias="LORA_DIR",
        description="Folder of LoRA `.safetensors` files (subfolders too), listed at startup; a request names them "
        "by file name without extension. Unset: LoRA is off.",
    )
    max_loras: int = Field(4, alias="MAX_LORAS", ge=1, le=16, description="Most LoRAs one request may use, 1 to 16.")
    lora_cache_mb: float = Field(
        1024.0,
        alias="LORA_CACHE_MB",
        ge=0,
        le=1_000_000,
        description="Host memory, in MB (10^6 bytes), that loaded LoRAs may keep between jobs, least recently used "
        "dropped first; 0 loads each job's LoRAs from disk.",
    )
    controlnet_dir: str | None = Field(
        None,
        alias="CONTROLNET_DIR",
        description="Folder of SD 1.5 ControlNets: diffusers ControlNet folders and single `.safetensors` files "
        "(such as `control_v11p_sd15_canny`), listed at startup; a request names them by folder or file name "
        "without extension. Unset: ControlNet is off.",
    )
    controlnets_to_bake: str | None = Field(
        None,
        alias="CONTROLNETS",
        description="ControlNets `builder/cache_model.py` bakes into CONTROLNET_DIR at build time, comma-separated: "
        "hub ids (such as `lllyasviel/control_v11p_sd15_canny`, float16 weights only) or `http(s)://` URLs of "
        "single `.safetensors` files (stored in float16).",
    )
    max_controlnets: int = Field(
        2, alias="MAX_CONTROLNETS", ge=1, le=8, description="Most ControlNet units one request may use, 1 to 8."
    )
    controlnet_cache_mb: float = Field(
        2048.0,
        alias="CONTROLNET_CACHE_MB",
        ge=0,
        le=1_000_000,
        description="Memory, in MB (10^6 bytes), that loaded ControlNets may keep on the GPU between jobs (an SD 1.5 "
        "ControlNet is 723 MB in float16); the least recently used goes back to host memory, where as much again "
        "is kept, then is dropped.",
    )
    controlnet_preload: str | None = Field(
        None,
        alias="CONTROLNET_PRELOAD",
        description="ControlNets loaded at startup, by name, comma-separated, such as "
        "`control_v11p_sd15_canny,control_v11f1p_sd15_depth`. Unset: each is loaded on first use.",
    )
    max_prompt_chunks: int = Field(
        8,
        alias="MAX_PROMPT_CHUNKS",
        ge=1,
        le=64,
        description="Most chunks of 75 tokens a prompt may encode to (8: 600 tokens); 1 to 64.",
    )
    max_prompt_texts: int = Field(
        64,
        alias="MAX_PROMPT_TEXTS",
        ge=2,
        le=1000,
        description="Most distinct texts prompt editing (`[a:b:when]`, `[a|b]`) may make of one job's prompt and "
        "negative prompt over all its passes, each encoded by CLIP before the first step; 2 to 1000.",
    )
    memory_profile: Literal["auto", "high", "balanced", "low", "minimal"] = Field(
        "auto",
        alias="MEMORY_PROFILE",
        description="`auto` picks by GPU memory: `high` 10 GiB or more, `balanced` 5.5 to 10 GiB "
        "(a GTX 1060 6GB reports 5.93 GiB), `low` 3.5 to 5.5 GiB, `minimal` below 3.5 GiB.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        alias="GPU_MEMORY_GB",
        gt=0,
        description="Use at most this much GPU memory, in GiB (2^30 bytes), such as `7.5`; "
        "it caps this process. Unset: the whole card.",
    )
    generation_timeout_seconds: float = Field(
        300.0,
        alias="GENERATION_TIMEOUT_SECONDS",
        gt=0,
        description="A job still denoising this long after it got the GPU is stopped at its next step and "
        "answered with an error. Time spent waiting for the GPU does not count.",
    )
    safety_checker: bool = Field(
        False,
        alias="SAFETY_CHECKER",
        description="Load SD's safety checker; each image then carries `nsfw` and flagged images are blacked out.",
    )
    concurrency: int = Field(
        1,
        alias="CONCURRENCY",
        ge=1,
        le=8,
        description="Jobs runpod takes for this worker at once. The handler runs on runpod's event loop, so the "
        "jobs taken still run one after another (see Concurrency in the README): keep 1 and let RunPod scale "
        "by workers.",
    )
    fast_mode: bool = Field(
        False,
        alias="FAST_MODE",
        description="On GPUs of compute capability 7.0 or newer: channels_last, fused QKV, a compiled UNet "
        "and a warm-up at start. Measured on an H200 (BENCHMARKS.md): a cold start of 9.5 to 17.2 s and no "
        "faster jobs, 0.82x to 0.90x plain diffusers' speed at batch 4. Ignored, with a warning, elsewhere.",
    )
    embed_parameters: bool = Field(
        True,
        alias="EMBED_PARAMETERS",
        description="Write the generation parameters into each image file (PNG text chunk, EXIF UserComment).",
    )
    max_response_mb: float = Field(
        20.0,
        alias="MAX_RESPONSE_MB",
        gt=0,
        le=1000,
        description="Largest inline (base64) answer, in MB. RunPod refuses more than 20 on /runsync, 10 on /run.",
    )
    image_urls: bool = Field(
        True,
        alias="IMAGE_URLS",
        description="Accept http:// and https:// URLs as image inputs. `false` refuses them; base64 and "
        "`s3://` inputs still work.",
    )
    image_urls_allow_private: bool = Field(
        False,
        alias="IMAGE_URLS_ALLOW_PRIVATE",
        description="Let image URLs reach loopback, private, link-local, shared and cloud metadata addresses. "
        "Off, a URL whose host resolves to one is refused, and the connection goes to the checked address.",
    )
    max_input_image_mb: float = Field(
        20.0,
        alias="MAX_INPUT_IMAGE_MB",
        gt=0,
        le=200,
        description="Largest image input file (base64, URL or `s3://`), in MB (10^6 bytes) before decoding; "
        "above 0, at most 200.",
    )
    image_fetch_timeout_seconds: float = Field(
        15.0,
        alias="IMAGE_FETCH_TIMEOUT_SECONDS",
        gt=0,
        le=300,
        description="Time allowed to fetch one image URL, redirects and body included; above 0, at most 300.",
    )
    bucket_name: str | None = Field(
        None, alias="BUCKET_NAME", description="S3 bucket for uploads. Unset: no uploads, images come back inline."
    )
    bucket_endpoint_url: str | None = Field(
        None,
        alias="BUCKET_ENDPOINT_URL",
        description="S3 endpoint, such as `https://s3.us-east-1.amazonaws.com` or an R2/MinIO URL; unset: AWS. "
        "No credentials in it: they go in the two variables below.",
    )
    bucket_access_key_id: str | None = Field(None, alias="BUCKET_ACCESS_KEY_ID", description="S3 access key id.")
    bucket_secret_access_key: SecretStr | None = Field(
        None, alias="BUCKET_SECRET_ACCESS_KEY", description="S3 secret key. Never logged or returned."
    )
    bucket_region: str | None = Field(None, alias="BUCKET_REGION", description="S3 region; unset: `us-east-1`.")
    bucket_prefix: str = Field(
        "", alias="BUCKET_PREFIX", description="Prepended to every object key, such as `renders/`."
    )
    bucket_input_prefix: str = Field(
        "inputs/",
        alias="BUCKET_INPUT_PREFIX",
        description="Folder of the bucket that `s3://` image inputs may be read from, ending in `/`; the worker's "
        "own results (`BUCKET_PREFIX` + `JOB/INDEX-SEED.png`, `.jpg` or `.webp`) may be read too, and no other key.",
    )
    url_expiry_seconds: int = Field(
        604_800,
        alias="URL_EXPIRY_SECONDS",
        ge=1,
        le=604_800,
        description="Lifetime of presigned URLs; at most 604800 (7 days, the SigV4 maximum).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", alias="LOG_LEVEL", description="Level of the worker's own log lines: DEBUG, INFO, WARNING or ERROR."
    )

    @field_validator("device", "dtype", "memory_profile", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("bucket_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        # Any "@", checked before parsing: a password holding "/", "?" or "#" would fool urlsplit.
        if "@" in value:
            raise ValueError("must not carry credentials; use BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parses the port, raising ValueError when it is not one
        except ValueError:
            raise ValueError("is not a valid URL: its host or port cannot be read") from None
        if not parts.hostname:
            raise ValueError("must name a host, such as http://127.0.0.1:9000")
        return value

    @field_validator("bucket_input_prefix")
    @classmethod
    def _folder_key(cls, value: str) -> str:
        problem = s3_key_problem(value.removesuffix("/")) if value.endswith("/") else "must end with '/'"
        if problem is not None:
            raise ValueError(f"{problem}, such as inputs/ or uploads/2026/")
        return value

    @field_validator("model_url", "vae_url")
    @classmethod
    def _download_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
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
                raise ValueError(
                    f"item {number}: {scope!r} is not a host, nor host:port (no scheme, no path)"
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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"DEFAULT_STEPS={self.default_steps}: must not exceed MAX_STEPS={self.max_steps}")
        if (self.bucket_access_key_id is None) != (self.bucket_secret_access_key is None):
            raise ValueError(
                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY: set both or neither "
                "(neither: boto3 finds credentials itself, e.g. from an instance role)"
            )
        if self.controlnets_to_bake is not None and self.controlnet_dir is None:
            raise ValueError("CONTROLNETS are baked into CONTROLNET_DIR, which is not set")
        if self.controlnet_preload is not None and self.controlnet_dir is None:
            raise ValueError("CONTROLNET_PRELOAD names ControlNets of CONTROLNET_DIR, which is not set")
        if self.vae_sha256 is not None and self.vae_url is None:
            raise ValueError("VAE_SHA256 is checked against VAE_URL's download; set VAE_URL too")
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

    @property
    def host_tokens(self) -> list[HostToken]:
        """The build's download tokens, each with the one host it is for.

        HF_TOKEN and CIVITAI_TOKEN go to their hosts (TOKEN_HOSTS), DOWNLOAD_TOKENS' items to theirs, and
        DOWNLOAD_TOKEN to MODEL_URL's host (and its port, when MODEL_URL names one).
        """
        tokens = [
            HostToken(host, secret.get_secret_value(), variable)
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
    def controlnet_preload_names(self) -> list[str]:
        """CONTROLNET_PRELOAD's names, in order, without blanks."""
        return [name.strip() for name in (self.controlnet_preload or "").split(",") if name.strip()]

    @property
    def controlnets_to_bake_list(self) -> list[str]:
        """CONTROLNETS' hub ids and URLs, in order, without blanks."""
        return [item.strip() for item in (self.controlnets_to_bake or "").split(",") if item.strip()]

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

    @property
    def bucket_configured(self) -> bool:
        """True when uploads are possible: a bucket is named."""
        return self.bucket_name is not None


def _items(value: SecretStr | None) -> list[str]:
    """A list variable's items: split at commas and white space, blanks dropped."""
    return (value.get_secret_value() if value is not None else "").replace(",", " ").split()


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
