"""Each metric of a canary, measured once on two arms of telemetry windows: figures, test, effect, histograms.

The canary verdict (``verdict.analyse``) and the A/B comparison (``ab.compare_arms``) judge the same
``Measurement``: ``shift`` says whether the treatment lies above (+1) or below (-1) the control beyond the
metric's band, ``evidence`` how strongly the data say so (2: p < alpha, or PSI >= the fail threshold; 1: the
marginal level; 0: no detectable difference).

- latency_p99, detections_per_image, class_rate:<name>: two-sided Mann-Whitney U over per-window values
  (windows are the samples; a device contributes several, which the band, not the test, absorbs).
- confidence: Jeffreys divergence (the symmetric PSI) of the pooled confidence histograms.
- error_rate, nan_rate: pooled counts, Fisher's exact test on the 2x2 table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS, LATENCY_BUCKETS, bucket_midpoints
from registry.rollout_service.analysis.spec import (
    CLASS_RATE,
    CONFIDENCE,
    DETECTIONS_PER_IMAGE,
    ERROR_RATE,
    LATENCY_P99,
    NAN_RATE,
    AnalysisSpec,
)

# Added to every bucket of both confidence histograms before normalising: an empty bucket on one side would make
# the relative entropy infinite. Half a count (Jeffreys' prior) is negligible against the >= 20 detections judged.
PSEUDO_COUNT = 0.5
DISPLAY_BINS = 10  # bars of the dashboard's per-window histograms


@dataclass(frozen=True)
class Window:
    """One report window of one device (contract section A); the histograms are () for the old form."""

    device_id: str
    inferences: int
    errors: int
    nonfinite: int
    frames: int
    latency_p99_ms: float
    detections: int  # total detections in the window
    class_counts: Mapping[int, int]
    confidence: tuple[int, ...] = ()
    latency_hist: tuple[int, ...] = ()
    detections_hist: tuple[int, ...] = ()


@dataclass(frozen=True)
class Measurement:
    name: str
    family: str
    direction: str
    treatment: float | None
    control: float | None
    effect: float | None
    band: float | None
    p_value: float | None
    shift: int  # +1 / -1: the treatment is above / below the control beyond the band; 0: inside it
    evidence: int  # for that shift: 2 strong (fail level), 1 marginal level, 0 none
    figures: str  # one line, for the reasons
    judged: bool = True  # False: too little data to score (the figures may still be shown)
    treatment_hist: list[float] | None = None
    control_hist: list[float] | None = None


@dataclass(frozen=True)
class Arm:
    """One arm's windows as arrays, built once."""

    windows: int
    p99_ms: np.ndarray  # windows that answered at least one frame
    latency_hist: np.ndarray  # pooled over the new-form windows
    inferences: np.ndarray
    errors: np.ndarray
    nonfinite: np.ndarray
    frames: np.ndarray  # new-form windows with frames > 0: the per-frame rates
    detections: np.ndarray
    class_counts: np.ndarray  # (len(frames), number of classes)
    confidence: np.ndarray  # pooled over the new-form windows
    paired: bool = False  # p99s on each device's own scale (``windows.on_own_scale``)

    @classmethod
    def of(cls, windows: Sequence[Window], n_classes: int, paired: bool = False) -> Arm:
        def column(attribute: str, rows: Sequence[Window], dtype: type = np.int64) -> np.ndarray:
            return np.fromiter((getattr(w, attribute) for w in rows), dtype, len(rows))

        inferences, errors = column("inferences", windows), column("errors", windows)
        rated = [w for w in windows if w.frames > 0 and len(w.confidence) == CONFIDENCE_BUCKETS]
        counts = np.zeros((len(rated), n_classes))
        for row, window in enumerate(rated):
            for index, count in window.class_counts.items():
                if 0 <= int(index) < n_classes:
                    counts[row, int(index)] = count
        latency = [w.latency_hist for w in rated if len(w.latency_hist) == LATENCY_BUCKETS]
        return cls(
            windows=len(windows),
            p99_ms=column("latency_p99_ms", windows, np.float64)[inferences > errors],
            latency_hist=np.array(latency, np.float64).reshape(-1, LATENCY_BUCKETS).sum(axis=0),
            inferences=inferences,
            errors=errors,
            nonfinite=column("nonfinite", windows),
            frames=column("frames", rated).astype(np.float64),
            detections=column("detections", rated).astype(np.float64),
            class_counts=counts,
            confidence=np.array([w.confidence for w in rated], np.float64).reshape(-1, CONFIDENCE_BUCKETS).sum(0),
            paired=paired,
        )


def measure_all(treatment: Arm, control: Arm, spec: AnalysisSpec, class_names: Sequence[str]) -> list[Measurement]:
    """Every metric, in the order the dashboard lists them."""
    alpha = 1 - spec.confidence
    classes = [_class_rate(treatment, control, k, name, spec, alpha) for k, name in enumerate(class_names)]
    return [
        _latency(treatment, control, spec, alpha),
        _error_rate(treatment, control, spec, alpha),
        _nan_rate(treatment, control, alpha),
        _rate(
            DETECTIONS_PER_IMAGE,
            DETECTIONS_PER_IMAGE,
            (treatment.detections, treatment.frames),
            (control.detections, control.frames),
            spec.bands.detections_per_image,
            alpha,
        ),
        *classes,
        _confidence(treatment, control, spec),
    ]


def psi(treatment_counts: np.ndarray, control_counts: np.ndarray) -> float:
    """Jeffreys divergence, sum (p - q) ln(p / q), of two histograms after adding ``PSEUDO_COUNT`` to each bucket."""
    p = np.asarray(treatment_counts, np.float64) + PSEUDO_COUNT
    q = np.asarray(control_counts, np.float64) + PSEUDO_COUNT
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(special.rel_entr(p, q) + special.rel_entr(q, p)))


def psi_by_chance(treatment_counts: np.ndarray, control_counts: np.ndarray) -> float:
    """The PSI two samples of these sizes from one distribution show on average: (buckets used - 1) x (1/n + 1/m),
    the mean of the chi-square that n m / (n + m) x PSI follows under no difference."""
    used = int(np.count_nonzero(np.asarray(treatment_counts) + np.asarray(control_counts)))
    n, m = float(np.sum(treatment_counts)), float(np.sum(control_counts))
    return max(used - 1, 0) * (1 / n + 1 / m) if n and m else float("inf")


def fisher_p(t_events: int, t_total: int, c_events: int, c_total: int, alternative: str) -> float:
    """Fisher's exact p of the treatment's event rate being ``alternative`` ("greater"/"less") than the control's."""
    table = [[t_events, t_total - t_events], [c_events, c_total - c_events]]
    return float(stats.fisher_exact(table, alternative=alternative).pvalue)


def mann_whitney_p(treatment: np.ndarray, control: np.ndarray) -> float | None:
    """Two-sided Mann-Whitney U p-value; None below two values per arm, 1 when every value is the same."""
    if len(treatment) < 2 or len(control) < 2:
        return None
    if np.ptp(np.concatenate([treatment, control])) == 0:
        return 1.0  # no spread at all: nothing to rank (scipy would divide by a zero variance)
    return float(stats.mannwhitneyu(treatment, control, alternative="two-sided").pvalue)


def _evidence(p: float | None, alpha: float) -> int:
    if p is None:
        return 0
    return 2 if p < alpha else 1 if p < min(5 * alpha, 0.2) else 0


def _effect(t: float | None, c: float | None) -> float | None:
    return None if t is None or c is None or c == 0 else (t - c) / abs(c)


def _shift(t: float | None, c: float | None, band: float) -> int:
    if t is None or c is None:
        return 0
    if c == 0:
        return int(np.sign(t))  # from nothing to something is beyond any band
    return _outside((t - c) / abs(c), band)


def _outside(change: float, band: float) -> int:
    return 1 if change > band else -1 if change < -band else 0


def _display(t_values: np.ndarray, c_values: np.ndarray) -> tuple[list[float] | None, list[float] | None]:
    """``DISPLAY_BINS`` bars of each arm's per-window values over their common range, each summing to 1."""
    if len(t_values) == 0 or len(c_values) == 0:
        return None, None
    low = float(min(t_values.min(), c_values.min()))
    high = float(max(t_values.max(), c_values.max()))
    bins = (low, high if high > low else low + 1)
    return (
        _normalised(np.histogram(t_values, DISPLAY_BINS, bins)[0]),
        _normalised(np.histogram(c_values, DISPLAY_BINS, bins)[0]),
    )


def _normalised(counts: np.ndarray) -> list[float]:
    total = float(counts.sum())
    return [round(float(c) / total, 4) if total else 0.0 for c in counts]


def _percent(effect: float | None) -> str:
    return "n/a" if effect is None else f"{effect:+.0%}"


def _p_text(p: float | None) -> str:
    return "p n/a" if p is None else f"p={p:.2g}"


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def _latency(t: Arm, c: Arm, spec: AnalysisSpec, alpha: float) -> Measurement:
    band = spec.bands.latency_p99
    tm, cm = _median(t.p99_ms), _median(c.p99_ms)
    p = mann_whitney_p(t.p99_ms, c.p99_ms)
    if t.latency_hist.sum() and c.latency_hist.sum():
        hists: tuple[list[float] | None, list[float] | None] = (
            _normalised(t.latency_hist),
            _normalised(c.latency_hist),
        )
    else:
        hists = _display(t.p99_ms, c.p99_ms)
    scale = "on each device's own scale" if t.paired and c.paired else "unpaired (raw p99s)"
    figures = (
        f"{_percent(_effect(tm, cm))} ({_num(tm, '.1f')} vs {_num(cm, '.1f')} ms median p99 {scale}, {_p_text(p)}, "
        f"band +{band:.0%})"
    )
    return Measurement(
        name=LATENCY_P99,
        family=LATENCY_P99,
        direction="increase",
        treatment=tm,
        control=cm,
        effect=_effect(tm, cm),
        band=band,
        p_value=p,
        shift=_shift(tm, cm, band),
        evidence=_evidence(p, alpha),
        figures=figures,
        judged=p is not None,
        treatment_hist=hists[0],
        control_hist=hists[1],
    )


def _num(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def _rate(
    name: str,
    family: str,
    t: tuple[np.ndarray, np.ndarray],
    c: tuple[np.ndarray, np.ndarray],
    band: float,
    alpha: float,
    judged: bool = True,
    why_not: str = "",
) -> Measurement:
    """A per-frame rate: ``t``/``c`` are (counts, frames) per window; the figures are the pooled rates."""
    (t_counts, t_frames), (c_counts, c_frames) = t, c
    tr = float(t_counts.sum() / t_frames.sum()) if len(t_frames) else None
    cr = float(c_counts.sum() / c_frames.sum()) if len(c_frames) else None
    t_values, c_values = t_counts / t_frames, c_counts / c_frames
    p = mann_whitney_p(t_values, c_values)
    figures = (
        f"{_percent(_effect(tr, cr))} ({_num(tr, '.3f')} vs {_num(cr, '.3f')} per image, {_p_text(p)}, "
        f"band +/-{band:.0%}){why_not}"
    )
    t_hist, c_hist = _display(t_values, c_values)
    return Measurement(
        name=name,
        family=family,
        direction="both",
        treatment=tr,
        control=cr,
        effect=_effect(tr, cr),
        band=band,
        p_value=p,
        shift=_shift(tr, cr, band),
        evidence=_evidence(p, alpha),
        figures=figures,
        judged=judged and p is not None,
        treatment_hist=t_hist,
        control_hist=c_hist,
    )


def _class_rate(t: Arm, c: Arm, index: int, name: str, spec: AnalysisSpec, alpha: float) -> Measurement:
    t_seen, c_seen = int(t.class_counts[:, index].sum()), int(c.class_counts[:, index].sum())
    judged = max(t_seen, c_seen) >= spec.min_class_detections
    why_not = "" if judged else f"; too few detections to judge ({t_seen} and {c_seen} < {spec.min_class_detections})"
    return _rate(
        f"{CLASS_RATE}:{name}",
        CLASS_RATE,
        (t.class_counts[:, index], t.frames),
        (c.class_counts[:, index], c.frames),
        spec.bands.class_rate,
        alpha,
        judged=judged,
        why_not=why_not,
    )


def _confidence(t: Arm, c: Arm, spec: AnalysisSpec) -> Measurement:
    t_seen, c_seen = int(t.confidence.sum()), int(c.confidence.sum())
    if not t_seen or not c_seen:
        figures = f"no confidence histograms ({t_seen} and {c_seen} detections)"
        return Measurement(CONFIDENCE, CONFIDENCE, "decrease", None, None, None, None, None, 0, 0, figures, False)
    middles = bucket_midpoints(CONFIDENCE)
    tm, cm = float(t.confidence @ middles / t_seen), float(c.confidence @ middles / c_seen)
    divergence = psi(t.confidence, c.confidence)
    evidence = 2 if divergence >= spec.confidence_psi_fail else 1 if divergence >= spec.confidence_psi_marginal else 0
    shift = int(np.sign(tm - cm)) if evidence else 0
    chance = psi_by_chance(t.confidence, c.confidence)
    judged = min(t_seen, c_seen) >= spec.min_class_detections and chance <= spec.confidence_psi_marginal / 2
    figures = (
        f"PSI {divergence:.3f}, mean {tm:.3f} vs {cm:.3f} ({_percent(_effect(tm, cm))}; "
        f"marginal/fail at PSI {spec.confidence_psi_marginal:g}/{spec.confidence_psi_fail:g} when lower)"
    )
    if not judged:
        figures += f"; too few detections to judge ({t_seen} and {c_seen}: equal models would show PSI {chance:.3f})"
    return Measurement(
        name=CONFIDENCE,
        family=CONFIDENCE,
        direction="decrease",
        treatment=tm,
        control=cm,
        effect=_effect(tm, cm),
        band=None,
        p_value=None,
        shift=shift,
        evidence=evidence,
        figures=figures,
        judged=judged,
        treatment_hist=_normalised(t.confidence),
        control_hist=_normalised(c.confidence),
    )


def _error_rate(t: Arm, c: Arm, spec: AnalysisSpec, alpha: float) -> Measurement:
    allowed = spec.max_error_rate_increase
    return _pooled(ERROR_RATE, (t.errors, t.inferences), (c.errors, c.inferences), allowed, alpha)


def _nan_rate(t: Arm, c: Arm, alpha: float) -> Measurement:
    return _pooled(NAN_RATE, (t.nonfinite, t.inferences), (c.nonfinite, c.inferences), None, alpha)


def _pooled(
    name: str,
    t: tuple[np.ndarray, np.ndarray],
    c: tuple[np.ndarray, np.ndarray],
    allowed: float | None,
    alpha: float,
) -> Measurement:
    """A pooled rate of events per inference. ``allowed``: the absolute increase that passes (error_rate); None:
    any event where the other arm has none is a shift (nan_rate: a non-finite output is never normal)."""
    (t_events, t_totals), (c_events, c_totals) = t, c
    te, tn, ce, cn = int(t_events.sum()), int(t_totals.sum()), int(c_events.sum()), int(c_totals.sum())
    if not tn or not cn:
        figures = f"no inferences ({tn} and {cn})"
        return Measurement(name, name, "increase", None, None, None, allowed, None, 0, 0, figures, False)
    tr, cr = te / tn, ce / cn
    shift = int(np.sign(tr - cr)) if allowed is None else _outside(tr - cr, allowed)
    p = fisher_p(te, tn, ce, cn, "less" if shift < 0 else "greater")
    evidence = _evidence(p, alpha)
    if allowed is None and shift:
        evidence = 2 if (ce if shift > 0 else te) == 0 or p < alpha else 0
    limit = "any the control lacks fails" if allowed is None else f"allowed +{allowed:.2%}"
    figures = f"{tr:.3%} vs {cr:.3%} ({te} of {tn} vs {ce} of {cn}, {_p_text(p)}, {limit})"
    t_values = t_events[t_totals > 0] / t_totals[t_totals > 0]
    c_values = c_events[c_totals > 0] / c_totals[c_totals > 0]
    t_hist, c_hist = _display(t_values, c_values)
    return Measurement(
        name=name,
        family=name,
        direction="increase",
        treatment=tr,
        control=cr,
        effect=_effect(tr, cr),
        band=allowed,
        p_value=p,
        shift=shift,
        evidence=evidence,
        figures=figures,
        treatment_hist=t_hist,
        control_hist=c_hist,
    )
