"""The agent's inference runtime: one serving model behind one reference, swapped without dropping a request.

A request reads ``self._serving`` once and runs start to finish on that model, so a swap (one assignment) never
changes the model under a request that has started; the old model is freed when its last request ends. During
probation the previous model stays loaded as the *standby*: a request that fails on the new model is answered
by the standby instead, so clients see no failure while the agent decides to roll back. A CUDA failure at run
time moves serving to the version's next variant (AOTInductor -> TorchScript -> ``cpu-fp32``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_agent.device_pipeline import DecodeThresholds, DevicePipeline
from edge_agent.errors import ModelOutputError, NoModelError
from edge_agent.frames import FrameRing
from edge_agent.image_limits import check_pixels
from exporters.bundle import Manifest, safe_join
from exporters.formats import all_variants
from exporters.gates import first_tensor
from exporters.postprocess import Detections, decode
from exporters.preprocess import decode_image_bytes, letterbox, scale_boxes_to_original, to_input_array
from exporters.runners import Runner, load_runner

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
WARMUP_RUNS = 3


@dataclass(eq=False)
class LoadedModel:
    """One variant of one version, loaded on its device and ready to serve."""

    model: str
    version: str
    variant: str
    device: str
    dtype: torch.dtype
    module: Runner  # any format's model, called like a torch module (``exporters.runners``)
    manifest: Manifest
    directory: Path
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time per model
    pipeline: DevicePipeline | None = None  # detect on the model's device (CUDA variants, ``ServingOptions``)

    @property
    def input_hw(self) -> tuple[int, int]:
        return (int(self.manifest.imgsz[0]), int(self.manifest.imgsz[1]))

    @property
    def label(self) -> str:
        return f"{self.model} v{self.version} ({self.variant})"

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw float32 output for a (B, 3, H, W) input; ``ModelOutputError`` when it is not finite."""
        x = torch.from_numpy(batch).to(device=self.device, dtype=self.dtype)
        try:
            with self.lock, torch.inference_mode():
                raw = first_tensor(self.module(x)).float().cpu().numpy()
        except torch.jit.Error as exc:  # a ``raise`` inside TorchScript; not a RuntimeError subclass
            raise RuntimeError(f"{self.label}: {exc}") from exc
        if not np.isfinite(raw).all():
            raise ModelOutputError(f"{self.label} produced NaN or infinite outputs")
        return raw

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Letterbox, forward, decode with NMS, and map the boxes back to the image's own pixels."""
        if self.pipeline is not None:  # every step on the GPU; only the kept boxes come back
            return self.pipeline.detect(image_bgr)
        padded, info = letterbox(image_bgr, self.input_hw)
        raw = self.forward(to_input_array([padded]))
        thresholds = self.manifest.thresholds
        found = decode(raw, conf=thresholds.conf, iou=thresholds.nms_iou, max_det=thresholds.max_det)[0]
        return Detections(
            boxes=scale_boxes_to_original(found.boxes, info), scores=found.scores, class_ids=found.class_ids
        )


@dataclass(frozen=True)
class DetectResult:
    model: str
    version: str
    variant: str
    device: str
    detections: list[dict[str, object]]
    latency_ms: float


_NONE_INT = np.zeros(0, dtype=np.int64)
_NONE_FLOAT = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Inference:
    """What one request did, for telemetry and probation: the class and score of each detection (small arrays,
    at most ``max_det`` long), or the error; ``nonfinite`` when the error was a NaN/inf output."""

    model: LoadedModel
    latency_ms: float
    error: str | None = None
    class_ids: np.ndarray = field(default_factory=lambda: _NONE_INT)
    scores: np.ndarray = field(default_factory=lambda: _NONE_FLOAT)
    nonfinite: bool = False

    @property
    def detections(self) -> int:
        return int(self.class_ids.shape[0])

    @property
    def confidence_sum(self) -> float:
        return float(self.scores.sum())


def _failed(model: LoadedModel, started: float, exc: BaseException) -> Inference:
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return Inference(model, elapsed_ms, error=str(exc), nonfinite=isinstance(exc, ModelOutputError))


Observer = Callable[[Inference], None]


@dataclass(frozen=True)
class ServingOptions:
    """How a variant serves requests.

    ``device_pipeline``: the image goes to the model's device as uint8 and is letterboxed, decoded and NMS'd there
    (``edge_agent.device_pipeline``); None means for CUDA variants only (the CPU keeps the OpenCV path that
    bench/serve.py measures). ``cuda_graph``: the forward replays a captured CUDA graph (a variant whose capture
    fails runs its plain forward)."""

    device_pipeline: bool | None = None
    cuda_graph: bool = True


DEFAULT_SERVING = ServingOptions()


def load_model(
    directory: Path, manifest: Manifest, variant: str, *, model: str, version: str,
    options: ServingOptions = DEFAULT_SERVING,
) -> LoadedModel:  # fmt: skip
    """Load ``variant`` of an installed bundle onto its device (``map_location``) and warm it up.

    ``model`` is the registered model's name (the manifest's own name is the exporter's).
    """
    spec = all_variants(directory, manifest)[variant]
    device = "cuda:0" if spec.device == "cuda" else "cpu"
    module = load_runner(safe_join(directory, spec.path), spec)
    loaded = LoadedModel(
        model=model,
        version=version,
        variant=variant,
        device=device,
        dtype=TORCH_DTYPES[spec.dtype],
        module=module,
        manifest=manifest,
        directory=directory,
    )
    on_device = spec.device == "cuda" if options.device_pipeline is None else options.device_pipeline
    if on_device:
        t = manifest.thresholds
        loaded.pipeline = DevicePipeline(
            module, device=device, dtype=loaded.dtype, input_hw=loaded.input_hw, batch=spec.batch,
            thresholds=DecodeThresholds(conf=t.conf, iou=t.nms_iou, max_det=t.max_det),
            cuda_graph=options.cuda_graph and spec.device == "cuda",
        )  # fmt: skip
    # Warm up the whole request path (image decode libraries, letterbox, the JIT's first optimising runs, NMS),
    # not only the forward pass, so that the first request after a swap is not the slow one.
    frame = np.full((*loaded.input_hw, 3), 114, dtype=np.uint8)
    frame[::7, ::5] = 255
    sample = np.zeros((spec.batch, 3, *loaded.input_hw), dtype=np.float32)
    for _ in range(WARMUP_RUNS):
        if spec.batch == 1 or loaded.pipeline is not None:
            loaded.detect(frame)
        else:
            loaded.forward(sample)
    return loaded


class InferenceRuntime:
    """Serves detections from the current model; swaps, keeps a standby during probation, falls back to CPU."""

    def __init__(
        self, observer: Observer | None = None, frames: FrameRing | None = None, *, max_image_pixels: int | None = None
    ) -> None:
        self.frames = frames  # sampled request images for shadow validation; None: none kept
        self.max_image_pixels = max_image_pixels  # encoded images over this are refused before decoding
        self._serving: LoadedModel | None = None
        self._standby: LoadedModel | None = None
        self._observer = observer or (lambda _inference: None)
        self._swap_lock = threading.Lock()
        # The same version's next variant after one fails at run time (``ModelLoader.run_time_fallback``).
        self.fallback: Callable[[LoadedModel], LoadedModel | None] | None = None

    @property
    def serving(self) -> LoadedModel | None:
        return self._serving

    @property
    def standby(self) -> LoadedModel | None:
        return self._standby

    def swap(self, new: LoadedModel, *, keep_standby: bool) -> LoadedModel | None:
        """Make ``new`` the serving model in one assignment; the old one becomes the standby if asked."""
        with self._swap_lock:
            old = self._serving
            self._standby = old if keep_standby else None
            self._serving = new
        log.info("serving %s on %s (was %s)", new.label, new.device, old.label if old else "nothing")
        return old

    def drop_standby(self) -> None:
        self._standby = None

    def unload(self) -> None:
        """Serve nothing (a first version that failed probation, with no earlier one to go back to)."""
        with self._swap_lock:
            self._serving, self._standby = None, None

    def detect_bytes(self, data: bytes) -> DetectResult:
        """Detections for an encoded image; ``ValueError`` when the bytes are not an image, ``ImageRefused`` when
        its header declares more than ``max_image_pixels`` (checked before decoding). The bytes may be kept in the
        frame ring (``self.frames``) for shadow validation."""
        if self.max_image_pixels is not None:
            check_pixels(data, self.max_image_pixels)
        return self.detect(decode_image_bytes(data), encoded=data)

    def detect(self, image_bgr: np.ndarray, *, encoded: bytes | None = None) -> DetectResult:
        """Detections for an HWC BGR uint8 image, from the model serving when the request started."""
        model = self._serving
        if model is None:
            raise NoModelError("no validated model is loaded yet")
        try:
            return self._run(model, image_bgr, encoded)
        except (RuntimeError, ModelOutputError) as exc:
            backup = self._backup_for(model, exc)
            if backup is None:
                raise
            return self._run(backup, image_bgr, None)

    def probe(self, batch: np.ndarray) -> None:
        """Run golden inputs through the serving model (probation with little traffic); failures are recorded."""
        model = self._serving
        if model is None:
            return
        started = time.perf_counter()
        try:
            model.forward(batch)
        except (RuntimeError, ModelOutputError) as exc:
            self._observer(_failed(model, started, exc))
            return
        self._observer(Inference(model, (time.perf_counter() - started) * 1000.0))

    def _run(self, model: LoadedModel, image_bgr: np.ndarray, encoded: bytes | None) -> DetectResult:
        started = time.perf_counter()
        try:
            found = model.detect(image_bgr)
        except (RuntimeError, ModelOutputError) as exc:
            self._observer(_failed(model, started, exc))
            raise
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._observer(Inference(model, latency_ms, class_ids=found.class_ids, scores=found.scores))
        if encoded is not None and self.frames is not None and model is self._serving:
            self.frames.offer(encoded, model.version, found)
        return DetectResult(
            model=model.model,
            version=model.version,
            variant=model.variant,
            device=model.device,
            detections=found.to_records(model.manifest.names),
            latency_ms=latency_ms,
        )

    def _backup_for(self, failed: LoadedModel, exc: BaseException) -> LoadedModel | None:
        """The model to answer with after ``failed`` raised: the standby, else the version's next variant."""
        if failed is self._serving and self._standby is not None:
            log.warning("%s failed a request (%s): answered by %s", failed.label, exc, self._standby.label)
            return self._standby
        if self.fallback is not None:
            with self._swap_lock:
                if self._serving is not failed:  # another request already moved on
                    return self._serving
                replacement = self.fallback(failed)
                if replacement is not None:
                    self._serving = replacement
            return replacement
        return None
