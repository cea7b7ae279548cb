"""``yolo-ota rollout`` against a real rollout service (uvicorn, SQLite) and a real MLflow, run as a subprocess."""

from __future__ import annotations

import json
import re
from itertools import count

import httpx
import pytest
from servers import ENROLLMENT_TOKEN, OPERATOR_TOKEN

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from yolo_ota.processes import RunningServer, free_port

# The bake time keeps a wave from passing by itself: with no devices enrolled, a wave succeeds once baked.
LONG_BAKE_S = 3600
_selectors = count(1)


@pytest.fixture(scope="module")
def service(module_service: RunningServer) -> RunningServer:
    return module_service


@pytest.fixture
def rollout(cli, service: RunningServer):
    """Run ``yolo-ota rollout ARGS... --server URL --token OPERATOR_TOKEN``."""

    def run(*args: str, token: str = OPERATOR_TOKEN):
        return cli("rollout", *args, "--server", service.url, "--token", token)

    return run


def _ok(done) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def _one_line_error(done, *fragments: str) -> str:
    assert done.returncode == 2, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


def _label() -> str:
    """A selector no other test uses, so that no two tests' active rollouts conflict."""
    return f"line=cli-{next(_selectors)}"


def _create(rollout, fleet_model: dict[str, str], *args: str) -> dict:
    done = rollout("create", fleet_model["model"], fleet_model["good"], "--json", *args)
    return json.loads(_ok(done))


def _table_rows(text: str, title: str) -> list[list[str]]:
    """The cells of each body row of the rich table titled ``title`` in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("└"):
            return rows
        if line.lstrip().startswith("│"):
            rows.append([cell.strip() for cell in line.strip().strip("│").split("│")])
    raise AssertionError(f"table {title!r} does not end:\n{text}")


def test_create_canary_then_show_lists_both_waves(rollout, fleet_model) -> None:
    label = _label()
    done = rollout(
        "create",
        fleet_model["model"],
        fleet_model["good"],
        "--strategy",
        "canary",
        "--wave",
        f"25:{LONG_BAKE_S}:0.2",
        "--wave",
        f"100:{LONG_BAKE_S}:0.05:0.95",
        "--label",
        label,
        "--reason",
        "first canary [line 3]",
    )
    created = _ok(done)
    match = re.search(r"^rollout (\d+): pcb-line version (\d+) \(canary\), running, wave 1/2", created, re.M)
    assert match, created
    assert match.group(2) == fleet_model["good"]
    assert "first canary [line 3]" in created  # printed as text, not taken for rich markup

    shown = _ok(rollout("show", match.group(1)))
    assert f"rollout {match.group(1)}: " in shown and ", running, " in shown
    assert label in shown
    waves = _table_rows(shown, "Waves")
    assert [row[:4] for row in waves] == [["1", "25%", "1h", "baking"], ["2", "100%", "1h", "waiting"]], shown
    assert "halt above 20% failed, advance at 90% ok" in waves[0][-1]
    assert "halt above 5% failed, advance at 95% ok" in waves[1][-1]
    arms = _table_rows(shown, "Arms (latency in ms)")
    assert [row[:2] for row in arms] == [["treatment", fleet_model["good"]]], shown
    assert "targeted 0 device(s); skipped 0 as incompatible" in shown


def test_show_reports_a_device_and_its_telemetry(rollout, fleet_model, service) -> None:
    label = _label()
    device_id = f"cam-{label.partition('=')[2]}"
    enrolled = httpx.post(
        f"{service.url}/v1/devices/enroll",
        json=enrollment_body(
            DeviceKey.generate(),
            device_id,
            fingerprint=collect().model_dump(mode="json"),
            labels={"line": label.partition("=")[2]},
            enrollment_token=ENROLLMENT_TOKEN,
        ),
        timeout=30,
    )
    assert enrolled.status_code == 200, enrolled.text
    created = _create(rollout, fleet_model, "--wave", f"100:{LONG_BAKE_S}", "--label", label)
    version = fleet_model["good"]
    reported = httpx.post(
        f"{service.url}/v1/devices/{device_id}/reports",
        headers={"Authorization": f"Bearer {enrolled.json()['device_token']}"},
        json={
            "events": [{"state": "committed", "version": version, "rollout_id": created["id"], "ok": True}],
            "telemetry": {
                "version": version,
                "inferences": 1000,
                "errors": 5,
                "latency_ms": {"p50": 12.5, "p99": 40},
                "detections_per_image": 3.25,
                "mean_confidence": 0.75,
            },
        },
        timeout=30,
    )
    assert reported.status_code == 200, reported.text

    shown = _ok(rollout("show", str(created["id"])))
    assert "targeted 1 device(s); skipped 0 as incompatible" in shown
    assert [row[4:8] for row in _table_rows(shown, "Waves")] == [["1", "1", "0", "0"]], shown
    arms = _table_rows(shown, "Arms (latency in ms)")
    assert arms == [["treatment", version, "1", "1", "0", "1000", "5", "0.50%", "12.5", "40.0", "3.25", "0.750"]]
    _ok(rollout("abort", str(created["id"])))


def test_list_shows_the_rollout_and_filters_by_state(rollout, fleet_model) -> None:
    created = _create(rollout, fleet_model, "--wave", f"100:{LONG_BAKE_S}", "--label", _label())
    rows = _table_rows(_ok(rollout("list", "--model", fleet_model["model"])), "Rollouts")
    row = next(r for r in rows if r[0] == str(created["id"]))
    assert row[1:7] == ["pcb-line", fleet_model["good"], "-", "canary", "running", "1/1"], row
    assert row[7] == "operator:tester"

    _ok(rollout("abort", str(created["id"])))
    running = _table_rows(_ok(rollout("list", "--state", "running")), "Rollouts")
    assert str(created["id"]) not in [r[0] for r in running]
    aborted = _table_rows(_ok(rollout("list", "--state", "aborted")), "Rollouts")
    assert str(created["id"]) in [r[0] for r in aborted]


def test_pause_resume_abort_then_pause_is_a_conflict(rollout, fleet_model) -> None:
    rollout_id = str(_create(rollout, fleet_model, "--wave", f"100:{LONG_BAKE_S}", "--label", _label())["id"])
    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        out = _ok(rollout(action, rollout_id, "--reason", f"test {action}"))
        assert f"rollout {rollout_id} (pcb-line version {fleet_model['good']}) is now {state}" in out, out
        shown = json.loads(_ok(rollout("show", rollout_id, "--json")))
        assert shown["state"] == state

    _one_line_error(rollout("pause", rollout_id), "HTTP 409", f"rollout {rollout_id} is aborted")


def test_rollback_returns_to_the_previous_version(rollout, fleet_model) -> None:
    label = _label()
    # Rolling good (release 1) out where better (release 2) runs is a downgrade: the operator says so.
    created = _create(
        rollout, fleet_model, "--previous-version", fleet_model["better"], "--label", label, "--allow-downgrade"
    )
    assert created["previous_version"] == fleet_model["better"] and created["allow_downgrade"] is True
    out = _ok(rollout("rollback", str(created["id"])))
    assert f"is now rolled_back; its devices return to version {fleet_model['better']}" in out, out

    without_previous = _create(rollout, fleet_model, "--label", _label())
    _one_line_error(rollout("rollback", str(without_previous["id"])), "HTTP 409", "no previous version")


def test_ab_test_shows_both_arms(rollout, fleet_model) -> None:
    done = rollout(
        "create",
        fleet_model["model"],
        fleet_model["better"],
        "--control-version",
        fleet_model["good"],
        "--split",
        "0.25",
        "--label",
        _label(),
    )
    out = _ok(done)
    assert f"(ab, control version {fleet_model['good']} on 75%)" in out, out
    arms = _table_rows(out, "Arms (latency in ms)")
    assert [row[:2] for row in arms] == [["treatment", fleet_model["better"]], ["control", fleet_model["good"]]]


def test_second_rollout_for_the_same_devices_needs_supersede(rollout, fleet_model) -> None:
    label = _label()
    first = _create(rollout, fleet_model, "--label", label)
    _one_line_error(
        rollout("create", fleet_model["model"], fleet_model["better"], "--label", label), "HTTP 409", "supersede"
    )
    second = _create(rollout, fleet_model, "--label", label, "--supersede")
    assert json.loads(_ok(rollout("show", str(first["id"]), "--json")))["state"] == "aborted"
    assert second["state"] == "running"


def test_json_output_parses(rollout, fleet_model) -> None:
    created = _create(rollout, fleet_model, "--wave", f"50:{LONG_BAKE_S}", "--wave", "100:0", "--fp", "arch=x86_64")
    assert created["selector"] == {"labels": {}, "fingerprint": {"arch": "x86_64"}}
    assert [w["percent"] for w in created["waves"]] == [50, 100]
    assert [w["state"] for w in created["wave_progress"]] == ["baking", "waiting"]
    listed = json.loads(_ok(rollout("list", "--json")))
    assert created["id"] in [r["id"] for r in listed["rollouts"]]
    shown = json.loads(_ok(rollout("show", str(created["id"]), "--json")))
    assert shown["id"] == created["id"]
    paused = json.loads(_ok(rollout("pause", str(created["id"]), "--json", "--reason", "json")))
    assert paused["state"] == "paused"
    _ok(rollout("abort", str(created["id"])))


def test_version_that_failed_its_gates_is_refused(rollout, fleet_model) -> None:
    _one_line_error(
        rollout("create", fleet_model["model"], fleet_model["failed"], "--label", _label()),
        "HTTP 422",
        "did not pass its gates",
    )


def test_invalid_rollout_is_refused_by_the_service(rollout, fleet_model) -> None:
    _one_line_error(
        rollout("create", fleet_model["model"], fleet_model["good"], "--wave", "50:0", "--label", _label()),
        "HTTP 422",
        "last wave must reach 100 percent",
    )


def test_unknown_rollout_is_not_found(rollout, service) -> None:
    _one_line_error(rollout("show", "987654"), "HTTP 404", "no rollout 987654")


def test_wrong_token_is_refused(rollout) -> None:
    _one_line_error(rollout("list", token="not-the-operator-token"), "HTTP 401", "not an operator token")


def test_server_and_token_from_the_environment(cli, service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_OTA_SERVER", service.url)
    monkeypatch.setenv("YOLO_OTA_TOKEN", OPERATOR_TOKEN)
    assert "rollouts" in json.loads(_ok(cli("rollout", "list", "--json")))
    monkeypatch.delenv("YOLO_OTA_TOKEN")
    _one_line_error(cli("rollout", "list"), "HTTP 401", "missing bearer token")


def test_unreachable_server(cli) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = _one_line_error(cli("rollout", "list", "--server", url, "--token", "t"), "unreachable")
    assert f"rollout service at {url} is unreachable" in line


def test_server_that_is_not_a_url(cli) -> None:
    _one_line_error(cli("rollout", "show", "1", "--server", "127.0.0.1:8700"), "http:// or https://")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--wave", "10"), "'10' is not PERCENT:BAKE_S"),
        (("--wave", "ten:60"), "'ten:60' is not PERCENT:BAKE_S"),
        (("--wave", "10:60:0.1:0.9:7"), "is not PERCENT:BAKE_S"),
        (("--wave", "nan:60"), "is not PERCENT:BAKE_S"),
        (("--label", "line"), "'line' is not key=value"),
        (("--fp", "=x86_64"), "'=x86_64' is not key=value"),
        (("--label", "line=a", "--label", "line=b"), "'line' is given twice"),
    ],
)
def test_bad_option_syntax_is_a_usage_error(cli, args: tuple[str, ...], message: str) -> None:
    # No server listens there: a usage error must be found before any request.
    url = f"http://127.0.0.1:{free_port()}"
    done = cli("rollout", "create", "pcb-line", "1", *args, "--server", url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join(done.stderr.replace("│", " ").split()), done.stderr  # unwrap rich's error box
    assert "unreachable" not in done.stderr and "Traceback" not in done.stderr


def test_split_without_control_version(cli) -> None:
    _one_line_error(cli("rollout", "create", "pcb-line", "1", "--split", "0.3"), "--split", "--control-version")


def test_help_lists_the_subcommands(cli) -> None:
    out = _ok(cli("rollout", "--help"))
    for name in ("create", "list", "show", "pause", "resume", "abort", "rollback"):
        assert re.search(rf"^\W*{name}\b", out, re.M), out
