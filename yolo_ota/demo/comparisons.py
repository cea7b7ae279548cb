"""The steps that compare two good versions: v2's canary, judged by the fleet analysis against v1, and an A/B
test of v1 against v2 whose winner the service computes (and, with ``auto_complete``, rolls out)."""

from __future__ import annotations

from yolo_ota.demo.context import StoryContext
from yolo_ota.demo.fleetview import Json
from yolo_ota.demo.stack import DEMO_ANALYSIS
from yolo_ota.demo.tables import analysis_table, arms_table

# An A/B test asks which arm is better, in both directions: a class rate that moves by more than 10 % counts for
# the arm that finds more. Samples of 8 frames, as the canary's (stack.DEMO_ANALYSIS).
AB_ANALYSIS: Json = {"min_windows": 8, "min_window_frames": DEMO_ANALYSIS["min_window_frames"], "interval_s": 1,
                     "bands": {"class_rate": 0.1, "detections_per_image": 0.1}}  # fmt: skip
# The control arm goes back to a version the fleet already ran; comparing the two is the A/B test's own job, so
# its devices do not also gate the swap on shadow validation (v1 would fail it against v2: it finds less).
AB_SHADOW: Json = {"enabled": False}


def _deciding(report: Json, kind: str) -> Json | None:
    """The newest stored verdict of ``kind`` that the scheduler acted on (anything but wait), else the newest."""
    history = [a for a in report["history"] if a["kind"] == kind]
    acted = [a for a in history if a["action"] != "wait"]
    return (acted or history or [None])[0]


def check_canary_analysis(ctx: StoryContext, rollout_id: int) -> None:
    """v2's canary: its waves, and the verdict of the fleet analysis that let its first wave advance."""
    rollout = ctx.operator.rollout(rollout_id)
    actions = [e["action"] for e in sorted(ctx.operator.audit(rollout_id), key=lambda e: e["id"])]
    sizes = [w["devices"] for w in rollout["wave_progress"]]
    waves_ok = rollout["state"] == "completed" and all(w["state"] == "passed" for w in rollout["wave_progress"])
    ctx.claim("v2 advanced wave by wave to every device", waves_ok,
              f"devices per wave, cumulative: {sizes}; audit: {', '.join(actions)}")  # fmt: skip
    verdict = _deciding(ctx.operator.analysis(rollout_id), "canary")
    if verdict is not None:
        ctx.narrator.console.print(analysis_table(verdict, f"Fleet analysis of v2's first wave (rollout {rollout_id})"))
    passed = verdict is not None and verdict["verdict"] == "pass" and verdict["action"] in ("advance", "complete")
    ctx.claim("the fleet analysis passed v2 against v1 before its wave advanced", passed,
              "no verdict stored" if verdict is None else f"{verdict['verdict']}, score {verdict['score']}: "
              f"{verdict['reason']}")  # fmt: skip
    ctx.results["v2_canary"] = {
        "rollout_id": rollout_id, "state": rollout["state"], "waves": sizes,
        "verdict": None if verdict is None else verdict["verdict"],
        "score": None if verdict is None else verdict["score"],
        "reason": None if verdict is None else verdict["reason"],
        "metrics": [] if verdict is None else verdict["metrics"],
    }  # fmt: skip


def ab_test(ctx: StoryContext) -> None:
    """v1 (control) against v2 (treatment) on half the fleet each, until the analysis names a winner."""
    v1, v2 = ctx.versions["v1"], ctx.versions["v2"]
    body = {
        "model": ctx.model, "version": v2, "strategy": "ab",
        "ab": {"control_version": v1, "split": 0.5, "auto_complete": True},
        "analysis": AB_ANALYSIS, "shadow": AB_SHADOW, "reason": "A/B: v2 against v1 on live traffic",
    }  # fmt: skip
    ab = ctx.operator.post("/v1/rollouts", body)
    ctx.say(f"rollout {ab['id']}: A/B, split 50/50, auto_complete; analysis block {AB_ANALYSIS}")

    def decided(devices: dict[str, Json], rollout: Json | None) -> bool:
        if rollout is None or rollout["state"] not in ("completed", "rolled_back"):
            return False
        winner = v2 if rollout["state"] == "completed" else v1
        return all(d["current_version"] == winner and d["state"] == "committed" for d in devices.values())

    _, rollout = ctx.watch.until("the A/B test to name a winner and the fleet to take it", decided,
                                 rollout_id=ab["id"], timeout_s=ctx.step_timeout_s)  # fmt: skip
    assert rollout is not None
    ctx.narrator.console.print(arms_table(rollout))
    verdict = _deciding(ctx.operator.analysis(ab["id"]), "ab")
    if verdict is not None:
        ctx.narrator.console.print(analysis_table(verdict, f"A/B analysis (rollout {ab['id']}): v2 against v1"))
    winner = None if verdict is None else verdict["winner"]
    ctx.claim("the A/B analysis named a winner", winner in ("treatment", "control"),
              "no verdict stored" if verdict is None else verdict["reason"])  # fmt: skip
    winning = {"treatment": v2, "control": v1}.get(winner or "")
    on = {d["current_version"] for d in ctx.operator.devices().values()}
    ctx.claim("with auto_complete the fleet ended on the winner", winning is not None and on == {winning},
              f"rollout {ab['id']} {rollout['state']}, fleet on {', '.join(sorted(on))}")  # fmt: skip
    ctx.results["ab"] = {
        "rollout_id": ab["id"], "state": rollout["state"], "winner": winner,
        "winner_version": winning, "reason": None if verdict is None else verdict["reason"],
        "better": {m["name"]: m.get("better") for m in (verdict or {}).get("metrics", [])},
        "metrics": [] if verdict is None else verdict["metrics"],
    }  # fmt: skip
