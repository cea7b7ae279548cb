"""A threaded HTTP reverse proxy that injects faults on purpose, for tests.

Tests put a :class:`FaultProxy` between a client (an edge agent) and an upstream HTTP server (MLflow, the rollout
service) to check how the client copes with a download cut midway, a corrupted body, a 503, a rewritten answer,
a redirect, a transfer that stalls midway, or an upstream that is down. Faults are :class:`Rule` objects added to
the proxy; requests no rule applies to are proxied unchanged. The proxy can also serve byte ranges itself
(``ranges=True``), so resumable downloads can be tested against an upstream that does not honour ``Range``.

Standard library only. Every answer carries ``Connection: close`` and an exact ``Content-Length``: the upstream
body is always read in full before the proxy answers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast

__all__ = ["Corrupt", "Cut", "FaultProxy", "Redirect", "Rewrite", "Rule", "Seen", "Stall", "Status", "rewrite_json"]

UPSTREAM_TIMEOUT_S = 60.0

# Meaningful for one connection only (RFC 9110 section 7.6.1); the proxy answers with its own framing.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the proxy itself, or (Range, If-Range, Expect) handled by it rather than upstream.
_NOT_FORWARDED = frozenset({"host", "content-length", "accept-encoding", "range", "if-range", "expect"})
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass
class Seen:
    """One request the proxy received."""

    method: str
    path: str  # path + query, as received
    range: str | None  # the Range header, if any
    status: int  # the status the proxy answered (0 until it is decided)


@dataclass(eq=False)
class Rule:
    """A fault that applies to requests whose path contains ``fragment`` (and whose method is ``method``, if set).

    ``times`` is how many more matching requests the rule applies to (``None``: forever); ``applied`` counts uses.
    """

    fragment: str
    _: KW_ONLY
    times: int | None = None
    method: str | None = None
    applied: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.fragment in path


@dataclass(eq=False)
class Cut(Rule):
    """Announce the full answer, send only ``after_bytes`` of its body (half if that is the whole), then hang up."""

    after_bytes: int
    _: KW_ONLY
    times: int | None = 1
    method: str | None = "GET"


@dataclass(eq=False)
class Corrupt(Rule):
    """Flip one byte (XOR 0xFF) at the middle of the full upstream 200 body, before any Range slicing."""

    _: KW_ONLY
    times: int | None = None
    method: str | None = "GET"


@dataclass(eq=False)
class Status(Rule):
    """Answer ``status`` with ``body`` without contacting upstream (with ``Retry-After: 1`` for a 503)."""

    status: int
    _: KW_ONLY
    times: int | None = None
    method: str | None = None
    body: bytes = b"injected fault"


@dataclass(eq=False)
class Redirect(Rule):
    """Answer ``status`` with ``Location: <to><the request's path>`` without contacting upstream."""

    to: str
    _: KW_ONLY
    status: int = 302
    times: int | None = None
    method: str | None = "GET"


@dataclass(eq=False)
class Stall(Rule):
    """Send ``after_bytes`` of the body, then nothing until :meth:`release` (or ``pause_s``), then the rest.

    ``stalled`` is set once the first bytes are out and the transfer waits: a test can then act mid-download.
    """

    after_bytes: int
    _: KW_ONLY
    pause_s: float = 30.0
    times: int | None = 1
    method: str | None = "GET"
    stalled: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _released: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def release(self) -> None:
        self._released.set()


@dataclass(eq=False)
class Rewrite(Rule):
    """Pass an upstream 200 body through ``transform``; other upstream answers (a 304, say) pass unchanged."""

    transform: Callable[[bytes], bytes]
    _: KW_ONLY
    times: int | None = None
    method: str | None = "GET"


def rewrite_json(fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Callable[[bytes], bytes]:
    """A :class:`Rewrite` transform that edits a JSON object; ``fn`` may also edit in place and return None."""

    def transform(body: bytes) -> bytes:
        document = json.loads(body)
        result = fn(document)
        return json.dumps(document if result is None else result, separators=(",", ":")).encode()

    return transform


@dataclass
class _Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # What Content-Length announces when not the body's length: for a HEAD answer, the GET body's length.
    length: int | None


def _parse_range(value: str, total: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """``(first, last)`` for a satisfiable single range; None for a Range header not to be honoured."""
    match = _RANGE_RE.match(value)
    if match is None:  # multiple ranges or another unit: ignoring Range and answering 200 is always allowed
        return None
    start_text, end_text = match.groups()
    if not start_text:
        if not end_text:
            return None
        suffix = int(end_text)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, total - suffix), total - 1
    first = int(start_text)
    if first >= total:
        return "unsatisfiable"
    last = min(int(end_text), total - 1) if end_text else total - 1
    if last < first:
        return None
    return first, last


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Do not wait, on stop, for handler threads still blocked on a slow upstream.
    block_on_close = False
    request_queue_size = 128

    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client giving up mid-answer is expected in fault tests; anything else is a proxy bug worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = UPSTREAM_TIMEOUT_S  # a client that stalls mid-request must not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # One entry point for every method: the proxy does not care which it forwards.
    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    @property
    def proxy(self) -> FaultProxy:
        return cast(_Server, self.server).proxy

    def _handle(self) -> None:
        # Read the request body even when it will not be forwarded: closing a socket with unread input makes the
        # kernel send a reset, which can destroy the answer before the client reads it.
        body = self._read_body()
        proxy = self.proxy
        method = self.command.upper()
        seen = Seen(method=method, path=self.path, range=self.headers.get("Range"), status=0)
        proxy._record(seen)

        if proxy.down:
            self._send(seen, _Answer(503, [("Retry-After", "1")], b"proxy down", None))
            return
        rule = proxy._pick(method, self.path)
        if isinstance(rule, Status):
            headers = [("Retry-After", "1")] if rule.status == 503 else []
            self._send(seen, _Answer(rule.status, headers, rule.body, None))
            return
        if isinstance(rule, Redirect):
            self._send(seen, _Answer(rule.status, [("Location", rule.to.rstrip("/") + self.path)], b"", None))
            return

        try:
            answer = self._fetch(method, body)
        except (OSError, http.client.HTTPException):
            self._send(seen, _Answer(502, [], b"upstream unreachable", None))
            return

        if answer.status == 200 and method != "HEAD":
            if isinstance(rule, Corrupt) and answer.body and proxy._consume(rule):
                flipped = bytearray(answer.body)
                flipped[len(flipped) // 2] ^= 0xFF
                answer.body = bytes(flipped)
            elif isinstance(rule, Rewrite) and proxy._consume(rule):
                answer.body = rule.transform(answer.body)
                # Callers rewrite JSON that carries its own ETag, so ETag stays; a body digest would now be wrong.
                answer.headers = [(k, v) for k, v in answer.headers if k.lower() != "content-md5"]
        answer = self._apply_range(method, answer)
        self._send(seen, answer, cut=rule if isinstance(rule, Cut | Stall) else None)

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer fields, if any, end with an empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self.rfile.read(int(length))

    def _fetch(self, method: str, body: bytes | None) -> _Answer:
        proxy = self.proxy
        connection = http.client.HTTPConnection(proxy._host, proxy._port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            connection.putrequest(method, proxy._base_path + self.path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", proxy._netloc)
            # Identity encoding so Corrupt, Rewrite and Range act on the bytes the client finally reads.
            connection.putheader("Accept-Encoding", "identity")
            listed = _connection_tokens(self.headers.get_all("Connection") or [])
            for name, value in self.headers.items():
                # The proxy serves ranges itself (or ignores them): upstream always sends the whole body.
                if _hop_by_hop(name, listed) or name.lower() in _NOT_FORWARDED:
                    continue
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            content = response.read()
            upstream_headers = response.getheaders()
            status = response.status
        finally:
            connection.close()

        listed = _connection_tokens([v for k, v in upstream_headers if k.lower() == "connection"])
        headers = [(k, v) for k, v in upstream_headers if not _hop_by_hop(k, listed) and k.lower() != "content-length"]
        length: int | None = None  # the body's own length, whatever a Rule later makes of it
        if method == "HEAD":
            declared = next((v for k, v in upstream_headers if k.lower() == "content-length"), None)
            length = int(declared) if declared is not None and declared.strip().isdigit() else None
        return _Answer(status, headers, content, length)

    def _apply_range(self, method: str, answer: _Answer) -> _Answer:
        if method not in ("GET", "HEAD") or answer.status != 200:
            return answer
        headers = [(k, v) for k, v in answer.headers if k.lower() not in ("accept-ranges", "content-range")]
        if not self.proxy.ranges:
            # Upstream's Accept-Ranges would promise what this proxy does not do.
            answer.headers = headers
            return answer
        headers.append(("Accept-Ranges", "bytes"))
        answer.headers = headers
        requested = self.headers.get("Range")
        total = len(answer.body) if method == "GET" else answer.length
        if requested is None or total is None:
            return answer
        span = _parse_range(requested, total)
        if span is None:
            return answer
        if span == "unsatisfiable":
            return _Answer(416, [("Content-Range", f"bytes */{total}"), ("Accept-Ranges", "bytes")], b"", None)
        first, last = span
        headers.append(("Content-Range", f"bytes {first}-{last}/{total}"))
        if method == "HEAD":
            return _Answer(206, headers, b"", last - first + 1)
        return _Answer(206, headers, answer.body[first : last + 1], None)

    def _send(self, seen: Seen, answer: _Answer, cut: Cut | Stall | None = None) -> None:
        head = self.command.upper() == "HEAD"
        no_body = head or answer.status in _NO_BODY_STATUSES or answer.status < 200
        body = b"" if no_body else answer.body
        # Set before any byte goes out, so a client that has its answer also finds it in `seen`.
        seen.status = answer.status
        self.send_response_only(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        if answer.status not in _NO_BODY_STATUSES and answer.status >= 200:
            length = answer.length if answer.length is not None else len(answer.body)
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        if cut is None:
            if body:
                self.wfile.write(body)
            return
        if isinstance(cut, Stall):
            self.wfile.write(body[: cut.after_bytes])
            self.wfile.flush()
            cut.stalled.set()
            cut._released.wait(cut.pause_s)
            self.wfile.write(body[cut.after_bytes :])
            return
        keep = cut.after_bytes if cut.after_bytes < len(body) else len(body) // 2
        if keep:
            self.wfile.write(body[:keep])
        self.wfile.flush()
        # Hang up with the body short of its Content-Length, as a dropped link would.
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()
        self.close_connection = True


def _connection_tokens(values: list[str]) -> frozenset[str]:
    """Header names a Connection header marks as hop-by-hop."""
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


def _hop_by_hop(name: str, listed: frozenset[str]) -> bool:
    lowered = name.lower()
    return lowered in _HOP_BY_HOP or lowered in listed or lowered.startswith("proxy-")


class FaultProxy:
    """A reverse proxy to ``upstream`` on a free loopback port that applies fault :class:`Rule` s.

    ``ranges=True``: the proxy serves ``Range: bytes=N-`` / ``bytes=N-M`` / ``bytes=-K`` on GET and HEAD answers
    whose upstream status is 200 (206 with Content-Range, 416 past the end). ``ranges=False``: Range is ignored
    and the full 200 answered. Range is never forwarded upstream.
    """

    def __init__(self, upstream: str, *, ranges: bool = True) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._netloc = parsed.netloc
        self._base_path = parsed.path.rstrip("/")
        self.ranges = ranges
        self.down = False
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []
        self.url = ""
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = _Server(self)
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"faultproxy-{port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def requests_to(self, fragment: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if fragment in seen.path]

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _pick(self, method: str, path: str) -> Rule | None:
        """The first rule that applies; Status, Cut, Redirect and Stall are used up here, since they apply whatever
        upstream says.

        Corrupt and Rewrite are used up only once upstream's answer turns out to be one they change (a 200), so a
        ``times=1`` Rewrite is not spent on a 304.
        """
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    if isinstance(rule, Status | Cut | Redirect | Stall):
                        self._use(rule)
                    return rule
        return None

    def _consume(self, rule: Rule) -> bool:
        with self._lock:
            # Another request may have used the last application since _pick.
            if rule.times is not None and rule.times <= 0:
                return False
            self._use(rule)
            return True

    @staticmethod
    def _use(rule: Rule) -> None:
        if rule.times is not None:
            rule.times -= 1
        rule.applied += 1
