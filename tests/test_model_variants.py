"""The altered detectors of ``exporters.yolo_variants`` and training continued from weights.

Each variant is built from the trained fixture detector, exported through the real exporter (its gates compare
the file with its own eager model, so they must pass) and run on held-out synthetic scenes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.drills import load_variant
from exporters.export import ExportRequest, export_bundle
from exporters.gates import match_count, measure_latency
from exporters.postprocess import Detections, decode
from exporters.preprocess import to_input_array
from exporters.synthetic import CLASS_NAMES, make_scene
from exporters.yolo import eager_model, load_detector
from exporters.yolo_variants import SlowedLayer, drop_class, slow_down

SCENES_SEED = 98765  # not the training seed (0) nor the golden scenes' (1234)
DROPPED = 2  # solder_bridge, the defect class: the regression that matters most on a line
EXTRA_MS = 25.0


@pytest.fixture(scope="module")
def scenes() -> torch.Tensor:
    rng = np.random.default_rng(SCENES_SEED)
    return torch.from_numpy(to_input_array([make_scene(rng, 160)[0] for _ in range(32)]))


def _outputs(weights: Path, scenes: torch.Tensor) -> torch.Tensor:
    model = eager_model(load_detector(str(weights)))
    with torch.inference_mode():
        output = model(scenes)
    return output[0] if isinstance(output, (tuple, list)) else output


def _of_class(detections: Detections, keep: np.ndarray) -> Detections:
    return Detections(detections.boxes[keep], detections.scores[keep], detections.class_ids[keep])


def _export(weights: Path, out: Path, scene_images: list[Path]) -> Path:
    result = export_bundle(
        ExportRequest(
            model=str(weights), out_dir=out, imgsz=(160, 160), variants=("cpu-fp32",), golden_images=tuple(scene_images)
        )
    )
    gates = result.manifest.gates["cpu-fp32"]
    assert result.passed, gates
    assert gates.raw_parity.mse <= 1e-5 and gates.detection_parity.passed
    return out


def test_drop_class_silences_one_class_and_keeps_the_others(
    trained_detector: Path, scenes: torch.Tensor, scene_images: list[Path], tmp_path: Path
) -> None:
    dropped = drop_class(trained_detector, DROPPED, tmp_path / "dropped.pt")
    assert load_detector(str(dropped)).names == dict(enumerate(CLASS_NAMES))
    before, after = _outputs(trained_detector, scenes), _outputs(dropped, scenes)
    assert torch.isfinite(after).all()
    assert (after[:, 4 + DROPPED] < 1e-6).all()  # the class's score, whatever the image

    original, altered = decode(before), decode(after)
    assert sum(int((d.class_ids == DROPPED).sum()) for d in original) >= 10  # the fixture does find the class
    assert all(not (d.class_ids == DROPPED).any() for d in altered)
    for class_id in set(range(len(CLASS_NAMES))) - {DROPPED}:
        kept = [_of_class(d, d.class_ids == class_id) for d in original]
        now = [_of_class(d, d.class_ids == class_id) for d in altered]
        total = sum(len(d) for d in kept)
        matched = sum(match_count(k, n, 0.9) for k, n in zip(kept, now, strict=True))
        assert total >= 10 and matched >= 0.95 * total, (CLASS_NAMES[class_id], matched, total)

    _export(dropped, tmp_path / "bundle", scene_images)


def test_slow_down_keeps_the_outputs_and_costs_time(
    trained_detector: Path,
    trained_bundle: Path,
    scenes: torch.Tensor,
    scene_images: list[Path],
    tmp_path: Path,
) -> None:
    slowed = slow_down(trained_detector, EXTRA_MS, tmp_path / "slowed.pt")
    assert isinstance(load_detector(str(slowed)).yolo.model.model[0], SlowedLayer)
    assert torch.equal(_outputs(trained_detector, scenes), _outputs(slowed, scenes))

    bundle = _export(slowed, tmp_path / "bundle", scene_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the slowdown was calibrated
    try:
        example = scenes[:1]
        fast, slow = load_variant(trained_bundle), load_variant(bundle)
        assert torch.equal(fast(example), slow(example))  # the traced file kept the outputs too
        timings = [measure_latency(m, example, warmup_iters=5, timed_iters=20).p50_ms for m in (fast, slow)]
    finally:
        torch.set_num_threads(threads)
    assert timings[1] - timings[0] >= 0.5 * EXTRA_MS, timings  # the traced file kept the extra compute


def test_training_continues_from_given_weights_and_keeps_snapshots(trained_detector: Path, tmp_path: Path) -> None:
    from exporters.yolo import snapshot_path, train_synthetic_detector

    # 64 images in batches of 16: Ultralytics steps its optimizer every 64 images, so once per epoch.
    further = train_synthetic_detector(
        tmp_path, weights=trained_detector, epochs=2, train_images=64, seed=7, snapshot_epochs=(1,)
    )
    detectors = [load_detector(str(w)) for w in (trained_detector, snapshot_path(tmp_path, 1), further)]
    start, middle, end = (d.yolo.model.state_dict() for d in detectors)
    head_index = len(detectors[0].yolo.model.model) - 1
    floats = [k for k in start if start[k].is_floating_point()]
    assert [k for k in floats if not torch.equal(start[k], end[k])]  # it trained ...
    assert [k for k in floats if not torch.equal(middle[k], end[k])]  # ... and the snapshot is an earlier state
    # ... from the given weights, not from scratch: two short epochs leave the head close to where it was.
    head = [k for k in start if k.startswith(f"model.{head_index}.cv3") and k.endswith("weight") and start[k].ndim == 4]
    cosine = [torch.nn.functional.cosine_similarity(start[k].flatten(), end[k].flatten(), dim=0) for k in head]
    assert min(float(c) for c in cosine) > 0.9, cosine
