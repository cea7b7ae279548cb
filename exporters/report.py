"""Human-readable tables of gate results and manifests (rich), shared by the CLI commands."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from exporters.bundle import Manifest
from exporters.formats import FormatVariant
from exporters.gate_report import VariantGates


def _verdict(passed: bool) -> str:
    return "[green]pass[/]" if passed else "[bold red]FAIL[/]"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


_PARITY_COLUMNS = ("variant", "raw vs", "raw MSE", "max abs", "cosine", "boxes ref/new", "matched ref/new", "result")
_LATENCY_COLUMNS = ("variant", "timer", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "FPS", "budget ms")
_LEFT = ("variant", "result", "timer")


def _parity_row(g: VariantGates, verdict: str) -> list[str]:
    raw, det = g.raw_parity, g.detection_parity
    failures = g.failures()
    return [
        g.variant,
        f"eager {raw.reference}",
        f"{raw.mse:.2e}" + ("" if raw.judged else " (info)"),
        f"{raw.max_abs:.2e}",
        f"{raw.cosine:.6f}",
        f"{det.reference_detections}/{det.candidate_detections}",
        f"{det.matched_fraction_reference:.3f}/{det.matched_fraction_candidate:.3f}",
        verdict + ("" if g.passed else f" ({', '.join(failures)})"),
    ]


def _latency_rows(g: VariantGates) -> list[list[str]]:
    budget = f"{g.latency.budget_ms:g}" if g.latency.budget_ms is not None else "-"
    return [
        [
            g.variant,
            stats.timer,
            str(stats.cpu_threads),
            str(stats.batch),
            f"{stats.p50_ms:.2f}",
            f"{stats.p90_ms:.2f}",
            f"{stats.p99_ms:.2f}",
            f"{stats.mean_ms:.2f}",
            f"{stats.fps:.1f}",
            budget,
        ]
        for stats in g.latency.stats
    ]


def gate_tables(results: Iterable[VariantGates], title: str = "Gates") -> list[Table]:
    """Two tables, one row per variant: parity with the verdict, then latency."""
    parity = Table(title=f"{title}: parity", title_justify="left")
    latency = Table(title=f"{title}: latency", title_justify="left")
    for table, columns in ((parity, _PARITY_COLUMNS), (latency, _LATENCY_COLUMNS)):
        for column in columns:
            table.add_column(column, justify="left" if column in _LEFT else "right")
    for g in results:
        parity.add_row(*_parity_row(g, _verdict(g.passed)))
        for row in _latency_rows(g):
            latency.add_row(*row)
    return [parity, latency]


def _markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    rule = "| " + " | ".join(":---" if c in _LEFT else "---:" for c in columns) + " |"
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def gate_markdown(results: Iterable[VariantGates], title: str = "Gates") -> str:
    """The two gate tables of ``gate_tables`` as Markdown (what MLflow shows in a version's description)."""
    results = list(results)
    parity = [_parity_row(g, "pass" if g.passed else "**FAIL**") for g in results]
    latency = [row for g in results for row in _latency_rows(g)]
    return (
        f"#### {title}: parity\n\n{_markdown_table(_PARITY_COLUMNS, parity)}\n\n"
        f"#### {title}: latency\n\n{_markdown_table(_LATENCY_COLUMNS, latency)}\n"
    )


def memory_table(results: Iterable[VariantGates]) -> Table | None:
    """Peak memory and throughput by batch size for the CUDA variants; None when there is no sweep."""
    rows = [(g.variant, p, g.memory.stopped_because) for g in results if g.memory for p in g.memory.points]
    if not rows:
        return None
    table = Table(title="Memory sweep", title_justify="left")
    for column in ("variant", "batch", "peak MiB", "FPS", "stopped because"):
        table.add_column(column, justify="left" if column in ("variant", "stopped because") else "right")
    for variant, point, stopped in rows:
        table.add_row(variant, str(point.batch), _mib(point.peak_bytes), f"{point.fps:.1f}", stopped)
    return table


def manifest_table(manifest: Manifest, variants: dict[str, FormatVariant] | None = None) -> Table:
    """The manifest's identity, source, fingerprint and variants (``variants``: every format's, from
    ``exporters.formats.all_variants``; default the manifest's TorchScript ones) as key/value rows."""
    table = Table(title=f"Bundle {manifest.name}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    fp = manifest.fingerprint
    rows = [
        ("schema", str(manifest.schema_version)),
        ("product line", manifest.name),
        ("release", str(manifest.release) if manifest.release is not None else "- (schema 1: not numbered)"),
        ("task", manifest.task),
        (
            "input",
            f"{manifest.input.name} {manifest.input.shape} {manifest.input.layout}, {manifest.input.description}",
        ),
        ("output", f"{manifest.output.name} {manifest.output.shape} ({manifest.output.layout})"),
        ("stride", str(manifest.stride)),
        ("classes", ", ".join(f"{k}:{v}" for k, v in sorted(manifest.names.items()))),
        ("created", manifest.created_at),
        ("source", f"{manifest.source.model} ({manifest.source.kind}), ultralytics {manifest.source.ultralytics}"),
        ("weights sha256", manifest.source.weights_sha256 or "-"),
        ("exported on", fp.summary()),
        ("fingerprint", f"python {fp.python}, {fp.os} {fp.arch}, cuDNN {fp.cudnn or '-'}, driver {fp.driver or '-'}"),
        (
            "numerics",
            f"tf32 matmul {fp.tf32_matmul}, tf32 cudnn {fp.tf32_cudnn}, "
            f"cudnn.benchmark {fp.cudnn_benchmark}, deterministic {fp.deterministic}",
        ),
        (
            "variants",
            ", ".join(f"{v.name} ({v.format}, batch {v.batch})" for v in (variants or {}).values())
            or ", ".join(f"{v.name} (batch {v.batch})" for v in manifest.variants.values()),
        ),
        ("skipped", "; ".join(f"{k}: {v}" for k, v in manifest.skipped_variants.items()) or "-"),
        (
            "golden",
            f"{', '.join(manifest.golden.images)} + {manifest.golden.noise_inputs} noise (seed {manifest.golden.seed})",
        ),
        ("latency budget", f"{manifest.latency_budget_ms:g} ms" if manifest.latency_budget_ms else "-"),
        ("gates", _verdict(manifest.gates_passed)),
    ]
    for field, value in rows:
        table.add_row(field, value)
    return table


def files_table(manifest: Manifest) -> Table:
    """Every listed file with its size and digest."""
    table = Table(title="Files", title_justify="left")
    table.add_column("path")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for path, entry in sorted(manifest.files.items()):
        table.add_row(path, f"{entry.bytes:,}", entry.sha256)
    return table
