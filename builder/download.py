"""Download one large file (an SD 1.5 checkpoint or a VAE) from an http(s) URL at image build time.

A 2-7 GB download from a build machine fails often enough that one plain GET will not do. Here:

- the body streams to ``<destination>.part``, hashed as it arrives, and is renamed to ``destination`` only once
  complete and, when a SHA-256 is given, verified: a half-written file is never taken for the model;
- an attempt that fails part way (a dropped connection, a read timeout, a short body, HTTP 5xx or 429) is
  retried with backoff, asking for the rest only (``Range: bytes=N-``); a ``.part`` left by an earlier run is
  resumed the same way;
- permanent failures (404, 401/403, other 4xx, a wrong checksum) stop at once, with a message saying what to do;
- a bearer token goes only to the URL's own host: Civitai's download URLs redirect to a presigned CDN URL that
  refuses extra credentials, and a token must not travel to another host anyway;
- URLs in messages and logs lose their query string and credentials (presigned URLs and ``?token=`` carry
  secrets), and the token itself never appears.

urllib3 rather than requests: it is already the runtime's dependency, and it lets redirects be followed by hand.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO, NoReturn
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import urllib3

from src import __version__

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
MAX_REDIRECTS = 10
PROGRESS_EVERY_S = 10.0
DEFAULT_FILE_NAME = "model.safetensors"
TOKEN_HINT = "docker build --secret id=download_token,env=DOWNLOAD_TOKEN ..."
USER_AGENT = f"sd15-worker-builder/{__version__}"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", re.IGNORECASE)
# RFC 6266: filename*=charset'language'percent-encoded, preferred to filename= ("quoted" or a bare token).
_FILENAME_STAR = re.compile(r"""\bfilename\*\s*=\s*"?([^'";\s]*)'[^']*'([^";\s]+)""", re.IGNORECASE)
_FILENAME = re.compile(r"""\bfilename\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)""", re.IGNORECASE)


class DownloadError(RuntimeError):
    """The download failed for good; the message says what to do."""


class _TransientError(Exception):
    """This attempt failed in a way another attempt may not."""


def download_file(
    url: str,
    destination: Path,
    *,
    sha256: str | None = None,
    token: str | None = None,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> str:
    """Download url to destination; return the file's SHA-256 (64 lowercase hex).

    Args:
        url: an ``http://`` or ``https://`` URL.
        destination: the file to write; its folder is created. Bytes in ``destination.part`` are resumed.
        sha256: the expected digest, in any case; the file is deleted when it does not match.
        token: sent as ``Authorization: Bearer`` to the URL's own scheme, host and port only.
        attempts: attempts in all; failures part way resume where the last one stopped.
        backoff_s: the wait after the first failed attempt, doubled after each further one.
        timeout_s: the limit for connecting, and for each wait on the server for more bytes.

    Raises:
        DownloadError: a permanent failure (HTTP 4xx, a wrong checksum, a bad URL) or the last attempt failed.
    """
    return _Download(url, sha256, token, timeout_s, destination=destination).run(attempts, backoff_s)[1]


def download_to_folder(
    url: str,
    folder: Path,
    *,
    sha256: str | None = None,
    token: str | None = None,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> tuple[Path, str]:
    """Download url into folder, named by ``file_name_from`` from the first successful answer; see download_file.

    Returns:
        The file's path and its SHA-256.

    Raises:
        DownloadError: as download_file.
    """
    return _Download(url, sha256, token, timeout_s, folder=folder).run(attempts, backoff_s)


def sha256_of(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """SHA-256 of a file, read in chunks (files are GBs)."""
    digest = hashlib.sha256()
    for chunk in _read_chunks(path, chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def file_name_from(url: str, content_disposition: str | None) -> str:
    """The file name for a download: Content-Disposition's ``filename*``/``filename``, else the URL's last
    path segment, unquoted. Any folder part is dropped, so the name stays inside the folder it is joined to;
    never empty (``model.safetensors`` when nothing names the file)."""
    candidates: list[str] = []
    if content_disposition:
        if star := _FILENAME_STAR.search(content_disposition):
            charset = star.group(1) or "utf-8"
            try:
                codecs.lookup(charset)
            except LookupError:
                charset = "utf-8"
            candidates.append(unquote(star.group(2), encoding=charset, errors="replace"))
        if plain := _FILENAME.search(content_disposition):
            value = plain.group(1)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            candidates.append(value)
    with contextlib.suppress(ValueError):  # an unparsable URL names nothing
        candidates.append(unquote(urlsplit(url).path.rsplit("/", 1)[-1]))
    for candidate in candidates:
        name = "".join(char for char in candidate.replace("\\", "/").rsplit("/", 1)[-1] if char.isprintable())
        name = name.strip()
        if name not in ("", ".", ".."):
            return name
    return DEFAULT_FILE_NAME


# --- one download: the .part file, and the attempts that fill it ------------------------------------------------


class _PartFile:
    """``<destination>.part``: the bytes received so far and their running SHA-256."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.path = destination.with_name(destination.name + ".part")
        self.size = 0
        self._hash = hashlib.sha256()

    def adopt(self) -> int:
        """Take over the bytes an earlier run left, hashing them; returns their count."""
        with _disk_errors(f"reading {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                for chunk in _read_chunks(self.path, CHUNK_BYTES):
                    self._hash.update(chunk)
                    self.size += len(chunk)
        return self.size

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

    def finish(self) -> None:
        with _disk_errors(f"renaming {self.path} to {self.destination.name}"):
            self.path.replace(self.destination)

    def discard(self) -> None:
        with _disk_errors(f"deleting {self.path}"):
            self.path.unlink(missing_ok=True)
            self.destination.unlink(missing_ok=True)


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
    """One URL, fetched into one ``.part`` file over as many attempts as it takes."""

    def __init__(
        self,
        url: str,
        sha256: str | None,
        token: str | None,
        timeout_s: float,
        *,
        destination: Path | None = None,
        folder: Path | None = None,
    ) -> None:
        self.url = url
        self.shown = _shown(url)
        scheme = _scheme(url)
        if scheme not in ("http", "https"):
            raise DownloadError(f"{self.shown}: the scheme {scheme!r} is not supported; use an http:// or https:// URL")
        if not urlsplit(url).hostname:
            raise DownloadError(f"{self.shown}: the URL names no host")
        self.expected = _expected_digest(sha256)
        self.token = token or None
        self.origin = _origin(url)
        self.authorization = _authorization(url, self.token)
        # Error texts from urllib3 may quote the URL; none of these may reach a message or a log.
        self.secrets = [secret for secret in (self.token, urlsplit(url).query, urlsplit(url).password) if secret]
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.timeout_s = timeout_s
        self.folder = folder
        # Known from the start for download_file; for download_to_folder, once the first answer names the file.
        self.part: _PartFile | None = None
        if destination is not None:
            self._use(destination)

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
                        self.part.size if self.part else 0,
                        f"; retrying in {wait:g} s" if attempt < attempts else "",
                    )
                    if attempt < attempts:
                        time.sleep(wait)
            else:
                raise DownloadError(self._gave_up(attempts, last_error))
        assert self.part is not None  # a completed attempt has chosen the file
        return self._verify(self.part)

    def _use(self, destination: Path) -> _PartFile:
        self.part = _PartFile(destination)
        if resumed := self.part.adopt():
            log.info("%s: resuming %s from byte %d, left by an earlier run", self.shown, self.part.path, resumed)
        return self.part

    def _attempt(self, http: urllib3.PoolManager) -> None:
        """One GET (after redirects) from the bytes held so far to the end of the file."""
        # Each pass either finishes or changes the state so that the next pass differs: the file gets its name
        # once, and a stale .part is emptied once (a GET from byte 0 is never answered 416).
        while True:
            offset = self.part.size if self.part else 0
            response, final_url = self._open(http, offset)
            try:
                if self.part is None:
                    assert self.folder is not None
                    name = file_name_from(self.url, response.headers.get("Content-Disposition"))
                    if self._use(self.folder / name).size:
                        continue  # ask again, for the bytes after those an earlier run left
                assert self.part is not None
                if response.status == 416:  # Range Not Satisfiable: the .part is the whole file, or more
                    total = _content_range(response)[1]
                    if total == offset:
                        return
                    log.info("%s: %s holds more than the whole file; starting over", self.shown, self.part.path)
                    self.part.restart()
                    continue
                self._receive(response, offset, final_url)
                return
            finally:
                response.close()

    def _open(self, http: urllib3.PoolManager, offset: int) -> tuple[urllib3.BaseHTTPResponse, str]:
        """GET the URL from ``offset``, following redirects. The answer is 200, 206, or 416 to a Range."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
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
        if status in (401, 403):
            problem = (
                "the token given was refused (wrong, expired, or without access to this file)"
                if self.token is not None
                else "the URL needs a token"
            )
            raise DownloadError(
                f"{where}: {answer}: {problem}. Pass one to the build in the DOWNLOAD_TOKEN variable: `{TOKEN_HINT}`"
            )
        raise DownloadError(f"{where}: {answer}")

    def _receive(self, response: urllib3.BaseHTTPResponse, offset: int, final_url: str) -> None:
        """Append the body to the .part: after its bytes for a 206, in their place for a 200."""
        assert self.part is not None
        part = self.part
        if response.status == 206:
            start, total = _content_range(response)
            if start != offset:
                part.restart()
                raise _TransientError(
                    f"asked for bytes from {offset}, the server sent bytes from {start}; starting over"
                )
        else:
            if offset:
                log.info("%s: the server ignores Range requests; starting over from byte 0", self.shown)
                part.restart()
            length = response.headers.get("Content-Length", "").strip()
            total = int(length) if length.isdigit() else None
        part.append(_body(response), _Progress(part.destination.name, part.size, total))
        if total is not None and part.size != total:
            if part.size > total:
                part.restart()
            raise _TransientError(f"the body ended at byte {part.size} of {total}")
        if final_url != self.url:
            log.info("%s: served by %s", self.shown, _shown(final_url))

    def _verify(self, part: _PartFile) -> tuple[Path, str]:
        actual = part.digest()
        if self.expected is not None and actual != self.expected:
            part.discard()
            raise DownloadError(
                f"{self.shown}: the file's SHA-256 is {actual}, not the expected {self.expected}; it was deleted. "
                "Check the URL and the expected digest"
            )
        part.finish()
        log.info("%s: saved %s (%s), sha256 %s", self.shown, part.destination, _megabytes(part.size), actual)
        return part.destination, actual

    def _gave_up(self, attempts: int, last_error: str) -> str:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        message = f"{self.shown}: failed {tries}; the last error: {last_error}."
        if self.part is not None and self.part.size:
            return (
                f"{message} The {self.part.size} bytes received so far are kept in {self.part.path}, "
                "so a new build resumes from there"
            )
        return f"{message} No bytes were received; check the URL and the network"

    def _where(self, current: str) -> str:
        return self.shown if current == self.url else f"{self.shown} (redirected to {_shown(current)})"

    def _hide(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<hidden>")
        return text


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


def _authorization(url: str, token: str | None) -> str | None:
    """The Authorization header for the URL's own origin: the bearer token, else the URL's ``user:password@``."""
    if token is not None:
        return f"Bearer {token}"
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


def _shown(url: str) -> str:
    """``url`` for messages and logs: no ``user:pass@``, no fragment, and its query as ``?<hidden>``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unparsable URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "<hidden>" if parts.query else "", ""))


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
