#!/usr/bin/env bash
# The GPU evidence in one run, for a bare GPU machine with python3, torch, torchvision, onnx, ONNX Runtime and
# OpenCV (the project's other packages travel as wheels in .whl/: make them first with bench/gpu_wheels.sh).
#
#     bash bench/gpu_check.sh            # writes $OUT/gpu_check.json (OUT defaults to ./gpu-check) and a log per step
#     DEVICE=cpu IMGSZ=64 ITERS=5 bash bench/gpu_check.sh    # a smoke run of the script itself on a CPU machine
#
# Steps, each with its own time limit so that the whole stays under 8 minutes:
#   1. the CUDA tests (pytest -m cuda): CUDA variants' gates, the device pipeline, CUDA graphs, the agent's
#      CUDA-to-CPU fallback;
#   2. bench/parity.py on the trained test detector: raw and detection parity per variant, cuda-fp32 against the
#      eager model on the CPU and on CUDA (the MSE figures);
#   3. bench/gpu_serve.py at 640: per format (TorchScript, AOTInductor, ONNX), fp32 and fp16: bare forward, the
#      agent's path, the device pipeline with and without a CUDA graph, Ultralytics' predict; 1 and 4 cameras;
#      the export gates' memory sweep is in the exported manifest it reads;
# then gathers every step's figures into one JSON file.
# The trained detector comes from the tests' cache (.cache/fixtures, carried with the tree) or is trained here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export YOLO_OFFLINE=true YOLO_CONFIG_DIR=$(mktemp -d) PYTHONUNBUFFERED=1 XDG_CACHE_HOME=${XDG_CACHE_HOME:-$PWD/.cache/fixtures}
python3 - <<'PY' > "$OUT/machine.json" || exit 1
import json, platform, torch
gpu = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if gpu else None,
                  "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpu else None}))
PY
cat "$OUT/machine.json"

step() {  # step NAME LIMIT_S COMMAND...: run, keep its log, record its exit status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" >> "$OUT/steps.jsonl"
    echo "== $name: exit $rc in $((SECONDS - started)) s"
    tail -n 25 "$OUT/$name.log"
}
rm -f "$OUT/steps.jsonl"
WEIGHTS=$(python3 -c "from yolo_ota.demo.detectors import trained_weights; print(trained_weights(lambda _: None)[0]['v2'])" 2>"$OUT/train.log")
echo "trained detector: $WEIGHTS"

step cuda_tests 200 python3 -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" \
    tests/test_gates.py tests/test_export.py tests/test_device_pipeline.py tests/test_agent_cuda.py
step parity 90 python3 bench/parity.py --model "$WEIGHTS" --imgsz 160 --out "$OUT/parity.json"
step serve 240 python3 bench/gpu_serve.py --device "${DEVICE:-cuda}" --imgsz "${IMGSZ:-640}" \
    --formats torchscript,aoti,onnx --iters "${ITERS:-200}" --warmup 20 --cameras 4 --frames 100 --out "$OUT/serve.json"

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
result = {"machine": json.loads((out / "machine.json").read_text()),
          "steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]}
for name in ("parity", "serve"):
    path = out / f"{name}.json"
    result[name] = json.loads(path.read_text()) if path.is_file() else None
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
PY
