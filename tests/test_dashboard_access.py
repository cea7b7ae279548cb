"""The dashboard's decisions in a real browser (Debian's Chromium, driven by Selenium through its chromedriver)
against a live service and MLflow: approve a promotion that waits, accept or reject device keys, and a read-only
token refused with the service's reason on the page.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import CHROMIUM, CHROMIUM_FLAGS
from fleet import Fleet
from servers import OPERATOR_TOKEN, mlflow_client

from exporters.device_identity import DeviceKey, enrollment_body
from exporters.fingerprint import collect
from yolo_ota.processes import RunningServer

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="Chromium and chromedriver are not installed"
)
MODEL = "pcb-line"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_window_size(1400, 1600)
    yield driver
    driver.quit()


def _enroll(fleet: Fleet, key: DeviceKey, device_id: str, token: str | None) -> httpx.Response:
    body = enrollment_body(key, device_id, fingerprint=collect().model_dump(mode="json"), enrollment_token=token)
    return fleet.http.post("/v1/devices/enroll", json=body)


def _open(browser: Any, fleet: Fleet, token: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{fleet.url}/ui#token={token}")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element("css selector", "body").get_attribute("data-state") == "ready"
    )


def _click(browser: Any, kind: str, id_: str, action: str, *, confirm: bool = False) -> None:
    """Click the button, again if the page redrew it between finding and clicking (it redraws every 3 s)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    selector = f'button.decide[data-kind="{kind}"][data-id="{id_}"][data-action="{action}"]'

    def clicked(driver: Any) -> bool:
        try:
            driver.find_element("css selector", selector).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    WebDriverWait(browser, 30).until(clicked)
    if confirm:
        WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).accept()


def test_a_person_decides_on_keys_and_promotions_from_the_dashboard(
    approval_fleet: Fleet, browser: Any, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> None:
    fleet = approval_fleet
    victim = fleet.enroll("ui-victim")  # the Fleet's own key for it
    assert _enroll(fleet, DeviceKey.generate(), "ui-victim", None).status_code == 202  # another key asks for it
    strict = fleet.op("POST", "/v1/enrollment-tokens", json={"name": "ui-strict"}, expect=201)["token"]
    assert _enroll(fleet, DeviceKey.generate(), "ui-new", strict).status_code == 202  # a new id that waits
    mlflow_client(mlflow_server).set_registered_model_alias(MODEL, "production", fleet_model["better"])
    waiting = fleet.wait_for(
        "the waiting promotion",
        lambda: [r for r in fleet.op("GET", "/v1/rollouts")["rollouts"] if r["state"] == "waiting_for_approval"],
    )[0]

    _open(browser, fleet, OPERATOR_TOKEN)
    _click(browser, "device", "ui-victim", "reject")
    fleet.wait_for(
        "the key request dropped", lambda: fleet.op("GET", "/v1/devices/ui-victim")["key_change_requested_at"] is None
    )
    assert fleet.poll(victim, conditional=False) == 200  # the real device is still served
    _click(browser, "device", "ui-new", "accept", confirm=True)
    fleet.wait_for("ui-new accepted", lambda: fleet.op("GET", "/v1/devices/ui-new")["status"] == "accepted")
    _click(browser, "rollout", str(waiting["id"]), "approve")
    fleet.wait_for("the approval", lambda: fleet.rollout(waiting["id"])["state"] == "running")
    assert "approve" in [e["action"] for e in fleet.audit(waiting["id"])]

    # A read-only token sees the buttons, and the service's refusal when one is pressed.
    mlflow_client(mlflow_server).set_registered_model_alias(MODEL, "production", fleet_model["newest"])
    second = fleet.wait_for(
        "the next waiting promotion",
        lambda: [r for r in fleet.op("GET", "/v1/rollouts")["rollouts"] if r["state"] == "waiting_for_approval"],
    )[0]
    reader = fleet.op("POST", "/v1/tokens", json={"name": "ui-reader", "scope": "read"}, expect=201)["token"]
    _open(browser, fleet, reader)
    _click(browser, "rollout", str(second["id"]), "reject", confirm=True)
    from selenium.webdriver.support.ui import WebDriverWait

    banner = WebDriverWait(browser, 15).until(lambda d: d.find_element("id", "banner").text or None)
    assert "403" in banner and "operate" in banner, banner
    assert fleet.rollout(second["id"])["state"] == "waiting_for_approval"
