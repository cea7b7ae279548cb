"""The demo's three versions, built the way a workstation would build them: exported from a YOLO config, gated,
signed. v3 carries a fault built in with ``exporters.drills``: its outputs turn to NaN after a number of calls in
a process, which the export gates (a few parity calls, then timing) do not see and a device's probation does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporters import drills
from exporters.export import ExportRequest, ExportResult, export_bundle
from exporters.local_gate import gate_bundle
from yolo_ota.errors import DemoError

VARIANTS = ("cpu-fp32",)  # the demo's fleet runs on the CPU


@dataclass(frozen=True)
class Built:
    label: str  # v1, v2, v3: the demo's names; MLflow numbers versions itself
    source: str  # the YOLO config or weights it was exported from
    note: str
    bundle_dir: Path
    result: ExportResult


def export_version(
    label: str,
    source: str,
    *,
    out_dir: Path,
    imgsz: int,
    model: str,
    signing_key: Path | None,
    note: str,
    say: Callable[[str], None],
) -> Built:
    """Export ``source`` to a cpu-fp32 bundle with its gates; ``DemoError`` when a gate fails."""
    result = export_bundle(
        ExportRequest(
            model=source,
            out_dir=out_dir,
            imgsz=(imgsz, imgsz),
            variants=VARIANTS,
            name=f"{model}-{label}",
            signing_key=signing_key,
            force=True,
        ),
        progress=lambda message: say(f"{label}: {message}"),
    )
    if not result.passed:
        raise DemoError(f"{label} ({source}) failed its export gates: {result.manifest.gates}")
    return Built(label, source, note, out_dir, result)


def build_faulty_version(
    label: str,
    source: str,
    *,
    out_dir: Path,
    imgsz: int,
    model: str,
    signing_key: Path,
    nan_after_calls: int,
    say: Callable[[str], None],
) -> Built:
    """Export ``source``, build the NaN fault into its TorchScript file, gate the file as shipped, sign."""
    note = f"{source} with a fault built in: NaN outputs after {nan_after_calls} inferences in a process"
    built = export_version(
        label, source, out_dir=out_dir, imgsz=imgsz, model=model, signing_key=None, note=note, say=say
    )
    for variant in VARIANTS:
        drills.replace_variant(out_dir, drills.nan_after(drills.load_variant(out_dir, variant), nan_after_calls))
    say(f"{label}: fault built in; gating the bundle again as it will ship")
    _, gates = gate_bundle(out_dir, device="cpu")
    failed = [g.variant for g in gates if not g.passed]
    if failed:
        raise DemoError(
            f"{label}: the faulty build already fails its gates on {', '.join(failed)}; raise the call count"
        )
    drills.sign(out_dir, signing_key)
    return built
