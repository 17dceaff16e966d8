"""S3 through boto3: one client per process, a batch's images uploaded in parallel, image inputs read back.

Unlike runpod's ``rp_upload``, nothing here is implicit: the bucket is the one
named by ``BUCKET_NAME``, and a failed upload is an error the caller sees,
never a silent local file path. Messages name the endpoint, the bucket, the
key and the S3 error code, and never a credential.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from src.errors import StorageError, clipped
from src.settings import Settings, s3_key_problem

log = logging.getLogger(__name__)

MAX_PARALLEL_UPLOADS = 8
_READ_CHUNK_BYTES = 64 * 1024
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Uploaded:
    """Where one image went, and how to fetch it."""

    url: str
    bucket: str
    key: str


# (file bytes, label, file extension, content type) for one image; the label is its seed, or ``upscaled``.
Upload = tuple[bytes, str, str, str]


def _without_the_bucket(endpoint: str | None, bucket: str) -> str | None:
    """``endpoint`` without the bucket in its host (``https://renders.s3.eu-west-1.amazonaws.com``, as RunPod's
    docs write an endpoint): the client names the bucket in the path, which with the bucket in the host as well
    would store every object under a folder of the bucket's name."""
    if endpoint is None:
        return None
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if not host.startswith(f"{bucket}.") or host.count(".") < 2:
        return endpoint
    netloc = parts.netloc.replace(host, host.removeprefix(f"{bucket}."), 1)
    log.info("BUCKET_ENDPOINT_URL names the bucket %s in its host: the endpoint used is %s", bucket, netloc)
    return parts._replace(netloc=netloc).geturl()


class S3Storage:
    """Uploads image files to one bucket and presigns GET URLs for them."""

    def __init__(self, settings: Settings) -> None:
        """Create the process's S3 client; no request is sent yet.

        Raises:
            StorageError: boto3 refuses the configuration (an endpoint or region it cannot use,
                an AWS profile it cannot find); the message names the bucket, the endpoint and the problem.
        """
        if settings.bucket_name is None:
            raise ValueError("S3Storage needs BUCKET_NAME")
        self.bucket = settings.bucket_name
        endpoint = _without_the_bucket(settings.bucket_endpoint_url, self.bucket)
        # Settings refuse credentials in the endpoint, so it can be named in every message.
        self.endpoint = endpoint or "AWS S3"
        self._prefix = settings.bucket_prefix
        self._input_prefix = settings.bucket_input_prefix
        # The keys upload_all writes, key_for's shape with job_folder's characters and the output extensions.
        self._result_key = re.compile(
            re.escape(self._prefix) + r"[A-Za-z0-9._-]+/[0-9]+-(?:[0-9]+|upscaled)\.(?:png|jpg|webp)"
        )
        self._outside = (
            f"only keys under BUCKET_INPUT_PREFIX={self._input_prefix!r} and the worker's own results, "
            f"BUCKET_PREFIX={self._prefix!r} + JOB/INDEX-SEED.png or JOB/INDEX-upscaled.png (or .jpg, .webp), can "
            "be read"
        )
        self._expiry = settings.url_expiry_seconds
        secret = settings.bucket_secret_access_key
        try:
            self._client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=settings.bucket_region_name,
                aws_access_key_id=settings.bucket_access_key_id,
                aws_secret_access_key=secret.get_secret_value() if secret else None,
                config=Config(
                    signature_version="s3v4",
                    # standard mode: up to 3 attempts with exponential backoff and jitter.
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=5,
                    read_timeout=30,
                    # Custom endpoints (MinIO, R2, a test server) rarely serve virtual-hosted buckets.
                    s3={"addressing_style": "path" if settings.bucket_endpoint_url else "auto"},
                    max_pool_connections=MAX_PARALLEL_UPLOADS,
                ),
            )
        # botocore's setup errors are BotoCoreError (InvalidRegionError, ProfileNotFound) or a bare
        # ValueError ("Invalid endpoint: ..."); either would escape main() as a traceback.
        except (BotoCoreError, ValueError) as error:
            problem = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            if secret is not None and secret.get_secret_value():
                problem = problem.replace(secret.get_secret_value(), "<hidden>")
            raise StorageError(
                f"cannot set up the S3 client for bucket {self.bucket!r} at {self.endpoint}: {problem}; "
                "check BUCKET_ENDPOINT_URL, BUCKET_REGION and any AWS_* variables"
            ) from None
        self._pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL_UPLOADS, thread_name_prefix="s3-upload")

    @staticmethod
    def job_folder(job_id: str) -> str:
        """The job's id made safe for a key; a job without one gets a random one, once per call."""
        return _UNSAFE_KEY_CHARS.sub("-", job_id).strip("-.") or f"job-{uuid.uuid4().hex}"

    def key_for(self, folder: str, index: int, label: str, extension: str) -> str:
        """``{prefix}{folder}/{index}-{label}.{ext}``, ``folder`` being the job's ``job_folder`` and ``label`` the
        image's seed, or ``upscaled``."""
        return f"{self._prefix}{folder}/{index}-{label}.{extension}"

    def upload_all(
        self, job_id: str, uploads: Sequence[Upload], *, cancelled: threading.Event | None = None
    ) -> list[Uploaded | StorageError]:
        """Upload every file in parallel, all under one folder; each result is where it went or why it failed.
        Once ``cancelled`` is set, a file whose upload has not started is not uploaded."""
        folder = self.job_folder(job_id)
        futures = [
            self._pool.submit(
                self._upload_one, self.key_for(folder, index, label, extension), data, content_type, cancelled
            )
            for index, (data, label, extension, content_type) in enumerate(uploads)
        ]
        return [future.result() for future in futures]

    def _upload_one(
        self, key: str, data: bytes, content_type: str, cancelled: threading.Event | None = None
    ) -> Uploaded | StorageError:
        if cancelled is not None and cancelled.is_set():
            return StorageError(f"s3://{self.bucket}/{key} was not uploaded: the job was cancelled")
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
            url = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self._expiry
            )
        except (ClientError, BotoCoreError) as error:
            return StorageError(f"upload to s3://{self.bucket}/{key} at {self.endpoint} failed: {_describe(error)}")
        return Uploaded(url=url, bucket=self.bucket, key=key)

    def input_key_problem(self, key: str) -> str | None:
        """Why ``key`` may not be read as an image input, or None.

        A request may read a plain key (``settings.s3_key_problem``) under BUCKET_INPUT_PREFIX, or one of
        the worker's own results, so that an earlier result can be fed back; every other key of the bucket
        (credentials, other users' files) stays out of reach. The answer depends on the key alone, never on
        the bucket, so it tells nothing of what the bucket holds.
        """
        problem = s3_key_problem(key)
        if problem is not None:
            return problem
        if key.startswith(self._input_prefix) or self._result_key.fullmatch(key):
            return None
        return self._outside

    def read(self, key: str, limit_bytes: int) -> bytes:
        """The image input ``key`` of this bucket, read in chunks; reading stops once it passes ``limit_bytes``.

        A key ``input_key_problem`` refuses is refused before any request is sent.

        Raises:
            StorageError: the key may not be read (the message names ``s3://bucket/key`` and the rule), the
                object is missing or cannot be read (the message names ``s3://bucket/key``, the endpoint and
                the S3 error code), or it holds more than ``limit_bytes``.
        """
        where = f"s3://{self.bucket}/{key}"
        problem = self.input_key_problem(key)
        if problem is not None:
            raise StorageError(f"{clipped(where)}: {problem}")
        too_large = f"{where} at {self.endpoint} holds more than {limit_bytes} bytes, the limit; stopped reading"
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            try:
                if response.get("ContentLength", 0) > limit_bytes:
                    raise StorageError(too_large)
                data = bytearray()
                for chunk in body.iter_chunks(_READ_CHUNK_BYTES):
                    data += chunk
                    if len(data) > limit_bytes:
                        raise StorageError(too_large)
            finally:
                body.close()
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"reading {where} at {self.endpoint} failed: {_describe(error)}") from None
        return bytes(data)


def _describe(error: ClientError | BotoCoreError) -> str:
    """The S3 error code and its first line; botocore's messages carry no credentials."""
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = details.get("Code", "Unknown")
        message = details.get("Message") or str(error)
        return f"{code}: {message}"
    return f"{type(error).__name__}: {str(error).splitlines()[0]}"
