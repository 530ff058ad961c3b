# syntax=docker/dockerfile:1
# batchmask's run-time image: `batchmask run`, `jobs run`, `jobs submit` and Ray workers, with the
# default model's ONNX export built in. No TensorFlow (training stays in the full install).
# Build: scripts/build_image.sh [--base IMAGE] [--tag TAG] [--gpu] (docker, podman or buildah), or
# plainly `docker build -t batchmask:latest .`. README.md, "Deploying"; docs/design.md, "The image".
#
# BASE: any image with `python3` (>= 3.11) that can make a venv: an official python:*-slim,
# Debian with python3 + python3-venv, or docker/cuda-base.Dockerfile for the GPU variant.
ARG BASE=docker.io/library/python:3.12-slim

# ---- the virtualenv: run-time requirements, ONNX Runtime and dumb-init (batchmask comes later,
# so a change to the source leaves this ~750 MB layer cached)
FROM ${BASE} AS venv
# onnxruntime, or onnxruntime-gpu for the GPU variant (the same `onnxruntime` module)
ARG ONNXRUNTIME=onnxruntime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/batchmask/venv
ENV PATH=/opt/batchmask/venv/bin:$PATH
# docker/wheels/ is empty (pip uses the package index) unless build_image.sh --wheels filled it
COPY docker/pip.sh docker/slim.sh docker/requirements-runtime.txt /tmp/build/
COPY docker/wheels/ /tmp/build/wheels/
RUN sh /tmp/build/pip.sh install -r /tmp/build/requirements-runtime.txt "${ONNXRUNTIME}>=1.18" "dumb-init>=1.2.5" \
    && sh /tmp/build/slim.sh /opt/batchmask/venv
# gs:// and az:// stores (batchmask[gcs], [azure]): build_image.sh --extras gcs,azure passes their
# requirements here. Empty by default: the image reads local folders, S3 and http(s) only, and this
# layer of its own leaves the one above cached either way.
ARG EXTRA_REQUIREMENTS=""
# hadolint ignore=SC2086
RUN if [ -n "${EXTRA_REQUIREMENTS}" ]; then \
      sh /tmp/build/pip.sh install ${EXTRA_REQUIREMENTS} && sh /tmp/build/slim.sh /opt/batchmask/venv; fi

# ---- batchmask's wheel (without dependencies: they are the requirements above)
FROM venv AS wheel
COPY pyproject.toml README.md /tmp/build/src/
COPY batchmask/ /tmp/build/src/batchmask/
RUN sh /tmp/build/pip.sh wheel --no-deps -w /tmp/dist /tmp/build/src \
    && pip install --no-deps --no-index /tmp/dist/*.whl

# ---- the default model's ONNX export, in the cache layout batchmask.inference.backends reads. build_image.sh
# puts the host's cached export in docker/cache/; without one, this stage installs the full package
# (TensorFlow, in a venv of its own that the final image does not copy) and exports it here.
FROM wheel AS onnx
ENV BATCHMASK_CACHE_DIR=/opt/batchmask/cache
COPY docker/cache/ /opt/batchmask/cache/
COPY docker/export_onnx.py /tmp/build/
RUN python3 /tmp/build/export_onnx.py --cached-only \
    || { python3 -m venv /tmp/export \
         && PATH=/tmp/export/bin:$PATH sh /tmp/build/pip.sh install /tmp/build/src \
         && /tmp/export/bin/python /tmp/build/export_onnx.py \
         && python3 /tmp/build/export_onnx.py --cached-only; }

# ---- the image
FROM ${BASE}
# A fixed numeric user (Kubernetes' runAsNonRoot can check it); its dirs are also group-0
# writable, for clusters that run images under an arbitrary UID in group 0.
ARG UID=10001
RUN useradd --uid "${UID}" --gid 0 --create-home --home-dir /home/batchmask --shell /bin/sh batchmask \
    && mkdir -p /var/lib/batchmask/locks /var/lib/batchmask/state /data \
    && chown -R "${UID}:0" /var/lib/batchmask /data /home/batchmask \
    && chmod -R g+rwX /var/lib/batchmask /data /home/batchmask
COPY --from=venv /opt/batchmask/venv /opt/batchmask/venv
# COPY, not RUN --mount=from=wheel: buildah's layer cache does not look at a mount's content, so a
# changed wheel would be skipped. The wheel (~15 MB, mostly the model) stays in this layer.
COPY --from=wheel /tmp/dist/ /tmp/dist/
RUN /opt/batchmask/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl && rm -rf /tmp/dist
COPY --from=onnx --chown=${UID}:0 /opt/batchmask/cache /opt/batchmask/cache
ENV PATH=/opt/batchmask/venv/bin:$PATH \
    HOME=/home/batchmask \
    BATCHMASK_CACHE_DIR=/opt/batchmask/cache \
    BATCHMASK_LOCK_DIR=/var/lib/batchmask/locks \
    XDG_STATE_HOME=/var/lib/batchmask/state \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=3
USER ${UID}
WORKDIR /data
# dumb-init as PID 1: it reaps Ray's orphaned processes and passes SIGTERM/SIGINT to batchmask
# only (--single-child), which saves what is done and exits; Ray's own processes are stopped by it.
ENTRYPOINT ["dumb-init", "--single-child", "--"]
CMD ["batchmask", "--help"]
LABEL org.opencontainers.image.title="batchmask" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="batchmask run-time image. The default model is trained on WIDER FACE: non-commercial research use only."
