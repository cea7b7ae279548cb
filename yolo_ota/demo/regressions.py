"""The two defences, each against a version that passes every export gate yet is worse than the one it replaces:

- v3 misses a class: the first device's shadow validation (the candidate against the serving model, on that
  device's own frames) refuses it before the swap, and the rollout stops in its first wave;
- v4 is slower: every device check passes (it is inside the latency budget), so the first device serves it; the
  fleet analysis of that wave against the rest of the fleet fails it on latency_p99, and ``on_fail: rollback``
  sends the device back.

Either way, what the step claims is proven from the devices' own events and the states the watch saw, not
assumed from the wave sizes: at most one device (the first wave's) ever serves the regressed version.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from exporters.synthetic import CLASS_NAMES
from yolo_ota.demo.context import SETTLED, StoryContext
from yolo_ota.demo.detectors import DROPPED_CLASS, SLOWDOWN_MS
from yolo_ota.demo.fleetview import Json, wave_text
from yolo_ota.demo.stack import DEMO_ANALYSIS, DEMO_SHADOW
from yolo_ota.demo.tables import analysis_table

# 25 % then 100 %: with four devices, one device goes first and alone.
REGRESSION_WAVES: list[Json] = [
    {"percent": 25, "bake_s": 2, "max_failure_rate": 0.0, "min_success_rate": 1.0},
    {"percent": 100, "bake_s": 0, "max_failure_rate": 0.0, "min_success_rate": 1.0},
]
# Each regression's rollout carries its own shadow block (the promotion's canary has none) and analysis block, small
# enough to decide within seconds on the demo's traffic (4 frames a second per device).
SHADOW: Json = {"enabled": True, "iou": 0.5, **DEMO_SHADOW}
REGRESSION_ANALYSIS: Json = {"min_windows": 6, "min_window_frames": DEMO_ANALYSIS["min_window_frames"], "interval_s": 1,
                             "on_fail": "rollback"}  # fmt: skip
SERVING_STATES = ("swapping", "probation", "committed")


def _events(details: dict[str, Json], version: str) -> list[tuple[str, Json]]:
    return [(d, e) for d, x in details.items() for e in x["last_events"] if e["version"] == version]


def _served_by(ctx: StoryContext, details: dict[str, Json], version: str) -> list[str]:
    """Devices that ever served ``version``: by their own events, or as the watch saw them."""
    by_events = {d for d, e in _events(details, version) if e["state"] in SERVING_STATES}
    by_watch = {d for d, seen in ctx.watch.served.items() if version in seen}
    return sorted(by_events | by_watch)


def _failed_classes(event: Json) -> list[str]:
    """The classes a failed shadow event names: its ``shadow`` figures when served, else its reason line."""
    figures = event.get("shadow") or {}
    if figures.get("classes"):
        return [c["class_name"] for c in figures["classes"] if c["judged"] and not c["passed"]]
    return [name for name in CLASS_NAMES if name in event["reason"]]


def _back_on(version: str) -> Callable[[dict[str, Json], Json | None], bool]:
    def check(devices: dict[str, Json], rollout: Json | None) -> bool:
        stopped = rollout is not None and rollout["state"] in ("halted", "rolled_back")
        return stopped and all(d["current_version"] == version and d["state"] in SETTLED for d in devices.values())

    return check


def _start(ctx: StoryContext, label: str, reason: str) -> Json:
    body = {
        "model": ctx.model, "version": ctx.versions[label], "strategy": "canary", "waves": REGRESSION_WAVES,
        "shadow": SHADOW, "analysis": REGRESSION_ANALYSIS, "supersede": True, "reason": reason,
    }  # fmt: skip
    rollout = ctx.operator.post("/v1/rollouts", body)
    ctx.say(f"rollout {rollout['id']}: canary of {label}, waves 25 % / 100 %; shadow {SHADOW}; "
            f"analysis {REGRESSION_ANALYSIS}")  # fmt: skip
    return dict(rollout)


def _settle(ctx: StoryContext, label: str, rollout_id: int) -> tuple[Json, dict[str, Json]]:
    started = time.monotonic()
    _, rollout = ctx.watch.until(f"the {label} rollout to stop and the fleet to be back on v2",
                                 _back_on(ctx.versions["v2"]), rollout_id=rollout_id,
                                 timeout_s=ctx.step_timeout_s)  # fmt: skip
    ctx.results.setdefault("watched_s", {})[label] = round(time.monotonic() - started, 1)
    ctx.say(f"holding 3 s: a stopped rollout sends {label} nowhere else")
    time.sleep(3)
    rollout = ctx.operator.rollout(rollout_id)
    return rollout, {d: ctx.operator.device(d) for d in ctx.operator.devices()}


def v3_refused_by_shadow(ctx: StoryContext) -> None:
    v3, dropped = ctx.versions["v3"], CLASS_NAMES[DROPPED_CLASS]
    started = _start(ctx, "v3", f"v3: v2 retrained without {dropped}, by mistake")
    rollout, details = _settle(ctx, "v3", started["id"])
    refusals = [(d, e) for d, e in _events(details, v3) if e["state"] == "shadow" and not e["ok"]]
    named = sorted({c for _, e in refusals for c in _failed_classes(e)})
    ctx.claim(f"the first device's shadow validation refused v3, naming {dropped}",
              bool(refusals) and dropped in named,
              "; ".join(f"{d}: {e['reason']}" for d, e in refusals) or "no failed shadow event")  # fmt: skip
    ctx.claim(
        "v3's rollout stopped in its first wave",
        rollout["state"] in ("halted", "rolled_back") and rollout["current_wave"] == 0,
        f"rollout {rollout['id']} {rollout['state']}: {wave_text(rollout)}",
    )
    _record(ctx, "v3", rollout, details, fault=f"misses {dropped}", caught_by="shadow validation",
            reason="; ".join(e["reason"] for _, e in refusals), extra={"failed_classes": named})  # fmt: skip


def v4_halted_by_analysis(ctx: StoryContext) -> None:
    v4 = ctx.versions["v4"]
    started = _start(ctx, "v4", f"v4: v2 with {SLOWDOWN_MS:g} ms more per image")
    rollout, details = _settle(ctx, "v4", started["id"])
    committed = sorted({d for d, e in _events(details, v4) if e["state"] == "committed" and e["ok"]})
    ctx.claim("v4 passed the first device's own checks (validation, shadow, probation) and served there",
              len(committed) == 1, f"committed on: {', '.join(committed) or 'none'}")  # fmt: skip
    report = ctx.operator.analysis(rollout["id"])
    failed = [a for a in report["history"] if a["verdict"] == "fail"]
    verdict = failed[0] if failed else report["latest"]
    if verdict is not None:
        ctx.narrator.console.print(analysis_table(verdict, f"Fleet analysis of v4's first wave (rollout "
                                                           f"{rollout['id']})"))  # fmt: skip
    metrics = {m["name"]: m for m in (verdict or {}).get("metrics", [])}
    latency = metrics.get("latency_p99", {})
    ctx.claim("the fleet analysis failed v4's first wave on latency_p99 and rolled it back",
              bool(failed) and latency.get("verdict") == "fail" and verdict is not None
              and verdict["action"] == "rollback",
              "no failed verdict" if not failed else f"{verdict['reason']} -> {verdict['action']}")  # fmt: skip
    back = all(details[d]["current_version"] == ctx.versions["v2"] for d in committed)
    ctx.claim("the wave's device went back to v2", bool(committed) and back, ", ".join(committed))
    _record(ctx, "v4", rollout, details, fault=f"+{SLOWDOWN_MS:g} ms per image", caught_by="fleet analysis",
            reason="" if verdict is None else verdict["reason"],
            extra={"failed_metrics": sorted(n for n, m in metrics.items() if m["verdict"] == "fail"),
                   "latency_p99_ms": {arm: latency.get(arm) for arm in ("treatment", "control")}})  # fmt: skip


def _record(ctx: StoryContext, label: str, rollout: Json, details: dict[str, Json], *, fault: str,
            caught_by: str, reason: str, extra: Json) -> None:  # fmt: skip
    """The at-most-one-device claim, the time to stop, and the step's entry in the summary."""
    version = ctx.versions[label]
    served = _served_by(ctx, details, version)
    received = sorted({d for d, _ in _events(details, version)})
    # The service's audit times; else what the demo measured from its POST to seeing the fleet settled.
    seconds = ctx.seconds_to_stop(rollout["id"]) or ctx.results.get("watched_s", {}).get(label)
    ctx.claim(f"no more than one device ever served {label}", len(served) <= 1 and len(received) <= 1,
              f"served by {len(served)} ({', '.join(served) or 'none'}); received by {', '.join(received) or 'none'}; "
              f"first wave to stop: {'-' if seconds is None else f'{seconds:.1f} s'}")  # fmt: skip
    ctx.results[label] = {
        "rollout_id": rollout["id"], "state": rollout["state"], "fault": fault, "caught_by": caught_by,
        "reason": reason, "seconds_to_stop": seconds, "served_by": served, "received_by": received,
        "fleet": len(details), **extra,
    }  # fmt: skip
