"""Which of a bundle's variants this device tries, and which one it serves.

Before anything is downloaded past ``manifest.json`` and ``formats.json``, ``candidates`` splits the bundle's
variants into those this device can run (its device setting, its torch, its GPU architecture, its ONNX Runtime)
and those it cannot, with the reason; the files of the latter are never fetched. Validation then measures every
candidate, and ``choose`` serves the fastest one that passed. Each variant not chosen keeps its reason
(incompatible, failed its gates here, slower), for the agent's status and its report.

The fallbacks when a chosen variant fails at load or at run time go in order: AOTInductor -> TorchScript of the
same device and precision -> ``cpu-fp32`` (``fallback_chain``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from exporters.bundle import Manifest
from exporters.fingerprint import Fingerprint
from exporters.formats import FORMAT_PREFERENCE, FormatVariant, all_variants, split_variant, why_incompatible
from exporters.runners import onnxruntime_info

CPU_VARIANT = "cpu-fp32"
DeviceSetting = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True)
class Candidates:
    """The variants this device validates (likely fastest first), the fallback it keeps unvalidated, and those it
    does not fetch at all, with why."""

    runnable: list[FormatVariant]
    fallback: FormatVariant | None
    refused: dict[str, str]

    @property
    def wanted_paths(self) -> set[str]:
        """The variant files to download."""
        return {v.path for v in self.runnable} | ({self.fallback.path} if self.fallback else set())


def candidates(
    bundle_dir: Path, manifest: Manifest, fingerprint: Fingerprint, device: DeviceSetting, offered: set[str]
) -> Candidates:
    """Split the variants whose files are ``offered`` into those to validate here and those refused.

    Where a CUDA variant can run, only the CUDA variants are validated; ``cpu-fp32`` is kept as the fallback for a
    GPU that fails (as before formats: it is loaded only then), and the other CPU variants are not fetched.
    """
    version, providers = onnxruntime_info()
    runnable: list[FormatVariant] = []
    refused: dict[str, str] = {}
    for variant in all_variants(bundle_dir, manifest).values():
        if variant.path not in offered:
            continue
        if variant.device == "cuda" and device == "cpu":
            refused[variant.name] = "incompatible: CUDA is switched off by settings"
            continue
        why = why_incompatible(
            variant, manifest.fingerprint, fingerprint, onnxruntime_version=version, onnx_providers=providers
        )
        if why:
            refused[variant.name] = f"incompatible: {why}"
        else:
            runnable.append(variant)
    runnable.sort(key=lambda v: (v.dtype != "float16", FORMAT_PREFERENCE[v.format], v.name))
    fallback = None
    if any(v.device == "cuda" for v in runnable):
        for variant in [v for v in runnable if v.device == "cpu"]:
            runnable.remove(variant)
            if variant.name == CPU_VARIANT:
                fallback = variant
            else:
                refused[variant.name] = "not needed: CUDA variants run here (cpu-fp32 is the fallback)"
    return Candidates(runnable, fallback, refused)


class VariantResult(BaseModel):
    """One variant as validated here (saved with the installed version)."""

    variant: str
    passed: bool
    p50_ms: float | None = None
    p99_ms: float | None = None
    detail: str = ""


class VariantChoice(BaseModel):
    """The served variant and why each other one was not chosen."""

    chosen: str
    why: str
    not_chosen: dict[str, str]

    def summary(self) -> str:
        others = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.not_chosen.items()))
        return f"serving {self.chosen} ({self.why})" + (f"; not chosen: {others}" if others else "")


def choose(results: list[VariantResult], refused: dict[str, str]) -> VariantChoice | None:
    """The fastest variant that passed (by the p50 its validation measured here), or None when none passed."""
    passing = [r for r in results if r.passed and r.p50_ms is not None]
    if not passing:
        return None
    best = min(passing, key=lambda r: r.p50_ms or 0.0)
    not_chosen = dict(refused)
    for r in results:
        if r is best:
            continue
        if not r.passed:
            not_chosen[r.variant] = f"failed validation: {r.detail}"
        else:
            not_chosen[r.variant] = f"slower: p50 {r.p50_ms:.2f} ms against {best.p50_ms:.2f} ms"
    why = f"fastest that passed: p50 {best.p50_ms:.2f} ms" if len(passing) > 1 else "the only one that passed"
    return VariantChoice(chosen=best.variant, why=why, not_chosen=not_chosen)


def fallback_chain(variant: str, available: set[str]) -> list[str]:
    """What to load, in order, when ``variant`` fails: its TorchScript twin (for another format), then
    ``cpu-fp32``; only those the device has."""
    base, fmt = split_variant(variant)
    chain = [variant]
    if fmt != "torchscript":
        chain.append(base)
    chain.append(CPU_VARIANT)
    ordered = list(dict.fromkeys(chain))
    return [name for name in ordered if name in available]
