# syntax=docker/dockerfile:1
# The edge agent (`yolo-ota agent`) on a device, on top of an image that already has a CUDA build of torch.
#
# The base image brings torch, CUDA and cuDNN for the device; this adds only `yolo-ota[agent]` (httpx,
# cryptography, OpenCV headless) and keeps the image's torch: pip is told to keep the installed version.
#
#   x86_64 GPUs (industrial PCs, servers): an NVIDIA PyTorch image, the default below, or a PyTorch CUDA
#   runtime image, e.g. --build-arg BASE_IMAGE=pytorch/pytorch:<version>-cuda<x.y>-cudnn<n>-runtime
#   Jetson: an image matched to the device's JetPack/L4T release (nvcr.io/nvidia/l4t-pytorch, or NVIDIA's
#   JetPack-matched PyTorch images); its Python must be 3.11 or later (the project's requires-python), which
#   rules out the JetPack 5 images (Ubuntu 20.04, Python 3.8).
#
# The torch in the image decides which bundles this device can run (DESIGN.md section 4): a bundle exported
# with torch X.Y needs torch X.Y or newer here, and its cuda-* variants need a working CUDA device. The service
# skips a device that cannot run a version (`skipped_incompatible`). Pass MIN_TORCH (the `ota.fp.torch`
# major.minor of the versions you roll out) and the build fails on a base image that is too old.
#
#   docker build -f infra/docker/agent.Dockerfile --build-arg MIN_TORCH=2.10 -t yolo-ota-agent:0.1.0 .
#   docker run -d --gpus all ...            # x86_64 with the NVIDIA Container Toolkit
#   docker run -d --runtime nvidia ...      # Jetson
# (the full command is in docs/deploy.md).

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3

FROM ${BASE_IMAGE}
ARG MIN_TORCH=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY pyproject.toml README.md /src/
COPY yolo_ota /src/yolo_ota
COPY exporters /src/exporters
COPY registry /src/registry
COPY edge_agent /src/edge_agent
# Refuse a base image whose Python or torch is too old, then install with the image's torch (and torchvision,
# when present) held at their installed versions. NVIDIA's images also pin their own packages through
# PIP_CONSTRAINT (/etc/pip/constraint.txt); pip honours both.
RUN python3 -c "import sys, torch; \
have = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); \
need = tuple(int(p) for p in '${MIN_TORCH}'.split('.')[:2]) if '${MIN_TORCH}' else (0, 0); \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit(0 if sys.version_info >= (3, 11) and have >= need else 'needs Python >= 3.11 and torch >= ${MIN_TORCH}')" \
    && python3 -m pip list --format=freeze | grep -E '^(torch|torchvision)==' > /tmp/keep-torch.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/keep-torch.txt "/src[agent]" \
    && rm -rf /src /tmp/keep-torch.txt
RUN useradd --system --uid 10001 --user-group --groups video --home-dir /var/lib/yolo-ota-agent --create-home \
    --shell /usr/sbin/nologin yolo-ota
# Settings are YOLO_OTA_AGENT_* variables (docs/edge-agent.md); the server, device id and enrollment token
# come from `docker run -e ...`. The local API listens on all interfaces inside the container: publish it on
# the host's loopback (-p 127.0.0.1:8710:8710) unless other machines should reach it.
ENV YOLO_OTA_AGENT_DATA_DIR=/var/lib/yolo-ota-agent \
    YOLO_OTA_AGENT_LISTEN=0.0.0.0:8710 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/yolo-ota-agent
VOLUME ["/var/lib/yolo-ota-agent"]
EXPOSE 8710
# /healthz is 200 while a validated model serves and 503 before the first one: "unhealthy" until then.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8710/healthz', timeout=4)"]
ENTRYPOINT ["yolo-ota"]
CMD ["agent"]
