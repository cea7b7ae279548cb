"""The ``ota.*`` tags, metrics and params a registered bundle carries in MLflow (DESIGN.md section 5).

Pure functions of the manifest: no MLflow import, so the rollout service and tests can use them too.
"""

from __future__ import annotations

import hashlib

from exporters.bundle import Manifest
from exporters.formats import FormatIndex, FormatVariant, as_format_variant
from exporters.gate_report import VariantGates

TAG_PREFIX = "ota."
SCHEMA_TAG = "ota.schema"
FORMAT_TAG = "ota.format"
MANIFEST_DIGEST_TAG = "ota.manifest_sha256"
SIGNED_TAG = "ota.signed"
VARIANTS_TAG = "ota.variants"
GATES_TAG = "ota.gates"
FORCED_TAG = "ota.forced"
RELEASE_TAG = "ota.release"
MAX_TAG_VALUE_CHARS = 5000  # MLflow's limit for a model version tag value


def manifest_digest(manifest_bytes: bytes) -> str:
    """The sha256 of manifest.json's bytes: the identity of a bundle."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def _figure(value: float) -> str:
    return f"{value:.6g}"


def _variants(manifest: Manifest, index: FormatIndex | None) -> dict[str, FormatVariant]:
    found = {name: as_format_variant(v) for name, v in manifest.variants.items()}
    found.update(index.variants if index else {})
    return found


def _gates(manifest: Manifest, index: FormatIndex | None) -> dict[str, VariantGates]:
    return {**manifest.gates, **(index.gates if index else {})}


def compatibility_text(variant: FormatVariant) -> str:
    """A variant's compatibility record as one tag value: ``runtime=torch;torch=2.15.0;arch=x86_64``."""
    fields = variant.compatibility.model_dump(exclude_none=True)
    return ";".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in fields.items() if v != [])


def version_tags(
    manifest: Manifest, manifest_bytes: bytes, *, signed: bool, index: FormatIndex | None = None
) -> dict[str, str]:
    """Every ``ota.*`` tag of a model version holding this bundle (``index``: its formats.json)."""
    variants = _variants(manifest, index)
    tags = {
        SCHEMA_TAG: str(manifest.schema_version),
        RELEASE_TAG: "" if manifest.release is None else str(manifest.release),
        FORMAT_TAG: ",".join(sorted({v.format for v in variants.values()})),
        MANIFEST_DIGEST_TAG: manifest_digest(manifest_bytes),
        SIGNED_TAG: "true" if signed else "false",
        VARIANTS_TAG: ",".join(sorted(variants)),
        GATES_TAG: "pass" if manifest.gates_passed else "fail",
        "ota.imgsz": f"{manifest.imgsz[0]}x{manifest.imgsz[1]}",
        "ota.task": manifest.task,
    }
    for key, value in manifest.fingerprint.model_dump(mode="json").items():
        tags[f"ota.fp.{key}"] = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    for name, variant in variants.items():
        tags[f"ota.variant.{name}.format"] = variant.format
        tags[f"ota.variant.{name}.compat"] = compatibility_text(variant)
    overall: dict[str, bool] = {}
    for name, gates in _gates(manifest, index).items():
        per_gate = {
            "raw_parity": gates.raw_parity.passed,
            "detection_parity": gates.detection_parity.passed,
            "latency": gates.latency.passed,
        }
        if gates.memory is not None:
            per_gate["memory"] = gates.memory.passed
        for gate, passed in per_gate.items():
            tags[f"ota.gate.{name}.{gate}"] = "pass" if passed else "fail"
            overall[gate] = overall.get(gate, True) and passed
        stats = gates.latency.stats[0]
        tags[f"ota.gate.{name}.raw_parity.mse"] = _figure(gates.raw_parity.mse)
        tags[f"ota.gate.{name}.detection_parity.matched_fraction"] = _figure(
            min(gates.detection_parity.matched_fraction_reference, gates.detection_parity.matched_fraction_candidate)
        )
        tags[f"ota.gate.{name}.latency.p50_ms"] = _figure(stats.p50_ms)
        tags[f"ota.gate.{name}.latency.p99_ms"] = _figure(stats.p99_ms)
        tags[f"ota.gate.{name}"] = "pass" if gates.passed else "fail"
    for gate, passed in overall.items():  # ota.gate.<gate>: that gate over every variant
        tags[f"ota.gate.{gate}"] = "pass" if passed else "fail"
    return {key: value[:MAX_TAG_VALUE_CHARS] for key, value in tags.items()}


def run_metrics(manifest: Manifest, index: FormatIndex | None = None) -> dict[str, float]:
    """Gate figures as run metrics (MLflow metric keys allow letters, digits, ``_-./`` and spaces)."""
    metrics: dict[str, float] = {}
    for name, gates in _gates(manifest, index).items():
        stats = gates.latency.stats[0]
        prefix = f"gate.{name}"
        metrics.update(
            {
                f"{prefix}.raw_mse": gates.raw_parity.mse,
                f"{prefix}.raw_max_abs": gates.raw_parity.max_abs,
                f"{prefix}.raw_cosine": gates.raw_parity.cosine,
                f"{prefix}.det_matched_fraction_reference": gates.detection_parity.matched_fraction_reference,
                f"{prefix}.det_matched_fraction_candidate": gates.detection_parity.matched_fraction_candidate,
                f"{prefix}.det_reference_detections": float(gates.detection_parity.reference_detections),
                f"{prefix}.latency_p50_ms": stats.p50_ms,
                f"{prefix}.latency_p90_ms": stats.p90_ms,
                f"{prefix}.latency_p99_ms": stats.p99_ms,
                f"{prefix}.latency_mean_ms": stats.mean_ms,
                f"{prefix}.fps": stats.fps,
                f"{prefix}.passed": 1.0 if gates.passed else 0.0,
            }
        )
        if gates.memory is not None:
            for point in gates.memory.points:
                metrics[f"{prefix}.memory_peak_mib.batch_{point.batch}"] = point.peak_bytes / 2**20
    return metrics


def run_params(manifest: Manifest, index: FormatIndex | None = None) -> dict[str, str]:
    """The fingerprint and export settings as run params."""
    params = {f"fp.{k}": "" if v is None else str(v) for k, v in manifest.fingerprint.model_dump(mode="json").items()}
    params.update(
        {
            "bundle.name": manifest.name,
            "bundle.imgsz": f"{manifest.imgsz[0]}x{manifest.imgsz[1]}",
            "bundle.variants": ",".join(sorted(_variants(manifest, index))),
            "bundle.source": manifest.source.model,
            "bundle.latency_budget_ms": str(manifest.latency_budget_ms),
        }
    )
    return params


ROLLOUT_TAG = "ota.rollout"  # written by the rollout service: the rollout a promotion started, or why it refused
