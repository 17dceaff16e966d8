"""S3: the bucket results are uploaded to and image inputs are read from, and the keys it accepts."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator

from src.settings.urls import http_url

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


# S3's rule for bucket names, with the upper case and "_" that older AWS buckets and other providers allow.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")


def region_in(endpoint: str | None) -> str | None:
    """The region an S3 endpoint's host names, as RunPod's uploader (runpod-python's rp_upload) reads it: the label
    after ``s3`` (``s3.eu-west-1.amazonaws.com``, ``bucket.s3.us-west-004.backblazeb2.com``), or before
    ``digitaloceanspaces.com``; None for any other host."""
    host = (urlsplit(endpoint).hostname or "") if endpoint else ""
    labels = host.split(".")
    if host.endswith(".digitaloceanspaces.com") and len(labels) >= 3:
        return labels[-3]
    if "s3" not in labels:
        return None
    # AWS's dual-stack endpoints put "dualstack" between the two. A label right before the registrable domain's
    # last two is no region: s3.wasabisys.com and s3.filebase.com name none, s3.amazonaws.com is us-east-1.
    after = [label for label in labels[labels.index("s3") + 1 :] if label != "dualstack"]
    return after[0] if len(after) >= 3 else None


class StorageSettings(BaseModel):
    """The bucket's variables: ``BUCKET_NAME`` to ``URL_EXPIRY_SECONDS``."""

    bucket_name: str | None = Field(
        None, alias="BUCKET_NAME", description="S3 bucket for uploads. Unset: no uploads, images come back inline."
    )
    bucket_endpoint_url: str | None = Field(
        None,
        alias="BUCKET_ENDPOINT_URL",
        description="S3 endpoint, such as `https://s3.us-east-1.amazonaws.com` or an R2/MinIO URL; unset: AWS. "
        "No credentials in it: they go in the two variables below; no path: the bucket goes in `BUCKET_NAME`.",
    )
    bucket_access_key_id: str | None = Field(None, alias="BUCKET_ACCESS_KEY_ID", description="S3 access key id.")
    bucket_secret_access_key: SecretStr | None = Field(
        None, alias="BUCKET_SECRET_ACCESS_KEY", description="S3 secret key. Never logged or returned."
    )
    bucket_region: str | None = Field(
        None,
        alias="BUCKET_REGION",
        description="S3 region. Unset: read from `BUCKET_ENDPOINT_URL` as RunPod's own uploader reads it "
        "(`s3.eu-west-1.amazonaws.com`, `nyc3.digitaloceanspaces.com`), else `us-east-1`.",
    )
    bucket_prefix: str = Field(
        "",
        alias="BUCKET_PREFIX",
        description="Folder every object key starts with, ending in `/`, such as `renders/`; empty: none.",
    )
    bucket_input_prefix: str = Field(
        "inputs/",
        alias="BUCKET_INPUT_PREFIX",
        description="Folder of the bucket that `s3://` image inputs may be read from, ending in `/`; the worker's "
        "own results (`BUCKET_PREFIX` + `JOB/INDEX-SEED.png` or an upscale job's `JOB/INDEX-upscaled.png`, "
        "`.jpg` or `.webp`) may be read too, and no other key.",
    )
    url_expiry_seconds: int = Field(
        604_800,
        alias="URL_EXPIRY_SECONDS",
        ge=1,
        le=604_800,
        description="Lifetime of presigned URLs; at most 604800 (7 days, the SigV4 maximum).",
    )

    @field_validator("bucket_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = http_url(value)
        if url is None:
            raise ValueError("must be an http:// or https:// URL")
        value = url
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
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            # boto3 would keep the path and put every key under it, while the answer names the key alone.
            raise ValueError("must be the endpoint alone, without a path: the bucket goes in BUCKET_NAME")
        return value

    @field_validator("bucket_name")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET_NAME.fullmatch(value):
            raise ValueError("must be a bucket's name alone: 3 to 63 of a-z 0-9 . -, no scheme, no '/'")
        return value

    @field_validator("bucket_input_prefix", "bucket_prefix")
    @classmethod
    def _folder_key(cls, value: str, info: ValidationInfo) -> str:
        if value == "" and info.field_name == "bucket_prefix":
            return value
        problem = s3_key_problem(value.removesuffix("/")) if value.endswith("/") else "must end with '/'"
        if problem is not None:
            raise ValueError(f"{problem}, such as inputs/ or uploads/2026/")
        return value

    @property
    def bucket_configured(self) -> bool:
        """True when uploads are possible: a bucket is named."""
        return self.bucket_name is not None

    @property
    def bucket_without_a_name(self) -> str | None:
        """A warning when the bucket's other variables are set but BUCKET_NAME is not (RunPod's own uploader
        needs no name): no image is uploaded then."""
        given = [
            name
            for name, value in (
                ("BUCKET_ENDPOINT_URL", self.bucket_endpoint_url),
                ("BUCKET_ACCESS_KEY_ID", self.bucket_access_key_id),
            )
            if value
        ]
        if self.bucket_configured or not given:
            return None
        return f"{' and '.join(given)} set but BUCKET_NAME is not: no image is uploaded, all come back inline"

    @property
    def bucket_region_name(self) -> str:
        """BUCKET_REGION, else the region BUCKET_ENDPOINT_URL names, else us-east-1."""
        return self.bucket_region or region_in(self.bucket_endpoint_url) or "us-east-1"
