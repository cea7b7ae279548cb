"""Decode a raw YOLO output where it was computed, and copy only the kept detections to the host.

``exporters.postprocess.decode`` is the reference: it is what the gates and the exporter judge by. The CPU path
copies the whole raw output, (B, 4 + nc, A) floats (2.8 MB a 640 px image for 80 classes), to the host first.
``decode_on_device`` does the same arithmetic on the output's device (best class per anchor, the confidence
filter before NMS, xywh to xyxy, Ultralytics' class offset, the 30000-candidate cut, NMS, ``max_det``) and sends
the host one (K, 6) tensor of the K kept detections of the whole batch.

NMS is torchvision's compiled kernel (``exporters.postprocess.nms``: the same one ``decode`` uses, with its
torch-only fallback when torchvision is absent, as it may be on a device). It is not
``torchvision.ops.batched_nms``: that separates classes by an offset of ``max coordinate + 1`` instead of
Ultralytics' fixed 7680 px, and above 1000 boxes on the CPU (25000 on CUDA) switches to one NMS per class, so the
float rounding of borderline overlaps, and the order of equal scores, could differ from ``decode``'s. Importing
``torchvision.ops`` also costs seconds (``exporters.postprocess.torchvision_available``). On the CPU the result
is identical to ``decode``'s; on CUDA it is ``decode`` run on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from exporters.postprocess import CLASS_OFFSET_PX, MAX_NMS_CANDIDATES, Detections, check_thresholds, nms


def _no_detections() -> Detections:
    return Detections(
        boxes=np.zeros((0, 4), dtype=np.float32),
        scores=np.zeros((0,), dtype=np.float32),
        class_ids=np.zeros((0,), dtype=np.int64),
    )


def _check_arguments(raw: torch.Tensor, conf: float, iou: float, max_det: int) -> None:
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(f"raw output must have shape (batch, 4 + classes >= 5, anchors), got {tuple(raw.shape)}")
    check_thresholds(conf=conf, iou=iou, max_det=max_det)


def _keep_one_image(
    anchors: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, *, iou: float, max_det: int, agnostic: bool
) -> torch.Tensor:
    """Rows (K, 6) of x1, y1, x2, y2, score, class kept by NMS among one image's candidates (A', 4) xywh."""
    if scores.shape[0] > MAX_NMS_CANDIDATES:
        # The same (unstable) sort call as decode and Ultralytics, so ties at the cut fall the same way.
        top = scores.argsort(descending=True)[:MAX_NMS_CANDIDATES]
        anchors, scores, classes = anchors[top], scores[top], classes[top]
    half_wh = anchors[:, 2:] / 2
    boxes = torch.cat((anchors[:, :2] - half_wh, anchors[:, :2] + half_wh), dim=1)
    # The offset in float32 like decode: its rounding is part of the reference result.
    nms_boxes = boxes if agnostic else boxes + classes[:, None] * CLASS_OFFSET_PX
    keep = nms(nms_boxes, scores, iou, max_keep=max_det)
    return torch.cat((boxes[keep], scores[keep, None], classes[keep, None]), dim=1)


def decode_on_device(
    raw: torch.Tensor, *, conf: float = 0.25, iou: float = 0.7, max_det: int = 300, agnostic: bool = False
) -> list[Detections]:
    """Per-image detections (boxes in input pixels, highest score first) from a raw (B, 4 + nc, A) output.

    The same contract and result as ``exporters.postprocess.decode``; the work stays on ``raw``'s device and one
    copy of the kept rows reaches the host. Host syncs: one for the candidate counts, one per image inside the
    NMS kernel, one for the result.
    """
    _check_arguments(raw, conf, iou, max_det)
    with torch.no_grad():
        per_anchor = raw.detach().to(torch.float32).transpose(1, 2)  # (B, A, 4 + nc)
        best_scores, best_classes = per_anchor[..., 4:].max(dim=2)  # (B, A)
        # Strictly above the threshold, as Ultralytics filters; before NMS, so NMS sees only the candidates.
        candidates = best_scores > conf
        counts = candidates.sum(dim=1).tolist()
        if sum(counts) == 0:
            return [_no_detections() for _ in range(raw.shape[0])]
        kept_rows: list[torch.Tensor] = []
        for image, count in enumerate(counts):
            if count == 0:
                kept_rows.append(per_anchor.new_zeros((0, 6)))
                continue
            chosen = candidates[image]
            kept_rows.append(
                _keep_one_image(
                    per_anchor[image, chosen, :4],
                    best_scores[image, chosen],
                    best_classes[image, chosen].to(torch.float32),
                    iou=iou,
                    max_det=max_det,
                    agnostic=agnostic,
                )
            )
        kept_counts = [int(rows.shape[0]) for rows in kept_rows]
        on_host = torch.cat(kept_rows).cpu().numpy()
    return [_detections(rows) for rows in np.split(on_host, np.cumsum(kept_counts)[:-1])]


def _detections(rows: np.ndarray) -> Detections:
    if rows.shape[0] == 0:
        return _no_detections()
    return Detections(
        boxes=np.ascontiguousarray(rows[:, :4]),
        scores=np.ascontiguousarray(rows[:, 4]),
        class_ids=rows[:, 5].astype(np.int64),
    )
