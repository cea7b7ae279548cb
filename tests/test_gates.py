"""The gate arithmetic on hand-made numbers, and golden data round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.gates import GateThresholds, detection_parity, match_count, measure_latency, raw_parity
from exporters.golden import Golden
from exporters.postprocess import Detections


def _dets(boxes: list[list[float]], classes: list[int], scores: list[float] | None = None) -> Detections:
    return Detections(
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        scores=np.array(scores or [0.9] * len(classes), np.float32),
        class_ids=np.array(classes, np.int64),
    )


def test_raw_parity_figures() -> None:
    reference = np.zeros((2, 5, 10), np.float32)
    candidate = reference.copy()
    candidate[0, 0, 0] = 0.1
    result = raw_parity(candidate, reference + 0, judged=True, mse_max=1e-5)
    assert result.mse == pytest.approx(0.01 / 100)
    assert result.max_abs == pytest.approx(0.1)
    assert not result.passed
    assert raw_parity(reference, reference, judged=True, mse_max=1e-5).passed
    info_only = raw_parity(candidate, reference, judged=False, mse_max=1e-5)
    assert info_only.passed and not info_only.judged


def test_raw_parity_rejects_nan_and_shape_mismatch() -> None:
    reference = np.ones((1, 5, 10), np.float32)
    candidate = reference.copy()
    candidate[0, 1, 1] = np.nan
    assert not raw_parity(candidate, reference, judged=False, mse_max=1.0).passed
    assert not raw_parity(np.ones((1, 6, 10), np.float32), reference, judged=True, mse_max=1.0).passed


def test_cosine_of_scaled_output() -> None:
    reference = np.arange(1, 21, dtype=np.float32).reshape(1, 4, 5)
    assert raw_parity(reference * 2, reference, judged=False, mse_max=0).cosine == pytest.approx(1.0)


def test_match_count_needs_same_class_and_iou() -> None:
    reference = _dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])
    assert match_count(reference, _dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]), 0.9) == 2
    assert match_count(reference, _dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 2]), 0.9) == 1  # class differs
    assert match_count(reference, _dets([[0, 0, 10, 11], [22, 22, 30, 30]], [0, 1]), 0.9) == 1  # IoU 0.91, 0.64
    # one candidate cannot match two references
    assert match_count(_dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0]), _dets([[0, 0, 10, 10]], [0]), 0.9) == 1


def test_detection_parity_each_way() -> None:
    thresholds = GateThresholds(conf=0.25, det_match_min=0.99)
    raw = np.zeros((1, 4 + 2, 3), np.float32)
    raw[0, :4, 0] = [50, 50, 20, 20]
    raw[0, 4, 0] = 0.9
    reference = (_dets([[40, 40, 60, 60]], [0]),)
    same = detection_parity(raw, reference, thresholds)
    assert same.passed and same.matched == 1
    extra = raw.copy()
    extra[0, :4, 1] = [150, 150, 20, 20]
    extra[0, 5, 1] = 0.8
    one_more = detection_parity(extra, reference, thresholds)
    assert one_more.matched_fraction_reference == 1.0
    assert one_more.matched_fraction_candidate == 0.5
    assert not one_more.passed


def test_latency_on_cpu_uses_perf_counter() -> None:
    model = torch.nn.Conv2d(3, 4, 3)
    stats = measure_latency(model, torch.rand(2, 3, 32, 32), warmup_iters=2, timed_iters=7)
    assert stats.timer == "perf_counter"
    assert stats.batch == 2 and stats.iterations == 7
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.fps == pytest.approx(2000 / stats.mean_ms)


@pytest.mark.cuda
def test_latency_on_cuda_uses_events() -> None:
    model = torch.nn.Conv2d(3, 4, 3).cuda()
    stats = measure_latency(model, torch.rand(1, 3, 64, 64, device="cuda"), warmup_iters=3, timed_iters=10)
    assert stats.timer == "cuda-events" and stats.p50_ms > 0


def test_golden_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    golden = Golden(
        inputs=rng.random((3, 3, 8, 8), dtype=np.float32),
        input_names=("a.jpg", "b.jpg", "noise-0"),
        outputs=rng.random((3, 6, 4), dtype=np.float32),
        detections=(_dets([[1, 2, 3, 4]], [1], [0.5]), _dets([], []), _dets([[0, 0, 2, 2], [4, 4, 6, 6]], [0, 1])),
    )
    path = tmp_path / "golden.npz"
    golden.save(path)
    loaded = Golden.load(path)
    assert loaded.input_names == golden.input_names
    np.testing.assert_array_equal(loaded.inputs, golden.inputs)
    np.testing.assert_array_equal(loaded.outputs, golden.outputs)
    assert [len(d) for d in loaded.detections] == [1, 0, 2]
    np.testing.assert_array_equal(loaded.detections[2].boxes, golden.detections[2].boxes)
    assert loaded.detections[0].class_ids.tolist() == [1]
    assert loaded.reference_count == 3
    assert loaded.outputs_cuda is None


def test_cuda_variants_are_compared_with_the_cuda_reference_when_there_is_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cpu = rng.random((2, 6, 4), dtype=np.float32)
    cuda = cpu + np.float32(1e-3)
    golden = Golden(
        inputs=rng.random((2, 3, 8, 8), dtype=np.float32),
        input_names=("a", "b"),
        outputs=cpu,
        detections=(_dets([], []), _dets([], [])),
        outputs_cuda=cuda,
    )
    path = tmp_path / "golden.npz"
    golden.save(path)
    loaded = Golden.load(path)
    assert loaded.outputs_cuda is not None
    np.testing.assert_array_equal(loaded.outputs_cuda, cuda)
    assert loaded.raw_reference("cuda")[1] == "cuda"
    np.testing.assert_array_equal(loaded.raw_reference("cuda")[0], cuda)
    assert loaded.raw_reference("cpu")[1] == "cpu"
    without = Golden(inputs=golden.inputs, input_names=("a", "b"), outputs=cpu, detections=golden.detections)
    assert without.raw_reference("cuda")[1] == "cpu"  # older bundles: fall back to the CPU reference
