"""The serving path with every step on the model's device: upload, letterbox, forward, decode, NMS.

``LoadedModel.detect`` (``edge_agent.runtime``) letterboxes with OpenCV on the host, sends a float32 input,
copies the whole raw output back and decodes it on the host. ``DevicePipeline`` sends the image as uint8
(``edge_agent.device_letterbox``), runs the forward from a CUDA graph when one can be captured
(``edge_agent.cuda_graph``), decodes on the device and copies only the kept boxes back
(``edge_agent.device_decode``). Boxes are mapped to the image's own pixels on the host, by the CPU path's
``scale_boxes_to_original``: a few hundred numbers at most.

The forward always sees the variant's batch size: a shorter batch is padded with copies of its last image (as
``exporters.gates.run_batched`` pads), since a traced file and a CUDA graph have one fixed input shape.
``detect_batch`` is what ``edge_agent.micro_batcher.MicroBatcher`` calls with the images of several cameras.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent.cuda_graph import CudaGraphForward
from edge_agent.device_decode import decode_on_device
from edge_agent.device_letterbox import ImageUploader, letterbox_on_device
from edge_agent.errors import ModelOutputError
from exporters.bundle import Manifest, safe_join
from exporters.formats import all_variants
from exporters.gates import first_tensor
from exporters.postprocess import Detections
from exporters.preprocess import LetterboxInfo, scale_boxes_to_original
from exporters.runners import load_runner

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class DecodeThresholds:
    """The manifest's post-processing thresholds (``GateThresholds.conf``, ``nms_iou``, ``max_det``)."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300


class DevicePipeline:
    """Detections for HxWx3 uint8 BGR images, in their own pixels, computed on ``device``.

    ``forward`` takes a (batch, 3, h, w) tensor of ``dtype`` on ``device`` and returns the raw (batch, 4 + nc, A)
    output (or a tuple/list starting with it). With ``cuda_graph`` it is wrapped in a ``CudaGraphForward`` (on
    a CPU device that runs it as is). Thread-safe when ``forward`` is.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], object],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        input_hw: tuple[int, int],
        batch: int = 1,
        thresholds: DecodeThresholds | None = None,
        cuda_graph: bool = True,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.input_hw = input_hw
        self.batch = batch
        self.thresholds = thresholds or DecodeThresholds()
        self.uploader = ImageUploader(self.device)
        self.graph: CudaGraphForward | None = None
        self.forward: Callable[[torch.Tensor], object] = forward
        if cuda_graph:
            example = torch.zeros((batch, 3, *input_hw), dtype=dtype, device=self.device)
            self.graph = CudaGraphForward(forward, example)
            self.forward = self.graph

    @classmethod
    def from_bundle(
        cls, directory: Path, manifest: Manifest, variant: str, *, cuda_graph: bool = True
    ) -> DevicePipeline:
        """Load ``variant`` (any format) of a verified bundle onto its device (``cuda:0`` for a ``cuda-*`` one)."""
        spec = all_variants(directory, manifest)[variant]
        device = "cuda:0" if spec.device == "cuda" else "cpu"
        module = load_runner(safe_join(directory, spec.path), spec)
        thresholds = manifest.thresholds
        return cls(
            module,
            device=device,
            dtype=TORCH_DTYPES[spec.dtype],
            input_hw=(int(manifest.imgsz[0]), int(manifest.imgsz[1])),
            batch=spec.batch,
            thresholds=DecodeThresholds(conf=thresholds.conf, iou=thresholds.nms_iou, max_det=thresholds.max_det),
            cuda_graph=cuda_graph,
        )

    @property
    def captured(self) -> bool:
        """Whether the forward replays a CUDA graph."""
        return self.graph is not None and self.graph.captured

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Detections of one image, boxes in its own pixels."""
        return self.detect_batch([image_bgr])[0]

    def detect_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of each image, in order; forwards of ``batch`` images at a time."""
        found: list[Detections] = []
        for start in range(0, len(images_bgr), self.batch):
            found.extend(self._detect_chunk(images_bgr[start : start + self.batch]))
        return found

    def raw(self, images_bgr: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]:
        """The raw output on the device for at most ``batch`` images, and where each image sits in the input;
        ``ModelOutputError`` when it holds NaN or infinite values."""
        if not 1 <= len(images_bgr) <= self.batch:
            raise ValueError(f"expected 1 to {self.batch} images, got {len(images_bgr)}")
        with torch.inference_mode():
            placed = [
                letterbox_on_device(self.uploader.upload(image), self.input_hw, self.dtype) for image in images_bgr
            ]
            inputs = [x for x, _ in placed]
            inputs += inputs[-1:] * (self.batch - len(inputs))
            out = first_tensor(self.forward(torch.cat(inputs)))
            if out.shape[0] != self.batch:  # a fixed-shape file run at another batch size may answer for fewer
                raise RuntimeError(f"the model answered {out.shape[0]} images for a batch of {self.batch}")
            raw = out[: len(images_bgr)]
            if not bool(torch.isfinite(raw).all()):
                raise ModelOutputError("the model produced NaN or infinite outputs")
        return raw, [info for _, info in placed]

    def _detect_chunk(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        raw, placements = self.raw(images_bgr)
        t = self.thresholds
        decoded = decode_on_device(raw, conf=t.conf, iou=t.iou, max_det=t.max_det)
        return [
            Detections(boxes=scale_boxes_to_original(found.boxes, info), scores=found.scores, class_ids=found.class_ids)
            for found, info in zip(decoded, placements, strict=True)
        ]
