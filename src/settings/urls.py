"""URLs as every message, log and label shows them: credentials and queries hidden."""

from __future__ import annotations

import re

# From the scheme's "://" (or the start) to the last "@": greedy, so a password holding "/" or "@" is hidden whole.
_USERINFO = re.compile(r"^([^:/?#]*://)?.*@")
_SCHEME = re.compile(r"^[^:/?#]*://")


def http_url(value: str) -> str | None:
    """``value`` with its scheme in lower case when it is an http:// or https:// URL, in any case (schemes ignore
    case: HTTPS://host is https://host); None when it is not one."""
    scheme, separator, rest = value.partition("://")
    return f"{scheme.lower()}://{rest}" if separator and scheme.lower() in ("http", "https") else None


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
