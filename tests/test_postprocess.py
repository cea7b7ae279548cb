"""Parity of the light pre/post-processing modules with Ultralytics, on synthetic and real model outputs."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torchvision  # imported before any NMS call so that Ultralytics uses torchvision's kernel, as we compare to it
import ultralytics
from ultralytics.data.augment import LetterBox
from ultralytics.models import YOLO
from ultralytics.utils import ops
from ultralytics.utils.nms import non_max_suppression

from exporters.postprocess import Detections, box_iou, decode, nms, nms_torch, torchvision_available
from exporters.preprocess import (
    LetterboxInfo,
    decode_image_bytes,
    letterbox,
    read_image,
    scale_boxes_to_original,
    to_input_array,
)

ASSETS = Path(ultralytics.__file__).parent / "assets"
# (conf, iou, max_det, agnostic)
NMS_SETTINGS = [
    (0.25, 0.7, 300, False),
    (0.25, 0.45, 300, True),
    (0.001, 0.5, 100, False),
    (0.5, 0.3, 10, False),
    (0.0, 0.7, 300, True),
    (0.1, 0.9, 5, False),
]


def _synthetic_raw(seed: int, batch: int = 3, num_classes: int = 3, num_anchors: int = 2100) -> torch.Tensor:
    """A raw (B, 4 + nc, A) output with clusters of overlapping boxes, score ties and scores on the thresholds."""
    rng = np.random.default_rng(seed)
    raw = np.zeros((batch, 4 + num_classes, num_anchors), dtype=np.float32)
    for image in range(batch):
        num_clusters = 40
        centers = rng.uniform(20, 300, (num_clusters, 2))
        sizes = rng.uniform(8, 90, (num_clusters, 2))
        cluster_classes = rng.integers(0, num_classes, num_clusters)
        member = rng.integers(0, num_clusters, num_anchors)
        raw[image, 0:2] = (centers[member] + rng.normal(0, 4, (num_anchors, 2))).T
        raw[image, 2:4] = (sizes[member] * rng.lognormal(0, 0.15, (num_anchors, 2))).T
        # A grid of 1/512 makes ties common and puts some scores exactly on thresholds such as 0.25 and 0.5.
        scores = np.round(rng.uniform(0, 1, (num_anchors, num_classes)) ** 2 * 512) / 512 * 0.6
        scores[np.arange(num_anchors), cluster_classes[member]] = np.round(rng.uniform(0, 1, num_anchors) * 512) / 512
        raw[image, 4:] = scores.T
        # Exact duplicates (same box, same scores) exercise the tie order of NMS.
        raw[image, :, -50:] = raw[image, :, :50]
    return torch.from_numpy(raw)


def _ultralytics(raw: torch.Tensor, conf: float, iou: float, max_det: int, agnostic: bool) -> list[torch.Tensor]:
    result: list[torch.Tensor] = non_max_suppression(
        raw.clone(), conf_thres=conf, iou_thres=iou, max_det=max_det, agnostic=agnostic
    )
    return result


def _assert_same(ours: list[Detections], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for image, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        reference_np = reference.numpy()
        assert len(mine) == reference_np.shape[0], f"image {image}: {len(mine)} vs {reference_np.shape[0]} boxes"
        np.testing.assert_allclose(mine.boxes, reference_np[:, :4], atol=1e-4, rtol=0)
        np.testing.assert_allclose(mine.scores, reference_np[:, 4], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(mine.class_ids, reference_np[:, 5].astype(np.int64))


def _assert_well_formed(detections: Detections) -> None:
    assert detections.boxes.dtype == np.float32
    assert detections.boxes.shape == (len(detections), 4)
    assert detections.scores.dtype == np.float32
    assert detections.scores.shape == (len(detections),)
    assert detections.class_ids.dtype == np.int64
    assert detections.class_ids.shape == (len(detections),)


# --- decode against Ultralytics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_torchvision", [True, False])
@pytest.mark.parametrize(("conf", "iou", "max_det", "agnostic"), NMS_SETTINGS)
def test_decode_matches_ultralytics_on_synthetic_output(
    conf: float, iou: float, max_det: int, agnostic: bool, use_torchvision: bool
) -> None:
    raw = _synthetic_raw(seed=7)
    ours = decode(raw, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic, use_torchvision=use_torchvision)
    theirs = _ultralytics(raw, conf, iou, max_det, agnostic)
    assert sum(len(d) for d in ours) > 0, "a parity check that keeps nothing proves nothing"
    for detections in ours:
        _assert_well_formed(detections)
        assert np.all(np.diff(detections.scores) <= 0), "detections must come highest score first"
    _assert_same(ours, theirs)


def test_synthetic_settings_exercise_both_limits() -> None:
    """Guards the parity test above: its settings reach both max_det and NMS as the limit, and agnostic matters."""
    raw = _synthetic_raw(seed=7)
    per_image = {
        settings: [
            len(d) for d in decode(raw, conf=settings[0], iou=settings[1], max_det=settings[2], agnostic=settings[3])
        ]
        for settings in NMS_SETTINGS
    }
    assert any(all(n == settings[2] for n in counts) for settings, counts in per_image.items())
    assert any(all(0 < n < settings[2] for n in counts) for settings, counts in per_image.items())
    class_aware = sum(len(d) for d in decode(raw, conf=0.25, iou=0.45))
    agnostic = sum(len(d) for d in decode(raw, conf=0.25, iou=0.45, agnostic=True))
    assert 0 < agnostic < class_aware


def test_decode_strict_threshold_and_class_offset() -> None:
    # Anchor 0 scores exactly `conf` and is dropped (strictly above, as Ultralytics); anchors 1 and 2 overlap fully
    # but have different classes, so both survive unless NMS is class-agnostic.
    raw = torch.zeros((1, 6, 3))
    raw[0, :4] = torch.tensor([[50.0, 50.0, 50.0], [50.0, 50.0, 50.0], [20.0, 20.0, 20.0], [20.0, 20.0, 20.0]])
    raw[0, 4:] = torch.tensor([[0.25, 0.9, 0.0], [0.0, 0.0, 0.8]])
    per_class = decode(raw, conf=0.25)[0]
    np.testing.assert_array_equal(per_class.class_ids, [0, 1])
    np.testing.assert_allclose(per_class.boxes, [[40, 40, 60, 60], [40, 40, 60, 60]])
    np.testing.assert_allclose(per_class.scores, [0.9, 0.8])
    assert len(decode(raw, conf=0.25, agnostic=True)[0]) == 1


def test_decode_matches_ultralytics_past_max_nms_candidates() -> None:
    """Only the best 30,000 candidates reach NMS: the ranks just above that cut must survive, those below must not."""
    rng = np.random.default_rng(3)
    num_crowd, num_isolated = 29600, 2400
    raw = np.zeros((1, 5, num_crowd + num_isolated), dtype=np.float32)
    # One crowd of near-identical boxes with the best scores collapses to one detection...
    raw[0, 0:2, :num_crowd] = 100 + rng.normal(0, 0.5, (2, num_crowd))
    raw[0, 2:4, :num_crowd] = 50
    raw[0, 4, :num_crowd] = 0.5 + rng.uniform(0, 0.5, num_crowd)
    # ...and isolated boxes on a grid survive NMS, so the cut alone decides which of them are kept. Coarse scores
    # make ties straddle the cut.
    grid_x, grid_y = np.meshgrid(np.arange(60), np.arange(40))
    raw[0, 0, num_crowd:] = 300 + grid_x.ravel() * 30
    raw[0, 1, num_crowd:] = 300 + grid_y.ravel() * 30
    raw[0, 2:4, num_crowd:] = 20
    raw[0, 4, num_crowd:] = np.ceil(rng.uniform(0, 0.5, num_isolated) * 16) / 16
    tensor = torch.from_numpy(raw)
    theirs = _ultralytics(tensor, 0.0, 0.6, 1000, False)
    assert theirs[0].shape[0] == 1 + 400
    for use_torchvision in (True, False):
        _assert_same(decode(tensor, conf=0.0, iou=0.6, max_det=1000, use_torchvision=use_torchvision), theirs)


def test_decode_matches_ultralytics_on_large_coordinates() -> None:
    """Boxes beyond the 7680 px class offset overlap other classes' shifted boxes; Ultralytics lets them interact."""
    raw = _synthetic_raw(seed=5, num_classes=4)
    raw[:, :4] *= 30  # centres up to ~9000 px
    for agnostic in (False, True):
        theirs = _ultralytics(raw, 0.2, 0.5, 300, agnostic)
        _assert_same(decode(raw, conf=0.2, iou=0.5, agnostic=agnostic, use_torchvision=True), theirs)
        _assert_same(decode(raw, conf=0.2, iou=0.5, agnostic=agnostic, use_torchvision=False), theirs)


@pytest.fixture(scope="module")
def real_raw_outputs() -> dict[str, torch.Tensor]:
    """Raw outputs of a YOLOv8n built from its YAML on two letterboxed real images.

    Random weights put every class score near 1e-4, so a second copy of the model has its class biases zeroed:
    its scores spread around 0.5 and ordinary thresholds keep many overlapping boxes.
    """
    torch.manual_seed(0)
    model: Any = YOLO("yolov8n.yaml").model
    model.eval()
    images = [letterbox(read_image(ASSETS / name), (128, 160))[0] for name in ("bus.jpg", "zidane.jpg")]
    batch = torch.from_numpy(to_input_array(images))
    with torch.no_grad():
        untouched = model(batch)[0]
        for branch in model.model[-1].cv3:
            branch[-1].bias.zero_()
        spread = model(batch)[0]
    return {"untouched": untouched, "zero_class_bias": spread}


@pytest.mark.parametrize(
    ("variant", "conf"),
    [("untouched", 0.0), ("untouched", 1e-4), ("zero_class_bias", 0.001), ("zero_class_bias", 0.25)],
)
@pytest.mark.parametrize("iou", [0.7, 0.45])
def test_decode_matches_ultralytics_on_real_model_output(
    real_raw_outputs: dict[str, torch.Tensor], variant: str, conf: float, iou: float
) -> None:
    raw = real_raw_outputs[variant]
    assert raw.shape == (2, 84, 420)
    theirs = _ultralytics(raw, conf, iou, 300, False)
    assert all(t.shape[0] > 0 for t in theirs)
    _assert_same(decode(raw, conf=conf, iou=iou, use_torchvision=True), theirs)
    _assert_same(decode(raw, conf=conf, iou=iou, use_torchvision=False), theirs)
    # The edge agent often gets numpy back from its runtime.
    _assert_same(decode(raw.numpy(), conf=conf, iou=iou), theirs)


# --- NMS ----------------------------------------------------------------------------------------------------------


def _random_boxes(seed: int, count: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand((count, 2), generator=generator) * 200
    size = 5 + torch.rand((count, 2), generator=generator) * 60
    # Scores on a grid of 1/100 so that many tie.
    scores = torch.randint(0, 100, (count,), generator=generator).float() / 100
    boxes = torch.cat((top_left, top_left + size), dim=1)
    # Near-duplicates of the first 100 boxes give overlaps above even a 0.95 threshold.
    jitter = torch.rand((100, 4), generator=generator) * 0.4
    near_duplicates = boxes[:100] + jitter
    return torch.cat((boxes, near_duplicates)), torch.cat((scores, scores[:100].flip(0)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("iou", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_nms_torch_matches_torchvision(seed: int, iou: float) -> None:
    boxes, scores = _random_boxes(seed)
    expected = torchvision.ops.nms(boxes, scores, iou)
    assert 0 < expected.numel() < boxes.shape[0]
    assert torch.equal(nms_torch(boxes, scores, iou), expected)
    assert torch.equal(nms_torch(boxes, scores, iou, max_keep=7), expected[:7])
    assert torch.equal(nms(boxes, scores, iou, use_torchvision=False), expected)
    assert torch.equal(nms(boxes, scores, iou, use_torchvision=True), expected)


def test_nms_torch_edge_cases_match_torchvision() -> None:
    # Identical zero-area boxes have an undefined IoU; torchvision keeps them all, so must we.
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 5.0]] * 3 + [[0.0, 0.0, 10.0, 10.0]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.5, 0.5])
    assert torch.equal(nms_torch(degenerate, scores, 0.5), torchvision.ops.nms(degenerate, scores, 0.5))
    assert nms_torch(degenerate, scores, 0.5).tolist() == [0, 1, 2, 3]
    empty = nms_torch(torch.zeros((0, 4)), torch.zeros((0,)), 0.5)
    assert empty.dtype == torch.int64
    assert empty.shape == (0,)


def test_torchvision_is_detected() -> None:
    assert torchvision_available()


def test_the_kernel_loads_without_importing_the_torchvision_package() -> None:
    # Importing torchvision.ops costs seconds (it imports torch._dynamo); the agent needs only the NMS kernel.
    probe = (
        "import sys, torch\n"
        "from exporters.postprocess import nms, torchvision_available\n"
        "boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [20., 20., 30., 30.]])\n"
        "keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)\n"
        "print(torchvision_available(), 'torchvision' in sys.modules, keep.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "[0,", "2]"]


# --- empty, dtypes, validation ------------------------------------------------------------------------------------


def test_empty_results_have_the_right_shapes() -> None:
    no_anchors = decode(torch.zeros((2, 7, 0)))
    below_conf = decode(torch.full((1, 7, 50), 0.1), conf=0.25)
    at_conf = decode(torch.full((1, 7, 50), 0.25), conf=0.25)
    for detections in [*no_anchors, *below_conf, *at_conf]:
        assert len(detections) == 0
        _assert_well_formed(detections)
        assert detections.to_records({}) == []
    assert len(no_anchors) == 2


def test_fp16_and_read_only_numpy_input() -> None:
    raw16 = _synthetic_raw(seed=11).half()
    ours = decode(raw16, conf=0.25, iou=0.6)
    _assert_same(ours, _ultralytics(raw16.float(), 0.25, 0.6, 300, False))
    assert all(d.boxes.dtype == np.float32 for d in ours)
    read_only = raw16.numpy().copy()
    read_only.flags.writeable = False
    _assert_same(decode(read_only, conf=0.25, iou=0.6), _ultralytics(raw16.float(), 0.25, 0.6, 300, False))


def test_decode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        decode(torch.zeros((84, 100)))
    with pytest.raises(ValueError, match="5 rows"):
        decode(torch.zeros((1, 4, 100)))
    with pytest.raises(ValueError, match="conf"):
        decode(torch.zeros((1, 6, 10)), conf=1.5)


def test_to_records() -> None:
    detections = Detections(
        boxes=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float32),
        scores=np.array([0.9, 0.5], dtype=np.float32),
        class_ids=np.array([0, 7], dtype=np.int64),
    )
    records = detections.to_records({0: "chip"})
    assert records == [
        {"box": [1.0, 2.0, 3.0, 4.0], "score": pytest.approx(0.9), "class_id": 0, "class_name": "chip"},
        {"box": [5.0, 6.0, 7.0, 8.0], "score": pytest.approx(0.5), "class_id": 7, "class_name": "7"},
    ]
    assert all(type(r["score"]) is float and type(r["class_id"]) is int for r in records)


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2], [1, 1, 1, 1]], dtype=np.float32)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [1, 1, 1, 1]], dtype=np.float32)
    expected = np.array(
        [
            [25 / 175, 1.0, 0.0, 0.0],
            [0.0, 4 / 100, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # a zero-area box overlaps nothing, not even itself
        ]
    )
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=0, atol=1e-12)
    assert box_iou(a, np.zeros((0, 4))).shape == (3, 0)


# --- preprocessing ------------------------------------------------------------------------------------------------


def _small_image() -> np.ndarray:
    return np.ascontiguousarray(read_image(ASSETS / "bus.jpg")[400:450, 300:370])


IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "bus": lambda: read_image(ASSETS / "bus.jpg"),
    "zidane": lambda: read_image(ASSETS / "zidane.jpg"),
    "small": _small_image,
}
INPUT_SIZES = [(128, 160), (160, 128), (320, 320), (640, 640), (97, 131)]


@pytest.mark.parametrize("image_name", sorted(IMAGES))
@pytest.mark.parametrize("input_hw", INPUT_SIZES)
def test_letterbox_matches_ultralytics(image_name: str, input_hw: tuple[int, int]) -> None:
    image = IMAGES[image_name]()
    ours, info = letterbox(image, input_hw)
    reference_transform = LetterBox(new_shape=input_hw, auto=False, scale_fill=False, scaleup=True, center=True)
    reference = reference_transform(image=image.copy())
    params: dict[str, Any] = reference_transform.get_params({"img": image})
    assert ours.shape == (*input_hw, 3)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference)
    assert (info.pad_top, info.pad_bottom, info.pad_left, info.pad_right) == (
        params["top"],
        params["bottom"],
        params["left"],
        params["right"],
    )
    assert info.resized_hw == params["new_unpad"][::-1]
    assert info.original_hw == image.shape[:2]
    assert info.input_hw == input_hw
    if image_name == "small":
        assert info.scale > 1  # scaled up, not just padded


def test_to_input_array_layout() -> None:
    images = [letterbox(IMAGES[name](), (128, 160))[0] for name in ("bus", "zidane")]
    batch = to_input_array(images)
    assert batch.shape == (2, 3, 128, 160)
    assert batch.dtype == np.float32
    assert batch.flags.c_contiguous
    assert batch.min() >= 0.0
    assert batch.max() <= 1.0
    # Channel 0 is red, which is the last channel of BGR.
    np.testing.assert_array_equal(batch[1, 0], images[1][:, :, 2].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(batch[0, 2], images[0][:, :, 0].astype(np.float32) / np.float32(255))
    # Bit-identical to Ultralytics' predictor preprocessing.
    reference = torch.from_numpy(np.ascontiguousarray(np.stack(images)[..., ::-1].transpose(0, 3, 1, 2))).float()
    reference /= 255
    assert torch.equal(torch.from_numpy(batch), reference)
    with pytest.raises(ValueError, match="same shape"):
        to_input_array([images[0], images[0][:64]])


@pytest.mark.parametrize(
    ("original_hw", "input_hw"),
    [((1080, 810), (128, 160)), ((720, 1280), (320, 320)), ((50, 70), (97, 131)), ((70, 50), (131, 97))],
)
def test_scale_boxes_to_original_matches_ultralytics(original_hw: tuple[int, int], input_hw: tuple[int, int]) -> None:
    _, info = letterbox(np.zeros((*original_hw, 3), dtype=np.uint8), input_hw)
    rng = np.random.default_rng(5)
    top_left = rng.uniform(-20, max(input_hw), (200, 2))
    boxes = np.concatenate((top_left, top_left + rng.uniform(1, 80, (200, 2))), axis=1).astype(np.float32)
    boxes_before = boxes.copy()
    ours = scale_boxes_to_original(boxes, info)
    reference = ops.scale_boxes(input_hw, boxes.copy(), original_hw)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    assert ours.dtype == np.float32
    # Some boxes stick out of the image, so clipping is exercised.
    assert ours[:, [0, 2]].min() == 0
    assert ours[:, [1, 3]].max() == original_hw[0]
    np.testing.assert_array_equal(boxes, boxes_before)  # the caller's array is left untouched
    assert isinstance(info, LetterboxInfo)


# --- image I/O ----------------------------------------------------------------------------------------------------


def test_read_image_and_decode_bytes(tmp_path: Path) -> None:
    image = read_image(ASSETS / "zidane.jpg")
    np.testing.assert_array_equal(image, cv2.imread(str(ASSETS / "zidane.jpg")))
    ok, encoded = cv2.imencode(".png", image[:40, :60])
    assert ok
    np.testing.assert_array_equal(decode_image_bytes(encoded.tobytes()), image[:40, :60])

    missing = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        read_image(missing)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        read_image(garbage)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image_bytes(b"\x00\x01garbage" * 7)
    with pytest.raises(ValueError, match="empty"):
        decode_image_bytes(b"")
