"""The shadow gate: the candidate's detections on the frames the serving model answered, matched per class.

On each frame, serving and candidate detections are paired one to one, greedily by the serving detection's
score: same class and IoU >= ``iou`` (the same rule as the export gates' detection parity). Then, overall and per
class, ``matched_serving`` is the share of the serving model's detections the candidate matched and
``matched_candidate`` the share of the candidate's detections the serving model matched; ``count_delta`` is the
relative change of the detection count and ``confidence_shift`` the mean score change over matched pairs.

The gate passes when ``matched_serving >= min_matched`` overall and for every class the serving model found at
least ``min_class_samples`` times (rarer classes are reported, not judged). A model that lost a class fails on
that class even when the other classes keep the overall share high. numpy only: no torch at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edge_agent.protocol import ShadowClass, ShadowConfig, ShadowReport
from exporters.postprocess import Detections, box_iou

Source = Literal["live", "golden"]


def match_pairs(serving: Detections, candidate: Detections, iou_min: float) -> list[tuple[int, int]]:
    """(serving index, candidate index) of each matched pair: same class, IoU >= ``iou_min``, one to one."""
    if len(serving) == 0 or len(candidate) == 0:
        return []
    iou = box_iou(serving.boxes, candidate.boxes)
    iou[np.asarray(serving.class_ids)[:, None] != np.asarray(candidate.class_ids)[None, :]] = -1.0
    taken = np.zeros(len(candidate), dtype=bool)
    pairs = []
    for row in np.argsort(-np.asarray(serving.scores), kind="stable"):
        scores = np.where(taken, -1.0, iou[row])
        best = int(np.argmax(scores))
        if scores[best] >= iou_min:
            taken[best] = True
            pairs.append((int(row), best))
    return pairs


@dataclass
class _Tally:
    serving: dict[int, int] = field(default_factory=dict)
    candidate: dict[int, int] = field(default_factory=dict)
    matched: dict[int, int] = field(default_factory=dict)
    score_shift_sum: float = 0.0

    def add(self, serving: Detections, candidate: Detections, iou_min: float) -> None:
        for ids, counts in ((serving.class_ids, self.serving), (candidate.class_ids, self.candidate)):
            for class_id in np.asarray(ids).tolist():
                counts[int(class_id)] = counts.get(int(class_id), 0) + 1
        for s, c in match_pairs(serving, candidate, iou_min):
            class_id = int(serving.class_ids[s])
            self.matched[class_id] = self.matched.get(class_id, 0) + 1
            self.score_shift_sum += float(candidate.scores[c]) - float(serving.scores[s])


def _share(matched: int, of: int) -> float | None:
    return matched / of if of else None


def compare(
    frames: Sequence[tuple[Detections, Detections]],
    config: ShadowConfig,
    class_names: Mapping[int, str],
    *,
    source: Source,
) -> ShadowReport:
    """Match (serving, candidate) detections frame by frame and apply the gate of ``config``."""
    tally = _Tally()
    for serving, candidate in frames:
        tally.add(serving, candidate, config.iou)
    n_serving, n_candidate = sum(tally.serving.values()), sum(tally.candidate.values())
    matched = sum(tally.matched.values())
    classes = []
    for class_id in sorted({*tally.serving, *tally.candidate}):
        s, c, m = tally.serving.get(class_id, 0), tally.candidate.get(class_id, 0), tally.matched.get(class_id, 0)
        judged = s >= config.min_class_samples
        share = _share(m, s)
        classes.append(
            ShadowClass(
                class_id=class_id, class_name=class_names.get(class_id, str(class_id)), serving=s, candidate=c,
                matched_serving=share, matched_candidate=_share(m, c), judged=judged,
                passed=not judged or (share is not None and share >= config.min_matched),
            )
        )  # fmt: skip
    overall = _share(matched, n_serving)
    # Nothing detected by the serving model: nothing to miss; the candidate's extra boxes show in count_delta.
    overall_ok = overall is None or overall >= config.min_matched
    return ShadowReport(
        source=source,
        frames=len(frames),
        serving_detections=n_serving,
        candidate_detections=n_candidate,
        matched_serving=overall,
        matched_candidate=_share(matched, n_candidate),
        count_delta=(n_candidate - n_serving) / max(n_serving, 1),
        confidence_shift=tally.score_shift_sum / matched if matched else None,
        classes=classes,
        passed=overall_ok and all(c.passed for c in classes),
    )


def skipped(why: str) -> tuple[ShadowReport, str]:
    """The report of a shadow validation that did not run, and its reason line."""
    report = ShadowReport(
        source="skipped", frames=0, serving_detections=0, candidate_detections=0, matched_serving=None,
        matched_candidate=None, count_delta=None, confidence_shift=None, passed=True,
    )  # fmt: skip
    return report, f"shadow skipped: {why}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def summary(report: ShadowReport, config: ShadowConfig, serving_label: str) -> str:
    """One line with the figures: what failed first, then the overall shares."""
    failing = [c for c in report.classes if not c.passed]
    head = "passed" if report.passed else "failed"
    if failing:
        head += " on " + ", ".join(
            f"{c.class_name} (matched {_pct(c.matched_serving)} of {c.serving})" for c in failing
        )
    shift = "n/a" if report.confidence_shift is None else f"{report.confidence_shift:+.3f}"
    delta = "n/a" if report.count_delta is None else f"{report.count_delta:+.0%}"
    return (
        f"shadow {head}: {report.frames} {report.source} frames vs {serving_label}: "
        f"matched {_pct(report.matched_serving)} of {report.serving_detections} serving detections "
        f"(needs {config.min_matched:.0%}), {_pct(report.matched_candidate)} of {report.candidate_detections} "
        f"candidate; count {delta}, confidence {shift}"
    )
