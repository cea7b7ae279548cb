#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a GPU machine that has python3 (3.12) with torch, torchvision, onnx,
# ONNX Runtime and OpenCV but none of the project's other packages, and no network. Run here, in the repo root;
# the wheels land in .whl/ (ignored by git; carried to the GPU machine with the working tree).
#     bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# The versions this repo's uv.lock resolves, so the GPU run uses what the tests here use.
locked() { uv export --all-extras --no-hashes --no-header --no-annotate 2>/dev/null | grep -i "^$1==" | cut -d';' -f1 | tr -d ' '; }
packages=(ultralytics ultralytics-thop pydantic pydantic-core pydantic-settings python-dotenv annotated-types
          typing-inspection typing-extensions cryptography cffi pycparser onnxslim)
specs=()
for name in "${packages[@]}"; do
    spec=$(locked "$name")
    [ -n "$spec" ] || { echo "not in uv.lock: $name" >&2; exit 1; }
    specs+=("$spec")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${specs[@]}"
du -sh .whl
