"""The demo's steps: v1 to the whole fleet, v2 by canary waves, an A/B test of v1 against v2, and a v3 that fails
on the devices, halts its rollout and is rolled back where it landed. Each step prints what the fleet does and
ends by checking its claim against the REST API; the summary lists every claim with its verdict.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from yolo_ota.demo.fleetview import FleetWatch, Json, Operator, wave_text
from yolo_ota.demo.stack import Stack, fleet_specs
from yolo_ota.demo.traffic import Traffic
from yolo_ota.demo.versions import Built, build_faulty_version, export_version
from yolo_ota.errors import DemoError

# 25 % then 100 %: with four devices, one device bakes alone before the rest follow.
DEMO_WAVES: list[dict[str, float]] = [
    {"percent": 25, "bake_s": 2, "max_failure_rate": 0.0, "min_success_rate": 1.0},
    {"percent": 100, "bake_s": 0, "max_failure_rate": 0.0, "min_success_rate": 1.0},
]
# v3's fault: past the export gates' parity calls (one per golden input), inside the devices' probation (which
# sees three warm-up calls, then traffic at 4 requests/s for at least 4 s).
NAN_AFTER_CALLS = 10


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path | None = None
    devices: int = 4
    imgsz: int = 160
    model_v1: str = "yolov8n.yaml"
    model_v2: str = "yolo11n.yaml"
    model_name: str = "pcb-inspection"
    ab_seconds: float = 15
    step_timeout_s: float = 240
    keep_running: bool = False


@dataclass
class Claim:
    text: str
    held: bool
    detail: str = ""


@dataclass
class Demo:
    options: DemoOptions
    console: Console
    claims: list[Claim] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # v1/v2/v3 -> MLflow version number
    started: float = field(default_factory=time.monotonic)
    traffic: Traffic | None = None

    # -- output ----------------------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        self.console.print(Text.assemble((f"[{time.monotonic() - self.started:6.1f}s] ", "dim"), message))

    def step(self, title: str) -> None:
        self.console.rule(Text(title, style="bold"), align="left")

    def claim(self, text: str, held: bool, detail: str = "") -> None:
        self.claims.append(Claim(text, held, detail))
        mark = ("✓ ", "green") if held else ("✗ ", "bold red")
        self.console.print(Text.assemble(mark, text, (f"  ({detail})" if detail else "", "dim")))

    # -- the run ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Everything, with the stack stopped (and a temporary data dir removed) however it ends."""
        temporary = self.options.data_dir is None
        data_dir = Path(tempfile.mkdtemp(prefix="yolo-ota-demo-")) if temporary else self.options.data_dir
        assert data_dir is not None
        data_dir.mkdir(parents=True, exist_ok=True)
        if any(data_dir.iterdir()) and not temporary:
            raise DemoError(f"{data_dir} is not empty; give the demo an empty or new folder")
        stack = Stack(data_dir=data_dir, model=self.options.model_name, say=self.say)
        try:
            self._tell(stack, data_dir)
            self._summary(stack)
            if self.options.keep_running:
                self._stay_up(stack)
        finally:
            if self.traffic is not None:
                self.traffic.stop()
            stack.stop()
            if temporary:
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                self.say(f"logs, databases and bundles kept in {data_dir}")
        return 0 if all(c.held for c in self.claims) else 1

    def _tell(self, stack: Stack, data_dir: Path) -> None:
        from exporters.signing import generate_keypair
        from exporters.yolo import sample_images

        o = self.options
        self.step(f"Starting the stack in {data_dir}")
        private_key, public_key = generate_keypair(data_dir / "keys")
        self.say(f"signing key made: {private_key} (the agents trust {public_key.name})")
        stack.launch_mlflow()
        bundles = data_dir / "bundles"
        self.step(f"v1: export {o.model_v1}, gate, sign (while the MLflow server starts)")
        v1 = export_version("v1", o.model_v1, out_dir=bundles / "v1", imgsz=o.imgsz, model=o.model_name,
                            signing_key=private_key, note="first model on the line", say=self.say)  # fmt: skip
        stack.wait_mlflow()
        self.say(f"MLflow server up at {stack.mlflow_url} (SQLite, artifacts served from the data dir)")
        stack.start_service(DEMO_WAVES)
        self.say(f"rollout service up at {stack.service_url} (SQLite; MLflow calls its alias webhook)")
        devices = fleet_specs(o.devices)
        stack.launch_agents(devices, public_key)
        later: dict[str, Built] = {}
        builder = threading.Thread(target=self._build_later, args=(bundles, private_key, later), daemon=True)
        builder.start()  # v2 and v3 are exported while the agents start and the fleet takes v1
        stack.wait_agents()
        operator = Operator(stack.service_url, stack.operator_token)
        watch = FleetWatch(operator, self.say, stack.check_running)
        # Enrolled before the promotion, the devices are the rollout's cohort: its waves take exact shares.
        watch.until("every agent to enroll", lambda devices, _: len(devices) == len(stack.agents), timeout_s=120)
        self.say(f"{len(devices)} agents enrolled: " + ", ".join(f"{d.device_id} ({d.line})" for d in devices))
        self.say(f"stack details in {stack.write_info()}")
        self.traffic = Traffic(
            {d: c.url for d, c in stack.agents.items()}, [p.read_bytes() for p in sample_images()], interval_s=0.25
        )
        self.traffic.start()
        self.say("traffic started: each agent gets a line image every 0.25 s on its local /v1/detect")

        self.step("v1: register, promote")
        self._promote(stack, v1)
        rollout = self._rollout_of(operator, "v1")
        watch.until("the fleet on v1", self._all_on("v1", completed=True), rollout_id=rollout["id"],
                    timeout_s=o.step_timeout_s)  # fmt: skip
        self._check_converged(operator, rollout["id"], "v1")

        builder.join()
        if set(later) != {"v2", "v3"}:
            raise DemoError("building v2 and v3 failed; see the messages above")
        self.step(f"v2: {o.model_v2}, promoted: a canary rollout, wave by wave")
        self._promote(stack, later["v2"])
        rollout = self._rollout_of(operator, "v2")
        watch.until("the canary of v2 to complete", self._all_on("v2", completed=True), rollout_id=rollout["id"],
                    timeout_s=o.step_timeout_s)  # fmt: skip
        self._check_canary(operator, rollout["id"])

        self.step("A/B test: v1 (control) against v2 (treatment) on the fleet")
        self._ab_test(operator, watch)

        self.step("v3: passes its export gates, fails on the devices")
        self._promote(stack, later["v3"])
        rollout = self._rollout_of(operator, "v3")
        self._v3(operator, watch, rollout["id"])

    def _build_later(self, bundles: Path, key: Path, out: dict[str, Built]) -> None:
        o = self.options
        try:
            out["v2"] = export_version("v2", o.model_v2, out_dir=bundles / "v2", imgsz=o.imgsz, model=o.model_name,
                                       signing_key=key, note="the next model", say=self.say)  # fmt: skip
            out["v3"] = build_faulty_version("v3", o.model_v2, out_dir=bundles / "v3", imgsz=o.imgsz,
                                             model=o.model_name, signing_key=key, nan_after_calls=NAN_AFTER_CALLS,
                                             say=self.say)  # fmt: skip
        except Exception as exc:  # reported by the main thread, which stops the stack
            self.say(f"[red]building a version failed: {exc}[/red]")

    # -- steps -----------------------------------------------------------------------------------------------

    def _promote(self, stack: Stack, built: Built) -> None:
        from registry.mlflow_gateway import MlflowGateway

        # MLflow's client logs a line per run and per registered version (its import sets its loggers' level):
        # the steps say the same more briefly.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        gateway = MlflowGateway(stack.mlflow_url)
        registration = gateway.register_bundle(built.bundle_dir, self.options.model_name)
        number = registration.version.version
        self.versions[built.label] = number
        self.say(f"{built.label} ({built.note}) registered as {self.options.model_name} version {number}, "
                 f"gates {registration.version.gates}, signed")  # fmt: skip
        gateway.promote(self.options.model_name, number)
        self.say(f"alias 'production' -> version {number} (what a person does in the MLflow UI)")

    def _rollout_of(self, operator: Operator, label: str, timeout_s: float = 30) -> Json:
        """The rollout the promotion of ``label`` started (the service hears of it by webhook or by polling)."""
        version = self.versions[label]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rollout in operator.rollouts(self.options.model_name):
                if rollout["version"] == version and rollout["created_by"] == "mlflow-alias":
                    self.say(f"rollout {rollout['id']} started by the promotion: {rollout['strategy']}, "
                             f"{len(rollout['waves'])} waves")  # fmt: skip
                    return rollout
            time.sleep(0.3)
        raise DemoError(f"no rollout of version {version} within {timeout_s:.0f} s of its promotion")

    def _all_on(self, label: str, *, completed: bool) -> Callable[[dict[str, Json], Json | None], bool]:
        version = self.versions[label]

        def check(devices: dict[str, Json], rollout: Json | None) -> bool:
            on = all(d["current_version"] == version and d["state"] == "committed" for d in devices.values())
            return on and (not completed or (rollout is not None and rollout["state"] == "completed"))

        return check

    def _check_converged(self, operator: Operator, rollout_id: int, label: str) -> None:
        devices = operator.devices()
        on = sorted(d for d, x in devices.items() if x["current_version"] == self.versions[label])
        rollout = operator.rollout(rollout_id)
        self.claim(f"the fleet converged on {label}", len(on) == len(devices) and rollout["state"] == "completed",
                   f"{len(on)}/{len(devices)} devices, rollout {rollout_id} {rollout['state']}")  # fmt: skip

    def _check_canary(self, operator: Operator, rollout_id: int) -> None:
        rollout = operator.rollout(rollout_id)
        actions = [e["action"] for e in sorted(operator.audit(rollout_id), key=lambda e: e["id"])]
        sizes = [w["devices"] for w in rollout["wave_progress"]]
        waves_ok = actions == ["created", "advance", "complete"] and all(
            w["state"] == "passed" for w in rollout["wave_progress"]
        )
        self.claim("v2 advanced wave by wave to every device", waves_ok and rollout["state"] == "completed",
                   f"devices included per wave, cumulative: {sizes}; audit: {', '.join(actions)}")  # fmt: skip

    def _ab_test(self, operator: Operator, watch: FleetWatch) -> None:
        o = self.options
        v1, v2 = self.versions["v1"], self.versions["v2"]
        ab = operator.post("/v1/rollouts", {
            "model": o.model_name, "version": v2, "strategy": "ab", "ab": {"control_version": v1, "split": 0.5},
            "reason": "A/B: v2 against v1 on live traffic",
        })  # fmt: skip
        arms = {d: operator.device(d)["desired_version"] for d in operator.devices()}
        control = sorted(d for d, v in arms.items() if v == v1)
        self.say(f"rollout {ab['id']}: A/B, split 50/50; back on v1 (control): {', '.join(control) or 'none'}")

        def in_arms(devices: dict[str, Json], rollout: Json | None) -> bool:
            placed = all(
                devices[d]["current_version"] == v and devices[d]["state"] == "committed" for d, v in arms.items()
            )
            return placed and rollout is not None and sum(a["succeeded"] for a in rollout["arms"]) == len(arms)

        watch.until("every device in its A/B arm", in_arms, rollout_id=ab["id"], timeout_s=o.step_timeout_s)
        self.say(f"measuring both arms on live traffic for {o.ab_seconds:g} s")
        time.sleep(o.ab_seconds)
        detail = operator.rollout(ab["id"])
        self.console.print(_arms_table(detail))
        by_arm = {a["arm"]: a for a in detail["arms"]}
        measured = all(by_arm[a]["devices"] > 0 and by_arm[a]["inferences"] > 0 for a in ("control", "treatment"))
        self.claim("the A/B test measured both arms side by side", measured,
                   ", ".join(f"{a}: {by_arm[a]['devices']} devices, {by_arm[a]['inferences']} inferences"
                             for a in ("control", "treatment")))  # fmt: skip
        treatment, control_arm = by_arm["treatment"], by_arm["control"]
        verdict = (
            "no more errors than v1"
            if (treatment["error_rate"] or 0) <= (control_arm["error_rate"] or 0)
            else ("MORE errors than v1")
        )
        self.say(f"decision (the operator's): keep v2; it makes {verdict}. v2 goes to every device.")
        keep = operator.post("/v1/rollouts", {
            "model": o.model_name, "version": v2, "strategy": "immediate", "supersede": True,
            "reason": f"A/B {ab['id']}: v2 kept",
        })  # fmt: skip
        watch.until("the fleet back on v2", self._all_on("v2", completed=True), rollout_id=keep["id"],
                    timeout_s=o.step_timeout_s)  # fmt: skip
        self._check_converged(operator, keep["id"], "v2")

    def _v3(self, operator: Operator, watch: FleetWatch, rollout_id: int) -> None:
        v2, v3 = self.versions["v2"], self.versions["v3"]

        def halted_and_back(devices: dict[str, Json], rollout: Json | None) -> bool:
            if rollout is None or rollout["state"] != "halted":
                return False
            settled = all(d["current_version"] == v2 and d["state"] in ("committed", "rolled_back")
                          for d in devices.values())  # fmt: skip
            returned = sum(d["state"] == "rolled_back" for d in devices.values())
            return settled and returned >= rollout["wave_progress"][0]["failed"] > 0

        _, rollout = watch.until("the v3 rollout to halt and its devices to roll back", halted_and_back,
                                 rollout_id=rollout_id, timeout_s=self.options.step_timeout_s)  # fmt: skip
        assert rollout is not None
        self.say("holding 5 s: a halted rollout sends v3 nowhere else")
        time.sleep(5)
        rollout = operator.rollout(rollout_id)
        details = {d: operator.device(d) for d in operator.devices()}
        took = {d for d, x in details.items() if any(e["version"] == v3 for e in x["last_events"])}
        first_wave = rollout["wave_progress"][0]
        reasons = sorted({e["reason"] for x in details.values() for e in x["last_events"]
                          if e["version"] == v3 and e["state"] == "rolled_back"})  # fmt: skip
        self.claim("v3's rollout halted in its first wave",
                   rollout["state"] == "halted" and rollout["current_wave"] == 0,
                   f"rollout {rollout_id} {rollout['state']}: {wave_text(rollout)}")  # fmt: skip
        back = all(details[d]["current_version"] == v2 and details[d]["state"] == "rolled_back" for d in took)
        self.claim("the devices that took v3 rolled back to v2",
                   bool(took) and back and len(took) == first_wave["devices"],
                   f"{', '.join(sorted(took))}: {'; '.join(reasons)}")  # fmt: skip
        rest = sorted(set(details) - took)
        self.claim("the rest of the fleet never received v3",
                   all(details[d]["current_version"] == v2 for d in rest) and len(rest) == len(details) - len(took),
                   f"{', '.join(rest)} still on v2, no v3 event")  # fmt: skip

    # -- the end ---------------------------------------------------------------------------------------------

    def _summary(self, stack: Stack) -> None:
        traffic = self.traffic
        assert traffic is not None
        operator = Operator(stack.service_url, stack.operator_token)
        try:
            devices = operator.devices()
            rollouts = operator.rollouts(self.options.model_name)
        finally:
            operator.close()
        answered, failed = traffic.totals()
        detail = f"{answered} answered, {failed} failed" + (f"; last: {traffic.last_error}" if failed else "")
        self.claim("no request failed while versions were swapped", failed == 0 and answered > 0, detail)
        self.step("Summary")
        self.console.print(_devices_table(devices, traffic, self.versions))
        self.console.print(_rollouts_table(rollouts, self.versions))
        held = sum(c.held for c in self.claims)
        self.console.print(
            f"{held} of {len(self.claims)} claims held; total time {time.monotonic() - self.started:.0f} s"
        )
        self.console.print(f"MLflow UI:            {stack.mlflow_url}")
        self.console.print(f"Rollout service docs: {stack.service_url}/docs")
        self.console.print(f"Fleet dashboard:      {stack.service_url}/ui#token={stack.operator_token}")

    def _stay_up(self, stack: Stack) -> None:
        self.say(
            "the stack stays up: promote a version in the MLflow UI (alias 'production') and watch the fleet "
            "follow on the dashboard. Ctrl-C stops everything."
        )
        while True:
            stack.check_running()
            time.sleep(1)


def _label(versions: dict[str, str], number: str | None) -> str:
    names = {v: k for k, v in versions.items()}
    return f"{number} ({names[number]})" if number in names else str(number or "-")


def _arms_table(rollout: Json) -> Table:
    table = Table(title=f"A/B rollout {rollout['id']}: per-arm telemetry", title_justify="left")
    for column in ("arm", "version", "devices", "inferences", "errors", "error rate", "p50 ms", "p99 ms",
                   "detections/image", "mean confidence"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("arm", "version") else "right")
    for arm in rollout["arms"]:
        table.add_row(
            arm["arm"], arm["version"], str(arm["devices"]), str(arm["inferences"]), str(arm["errors"]),
            _fmt(arm["error_rate"], "{:.2%}"), _fmt(arm["latency_p50_ms"], "{:.1f}"),
            _fmt(arm["latency_p99_ms"], "{:.1f}"), _fmt(arm["detections_per_image"], "{:.2f}"),
            _fmt(arm["mean_confidence"], "{:.2f}"),
        )  # fmt: skip
    return table


def _devices_table(devices: dict[str, Json], traffic: Traffic, versions: dict[str, str]) -> Table:
    table = Table(title="Devices", title_justify="left")
    for column in ("device", "line", "version", "state", "requests answered", "failed", "answered by"):
        table.add_column(column)
    for device_id, device in sorted(devices.items()):
        by: dict[str, int] = dict(traffic.versions.get(device_id, {}))
        table.add_row(
            device_id, device["labels"].get("line", ""), _label(versions, device["current_version"]),
            device["state"] or "", str(traffic.answered[device_id]), str(traffic.failed[device_id]),
            ", ".join(f"v{v}: {n}" for v, n in sorted(by.items())),
        )  # fmt: skip
    return table


def _rollouts_table(rollouts: list[Json], versions: dict[str, str]) -> Table:
    table = Table(title="Rollouts", title_justify="left")
    for column in ("id", "strategy", "version", "previous/control", "state", "by", "reason"):
        table.add_column(column)
    for r in sorted(rollouts, key=lambda r: r["id"]):
        other = (r.get("ab") or {}).get("control_version") or r["previous_version"]
        table.add_row(
            str(r["id"]), r["strategy"], _label(versions, r["version"]), _label(versions, other), r["state"],
            r["created_by"], r["reason"],
        )  # fmt: skip
    return table


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
