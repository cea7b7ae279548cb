"""The demo's tables: per-metric verdicts of the fleet analysis, A/B arms, devices, rollouts, regressions."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from yolo_ota.demo.fleetview import Json
from yolo_ota.demo.traffic import Traffic

VERDICT_STYLE = {"pass": "green", "fail": "bold red", "marginal": "yellow", "inconclusive": "dim"}


def label(versions: dict[str, str], number: str | None) -> str:
    """``2 (v2)``: an MLflow version number with the demo's name for it."""
    names = {v: k for k, v in versions.items()}
    return f"{number} ({names[number]})" if number in names else str(number or "-")


def fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def analysis_table(verdict: Json, title: str) -> Table:
    """One stored verdict (``AnalysisPublic``): a row per metric with both arms' figures and its own verdict."""
    ab = verdict["kind"] == "ab"
    table = Table(title=title, title_justify="left")
    columns = ["metric", "verdict", "treatment", "control", "effect", "p", *(["better"] if ab else []), "figures"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("treatment", "control", "effect", "p") else "left")
    for m in verdict["metrics"]:
        style = VERDICT_STYLE.get(m["verdict"], "")
        shown = f"[{style}]{m['verdict']}[/{style}]" if style else m["verdict"]
        row = [
            m["name"] + (" *" if m["critical"] else ""), shown,
            fmt(m["treatment"], "{:.3g}"), fmt(m["control"], "{:.3g}"), fmt(m["effect"], "{:+.0%}"),
            fmt(m["p_value"], "{:.2g}"), *([m.get("better") or "-"] if ab else []), m["reason"],
        ]  # fmt: skip
        table.add_row(*row)
    table.caption = (
        f"verdict {verdict['verdict']}, score {fmt(verdict['score'], '{:.0f}')}, action {verdict['action']}; "
        f"{verdict['treatment_windows']} treatment and {verdict['control_windows']} control windows; * critical"
    )
    return table


def arms_table(rollout: Json) -> Table:
    table = Table(title=f"A/B rollout {rollout['id']}: per-arm telemetry", title_justify="left")
    for column in ("arm", "version", "devices", "inferences", "errors", "error rate", "p50 ms", "p99 ms",
                   "detections/image", "mean confidence"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("arm", "version") else "right")
    for arm in rollout["arms"]:
        table.add_row(
            arm["arm"], arm["version"], str(arm["devices"]), str(arm["inferences"]), str(arm["errors"]),
            fmt(arm["error_rate"], "{:.2%}"), fmt(arm["latency_p50_ms"], "{:.1f}"),
            fmt(arm["latency_p99_ms"], "{:.1f}"), fmt(arm["detections_per_image"], "{:.2f}"),
            fmt(arm["mean_confidence"], "{:.2f}"),
        )  # fmt: skip
    return table


def devices_table(devices: dict[str, Json], traffic: Traffic, versions: dict[str, str]) -> Table:
    table = Table(title="Devices", title_justify="left")
    for column in ("device", "line", "version", "state", "requests answered", "failed", "answered by"):
        table.add_column(column)
    for device_id, device in sorted(devices.items()):
        by: dict[str, int] = dict(traffic.versions.get(device_id, {}))
        table.add_row(
            device_id, device["labels"].get("line", ""), label(versions, device["current_version"]),
            device["state"] or "", str(traffic.answered[device_id]), str(traffic.failed[device_id]),
            ", ".join(f"{label(versions, v)}: {n}" for v, n in sorted(by.items())),
        )  # fmt: skip
    return table


def rollouts_table(rollouts: list[Json], versions: dict[str, str]) -> Table:
    table = Table(title="Rollouts", title_justify="left")
    for column in ("id", "strategy", "version", "previous/control", "state", "by", "analysis", "reason"):
        table.add_column(column)
    for r in sorted(rollouts, key=lambda r: r["id"]):
        other = (r.get("ab") or {}).get("control_version") or r["previous_version"]
        latest = r.get("analysis") or {}
        verdict = latest.get("verdict", "-") + (f" ({latest['winner']} wins)" if latest.get("winner") else "")
        table.add_row(
            str(r["id"]), r["strategy"], label(versions, r["version"]), label(versions, other), r["state"],
            r["created_by"], verdict, r["reason"],
        )  # fmt: skip
    return table


def regressions_table(results: dict[str, Json]) -> Table:
    """v3 and v4: what caught each, with which figures, how fast, and how many devices ever served it."""
    table = Table(title="The two regressions", title_justify="left")
    for column in ("version", "what is wrong", "caught by", "figures", "first wave -> stop", "devices served it"):
        table.add_column(column)
    for key in ("v3", "v4"):
        r = results.get(key)
        if r is None:
            continue
        table.add_row(
            key, r["fault"], r["caught_by"], r["reason"], fmt(r.get("seconds_to_stop"), "{:.0f} s"),
            f"{len(r['served_by'])} of {r['fleet']}" + (f" ({', '.join(r['served_by'])})" if r["served_by"] else ""),
        )  # fmt: skip
    return table
