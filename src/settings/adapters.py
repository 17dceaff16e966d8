"""Where the adapters come from: embeddings, LoRAs, ControlNets and upscalers, and the memory they may keep."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AdapterSettings(BaseModel):
    """The adapters' variables: ``EMBEDDINGS_DIR`` to ``UPSCALE_TILE_OVERLAP``."""

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
    upscaler_dir: str | None = Field(
        None,
        alias="UPSCALER_DIR",
        description="Folder of ESRGAN-family upscalers (`.pth`, read as tensors only, and `.safetensors`: ESRGAN, "
        "Real-ESRGAN and its compact models, SwinIR, and what else spandrel recognises), named by file name "
        "without the extension; `hires.upscaler` takes them. Unset: `latent` and `lanczos` only.",
    )
    upscalers_to_bake: str | None = Field(
        None,
        alias="UPSCALERS",
        description="Upscalers `builder/cache_model.py` bakes into UPSCALER_DIR at build time, comma-separated "
        "`http(s)://` URLs of `.pth` or `.safetensors` files (such as RealESRGAN_x4plus.pth's GitHub release URL), "
        "each checked as the worker reads it (a `.pth` as tensors only).",
    )
    upscaler_preload: str | None = Field(
        None,
        alias="UPSCALER_PRELOAD",
        description="Upscalers loaded at startup, by name, comma-separated, such as `RealESRGAN_x4plus`. "
        "Unset: each is loaded on first use.",
    )
    upscaler_cache_mb: float = Field(
        512.0,
        alias="UPSCALER_CACHE_MB",
        ge=0,
        le=1_000_000,
        description="Memory, in MB (10^6 bytes), that loaded upscalers may keep on the device between jobs, least "
        "recently used dropped first; the one in use stays whatever its size.",
    )
    upscale_tile: int = Field(
        512,
        alias="UPSCALE_TILE",
        ge=64,
        le=4096,
        description="An upscaler runs on tiles of at most this many pixels a side, 64 to 4096: smaller tiles "
        "take less GPU memory.",
    )
    upscale_tile_overlap: int = Field(
        32,
        alias="UPSCALE_TILE_OVERLAP",
        ge=0,
        le=512,
        description="Pixels by which neighbouring tiles overlap, 0 to 512, less than UPSCALE_TILE; each keeps its "
        "part up to the middle of the overlap, so no seam is drawn at a tile's edge.",
    )

    @property
    def controlnet_preload_names(self) -> list[str]:
        """CONTROLNET_PRELOAD's names, in order, without blanks."""
        return _names(self.controlnet_preload)

    @property
    def upscaler_preload_names(self) -> list[str]:
        """UPSCALER_PRELOAD's names, in order, without blanks."""
        return _names(self.upscaler_preload)

    @property
    def controlnets_to_bake_list(self) -> list[str]:
        """CONTROLNETS' hub ids and URLs, in order, without blanks."""
        return _names(self.controlnets_to_bake)

    @property
    def upscalers_to_bake_list(self) -> list[str]:
        """UPSCALERS' URLs, in order, without blanks."""
        return _names(self.upscalers_to_bake)


def _names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]
