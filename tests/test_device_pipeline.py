"""The device serving path (``edge_agent.device_*``, ``cuda_graph``, ``micro_batcher``) against the CPU path.

On the CPU the device path runs the same code as on a GPU (torch ops on the tensor's device), so most of it is
proven here against ``exporters.preprocess`` + ``exporters.postprocess`` with the trained synthetic detector on
real images; the CUDA-only parts (pinned upload, graph capture) are marked ``cuda``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import ultralytics

from edge_agent.cuda_graph import CudaGraphForward
from edge_agent.device_decode import decode_on_device
from edge_agent.device_letterbox import ImageUploader, letterbox_on_device
from edge_agent.device_pipeline import DecodeThresholds, DevicePipeline
from edge_agent.errors import ModelOutputError
from edge_agent.micro_batcher import MicroBatcher
from exporters.bundle import read_manifest, safe_join
from exporters.postprocess import Detections, box_iou, decode
from exporters.preprocess import letterbox, read_image, scale_boxes_to_original, to_input_array
from exporters.runtime import load_torchscript
from exporters.synthetic import make_scene

ASSETS = Path(ultralytics.__file__).parent / "assets"
INPUT_HW = (160, 160)  # the trained bundle's input size (conftest.SCENE_SIZE)
ONE_LEVEL = 1.0 / 255.0


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """Two real photos (downscaled 6.75x and 8x) and synthetic scenes downscaled, upscaled and not square."""
    rng = np.random.default_rng(7)
    found = {name: read_image(ASSETS / f"{name}.jpg") for name in ("bus", "zidane")}
    found["scene_240"] = make_scene(rng, 240)[0]
    found["scene_100"] = make_scene(rng, 100)[0]
    found["scene_256x150"] = make_scene(rng, 256)[0][:150]
    return found


@pytest.fixture(scope="module")
def detector(trained_bundle: Path) -> torch.jit.ScriptModule:
    manifest = read_manifest(trained_bundle)
    return load_torchscript(safe_join(trained_bundle, manifest.variants["cpu-fp32"].path), "cpu")


def _cpu_path(module: torch.jit.ScriptModule, image: np.ndarray, conf: float) -> Detections:
    """What ``LoadedModel.detect`` does today: OpenCV letterbox, float32 input, decode on the host."""
    padded, info = letterbox(image, INPUT_HW)
    with torch.inference_mode():
        raw = module(torch.from_numpy(to_input_array([padded])))
    found = decode(raw, conf=conf)[0]
    return Detections(scale_boxes_to_original(found.boxes, info), found.scores, found.class_ids)


def _match(reference: Detections, candidate: Detections, *, conf: float) -> list[float]:
    """IoU of each reference box with its own candidate box (same class, greedy by IoU, one to one).

    A box that only one side keeps must score within 0.02 of ``conf``: one level of 255 in the input may move a
    score across the threshold, never far from it. Returns the IoUs of the matched pairs.
    """
    ious = box_iou(reference.boxes, candidate.boxes)
    ious[reference.class_ids[:, None] != candidate.class_ids[None, :]] = 0.0
    matched: list[float] = []
    unmatched_ref, unmatched_cand = set(range(len(reference))), set(range(len(candidate)))
    for flat in np.argsort(-ious, axis=None):
        i, j = np.unravel_index(flat, ious.shape)
        if ious[i, j] < 0.99:
            break
        if i in unmatched_ref and j in unmatched_cand:
            matched.append(float(ious[i, j]))
            unmatched_ref.discard(int(i))
            unmatched_cand.discard(int(j))
    leftovers = [reference.scores[i] for i in unmatched_ref] + [candidate.scores[j] for j in unmatched_cand]
    assert all(score < conf + 0.02 for score in leftovers), f"unmatched boxes far above conf: {leftovers}"
    return matched


# --- letterbox_on_device ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bus", "zidane", "scene_100", "scene_256x150"])
def test_letterbox_on_device_places_the_image_as_opencv_does(images: dict[str, np.ndarray], name: str) -> None:
    image = images[name]
    padded, cpu_info = letterbox(image, INPUT_HW)
    reference = to_input_array([padded])
    x, info = letterbox_on_device(ImageUploader("cpu").upload(image), INPUT_HW)
    assert info == cpu_info
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, *INPUT_HW)
    got = x.numpy()
    # OpenCV weighs neighbours with 11-bit fixed-point weights, interpolate in float32: after rounding to whole
    # levels some values differ by one level, none by more. A box placed one pixel off would differ by far more.
    difference = np.abs(got - reference)
    assert difference.max() <= ONE_LEVEL + 1e-6
    assert (difference > 0).mean() < 0.25
    # The padding is exactly OpenCV's.
    top, left = info.pad_top, info.pad_left
    inside = np.zeros(got.shape, dtype=bool)
    inside[..., top : top + info.resized_hw[0], left : left + info.resized_hw[1]] = True
    np.testing.assert_array_equal(got[~inside], reference[~inside])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_letterbox_on_device_without_resize_is_bit_identical(images: dict[str, np.ndarray], dtype: torch.dtype) -> None:
    image = images["scene_256x150"][:, :160]  # 150 x 160: fits the width, only padded in height
    padded, _ = letterbox(image, INPUT_HW)
    reference = torch.from_numpy(to_input_array([padded])).to(dtype)
    x, info = letterbox_on_device(torch.from_numpy(np.ascontiguousarray(image)), INPUT_HW, dtype)
    assert info.resized_hw == info.original_hw
    assert x.dtype == dtype
    assert torch.equal(x, reference)


def test_letterbox_on_device_refuses_what_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        letterbox_on_device(torch.zeros((8, 8, 3)), INPUT_HW)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        ImageUploader("cpu").upload(np.zeros((8, 8), dtype=np.uint8))


# --- decode_on_device ------------------------------------------------------------------------------------------------


def _crowded_raw(seed: int, batch: int = 3, num_classes: int = 3, num_anchors: int = 1500) -> torch.Tensor:
    """Overlapping clusters, scores on a coarse grid (ties, scores exactly on the threshold), duplicated anchors."""
    rng = np.random.default_rng(seed)
    raw = np.zeros((batch, 4 + num_classes, num_anchors), dtype=np.float32)
    for image in range(batch - 1):  # the last image keeps nothing
        member = rng.integers(0, 30, num_anchors)
        raw[image, 0:2] = (rng.uniform(20, 140, (30, 2))[member] + rng.normal(0, 3, (num_anchors, 2))).T
        raw[image, 2:4] = (rng.uniform(8, 60, (30, 2))[member] * rng.lognormal(0, 0.15, (num_anchors, 2))).T
        raw[image, 4:] = np.round(rng.uniform(0, 1, (num_classes, num_anchors)) * 16) / 16
        raw[image, :, -40:] = raw[image, :, :40]
    return torch.from_numpy(raw)


@pytest.mark.parametrize(("conf", "iou", "max_det", "agnostic"), [(0.25, 0.7, 300, False), (0.5, 0.45, 7, True)])
def test_decode_on_device_equals_decode(conf: float, iou: float, max_det: int, agnostic: bool) -> None:
    """On the CPU the arithmetic, the NMS kernel and the tie order are decode's: the results are bit-identical."""
    raw = _crowded_raw(seed=11)
    ours = decode_on_device(raw, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic)
    reference = decode(raw, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic)
    assert [len(d) for d in ours] == [len(d) for d in reference]
    assert len(ours[0]) > 1 and len(ours[-1]) == 0
    for mine, theirs in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(mine.boxes, theirs.boxes)
        np.testing.assert_array_equal(mine.scores, theirs.scores)
        np.testing.assert_array_equal(mine.class_ids, theirs.class_ids)
        assert mine.boxes.dtype == np.float32 and mine.class_ids.dtype == np.int64


def test_decode_on_device_strict_threshold_and_class_aware_nms() -> None:
    # Anchor 0 scores exactly `conf` and is dropped (strictly above, as decode); anchors 1 and 2 overlap fully but
    # have different classes, so both survive unless NMS is class-agnostic.
    raw = torch.zeros((1, 6, 3))
    raw[0, :4] = torch.tensor([[50.0, 50.0, 50.0], [50.0, 50.0, 50.0], [20.0, 20.0, 20.0], [20.0, 20.0, 20.0]])
    raw[0, 4:] = torch.tensor([[0.25, 0.9, 0.0], [0.0, 0.0, 0.8]])
    per_class = decode_on_device(raw, conf=0.25)[0]
    np.testing.assert_array_equal(per_class.class_ids, [0, 1])
    np.testing.assert_array_equal(per_class.boxes, [[40, 40, 60, 60], [40, 40, 60, 60]])
    np.testing.assert_allclose(per_class.scores, [0.9, 0.8])
    assert len(decode_on_device(raw, conf=0.25, agnostic=True)[0]) == 1
    assert len(decode_on_device(raw, conf=0.25, max_det=1)[0]) == 1


def test_decode_on_device_equals_decode_on_the_detector(
    detector: torch.jit.ScriptModule, images: dict[str, np.ndarray]
) -> None:
    batch = to_input_array([letterbox(image, INPUT_HW)[0] for image in images.values()])
    with torch.inference_mode():
        raw = detector(torch.from_numpy(batch))
    ours, reference = decode_on_device(raw, conf=0.05), decode(raw, conf=0.05)
    assert sum(len(d) for d in reference) >= 10
    for mine, theirs in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(mine.boxes, theirs.boxes)
        np.testing.assert_array_equal(mine.class_ids, theirs.class_ids)


# --- DevicePipeline against the CPU path -----------------------------------------------------------------------------


@pytest.mark.parametrize("conf", [0.25, 0.05])
def test_device_pipeline_finds_the_boxes_of_the_cpu_path(
    detector: torch.jit.ScriptModule, images: dict[str, np.ndarray], conf: float
) -> None:
    """Same boxes, classes and scores up to the one-level resize differences (not bit-equal: see
    ``edge_agent.device_letterbox``); mapped back to the images' own pixels through the same ``LetterboxInfo``."""
    pipeline = DevicePipeline(
        detector, device="cpu", dtype=torch.float32, input_hw=INPUT_HW, thresholds=DecodeThresholds(conf=conf)
    )
    assert not pipeline.captured
    matched: dict[str, int] = {}
    for name, image in images.items():
        reference, ours = _cpu_path(detector, image, conf), pipeline.detect(image)
        ious = _match(reference, ours, conf=conf)
        assert all(iou >= 0.99 for iou in ious)
        matched[name] = len(ious)
    # 13 and 35 boxes with the detector trained today; the floors leave room for a retrained one.
    assert sum(matched.values()) >= (8 if conf == 0.25 else 20), matched
    if conf == 0.05:  # the real photos yield boxes too at a low threshold (4 and 13 today)
        assert matched["bus"] + matched["zidane"] >= 5, matched


def test_detect_batch_pads_a_short_batch_and_answers_in_order(
    detector: torch.jit.ScriptModule, images: dict[str, np.ndarray]
) -> None:
    single = DevicePipeline(detector, device="cpu", dtype=torch.float32, input_hw=INPUT_HW)
    batched = DevicePipeline(detector, device="cpu", dtype=torch.float32, input_hw=INPUT_HW, batch=4)
    ordered = list(images.values())  # 5 images: one full batch of 4, then one padded with 3 copies
    results = batched.detect_batch(ordered)
    assert len(results) == len(ordered)
    for image, found in zip(ordered, results, strict=True):
        assert all(iou >= 0.99 for iou in _match(single.detect(image), found, conf=0.25))
    assert sum(len(found) for found in results) >= 8


def test_device_pipeline_refuses_nan_outputs() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 7, 10), float("nan"))

    pipeline = DevicePipeline(broken, device="cpu", dtype=torch.float32, input_hw=(32, 32))
    with pytest.raises(ModelOutputError):
        pipeline.detect(np.zeros((20, 30, 3), dtype=np.uint8))


# --- MicroBatcher ----------------------------------------------------------------------------------------------------


def _run_cameras(
    batcher: MicroBatcher[tuple[int, int], str], cameras: int, frames: int
) -> dict[int, list[str | BaseException]]:
    """``cameras`` threads submit ``frames`` items each, starting together; what each thread got back."""
    answers: dict[int, list[str | BaseException]] = {camera: [] for camera in range(cameras)}
    start = threading.Barrier(cameras)

    def camera(index: int) -> None:
        start.wait()
        for frame in range(frames):
            try:
                answers[index].append(batcher.submit((index, frame)))
            except Exception as exc:
                answers[index].append(exc)

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(cameras)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return answers


def _slow_echo(sizes: list[int], delay_s: float = 0.02) -> Callable[[Sequence[tuple[int, int]]], list[str]]:
    def run_batch(items: Sequence[tuple[int, int]]) -> list[str]:
        sizes.append(len(items))
        time.sleep(delay_s)  # a forward pass: the other cameras' frames arrive meanwhile
        return [f"camera {camera} frame {frame}" for camera, frame in items]

    return run_batch


def test_micro_batcher_gathers_concurrent_cameras_and_answers_each() -> None:
    sizes: list[int] = []
    with MicroBatcher(_slow_echo(sizes), max_batch=4, max_wait_s=0.01) as batcher:
        answers = _run_cameras(batcher, cameras=4, frames=5)
        stats = batcher.stats
    for camera, got in answers.items():
        assert got == [f"camera {camera} frame {frame}" for frame in range(5)]
    assert stats.items == 20 and sum(sizes) == 20
    assert stats.batches < 20 / 2, sizes  # gathered: fewer than half as many forwards as requests
    assert max(sizes) == 4 and all(1 <= size <= 4 for size in sizes)


def test_micro_batcher_never_exceeds_max_batch() -> None:
    sizes: list[int] = []
    with MicroBatcher(_slow_echo(sizes), max_batch=3) as batcher:
        _run_cameras(batcher, cameras=6, frames=3)
    assert sum(sizes) == 18 and max(sizes) == 3


def test_a_lone_camera_does_not_wait_for_company() -> None:
    sizes: list[int] = []
    with MicroBatcher(_slow_echo(sizes, delay_s=0.0), max_batch=4, max_wait_s=2.0) as batcher:
        started = time.monotonic()
        answers = [batcher.submit((0, frame)) for frame in range(5)]
        elapsed_s = time.monotonic() - started
    assert answers == [f"camera 0 frame {frame}" for frame in range(5)]
    assert sizes == [1] * 5
    assert elapsed_s < 1.0, "a lone caller waited max_wait_s for others"


def test_an_error_reaches_every_caller_of_the_batch() -> None:
    sizes: list[int] = []

    def fail(items: Sequence[tuple[int, int]]) -> list[str]:
        sizes.append(len(items))
        time.sleep(0.02)
        raise RuntimeError(f"forward failed on {len(items)} images")

    with MicroBatcher(fail, max_batch=4) as batcher:
        answers = _run_cameras(batcher, cameras=4, frames=2)
        assert batcher.stats.batches < 8, sizes
        # The worker survives a failed batch.
        batcher.run_batch = lambda items: ["fine"] * len(items)
        assert batcher.submit((9, 9)) == "fine"
    for got in answers.values():
        assert len(got) == 2
        assert all(isinstance(answer, RuntimeError) and "forward failed" in str(answer) for answer in got)


def test_a_wrong_number_of_results_is_an_error_for_the_callers() -> None:
    with MicroBatcher(lambda items: [], max_batch=2) as batcher, pytest.raises(RuntimeError, match="0 results"):
        batcher.submit((0, 0))


def test_close_answers_what_is_queued_then_refuses() -> None:
    release = threading.Event()
    entered = threading.Event()

    def held(items: Sequence[int]) -> list[int]:
        entered.set()
        release.wait(10)
        return [item * 10 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(held, max_batch=1)
    answers: list[int] = []
    callers = [threading.Thread(target=lambda v=v: answers.append(batcher.submit(v))) for v in (1, 2)]
    callers[0].start()
    assert entered.wait(10)
    callers[1].start()  # queued behind the held batch
    deadline = time.monotonic() + 10
    while batcher.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    release.set()
    for thread in [*callers, closer]:
        thread.join(timeout=10)
    assert sorted(answers) == [10, 20]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3)
    batcher.close()  # idempotent


# --- CudaGraphForward ------------------------------------------------------------------------------------------------


def _small_net(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
        .to(device)
        .eval()
    )


def test_cuda_graph_forward_on_the_cpu_runs_the_plain_forward() -> None:
    net = _small_net("cpu")
    x = torch.rand(2, 3, 16, 16)
    wrapped = CudaGraphForward(net, x)
    assert not wrapped.captured
    assert wrapped.fallback_reason is not None and "CUDA" in wrapped.fallback_reason
    with torch.inference_mode():
        assert torch.equal(wrapped(x), net(x))
    with pytest.raises(ValueError, match="takes"):
        wrapped(torch.rand(1, 3, 16, 16))


@pytest.mark.cuda
def test_cuda_graph_replays_the_forward_on_new_inputs() -> None:
    net = _small_net("cuda")
    first, second = torch.rand(2, 3, 32, 32, device="cuda"), torch.rand(2, 3, 32, 32, device="cuda")
    wrapped = CudaGraphForward(net, torch.zeros_like(first))
    assert wrapped.captured, wrapped.fallback_reason
    with torch.inference_mode():
        out_first = wrapped(first)
        out_second = wrapped(second)
        torch.testing.assert_close(out_first, net(first))
        torch.testing.assert_close(out_second, net(second))  # the graph read the new input
        assert not torch.equal(out_first, out_second)  # and the first result was not overwritten


@pytest.mark.cuda
def test_cuda_graph_capture_failure_falls_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    net = _small_net("cuda")

    def syncs_with_the_host(x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max().item())  # a host sync: not allowed while a stream is being captured
        return net(x) / scale

    x = torch.rand(1, 3, 16, 16, device="cuda")
    with caplog.at_level(logging.WARNING, logger="edge_agent.cuda_graph"):
        wrapped = CudaGraphForward(syncs_with_the_host, torch.zeros_like(x) + 0.5)
    assert not wrapped.captured
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(x), syncs_with_the_host(x))


@pytest.mark.cuda
def test_uploads_through_the_pinned_buffer_stay_intact() -> None:
    uploader = ImageUploader("cuda")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)  # grows the buffer
    on_device = [uploader.upload(image) for image in (small, large, small[::-1])]
    torch.cuda.synchronize()
    for image, tensor in zip((small, large, small[::-1]), on_device, strict=True):
        assert tensor.device.type == "cuda"
        np.testing.assert_array_equal(tensor.cpu().numpy(), image)


@pytest.mark.cuda
def test_device_path_on_cuda_finds_the_boxes_of_the_cpu_path(
    detector: torch.jit.ScriptModule, images: dict[str, np.ndarray]
) -> None:
    """Letterbox and decode on CUDA (the forward stays the CPU-traced module, fed on the host) against the CPU."""
    for name, image in images.items():
        x, info = letterbox_on_device(ImageUploader("cuda").upload(image), INPUT_HW)
        with torch.inference_mode():
            raw = detector(x.cpu()).cuda()
        found = decode_on_device(raw, conf=0.05)[0]
        ours = Detections(scale_boxes_to_original(found.boxes, info), found.scores, found.class_ids)
        assert all(iou >= 0.99 for iou in _match(_cpu_path(detector, image, 0.05), ours, conf=0.05)), name


def test_the_agents_model_detects_through_the_device_pipeline_when_told(
    trained_bundle: Path, images: dict[str, np.ndarray]
) -> None:
    """``load_model`` wires the pipeline in (on CUDA by default; here forced on the CPU): the same boxes as the
    agent's OpenCV path, answered by the pipeline."""
    from edge_agent.runtime import ServingOptions, load_model
    from exporters.bundle import read_manifest

    manifest = read_manifest(trained_bundle)
    plain = load_model(trained_bundle, manifest, "cpu-fp32", model="m", version="1")
    assert plain.pipeline is None  # a CPU variant serves through OpenCV unless told otherwise
    on_device = load_model(trained_bundle, manifest, "cpu-fp32", model="m", version="1",
                           options=ServingOptions(device_pipeline=True))  # fmt: skip
    assert on_device.pipeline is not None and not on_device.pipeline.captured
    matched = 0
    for image in images.values():
        ious = _match(plain.detect(image), on_device.detect(image), conf=manifest.thresholds.conf)
        assert all(iou >= 0.99 for iou in ious)
        matched += len(ious)
    assert matched >= 8
