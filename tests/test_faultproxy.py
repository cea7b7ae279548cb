"""The fault-injecting proxy the edge-agent tests rely on: pass-through, ranges, and each fault."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from faultproxy import Corrupt, Cut, FaultProxy, Redirect, Rewrite, Seen, Stall, Status, rewrite_json

from yolo_ota.processes import free_port

BODY = random.Random(1234).randbytes(100_000)
DESIRED = {"model": "pcb-line", "version": 3, "etag": "v3"}
DESIRED_ETAG = '"desired-v3"'


@dataclass
class UpstreamLog:
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, fragment: str) -> list[tuple[str, str, dict[str, str]]]:
        with self.lock:
            return [r for r in self.requests if fragment in r[1]]


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log: UpstreamLog

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self) -> None:
        with self.log.lock:
            self.log.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status != 304:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._record()
        if self.path == "/artifacts/file.bin":
            self._answer(200, BODY, {"Content-Type": "application/octet-stream", "Accept-Ranges": "none"})
        elif self.path.startswith("/v1/desired"):
            if self.headers.get("If-None-Match") == DESIRED_ETAG:
                self._answer(304, b"", {"ETag": DESIRED_ETAG})
            else:
                headers = {"Content-Type": "application/json", "ETag": DESIRED_ETAG}
                self._answer(200, json.dumps(DESIRED).encode(), headers)
        else:
            self._answer(404, b'{"detail":"no such thing"}', {"Content-Type": "application/json"})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._record()
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.path == "/v1/echo":
            self._answer(200, body, {"Content-Type": self.headers.get("Content-Type", "application/octet-stream")})
        else:
            self._answer(404, b"", {})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, UpstreamLog]]:
    log = UpstreamLog()
    handler = type("Handler", (_Upstream,), {"log": log})
    # A listen backlog of 5 (the default) drops connections under the concurrency test: a 1 s SYN retry each.
    server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 128, "daemon_threads": True})
    server = server_class(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", log
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def proxy(upstream: tuple[str, UpstreamLog]) -> Iterator[FaultProxy]:
    with FaultProxy(upstream[0]) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def read_until_error(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """The status and the bytes that arrived before the transfer failed (it must fail)."""
    received = bytearray()
    with client.stream("GET", url, headers=headers) as response:
        try:
            for chunk in response.iter_raw():
                received += chunk
        except httpx.RemoteProtocolError:
            return response.status_code, bytes(received)
    pytest.fail(f"the transfer completed ({len(received)} bytes); a cut was expected")


def test_pass_through_keeps_status_headers_and_body(proxy: FaultProxy, client: httpx.Client, upstream) -> None:
    url, log = upstream
    response = client.get(proxy.url + "/artifacts/file.bin")
    assert response.status_code == 200
    assert response.content == BODY
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["connection"] == "close"
    # The proxy serves ranges itself, so it advertises them whatever upstream says.
    assert response.headers["accept-ranges"] == "bytes"

    missing = client.get(proxy.url + "/nowhere?x=1")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no such thing"}

    _, path, headers = log.to("/nowhere?x=1")[-1]
    assert path == "/nowhere?x=1"
    assert headers["host"] == url.removeprefix("http://")
    assert headers["accept-encoding"] == "identity"
    assert [s.status for s in proxy.seen] == [200, 404]


def test_head_announces_the_get_length(proxy: FaultProxy, client: httpx.Client, upstream) -> None:
    response = client.head(proxy.url + "/artifacts/file.bin")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(BODY))
    assert response.content == b""
    ranged = client.head(proxy.url + "/artifacts/file.bin", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["content-length"] == "10"
    assert ranged.headers["content-range"] == f"bytes 10-19/{len(BODY)}"
    assert upstream[1].to("/artifacts/file.bin")[-1][0] == "HEAD"


def test_ranges_are_sliced_by_the_proxy_and_not_forwarded(proxy: FaultProxy, client: httpx.Client, upstream) -> None:
    url = proxy.url + "/artifacts/file.bin"
    before = len(upstream[1].to("/artifacts/file.bin"))

    middle = client.get(url, headers={"Range": "bytes=100-199"})
    assert middle.status_code == 206
    assert middle.content == BODY[100:200]
    assert middle.headers["content-range"] == f"bytes 100-199/{len(BODY)}"
    assert middle.headers["accept-ranges"] == "bytes"

    tail = client.get(url, headers={"Range": "bytes=99000-"})
    assert tail.status_code == 206
    assert tail.content == BODY[99000:]
    assert tail.headers["content-range"] == f"bytes 99000-99999/{len(BODY)}"

    suffix = client.get(url, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206
    assert suffix.content == BODY[-10:]

    clipped = client.get(url, headers={"Range": "bytes=99990-200000"})
    assert clipped.status_code == 206
    assert clipped.content == BODY[99990:]

    past_end = client.get(url, headers={"Range": f"bytes={len(BODY)}-"})
    assert past_end.status_code == 416
    assert past_end.headers["content-range"] == f"bytes */{len(BODY)}"

    forwarded = upstream[1].to("/artifacts/file.bin")[before:]
    assert len(forwarded) == 5
    assert all("range" not in headers for _, _, headers in forwarded)


def test_ranges_false_answers_the_whole_body(upstream, client: httpx.Client) -> None:
    with FaultProxy(upstream[0], ranges=False) as proxy:
        response = client.get(proxy.url + "/artifacts/file.bin", headers={"Range": "bytes=100-199"})
        assert response.status_code == 200
        assert response.content == BODY
        assert "content-range" not in response.headers
        assert "accept-ranges" not in response.headers
        assert proxy.seen == [Seen("GET", "/artifacts/file.bin", "bytes=100-199", 200)]


def test_cut_truncates_once_then_a_range_resumes(proxy: FaultProxy, client: httpx.Client) -> None:
    url = proxy.url + "/artifacts/file.bin"
    rule = proxy.add_rule(Cut("file.bin", 30_000))

    status, partial = read_until_error(client, url)
    assert status == 200
    assert partial == BODY[:30_000]
    assert (rule.times, rule.applied) == (0, 1)

    whole = client.get(url)
    assert whole.status_code == 200
    assert whole.content == BODY

    # A cut in the middle of a resumed download, then a second resume from where that one stopped.
    proxy.add_rule(Cut("file.bin", 20_000))
    status, second = read_until_error(client, url, {"Range": f"bytes={len(partial)}-"})
    assert status == 206
    assert second == BODY[30_000:50_000]
    rest = client.get(url, headers={"Range": f"bytes={len(partial) + len(second)}-"})
    assert rest.status_code == 206
    assert partial + second + rest.content == BODY
    assert [s.status for s in proxy.requests_to("file.bin")] == [200, 200, 206, 206]


def test_cut_past_the_end_sends_half(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.add_rule(Cut("file.bin", 10 * len(BODY)))
    _, partial = read_until_error(client, proxy.url + "/artifacts/file.bin")
    assert partial == BODY[: len(BODY) // 2]


def test_corrupt_flips_one_byte_also_in_resumed_ranges(proxy: FaultProxy, client: httpx.Client) -> None:
    url = proxy.url + "/artifacts/file.bin"
    rule = proxy.add_rule(Corrupt("file.bin", times=2))
    corrupted = client.get(url).content
    assert len(corrupted) == len(BODY)
    differing = [i for i, (a, b) in enumerate(zip(corrupted, BODY, strict=True)) if a != b]
    assert differing == [len(BODY) // 2]
    assert corrupted[len(BODY) // 2] == BODY[len(BODY) // 2] ^ 0xFF

    resumed = client.get(url, headers={"Range": "bytes=40000-"})
    assert resumed.status_code == 206
    assert resumed.content == corrupted[40_000:]
    assert client.get(url).content == BODY  # times=2 used up
    assert rule.applied == 2


def test_status_rule_answers_without_upstream(proxy: FaultProxy, client: httpx.Client, upstream) -> None:
    before = len(upstream[1].to("/v1/desired"))
    rule = proxy.add_rule(Status("/v1/desired", 503, times=2))
    for _ in range(2):
        response = client.get(proxy.url + "/v1/desired")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.content == b"injected fault"
    assert len(upstream[1].to("/v1/desired")) == before
    assert client.get(proxy.url + "/v1/desired").json() == DESIRED
    assert (rule.times, rule.applied) == (0, 2)

    proxy.add_rule(Status("/v1/echo", 500, method="POST", body=b"boom"))
    assert client.get(proxy.url + "/v1/desired").status_code == 200  # another path and method: untouched
    failed = client.post(proxy.url + "/v1/echo", content=b"x")
    assert (failed.status_code, failed.content) == (500, b"boom")
    assert "retry-after" not in failed.headers


def test_redirect_names_the_other_origin_and_path_without_upstream(
    proxy: FaultProxy, client: httpx.Client, upstream
) -> None:
    before = len(upstream[1].to("file.bin"))
    rule = proxy.add_rule(Redirect("file.bin", "http://other.example:8123/", status=307, times=1))
    answer = client.get(proxy.url + "/artifacts/file.bin?x=1")
    assert answer.status_code == 307
    assert answer.headers["location"] == "http://other.example:8123/artifacts/file.bin?x=1"
    assert len(upstream[1].to("file.bin")) == before
    assert client.get(proxy.url + "/artifacts/file.bin").content == BODY  # used up
    assert (rule.times, rule.applied) == (0, 1)


def test_stall_holds_the_rest_of_the_body_until_released(proxy: FaultProxy, client: httpx.Client) -> None:
    rule = proxy.add_rule(Stall("file.bin", 30_000, pause_s=30))
    received = bytearray()
    with client.stream("GET", proxy.url + "/artifacts/file.bin") as response:
        chunks = response.iter_raw()
        while len(received) < 30_000:
            received += next(chunks)
        assert rule.stalled.wait(5)
        assert bytes(received) == BODY[:30_000]
        started = time.monotonic()
        threading.Timer(0.5, rule.release).start()
        for chunk in chunks:
            received += chunk
        assert time.monotonic() - started >= 0.4  # nothing more came until the release
    assert bytes(received) == BODY
    assert client.get(proxy.url + "/artifacts/file.bin").content == BODY  # times=1: used up


def test_first_applicable_rule_wins_and_clear_rules(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.add_rule(Status("/v1/", 500, times=1))
    proxy.add_rule(Status("/v1/desired", 404))
    assert client.get(proxy.url + "/v1/desired").status_code == 500
    assert client.get(proxy.url + "/v1/desired").status_code == 404
    proxy.clear_rules()
    assert client.get(proxy.url + "/v1/desired").status_code == 200


def test_down_then_up(proxy: FaultProxy, client: httpx.Client) -> None:
    proxy.down = True
    response = client.get(proxy.url + "/v1/desired")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.content == b"proxy down"
    posted = client.post(proxy.url + "/v1/echo", json={"a": 1})
    assert posted.status_code == 503
    proxy.down = False
    assert client.get(proxy.url + "/v1/desired").json() == DESIRED


def test_rewrite_json_keeps_etag_and_spares_304(proxy: FaultProxy, client: httpx.Client) -> None:
    rule = proxy.add_rule(Rewrite("/v1/desired", rewrite_json(lambda doc: {**doc, "version": 99}), times=1))
    not_modified = client.get(proxy.url + "/v1/desired", headers={"If-None-Match": DESIRED_ETAG})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert rule.applied == 0  # a 304 has nothing to rewrite, so it does not spend the rule

    rewritten = client.get(proxy.url + "/v1/desired")
    assert rewritten.status_code == 200
    assert rewritten.json() == {**DESIRED, "version": 99}
    assert rewritten.headers["etag"] == DESIRED_ETAG
    assert rewritten.headers["content-length"] == str(len(rewritten.content))
    assert rewritten.content == json.dumps({**DESIRED, "version": 99}, separators=(",", ":")).encode()
    assert client.get(proxy.url + "/v1/desired").json() == DESIRED
    assert rule.applied == 1


def test_post_bodies_are_forwarded(proxy: FaultProxy, client: httpx.Client, upstream) -> None:
    payload = {"device": "cam-7", "values": list(range(1000))}
    response = client.post(proxy.url + "/v1/echo", json=payload, headers={"X-Device": "cam-7"})
    assert response.status_code == 200
    assert response.json() == payload
    _, _, headers = upstream[1].to("/v1/echo")[-1]
    assert headers["x-device"] == "cam-7"
    assert headers["content-type"] == "application/json"

    # A chunked request body reaches upstream with a Content-Length instead.
    chunked = client.post(proxy.url + "/v1/echo", content=iter([b"abc", b"def"]))
    assert chunked.content == b"abcdef"
    _, _, headers = upstream[1].to("/v1/echo")[-1]
    assert headers["content-length"] == "6"
    assert "transfer-encoding" not in headers


def test_seen_and_requests_to_record_ranges(proxy: FaultProxy, client: httpx.Client) -> None:
    client.get(proxy.url + "/artifacts/file.bin", headers={"Range": "bytes=5-"})
    client.get(proxy.url + "/v1/desired?device=cam-7")
    client.post(proxy.url + "/v1/echo", content=b"{}")
    assert proxy.seen == [
        Seen("GET", "/artifacts/file.bin", "bytes=5-", 206),
        Seen("GET", "/v1/desired?device=cam-7", None, 200),
        Seen("POST", "/v1/echo", None, 200),
    ]
    assert proxy.requests_to("device=cam-7") == [proxy.seen[1]]
    assert [s.range for s in proxy.requests_to("file.bin")] == ["bytes=5-"]
    assert proxy.requests_to("nothing") == []


def test_unreachable_upstream_is_502(client: httpx.Client) -> None:
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        response = client.get(proxy.url + "/v1/desired")
        assert response.status_code == 502
        assert response.content == b"upstream unreachable"
        assert proxy.seen[0].status == 502


def test_concurrent_clients(proxy: FaultProxy) -> None:
    def fetch(i: int) -> bool:
        if i % 2:
            return http.get(proxy.url + "/artifacts/file.bin", headers={"Range": f"bytes={i}-"}).content == BODY[i:]
        return http.post(proxy.url + "/v1/echo", content=str(i).encode()).content == str(i).encode()

    # One client shared by the threads (each has its own connection, as the proxy closes every one after use):
    # building a client per request costs more than the requests.
    limits = httpx.Limits(max_connections=16)
    with httpx.Client(timeout=10, limits=limits) as http, ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(fetch, range(64)))
    assert all(results)
    assert len(proxy.seen) == 64
    assert {s.status for s in proxy.seen} == {200, 206}


def test_stop_frees_the_port(upstream) -> None:
    proxy = FaultProxy(upstream[0]).start()
    url = proxy.url
    assert httpx.get(url + "/v1/desired", timeout=5).status_code == 200
    proxy.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/desired", timeout=2)
