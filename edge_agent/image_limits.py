"""Limits on the images the local API decodes: pixels read from the header before decoding, and decode slots.

A PNG of a few hundred KB can declare 12000 x 12000 pixels and decode to 400 MB (a decompression bomb). OpenCV,
which decodes for serving, allocates what the header declares, so the header is read first, with Pillow's lazy
``Image.open`` (it parses the header and stops: no pixel is decoded), and an image whose width x height is over
``max_image_pixels`` is refused before OpenCV sees it. Only formats both libraries read the same way are sized
(``SIZED_FORMATS``); anything else is refused as not an image, since its size cannot be known without decoding.

``DecodeSlots`` caps how many ``/v1/detect`` requests hold a body, a decoded frame and a detection at once, so
memory stays below about ``max_concurrent_decodes x (2 x max_image_bytes + 3 x max_image_pixels)`` bytes whatever
the traffic. A request waits at most ``decode_wait_s`` for a slot, then is answered 503 with Retry-After: a short
bounded wait absorbs a burst of frames from several cameras (inference runs one at a time per model anyway),
while a flood is turned away at once instead of piling up threads that each hold an image.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from edge_agent.errors import DetectBusy, ImageRefused

# The camera formats OpenCV decodes and Pillow sizes from their headers; the signatures of one cannot be taken
# for another, so both read the same header.
SIZED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")

# warnings.catch_warnings swaps a process-wide list: one header check at a time keeps the swaps from crossing.
# Reading a header takes microseconds.
_HEADER_LOCK = threading.Lock()


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it; ``ValueError`` when it is not an image of
    ``SIZED_FORMATS``."""
    with _HEADER_LOCK, warnings.catch_warnings():
        # Pillow warns about big images on its own (from 89 MP on); the limit that applies here is ours, checked
        # by the caller, and a warning would be an error in the tests.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=SIZED_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: over ours too
            raise ImageRefused(f"the image is too large to decode here: {exc}") from None
        # ImportError: Ultralytics, where a process imports it (the agent never does), wraps Image.open and tries
        # an optional HEIF plugin on bytes Pillow cannot identify.
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as exc:
            kinds = ", ".join(SIZED_FORMATS)
            raise ValueError(f"{len(data)} bytes are not a {kinds} image whose header can be read ({exc})") from None
    return int(width), int(height)


def check_pixels(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height); ``ImageRefused`` naming the limit when width x height is over ``max_pixels``."""
    width, height = image_size(data)
    if width * height > max_pixels:
        raise ImageRefused(
            f"the image is {width} x {height} = {width * height} pixels; max_image_pixels is {max_pixels}: "
            "refused before decoding"
        )
    return width, height


class DecodeSlots:
    """At most ``capacity`` holders at once; a holder waits at most ``wait_s`` for a slot, then ``DetectBusy``."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self._free = threading.BoundedSemaphore(capacity)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._free.acquire(timeout=self.wait_s):
            raise DetectBusy(
                f"all {self.capacity} detect slots (max_concurrent_decodes) stayed busy for {self.wait_s} s: "
                "try again shortly"
            )
        try:
            yield
        finally:
            self._free.release()
