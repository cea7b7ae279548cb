"""Numeric drift by device and conversion: how far each way of running a model lands from the eager CPU model.

    uv run --all-extras python bench/parity.py --model path/to/weights.pt --imgsz 160 [--golden-image IMG ...]
        [--out parity.json]

Runs the golden inputs (the sample images, the given images, seeded noise) through the eager model and the
TorchScript, AOTInductor and ONNX exports on every device and dtype this machine has (ONNX on CUDA only with
ONNX Runtime's CUDA provider), and prints MSE, max abs error and cosine against
the eager fp32 CPU output (what ``golden.npz`` stores) and against the eager model on the same device, plus the
detection match. On CUDA it repeats the fp32 runs with cuDNN's default algorithm choice, with deterministic
algorithms, and with cuDNN disabled, all with TF32 off. This is the evidence behind the raw-parity limits.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-ota-bench-"))

import numpy as np
import torch

from exporters import yolo
from exporters.aoti import compiler_available, export_aoti
from exporters.export import ExportRequest, build_golden
from exporters.fingerprint import collect, cuda_usable
from exporters.formats import Compatibility, FormatVariant
from exporters.gates import GateThresholds, detection_parity, first_tensor, raw_parity, run_batched
from exporters.postprocess import decode
from exporters.runners import ONNX_PROVIDERS, load_runner, onnxruntime_info
from exporters.runtime import load_torchscript


def _runner(path: Path, name: str, fmt: str) -> Callable[[torch.Tensor], object]:
    device, precision = name.split("-")[:2]
    spec = FormatVariant(
        name=name, path=path.name, device=device, dtype="float16" if precision == "fp16" else "float32", batch=1,
        format=fmt, compatibility=Compatibility(runtime="onnxruntime" if fmt == "onnx" else "torch"),
    )  # fmt: skip
    return load_runner(path, spec)


def _cudnn_mode(mode: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.enabled = mode != "cudnn off"
    torch.backends.cudnn.deterministic = mode == "deterministic"
    torch.backends.cudnn.benchmark = mode == "benchmark"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--golden-image", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    imgsz = (args.imgsz, args.imgsz)
    thresholds = GateThresholds()
    detector = yolo.load_detector(args.model)
    request = ExportRequest(
        model=args.model, out_dir=Path("unused"), imgsz=imgsz, golden_images=tuple(args.golden_image)
    )
    golden = build_golden(detector, request, thresholds)
    reference = golden.outputs
    fingerprint = collect()
    runs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def run(name: str, model: Callable[[torch.Tensor], object], device: str, dtype: torch.dtype, same_device=None):
        outputs = run_batched(lambda x: first_tensor(model(x)), golden.inputs, device=device, dtype=dtype, batch=1)
        runs[name] = (outputs, same_device)
        return outputs

    with tempfile.TemporaryDirectory() as tmp:
        eager_cpu = yolo.eager_model(detector)
        run("eager cpu fp32", eager_cpu, "cpu", torch.float32)
        ts_cpu = yolo.export_torchscript(
            detector,
            device="cpu",
            half=False,
            imgsz=imgsz,
            batch=1,
            destination=Path(tmp) / "cpu.torchscript",
            fingerprint=fingerprint,
        )
        run("torchscript cpu-fp32", load_torchscript(ts_cpu, "cpu"), "cpu", torch.float32, reference)
        aoti = compiler_available() is None
        _, providers = onnxruntime_info()
        if aoti:
            path = export_aoti(detector, device="cpu", half=False, imgsz=imgsz, batch=1,
                               destination=Path(tmp) / "cpu.pt2")  # fmt: skip
            run("aoti cpu-fp32", _runner(path, "cpu-fp32", "aoti"), "cpu", torch.float32, reference)
        if "CPUExecutionProvider" in providers:
            path = yolo.export_onnx(detector, device="cpu", half=False, imgsz=imgsz, batch=1,
                                    destination=Path(tmp) / "cpu.onnx")  # fmt: skip
            run("onnx cpu-fp32", _runner(path, "cpu-fp32", "onnx"), "cpu", torch.float32, reference)
        if cuda_usable():
            files = {}
            for name, half in (("cuda-fp32", False), ("cuda-fp16", True)):
                files[name] = yolo.export_torchscript(
                    detector,
                    device="cuda",
                    half=half,
                    imgsz=imgsz,
                    batch=1,
                    destination=Path(tmp) / f"{name}.torchscript",
                    fingerprint=fingerprint,
                )
            eager_cuda = yolo.eager_model(detector).cuda()
            for mode in ("default", "deterministic", "benchmark", "cudnn off"):
                _cudnn_mode(mode)
                same = run(f"eager cuda fp32 [{mode}]", eager_cuda, "cuda", torch.float32)
                module = load_torchscript(files["cuda-fp32"], "cuda:0")
                run(f"torchscript cuda-fp32 [{mode}]", module, "cuda", torch.float32, same)
            _cudnn_mode("default")
            eager_half = yolo.eager_model(detector).cuda().half()
            same = run("eager cuda fp16", eager_half, "cuda", torch.float16)
            run("torchscript cuda-fp16", load_torchscript(files["cuda-fp16"], "cuda:0"), "cuda", torch.float16, same)
            _cudnn_mode("default")
            same_fp32 = runs["eager cuda fp32 [default]"][0]
            for name, half, same_run in (("cuda-fp32", False, same_fp32), ("cuda-fp16", True, same)):
                dtype = torch.float16 if half else torch.float32
                if aoti:
                    path = export_aoti(detector, device="cuda", half=half, imgsz=imgsz, batch=1,
                                       destination=Path(tmp) / f"{name}.pt2")  # fmt: skip
                    run(f"aoti {name}", _runner(path, name, "aoti"), "cuda", dtype, same_run)
                if all(p in providers for p in ONNX_PROVIDERS["cuda"]):
                    path = yolo.export_onnx(detector, device="cuda", half=half, imgsz=imgsz, batch=1,
                                            destination=Path(tmp) / f"{name}.onnx")  # fmt: skip
                    run(f"onnx {name}", _runner(path, name, "onnx"), "cuda", dtype, same_run)

    print(
        f"\nmachine: {fingerprint.summary()}; model {args.model} at {args.imgsz}; {len(golden.inputs)} golden inputs, "
        f"{golden.reference_count} reference detections; output magnitude max {np.abs(reference).max():.1f}\n"
    )
    print("| run | MSE vs eager cpu | max abs vs eager cpu | cosine | MSE vs eager same device | boxes matched |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, (outputs, same) in runs.items():
        vs_cpu = raw_parity(outputs, reference, judged=True, mse_max=thresholds.raw_mse_max)
        vs_same = raw_parity(outputs, same, judged=True, mse_max=0) if same is not None else None
        det = detection_parity(
            outputs, tuple(decode(reference, conf=thresholds.conf, iou=thresholds.nms_iou)), thresholds
        )
        print(
            f"| {name} | {vs_cpu.mse:.2e} | {vs_cpu.max_abs:.2e} | {vs_cpu.cosine:.8f} | "
            f"{f'{vs_same.mse:.2e}' if vs_same else '-'} | {det.matched}/{det.reference_detections} "
            f"(+{det.candidate_detections - det.matched}) |"
        )
        rows.append({"run": name, "mse_vs_eager_cpu": vs_cpu.mse, "max_abs_vs_eager_cpu": vs_cpu.max_abs,
                     "cosine": vs_cpu.cosine, "mse_vs_eager_same_device": vs_same.mse if vs_same else None,
                     "matched": det.matched, "reference_detections": det.reference_detections,
                     "candidate_detections": det.candidate_detections})  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"machine": fingerprint.summary(), "model": args.model, "imgsz": args.imgsz,
                                        "inputs": len(golden.inputs), "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
