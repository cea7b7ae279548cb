"""Altered copies of an Ultralytics detector: versions that are wrong on purpose, yet pass every export gate.

The export gates compare a file with its own eager model (DESIGN.md section 3), so a model that misses a class
or runs slower passes them: what catches it is shadow validation on a device's frames and the fleet analysis of
canary against control. These builders make such versions from real weights, for the demo and the tests:

- ``drop_class``: the Detect head never fires for one class (a silent regression: no error, no NaN),
- ``slow_down``: the same outputs, bit for bit, after extra real compute (a latency regression).

Each writes an Ultralytics checkpoint (``YOLO(out)`` and ``exporters.export.export_bundle`` load it). Only
``exporters.yolo`` touches Ultralytics; this module alters the loaded ``torch.nn.Module`` in place.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from exporters.errors import ExportArgumentError, ModelError
from exporters.yolo import load_detector, save_weights

# sigmoid(-20) is about 2e-9: far below any confidence threshold, and finite in fp16 as in fp32.
SILENT_LOGIT = -20.0
# Side of the square matrix the slowdown multiplies, per step: big enough that the step's cost is real compute
# rather than call overhead, small enough that extra_ms is met in fine steps.
SLOW_MATRIX_SIDE = 192


def _class_convs(head: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The final 1x1 conv of every classification branch (``cv3``, and ``one2one_cv3`` of end-to-end heads)."""
    convs: list[torch.nn.Conv2d] = []
    for name in ("cv3", "one2one_cv3"):
        branches = getattr(head, name, None)
        if branches is None:
            continue
        for branch in branches:
            last = branch[-1]
            if not isinstance(last, torch.nn.Conv2d) or last.out_channels != head.nc:
                raise ModelError(f"unexpected Detect head: {name} does not end in a {head.nc}-channel conv")
            convs.append(last)
    if not convs:
        raise ModelError("the Detect head has no cv3 classification branches")
    return convs


def drop_class(weights: Path, class_index: int, out: Path) -> Path:
    """A copy of ``weights`` whose Detect head never reports class ``class_index``; the other classes unchanged.

    The class's channel of each classification branch's final conv gets zero weights and a bias of
    ``SILENT_LOGIT``, so its score is a constant ~2e-9 whatever the image: the model runs, gives finite outputs
    and passes parity against its own eager model.
    """
    detector = load_detector(str(weights))
    if not 0 <= class_index < detector.num_classes:
        raise ExportArgumentError(f"class index {class_index} out of range: {weights} has {detector.num_classes}")
    head = detector.yolo.model.model[-1]
    with torch.no_grad():
        for conv in _class_convs(head):
            conv.weight[class_index].zero_()
            if conv.bias is None:
                raise ModelError("a classification conv without a bias cannot be silenced")
            conv.bias[class_index] = SILENT_LOGIT
    return save_weights(detector, out)


class SlowedLayer(torch.nn.Module):
    """Runs ``inner``, then ``steps`` matrix products seeded by the input, and adds their result times zero.

    The products depend on the input (so nothing can fold them into a constant) and pass through ``tanh`` (so
    they stay finite: 0 x inf would be NaN); ``y + 0 * finite`` is ``y`` exactly, so the outputs are those of
    the unaltered model. TorchScript keeps the products: it does not simplify a multiplication by zero. The class
    lives here so that ``torch.load`` of the checkpoint finds it.
    """

    matrix: torch.Tensor

    def __init__(self, inner: torch.nn.Module, steps: int, side: int = SLOW_MATRIX_SIDE) -> None:
        super().__init__()
        self.inner = inner
        self.steps = steps
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("matrix", torch.randn(side, side, generator=generator) / math.sqrt(side))
        # What Ultralytics' forward loop reads of every layer of a model (its wiring and its summary).
        for attribute in ("f", "i", "type", "np"):
            if hasattr(inner, attribute):
                setattr(self, attribute, getattr(inner, attribute))

    def forward(self, x: Any) -> Any:
        y = self.inner(x)
        seed = (x if isinstance(x, torch.Tensor) else x[0]).mean()
        state = self.matrix * seed
        for _ in range(self.steps):
            state = torch.tanh(state @ self.matrix)
        return y + state.mean() * 0.0


def _step_ms(side: int, *, samples: int = 30) -> float:
    """Median milliseconds of one slowdown step (a ``side`` x ``side`` product and its tanh) on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matrix = torch.randn(side, side) / math.sqrt(side)
        state = matrix.clone()
        timings = []
        for _ in range(samples):
            start = time.perf_counter()
            state = torch.tanh(state @ matrix)
            timings.append((time.perf_counter() - start) * 1000)
        return sorted(timings)[len(timings) // 2]
    finally:
        torch.set_num_threads(threads)


def slow_down(weights: Path, extra_ms: float, out: Path) -> Path:
    """A copy of ``weights`` with identical outputs that takes about ``extra_ms`` longer per forward pass.

    The first layer is wrapped in a ``SlowedLayer`` whose step count is calibrated on this machine, on one CPU
    thread (the cost of a step falls with more threads and on a GPU, so the delay is a bound, not a constant).
    """
    if not 0 < extra_ms <= 10_000:
        raise ExportArgumentError(f"extra_ms must be in (0, 10000], got {extra_ms}")
    detector = load_detector(str(weights))
    steps = max(1, round(extra_ms / max(_step_ms(SLOW_MATRIX_SIDE), 1e-3)))
    layers = detector.yolo.model.model
    layers[0] = SlowedLayer(layers[0], steps)
    return save_weights(detector, out)
