"""``yolo-ota export``: one Ultralytics detector in, one gated bundle out.

Steps: check the arguments and the output folder, load the model, build the golden data from the sample images
shipped with Ultralytics (plus any the user gives, plus seeded noise), export each variant this machine can
make, gate it, then write the manifest with every file's digest. The bundle is assembled in a hidden sibling
folder and moved into place at the end, so a crash never leaves a half-written bundle under the asked name.
A bundle whose gates fail is still written, with ``gates_passed: false``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from exporters import signing, yolo
from exporters.bundle import (
    GOLDEN_NAME,
    VARIANT_NAMES,
    FileEntry,
    GoldenInfo,
    Manifest,
    Source,
    TensorSpec,
    Variant,
    list_files,
    write_manifest,
)
from exporters.errors import ExportArgumentError, OutputDirError
from exporters.fingerprint import Fingerprint, collect, cuda_usable
from exporters.formats import (
    FORMATS_NAME,
    Format,
    FormatIndex,
    FormatVariant,
    split_variant,
    torchscript_compatibility,
    variant_file,
    variant_name,
    write_index,
)
from exporters.gates import GateThresholds, ProgressCallback, VariantGates, first_tensor, run_batched, strict_fp32
from exporters.golden import Golden, noise_inputs, stack_inputs
from exporters.local_gate import gate_variant
from exporters.postprocess import decode
from exporters.preprocess import letterbox, read_image, to_input_array
from exporters.variant_export import make_variant_file, why_not_here

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRequest:
    """What to export and how; the CLI's options one to one."""

    model: str
    out_dir: Path
    imgsz: tuple[int, int] = (640, 640)
    variants: tuple[str, ...] = VARIANT_NAMES  # device x precision: cpu-fp32, cuda-fp32, cuda-fp16
    formats: tuple[Format, ...] = ("torchscript",)  # each variant is made in each of these formats
    batch: int = 1
    latency_budget_ms: float | None = None
    name: str | None = None  # the product line; default: the model file's stem
    release: int | None = None  # default: the export's UTC time as YYYYMMDDHHMMSS (``default_release``)
    force: bool = False
    golden_images: tuple[Path, ...] = ()
    noise_inputs: int = 2
    seed: int = 0
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    signing_key: Path | None = None


@dataclass(frozen=True)
class ExportResult:
    """The written bundle and what it took."""

    bundle_dir: Path
    manifest: Manifest
    export_s: dict[str, float]
    gate_s: dict[str, float]

    signed: bool

    @property
    def passed(self) -> bool:
        return self.manifest.gates_passed


def _check_request(request: ExportRequest) -> None:
    unknown = [v for v in request.variants if v not in VARIANT_NAMES]
    if unknown:
        raise ExportArgumentError(f"unknown variant {', '.join(unknown)}; known: {', '.join(VARIANT_NAMES)}")
    if not request.variants:
        raise ExportArgumentError("no variant asked for")
    if not request.formats:
        raise ExportArgumentError("no format asked for")
    if request.batch < 1:
        raise ExportArgumentError(f"--batch must be at least 1, got {request.batch}")
    if request.latency_budget_ms is not None and request.latency_budget_ms <= 0:
        raise ExportArgumentError(f"--latency-budget-ms must be positive, got {request.latency_budget_ms}")
    for image in request.golden_images:
        if not image.is_file():
            raise ExportArgumentError(f"golden image {image} does not exist")
    out = request.out_dir
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not request.force:
            raise OutputDirError(f"output directory {out} is not empty (use --force to replace it)")
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved in (cwd, *cwd.parents, Path.home().resolve()):
            raise OutputDirError(f"refusing to replace {out}: it is the working directory, a parent of it, or home")


def plan_variants(
    asked: Sequence[str], *, cuda: bool, formats: Sequence[Format] = ("torchscript",)
) -> tuple[list[str], dict[str, str]]:
    """Split the asked variants, in each asked format, into those this machine can make and check and those
    skipped, with the reason."""
    made, skipped = [], {}
    for fmt in formats:
        for base in asked:
            name = variant_name(base, fmt)
            reason = why_not_here(fmt, "cuda" if base.startswith("cuda") else "cpu", cuda=cuda)
            if reason:
                skipped[name] = reason
            else:
                made.append(name)
    return made, skipped


def build_golden(
    detector: yolo.LoadedDetector,
    request: ExportRequest,
    thresholds: GateThresholds,
    *,
    cuda_reference: bool = False,
) -> Golden:
    """Letterbox the sample and user images, add seeded noise, and record the eager fp32 model's answers:
    on the CPU always, and on CUDA too when ``cuda_reference`` (for the CUDA variants' raw parity). The eager
    model runs at the variants' batch size, since kernels may be chosen, and round, differently per shape."""
    images = [*yolo.sample_images(), *request.golden_images]
    boxed = [letterbox(read_image(path), request.imgsz)[0] for path in images]
    names = [path.name for path in images] + [f"noise-{k}" for k in range(request.noise_inputs)]
    inputs = stack_inputs([to_input_array(boxed), noise_inputs(request.noise_inputs, request.imgsz, request.seed)])
    eager = yolo.eager_model(detector)
    outputs = run_batched(
        lambda x: first_tensor(eager(x)), inputs, device="cpu", dtype=torch.float32, batch=request.batch
    )
    detections = decode(outputs, conf=thresholds.conf, iou=thresholds.nms_iou, max_det=thresholds.max_det)
    outputs_cuda = None
    if cuda_reference:
        eager_cuda = eager.to("cuda:0")
        with strict_fp32():
            outputs_cuda = run_batched(
                lambda x: first_tensor(eager_cuda(x)), inputs, device="cuda:0", dtype=torch.float32, batch=request.batch
            )
        del eager_cuda
        torch.cuda.empty_cache()
    return Golden(
        inputs=inputs,
        input_names=tuple(names),
        outputs=outputs,
        detections=tuple(detections),
        outputs_cuda=outputs_cuda,
    )


def default_release(at: datetime) -> int:
    """The release number of an export made at ``at`` when none is given: its UTC time as YYYYMMDDHHMMSS, which
    grows with every later export and reads as a date."""
    return int(at.astimezone(UTC).strftime("%Y%m%d%H%M%S"))


def _variant_record(name: str, batch: int) -> FormatVariant:
    """The variant ``name`` (e.g. ``cuda-fp16-aoti``) before export; its compatibility is filled in once made."""
    base, fmt = split_variant(name)
    device, precision = base.split("-", 1)
    return FormatVariant(
        name=name,
        path=variant_file(name),
        device="cuda" if device == "cuda" else "cpu",
        dtype="float16" if precision == "fp16" else "float32",
        batch=batch,
        format=fmt,
        compatibility=torchscript_compatibility(),
    )


def _tensor_specs(detector: yolo.LoadedDetector, request: ExportRequest, anchors: int) -> tuple[TensorSpec, ...]:
    h, w = request.imgsz
    nc = detector.num_classes
    spec_in = TensorSpec(
        name="images",
        shape=[request.batch, 3, h, w],
        dtype="float32 (float16 for cuda-fp16)",
        layout="BCHW",
        description="RGB, letterboxed (aspect kept, centred, pad value 114), scaled to [0, 1]",
    )
    spec_out = TensorSpec(
        name="output0",
        shape=[request.batch, 4 + nc, anchors],
        dtype="float32 (float16 for cuda-fp16)",
        layout="B,4+nc,A",
        description="per anchor: cx, cy, w, h in input pixels, then one sigmoid score per class; NMS not applied",
    )
    return spec_in, spec_out


def _finish_dir(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)


def export_bundle(request: ExportRequest, progress: ProgressCallback | None = None) -> ExportResult:
    """Export, gate, sign (with ``request.signing_key``) and write a bundle; see the module docstring."""
    say = progress or (lambda _msg: None)
    _check_request(request)
    # Read the key before minutes of work, so a wrong path fails at once.
    private_key = signing.load_private_key(request.signing_key) if request.signing_key else None
    say(f"loading {request.model}")
    detector = yolo.load_detector(request.model)
    yolo.check_imgsz(detector, request.imgsz)
    made, skipped = plan_variants(request.variants, cuda=cuda_usable(), formats=request.formats)
    for name, reason in skipped.items():
        say(f"skipping {name}: {reason}")
    if not made:
        raise ExportArgumentError(f"none of the asked variants can be made here ({'; '.join(skipped.values())})")
    fingerprint = collect()
    thresholds = request.thresholds
    out = request.out_dir.resolve()
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        manifest, export_s, gate_s = _export_into(
            staging, request, detector, made, skipped, fingerprint, thresholds, say
        )
        if private_key is not None:
            signing.sign_bundle(staging, private_key)
            say("manifest signed (manifest.sig)")
        _finish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out}")
    return ExportResult(
        bundle_dir=out, manifest=manifest, export_s=export_s, gate_s=gate_s, signed=private_key is not None
    )


def _export_into(
    staging: Path,
    request: ExportRequest,
    detector: yolo.LoadedDetector,
    made: list[str],
    skipped: dict[str, str],
    fingerprint: Fingerprint,
    thresholds: GateThresholds,
    say: ProgressCallback,
) -> tuple[Manifest, dict[str, float], dict[str, float]]:
    say(f"golden data: sample images + {len(request.golden_images)} of yours + {request.noise_inputs} noise")
    golden = build_golden(detector, request, thresholds, cuda_reference=any(n.startswith("cuda") for n in made))
    golden.save(staging / GOLDEN_NAME)
    say(f"golden data: {len(golden.inputs)} inputs, {golden.reference_count} reference detections")
    if golden.reference_count == 0:
        say(
            "warning: the model finds nothing in the golden images, so detection parity compares no boxes; "
            "give --golden-image frames in which it detects objects"
        )
    variants = {name: _variant_record(name, request.batch) for name in made}
    gates: dict[str, VariantGates] = {}
    export_s: dict[str, float] = {}
    gate_s: dict[str, float] = {}
    for position, (name, variant) in enumerate(variants.items(), start=1):
        say(f"[{position}/{len(variants)}] exporting {name} ({variant.format} on {variant.device}, {variant.dtype})")
        t0 = time.perf_counter()
        compatibility = make_variant_file(
            detector, variant, imgsz=request.imgsz, destination=staging / variant.path, fingerprint=fingerprint
        )
        variant = variants[name] = variant.model_copy(update={"compatibility": compatibility})
        export_s[name] = time.perf_counter() - t0
        say(f"[{position}/{len(variants)}] gating {name}")
        t0 = time.perf_counter()
        gates[name] = gate_variant(
            staging,
            variant,
            golden,
            thresholds=thresholds,
            fingerprint=fingerprint,
            latency_budget_ms=request.latency_budget_ms,
            progress=say,
        )
        gate_s[name] = time.perf_counter() - t0
    index = FormatIndex(
        variants={n: v for n, v in variants.items() if v.format != "torchscript"},
        gates={n: g for n, g in gates.items() if variants[n].format != "torchscript"},
    )
    listed = [GOLDEN_NAME, *(v.path for v in variants.values())]
    if index.variants:
        write_index(staging, index)
        listed.append(FORMATS_NAME)
    files = list_files(staging, listed)
    manifest = _manifest(
        request, detector, fingerprint, variants, skipped, golden, thresholds, gates=gates, files=files
    )
    write_manifest(staging, manifest)
    return manifest, export_s, gate_s


def _manifest(
    request: ExportRequest,
    detector: yolo.LoadedDetector,
    fingerprint: Fingerprint,
    variants: dict[str, FormatVariant],
    skipped: dict[str, str],
    golden: Golden,
    thresholds: GateThresholds,
    *,
    gates: dict[str, VariantGates],
    files: dict[str, FileEntry],
) -> Manifest:
    spec_in, spec_out = _tensor_specs(detector, request, anchors=int(golden.outputs.shape[-1]))
    noise_count = request.noise_inputs
    created = datetime.now(UTC)
    return Manifest.model_validate(
        {
            "name": request.name or Path(request.model).stem,
            "release": request.release or default_release(created),
            "task": "detect",
            "imgsz": request.imgsz,
            "stride": detector.stride,
            "names": detector.names,
            "input": spec_in,
            "output": spec_out,
            "created_at": created.isoformat(timespec="seconds"),
            "source": Source(
                model=Path(request.model).name,
                kind=detector.kind,
                weights_sha256=detector.weights_sha256,
                ultralytics=yolo.ultralytics_version(),
            ),
            "fingerprint": fingerprint,
            # TorchScript variants where schema 2 put them, so that older agents install them; the other
            # formats are in formats.json (listed in files, so signed with the manifest).
            "variants": {
                n: Variant(name=n, path=v.path, device=v.device, dtype=v.dtype, batch=v.batch)
                for n, v in variants.items()
                if v.format == "torchscript"
            },
            "skipped_variants": skipped,
            "golden": GoldenInfo(
                path=GOLDEN_NAME,
                reference_devices=["cpu", "cuda"] if golden.outputs_cuda is not None else ["cpu"],
                images=list(golden.input_names[: len(golden.input_names) - noise_count]),
                noise_inputs=noise_count,
                seed=request.seed,
            ),
            "thresholds": thresholds,
            "latency_budget_ms": request.latency_budget_ms,
            "gates": {n: g for n, g in gates.items() if variants[n].format == "torchscript"},
            "gates_passed": bool(gates) and all(g.passed for g in gates.values()),  # every format's
            "files": files,
        }
    )
