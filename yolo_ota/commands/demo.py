"""``yolo-ota demo``: the whole loop on one machine (``yolo_ota.demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from yolo_ota.commands.common import console, err_console, fail


def demo(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="An empty folder to keep logs, databases and bundles in; default: a temporary one, removed."),
    ] = None,
    devices: Annotated[int, typer.Option(min=2, max=16, help="Agent processes in the fleet.")] = 4,
    imgsz: Annotated[
        int, typer.Option(min=64, max=640, help="Input size of the exported models (trained at 160).")
    ] = 160,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the stack up after the story, until Ctrl-C, to explore it.")
    ] = False,
) -> None:
    """Run the whole loop on this machine: MLflow, the rollout service and a fleet of agents, with detectors
    trained on synthetic PCB scenes (once; then cached): v1 to all, v2 by canary with fleet analysis, an A/B test
    with a computed winner, a v3 that misses a class (refused by shadow validation) and a slower v4 (halted by
    the fleet analysis). Exit 1 if a claim did not hold."""
    import signal

    from exporters.errors import ExportError
    from registry.errors import RegistryError
    from yolo_ota.demo.story import Demo, DemoOptions
    from yolo_ota.errors import DemoError

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    options = DemoOptions(data_dir=data_dir, devices=devices, imgsz=imgsz, keep_running=keep_running)
    try:
        code = Demo(options, console).run()
    except (DemoError, ExportError, RegistryError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print("stopped; every process of the demo has ended")
        raise typer.Exit(130) from None
    raise typer.Exit(code)
