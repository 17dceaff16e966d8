"""Download one large file (an SD 1.5 checkpoint or a VAE) from an http(s) URL at image build time.

A 2-7 GB download from a build machine fails often enough that one plain GET will not do. Here:

- the body streams to a part file named by the URL's hash (``.<hash>.part`` in the destination's folder),
  hashed as it arrives, and is renamed to the destination only once complete and, when a SHA-256 is given,
  verified: a half-written file is never taken for the model;
- beside the part, ``.<hash>.json`` keeps the server's validator (a strong ETag, else Last-Modified) and the
  file's size and name. An attempt that fails part way (a dropped connection, a read timeout, a short body,
  HTTP 5xx or 429) is retried with backoff, asking for the rest only (``Range: bytes=N-``) with ``If-Range``:
  a file that changed on the server comes whole and starts the part over. A part left by an earlier run is
  resumed the same way, and only for the same URL; one without a validator is started over;
- permanent failures (404, 401/403, other 4xx, a wrong checksum) stop at once, with a message saying what to do;
- a bearer token goes only to the host it was given for (``HostToken``), and only while the request stays on
  the URL's own scheme, host and port: Civitai's and Hugging Face's download URLs redirect to presigned URLs on
  other hosts, which are sent no token;
- URLs in messages and logs go through ``redact_url`` (no query, no credentials), and the token never appears.

urllib3 rather than requests: it is already the runtime's dependency, and it lets redirects be followed by hand.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO, NoReturn
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

from src import __version__
from src.prepare.http import file_name_from
from src.settings import TOKEN_HOSTS, HostToken, redact_url

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
MAX_REDIRECTS = 10
PROGRESS_EVERY_S = 10.0
USER_AGENT = f"sd15-worker-builder/{__version__}"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", re.IGNORECASE)


class DownloadError(RuntimeError):
    """The download failed for good; the message says what to do."""


class _TransientError(Exception):
    """This attempt failed in a way another attempt may not."""


def download_file(
    url: str,
    destination: Path,
    *,
    sha256: str | None = None,
    tokens: Sequence[HostToken] = (),
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> str:
    """Download url to destination; return the file's SHA-256 (64 lowercase hex).

    Args:
        url: an ``http://`` or ``https://`` URL.
        destination: the file to write; its folder is created, and holds the part file while it downloads.
            A part an earlier run left for the same URL is resumed, if the server's file has not changed.
        sha256: the expected digest, in any case; the file is deleted when it does not match.
        tokens: the build's tokens; the one for the URL's host, if any, is sent as ``Authorization: Bearer``
            to the URL's own scheme, host and port only, never past a redirect to another.
        attempts: attempts in all; failures part way resume where the last one stopped.
        backoff_s: the wait after the first failed attempt, doubled after each further one.
        timeout_s: the limit for connecting, and for each wait on the server for more bytes.

    Raises:
        DownloadError: a permanent failure (HTTP 4xx, a wrong checksum, a bad URL) or the last attempt failed.
    """
    return _Download(url, sha256, tokens, timeout_s, destination.parent, destination=destination).run(
        attempts, backoff_s
    )[1]


def download_to_folder(
    url: str,
    folder: Path,
    *,
    sha256: str | None = None,
    tokens: Sequence[HostToken] = (),
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> tuple[Path, str]:
    """Download url into folder, named by ``file_name_from`` from the server's answer; see download_file.

    Returns:
        The file's path and its SHA-256.

    Raises:
        DownloadError: as download_file.
    """
    return _Download(url, sha256, tokens, timeout_s, folder).run(attempts, backoff_s)


def sha256_of(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """SHA-256 of a file, read in chunks (files are GBs)."""
    digest = hashlib.sha256()
    for chunk in _read_chunks(path, chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


# --- one download: the .part file, and the attempts that fill it ------------------------------------------------


class _PartFile:
    """The bytes of one URL received so far (``.<key>.part``), their running SHA-256, and what the server said
    of the file (``.<key>.json``): its validator, size and name. ``key`` is the URL's SHA-256, so a part is
    only ever resumed for the URL it came from."""

    def __init__(self, folder: Path, url: str) -> None:
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        self.url = url
        self.path = folder / f".{key}.part"
        self.record_path = folder / f".{key}.json"
        self.size = 0
        self.record: dict[str, Any] = {}
        self._hash = hashlib.sha256()

    def adopt(self) -> int:
        """Take over the bytes an earlier run left for this URL, hashing them; returns their count. A part
        whose record names no validator is dropped: nothing could tell whether the server's file is the same."""
        with _disk_errors(f"reading {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.is_file():
                return 0
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(self.record_path.read_text(encoding="utf-8"))
                self.record = record if isinstance(record, dict) else {}
            if self.if_range() is None:
                log.info("%s: %s has no validator to resume by; starting over", redact_url(self.url), self.path)
                self.restart()
                return 0
            for chunk in _read_chunks(self.path, CHUNK_BYTES):
                self._hash.update(chunk)
                self.size += len(chunk)
        return self.size

    def if_range(self) -> str | None:
        """The ``If-Range`` value for the file these bytes are from: its strong ETag, else its Last-Modified.
        A weak ETag (``W/``) may not be used there (RFC 9110, 13.1.5)."""
        etag = self.record.get("etag")
        if isinstance(etag, str) and etag.startswith('"'):
            return etag
        modified = self.record.get("last_modified")
        return modified if isinstance(modified, str) and modified else None

    def begin(self, response: urllib3.BaseHTTPResponse, total: int | None, name: str) -> None:
        """Start the file from byte 0 for this answer (a 200), recording what identifies it."""
        self.restart()
        self.record = {
            "url": redact_url(self.url),
            "etag": response.headers.get("ETag"),
            "last_modified": response.headers.get("Last-Modified"),
            "size": total,
            "name": name,
        }
        with _disk_errors(f"writing {self.record_path}"):
            self.record_path.write_text(json.dumps(self.record, indent=2), encoding="utf-8")

    def same_file(self, response: urllib3.BaseHTTPResponse, total: int | None) -> bool:
        """Whether a 206 answer is a range of the file the part holds: the same validators and size, where the
        server gives them (a server may ignore If-Range and send a range of a changed file anyway)."""
        for header, key in (("ETag", "etag"), ("Last-Modified", "last_modified")):
            sent, kept = response.headers.get(header), self.record.get(key)
            if sent is not None and kept is not None and sent != kept:
                return False
        return total is None or self.record.get("size") in (None, total)

    def restart(self) -> None:
        """Drop the bytes so far: the next ones start the file."""
        with _disk_errors(f"emptying {self.path}"):
            self.path.write_bytes(b"")
        self.size = 0
        self._hash = hashlib.sha256()

    def append(self, chunks: Iterator[bytes], report: _Progress) -> None:
        """Write ``chunks`` to the end of the file as they arrive; network errors pass through as they are."""
        with _disk_errors(f"opening {self.path}"):
            file: BinaryIO = self.path.open("ab")
        with file:
            for chunk in chunks:
                with _disk_errors(f"writing {self.path}"):
                    file.write(chunk)
                self._hash.update(chunk)
                self.size += len(chunk)
                report(self.size)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def finish(self, destination: Path) -> None:
        with _disk_errors(f"renaming {self.path} to {destination.name}"):
            self.path.replace(destination)
            self.record_path.unlink(missing_ok=True)

    def discard(self) -> None:
        with _disk_errors(f"deleting {self.path}"):
            self.path.unlink(missing_ok=True)
            self.record_path.unlink(missing_ok=True)


class _Progress:
    """Logs the bytes so far at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, name: str, start_size: int, total: int | None) -> None:
        self.name = name
        self.start_size = start_size
        self.total = total
        self.started = time.monotonic()
        self.next_report = self.started + PROGRESS_EVERY_S

    def __call__(self, size: int) -> None:
        now = time.monotonic()
        if now < self.next_report:
            return
        self.next_report = now + PROGRESS_EVERY_S
        speed = (size - self.start_size) / 1e6 / max(now - self.started, 1e-9)
        total = "?" if self.total is None else _megabytes(self.total)
        log.info("%s: %s of %s, %.1f MB/s", self.name, _megabytes(size), total, speed)


class _Download:
    """One URL, fetched into its part file over as many attempts as it takes."""

    def __init__(
        self,
        url: str,
        sha256: str | None,
        tokens: Sequence[HostToken],
        timeout_s: float,
        folder: Path,
        *,
        destination: Path | None = None,
    ) -> None:
        self.url = url
        self.shown = redact_url(url)
        scheme = _scheme(url)
        if scheme not in ("http", "https"):
            raise DownloadError(f"{self.shown}: the scheme {scheme!r} is not supported; use an http:// or https:// URL")
        if not urlsplit(url).hostname:
            raise DownloadError(f"{self.shown}: the URL names no host")
        self.expected = _expected_digest(sha256)
        self.token = next((token for token in tokens if token.applies_to(url)), None)
        self.origin = _origin(url)
        self.authorization = _authorization(url, self.token)
        # Error texts from urllib3 may quote the URL; none of these may reach a message or a log.
        secrets = (self.token and self.token.token, urlsplit(url).query, urlsplit(url).password)
        self.secrets = [secret for secret in secrets if secret]
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.timeout_s = timeout_s
        # download_file's destination; download_to_folder's is named by the server's answer.
        self.destination = destination
        self.part = _PartFile(folder, url)
        if resumed := self.part.adopt():
            log.info("%s: resuming %s from byte %d, left by an earlier run", self.shown, self.part.path, resumed)

    def run(self, attempts: int, backoff_s: float) -> tuple[Path, str]:
        """Attempt until the file is complete, then verify it and move it into place."""
        if attempts < 1:
            raise DownloadError(f"attempts={attempts}: must be at least 1")
        last_error = ""
        with urllib3.PoolManager(retries=False, timeout=self.timeout) as http:
            for attempt in range(1, attempts + 1):
                try:
                    self._attempt(http)
                    break
                except (_TransientError, urllib3.exceptions.HTTPError, OSError) as error:
                    last_error = self._hide(_describe(error, self.timeout_s))
                    wait = backoff_s * 2 ** (attempt - 1)
                    log.warning(
                        "%s: attempt %d of %d failed: %s (%d bytes so far)%s",
                        self.shown,
                        attempt,
                        attempts,
                        last_error,
                        self.part.size,
                        f"; retrying in {wait:g} s" if attempt < attempts else "",
                    )
                    if attempt < attempts:
                        time.sleep(wait)
            else:
                raise DownloadError(self._gave_up(attempts, last_error))
        return self._verify()

    def _attempt(self, http: urllib3.PoolManager) -> None:
        """One GET (after redirects) from the bytes held so far to the end of the file."""
        # At most two passes: a 416 for a part that is not the whole file empties it, and a GET from byte 0
        # is never answered 416.
        while True:
            offset = self.part.size
            if_range = self.part.if_range()
            if offset and if_range is None:
                # The first answer named no validator: bytes from a later answer could be of another file.
                log.info("%s: the server gives no ETag or Last-Modified to resume by; starting over", self.shown)
                self.part.restart()
                offset = 0
            response, final_url = self._open(http, offset, if_range)
            try:
                if response.status == 416:  # Range Not Satisfiable: the part is the whole file, or more
                    total = _content_range(response)[1]
                    if total == offset and self.part.record.get("size") in (None, total):
                        return
                    log.info("%s: %s holds more than the whole file; starting over", self.shown, self.part.path)
                    self.part.restart()
                    continue
                self._receive(response, offset, final_url)
                return
            finally:
                response.close()

    def _open(
        self, http: urllib3.PoolManager, offset: int, if_range: str | None
    ) -> tuple[urllib3.BaseHTTPResponse, str]:
        """GET the URL from ``offset``, following redirects. The answer is 200, 206, or 416 to a Range."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if if_range is not None:
                headers["If-Range"] = if_range
        current = self.url
        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = dict(headers)
            if self.authorization is not None and _origin(current) == self.origin:
                hop_headers["Authorization"] = self.authorization
            response = http.request(
                "GET", current, headers=hop_headers, redirect=False, retries=False, preload_content=False
            )
            status = response.status
            if status in (200, 206) or (status == 416 and offset):
                return response, current
            location = response.headers.get("Location", "").strip()
            response.close()
            if status not in _REDIRECT_STATUSES:
                self._refuse(status, response.reason, current)
            if not location:
                raise DownloadError(f"{self._where(current)}: HTTP {status} redirect without a Location header")
            current = urljoin(current, location)
            if _scheme(current) not in ("http", "https"):
                raise DownloadError(
                    f"{self._where(current)}: redirected to the scheme {_scheme(current)!r}, not http or https"
                )
        raise DownloadError(f"{self._where(current)}: more than {MAX_REDIRECTS} redirects")

    def _refuse(self, status: int, reason: str | None, current: str) -> NoReturn:
        answer = f"HTTP {status} {reason or _phrase(status)}".rstrip()
        if status in (408, 429) or status >= 500:
            raise _TransientError(answer)
        where = self._where(current)
        if status == 404:
            raise DownloadError(f"{where}: {answer}: check the URL")
        if status in (401, 403) and _origin(current) != self.origin:
            raise DownloadError(
                f"{where}: {answer}: refused by the host it redirects to, which is sent no token; "
                "a presigned link may have expired"
            )
        if status in (401, 403) and self.token is not None:
            raise DownloadError(
                f"{where}: {answer}: the token {self.token.variable} gives for {self.token.scope} was refused "
                "(wrong, expired, or without access to this file)"
            )
        if status in (401, 403):
            raise DownloadError(f"{where}: {answer}: the URL needs a token. {token_hint(self.url)}")
        raise DownloadError(f"{where}: {answer}")

    def _receive(self, response: urllib3.BaseHTTPResponse, offset: int, final_url: str) -> None:
        """Append the body to the part: after its bytes for a 206, in their place for a 200."""
        part = self.part
        if response.status == 206:
            start, total = _content_range(response)
            if start != offset:
                part.restart()
                raise _TransientError(
                    f"asked for bytes from {offset}, the server sent bytes from {start}; starting over"
                )
            if not part.same_file(response, total):
                part.restart()
                raise _TransientError(f"the file changed on the server after byte {offset}; starting over")
        else:
            if offset:
                log.info(
                    "%s: the server sent the whole file (it changed since the part was saved, or the server "
                    "ignores Range requests); starting over from byte 0",
                    self.shown,
                )
            self._refuse_html(response, final_url)
            length = response.headers.get("Content-Length", "").strip()
            total = int(length) if length.isdigit() else None
            part.begin(response, total, served_name(self.url, final_url, response.headers.get("Content-Disposition")))
        part.append(_body(response), _Progress(self._name(), part.size, total))
        if total is not None and part.size != total:
            if part.size > total:
                part.restart()
            raise _TransientError(f"the body ended at byte {part.size} of {total}")
        if final_url != self.url:
            log.info("%s: served by %s", self.shown, redact_url(final_url))

    def _refuse_html(self, response: urllib3.BaseHTTPResponse, final_url: str) -> None:
        """Refuse an answer that is an HTML page (a login or error page served with 200), before its body."""
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in ("text/html", "application/xhtml+xml"):
            self.part.discard()
            token = self.token
            hint = f"{token.variable}'s token for {token.scope} was sent" if token else token_hint(self.url)
            raise DownloadError(
                f"{self._where(final_url)}: the server sent an HTML page (Content-Type {content_type}), not the "
                f"file: a login or error page? Check that the URL downloads the file. {hint}"
            )

    def _name(self) -> str:
        """The file's name: the destination's, else what the server's first whole answer named."""
        if self.destination is not None:
            return self.destination.name
        name = self.part.record.get("name")
        return name if isinstance(name, str) and name else file_name_from(self.url, None)

    def _verify(self) -> tuple[Path, str]:
        part = self.part
        actual = part.digest()
        if self.expected is not None and actual != self.expected:
            part.discard()
            raise DownloadError(
                f"{self.shown}: the file's SHA-256 is {actual}, not the expected {self.expected}; it was deleted. "
                "Check the URL and the expected digest"
            )
        destination = self.destination or part.path.parent / self._name()
        part.finish(destination)
        log.info("%s: saved %s (%s), sha256 %s", self.shown, destination, _megabytes(part.size), actual)
        return destination, actual

    def _gave_up(self, attempts: int, last_error: str) -> str:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        message = f"{self.shown}: failed {tries}; the last error: {last_error}."
        if self.part.size:
            return (
                f"{message} The {self.part.size} bytes received so far are kept in {self.part.path}, "
                "so a new build of this URL resumes from there"
            )
        return f"{message} No bytes were received; check the URL and the network"

    def _where(self, current: str) -> str:
        return self.shown if current == self.url else f"{self.shown} (redirected to {redact_url(current)})"

    def _hide(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<hidden>")
        return text


def served_name(url: str, final_url: str, content_disposition: str | None) -> str:
    """The downloaded file's name: Content-Disposition's, else the first of the URL's and the final URL's (after
    redirects) last path segments that has an extension, else the URL's (``file_name_from``).

    Civitai's ``/api/download/models/128713`` names no file and redirects to a URL that does; Hugging Face's
    ``/resolve/main/x.safetensors`` names it and redirects to one named by a hash.
    """
    names = [file_name_from(candidate, content_disposition) for candidate in (url, final_url)]
    return next((name for name in names if Path(name).suffix), names[0])


def token_hint(url: str) -> str:
    """How to give the build a token for ``url``'s host: its own variable, else a DOWNLOAD_TOKENS item."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    variable = next((name for name, hosts in TOKEN_HOSTS.items() if host in hosts), None)
    if variable is not None:
        return f"Pass one for {host} in {variable}: `docker build --secret id={variable.lower()},env={variable} ...`"
    return (
        f"Pass one for {host} in DOWNLOAD_TOKENS={host}=TOKEN: "
        "`docker build --secret id=download_tokens,env=DOWNLOAD_TOKENS ...`"
    )


# --- small helpers ----------------------------------------------------------------------------------------------


def _read_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            yield chunk


def _body(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The body as it arrives, as is. read1, not read: when the connection drops, every byte that came is kept."""
    while chunk := response.read1(CHUNK_BYTES, decode_content=False):
        yield chunk


@contextlib.contextmanager
def _disk_errors(doing: str) -> Iterator[None]:
    """Turns an OSError from the local disk into a DownloadError: a full disk is not worth retrying."""
    try:
        yield
    except OSError as error:
        raise DownloadError(f"{doing}: {error.strerror or error}") from error


def _expected_digest(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise DownloadError(f"sha256={sha256!r}: expected 64 hexadecimal digits (a SHA-256 digest)")
    return digest


def _content_range(response: urllib3.BaseHTTPResponse) -> tuple[int | None, int | None]:
    """The first byte and the whole size from Content-Range; None where it does not say."""
    match = _CONTENT_RANGE.search(response.headers.get("Content-Range", ""))
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total.isdigit() else None)


def _authorization(url: str, token: HostToken | None) -> str | None:
    """The Authorization header for the URL's own origin: the bearer token, else the URL's ``user:password@``."""
    if token is not None:
        return f"Bearer {token.token}"
    parts = urlsplit(url)
    if parts.username is None:
        return None
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return f"Basic {base64.b64encode(credentials).decode('ascii')}"


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port, the default port filled in: where a token may go."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or ""), parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return "", "", None


def _describe(error: BaseException, timeout_s: float) -> str:
    """What went wrong with the server, in a few words."""
    if isinstance(error, _TransientError):
        return str(error)
    if isinstance(error, urllib3.exceptions.NewConnectionError):  # name resolution failures included
        cause = error.__cause__
        reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause or error)
        return f"cannot connect: {reason}"
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
        return f"timed out connecting ({timeout_s:g} s)"
    if isinstance(error, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return f"the server sent nothing for {timeout_s:g} s"
    if isinstance(error, urllib3.exceptions.ProtocolError):
        return f"the connection broke: {_first_line(error)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
