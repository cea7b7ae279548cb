"""Letterbox an image on the model's device: upload it as uint8, resize and pad there.

The CPU path (``exporters.preprocess.letterbox`` then ``to_input_array``) resizes with OpenCV and sends a float32
tensor to the device: 4 bytes a pixel channel over the bus, and the resize on the host's cores. Here the image
crosses as uint8 (a quarter of the bytes) through a reused page-locked buffer, and the resize, the padding, the
BGR to RGB flip and the scaling to [0, 1] run where the model runs.

The geometry is ``exporters.preprocess.letterbox_info``'s, so the same ``LetterboxInfo`` maps boxes back with
``scale_boxes_to_original``. The pixels are not byte-identical to OpenCV's: ``cv2.INTER_LINEAR`` weighs the two
neighbours with 11-bit fixed-point weights, ``torch.nn.functional.interpolate`` in float32. Both sample at pixel
centres (``align_corners=False``) with two taps per axis and no antialiasing, for upscaling and downscaling
alike, so after rounding to whole levels about one value in ten differs, by one level of 255.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from exporters.preprocess import PAD_VALUE, LetterboxInfo, letterbox_info


class ImageUploader:
    """Copies HxWx3 uint8 images to ``device``; on CUDA through one reused page-locked (pinned) host buffer.

    From pinned memory the copy is a DMA that does not wait for the host; the buffer is reused only after the
    previous copy out of it has finished (a CUDA event). Thread-safe: concurrent uploads take turns on the
    buffer, which costs one host memcpy each. On the CPU the array is wrapped without a copy.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._staging: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def upload(self, image: np.ndarray) -> torch.Tensor:
        """The image as a uint8 tensor of the same shape on the device."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} of {image.dtype}")
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        with self._lock:
            staging, copied = self._staging_for(image.size)
            host = staging[: image.size].view(image.shape)
            np.copyto(host.numpy(), image)
            on_device = torch.empty(image.shape, dtype=torch.uint8, device=self.device)
            on_device.copy_(host, non_blocking=True)
            copied.record(torch.cuda.current_stream(self.device))
        return on_device

    def _staging_for(self, size: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """The pinned buffer, grown to ``size`` bytes if needed, once the last copy out of it is done; and the
        event that marks the end of a copy out of it."""
        if self._copied is None:
            self._copied = torch.cuda.Event()  # made on first use: a CPU-only torch build has no CUDA events
        else:
            self._copied.synchronize()
        if self._staging is None or self._staging.numel() < size:
            self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self._staging, self._copied


def letterbox_on_device(
    image_bgr: torch.Tensor, input_hw: tuple[int, int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, LetterboxInfo]:
    """A (1, 3, h, w) RGB input in [0, 1] of ``dtype`` from an HxWx3 uint8 BGR image, on the image's device.

    The same placement as ``exporters.preprocess.letterbox`` (scale to fit, padding of 114 split with the odd
    pixel at the bottom/right); the resized values are rounded to whole levels as OpenCV's uint8 output is, then
    divided by 255 in float32 as ``to_input_array`` does, and only then cast to ``dtype``.
    """
    if image_bgr.dtype != torch.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        shape = tuple(image_bgr.shape)
        raise ValueError(f"expected an HxWx3 uint8 image tensor, got shape {shape} of {image_bgr.dtype}")
    info = letterbox_info((int(image_bgr.shape[0]), int(image_bgr.shape[1])), input_hw)
    rgb = image_bgr.permute(2, 0, 1).flip(0).unsqueeze(0).to(torch.float32)
    if info.resized_hw != info.original_hw:
        rgb = F.interpolate(rgb, size=info.resized_hw, mode="bilinear", align_corners=False, antialias=False)
        rgb = rgb.round_().clamp_(0.0, 255.0)
    canvas = torch.full((1, 3, *info.input_hw), float(PAD_VALUE), dtype=torch.float32, device=image_bgr.device)
    top, left = info.pad_top, info.pad_left
    canvas[:, :, top : top + info.resized_hw[0], left : left + info.resized_hw[1]] = rgb
    canvas /= 255.0
    return canvas.to(dtype), info
