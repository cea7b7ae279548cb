"""Replay a fixed-shape forward pass as one CUDA graph instead of launching its kernels one by one.

A YOLO forward at batch 1 launches a few hundred small kernels; on a fast GPU the host's launch overhead is a
large part of its latency. A ``torch.cuda.CUDAGraph`` records those launches once and replays them with one
call. The price: the graph reads its input from, and writes its output to, the same device buffers every time,
so the input shape and dtype are fixed, and a model whose forward syncs with the host or allocates
differently per call cannot be captured.

``CudaGraphForward`` wraps any callable that takes one input tensor (a TorchScript module, an AOTInductor
package loaded with ``torch._inductor.aoti_load_package``): it warms the callable up on a side stream (capture
needs the lazy initialisations done and the JIT's profiling runs over), captures it, and replays it. When the
capture fails, for any reason, it logs one line and runs the plain forward from then on; ``captured`` says
which. On a device other than CUDA it captures nothing and runs the plain forward: callers need no branch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from exporters.gates import first_tensor

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], object]
WARMUP_RUNS = 3


class CudaGraphForward:
    """A forward pass for inputs shaped and typed like ``example``, replayed from a CUDA graph when it could be
    captured (``captured``), else run as is (``fallback_reason`` says why).

    Calls are serialised (the graph owns one input and one output buffer) and each returns a new tensor, so a
    result stays valid after the next call. An input of another shape, dtype or device is a ``ValueError``.
    """

    def __init__(self, forward: Forward, example: torch.Tensor, *, warmup_runs: int = WARMUP_RUNS) -> None:
        self.forward = forward
        self.shape = tuple(example.shape)
        self.dtype = example.dtype
        self.device = example.device
        self.captured = False
        self.fallback_reason: str | None = None
        self._lock = threading.Lock()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_input = example.detach().clone()
        self._static_output: torch.Tensor | None = None
        if self.device.type != "cuda":
            self.fallback_reason = f"CUDA graphs need a CUDA device, this forward runs on {self.device}"
            return
        try:
            self._capture(warmup_runs)
        except Exception as exc:  # any failure to capture leaves the plain forward, which is correct, only slower
            self._graph, self._static_output = None, None
            self.fallback_reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning(
                "CUDA graph capture failed on %s, running the plain forward: %s", self.device, self.fallback_reason
            )
        else:
            self.captured = True

    def _capture(self, warmup_runs: int) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(warmup_runs):
                first_tensor(self.forward(self._static_input))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_output = first_tensor(self.forward(self._static_input))
        self._graph, self._static_output = graph, static_output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The forward's (first) output tensor for ``x``."""
        if tuple(x.shape) != self.shape or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"this forward takes {self.shape} {self.dtype} on {self.device}, "
                f"got {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        with torch.inference_mode():
            if self._graph is None or self._static_output is None:
                return first_tensor(self.forward(x))
            with self._lock:
                self._static_input.copy_(x)
                self._graph.replay()
                return self._static_output.clone()
