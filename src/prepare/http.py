"""The HTTP GETs a request makes the worker send (image inputs, LoRAs and models by URL), each connection
pinned to an address that was checked.

A URL's host is resolved and every address it resolves to is checked (``address_problem``: loopback, private,
link-local, shared, multicast, reserved and the cloud metadata addresses are refused unless the caller's rules
allow private addresses); the connection then goes to a checked address, the hostname travelling only in the
Host header, the TLS server name and the certificate check. A DNS answer that changes between the check and
the connection (DNS rebinding) therefore cannot reach a private address. Redirects are followed here, at most
``Rules.max_redirects``, each hop checked the same way (and, when the rules name hosts, its host among them), and
one deadline covers them all: a connection is shut when it passes, or once the caller's job is cancelled,
whatever it waits for (a status line, headers or a TLS handshake dripped a byte at a time, or nothing, included).
A bearer token goes to the hops on its own host only (``HostToken``): never to the presigned URL on another host
that Civitai and Hugging Face redirect to, and HF_TOKEN's and CIVITAI_TOKEN's never over plain HTTP.
"""

from __future__ import annotations

import codecs
import contextlib
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import urllib3
import urllib3.connection

from src import __version__
from src.errors import clipped, first_line
from src.settings import HostToken, redact_url

MAX_REDIRECTS = 5
# How soon a cancelled job's connection is shut.
_CANCEL_POLL_S = 0.1
USER_AGENT = f"sd15-worker/{__version__}"
DEFAULT_FILE_NAME = "model.safetensors"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CLOUD_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 6266: filename*=charset'language'percent-encoded, preferred to filename= ("quoted" or a bare token).
_FILENAME_STAR = re.compile(r"""\bfilename\*\s*=\s*"?([^'";\s]*)'[^']*'([^";\s]+)""", re.IGNORECASE)
_FILENAME = re.compile(r"""\bfilename\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)""", re.IGNORECASE)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A host name and port -> its addresses as text, in the resolver's preferred order; raises OSError (such as
# socket.gaierror) when the name has none.
Resolve = Callable[[str, int], list[str]]


def system_resolve(host: str, port: int) -> list[str]:
    """``host``'s addresses from the system resolver (getaddrinfo), in its order: what the worker uses.

    Raises:
        OSError: socket.gaierror when the name does not resolve.
    """
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


class FetchError(Exception):
    """Why a GET failed, in a few words. ``url`` is the hop it failed at; ``status`` the HTTP status, when the
    server answered with an error; ``cut`` is True when the body stopped part way (another attempt may resume)."""

    def __init__(self, message: str, url: str = "", *, status: int | None = None, cut: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.cut = cut


@dataclass(frozen=True)
class Rules:
    """What a caller allows: private addresses (True: all, False: none, or these networks; ``private_setting``
    names the variable that allows them), the hosts (None: any, else each host and its subdomains, named by
    ``hosts_setting``), the tokens,
    the variable whose deadline applies (``timeout_setting``, as ``NAME=value``), and the Accept header."""

    allow_private: bool | tuple[IPNetwork, ...]
    private_setting: str
    timeout_setting: str
    accept: str = "*/*"
    hosts: tuple[str, ...] | None = None
    hosts_setting: str = ""
    tokens: tuple[HostToken, ...] = field(default=(), repr=False)
    max_redirects: int = MAX_REDIRECTS


@dataclass(frozen=True)
class _Target:
    """One URL, split into what a connection pinned to a checked address needs."""

    scheme: str
    host: str  # ASCII (IDNA), lower case, without brackets: for DNS, SNI and the certificate check
    port: int
    host_header: str
    path: str  # path and query, percent-encoded


@dataclass
class Opened:
    """A 2xx answer: the URL it came from after redirects, and the response, its body not read yet."""

    url: str
    response: urllib3.BaseHTTPResponse


def address_problem(address: IPAddress) -> str | None:
    """Why the worker must not fetch from ``address`` (such as ``a loopback address``); None for a public one."""
    if address in _CLOUD_METADATA:
        return "the cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address carried inside IPv6 reaches that IPv4 host: judge the IPv4 one.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            problem = address_problem(embedded)
            return f"{problem} ({embedded} inside IPv6)" if problem else None
    kinds = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address in _SHARED, "a shared (carrier-grade NAT) address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((kind for matches, kind in kinds if matches), None)


def shown(url: str) -> str:
    """``url`` as ``redact_url`` shows it, and not too long: safe for messages and logs."""
    return clipped(redact_url(url))


@contextlib.contextmanager
def opened(
    url: str,
    rules: Rules,
    deadline: float,
    resolve: Resolve,
    headers: Mapping[str, str] | None = None,
    *,
    cancelled: threading.Event | None = None,
) -> Iterator[Opened]:
    """GET ``url``, following redirects, every hop checked; the 2xx answer for the ``with`` block, closed after.
    Each connection is shut at the deadline, or soon after ``cancelled`` is set: what waits on it (the answer,
    the body) then fails as a cut connection does, and the caller, seeing ``cancelled``, says so.

    Raises:
        FetchError: a hop is refused, the server cannot be reached or answers with an error status, the
            deadline passes, or the connection was shut as ``cancelled`` was set; its ``url`` is the hop.
    """
    context: ssl.SSLContext | None = None
    current = url
    for _ in range(1 + rules.max_redirects):
        try:
            target = _target(current, rules)
            addresses = _allowed_addresses(target, rules, deadline, resolve)
            if target.scheme == "https" and context is None:
                context = ssl.create_default_context()
            pool, response = _request(
                target,
                addresses,
                deadline,
                context,
                rules,
                headers=_headers(current, rules, headers),
                cancelled=cancelled,
            )
        except FetchError as error:
            error.url = current
            raise
        try:
            if response.status in _REDIRECT_STATUSES:
                location = response.headers.get("Location", "").strip()
                if not location:
                    raise FetchError(f"HTTP {response.status} redirect without a Location", current)
                try:
                    current = urljoin(current, location)
                except ValueError:  # such as an unclosed [ in its host
                    raise FetchError(f"HTTP {response.status} redirect to an invalid URL", current) from None
                continue
            if not 200 <= response.status < 300:
                reason = f"HTTP {response.status} {response.reason or ''}".rstrip()
                raise FetchError(reason, current, status=response.status)
            yield Opened(current, response)
            return
        finally:
            response.close()
            pool.close()
    raise FetchError(f"more than {rules.max_redirects} redirects", current)


def chunks(response: urllib3.BaseHTTPResponse, deadline: float, rules: Rules, size: int) -> Iterator[bytes]:
    """The body as it arrives, in chunks of at most ``size`` bytes, within the deadline.

    Raises:
        FetchError: the deadline passed, or the connection broke (``cut``).
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(f"it came with Content-Encoding: {encoding}; the file is expected as is")
    sock = getattr(getattr(response, "connection", None), "sock", None)
    while True:
        # The clock is checked between chunks, so a server that drips bytes is cut at the deadline; the
        # socket's timeout follows the deadline down, so one that goes silent is cut at it too (and
        # ``_CutAtDeadline`` shuts the connection at the deadline whatever happens).
        remaining = _remaining(deadline, rules)
        if sock is not None:
            sock.settimeout(remaining)
        try:
            chunk = response.read1(size, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            _remaining(deadline, rules)  # the connection was shut at the deadline: say so, not "cut"
            raise FetchError(connection_problem(error, rules), cut=True) from None
        if not chunk:
            _remaining(deadline, rules)  # an end that the deadline's shutdown made is no end of the file
            return
        yield chunk


def content_length(response: urllib3.BaseHTTPResponse) -> int | None:
    """The body's length the server announced, if it did."""
    length = response.headers.get("Content-Length", "").strip()
    return int(length) if re.fullmatch(r"[0-9]{1,20}", length) else None


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


def check_url(url: str, rules: Rules) -> None:
    """Refuse ``url`` as ``opened`` would before any connection: its scheme, its form, its host.

    Raises:
        FetchError: as ``opened`` for such a URL.
    """
    try:
        _target(url, rules)
    except FetchError as error:
        error.url = url
        raise


def host_allowed(host: str, hosts: tuple[str, ...]) -> bool:
    """Whether ``host`` is one of ``hosts`` or a subdomain of one."""
    return any(host == allowed or host.endswith("." + allowed) for allowed in hosts)


def _headers(url: str, rules: Rules, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": rules.accept,
        # The body's size is checked as it arrives; a compressed body would grow once decoded.
        "Accept-Encoding": "identity",
        **(extra or {}),
    }
    token = next((token for token in rules.tokens if token.applies_to(url)), None)
    if token is not None:
        headers["Authorization"] = f"Bearer {token.token}"
    return headers


def _target(url: str, rules: Rules) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise FetchError("is not a valid URL: its host or port cannot be read") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"the scheme {scheme!r} is not http or https")
    if "@" in parts.netloc:
        raise FetchError("credentials in the URL (user:password@) are not supported")
    if not parts.hostname:
        raise FetchError("names no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError(f"the host {parts.hostname!r} is not a valid name") from None
    if rules.hosts is not None and not host_allowed(host, rules.hosts):
        raise FetchError(f"the host {host} is not in {rules.hosts_setting} ({', '.join(rules.hosts) or 'empty'})")
    shown_host = f"[{host}]" if ":" in host else host
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return _Target(
        scheme=scheme,
        host=host,
        port=port or (443 if scheme == "https" else 80),
        host_header=shown_host if port is None else f"{shown_host}:{port}",
        path=path,
    )


def _allowed_addresses(target: _Target, rules: Rules, deadline: float, resolve: Resolve) -> list[IPAddress]:
    """The addresses to connect to: all of them checked, unless the rules allow private addresses."""
    try:
        addresses = [ipaddress.ip_address(target.host)]
        literal = True
    except ValueError:
        addresses = _resolve(target.host, target.port, _remaining(deadline, rules), resolve)
        literal = False
    if rules.allow_private is True:
        return addresses
    allowed = rules.allow_private or ()
    for address in addresses:
        problem = address_problem(address)
        if problem is not None and not any(address in network for network in allowed):
            what = f"{address} is" if literal else f"{target.host} resolves to {address},"
            setting = rules.private_setting
            hint = f"{setting} (it allows {', '.join(map(str, allowed))})" if allowed else f"{setting}=true"
            raise FetchError(f"{what} {problem}; set {hint} to allow")
    return addresses


def _resolve(host: str, port: int, timeout: float, resolve: Resolve) -> list[IPAddress]:
    """``host``'s addresses, in the resolver's order; getaddrinfo has no timeout, so it runs in a thread
    that is left to finish on its own when the deadline passes first."""
    answers: list[list[IPAddress] | str] = []

    def lookup() -> None:
        try:
            answers.append(list(dict.fromkeys(ipaddress.ip_address(address) for address in resolve(host, port))))
        except OSError as error:
            answers.append(error.strerror or str(error))
        except (UnicodeError, ValueError) as error:  # a name the resolver cannot even encode
            answers.append(str(error))

    thread = threading.Thread(target=lookup, name="url-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answers:
        raise FetchError(f"cannot resolve the host {host!r}: no answer within {timeout:.3g} s")
    answer = answers[0]
    if isinstance(answer, str):
        raise FetchError(f"cannot resolve the host {host!r}: {answer}")
    if not answer:
        raise FetchError(f"cannot resolve the host {host!r}: no address")
    return answer


def _request(
    target: _Target,
    addresses: list[IPAddress],
    deadline: float,
    context: ssl.SSLContext | None,
    rules: Rules,
    *,
    headers: dict[str, str],
    cancelled: threading.Event | None,
) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    """Send the GET to the first checked address that accepts a connection; each connection is shut at
    ``deadline``, or once ``cancelled`` is set."""
    headers = {"Host": target.host_header, **headers}
    failures: list[tuple[IPAddress, str]] = []
    for address in addresses:
        remaining = _remaining(deadline, rules)
        timeout = urllib3.Timeout(connect=remaining, read=remaining)
        pool = _pool(target, address, context, timeout, deadline=deadline, cancelled=cancelled)
        try:
            response = pool.urlopen(
                "GET",
                target.path,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
        except urllib3.exceptions.ConnectTimeoutError as error:  # NewConnectionError included
            pool.close()
            failures.append((address, connection_problem(error, rules)))
            continue
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            pool.close()
            _remaining(deadline, rules)  # the connection was shut at the deadline: say so
            raise FetchError(connection_problem(error, rules)) from None
        return pool, response
    if len(failures) == 1:
        reasons = failures[0][1]
    else:
        reasons = "; ".join(f"{address}: {problem}" for address, problem in failures)
    raise FetchError(f"cannot connect to {target.host} port {target.port}: {reasons}")


def _pool(
    target: _Target,
    address: IPAddress,
    context: ssl.SSLContext | None,
    timeout: urllib3.Timeout,
    *,
    deadline: float,
    cancelled: threading.Event | None,
) -> urllib3.HTTPConnectionPool:
    """A pool of one connection to ``address`` for ``target``, shut at ``deadline`` or once ``cancelled`` is set."""
    if target.scheme == "https":
        return _TLSPool(
            str(address),
            target.port,
            timeout=timeout,
            retries=False,
            maxsize=1,
            ssl_context=context,
            server_hostname=target.host,
            assert_hostname=target.host,
            deadline=deadline,
            cancelled=cancelled,
        )
    return _Pool(
        str(address), target.port, timeout=timeout, retries=False, maxsize=1, deadline=deadline, cancelled=cancelled
    )


class _CutAtDeadline(urllib3.connection.HTTPConnection):
    """A connection whose socket is shut at the deadline, or once the job is cancelled, whatever it is waiting
    for. The socket's timeout bounds each read only: a server that drips its status line, its headers or its
    TLS handshake a few bytes at a time would pass it for ever, and one gone silent would hold a cancelled
    job's download until the deadline."""

    def __init__(self, *args: Any, deadline: float, cancelled: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._cancelled = cancelled
        self._closed = threading.Event()

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._closed = threading.Event()
        watch = (sock, self._deadline, self._cancelled, self._closed)
        threading.Thread(target=_cut, args=watch, name="url-cut", daemon=True).start()
        return sock

    def close(self) -> None:
        self._closed.set()
        super().close()


class _CutAtDeadlineTLS(_CutAtDeadline, urllib3.connection.HTTPSConnection):
    """``_CutAtDeadline`` over TLS: the handshake too."""


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _CutAtDeadline


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _CutAtDeadlineTLS


def _cut(sock: socket.socket, deadline: float, cancelled: threading.Event | None, closed: threading.Event) -> None:
    """Shut ``sock`` at ``deadline``, or once ``cancelled`` is set, unless ``closed`` is set first. An event has
    no callback, and a thread cannot wait on two: ``cancelled`` is looked at every ``_CANCEL_POLL_S``."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (cancelled is not None and cancelled.is_set()):
            _shut(sock)
            return
        if closed.wait(remaining if cancelled is None else min(remaining, _CANCEL_POLL_S)):
            return


def _shut(sock: socket.socket) -> None:
    """Wake whatever waits on ``sock``: its reads end as a closed connection's do."""
    with contextlib.suppress(OSError):  # closed already
        sock.shutdown(socket.SHUT_RDWR)


def _remaining(deadline: float, rules: Rules) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError(f"timed out: not done within {rules.timeout_setting}")
    return remaining


def connection_problem(error: Exception, rules: Rules) -> str:
    """What went wrong talking to the server, in a few words."""
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        cause = error.__cause__
        return (cause.strerror if isinstance(cause, OSError) else None) or str(cause or error)
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
        return f"timed out connecting ({rules.timeout_setting})"
    if isinstance(error, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return f"timed out waiting for the server ({rules.timeout_setting})"
    if isinstance(error, urllib3.exceptions.SSLError):
        return f"TLS failed: {first_line(error)}"
    if isinstance(error, urllib3.exceptions.ProtocolError):
        return f"the connection failed: {first_line(error)}"
    return f"{type(error).__name__}: {first_line(error)}"
