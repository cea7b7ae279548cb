"""Everything that touches Ultralytics: loading a detector, its eager forward pass, its TorchScript export, and
training the small synthetic detector used by tests and the demo.

This is the only module of the project that imports ``ultralytics``; the rest of ``exporters`` (bundle, gates,
fingerprint, pre/post-processing) stays importable on a device that has only torch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch

from exporters.errors import ExportArgumentError, ModelError, UnsupportedTaskError, one_line
from exporters.files import atomic_output
from exporters.fingerprint import Fingerprint
from exporters.runtime import load_torchscript, quiet_torchscript

log = logging.getLogger(__name__)

SUPPORTED_TASKS = ("detect",)
FINGERPRINT_EXTRA_FILE = "yolo_ota_fingerprint.json"
# Ultralytics' own logger integrations; each would open a run in a store of its own during training.
_LOGGER_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


@dataclass
class LoadedDetector:
    """A detection model loaded through Ultralytics, with what the manifest needs to know about it."""

    yolo: Any
    spec: str
    kind: Literal["weights", "config"]
    weights_sha256: str | None
    stride: int
    names: dict[int, str]
    head: str

    @property
    def num_classes(self) -> int:
        return len(self.names)


def _ultralytics() -> ModuleType:
    """Import ultralytics, keeping torch's CPU thread count: on import it sets it to cpu_count - 1, which would
    make export-time latency differ from what a device without ultralytics measures."""
    threads = torch.get_num_threads()
    import ultralytics

    torch.set_num_threads(threads)
    return ultralytics


def ultralytics_version() -> str:
    return str(_ultralytics().__version__)


def sample_images() -> list[Path]:
    """The sample images that ship inside the ultralytics package (no download)."""
    _ultralytics()
    from ultralytics.utils import ASSETS

    return sorted(Path(ASSETS).glob("*.jpg"))


@contextlib.contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    """Around an Ultralytics call: warnings-only logging, and torch's CPU thread count kept (its device
    selection sets cpu_count - 1, which would make export-time latency differ from a device's)."""
    _ultralytics()
    from ultralytics.utils import LOGGER

    level, threads = LOGGER.level, torch.get_num_threads()
    LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)
        torch.set_num_threads(threads)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_detector(spec: str) -> LoadedDetector:
    """Load ``spec``: an Ultralytics weights file (``.pt``) or a model config (``yolov8n.yaml``, a path or a name).

    Raises ``ModelError`` for a missing or unreadable model and ``UnsupportedTaskError`` for anything but a
    YOLO detection head.
    """
    suffix = Path(spec).suffix.lower()
    if suffix not in (".pt", ".yaml", ".yml"):
        raise ModelError(f"MODEL must be a .pt weights file or a .yaml model config, got {spec!r}")
    kind: Literal["weights", "config"] = "weights" if suffix == ".pt" else "config"
    if kind == "weights" and not Path(spec).is_file():
        raise ModelError(f"weights file {spec} does not exist")
    YOLO = _ultralytics().YOLO

    try:
        with _quiet_ultralytics():
            yolo = YOLO(spec, task=None)
    except FileNotFoundError as exc:
        raise ModelError(f"model config {spec} not found: {exc}") from exc
    except Exception as exc:  # Ultralytics raises many kinds for a corrupt or foreign file
        raise ModelError(f"cannot load {spec}: {one_line(exc)}") from exc
    task = str(yolo.task)
    if task not in SUPPORTED_TASKS:
        raise UnsupportedTaskError(f"{spec} is a {task!r} model; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    network: Any = yolo.model
    head = type(network.model[-1]).__name__
    if head not in ("Detect", "v10Detect", "YOLOEDetect"):
        raise UnsupportedTaskError(f"{spec} has a {head} head; supported: YOLO Detect heads (task detect)")
    names = {int(k): str(v) for k, v in yolo.names.items()}
    return LoadedDetector(
        yolo=yolo,
        spec=spec,
        kind=kind,
        weights_sha256=_sha256(Path(spec)) if kind == "weights" else None,
        stride=int(max(network.stride)),
        names=names,
        head=head,
    )


def check_imgsz(detector: LoadedDetector, imgsz: tuple[int, int]) -> None:
    """Refuse an image size that is not a positive multiple of the model's stride."""
    stride = detector.stride
    for side in imgsz:
        if side <= 0 or side % stride:
            lower, upper = max(stride, side // stride * stride), (side // stride + 1) * stride
            raise ExportArgumentError(
                f"image size {side} is not a multiple of the model stride {stride} (try {lower} or {upper})"
            )


def eager_model(detector: LoadedDetector) -> torch.nn.Module:
    """The eager fp32 model on the CPU in eval mode, exactly as trained (no layer fusion): the parity reference."""
    model: torch.nn.Module = copy.deepcopy(detector.yolo.model).float().cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ultralytics_export(
    detector: LoadedDetector,
    fmt: Literal["torchscript", "onnx"],
    *,
    device: Literal["cpu", "cuda"],
    half: bool,
    imgsz: tuple[int, int],
    batch: int,
    workdir: Path,
) -> Path:
    """Run Ultralytics' own exporter for ``fmt`` on ``device``, writing into ``workdir``; the produced file."""
    model = detector.yolo.model
    previous = getattr(model, "pt_path", None)
    # Ultralytics writes next to the source file, or into the working directory for a config:
    # point it at a private folder instead.
    model.pt_path = str(workdir / "model.pt")
    options: dict[str, Any] = {"simplify": False} if fmt == "onnx" else {}
    try:
        with _quiet_ultralytics(), quiet_torchscript():
            produced = detector.yolo.export(
                format=fmt,
                imgsz=list(imgsz),
                batch=batch,
                device="0" if device == "cuda" else "cpu",
                quantize=16 if half else None,
                nms=None,
                dynamic=False,
                verbose=False,
                **options,
            )
    except Exception as exc:
        raise ModelError(f"Ultralytics {fmt} export on {device} failed: {one_line(exc)}") from exc
    finally:
        if previous is None:
            with contextlib.suppress(AttributeError):
                del model.pt_path
        else:
            model.pt_path = previous
    return Path(produced)


def export_torchscript(
    detector: LoadedDetector,
    *,
    device: Literal["cpu", "cuda"],
    half: bool,
    imgsz: tuple[int, int],
    batch: int,
    destination: Path,
    fingerprint: Fingerprint,
) -> Path:
    """Export through Ultralytics' own TorchScript exporter, traced on ``device``; embed the fingerprint.

    The file loads with ``YOLO(path)`` (Ultralytics reads its ``config.txt`` extra file) and also carries
    ``yolo_ota_fingerprint.json``.
    """
    with tempfile.TemporaryDirectory(prefix="yolo-ota-export-") as tmp:
        produced = _ultralytics_export(
            detector, "torchscript", device=device, half=half, imgsz=imgsz, batch=batch, workdir=Path(tmp)
        )
        destination.parent.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {"config.txt": ""}
        scripted = load_torchscript(produced, device, extra_files=extra)
        extra[FINGERPRINT_EXTRA_FILE] = json.dumps(fingerprint.model_dump(mode="json"), sort_keys=True)
        with quiet_torchscript():
            torch.jit.save(scripted, str(destination), _extra_files=extra)
    return destination


def export_onnx(
    detector: LoadedDetector,
    *,
    device: Literal["cpu", "cuda"],
    half: bool,
    imgsz: tuple[int, int],
    batch: int,
    destination: Path,
) -> Path:
    """Export through Ultralytics' own ONNX exporter (fixed shape, no NMS, not simplified): the file loads with
    ``YOLO(path)`` and in any ONNX Runtime; its metadata holds the class names and stride."""
    with tempfile.TemporaryDirectory(prefix="yolo-ota-export-") as tmp:
        produced = _ultralytics_export(
            detector, "onnx", device=device, half=half, imgsz=imgsz, batch=batch, workdir=Path(tmp)
        )
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), destination)
    return destination


def deployable_module(detector: LoadedDetector) -> torch.nn.Module:
    """The model as Ultralytics exports it, for exporters of our own (AOTInductor): fp32, eval, convolutions
    and batch norms fused, and the Detect head returning the one output tensor (B, 4+nc, anchors)."""
    _ultralytics()
    from ultralytics.nn.modules import Detect

    model: torch.nn.Module = copy.deepcopy(detector.yolo.model).float().cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with _quiet_ultralytics():
        model = model.fuse()  # type: ignore[operator]
    for module in model.modules():
        if isinstance(module, Detect):
            module.export, module.dynamic, module.shape = True, False, None
            module.format = "torchscript"  # type: ignore[assignment]  # Ultralytics' class default is None
    return model


@contextlib.contextmanager
def integrations_off() -> Iterator[None]:
    """Switch Ultralytics' logger integrations (MLflow among them) off for this process only.

    The values are changed in memory; the user's Ultralytics settings file is left as it is.
    """
    _ultralytics()
    from ultralytics.utils import SETTINGS

    saved = {key: SETTINGS.get(key) for key in _LOGGER_INTEGRATIONS}
    for key in _LOGGER_INTEGRATIONS:
        dict.__setitem__(SETTINGS, key, False)
    try:
        yield
    finally:
        for key, value in saved.items():
            dict.__setitem__(SETTINGS, key, value)


def train_synthetic_detector(
    work_dir: Path,
    *,
    config: str = "yolov8n.yaml",
    weights: Path | None = None,
    epochs: int = 25,
    train_images: int = 256,
    imgsz: int = 160,
    seed: int = 0,
    batch: int = 16,
    optimizer: str = "auto",
    lr0: float = 0.01,
    warmup_epochs: float = 3.0,
    snapshot_epochs: Sequence[int] = (),
) -> Path:
    """Train ``config`` on synthetic PCB scenes (see ``exporters.synthetic``) on the CPU; return the weights.

    With ``weights`` (a ``.pt`` file of a detector with the synthetic classes), training starts from them instead
    of from ``config``'s random initialisation: a later version that is the earlier one trained further.
    ``optimizer``/``lr0``: as Ultralytics takes them (``auto`` picks both itself and ignores ``lr0``).
    ``warmup_epochs``: Ultralytics' learning-rate warm-up, at least 100 iterations when not 0; a run of a few
    hundred iterations needs 0, or it hardly leaves the warm-up's small rates.
    ``snapshot_epochs``: after each of these (1-based) epochs, the weights are also kept as
    ``snapshot_path(work_dir, epoch)``: earlier states of the same run, for a version trained less.
    About two and a half minutes on two cores with the defaults; the result finds the drawn parts with
    confidences well above 0.25. Nothing is downloaded and nothing is logged to MLflow or other trackers.
    """
    YOLO = _ultralytics().YOLO

    from exporters.synthetic import write_dataset

    if weights is not None and not weights.is_file():
        raise ModelError(f"weights file {weights} to continue training from does not exist")
    data_yaml = write_dataset(work_dir / "dataset", train_images=train_images, val_images=16, size=imgsz, seed=seed)
    with integrations_off(), _quiet_ultralytics():
        yolo = YOLO(str(weights) if weights is not None else config)
        yolo.train(
            data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, optimizer=optimizer, lr0=lr0,
            warmup_epochs=warmup_epochs, seed=seed, save_period=1 if snapshot_epochs else -1, workers=0,
            device="cpu", amp=False, plots=False, val=False, deterministic=True, project=str(work_dir / "runs"),
            name="synthetic", exist_ok=True, verbose=False,
        )  # fmt: skip
    trained = work_dir / "runs" / "synthetic" / "weights" / "last.pt"
    if not trained.is_file():
        raise ModelError(f"training finished without writing {trained}")
    _keep_snapshots(work_dir, snapshot_epochs)
    final = work_dir / "synthetic-detector.pt"
    shutil.copyfile(trained, final)
    return final


def snapshot_path(work_dir: Path, epoch: int) -> Path:
    """Where ``train_synthetic_detector`` keeps the weights after ``epoch`` (1-based) of ``snapshot_epochs``."""
    return work_dir / f"synthetic-detector-epoch{epoch}.pt"


def _keep_snapshots(work_dir: Path, epochs: Sequence[int]) -> None:
    from ultralytics.utils.torch_utils import strip_optimizer

    folder = work_dir / "runs" / "synthetic" / "weights"
    for epoch in epochs:
        saved = folder / f"epoch{epoch - 1}.pt"  # Ultralytics numbers its periodic checkpoints from 0
        if not saved.is_file():
            raise ModelError(f"training finished without the checkpoint of epoch {epoch} ({saved})")
        with _quiet_ultralytics():
            strip_optimizer(saved, str(snapshot_path(work_dir, epoch)))  # as last.pt is: EMA weights, no optimizer


def save_weights(detector: LoadedDetector, out: Path) -> Path:
    """Save the detector's model (as held in memory, e.g. altered by ``exporters.yolo_variants``) as an
    Ultralytics checkpoint that ``YOLO(out)`` and ``load_detector`` read; written atomically."""
    with atomic_output(out) as temporary, _quiet_ultralytics():
        detector.yolo.save(str(temporary))
    return out
