"""LoRAs and checkpoints a request names by URL: downloaded once into a cache on the volume, and checked as a
file of LORA_DIR or MODELS_DIR is checked.

Off unless DOWNLOAD_HOSTS names hosts. A URL goes through ``http`` (every hop's host among DOWNLOAD_HOSTS, its
addresses checked unless DOWNLOAD_ALLOW_PRIVATE allows them, the connection pinned to a checked address, a
token only to its own host), within the job's download deadline (DOWNLOAD_TIMEOUT_SECONDS) and at most
MAX_DOWNLOADS at once, and stopped when the job is cancelled. The body is refused at its first bytes when it is
not a safetensors file (a pickle, an HTML page), and stopped at the size cap (MAX_LORA_DOWNLOAD_MB,
MAX_MODEL_DOWNLOAD_MB), never after it. A connection cut part way is resumed (``Range``, with ``If-Range`` so that
a file changed meanwhile comes whole) when the server gave a validator (a strong ETag, or Last-Modified), and
downloaded again from its start when it did not: nothing else tells a changed file from the same one.

The cache, DOWNLOAD_CACHE_DIR:

- ``files/<sha256>.safetensors``: the files, named by their SHA-256, written aside in ``.partial/`` and linked
  into place once complete and checked, so that a worker never sees half a file; a file already in place (the
  same bytes from another URL) stays as it is, with the jobs that hold it;
- ``.partial/``: the downloads in progress, each locked by its writer; one left by a worker that died is removed
  once no one holds it and it is older than a minute;
- ``index/<sha256 of the URL>.json``: what a URL gave (the file's SHA-256 and name, the URL without its query);
  a second request for the URL reads no network;
- ``.locks/<sha256 of the URL>.lock``: one download of a URL at a time, across the workers on the volume; a
  second request for it waits, then finds the file.

A job holds each file it uses open with a shared lock (``Lease``) until it ends; eviction (least recently used
first, past DOWNLOAD_CACHE_GB) takes an exclusive lock first, so it never removes a file a job is using, here or
in another worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from src.errors import JobCancelledError, first_line
from src.prepare.http import (
    FetchError,
    Resolve,
    Rules,
    check_url,
    chunks,
    content_length,
    file_name_from,
    opened,
    shown,
)
from src.schema import GenerateRequest, InputError, ModelDownload
from src.settings import HostToken, Settings, SettingsError, redact_url

if TYPE_CHECKING:
    from src.adapters.loras import LoraFile
    from src.models.library import ModelEntry

log = logging.getLogger(__name__)

LORA, MODEL = "lora", "model"
MB = 1_000_000
# A downloaded file's key in the engine's LoRAs and models: no name a request may give starts with a NUL.
KEY_PREFIX = "\0url/"
_ATTEMPTS = 3
_CHUNK_BYTES = 1 << 20
_WAIT_S = 0.1
# A part file no one holds and no one wrote to for this long was left by a worker that died mid-download.
_STALE_PART_S = 60
# A safetensors file starts with its header's length (8 bytes, little-endian) and the header's "{".
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Downloaded:
    """A file a request named by URL, in the cache and checked: its kind (``lora`` or ``model``), its name as
    A1111 names it (the file name without its extension), its SHA-256, the URL as shown (no query), and what
    the engine registers it as: a ``LoraFile`` or a ``ModelEntry``."""

    kind: str
    name: str
    path: Path
    sha256: str
    url: str
    entry: LoraFile | ModelEntry

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.sha256


@dataclass
class Lease:
    """The cached files one job uses, each held open with a shared lock until ``release``."""

    _handles: list[IO[bytes]] = field(default_factory=list)

    def hold(self, path: Path) -> bool:
        """Hold ``path`` for the job; False when it is gone (evicted meanwhile)."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return False
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            same = os.fstat(handle.fileno()).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed between the open and the lock
            handle.close()
            return False
        self._handles.append(handle)
        return True

    def release(self) -> None:
        while self._handles:
            self._handles.pop().close()


class Downloads:
    """The worker's download cache and the rules its downloads follow; one per process, shared by its jobs."""

    def __init__(self, settings: Settings, resolve: Resolve) -> None:
        """The cache in DOWNLOAD_CACHE_DIR (its folders made), and the rules from ``settings``.

        Raises:
            SettingsError: the folder cannot be written.
        """
        self.folder = Path(settings.download_cache_dir or Path(tempfile.gettempdir()) / "sd15-downloads")
        self.budget = int(settings.download_cache_gb * 1e9)
        self.timeout_s = settings.download_timeout_seconds
        self._limits = {
            LORA: (int(settings.max_lora_download_mb * MB), f"MAX_LORA_DOWNLOAD_MB={settings.max_lora_download_mb:g}"),
            MODEL: (
                int(settings.max_model_download_mb * MB),
                f"MAX_MODEL_DOWNLOAD_MB={settings.max_model_download_mb:g}",
            ),
        }
        self._max_downloads = settings.max_downloads
        self.rules = Rules(
            allow_private=settings.download_private,
            private_setting="DOWNLOAD_ALLOW_PRIVATE",
            timeout_setting=f"DOWNLOAD_TIMEOUT_SECONDS={settings.download_timeout_seconds:g}",
            hosts=settings.download_host_list,
            hosts_setting="DOWNLOAD_HOSTS",
            tokens=tuple(settings.host_tokens),
        )
        self._slots = threading.BoundedSemaphore(settings.max_downloads)
        self._config_folder = Path(settings.model_config_folder)
        self._resolve = resolve
        try:
            for sub in ("files", "index", ".partial", ".locks"):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SettingsError(f"DOWNLOAD_CACHE_DIR={str(self.folder)!r}: cannot be written: {error}") from None
        self._sweep_parts()

    def fetch(
        self,
        url: str,
        *,
        kind: str,
        sha256: str | None,
        field: str,
        deadline: float,
        lease: Lease,
        cancelled: threading.Event | None = None,
    ) -> Downloaded:
        """The file ``url`` gives, from the cache or downloaded, checked, and held by ``lease``.

        Raises:
            InputError: the URL is refused, the download fails or is too large, the checksum differs, or the
                file is not a usable LoRA or SD 1.5 checkpoint; the message names ``field`` and the URL, never
                a token or the query.
            JobCancelledError: ``cancelled`` was set while the download waited or ran.
        """
        stop = _Stop(deadline, cancelled, self.rules.timeout_setting)
        try:
            # A URL the worker would refuse is refused even when the file a checksum names is cached.
            check_url(url, self.rules)
            found = self._cached(url, kind, sha256, lease)
            if found is None:
                with self._url_lock(url, stop):
                    found = self._cached(url, kind, sha256, lease) or self._download(url, kind, sha256, stop, lease)
                self._evict(keep=found.path)
            return found
        except FetchError as error:
            hop = f" (redirected to {shown(error.url)})" if error.url and error.url != url else ""
            raise InputError(f"{field}: {shown(url)}{hop}: {_hint(error, url, self.rules.tokens)}") from None

    # --- the cache ----------------------------------------------------------------------------------------

    def _cached(self, url: str, kind: str, sha256: str | None, lease: Lease) -> Downloaded | None:
        """The file of an earlier download of ``url`` (or, given ``sha256``, of any URL), held; None when there
        is none."""
        record_path = self._record_path(url)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        digest = sha256 or (record or {}).get("sha256")
        if not digest:
            return None
        path = self._file(digest)
        if not lease.hold(path):
            if record is not None and sha256 is None:
                record_path.unlink(missing_ok=True)  # its file was evicted
            return None
        os.utime(path)  # most recently used
        name = record["name"] if record and record.get("sha256") == digest else _stem(file_name_from(url, None))
        return self._checked(url, kind, digest, name, path)

    def _checked(self, url: str, kind: str, digest: str, name: str, path: Path) -> Downloaded:
        """``path`` judged as a file of LORA_DIR or MODELS_DIR is, from its header.

        Raises:
            FetchError: it is not a usable LoRA, or not a usable SD 1.5 checkpoint.
        """
        # Imported here: they import torch, which ``import handler`` must not.
        from src.adapters.loras import describe_lora
        from src.models.library import ModelEntry, model_file_problem

        shown_url = redact_url(url).removesuffix("?<hidden>")
        entry: LoraFile | ModelEntry
        try:
            if kind == LORA:
                entry = describe_lora(name, path, url=shown_url)
                problem = entry.problem
            else:
                problem = model_file_problem(path, self._config_folder)
                entry = ModelEntry(name, path, problem, url=shown_url)
        except Exception as error:  # a file no check foresaw: the request's fault, logged with its traceback
            log.exception("judging %s from %s failed", name, shown_url)
            problem = f"its header cannot be read ({type(error).__name__}: {first_line(error)})"
        if problem is not None:
            raise FetchError(f"the file {name} cannot be used: {problem}")
        return Downloaded(kind, name, path, digest, shown_url, entry)

    def _file(self, sha256: str) -> Path:
        return self.folder / "files" / f"{sha256}.safetensors"

    def _record_path(self, url: str) -> Path:
        return self.folder / "index" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    @contextlib.contextmanager
    def _url_lock(self, url: str, stop: _Stop) -> Iterator[None]:
        """One download of ``url`` at a time, in this worker and every other on the volume."""
        path = self.folder / ".locks" / f"{hashlib.sha256(url.encode()).hexdigest()}.lock"
        with path.open("a+b") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    stop.check("waiting for another download of it")
                    time.sleep(_WAIT_S)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files past DOWNLOAD_CACHE_GB; never ``keep``, nor one a job holds."""
        self._sweep_parts()
        files = []
        for path in (self.folder / "files").glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                return
            if path == keep:
                continue
            try:
                with path.open("rb") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
            except (BlockingIOError, FileNotFoundError):
                continue  # in use, or removed by another worker
            total -= size
            log.info("download cache: removed %s (%d MB) to stay within DOWNLOAD_CACHE_GB", path.name, size // MB)

    def _sweep_parts(self) -> None:
        """Remove what a worker that died mid-download left in ``.partial``: files no one holds (a download in
        progress locks its part) and no one wrote to for ``_STALE_PART_S``."""
        now = time.time()
        for path in (self.folder / ".partial").iterdir():
            try:
                if now - path.stat().st_mtime < _STALE_PART_S:
                    continue
                with path.open("rb") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
            except (BlockingIOError, FileNotFoundError, IsADirectoryError):
                continue  # being written, or removed by another worker
            log.info("download cache: removed %s, left part way by an earlier download", path.name)

    # --- a download ---------------------------------------------------------------------------------------

    def _download(self, url: str, kind: str, sha256: str | None, stop: _Stop, lease: Lease) -> Downloaded:
        """Download ``url`` aside, check it, and put it in the cache; nothing is kept when a check fails."""
        started = time.monotonic()
        # Named as a checkpoint is, for the checks; hidden in .partial until it is complete and checked.
        part = self.folder / ".partial" / f"{uuid.uuid4().hex}.safetensors"
        try:
            with self._slot(stop), _Received(part, *self._limits[kind]) as received:
                name = self._receive(url, received, stop)
            digest = received.digest.hexdigest()
            if sha256 is not None and digest != sha256:
                raise FetchError(f"its SHA-256 is {digest}, not the {sha256} the request gave; nothing was kept")
            found = self._checked(url, kind, digest, name, part)
            path = self._file(digest)
            _put_in_place(part, path)
        finally:
            part.unlink(missing_ok=True)
        record = {"sha256": digest, "name": name, "kind": kind, "url": found.url, "size": received.size}
        scratch = self.folder / ".partial" / f"{uuid.uuid4().hex}.json"
        scratch.write_text(json.dumps(record), encoding="utf-8")
        os.replace(scratch, self._record_path(url))
        if not lease.hold(path):
            raise FetchError("the file was removed from the cache as soon as it was written")
        seconds = time.monotonic() - started
        log.info("downloaded %s (%s, %.1f MB) from %s in %.1f s", name, kind, received.size / MB, found.url, seconds)
        return Downloaded(kind, name, path, digest, found.url, _moved(found.entry, path))

    @contextlib.contextmanager
    def _slot(self, stop: _Stop) -> Iterator[None]:
        """One of MAX_DOWNLOADS downloads in flight, waited for within the deadline."""
        while not self._slots.acquire(timeout=_WAIT_S):
            stop.check(f"waiting for one of the MAX_DOWNLOADS={self._max_downloads} download slots")
        try:
            yield
        finally:
            self._slots.release()

    def _receive(self, url: str, received: _Received, stop: _Stop) -> str:
        """Fill ``received`` from ``url``, resuming after a cut connection; the file's name."""
        name, validator = None, None
        for attempt in range(1, _ATTEMPTS + 1):
            if received.size and validator is None:
                received.restart()  # nothing tells a file changed meanwhile from the same one: all of it again
            headers: dict[str, str] | None = None
            if validator is not None:
                headers = {"Range": f"bytes={received.size}-", "If-Range": validator}
            try:
                with opened(url, self.rules, stop.deadline, self._resolve, headers, cancelled=stop.cancelled) as answer:
                    response = answer.response
                    if received.size and not _continues(response, received.size):
                        received.restart()
                    name = name or _stem(file_name_from(answer.url, response.headers.get("Content-Disposition")))
                    validator = validator or _validator(response.headers)
                    received.expect(content_length(response))
                    for chunk in chunks(response, stop.deadline, self.rules, _CHUNK_BYTES):
                        stop.check("downloading")
                        received.write(chunk)
                    stop.check_cancelled("downloading")  # an end a cancellation's shutdown made is no end of the file
                    return name
            except FetchError as error:
                stop.check_cancelled("downloading")  # the connection was shut as the job was cancelled: say so
                if not error.cut or attempt == _ATTEMPTS:
                    raise
                log.warning("download of %s cut at %d bytes (%s); resuming", shown(url), received.size, error)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class _Stop:
    """When a job's downloads stop waiting or receiving: at its deadline, or once it is cancelled."""

    deadline: float
    cancelled: threading.Event | None
    timeout_setting: str

    def check(self, doing: str) -> None:
        """Go on, or stop: ``doing`` says where, in the message.

        Raises:
            JobCancelledError: the job was cancelled.
            FetchError: the deadline passed.
        """
        self.check_cancelled(doing)
        if time.monotonic() >= self.deadline:
            raise FetchError(f"timed out {doing} ({self.timeout_setting})")

    def check_cancelled(self, doing: str) -> None:
        """Go on, or stop as the job was cancelled: ``doing`` says where, in the message.

        Raises:
            JobCancelledError: the job was cancelled.
        """
        if self.cancelled is not None and self.cancelled.is_set():
            raise JobCancelledError(f"the job was cancelled; it stopped {doing}")


class _Received:
    """The bytes of one download so far, in a part file (locked, so that no sweep takes it), with their running
    SHA-256 and the size cap."""

    def __init__(self, path: Path, limit: int, limit_text: str) -> None:
        self.path, self.limit, self.limit_text = path, limit, limit_text
        self.handle = path.open("wb")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        self.size = 0
        self.digest = hashlib.sha256()
        self._head = b""

    def restart(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.size, self.digest, self._head = 0, hashlib.sha256(), b""

    def expect(self, length: int | None) -> None:
        if length is not None and self.size + length > self.limit:
            raise FetchError(f"it is {self.size + length} bytes, over {self.limit_text}; nothing was downloaded")

    def write(self, chunk: bytes) -> None:
        if len(self._head) < 9:
            self._head += chunk[:9]
            if len(self._head) >= 9:
                _check_start(self._head)
        self.size += len(chunk)
        if self.size > self.limit:
            raise FetchError(f"it grew past {self.limit_text}; stopped there, nothing was kept")
        self.handle.write(chunk)
        self.digest.update(chunk)

    def __enter__(self) -> _Received:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.close()


def _check_start(head: bytes) -> None:
    """Refuse, at its first bytes, a file that is not a safetensors file."""
    length = int.from_bytes(head[:8], "little")
    if 2 <= length <= _MAX_HEADER_BYTES and head[8:9] == b"{":
        return
    if head.startswith(b"PK"):
        kind = "a zip archive: a pickled PyTorch file (.ckpt, .pt, .pth), which is never opened"
    elif head[:1] == b"\x80":
        kind = "a pickle, which is never opened"
    elif head.lstrip()[:1] in (b"<", b"{"):
        kind = "a text page (HTML or JSON), not a file: perhaps a login page, or an error"
    else:
        kind = "not a safetensors file"
    raise FetchError(f"it is {kind}; only .safetensors files are read")


def _put_in_place(part: Path, path: Path) -> None:
    """``part`` at ``path``, unless a file is there already: the same bytes (their SHA-256 names them), which jobs
    may hold; replacing it would leave their locks on a file no longer in the cache."""
    try:
        os.link(part, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not path.exists():
            os.replace(part, path)


def _continues(response: Any, size: int) -> bool:
    """Whether a ranged answer carries the rest from ``size``; a plain 200 brings the whole file again."""
    if response.status != 206:
        return False
    content_range = response.headers.get("Content-Range", "")
    return content_range.replace(" ", "").lower().startswith(f"bytes{size}-")


def _validator(headers: Any) -> str | None:
    """What ``If-Range`` sends back: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag", "")
    if etag and not etag.startswith("W/"):
        return str(etag)
    return headers.get("Last-Modified") or None


def _stem(file_name: str) -> str:
    """A file's name as A1111 names a model or LoRA: without its extension."""
    stem, dot, suffix = file_name.rpartition(".")
    return stem if dot and stem and suffix.lower() in ("safetensors", "ckpt", "pt", "pth", "bin") else file_name


def _moved(entry: LoraFile | ModelEntry, path: Path) -> LoraFile | ModelEntry:
    """``entry`` describing the file at its place in the cache."""
    return dataclasses.replace(entry, path=path)


def _hint(error: FetchError, url: str, tokens: tuple[HostToken, ...]) -> str:
    """The error at ``url`` (or the hop a redirect led to), with what to do for the statuses a token or a URL
    explains: a token is blamed only where one went, or where one could go."""
    if error.status in (401, 403):
        refused_at = error.url or url
        if any(token.applies_to(refused_at) for token in tokens):
            return (
                f"{error}: refused; the token for its host (HF_TOKEN, CIVITAI_TOKEN, DOWNLOAD_TOKENS) is wrong, "
                "or may not read this file"
            )
        if refused_at == url:
            return (
                f"{error}: refused; no token is sent to its host: does it need one (HF_TOKEN, CIVITAI_TOKEN, "
                "DOWNLOAD_TOKENS)?"
            )
        return f"{error}: refused by the file host, which is sent no token: an expired or single-use link?"
    if error.status == 404:
        return f"{error}: no such file on the host"
    return str(error)


def fetch_named_files(
    request: GenerateRequest,
    settings: Settings,
    downloads: Callable[[], Downloads] | None,
    lease: Lease,
    cancelled: threading.Event | None = None,
) -> tuple[GenerateRequest, tuple[Downloaded, ...]]:
    """The LoRAs and model ``request`` names by URL, downloaded (or found in the cache) and checked, within one
    DOWNLOAD_TIMEOUT_SECONDS and until ``cancelled`` is set; and the request naming each by its key, as the engine
    will know it.

    Raises:
        InputError: as ``Downloads.fetch``; or one file given twice.
        JobCancelledError: ``cancelled`` was set.
    """
    model = request.model if isinstance(request.model, ModelDownload) else None
    by_url = [(index, lora) for index, lora in enumerate(request.loras) if lora.url is not None]
    if model is None and not by_url:
        return request, ()
    if downloads is None:
        raise InputError("invalid input: this worker downloads no files (DOWNLOAD_HOSTS is not set)")
    cache = downloads()
    deadline = time.monotonic() + settings.download_timeout_seconds
    fetched: list[Downloaded] = []
    loras = list(request.loras)
    seen: dict[str, int] = {}
    for index, lora in by_url:
        field = f"loras.{index}.url"
        item = cache.fetch(
            str(lora.url),
            kind=LORA,
            sha256=lora.sha256,
            field=field,
            deadline=deadline,
            lease=lease,
            cancelled=cancelled,
        )
        if item.key in seen:
            raise InputError(f"loras.{index}.url: the same file as loras.{seen[item.key]} ({item.name}); give it once")
        seen[item.key] = index
        loras[index] = lora.model_copy(update={"name": item.key})
        fetched.append(item)
    update: dict[str, Any] = {"loras": loras}
    if model is not None:
        item = cache.fetch(
            model.url,
            kind=MODEL,
            sha256=model.sha256,
            field="model",
            deadline=deadline,
            lease=lease,
            cancelled=cancelled,
        )
        update["model"] = item.key
        fetched.append(item)
    return request.model_copy(update=update), tuple(fetched)
