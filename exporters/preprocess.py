"""Turn images into a YOLO input tensor and map detected boxes back, exactly as Ultralytics does.

`letterbox` reproduces `ultralytics.data.augment.LetterBox(new_shape, auto=False, scale_fill=False, scaleup=True,
center=True)`: scale to fit keeping the aspect ratio, resize with bilinear interpolation, pad with grey 114 split
as evenly as possible (the odd pixel goes to the bottom/right). `scale_boxes_to_original` reproduces
`ultralytics.utils.ops.scale_boxes`. Golden inputs made by the exporter and inputs made on a device therefore
agree to the byte.

OpenCV is imported inside the functions: the edge agent installs opencv-python-headless, and importing this
module must not require it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

PAD_VALUE = 114


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as error:
        raise ImportError("OpenCV is needed for image I/O and resizing: pip install opencv-python-headless") from error
    return cv2


@dataclass(frozen=True)
class LetterboxInfo:
    """How an image was placed in the model input: enough to map boxes back to the original image."""

    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale: float  # resized size / original size, before rounding each side to whole pixels
    resized_hw: tuple[int, int]  # the image's size inside the input, without padding
    pad_top: int
    pad_left: int

    @property
    def pad_bottom(self) -> int:
        return self.input_hw[0] - self.resized_hw[0] - self.pad_top

    @property
    def pad_right(self) -> int:
        return self.input_hw[1] - self.resized_hw[1] - self.pad_left


def letterbox_info(original_hw: tuple[int, int], input_hw: tuple[int, int]) -> LetterboxInfo:
    """Placement of an image of `original_hw` in an input of `input_hw`, with Ultralytics' rounding."""
    original_h, original_w = original_hw
    input_h, input_w = input_hw
    if min(original_h, original_w, input_h, input_w) <= 0:
        raise ValueError(f"sizes must be positive, got original {original_hw} and input {input_hw}")
    scale = min(input_h / original_h, input_w / original_w)
    # Python's round (half to even) on purpose: Ultralytics uses it, and a different rounding shifts a pixel.
    resized_h = max(round(original_h * scale), 1)
    resized_w = max(round(original_w * scale), 1)
    # The -0.1 sends an odd leftover pixel to the bottom/right side, as Ultralytics does.
    pad_top = round((input_h - resized_h) / 2 - 0.1)
    pad_left = round((input_w - resized_w) / 2 - 0.1)
    return LetterboxInfo(
        original_hw=(original_h, original_w),
        input_hw=(input_h, input_w),
        scale=scale,
        resized_hw=(resized_h, resized_w),
        pad_top=pad_top,
        pad_left=pad_left,
    )


def letterbox(
    image_bgr: np.ndarray, input_hw: tuple[int, int], pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize an HWC BGR uint8 image to fit `input_hw` keeping its aspect ratio, and pad the rest with `pad_value`."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image_bgr.shape}")
    cv2 = _cv2()
    info = letterbox_info((int(image_bgr.shape[0]), int(image_bgr.shape[1])), input_hw)
    resized = image_bgr
    if info.resized_hw != info.original_hw:
        resized = cv2.resize(image_bgr, info.resized_hw[::-1], interpolation=cv2.INTER_LINEAR)
    padded: np.ndarray = cv2.copyMakeBorder(
        resized,
        info.pad_top,
        info.pad_bottom,
        info.pad_left,
        info.pad_right,
        cv2.BORDER_CONSTANT,
        value=(pad_value,) * 3,
    )
    return padded, info


def to_input_array(images_bgr: Sequence[np.ndarray]) -> np.ndarray:
    """Stack letterboxed HWC BGR uint8 images into a contiguous float32 (B, 3, H, W) RGB array in [0, 1]."""
    if len(images_bgr) == 0:
        raise ValueError("to_input_array needs at least one image")
    shapes = {image.shape for image in images_bgr}
    if len(shapes) != 1:
        raise ValueError(f"all images must have the same shape to be batched, got {sorted(shapes)}")
    shape = next(iter(shapes))
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"expected HxWx3 BGR images, got shape {shape}")
    if any(image.dtype != np.uint8 for image in images_bgr):
        raise ValueError("expected uint8 images")
    batch_bhwc = np.stack(images_bgr)
    batch_bchw = np.ascontiguousarray(batch_bhwc[..., ::-1].transpose(0, 3, 1, 2)).astype(np.float32)
    # Divide (not multiply by 1/255) in float32, as Ultralytics' predictor does, so the inputs are bit-identical.
    batch_bchw /= np.float32(255.0)
    return batch_bchw


def scale_boxes_to_original(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map (N, 4) xyxy boxes from input pixels to original image pixels, clipped to the image; float32 copy."""
    mapped = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    original_h, original_w = info.original_hw
    # Per-axis gains of the rounded resized size, not `info.scale`: that is what Ultralytics divides by.
    gain_y = info.resized_hw[0] / original_h
    gain_x = info.resized_hw[1] / original_w
    mapped[:, [0, 2]] -= info.pad_left
    mapped[:, [1, 3]] -= info.pad_top
    mapped[:, [0, 2]] /= np.float32(gain_x)
    mapped[:, [1, 3]] /= np.float32(gain_y)
    mapped[:, [0, 2]] = mapped[:, [0, 2]].clip(0, original_w)
    mapped[:, [1, 3]] = mapped[:, [1, 3]].clip(0, original_h)
    return mapped


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) into an HWC BGR uint8 array; ValueError if it is not one."""
    if not data:
        raise ValueError("cannot decode an image from empty bytes")
    cv2 = _cv2()
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise ValueError(f"cannot decode {len(data)} bytes as an image: {error}") from error
    if image is None:
        raise ValueError(f"cannot decode {len(data)} bytes as an image (not a format OpenCV reads)")
    decoded: np.ndarray = image
    return decoded


def read_image(path: Path) -> np.ndarray:
    """Read an image file into an HWC BGR uint8 array; ValueError naming the path if it cannot be read."""
    try:
        # Bytes then imdecode rather than cv2.imread: imread cannot open non-ASCII paths on Windows.
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error.strerror or error}") from error
    try:
        return decode_image_bytes(data)
    except ValueError as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
