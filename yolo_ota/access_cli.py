"""``yolo-ota devices``, ``yolo-ota tokens`` and ``yolo-ota enrollment-tokens``: who may act, through the rollout
service's REST API (the ``admin`` scope, except ``devices list|show``, which any operator token may read).

Like ``yolo-ota rollout``, each sub-command makes one request and prints a table, or the raw JSON with ``--json``.
A token that ``create`` makes is printed once, on stdout alone, so that ``> file`` keeps it; the service keeps only
its sha256.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from registry.rollout_service.token_entries import Scope
from yolo_ota.commands.common import ConfigPath, console, err_console
from yolo_ota.rollout_cli import AsJson, Server, Token, call_service, service_target
from yolo_ota.rollout_tables import add_row, when

devices_app = typer.Typer(
    help="List devices and decide on their keys: accept, reject, decommission.", no_args_is_help=True
)
tokens_app = typer.Typer(help="Operator tokens: create (shown once), list, revoke.", no_args_is_help=True)
enrollment_app = typer.Typer(help="Enrollment tokens, which admit new device ids.", no_args_is_help=True)

DeviceId = Annotated[str, typer.Argument(help="Device id.")]
Name = Annotated[str, typer.Argument(help="The token's name.")]
ExpiresIn = Annotated[
    float | None, typer.Option("--expires-in-s", help="Seconds until it stops working (default: until revoked).")
]


def _print(answer: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        console.print_json(data=answer)
    elif table is not None:
        console.print(table)


# -- devices ---------------------------------------------------------------------------------------------------


@devices_app.command("list")
def list_devices(
    waiting: Annotated[bool, typer.Option(help="Only devices waiting for a decision (a new id, another key).")] = False,
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """List enrolled devices with their standing; --waiting shows what needs a decision."""
    params: dict[str, str | int] = {"waiting": str(waiting).lower(), "limit": 10_000}
    answer = call_service(service_target(server, token, config), "GET", "/v1/devices", params=params)
    table = Table(title=f"Devices ({answer['total']})", title_justify="left")
    for column in ("device", "status", "another key waits since", "labels", "version", "state", "last seen"):
        table.add_column(column)
    for d in answer["devices"]:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        waits = when(d["key_change_requested_at"]) if d.get("key_change_requested_at") else ""
        add_row(
            table, d["device_id"], d["status"], waits, labels, d["current_version"], d["state"], when(d["last_seen_at"])
        )
    _print(answer, as_json, table)


@devices_app.command()
def show(device_id: DeviceId, server: Server = None, token: Token = None, config: ConfigPath = None) -> None:
    """Show one device as the service knows it (JSON)."""
    console.print_json(data=call_service(service_target(server, token, config), "GET", f"/v1/devices/{device_id}"))


def _decision(action: str, doc: str) -> None:
    def command(
        device_id: DeviceId,
        server: Server = None,
        token: Token = None,
        config: ConfigPath = None,
        as_json: AsJson = False,
    ) -> None:
        answer = call_service(service_target(server, token, config), "POST", f"/v1/devices/{device_id}/{action}")
        if as_json:
            console.print_json(data=answer)
            return
        console.print(f"device {device_id}: {_DONE[action]} {answer['done']}", markup=False)

    command.__doc__ = doc
    command.__name__ = f"{action}_device"
    devices_app.command(action)(command)


_DONE = {"accept": "accepted", "reject": "rejected", "decommission": "decommissioned;"}
for _action, _doc in (
    ("accept", "Accept a pending id, or the key waiting for a known id (its old key and token stop working)."),
    ("reject", "Reject the key waiting for a known id (the device keeps its own), or a pending id."),
    ("decommission", "Retire a device: its token stops working on every replica and it cannot enroll again."),
):
    _decision(_action, _doc)


# -- tokens ----------------------------------------------------------------------------------------------------


def _token_table(title: str, tokens: list[dict[str, Any]], extra: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("name", extra, "from", "active", "created", "by", "expires", "revoked"):
        table.add_column(column)
    for t in tokens:
        add_row(
            table, t["name"], t.get(extra.replace(" ", "_")) or "", t["source"], "yes" if t["active"] else "no",
            when(t["created_at"]), t["created_by"] or "", when(t["expires_at"]) if t["expires_at"] else "",
            when(t["revoked_at"]) if t["revoked_at"] else "",
        )  # fmt: skip
    return table


def _created(answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        console.print_json(data=answer)
        return
    err_console.print(f"token {answer['name']!r} made; it is shown this once:")
    typer.echo(answer["token"])


@tokens_app.command("create")
def create_token(
    name: Name,
    scope: Annotated[Scope, typer.Option(help="read: look; operate: start and steer rollouts; admin: all.")],
    expires_in_s: ExpiresIn = None,
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Make an operator token."""
    body = {"name": name, "scope": scope.value, "expires_in_s": expires_in_s}
    _created(call_service(service_target(server, token, config), "POST", "/v1/tokens", body=body), as_json)


@tokens_app.command("list")
def list_tokens(server: Server = None, token: Token = None, config: ConfigPath = None, as_json: AsJson = False) -> None:
    """List operator tokens by name (never the tokens themselves)."""
    answer = call_service(service_target(server, token, config), "GET", "/v1/tokens")
    _print(answer, as_json, _token_table("Operator tokens", answer["tokens"], "scope"))


@tokens_app.command("revoke")
def revoke_token(name: Name, server: Server = None, token: Token = None, config: ConfigPath = None) -> None:
    """Revoke the operator tokens named NAME, on every replica within the state-check interval."""
    answer = call_service(service_target(server, token, config), "POST", f"/v1/tokens/{name}/revoke")
    console.print(f"revoked {answer['revoked']} operator token(s) named {name!r}", markup=False)


@enrollment_app.command("create")
def create_enrollment_token(
    name: Name,
    auto_accept: Annotated[
        str | None, typer.Option(help="Shell pattern of device ids accepted at once (default: every id waits).")
    ] = None,
    expires_in_s: ExpiresIn = None,
    server: Server = None,
    token: Token = None,
    config: ConfigPath = None,
    as_json: AsJson = False,
) -> None:
    """Make an enrollment token for new device ids."""
    body = {"name": name, "auto_accept": auto_accept, "expires_in_s": expires_in_s}
    _created(call_service(service_target(server, token, config), "POST", "/v1/enrollment-tokens", body=body), as_json)


@enrollment_app.command("list")
def list_enrollment_tokens(
    server: Server = None, token: Token = None, config: ConfigPath = None, as_json: AsJson = False
) -> None:
    """List enrollment tokens by name."""
    answer = call_service(service_target(server, token, config), "GET", "/v1/enrollment-tokens")
    _print(answer, as_json, _token_table("Enrollment tokens", answer["tokens"], "auto accept"))


@enrollment_app.command("revoke")
def revoke_enrollment_token(name: Name, server: Server = None, token: Token = None, config: ConfigPath = None) -> None:
    """Revoke an enrollment token: it admits no new id from now on (enrolled devices are not affected)."""
    call_service(service_target(server, token, config), "POST", f"/v1/enrollment-tokens/{name}/revoke")
    console.print(f"revoked enrollment token {name!r}", markup=False)
