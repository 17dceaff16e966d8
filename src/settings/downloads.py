"""LoRAs and checkpoints a request names by URL: the hosts allowed, the limits, and the disk cache."""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, Field, field_validator

# A host name as DOWNLOAD_HOSTS lists it: lower-case labels, or an IPv4 address (tests, private mirrors).
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class DownloadSettings(BaseModel):
    """The downloads' variables: ``DOWNLOAD_HOSTS`` to ``DOWNLOAD_CACHE_GB``."""

    download_hosts: str | None = Field(
        None,
        alias="DOWNLOAD_HOSTS",
        description="Hosts a request may name LoRAs and models on by URL, comma-separated, such as "
        "`civitai.com,huggingface.co`; each host's subdomains too (the file servers they redirect to must be "
        "listed as well). Unset: URLs in `loras` and `model` are refused.",
    )
    download_allow_private: str = Field(
        "false",
        alias="DOWNLOAD_ALLOW_PRIVATE",
        description="`true` lets download URLs reach loopback, private, link-local, shared and cloud metadata "
        "addresses; or the addresses and networks of a private mirror, comma-separated (such as "
        "`10.0.0.7,192.168.1.0/24`), only those. `false`: a host that resolves to one is refused, and the "
        "connection goes to the checked address.",
    )
    max_lora_download_mb: float = Field(
        1000.0,
        alias="MAX_LORA_DOWNLOAD_MB",
        gt=0,
        le=100_000,
        description="Largest LoRA file a request may download, in MB (10^6 bytes); the download stops there.",
    )
    max_model_download_mb: float = Field(
        8000.0,
        alias="MAX_MODEL_DOWNLOAD_MB",
        gt=0,
        le=100_000,
        description="Largest checkpoint file a request may download, in MB (10^6 bytes); the download stops there.",
    )
    download_timeout_seconds: float = Field(
        600.0,
        alias="DOWNLOAD_TIMEOUT_SECONDS",
        gt=0,
        le=3600,
        description="Time a job's downloads may take together, waits for another download of the same file "
        "included, before the job waits for the GPU; above 0, at most 3600.",
    )
    max_downloads: int = Field(
        2,
        alias="MAX_DOWNLOADS",
        ge=1,
        le=16,
        description="Downloads in flight at once in one worker, 1 to 16; more wait their turn.",
    )
    download_cache_dir: str | None = Field(
        None,
        alias="DOWNLOAD_CACHE_DIR",
        description="Folder (such as `/runpod-volume/downloads`) where downloaded files are kept, named by their "
        "SHA-256, for every worker on the volume. Unset: a folder in the worker's temporary space.",
    )
    download_cache_gb: float = Field(
        50.0,
        alias="DOWNLOAD_CACHE_GB",
        gt=0,
        le=100_000,
        description="Disk the download cache may take, in GB (10^9 bytes); least recently used files are removed "
        "past it, never one a job is using.",
    )

    @field_validator("download_hosts")
    @classmethod
    def _host_names(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for host in value.replace(",", " ").split():
            if not _HOST.match(host.lower()):
                raise ValueError(f"{host!r} is not a host name (such as civitai.com): no scheme, port or path")
        return value

    @field_validator("download_allow_private")
    @classmethod
    def _private_rule(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("true", "false", "1", "0", "yes", "no"):
            return {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(value, value)
        for item in value.replace(",", " ").split():
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not true, false, an address or a network (10.0.0.0/8)") from None
        return value

    @property
    def download_private(self) -> bool | tuple[IPNetwork, ...]:
        """DOWNLOAD_ALLOW_PRIVATE: True (any), False (none), or the private networks allowed."""
        if self.download_allow_private in ("true", "false"):
            return self.download_allow_private == "true"
        items = self.download_allow_private.replace(",", " ").split()
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)

    @property
    def download_host_list(self) -> tuple[str, ...]:
        """DOWNLOAD_HOSTS' hosts, lower case; empty when downloads are off."""
        return tuple(host.lower() for host in (self.download_hosts or "").replace(",", " ").split())

    @property
    def downloads_on(self) -> bool:
        return bool(self.download_host_list)
