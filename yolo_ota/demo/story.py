"""The demo's story, with real detectors trained on synthetic PCB scenes (``detectors``):

1. v1 to every device at once;
2. v2 (v1 trained further), promoted in MLflow: a canary whose first wave the fleet analysis judges against v1;
3. an A/B test of v1 against v2 whose winner the service computes and rolls out (``auto_complete``);
4. v3 (v2 blind to one class): refused by the first device's shadow validation;
5. v4 (v2, slower): served by the first device, failed by the fleet analysis of that wave on latency_p99 and
   rolled back there.

Each step prints what the fleet does and checks its claims against the REST API; the summary lists every claim
with its verdict, and ``summary.json`` in the data dir holds the figures (what the tests read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from yolo_ota.demo.comparisons import ab_test, check_canary_analysis
from yolo_ota.demo.context import StoryContext
from yolo_ota.demo.fleetview import FleetWatch, Json, Operator
from yolo_ota.demo.narration import Narrator
from yolo_ota.demo.regressions import v3_refused_by_shadow, v4_halted_by_analysis
from yolo_ota.demo.stack import Stack, fleet_specs
from yolo_ota.demo.tables import devices_table, regressions_table, rollouts_table
from yolo_ota.demo.traffic import Traffic
from yolo_ota.demo.versions import Built, export_version, golden_scenes
from yolo_ota.errors import DemoError

# The canary a promotion starts (v2's): one device of four first, then the rest.
DEMO_WAVES: list[dict[str, float]] = [
    {"percent": 25, "bake_s": 2, "max_failure_rate": 0.0, "min_success_rate": 1.0},
    {"percent": 100, "bake_s": 0, "max_failure_rate": 0.0, "min_success_rate": 1.0},
]
NOTES = {
    "v1": "trained briefly",
    "v2": "v1 trained further",
    "v3": "v2 blind to solder bridges",
    "v4": "v2, slower",
}
SUMMARY_NAME = "summary.json"


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM are ignored while the stack stops, so that a second one cannot leave processes behind
    (``uv run`` passes the terminal's Ctrl-C on to the demo, which then gets it twice)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class Background(threading.Thread):
    """``target(*args)`` on a daemon thread, started at once; ``result()`` waits and raises what it raised."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        super().__init__(daemon=True)
        self._call = lambda: target(*args)
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._call()
        except BaseException as exc:  # handed to the thread that calls result()
            self._error = exc

    def result(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path | None = None
    devices: int = 4
    imgsz: int = 160
    model_name: str = "pcb-inspection"
    step_timeout_s: float = 240
    keep_running: bool = False


@dataclass
class Demo:
    options: DemoOptions
    console: Console
    narrator: Narrator = field(init=False)
    traffic: Traffic | None = None
    context: StoryContext | None = None
    bring_up: Background | None = None
    training_s: float = 0.0

    def __post_init__(self) -> None:
        self.narrator = Narrator(self.console)

    def say(self, message: str) -> None:
        self.narrator.say(message)

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
            self._summary(stack, data_dir)
            if self.options.keep_running:
                self._stay_up(stack)
        finally:
            with uninterrupted():
                if self.bring_up is not None:
                    self.bring_up.join()  # whatever it started is stopped below, with the rest
                if self.traffic is not None:
                    self.traffic.stop()
                stack.stop()
                if temporary:
                    shutil.rmtree(data_dir, ignore_errors=True)
                else:
                    self.say(f"logs, databases and bundles kept in {data_dir}")
        return 0 if all(c.held for c in self.narrator.claims) else 1

    def _tell(self, stack: Stack, data_dir: Path) -> None:
        from exporters.signing import generate_keypair
        from yolo_ota.demo.detectors import cache_root, traffic_images, trained_weights

        o, narrator = self.options, self.narrator
        narrator.step(f"Starting the stack in {data_dir}")
        private_key, public_key = generate_keypair(data_dir / "keys")
        self.say(f"signing key made: {private_key} (the agents trust {public_key.name})")
        stack.launch_mlflow()
        devices = fleet_specs(o.devices)
        # MLflow, the service and the agents come up while the detector trains and v1 is exported.
        self.bring_up = Background(stack.bring_up, DEMO_WAVES, devices, public_key)
        bundles = data_dir / "bundles"
        narrator.step(f"v1 and v2: a YOLOv8n trained on synthetic PCB scenes (cached in {cache_root()})")
        weights, self.training_s = trained_weights(self.say)
        golden = golden_scenes(bundles / "golden", o.imgsz)
        v1 = self._export("v1", weights["v1"], bundles, private_key, golden)
        later: dict[str, Built] = {}
        builder = threading.Thread(
            target=self._build_later, args=(weights["v2"], bundles, private_key, golden, later), daemon=True
        )
        builder.start()  # v2..v4 are exported while the fleet takes v1
        self.bring_up.result()
        operator = Operator(stack.service_url, stack.operator_token)
        watch = FleetWatch(operator, self.say, stack.check_running)
        ctx = self.context = StoryContext(narrator, operator, watch, o.model_name, o.step_timeout_s)
        watch.until("every agent to enroll", lambda devices, _: len(devices) == len(stack.agents), timeout_s=120)
        self.say(f"{len(devices)} agents enrolled: " + ", ".join(f"{d.device_id} ({d.line})" for d in devices))
        self.say(f"stack details in {stack.write_info()}")
        self.traffic = Traffic({d: c.url for d, c in stack.agents.items()}, traffic_images(size=o.imgsz))
        self.traffic.start()
        self.say("traffic started: each agent gets a held-out synthetic scene every 0.25 s on its /v1/detect")

        narrator.step("v1: register, roll out to every device at once")
        self._register(stack, v1)
        body = {"model": o.model_name, "version": ctx.versions["v1"], "strategy": "immediate", "reason": "first model"}
        rollout = operator.post("/v1/rollouts", body)
        watch.until("the fleet on v1", ctx.all_on("v1", completed=True), rollout_id=rollout["id"],
                    timeout_s=o.step_timeout_s)  # fmt: skip
        ctx.check_converged(rollout["id"], "v1")
        self._tell_the_rest(stack, builder, later)

    def _tell_the_rest(self, stack: Stack, builder: threading.Thread, later: dict[str, Built]) -> None:
        ctx, narrator = self.context, self.narrator
        assert ctx is not None
        builder.join()
        if set(later) != {"v2", "v3", "v4"}:
            raise DemoError("building v2, v3 and v4 failed; see the messages above")
        narrator.step("v2: promoted in MLflow: a canary, its first wave judged by the fleet analysis")
        self._register(stack, later["v2"], promote=True)
        rollout = self._rollout_of(ctx.operator, ctx.versions["v2"])
        ctx.watch.until("the canary of v2 to complete", ctx.all_on("v2", completed=True), rollout_id=rollout["id"],
                        timeout_s=self.options.step_timeout_s)  # fmt: skip
        check_canary_analysis(ctx, rollout["id"])

        narrator.step("A/B test: v1 (control) against v2 (treatment); the service names the winner")
        ab_test(ctx)
        if ctx.results["ab"]["winner_version"] != ctx.versions["v2"]:
            raise DemoError("v2 did not win the A/B test; the regressions below are built on it")

        self._register(stack, later["v3"])
        self._register(stack, later["v4"])
        narrator.step("v3: passes every gate, misses solder bridges: the first device's shadow validation")
        v3_refused_by_shadow(ctx)
        narrator.step("v4: passes every device check, is slower: the fleet analysis of its first wave")
        v4_halted_by_analysis(ctx)

    def _export(self, label: str, weights: Path, bundles: Path, key: Path, golden: tuple[Path, ...]) -> Built:
        o = self.options
        return export_version(label, weights, out_dir=bundles / label, imgsz=o.imgsz, model=o.model_name,
                              signing_key=key, note=NOTES[label], golden=golden, say=self.say)  # fmt: skip

    def _build_later(self, v2: Path, bundles: Path, key: Path, golden: tuple[Path, ...], out: dict[str, Built]) -> None:
        from yolo_ota.demo.detectors import derived_weights

        try:
            weights = {"v2": v2, **derived_weights(v2, bundles / "weights", self.say)}
            for label, path in weights.items():
                out[label] = self._export(label, path, bundles, key, golden)
        except Exception as exc:  # reported by the main thread, which stops the stack
            self.say(f"[red]building a version failed: {exc}[/red]")

    def _register(self, stack: Stack, built: Built, *, promote: bool = False) -> None:
        from registry.mlflow_gateway import MlflowGateway

        ctx = self.context
        assert ctx is not None
        # MLflow's client logs a line per run and per registered version: the steps say the same more briefly.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        gateway = MlflowGateway(stack.mlflow_url)
        registration = gateway.register_bundle(built.bundle_dir, self.options.model_name)
        number = registration.version.version
        ctx.versions[built.label] = number
        self.say(f"{built.label} ({built.note}) registered as {self.options.model_name} version {number}, "
                 f"gates {registration.version.gates}, signed")  # fmt: skip
        if promote:
            gateway.promote(self.options.model_name, number)
            self.say(f"alias 'production' -> version {number} (what a person does in the MLflow UI)")

    def _rollout_of(self, operator: Operator, version: str, timeout_s: float = 30) -> Json:
        """The rollout the promotion of ``version`` started (the service hears of it by webhook or by polling)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rollout in operator.rollouts(self.options.model_name):
                if rollout["version"] == version and rollout["created_by"] == "mlflow-alias":
                    self.say(f"rollout {rollout['id']} started by the promotion: {rollout['strategy']}, "
                             f"{len(rollout['waves'])} waves")  # fmt: skip
                    return dict(rollout)
            time.sleep(0.3)
        raise DemoError(f"no rollout of version {version} within {timeout_s:.0f} s of its promotion")

    def _summary(self, stack: Stack, data_dir: Path) -> None:
        traffic, ctx = self.traffic, self.context
        assert traffic is not None and ctx is not None
        devices = ctx.operator.devices()
        rollouts = ctx.operator.rollouts(self.options.model_name)
        answered, failed = traffic.totals()
        detail = f"{answered} answered, {failed} failed" + (f"; last: {traffic.last_error}" if failed else "")
        ctx.claim("no request failed while versions were swapped", failed == 0 and answered > 0, detail)
        self.narrator.step("Summary")
        for table in (devices_table(devices, traffic, ctx.versions), rollouts_table(rollouts, ctx.versions),
                      regressions_table(ctx.results)):  # fmt: skip
            self.console.print(table)
        claims = self.narrator.claims
        held = sum(c.held for c in claims)
        total_s = self.narrator.elapsed_s()
        summary: dict[str, Any] = {
            "versions": ctx.versions, "training_s": self.training_s, "total_s": round(total_s, 1),
            "requests": {"answered": answered, "failed": failed}, **ctx.results,
            "claims": [vars(c) for c in claims], "claims_held": held,
        }  # fmt: skip
        (data_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        trained = self.training_s
        self.console.print(f"{held} of {len(claims)} claims held; total time {total_s:.0f} s "
                           f"(training {trained:.0f} s{'' if trained else ', from the cache'})")  # fmt: skip
        self.console.print(f"Figures:              {data_dir / SUMMARY_NAME}")
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
