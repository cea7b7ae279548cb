"""Validating a staged version on this device before any swap, in a child process.

The child (``python -m edge_agent.validation``) loads each candidate variant in turn (any format:
``exporters.runners``), runs the shared gate code (``exporters.local_gate.gate_variant``: raw and detection
parity on ``golden.npz``, latency against the manifest's budget) and checks memory headroom. It runs at a lower
CPU priority (``edge_agent.child``) so that the model serving requests keeps the processor, and a model that
crashes the interpreter takes only the child with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

from pydantic import BaseModel

from edge_agent.child import log_tail, run_child
from edge_agent.errors import ValidationFailed
from exporters.files import atomic_write

log = logging.getLogger(__name__)

RESULT_FILE = "validation.json"


class ValidationResult(BaseModel):
    """What validation found for one variant."""

    variant: str
    device: str
    passed: bool
    failures: list[str]
    detail: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    budget_ms: float | None = None
    matched_fraction: float | None = None
    memory_free_fraction: float | None = None


class ValidationResults(BaseModel):
    """What the child writes: one result per variant, in the order asked."""

    results: list[ValidationResult]


def validate(
    bundle_dir: Path,
    variants: list[str],
    *,
    headroom: float,
    nice: int,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> list[ValidationResult]:
    """Validate each of ``variants`` of the staged bundle in one child process; every result, passed or not.

    ``timeout_s`` is per variant. ``ValidationFailed`` when the child crashes or overruns; ``stop`` set while the
    child runs kills it and raises the retryable ``ValidationInterrupted``: the saved state still says
    validating, so the next start validates again.
    """
    out = bundle_dir / RESULT_FILE
    out.unlink(missing_ok=True)
    args = [str(bundle_dir), *variants, "--headroom", str(headroom), "--nice", str(nice), "--out", str(out)]
    what = f"validation of {', '.join(variants)}"
    log.info("validating %s in %s (nice %d)", ", ".join(variants), bundle_dir, nice)
    child_log = bundle_dir / "validation.log"
    code = run_child("edge_agent.validation", args, log_path=child_log, timeout_s=timeout_s * len(variants),
                     stop=stop, on_timeout=ValidationFailed, what=what)  # fmt: skip
    if not out.is_file():
        raise ValidationFailed(f"{what} crashed (exit {code}): {log_tail(child_log)}")
    results = ValidationResults.model_validate_json(out.read_bytes()).results
    for result in results:
        log.info("validated %s: %s", result.variant, result.detail)
    return results


def _memory_free_fraction(device: str) -> float | None:
    import torch

    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return float(free) / float(total)
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) / int(fields["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError):
        return None  # not Linux: not measured


def _run_child(bundle_dir: Path, variant_name: str, headroom: float) -> ValidationResult:
    import torch

    from exporters.bundle import read_manifest, safe_join
    from exporters.errors import ExportError, one_line
    from exporters.fingerprint import collect
    from exporters.formats import all_variants
    from exporters.golden import Golden
    from exporters.local_gate import gate_variant

    manifest = read_manifest(bundle_dir)
    variant = all_variants(bundle_dir, manifest)[variant_name]
    device = variant.device
    try:
        golden = Golden.load(safe_join(bundle_dir, manifest.golden.path))
        gates = gate_variant(
            bundle_dir,
            variant,
            golden,
            thresholds=manifest.thresholds,
            fingerprint=collect(),
            latency_budget_ms=manifest.latency_budget_ms,
            sweep_memory=False,
        )
    except (ExportError, RuntimeError, torch.jit.Error) as exc:
        return ValidationResult(
            variant=variant_name, device=device, passed=False, failures=["load"], detail=one_line(exc)
        )
    failures = [name for name in gates.failures() if name != "memory"]
    stats = gates.latency.stats[0]
    det = gates.detection_parity
    matched = min(det.matched_fraction_reference, det.matched_fraction_candidate)
    budget = manifest.latency_budget_ms
    details = [
        f"detection parity {matched:.3f} (needs {manifest.thresholds.det_match_min})",
        f"p99 {stats.p99_ms:.2f} ms" + (f" (budget {budget} ms)" if budget is not None else " (no budget)"),
    ]
    free = _memory_free_fraction(device)
    if free is not None:
        details.append(f"{free:.0%} of {'GPU' if device == 'cuda' else 'RAM'} free with the model loaded")
        if free < headroom:
            failures.append("memory headroom")
    return ValidationResult(
        variant=variant_name,
        device=device,
        passed=not failures,
        failures=failures,
        detail=("failed " + ", ".join(failures) + ": " if failures else "") + "; ".join(details),
        p50_ms=stats.p50_ms,
        p99_ms=stats.p99_ms,
        budget_ms=manifest.latency_budget_ms,
        matched_fraction=matched,
        memory_free_fraction=free,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.validation", description=__doc__)
    parser.add_argument("bundle_dir", type=Path)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--headroom", type=float, default=0.2)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = [_run_child(args.bundle_dir, variant, args.headroom) for variant in args.variants]
    atomic_write(args.out, json.dumps(ValidationResults(results=results).model_dump(mode="json"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
