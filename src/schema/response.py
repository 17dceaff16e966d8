"""The response: a successful job's images and the metadata that reproduces them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from src.schema.core import Task
from src.schema.passes import Hires, Outpaint


class Timings(BaseModel):
    """Milliseconds spent in each stage of the job."""

    inputs: float | None = Field(
        None, description="Reading the input images (download, decode, resize); present when the job had any."
    )
    queue: float = Field(
        description="Waiting for the GPU while other jobs held it (`CONCURRENCY` above 1, or callers on several "
        "threads); about 0 otherwise."
    )
    inference: float = Field(
        description="Text encoding, denoising and VAE decoding, from the moment the job had the GPU."
    )
    encode: float = Field(description="Writing the image files.")
    upload: float | None = Field(None, description="Uploading to S3; present only when the job uploaded.")
    total: float = Field(description="The whole job, from input to response.")


class InlineImage(BaseModel):
    """One image returned inline."""

    image: str = Field(description="Base64 of the image file, with no `data:` prefix.")
    seed: int | None = Field(
        None,
        description="The seed that regenerates this image alone (with `metadata.subseeds`' i-th when "
        "`subseed_strength` is above 0); absent from an `upscale` job's image.",
    )
    nsfw: bool | None = Field(
        None,
        description="Flagged by the safety checker; present only when `SAFETY_CHECKER` is on, "
        "for inline and uploaded images alike.",
    )


class UploadedImage(BaseModel):
    """One image uploaded to S3."""

    url: str = Field(description="Presigned GET URL, valid for `URL_EXPIRY_SECONDS`.")
    bucket: str = Field(description="The bucket it is in.")
    key: str = Field(
        description="Its key: `{BUCKET_PREFIX}{job id}/{index}-{seed}.{ext}`; a job without an id gets "
        "one random `job-...` folder for all its images."
    )
    seed: int | None = Field(None, description="As for inline images.")
    format: str = Field(description="`png`, `jpeg` or `webp`.")
    nsfw: bool | None = Field(None, description="As for inline images.")


class PromptTokens(BaseModel):
    """How long one prompt was, as CLIP read it."""

    tokens: int = Field(description="Tokens of the prompt, its start and end tokens not counted.")
    chunks: int = Field(description="Chunks of 75 tokens it was encoded in, each read by CLIP alone.")


class AppliedLora(BaseModel):
    """A LoRA a job ran with."""

    name: str = Field(description="Its name in `LORA_DIR`; for one by URL, its file name without the extension.")
    scale: float = Field(description="The scale it ran at.")
    hash: str = Field(description="A1111's short hash of the file (its `Lora hashes` value).")
    url: str | None = Field(None, description="For a LoRA by URL: the URL, without its query.")


class AppliedControlNet(BaseModel):
    """A ControlNet unit a job ran with, as A1111 describes it."""

    model: str = Field(description="Its name in `CONTROLNET_DIR`.")
    module: str = Field(description="The preprocessor: `none` or `canny`.")
    weight: float = Field(description="Its scale.")
    guidance_start: float = Field(description="The fraction of the steps where it started acting.")
    guidance_end: float = Field(description="The fraction of the steps where it stopped.")
    control_mode: str = Field(description="`balanced`, `prompt` or `controlnet`.")
    resized: str | None = Field(
        None, description="How the control image was brought to the job's size, when that changed its proportions."
    )


class Metadata(BaseModel):
    """What was generated and how; enough to reproduce every image."""

    prompt: str = Field(description="The prompt, as given.")
    negative_prompt: str = Field(description="The negative prompt, as given.")
    task: Task = Field(description="`txt2img`, `img2img`, `inpaint` or `outpaint`.")
    width: int = Field(description="Width the job ran at; with `hires`, its first pass.")
    height: int = Field(description="Height the job ran at; with `hires`, its first pass.")
    num_inference_steps: int = Field(
        description="Steps asked for; img2img, inpaint and outpaint run the last int(steps x min(strength, 0.999)) + 1 "
        "of them, as A1111's k-diffusion samplers."
    )
    guidance_scale: float = Field(description="Classifier-free guidance used.")
    scheduler: str = Field(description="The canonical name of the scheduler used.")
    clip_skip: int = Field(description="The CLIP layer read, counted from the last as A1111 counts it.")
    pad_conds: bool = Field(
        description="The option the job ran with: `true` reads the shorter of a prompt and a negative of different "
        "lengths padded to the longer (A1111's Pad conds), `false` each alone."
    )
    tiling: bool = Field(description="Whether the image was made to tile seamlessly.")
    deepcache_interval: int = Field(description="DeepCache's interval: the UNet ran whole every this many steps.")
    tome_ratio: float = Field(description="Token merging's ratio; 0: off.")
    embeddings: dict[str, str] | None = Field(
        None,
        description="The textual-inversion embeddings the prompts named, each with A1111's short hash of its "
        "file; present when there were any.",
    )
    loras: list[AppliedLora] | None = Field(
        None,
        description="The LoRAs the job ran with: `name`, `scale` and A1111's short `hash` of each file; "
        "present when there were any.",
    )
    controlnets: list[AppliedControlNet] | None = Field(
        None, description="The ControlNet units the job ran with; present when there were any."
    )
    prompt_tokens: dict[str, PromptTokens] = Field(
        description="For `prompt` and `negative_prompt`: its tokens and the chunks of 75 they were encoded in."
    )
    seeds: list[int] = Field(
        description="The seed of each image, in order: seed + i, or the seed for all with `subseed_strength` above 0."
    )
    subseed: int = Field(description="The variation seed (drawn when not given); it acts with `subseed_strength`.")
    subseeds: list[int] = Field(
        description="The variation seed of each image, in order: subseed + i, as A1111's `all_subseeds`."
    )
    subseed_strength: float = Field(description="The variation strength; 0: the seeds alone.")
    seed_resize_from_w: int = Field(description="Seed resize from, its width; 0: off.")
    seed_resize_from_h: int = Field(description="Seed resize from, its height; 0: off.")
    model: str = Field(
        description="A checkpoint's file name without its extension, as A1111's `Model`; a model of `MODELS_DIR`, "
        "its name there; otherwise `MODEL_ID`, with `@` and its revision when it has one (the default model's "
        "pinned commit, or `MODEL_REVISION`)."
    )
    model_hash: str | None = Field(
        None, description="A checkpoint's A1111 `Model hash`: the first 10 hex digits of its file's SHA-256."
    )
    model_url: str | None = Field(None, description="For a model by URL: the URL, without its query.")
    vae: str | None = Field(
        None, description="With `VAE_ID`, `VAE_URL` or a request's `vae`: the VAE's file or folder name."
    )
    vae_hash: str | None = Field(None, description="A VAE file's A1111 `VAE hash`, as `model_hash`.")
    device: str = Field(description="`cuda` or `cpu`.")
    dtype: str = Field(description="The torch dtype the model ran in, such as `float16`.")
    memory_profile: str = Field(description="`high`, `balanced`, `low`, `minimal` or `cpu`; see Memory.")
    output_format: str = Field(description="`png`, `jpeg` or `webp`.")
    source_width: int | None = Field(None, description="The input image's width, after EXIF rotation.")
    source_height: int | None = Field(None, description="The input image's height, after EXIF rotation.")
    strength: float | None = Field(None, description="With an image: the denoising strength used.")
    resize_mode: str | None = Field(None, description="With an image: how it met width x height.")
    mask_blur: int | None = Field(None, description="Inpaint and outpaint: the mask blur used.")
    inpaint_area: str | None = Field(None, description="Inpaint and outpaint: `whole` or `masked`.")
    inpaint_padding: int | None = Field(None, description="Inpaint and outpaint: the padding used.")
    inpaint_fill: str | None = Field(
        None, description="Inpaint and outpaint: `original`, `fill`, `latent_noise` or `latent_nothing`."
    )
    mask_invert: bool | None = Field(None, description="Inpaint and outpaint: whether the mask was inverted.")
    mask_round: bool | None = Field(
        None, description="Inpaint and outpaint: whether a mask with transparency was rounded to black and white."
    )
    keep_unmasked: bool | None = Field(None, description="Inpaint and outpaint: whether unmasked pixels were kept.")
    outpaint: Outpaint | None = Field(None, description="Outpaint: the pixels added on each side.")
    hires: Hires | None = Field(None, description="Hires fix: scale, steps, strength and upscaler, as run.")
    timings_ms: Timings = Field(description="Milliseconds per stage; see below.")
    phases_ms: dict[str, float] | None = Field(
        None,
        description="`timings_ms.inference` split by phase, as the device ran it (CUDA events on a GPU): "
        "`text_encoding`, `denoising` (every pass), `hires_upscale` (between the passes), `decoding` (the VAE) and "
        "`to_images` (the safety checker and the pictures made).",
    )
    version: str = Field(description="The worker's version.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What the user should know about this result, such as an input image that was resized.",
    )


class GenerateResponse(BaseModel):
    """A successful job's output."""

    images: list[InlineImage | UploadedImage] = Field(
        description="One entry per image, in seed order: inline, or uploaded (or inline after a failed upload)."
    )
    metadata: Metadata


class UpscaleMetadata(BaseModel):
    """What an upscale job did: the upscaler, the sizes, and where the time went."""

    task: Literal["upscale"] = Field(description="`upscale`.")
    upscaler: str = Field(description="The upscaler, as asked (a name of `UPSCALER_DIR`, `lanczos` or `nearest`).")
    upscaler_scale: int | None = Field(
        None, description="The model's own factor (4 for RealESRGAN_x4plus); absent for `lanczos` and `nearest`."
    )
    upscaler_passes: int = Field(
        description="Times the image went through the model (0 for `lanczos` and `nearest`): as many as reach the "
        "target, at most 3."
    )
    scale: float = Field(description="The factor the image was enlarged by, before any crop or padding.")
    width: int = Field(description="The result's width.")
    height: int = Field(description="The result's height.")
    resize_mode: str | None = Field(
        None,
        description="With both `width` and `height`: how the image met them (`crop`, `resize`, `fill` or `cover`).",
    )
    source_width: int = Field(description="The input image's width, after EXIF rotation.")
    source_height: int = Field(description="The input image's height, after EXIF rotation.")
    device: str = Field(description="`cuda` or `cpu`.")
    dtype: str | None = Field(
        None,
        description="The torch dtype the model ran in: the worker's (`float16` on a GPU) where the architecture "
        "runs in it, else `float32`; absent for `lanczos` and `nearest`.",
    )
    output_format: str = Field(description="`png`, `jpeg` or `webp`.")
    timings_ms: Timings = Field(description="Milliseconds per stage; `inference` is the upscale itself.")
    version: str = Field(description="The worker's version.")
    warnings: list[str] = Field(default_factory=list, description="What the user should know about this result.")


class UpscaleResponse(BaseModel):
    """A successful upscale job's output: one image, in the forms a generation job's come in."""

    images: list[InlineImage | UploadedImage] = Field(description="The enlarged image: inline or uploaded.")
    metadata: UpscaleMetadata
