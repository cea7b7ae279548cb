"""Synthetic PCB-like scenes with labelled parts, for a detector that really detects.

A YOLO model built from a YAML config has random weights: its output hardly depends on its input and it finds
nothing, so parity checks on it prove little. A few minutes of training on these scenes gives a small model
whose outputs move with the image and which yields confident boxes, without downloading anything.

Each scene is a green board with copper traces and a handful of parts drawn at random places:

- ``chip``: a dark rectangle with pins along two sides,
- ``capacitor``: a round can with a light rim,
- ``solder_bridge``: a bright irregular blob, the defect class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("chip", "capacitor", "solder_bridge")


@dataclass(frozen=True)
class Part:
    """One drawn part: class index and its box in pixels (x1, y1, x2, y2)."""

    class_id: int
    box: tuple[float, float, float, float]


def _cv2() -> ModuleType:
    import cv2

    return cv2


def _board(rng: np.random.Generator, size: int) -> np.ndarray:
    cv2 = _cv2()
    base = np.array([40, 110, 30], dtype=np.float32) + rng.normal(0, 12, 3)
    image = np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(image, p1, p2, (60, 150, 170), int(rng.integers(1, 3)))
    return image


def _draw_chip(image: np.ndarray, rng: np.random.Generator, cx: int, cy: int, half: int) -> tuple[int, ...]:
    cv2 = _cv2()
    w, h = half, int(half * rng.uniform(0.55, 0.9))
    x1, y1, x2, y2 = cx - w, cy - h, cx + w, cy + h
    pin = max(2, h // 4)
    for x in range(x1 + 2, x2 - 1, max(3, w // 3)):
        cv2.rectangle(image, (x, y1 - pin), (x + 1, y2 + pin), (200, 200, 200), -1)
    cv2.rectangle(image, (x1, y1), (x2, y2), (25, 25, 25), -1)
    cv2.circle(image, (x1 + 3, y1 + 3), 1, (150, 150, 150), -1)
    return x1, y1 - pin, x2 + 1, y2 + pin


def _draw_capacitor(image: np.ndarray, rng: np.random.Generator, cx: int, cy: int, half: int) -> tuple[int, ...]:
    cv2 = _cv2()
    body = tuple(int(v) for v in rng.integers(60, 140, 3))
    cv2.circle(image, (cx, cy), half, (210, 210, 210), -1)
    cv2.circle(image, (cx, cy), max(1, int(half * 0.75)), body, -1)
    return cx - half, cy - half, cx + half, cy + half


def _draw_bridge(image: np.ndarray, rng: np.random.Generator, cx: int, cy: int, half: int) -> tuple[int, ...]:
    cv2 = _cv2()
    angles = np.sort(rng.uniform(0, 2 * math.pi, 7))
    radii = rng.uniform(0.5, 1.0, 7) * half
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1).astype(np.int32)
    cv2.fillPoly(image, [points], (230, 235, 240))
    x, y, w, h = cv2.boundingRect(points)
    return x, y, x + w, y + h


_DRAWERS = (_draw_chip, _draw_capacitor, _draw_bridge)


def make_scene(rng: np.random.Generator, size: int = 160, max_parts: int = 5) -> tuple[np.ndarray, list[Part]]:
    """Draw one BGR scene of ``size`` x ``size`` pixels and return it with its parts."""
    image = _board(rng, size)
    parts: list[Part] = []
    taken: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, max_parts + 1)) * 3):
        if len(parts) >= max_parts:
            break
        class_id = int(rng.integers(0, len(CLASS_NAMES)))
        half = int(rng.integers(max(5, size // 20), max(7, size // 7)))
        cx, cy = (int(v) for v in rng.integers(half + 4, size - half - 4, 2))
        probe = (cx - half - 3.0, cy - half - 3.0, cx + half + 3.0, cy + half + 3.0)
        if any(_overlaps(probe, other) for other in taken):
            continue
        x1, y1, x2, y2 = _DRAWERS[class_id](image, rng, cx, cy, half)
        box = (max(0.0, x1), max(0.0, y1), min(size - 1.0, x2), min(size - 1.0, y2))
        taken.append(probe)
        parts.append(Part(class_id, box))
    return image, parts


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def write_dataset(root: Path, *, train_images: int, val_images: int, size: int, seed: int) -> Path:
    """Write a YOLO-format dataset (images, labels, ``data.yaml``) under ``root``; return the YAML path."""
    cv2 = _cv2()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("val", val_images)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, parts = make_scene(rng, size)
            stem = f"{split}_{index:05d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), image)
            lines = [_yolo_label(part, size) for part in parts]
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data_yaml


def _yolo_label(part: Part, size: int) -> str:
    x1, y1, x2, y2 = part.box
    cx, cy = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size
    w, h = (x2 - x1) / size, (y2 - y1) / size
    return f"{part.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def write_scenes(folder: Path, *, count: int, size: int, seed: int) -> list[Path]:
    """Write ``count`` unlabelled scenes as PNG files (golden or sample images); return their paths."""
    cv2 = _cv2()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        image, _ = make_scene(rng, size)
        path = folder / f"scene_{index:03d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths
