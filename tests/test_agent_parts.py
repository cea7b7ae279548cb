"""The agent's parts on real files and a real HTTP server on loopback: resumable downloads, disk-space refusal,
a disk that fills up mid-download, redirects (followed within the origin only), the bounds on an offer, variant
choice without CUDA, pruning of installed versions, the outbox."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import Cut, FaultProxy, Redirect
from mounts import tmpfs

from edge_agent.download import MAX_REDIRECTS, Downloader
from edge_agent.errors import DiskSpaceError, OfferRefused, VerificationFailed
from edge_agent.protocol import DesiredState
from edge_agent.reporting import Outbox, event
from edge_agent.store import Installed, VersionStore
from edge_agent.variant_choice import VariantResult, candidates, choose, fallback_chain
from edge_agent.verify import check_runnable
from exporters.bundle import MANIFEST_NAME, Variant, read_manifest

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def files_server(tmp_path: Path) -> Iterator[str]:
    """A plain static file server (no Range support of its own) over a folder with a manifest and one file."""
    root = tmp_path / "served"
    root.mkdir()
    (root / MANIFEST_NAME).write_bytes(b'{"not": "checked here"}')
    (root / "model.bin").write_bytes(PAYLOAD)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def offer(base: str, *, path: str = "variants/cpu-fp32/model.torchscript") -> DesiredState:
    manifest = b'{"not": "checked here"}'
    return DesiredState.model_validate(
        {
            "model": "m",
            "version": "1",
            "variant": "cpu-fp32",
            "files": [
                {
                    "path": path,
                    "url": f"{base}/model.bin",
                    "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
                    "bytes": len(PAYLOAD),
                },
            ],
            "manifest_url": f"{base}/{MANIFEST_NAME}",
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "etag": '"x"',
        }
    )


@pytest.mark.parametrize("ranges", [True, False], ids=["server-honours-ranges", "server-ignores-ranges"])
def test_cut_download_completes(files_server: str, tmp_path: Path, ranges: bool) -> None:
    with FaultProxy(files_server, ranges=ranges) as proxy:
        proxy.add_rule(Cut("model.bin", after_bytes=300_000, times=2))
        downloader = Downloader(attempts=5, min_free_bytes=0, timeout_s=10)
        downloader.fetch(offer(proxy.url), tmp_path / "staging")
        downloader.close()
        asked = [s.range for s in proxy.requests_to("model.bin")]
    staged = tmp_path / "staging" / "variants" / "cpu-fp32" / "model.torchscript"
    assert staged.read_bytes() == PAYLOAD
    assert len(asked) == 3 and asked[0] is None
    if ranges:
        assert all(r is not None and r != "bytes=0-" for r in asked[1:]), asked  # resumed, not restarted
    assert not list((tmp_path / "staging").rglob("*.part"))


def test_download_refused_when_disk_would_fill(files_server: str, tmp_path: Path) -> None:
    downloader = Downloader(attempts=1, min_free_bytes=1 << 62, timeout_s=10)
    with pytest.raises(DiskSpaceError, match="must stay free"):
        downloader.fetch(offer(files_server), tmp_path / "staging")
    downloader.close()
    assert not list((tmp_path / "staging").rglob("*.torchscript"))


def test_a_disk_that_fills_up_mid_download_fails_it_and_removes_the_part(files_server: str, tmp_path: Path) -> None:
    """A tmpfs of exactly the file's size passes the free-space check; the manifest written first takes a page, so
    the file's last bytes find the disk full."""
    with tmpfs(tmp_path / "small-disk", len(PAYLOAD)) as disk:
        downloader = Downloader(attempts=3, min_free_bytes=0, timeout_s=10)
        with pytest.raises(DiskSpaceError) as refused:
            downloader.fetch(offer(files_server), disk / "staging")
        downloader.close()
        reason = str(refused.value)
        assert "ENOSPC" in reason and "variants/cpu-fp32/model.torchscript" in reason, reason
        assert "model.torchscript.part was removed" in reason
        assert not list(disk.rglob("*.part"))


@pytest.mark.parametrize("times", [1, MAX_REDIRECTS])
def test_redirects_within_the_origin_are_followed(files_server: str, tmp_path: Path, times: int) -> None:
    with FaultProxy(files_server) as proxy:
        proxy.add_rule(Redirect("model.bin", proxy.url, status=307, times=times))  # same scheme, host and port
        downloader = Downloader(attempts=1, min_free_bytes=0, timeout_s=10)
        downloader.fetch(offer(proxy.url), tmp_path / "staging")
        downloader.close()
        assert [s.status for s in proxy.requests_to("model.bin")] == [307] * times + [200]
    assert (tmp_path / "staging" / "variants" / "cpu-fp32" / "model.torchscript").read_bytes() == PAYLOAD


def test_more_redirects_than_the_bound_refuse_the_offer(files_server: str, tmp_path: Path) -> None:
    with FaultProxy(files_server) as proxy:
        proxy.add_rule(Redirect("model.bin", proxy.url))  # forever
        downloader = Downloader(attempts=3, min_free_bytes=0, timeout_s=10)
        with pytest.raises(OfferRefused, match=f"more than {MAX_REDIRECTS} redirects"):
            downloader.fetch(offer(proxy.url), tmp_path / "staging")
        downloader.close()
        assert len(proxy.requests_to("model.bin")) == MAX_REDIRECTS + 1  # refused, not tried again


@pytest.mark.parametrize("what", ["model.bin", MANIFEST_NAME])
def test_a_redirect_to_another_origin_refuses_the_offer(files_server: str, tmp_path: Path, what: str) -> None:
    """The other origin would serve the right bytes: only the origin check stands between the device and it."""
    with FaultProxy(files_server) as elsewhere, FaultProxy(files_server) as proxy:
        proxy.add_rule(Redirect(what, elsewhere.url))
        downloader = Downloader(attempts=3, min_free_bytes=0, timeout_s=10)
        with pytest.raises(OfferRefused, match="to another origin") as refused:
            downloader.fetch(offer(proxy.url), tmp_path / "staging")
        downloader.close()
        assert elsewhere.url.removeprefix("http://") in str(refused.value)
        assert elsewhere.seen == []
        assert len(proxy.requests_to(what)) == 1
    assert not list((tmp_path / "staging").rglob("model.torchscript*"))


def test_an_offer_over_the_bounds_is_refused_before_any_request(files_server: str, tmp_path: Path) -> None:
    with FaultProxy(files_server) as proxy:
        two_files = offer(proxy.url)
        two_files.files.append(two_files.files[0].model_copy(update={"path": "golden.npz"}))
        cases = [
            (offer(proxy.url), {"max_bundle_bytes": len(PAYLOAD) - 1}, "max_bundle_bytes is"),
            (two_files, {"max_bundle_files": 1}, "lists 2 files; max_bundle_files is 1"),
            (offer(proxy.url).model_copy(update={"manifest_url": "file:///etc/passwd"}), {}, "not an http"),
        ]
        for desired, bounds, fragment in cases:
            downloader = Downloader(attempts=1, min_free_bytes=0, timeout_s=10, **bounds)
            with pytest.raises(OfferRefused, match=fragment):
                downloader.fetch(desired, tmp_path / "staging")
            downloader.close()
        assert proxy.seen == []
    assert not (tmp_path / "staging").exists()


def test_a_manifest_over_its_bound_is_refused_as_it_streams(tmp_path: Path) -> None:
    from edge_agent import download

    root = tmp_path / "served"
    root.mkdir()
    (root / MANIFEST_NAME).write_bytes(b" " * (download._MAX_MANIFEST_BYTES + 1))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        downloader = Downloader(attempts=1, min_free_bytes=0, timeout_s=10)
        with pytest.raises(OfferRefused, match=r"manifest at .* is larger than"):
            downloader.fetch(offer(f"http://127.0.0.1:{server.server_address[1]}"), tmp_path / "staging")
        downloader.close()
    finally:
        server.shutdown()
        server.server_close()


def test_download_refuses_paths_outside_staging(files_server: str, tmp_path: Path) -> None:
    downloader = Downloader(attempts=1, min_free_bytes=0, timeout_s=10)
    for path in ("../escape.bin", "/etc/passwd", "variants/../../escape.bin"):
        with pytest.raises(VerificationFailed, match="refused"):
            downloader.fetch(offer(files_server, path=path), tmp_path / "staging")
    downloader.close()
    assert not (tmp_path / "escape.bin").exists()


def test_variant_choice_refuses_cuda_variants_without_cuda(trained_bundle: Path) -> None:
    import torch

    from exporters.fingerprint import collect

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CUDA variant would be a candidate")
    manifest = read_manifest(trained_bundle)
    cuda = Variant(name="cuda-fp16", path="variants/cuda-fp16/model.torchscript", device="cuda", dtype="float16",
                   batch=1)  # fmt: skip
    manifest = manifest.model_copy(update={"variants": {**manifest.variants, "cuda-fp16": cuda}})
    offered = {v.path for v in manifest.variants.values()}
    here = collect()
    found = candidates(trained_bundle, manifest, here, "auto", offered)
    assert [v.name for v in found.runnable] == ["cpu-fp32"]
    assert found.refused["cuda-fp16"].startswith("incompatible: variant cuda-fp16 needs a working CUDA device")
    assert found.wanted_paths == {manifest.variants["cpu-fp32"].path}
    switched_off = candidates(trained_bundle, manifest, here, "cpu", offered)
    assert switched_off.refused["cuda-fp16"] == "incompatible: CUDA is switched off by settings"
    with pytest.raises(VerificationFailed, match="incompatible fingerprint: no variant can run here"):
        check_runnable(candidates(trained_bundle, manifest, here, "auto", {cuda.path}))


def test_the_fastest_passing_variant_is_chosen_and_the_others_say_why() -> None:
    results = [
        VariantResult(variant="cpu-fp32", passed=True, p50_ms=40.0, p99_ms=45.0, detail="ok"),
        VariantResult(variant="cpu-fp32-aoti", passed=True, p50_ms=31.5, p99_ms=35.0, detail="ok"),
        VariantResult(variant="cpu-fp32-onnx", passed=False, p50_ms=20.0, detail="failed detection_parity"),
    ]
    choice = choose(results, {"cuda-fp16": "incompatible: no GPU"})
    assert choice is not None and choice.chosen == "cpu-fp32-aoti"
    assert choice.why == "fastest that passed: p50 31.50 ms"
    assert choice.not_chosen == {
        "cpu-fp32": "slower: p50 40.00 ms against 31.50 ms",
        "cpu-fp32-onnx": "failed validation: failed detection_parity",
        "cuda-fp16": "incompatible: no GPU",
    }
    assert choose([results[2]], {}) is None


def test_fallback_chain_goes_aoti_then_torchscript_then_cpu() -> None:
    every = {"cuda-fp16-aoti", "cuda-fp16", "cpu-fp32", "cpu-fp32-onnx"}
    assert fallback_chain("cuda-fp16-aoti", every) == ["cuda-fp16-aoti", "cuda-fp16", "cpu-fp32"]
    assert fallback_chain("cpu-fp32-onnx", every) == ["cpu-fp32-onnx", "cpu-fp32"]
    assert fallback_chain("cuda-fp16-aoti", {"cuda-fp16-aoti", "cpu-fp32"}) == ["cuda-fp16-aoti", "cpu-fp32"]
    assert fallback_chain("cpu-fp32", every) == ["cpu-fp32"]


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    for version in ("1", "2", "3", "4", "5"):
        store.staging("m", version).mkdir(parents=True)
        store.install("m", version, Installed(model="m", version=version, key=f"m:{version}:x", variant="cpu-fp32"))
    removed = store.prune(3, protect={("m", "1")})
    assert removed == ["m v2", "m v3"]
    assert [i.version for i in store.all_installed()] == ["1", "4", "5"]


def test_outbox_keeps_order_across_instances(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "outbox")
    for state in ("downloading", "verifying", "validating"):
        first.put(event(state, model="m", version="2", rollout_id=1))
    again = Outbox(tmp_path / "outbox")  # as after a restart
    assert [e.state for _, e in again.pending()] == ["downloading", "verifying", "validating"]
    assert len(again) == 3
