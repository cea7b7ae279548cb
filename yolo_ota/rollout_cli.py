"""``yolo-ota rollout``: a thin client of the rollout service's REST API (DESIGN.md section 6).

Each sub-command makes one request and prints the answer as tables, or as the service's raw JSON with ``--json``.
An error answer of the service ({"detail": ...}) and an unreachable service are one ``error:`` line on stderr
with exit status 2, like every other error of the ``yolo-ota`` command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

# The service's own enums; schemas is pydantic only (no torch, no server packages).
from registry.rollout_service.schemas import RolloutState, Strategy
from yolo_ota.commands.common import ConfigPath, console, fail, load
from yolo_ota.rollout_tables import add_row, print_detail, wave_position, when
from yolo_ota.settings import DEFAULT_ROLLOUT_SERVER, RolloutSettings

if TYPE_CHECKING:
    import httpx

rollout_app = typer.Typer(help="Start and steer rollouts through the rollout service.", no_args_is_help=True)

DEFAULT_SERVER = DEFAULT_ROLLOUT_SERVER
REQUEST_TIMEOUT_S = 30.0
_WAVE_SYNTAX = "PERCENT:BAKE_S[:MAX_FAILURE_RATE[:MIN_SUCCESS_RATE]]"


@dataclass(frozen=True)
class WaveArg:
    """One ``--wave``; rates left out take the service's defaults."""

    percent: float
    bake_s: float
    max_failure_rate: float | None = None
    min_success_rate: float | None = None

    def body(self) -> dict[str, float]:
        fields = {
            "percent": self.percent,
            "bake_s": self.bake_s,
            "max_failure_rate": self.max_failure_rate,
            "min_success_rate": self.min_success_rate,
        }
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class PairArg:
    """One ``key=value`` of ``--label`` or ``--fp``."""

    key: str
    value: str


def parse_wave(text: str) -> WaveArg:
    """``10:600`` or ``10:600:0.05:0.95`` (percent of the targeted devices, bake seconds, rates from 0 to 1)."""
    parts = text.split(":")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if not 2 <= len(parts) <= 4 or len(numbers) != len(parts) or not all(math.isfinite(n) for n in numbers):
        raise typer.BadParameter(f"{text!r} is not {_WAVE_SYNTAX} (numbers), e.g. 10:600 or 10:600:0.05:0.95")
    return WaveArg(*numbers)


def parse_pair(text: str) -> PairArg:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"{text!r} is not key=value, e.g. line=smt-3")
    return PairArg(key.strip(), value.strip())


Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        help=f"Rollout service URL (YOLO_OTA_SERVER, [rollout] server; default {DEFAULT_SERVER}).",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token", help="Operator token, sent as a bearer token (YOLO_OTA_TOKEN, [rollout] token).", show_default=False
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the service's JSON answer instead of tables.")]
Reason = Annotated[str, typer.Option(help="Why; kept in the service's audit log.")]
RolloutId = Annotated[int, typer.Argument(help="Rollout id (see `yolo-ota rollout list`).", min=1)]


def call_service(
    target: RolloutSettings,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, str | int] | None = None,
) -> Any:
    """One request to the service; its decoded JSON answer, or an ``error:`` line and exit status 2."""
    import httpx

    server, token = target.server, target.token
    base = server.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise fail(f"--server must be an http:// or https:// URL, got {server!r}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(
            method, base + path, json=body, params=params, headers=headers, timeout=REQUEST_TIMEOUT_S
        )
    except httpx.InvalidURL as exc:
        raise fail(f"--server {server!r} is not a usable URL ({exc})") from None
    except httpx.TimeoutException:
        raise fail(f"rollout service at {base} is unreachable (no answer within {REQUEST_TIMEOUT_S:g} s)") from None
    except httpx.TransportError as exc:
        raise fail(f"rollout service at {base} is unreachable ({str(exc) or type(exc).__name__})") from None
    if response.is_error:
        raise fail(f"HTTP {response.status_code}: {_error_detail(response)}")
    try:
        return response.json()
    except ValueError:
        raise fail(f"the answer of {base}{path} is not JSON; is {base} the rollout service?") from None


def service_target(server: str | None, token: str | None, config: Any) -> RolloutSettings:
    """The service to call and the token to call it with: flags, YOLO_OTA_SERVER/YOLO_OTA_TOKEN, [rollout]."""
    return load(RolloutSettings, config, server=server, token=token)


def _error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = str(detail) if detail is not None else response.text or response.reason_phrase
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= 500 else one_line[:497] + "..."


def _mapping(pairs: list[PairArg] | None, option: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for pair in pairs or []:
        if found.get(pair.key, pair.value) != pair.value:
            raise typer.BadParameter(f"{pair.key!r} is given twice, with different values", param_hint=option)
        found[pair.key] = pair.value
    return found


# -- commands --------------------------------------------------------------------------------------------------


AllowDowngrade = Annotated[
    bool, typer.Option(help="Order devices onto VERSION where it is an older release than the one they run.")
]
ForceGates = Annotated[
    bool, typer.Option(help="Roll VERSION out although its gates failed (recorded; devices run it on this order).")
]


@rollout_app.command()
def create(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to roll out (its gates must have passed).")],
    strategy: Annotated[
        Strategy | None, typer.Option(help="Default: ab with --control-version, else canary.", show_default=False)
    ] = None,
    waves: Annotated[
        list[WaveArg] | None,
        typer.Option(
            "--wave",
            parser=parse_wave,
            metavar="WAVE",
            help=f"A canary wave, {_WAVE_SYNTAX} (repeatable; percents cumulative, up to 100; "
            "default: the service's waves).",
        ),
    ] = None,
    labels: Annotated[
        list[PairArg] | None,
        typer.Option("--label", parser=parse_pair, metavar="KEY=VALUE", help="Target devices with this label."),
    ] = None,
    fingerprint: Annotated[
        list[PairArg] | None,
        typer.Option("--fp", parser=parse_pair, metavar="FIELD=VALUE", help="Target devices by fingerprint field."),
    ] = None,
    control_version: Annotated[str | None, typer.Option(help="A/B test: the version the control arm runs.")] = None,
    split: Annotated[
        float | None, typer.Option(help="A/B test: share of devices on VERSION (default 0.5).", show_default=False)
    ] = None,
    previous_version: Annotated[
        str | None, typer.Option(help="What rollback returns to (default: what the last rollout left).")
    ] = None,
    supersede: Annotated[bool, typer.Option(help="Abort an active rollout of MODEL for the same devices.")] = False,
    allow_downgrade: AllowDowngrade = False,
    force_gates: ForceGates = False,
    reason: Reason = "",
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Start rolling VERSION of MODEL out to the devices that match the selector (all of them by default)."""
    if split is not None and control_version is None:
        raise fail("--split is for an A/B test: give --control-version too")
    body: dict[str, Any] = {
        "model": model, "version": version,
        "strategy": (strategy or (Strategy.ab if control_version else Strategy.canary)).value,
        "selector": {"labels": _mapping(labels, "--label"), "fingerprint": _mapping(fingerprint, "--fp")},
        "supersede": supersede, "allow_downgrade": allow_downgrade, "force_gates": force_gates, "reason": reason,
    }  # fmt: skip
    if waves:
        body["waves"] = [wave.body() for wave in waves]
    if control_version is not None:
        body["ab"] = {"control_version": control_version, "split": 0.5 if split is None else split}
    if previous_version is not None:
        body["previous_version"] = previous_version
    detail = call_service(service_target(server, token, config), "POST", "/v1/rollouts", body=body)
    if as_json:
        console.print_json(data=detail)
        return
    print_detail(console, detail)


@rollout_app.command("list")
def list_rollouts(
    model: Annotated[str | None, typer.Option(help="Only rollouts of this registered model.")] = None,
    state: Annotated[RolloutState | None, typer.Option(help="Only rollouts in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1, max=1000)] = 100,
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """List rollouts, newest first."""
    params: dict[str, str | int] = {"limit": limit}
    if model is not None:
        params["model"] = model
    if state is not None:
        params["state"] = state.value
    answer = call_service(service_target(server, token, config), "GET", "/v1/rollouts", params=params)
    if as_json:
        console.print_json(data=answer)
        return
    rollouts = answer["rollouts"]
    if not rollouts:
        console.print("no rollouts match")
        return
    table = Table(title="Rollouts", title_justify="left")
    for column in ("id", "model", "version", "previous", "strategy", "state", "wave", "created by", "created at"):
        table.add_column(column, justify="right" if column == "id" else "left")
    for r in rollouts:
        fields = [r[key] for key in ("id", "model", "version", "previous_version", "strategy", "state")]
        add_row(table, *fields, wave_position(r), r["created_by"], when(r["created_at"]))
    console.print(table)


@rollout_app.command()
def show(
    rollout_id: RolloutId,
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Show one rollout: its waves, its arms' telemetry, and which devices it targets or skips."""
    detail = call_service(service_target(server, token, config), "GET", f"/v1/rollouts/{rollout_id}")
    if as_json:
        console.print_json(data=detail)
        return
    print_detail(console, detail)


_ACTIONS = {
    "pause": "Pause a running rollout: no wave advances and no device starts the new version until resumed.",
    "resume": "Resume a paused or halted rollout; the current wave's bake time starts again.",
    "abort": "Abort a rollout: devices that did not take the new version yet never will.",
    "rollback": "Roll back: every targeted device returns to the previous (or A/B control) version.",
    "approve": "Approve a promotion waiting for approval: it starts at its first wave now (operate scope).",
    "reject": "Reject a promotion waiting for approval: it never reaches a device (operate scope).",
}


def _action_command(action: str) -> None:
    def command(
        rollout_id: RolloutId,
        reason: Reason = "",
        server: Server = None,
        token: Token = None,
        config: ConfigPath = None,
        as_json: AsJson = False,
    ) -> None:
        detail = call_service(
            service_target(server, token, config),
            "POST",
            f"/v1/rollouts/{rollout_id}/{action}",
            body={"reason": reason},
        )
        if as_json:
            console.print_json(data=detail)
            return
        line = f"rollout {detail['id']} ({detail['model']} version {detail['version']}) is now {detail['state']}"
        back_to = (detail.get("ab") or {}).get("control_version") or detail.get("previous_version")
        if detail["state"] == RolloutState.rolled_back and back_to:
            line += f"; its devices return to version {back_to}"
        console.print(line, markup=False, soft_wrap=True)

    command.__doc__ = _ACTIONS[action]
    command.__name__ = f"{action}_rollout"
    rollout_app.command(action)(command)


for _action in _ACTIONS:
    _action_command(_action)
