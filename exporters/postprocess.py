"""Decode the raw output of a YOLO detect model into per-image detections, with NMS.

The raw output of an Ultralytics YOLOv8/YOLO11 detect head in export mode is a tensor of shape (B, 4 + nc, A):
rows 0..3 hold boxes as (cx, cy, w, h) in the model's input pixels and rows 4.. the per-class sigmoid scores of
each of the A anchors. `decode` turns it into the same detections as Ultralytics'
`ultralytics.utils.nms.non_max_suppression` with `multi_label=False`, `max_wh=7680` and `max_nms=30000`, so that
the edge agent, which has torch but not ultralytics, judges a model exactly as the exporter did.

torchvision is optional: its compiled NMS kernel is used when it loads, and a pure-torch greedy NMS that keeps
the same boxes in the same order otherwise.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Ultralytics shifts each class's boxes by class_id * this many pixels so that one class-agnostic NMS call never
# lets boxes of different classes suppress each other.
CLASS_OFFSET_PX = 7680
# Ultralytics keeps at most this many candidates (the highest scores) per image before NMS.
MAX_NMS_CANDIDATES = 30000


@dataclass(frozen=True, eq=False)
class Detections:
    """Detections of one image, boxes in the model's input pixels (x1, y1, x2, y2), highest score first."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to_records(self, names: Mapping[int, str]) -> list[dict[str, object]]:
        """One JSON-ready dict per detection; a class id missing from `names` is named by its number."""
        records: list[dict[str, object]] = []
        for box, score, class_id in zip(
            self.boxes.tolist(), self.scores.tolist(), self.class_ids.tolist(), strict=True
        ):
            records.append(
                {
                    "box": [float(v) for v in box],
                    "score": float(score),
                    "class_id": int(class_id),
                    "class_name": names.get(int(class_id), str(class_id)),
                }
            )
        return records


def _empty_detections() -> Detections:
    return Detections(
        boxes=np.zeros((0, 4), dtype=np.float32),
        scores=np.zeros((0,), dtype=np.float32),
        class_ids=np.zeros((0,), dtype=np.int64),
    )


# torchvision's compiled operators, by the names its releases have used (the newest first).
TORCHVISION_LIBRARIES = ("_C_stable", "_C")


@functools.cache
def torchvision_available() -> bool:
    """Whether torchvision's compiled NMS operator (``torch.ops.torchvision.nms``) can be used in this process.

    Only the compiled library is loaded, not the ``torchvision`` package: importing ``torchvision.ops`` imports
    ``torch._dynamo`` and takes about 8 s on two cores, which the agent and each of its validation children would
    pay for one operator. The kernel is the one ``torchvision.ops.nms`` calls.
    """
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        found = [
            Path(folder) / (name + suffix)
            for folder in folders
            for name in TORCHVISION_LIBRARIES
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (Path(folder) / (name + suffix)).is_file()
        ]
        if not found:
            return False
        try:
            torch.ops.load_library(str(found[0]))
        except (OSError, RuntimeError):
            # A torchvision built for another torch fails to load (undefined symbols): the torch-only NMS is the
            # right answer then.
            return False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - registered by the library: raises when it is not
    except (AttributeError, RuntimeError):
        return False
    return True


def _resolve_use_torchvision(use_torchvision: bool | None) -> bool:
    if use_torchvision is None:
        return torchvision_available()
    if use_torchvision and not torchvision_available():
        raise ImportError(
            "use_torchvision=True but torchvision cannot be imported in this environment; "
            "install a torchvision matching this torch or pass use_torchvision=None to fall back to torch-only NMS"
        )
    return use_torchvision


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou: float, *, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS in plain torch that keeps exactly what `torchvision.ops.nms` keeps on CPU.

    Boxes are (N, 4) xyxy. Returns the kept indices (int64), highest score first. Like torchvision, ties in score
    are visited in index order (a stable sort), a box is dropped when its IoU with a kept box is strictly above
    `iou`, and an undefined IoU (two zero-area boxes) drops nothing. `max_keep` stops once that many boxes are
    kept, which gives the same first `max_keep` indices at a fraction of the cost.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes[order].unbind(1)
    # Same operation order as torchvision's kernel, so the float32 IoUs and thus the decisions are bit-identical.
    areas = (x2 - x1) * (y2 - y1)
    remaining = torch.arange(order.shape[0], device=boxes.device)
    kept_positions: list[int] = []
    limit = order.shape[0] if max_keep is None else max_keep
    while remaining.numel() > 0 and len(kept_positions) < limit:
        current = int(remaining[0])
        kept_positions.append(current)
        rest = remaining[1:]
        inter_w = (torch.minimum(x2[rest], x2[current]) - torch.maximum(x1[rest], x1[current])).clamp_(min=0)
        inter_h = (torch.minimum(y2[rest], y2[current]) - torch.maximum(y1[rest], y1[current])).clamp_(min=0)
        inter = inter_w * inter_h
        overlap = inter / (areas[current] + areas[rest] - inter)
        # `~(> iou)` rather than `<= iou` keeps NaN overlaps, as torchvision does.
        remaining = rest[~(overlap > iou)]
    return order[torch.tensor(kept_positions, dtype=torch.int64, device=boxes.device)]


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou: float,
    *,
    use_torchvision: bool | None = None,
    max_keep: int | None = None,
) -> torch.Tensor:
    """Kept indices of class-agnostic NMS over (N, 4) xyxy boxes, highest score first.

    `use_torchvision=None` uses torchvision's kernel when it is importable and `nms_torch` otherwise; True or False
    forces one (True raises ImportError when torchvision is missing). `max_keep` truncates the result.
    """
    if _resolve_use_torchvision(use_torchvision):
        keep: torch.Tensor = torch.ops.torchvision.nms(boxes, scores, iou)
        return keep if max_keep is None else keep[:max_keep]
    return nms_torch(boxes, scores, iou, max_keep=max_keep)


def check_thresholds(*, conf: float, iou: float, max_det: int) -> None:
    """``ValueError`` unless ``conf`` and ``iou`` are within [0, 1] and ``max_det`` is not negative."""
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be within [0, 1], got {conf}")
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"iou must be within [0, 1], got {iou}")
    if max_det < 0:
        raise ValueError(f"max_det must be >= 0, got {max_det}")


def _as_float32_tensor(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        # A read-only array (np.load with mmap, a network buffer) is copied: torch refuses to wrap it silently.
        tensor = torch.from_numpy(raw.astype(np.float32, copy=not raw.flags.writeable))
    else:
        tensor = raw
    if tensor.ndim != 3:
        raise ValueError(f"raw output must have shape (batch, 4 + classes, anchors), got {tuple(tensor.shape)}")
    if tensor.shape[1] < 5:
        raise ValueError(f"raw output needs at least 5 rows (4 box + 1 class), got shape {tuple(tensor.shape)}")
    return tensor.detach().to(torch.float32)


def _decode_image(
    anchors: torch.Tensor, *, conf: float, iou: float, max_det: int, agnostic: bool, use_torchvision: bool
) -> Detections:
    """Detections of one image from its (A, 4 + nc) float32 anchor rows."""
    best_scores, best_classes = anchors[:, 4:].max(dim=1)
    # Strictly above the threshold, as Ultralytics filters.
    candidates = best_scores > conf
    if not bool(candidates.any()):
        return _empty_detections()
    xywh = anchors[candidates, :4]
    scores = best_scores[candidates]
    classes = best_classes[candidates].to(torch.float32)
    half_wh = xywh[:, 2:] / 2
    boxes = torch.cat((xywh[:, :2] - half_wh, xywh[:, :2] + half_wh), dim=1)

    if scores.shape[0] > MAX_NMS_CANDIDATES:
        # The same (unstable) sort call as Ultralytics, so ties at the cut fall the same way.
        top = scores.argsort(descending=True)[:MAX_NMS_CANDIDATES]
        boxes, scores, classes = boxes[top], scores[top], classes[top]

    # The offset is added in float32 like Ultralytics does; the rounding it causes is part of its result.
    nms_boxes = boxes if agnostic else boxes + classes[:, None] * CLASS_OFFSET_PX
    keep = nms(nms_boxes, scores, iou, use_torchvision=use_torchvision, max_keep=max_det)
    return Detections(
        boxes=boxes[keep].cpu().numpy(),
        scores=scores[keep].cpu().numpy(),
        class_ids=classes[keep].to(torch.int64).cpu().numpy(),
    )


def decode(
    raw: torch.Tensor | np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    agnostic: bool = False,
    use_torchvision: bool | None = None,
) -> list[Detections]:
    """Per-image detections from a raw (B, 4 + nc, A) YOLO detect output, as Ultralytics' NMS would give them.

    Each anchor keeps only its best class; anchors whose best score is strictly above `conf` go through per-class
    NMS at IoU threshold `iou` (class-agnostic when `agnostic`), and at most `max_det` survive per image. fp16 and
    numpy input are accepted; the work is done in float32 on the tensor's device. Unlike Ultralytics there is no
    wall-clock limit after which later images are left empty.
    """
    check_thresholds(conf=conf, iou=iou, max_det=max_det)
    prediction = _as_float32_tensor(raw)
    use_tv = _resolve_use_torchvision(use_torchvision)
    with torch.no_grad():
        per_anchor = prediction.transpose(1, 2)  # (B, A, 4 + nc)
        return [
            _decode_image(image, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic, use_torchvision=use_tv)
            for image in per_anchor
        ]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M), float64, of xyxy boxes a (N, 4) and b (M, 4); 0 where the union is empty."""
    a64 = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b64 = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a64[:, None, :2], b64[None, :, :2])
    bottom_right = np.minimum(a64[:, None, 2:], b64[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0.0, None).prod(axis=2)
    area_a = np.clip(a64[:, 2:] - a64[:, :2], 0.0, None).prod(axis=1)
    area_b = np.clip(b64[:, 2:] - b64[:, :2], 0.0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    result: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return result
