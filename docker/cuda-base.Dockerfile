# The GPU variant's base: NVIDIA's CUDA runtime with cuDNN (what onnxruntime-gpu's CUDA provider
# loads) plus python3 and venv. scripts/build_image.sh --gpu builds this, then the Dockerfile at the
# repository root on top of it with ONNXRUNTIME=onnxruntime-gpu.
# Unpinned apt packages (DL3008): the CUDA base pins the distribution; python3 follows it.
# onnxruntime-gpu 1.19+ wheels on PyPI are built for CUDA 12 and cuDNN 9.
ARG CUDA_BASE=docker.io/nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${CUDA_BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
