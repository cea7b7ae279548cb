"""The agent's limits in process: the image header check, the decode slots, the bounds on what the service sends,
and the settings that set them (the agent processes that enforce them are in ``test_agent_hardening.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from images import png_bomb
from pydantic import ValidationError

from edge_agent.bounds import MAX_NAME_CHARS, check_desired, clamp_poll_interval_s
from edge_agent.errors import AgentSettingsError, DetectBusy, ImageRefused, ServiceAnswerError
from edge_agent.image_limits import DecodeSlots, check_pixels, image_size
from edge_agent.protocol import DesiredFile, DesiredState
from edge_agent.settings import load_settings

REQUIRED = {"server": "http://127.0.0.1:1", "device_id": "cam-1"}


def test_the_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    bomb = png_bomb(20_000, 20_000)  # 1.2 GB decoded; over twice Pillow's own limit too
    started = time.perf_counter()
    with pytest.raises(ImageRefused, match="too large"):
        check_pixels(bomb, 36_000_000)
    assert image_size(png_bomb(12_000, 9_000)) == (12_000, 9_000)
    with pytest.raises(ImageRefused, match="12000 x 9000 = 108000000 pixels; max_image_pixels is 36000000"):
        check_pixels(png_bomb(12_000, 9_000), 36_000_000)
    assert check_pixels(png_bomb(3840, 2160), 36_000_000) == (3840, 2160)  # 4K passes the default
    assert time.perf_counter() - started < 30  # building the bombs; the checks themselves decode nothing
    for junk in (b"not an image at all", b"GIF89a" + bytes(20), png_bomb(64, 64)[:20]):
        with pytest.raises(ValueError, match="header can be read"):
            image_size(junk)


def test_decode_slots_turn_away_after_a_bounded_wait() -> None:
    slots = DecodeSlots(1, 0.2)
    with slots.hold():
        started = time.perf_counter()
        with pytest.raises(DetectBusy, match="all 1 detect slots"), slots.hold():
            pass
        assert 0.19 <= time.perf_counter() - started < 2
    with slots.hold():  # released
        pass


def test_service_values_are_bounded() -> None:
    assert clamp_poll_interval_s(0, 1.0, 3600.0) == 1.0
    assert clamp_poll_interval_s(-5, 1.0, 3600.0) == 1.0
    assert clamp_poll_interval_s(10**9, 1.0, 3600.0) == 3600.0
    assert clamp_poll_interval_s(30, 1.0, 3600.0) == 30
    with pytest.raises(ServiceAnswerError, match=f"version is {MAX_NAME_CHARS + 1} characters"):
        check_desired(DesiredState(model="m", version="9" * (MAX_NAME_CHARS + 1)))
    file = {"path": "a", "url": "http://h/a", "sha256": "0" * 64, "bytes": 1}
    DesiredFile.model_validate(file)
    for bad in ({"url": "file:///etc/passwd"}, {"url": "http://h/" + "a" * 9000}, {"path": ""}, {"bytes": -1}):
        with pytest.raises(ValidationError):
            DesiredFile.model_validate({**file, **bad})


def test_the_api_token_comes_from_a_file_and_must_be_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("YOLO_OTA_AGENT_CONFIG", str(tmp_path / "empty.toml"))
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-local-token\n")
    settings = load_settings(data_dir=tmp_path, api_token_file=token_file, **REQUIRED)
    assert settings.api_token == "a-long-enough-local-token"
    assert load_settings(data_dir=tmp_path, **REQUIRED).api_token is None  # off by default
    with pytest.raises(AgentSettingsError, match=r"--api-token .*at least 16 characters"):
        load_settings(data_dir=tmp_path, api_token="short", **REQUIRED)
    with pytest.raises(AgentSettingsError, match="min_poll_interval_s is above max_poll_interval_s"):
        load_settings(data_dir=tmp_path, min_poll_interval_s=10, max_poll_interval_s=5, **REQUIRED)
