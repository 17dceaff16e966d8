"""Image files in and out: parameters written into results, the inline answer's size, image inputs by URL."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ImageSettings(BaseModel):
    """The image files' variables: ``EMBED_PARAMETERS`` to ``IMAGE_FETCH_TIMEOUT_SECONDS``."""

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
