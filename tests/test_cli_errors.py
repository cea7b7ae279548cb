"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback (real console command)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _one_line_error(done, *fragments: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("•")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_missing_weights_file(cli, tmp_path: Path) -> None:
    _one_line_error(cli("export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")), "does not exist")


def test_unreadable_weights_file(cli, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    _one_line_error(cli("export", str(bad), "--out", str(tmp_path / "b")), "cannot load", "garbage.pt")


def test_unknown_model_suffix(cli, tmp_path: Path) -> None:
    _one_line_error(cli("export", "model.onnx", "--out", str(tmp_path / "b")), ".pt weights file or a .yaml")


def test_missing_config(cli, tmp_path: Path) -> None:
    _one_line_error(cli("export", "yolov99z.yaml", "--out", str(tmp_path / "b")), "yolov99z.yaml")


@pytest.mark.parametrize(("config", "task"), [("yolov8n-seg.yaml", "segment"), ("yolov8n-cls.yaml", "classify")])
def test_task_other_than_detect(cli, tmp_path: Path, config: str, task: str) -> None:
    _one_line_error(
        cli("export", config, "--imgsz", "64", "--out", str(tmp_path / "b")),
        f"'{task}' model",
        "supported tasks: detect",
    )


def test_image_size_not_a_multiple_of_the_stride(cli, tmp_path: Path) -> None:
    _one_line_error(
        cli("export", "yolov8n.yaml", "--imgsz", "100", "--out", str(tmp_path / "b")),
        "100 is not a multiple of the model stride 32",
        "96 or 128",
    )


def test_output_directory_not_empty(cli, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(cli("export", "yolov8n.yaml", "--imgsz", "64", "--out", str(out)), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_variant(cli, tmp_path: Path) -> None:
    _one_line_error(
        cli("export", "yolov8n.yaml", "--variants", "tpu-int8", "--out", str(tmp_path / "b")), "unknown variant"
    )


def test_bad_image_size_text(cli, tmp_path: Path) -> None:
    done = cli("export", "yolov8n.yaml", "--imgsz", "big", "--out", str(tmp_path / "b"))
    assert done.returncode == 2
    assert "not an image size" in done.stderr
    assert "Traceback" not in done.stderr


def test_gate_on_a_folder_that_is_not_a_bundle(cli, tmp_path: Path) -> None:
    _one_line_error(cli("gate", str(tmp_path)), "no manifest.json")
    _one_line_error(cli("inspect", str(tmp_path / "absent")), "not a directory")


def test_invalid_manifest(cli, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": 3}')
    _one_line_error(cli("inspect", str(tmp_path)), "not a valid manifest")


def test_gate_on_cuda_without_cuda(cli, trained_bundle: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(cli("gate", str(trained_bundle), "--device", "cuda"), "no working CUDA device")


def test_every_command_has_help(cli) -> None:
    for command in ([], ["export"], ["gate"], ["inspect"], ["config", "show"]):
        done = cli(*command, "--help")
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout


def test_inspect_prints_the_manifest(cli, trained_bundle: Path) -> None:
    done = cli("inspect", str(trained_bundle))
    assert done.returncode == 0, done.stderr
    for text in ("pcb-parts", "0:chip", "1:capacitor", "golden.npz", "cpu-fp32", "all files verified"):
        assert text in done.stdout


def _every_command(group, path: tuple[str, ...] = ()):
    yield path
    if hasattr(group, "commands"):  # a group (of Typer's own copy of click)
        for name, command in group.commands.items():
            yield from _every_command(command, (*path, name))


def test_no_help_line_ends_in_a_stray_period() -> None:
    """A default meant for the help text must not vanish, leaving "... ." (rich markup eats [brackets])."""
    import re

    import typer
    from typer.testing import CliRunner

    from yolo_ota.cli import app

    runner = CliRunner()
    commands = list(_every_command(typer.main.get_command(app)))
    assert ("config", "show") in commands and ("rollout", "create") in commands
    broken = re.compile(r"(\s\.|\(\s*\)|\[\s*\]|\[default:\s*\])$")
    for command in commands:
        done = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert done.exit_code == 0, (command, done.output)
        for line in done.output.splitlines():
            text = line.strip(" │╭╮╰╯─")
            assert not broken.search(text), f"yolo-ota {' '.join(command)} --help: {line.strip()!r}"


def test_a_command_without_its_extra_names_the_extra(trained_bundle: Path, tmp_path: Path) -> None:
    # A device that installed the core only: ``torch`` cannot be imported (a stand-in module refuses to load).
    blocked = tmp_path / "without-torch"
    blocked.mkdir()
    (blocked / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    exe = Path(sys.executable).parent / "yolo-ota"
    done = subprocess.run(
        [str(exe), "gate", str(trained_bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(blocked), "COLUMNS": "160"},
    )
    _one_line_error(done, "needs torch", "yolo-ota[gate]")
