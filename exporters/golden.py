"""Golden data: fixed inputs, the eager model's raw outputs on them, and the reference detections.

Stored as ``golden.npz`` in a bundle; the exporter writes it, and every gate run (at export, on a device)
compares a TorchScript variant's outputs with it. Plain numpy arrays only (``allow_pickle=False`` on load)::

    inputs            float32 (N, 3, H, W)  letterboxed RGB in [0, 1]
    input_names       str (N,)              image file name, or ``noise-<k>``
    outputs           float32 (N, 4+nc, A)  eager fp32 model output on ``inputs``, on the CPU
    outputs_cuda      float32 (N, 4+nc, A)  the same on a CUDA device, TF32 off (only when CUDA variants were made)
    detections        float32 (M, 7)        image index, x1, y1, x2, y2, score, class id (after NMS)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from exporters.errors import BundleError
from exporters.postprocess import Detections

_KEYS = ("inputs", "input_names", "outputs", "detections")


@dataclass(frozen=True)
class Golden:
    """Golden inputs with the reference the variants are judged against."""

    inputs: np.ndarray
    input_names: tuple[str, ...]
    outputs: np.ndarray
    detections: tuple[Detections, ...]
    outputs_cuda: np.ndarray | None = None

    def raw_reference(self, device: Literal["cpu", "cuda"]) -> tuple[np.ndarray, Literal["cpu", "cuda"]]:
        """The eager outputs a variant on ``device`` is compared with, and which device produced them.

        Raw parity measures what the conversion to TorchScript changed, so a CUDA variant is compared with the
        eager model on CUDA when the bundle has that reference: CPU and GPU kernels round differently.
        """
        if device == "cuda" and self.outputs_cuda is not None:
            return self.outputs_cuda, "cuda"
        return self.outputs, "cpu"

    @property
    def reference_count(self) -> int:
        """Total reference detections over all golden inputs."""
        return sum(len(d) for d in self.detections)

    def save(self, path: Path) -> None:
        """Write ``golden.npz`` (compressed)."""
        rows = [
            np.concatenate(
                [np.full((len(d), 1), index, np.float32), d.boxes, d.scores[:, None], d.class_ids[:, None]], axis=1
            )
            for index, d in enumerate(self.detections)
        ]
        table = np.concatenate(rows, axis=0).astype(np.float32) if rows else np.zeros((0, 7), np.float32)
        arrays = {
            "inputs": self.inputs.astype(np.float32),
            "input_names": np.array(self.input_names),
            "outputs": self.outputs.astype(np.float32),
            "detections": table,
        }
        if self.outputs_cuda is not None:
            arrays["outputs_cuda"] = self.outputs_cuda.astype(np.float32)
        with path.open("wb") as handle:
            np.savez_compressed(handle, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, path: Path) -> Golden:
        """Read ``golden.npz``; raise ``BundleError`` when it is not golden data."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [key for key in _KEYS if key not in data.files]
                if missing:
                    raise BundleError(f"{path.name} lacks {', '.join(missing)}: not golden data")
                arrays = {key: data[key] for key in _KEYS}
                outputs_cuda = data["outputs_cuda"] if "outputs_cuda" in data.files else None
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path.name} cannot be read as golden data: {exc}") from exc
        inputs, outputs, table = arrays["inputs"], arrays["outputs"], arrays["detections"]
        if inputs.ndim != 4 or outputs.ndim != 3 or len(inputs) != len(outputs) or table.ndim != 2:
            raise BundleError(f"{path.name} has inconsistent shapes {inputs.shape}, {outputs.shape}, {table.shape}")
        if outputs_cuda is not None and outputs_cuda.shape != outputs.shape:
            raise BundleError(f"{path.name} has CUDA outputs of shape {outputs_cuda.shape}, not {outputs.shape}")
        return cls(
            inputs=inputs,
            input_names=tuple(str(name) for name in arrays["input_names"]),
            outputs=outputs,
            detections=tuple(_split_detections(table, len(inputs))),
            outputs_cuda=outputs_cuda,
        )


def _split_detections(table: np.ndarray, images: int) -> list[Detections]:
    result = []
    for index in range(images):
        rows = table[table[:, 0] == index]
        result.append(
            Detections(
                boxes=np.ascontiguousarray(rows[:, 1:5], dtype=np.float32),
                scores=np.ascontiguousarray(rows[:, 5], dtype=np.float32),
                class_ids=rows[:, 6].astype(np.int64),
            )
        )
    return result


def noise_inputs(count: int, input_hw: tuple[int, int], seed: int) -> np.ndarray:
    """Seeded uniform-noise inputs, float32 (count, 3, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    return rng.random((count, 3, *input_hw), dtype=np.float32)


def stack_inputs(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate (k, 3, H, W) float32 blocks into one contiguous input array."""
    return np.ascontiguousarray(np.concatenate(list(parts), axis=0), dtype=np.float32)
