"""Tables of ``yolo-ota rollout``: a rollout's summary line, its waves and its arms (from the service's JSON)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def print_detail(console: Console, detail: dict[str, Any]) -> None:
    """A rollout's summary, wave table, arm table and skipped devices."""
    console.print(_summary(detail), markup=False, soft_wrap=True)
    console.print(_wave_table(detail))
    console.print(_arm_table(detail))
    skipped = detail["skipped_incompatible"]
    console.print(f"targeted {detail['targeted']} device(s); skipped {skipped} as incompatible", markup=False)
    for reason, count in sorted(detail["incompatible_reasons"].items(), key=lambda item: -item[1]):
        console.print(f"  {count} skipped: {reason}", markup=False, soft_wrap=True)


def _summary(detail: dict[str, Any]) -> str:
    selector = detail["selector"]
    chosen = [f"{k}={v}" for k, v in selector.get("labels", {}).items()]
    chosen += [f"fp.{k}={v}" for k, v in selector.get("fingerprint", {}).items()]
    ab = detail.get("ab")
    arms = f", control version {ab['control_version']} on {1 - ab['split']:.0%}" if ab else ""
    line = (
        f"rollout {detail['id']}: {detail['model']} version {detail['version']} ({detail['strategy']}{arms}), "
        f"{detail['state']}, wave {wave_position(detail)}; previous version {detail['previous_version'] or '-'}; "
        f"devices: {', '.join(chosen) or 'all'}; created by {detail['created_by']} at {when(detail['created_at'])}"
    )
    return line + (f"; reason: {detail['reason']}" if detail["reason"] else "")


def _wave_table(detail: dict[str, Any]) -> Table:
    table = Table(title="Waves", title_justify="left")
    for column in ("wave", "percent", "bake", "state", "devices", "succeeded", "failed", "pending", "thresholds"):
        table.add_column(column, justify="left" if column in ("state", "thresholds") else "right")
    for w in detail["wave_progress"]:
        thresholds = f"halt above {w['max_failure_rate']:.0%} failed, advance at {w['min_success_rate']:.0%} ok"
        counts = [w[key] for key in ("devices", "succeeded", "failed", "pending")]
        add_row(table, w["index"] + 1, f"{w['percent']:g}%", _duration(w["bake_s"]), w["state"], *counts, thresholds)
    return table


def _arm_table(detail: dict[str, Any]) -> Table:
    table = Table(title="Arms (latency in ms)", title_justify="left")
    columns = ("arm", "version", "devices", "succeeded", "failed", "inferences", "errors", "error rate")
    for column in (*columns, "p50", "p99", "det/img", "conf"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for a in detail["arms"]:
        error_rate = a["error_rate"]
        cells = [a[key] for key in ("arm", "version", "devices", "succeeded", "failed", "inferences", "errors")]
        add_row(
            table,
            *cells,
            None if error_rate is None else f"{error_rate:.2%}",
            _number(a["latency_p50_ms"], ".1f"),
            _number(a["latency_p99_ms"], ".1f"),
            _number(a["detections_per_image"], ".2f"),
            _number(a["mean_confidence"], ".3f"),
        )
    return table


def add_row(table: Table, *cells: object) -> None:
    # As plain text: model names, labels and reasons may hold rich markup brackets.
    table.add_row(*(Text("-" if cell is None else str(cell)) for cell in cells))


def wave_position(rollout: dict[str, Any]) -> str:
    return f"{rollout['current_wave'] + 1}/{len(rollout['waves'])}"


def _number(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours and minutes else f"{hours}h" if hours else f"{minutes}m"


def when(value: str) -> str:
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value
