"""The demo's four detectors: real ones, trained on synthetic PCB scenes (``exporters.synthetic``).

- v1: a YOLOv8n trained briefly from scratch: it finds capacitors and solder bridges, not yet the chips;
- v2: v1 trained further (the same run, on to its end): it finds the chips too, and more of every class, with
  higher confidence;
- v3: v2 with one class silenced (``exporters.yolo_variants.drop_class``): it runs, gives no NaN, passes parity
  and latency, and misses every solder bridge;
- v4: v2 made slower (``slow_down``): the same detections, tens of milliseconds more per image.

Training is the slow part (about a minute and a half on two idle cores), so v1 and v2 are trained once and kept
in the user's cache (``$XDG_CACHE_HOME/yolo-ota/demo``, else ``~/.cache/yolo-ota/demo``), named by a digest of
the recipe and the library versions. v3 and v4
take a second to derive and are built fresh on every run (the slowdown is calibrated on this machine). Cache
files are written atomically, so an interrupted run leaves no half-written weights for the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from exporters.files import atomic_write
from exporters.synthetic import CLASS_NAMES

# One run of a few hundred iterations: a small batch, AdamW at a fixed rate and no warm-up (Ultralytics' warm-up
# alone would take 100 iterations at tiny rates). v1 is the run's state after V1_EPOCHS, v2 the same run trained
# on to the end: restarting a run from v1's weights (``train_synthetic_detector(weights=...)``) resets the
# optimizer and its learning-rate schedule, which at this length of training loses more than it gains.
RECIPE: dict[str, Any] = {
    "config": "yolov8n.yaml",
    "imgsz": 160,
    "batch": 8,
    "optimizer": "AdamW",
    "lr0": 0.004,
    "warmup_epochs": 0,
    "epochs": 16,
    "train_images": 128,
    "seed": 0,
}
V1_EPOCHS = 9
LIBRARIES = ("ultralytics", "torch", "numpy", "opencv-python", "opencv-python-headless")
RECIPE_VERSION = 1  # bump when exporters.synthetic or the training code changes what the recipe produces
DROPPED_CLASS = CLASS_NAMES.index("solder_bridge")  # the defect class: the miss that matters most on a line
SLOWDOWN_MS = 60.0  # extra per image on one core; the devices' budget (versions.LATENCY_BUDGET_MS) stays met
TRAFFIC_SEED = 20_24  # the scenes the line's cameras "see": a seed used neither for training nor golden data


def cache_root() -> Path:
    """The demo's cache folder: ``$XDG_CACHE_HOME/yolo-ota/demo``, else ``~/.cache/yolo-ota/demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "yolo-ota" / "demo"


def recipe_key() -> str:
    """Digest of what decides the trained weights: the recipe and the versions of the libraries that train."""
    recipe = {**RECIPE, "v1_epochs": V1_EPOCHS, "recipe_version": RECIPE_VERSION}
    recipe |= {name: _version(name) for name in LIBRARIES}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def _train(cached: dict[str, Path], say: Callable[[str], None]) -> float:
    from exporters.yolo import snapshot_path, train_synthetic_detector

    started = time.monotonic()
    say(f"training {RECIPE['config']} from scratch on {RECIPE['train_images']} synthetic scenes: "
        f"v1 after {V1_EPOCHS} epochs, v2 after {RECIPE['epochs']} (once; then cached)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="yolo-ota-demo-train-") as work:
        final = train_synthetic_detector(Path(work), snapshot_epochs=(V1_EPOCHS,), **RECIPE)
        atomic_write(cached["v1"], snapshot_path(Path(work), V1_EPOCHS).read_bytes())
        atomic_write(cached["v2"], final.read_bytes())
    took = time.monotonic() - started
    say(f"trained in {took:.0f} s; kept in {cached['v2'].parent}")
    return took


def trained_weights(say: Callable[[str], None]) -> tuple[dict[str, Path], float]:
    """v1 and v2 from the cache, trained first when missing; with the seconds this call spent training."""
    key = recipe_key()
    cached = {label: cache_root() / f"{label}-{key}.pt" for label in ("v1", "v2")}
    if all(path.is_file() for path in cached.values()):
        say(f"v1 and v2: trained weights from the cache ({cache_root()}, recipe {key})")
        return cached, 0.0
    return cached, _train(cached, say)


def derived_weights(v2: Path, work_dir: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """v3 (v2 without the solder bridge class) and v4 (v2, slower) under ``work_dir``."""
    from exporters.yolo_variants import drop_class, slow_down

    v3 = drop_class(v2, DROPPED_CLASS, work_dir / "v3.pt")
    say(f"v3: v2 with class {CLASS_NAMES[DROPPED_CLASS]!r} silenced in the Detect head")
    v4 = slow_down(v2, SLOWDOWN_MS, work_dir / "v4.pt")
    say(f"v4: v2 with about {SLOWDOWN_MS:g} ms of extra compute per image (on one core), same outputs")
    return {"v3": v3, "v4": v4}


def traffic_images(count: int = 48, size: int = 160) -> list[bytes]:
    """Held-out synthetic scenes as PNG bytes: what the demo's traffic posts to the devices."""
    import cv2
    import numpy as np

    from exporters.synthetic import make_scene

    rng = np.random.default_rng(TRAFFIC_SEED)
    images = []
    for _ in range(count):
        ok, encoded = cv2.imencode(".png", make_scene(rng, size)[0])
        if not ok:
            raise RuntimeError("OpenCV could not encode a synthetic scene as PNG")
        images.append(encoded.tobytes())
    return images
