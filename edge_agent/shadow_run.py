"""Shadow validation of a staged version: the candidate runs on live frames in a low-priority child process.

The parent (``shadow_validate``, on the update thread) collects up to ``sample_frames`` frames from the runtime's
frame ring (those the serving version answered, with its detections), waiting at most ``time_limit_s``, and
writes them to a work folder. The child (``python -m edge_agent.shadow_run``), at ``nice`` and on one CPU thread,
loads the candidate and detects on them; the parent matches the two (``edge_agent.shadow``). With fewer frames
than asked for, the golden data stands in: the child then runs both the serving and the candidate bundle on the
candidate's golden images. Requests are never delayed: the serving process only reads its ring.

Safe to run twice (the validating step reruns after a crash): the work folder is emptied first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from edge_agent.child import log_tail, run_child
from edge_agent.errors import ShadowFailed, ValidationInterrupted
from edge_agent.frames import FrameRing
from edge_agent.protocol import ShadowConfig, ShadowReport
from edge_agent.shadow import compare, skipped, summary
from exporters.bundle import read_manifest
from exporters.files import atomic_write
from exporters.postprocess import Detections

if TYPE_CHECKING:
    from edge_agent.runtime import LoadedModel

log = logging.getLogger(__name__)

COLLECT_POLL_S = 0.2
OUT_FILE = "shadow-out.json"


class ShadowRunOutput(BaseModel):
    """What the child writes: detection rows (frame, x1, y1, x2, y2, score, class id) per model."""

    frames: int
    candidate: list[list[float]]
    serving: list[list[float]] | None = None  # golden runs only
    errors: list[str]  # one per frame the candidate failed on (NaN/inf outputs included)


def shadow_validate(
    candidate_dir: Path, variant: str, *, serving: LoadedModel | None, frames: FrameRing | None,
    config: ShadowConfig, work_dir: Path, nice: int, timeout_s: float, time_limit_s: float,
    stop: threading.Event | None = None,
) -> tuple[ShadowReport, str]:  # fmt: skip
    """Compare the candidate with ``serving`` on up to ``sample_frames`` live frames (golden data when too few
    arrive within ``time_limit_s``); the report and its one-line reason. Does not raise on a failed gate."""
    if not config.enabled:
        return skipped("disabled by the desired state")
    if serving is None:
        return skipped("nothing serving yet (first version)")
    shutil.rmtree(work_dir, ignore_errors=True)
    frames_dir = work_dir / "frames"
    frames_dir.mkdir(parents=True)
    try:
        started = time.monotonic()
        live = _collect(frames, serving.version, config.sample_frames, time_limit_s, frames_dir, stop)
        waited_s = time.monotonic() - started
        common = ["--candidate", str(candidate_dir), "--variant", variant, "--nice", str(nice)]
        if len(live) >= config.sample_frames:
            args = ["live", *common, "--frames", str(frames_dir)]
            note = ""
        else:
            args = ["golden", *common, "--serving", str(serving.directory), "--serving-variant", serving.variant]
            note = f"only {len(live)} live frames in {waited_s:.0f} s; "
        output = _run(args, work_dir, timeout_s, stop)
        serving_dets = live if output.serving is None else _split(output.serving, output.frames)
        pairs = list(zip(serving_dets, _split(output.candidate, output.frames), strict=True))
        names = read_manifest(candidate_dir).names
        report = compare(pairs, config, names, source="live" if output.serving is None else "golden")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    reason = note + summary(report, config, f"{serving.model} v{serving.version}")
    if output.errors:
        report = report.model_copy(update={"passed": False})
        reason = f"candidate failed on {len(output.errors)} of {output.frames} frames ({output.errors[0][:160]}); "
        reason += summary(report, config, f"{serving.model} v{serving.version}")
    return report, reason


def _collect(
    ring: FrameRing | None, version: str, want: int, limit_s: float, frames_dir: Path, stop: threading.Event | None
) -> list[Detections]:
    """Write up to ``want`` frames that ``version`` answered to ``frames_dir``; its detections on them."""
    kept: list[Detections] = []
    if ring is None:
        return kept
    seq = 0
    deadline = time.monotonic() + limit_s
    while True:
        for frame in ring.after(seq, version):
            seq = frame.seq
            if len(kept) < want:
                (frames_dir / f"{len(kept):06d}.img").write_bytes(frame.data)
                kept.append(frame.detections)
        if len(kept) >= want or time.monotonic() >= deadline:
            return kept
        if stop is not None and stop.wait(COLLECT_POLL_S):
            raise ValidationInterrupted("the agent is stopping")
        if stop is None:
            time.sleep(COLLECT_POLL_S)


def _run(args: list[str], work_dir: Path, timeout_s: float, stop: threading.Event | None) -> ShadowRunOutput:
    out, child_log = work_dir / OUT_FILE, work_dir / "shadow.log"
    code = run_child("edge_agent.shadow_run", [*args, "--out", str(out)], log_path=child_log, timeout_s=timeout_s,
                     stop=stop, on_timeout=ShadowFailed, what="shadow validation")  # fmt: skip
    if not out.is_file():
        raise ShadowFailed(f"shadow validation crashed (exit {code}): {log_tail(child_log)}")
    return ShadowRunOutput.model_validate_json(out.read_bytes())


def _rows(index: int, found: Detections) -> list[list[float]]:
    return [
        [float(index), *map(float, box), float(score), float(class_id)]
        for box, score, class_id in zip(found.boxes, found.scores, found.class_ids, strict=True)
    ]


def _split(rows: list[list[float]], frames: int) -> list[Detections]:
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    return [
        Detections(
            boxes=table[table[:, 0] == i, 1:5].astype(np.float32),
            scores=table[table[:, 0] == i, 5].astype(np.float32),
            class_ids=table[table[:, 0] == i, 6].astype(np.int64),
        )
        for i in range(frames)
    ]


# -- the child ---------------------------------------------------------------------------------------------------


def _load(directory: Path, variant: str) -> LoadedModel:
    from edge_agent.runtime import load_model

    manifest = read_manifest(directory)
    return load_model(directory, manifest, variant, model=manifest.name, version="shadow")


def _detect_all(model: LoadedModel, images: list[np.ndarray], errors: list[str] | None) -> list[list[float]]:
    rows: list[list[float]] = []
    for index, image in enumerate(images):
        try:
            rows += _rows(index, model.detect(image))
        except Exception as exc:  # a NaN output or a crash on one frame is a finding, not the child's end
            if errors is None:
                raise
            errors.append(f"frame {index}: {exc}")
    return rows


def _golden_images(directory: Path) -> list[np.ndarray]:
    """The bundle's golden inputs as BGR uint8 images (letterboxed RGB floats in [0, 1] in the file)."""
    from exporters.bundle import safe_join
    from exporters.golden import Golden

    inputs = Golden.load(safe_join(directory, read_manifest(directory).golden.path)).inputs
    return [np.ascontiguousarray((x.transpose(1, 2, 0)[:, :, ::-1] * 255).round().astype(np.uint8)) for x in inputs]


def _run_child(args: argparse.Namespace) -> ShadowRunOutput:
    from exporters.preprocess import decode_image_bytes

    if args.mode == "live":
        images = [decode_image_bytes(path.read_bytes()) for path in sorted(args.frames.glob("*.img"))]
        serving_rows = None
    else:
        images = _golden_images(args.candidate)
        serving_rows = _detect_all(_load(args.serving, args.serving_variant), images, None)
    errors: list[str] = []
    candidate_rows = _detect_all(_load(args.candidate, args.variant), images, errors)
    return ShadowRunOutput(frames=len(images), candidate=candidate_rows, serving=serving_rows, errors=errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.shadow_run", description=__doc__)
    parser.add_argument("mode", choices=("live", "golden"))
    parser.add_argument("--candidate", type=Path, required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--frames", type=Path)
    parser.add_argument("--serving", type=Path)
    parser.add_argument("--serving-variant")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    import torch

    torch.set_num_threads(1)  # leave the other cores to the serving process
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = _run_child(args)
    atomic_write(args.out, json.dumps(output.model_dump(mode="json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
