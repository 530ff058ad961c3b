#!/usr/bin/env bash
# Build batchmask's run-time image (Dockerfile) with whichever of docker, podman or buildah works.
#
#   scripts/build_image.sh [--base IMAGE] [--tag TAG] [--gpu] [--extras gcs,azure] [--wheels]
#                          [--tool docker|podman|buildah]
#
#   --base IMAGE  the base (ARG BASE; default python:3.12-slim); with --gpu, the CUDA base
#                 (default in docker/cuda-base.Dockerfile) that python3 and venv are added to
#   --tag TAG     default batchmask:latest (batchmask:latest-gpu with --gpu): the image name that
#                 `batchmask jobs crontab --format k8s` writes unless given --image
#   --gpu         onnxruntime-gpu on a CUDA + cuDNN base instead of onnxruntime
#   --extras LIST the optional stores to add (pyproject's extras: gcs for gs://, azure for az://);
#                 by default the image reads local folders, s3:// and http(s):// only
#   --wheels      download the wheels with this machine's pip (its index, proxy and CA settings)
#                 and install only those in the image (pip --no-index): for machines whose builds
#                 cannot reach the package index by themselves. The base's Python must then be the
#                 same version as $PYTHON's.
#
# The default model's ONNX export is taken from this machine when $PYTHON (default: .venv/bin/python,
# else python3) has batchmask with Keras (seconds; cached in docker/cache/); otherwise the image build
# installs TensorFlow in a throw-away stage and exports it there (minutes).
# Env: BUILDAH_ISOLATION (default chroot: buildah without a container runtime).
set -euo pipefail
cd "$(dirname "$0")/.."

base="" tag="" gpu=0 wheels=0 tool="" extras=""
while (($#)); do
  case "$1" in
    --base) base=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --gpu) gpu=1; shift ;;
    --wheels) wheels=1; shift ;;
    --extras) extras=$2; shift 2 ;;
    --tool) tool=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z $tag ]]; then  # (a failing $( ((gpu)) ... ) in the assignment would end the script under set -e)
  if ((gpu)); then tag=batchmask:latest-gpu; else tag=batchmask:latest; fi
fi
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [[ -z $tool ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then tool=docker
  elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then tool=podman
  elif command -v buildah >/dev/null; then tool=buildah
  else echo "build_image.sh: none of docker (with a daemon), podman or buildah works here" >&2; exit 1
  fi
fi
build() {  # build [--build-arg K=V]... -f FILE -t TAG
  case $tool in
    docker|podman) "$tool" build "$@" . ;;
    buildah) buildah bud --isolation "${BUILDAH_ISOLATION:-chroot}" --layers "$@" . ;;
    *) echo "build_image.sh: --tool must be docker, podman or buildah" >&2; exit 2 ;;
  esac
}

ort=onnxruntime
args=()
if ((gpu)); then
  ort=onnxruntime-gpu
  cuda_base=batchmask-cuda-base:latest
  build ${base:+--build-arg "CUDA_BASE=$base"} -f docker/cuda-base.Dockerfile -t "$cuda_base"
  base=$cuda_base
fi
[[ -n $base ]] && args+=(--build-arg "BASE=$base")
args+=(--build-arg "ONNXRUNTIME=$ort")
# --extras: each extra's requirements as pyproject.toml lists them (one source of truth)
extra_reqs=()
if [[ -n $extras ]]; then
  for e in ${extras//,/ }; do
    [[ $e == gcs || $e == azure ]] || { echo "build_image.sh: --extras takes gcs and azure, not $e" >&2; exit 2; }
  done
  mapfile -t extra_reqs < <("$PYTHON" - "$extras" <<'PY'
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for name in filter(None, sys.argv[1].replace(",", " ").split()):
    print("\n".join(extras[name]))
PY
  )
  args+=(--build-arg "EXTRA_REQUIREMENTS=${extra_reqs[*]}")
fi

find docker/wheels -name '*.whl' -delete
if ((wheels)); then
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d docker/wheels \
    -r docker/requirements-runtime.txt ${extra_reqs[@]+"${extra_reqs[@]}"} "$ort>=1.18" "dumb-init>=1.2.5" \
    "setuptools>=68" wheel
fi

if "$PYTHON" -c "import batchmask, keras, tf2onnx" 2>/dev/null; then
  BATCHMASK_CACHE_DIR=docker/cache TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" docker/export_onnx.py --prune
else
  echo "build_image.sh: $PYTHON has no batchmask with Keras: the build exports the ONNX file itself" >&2
fi

echo "build_image.sh: $tool builds $tag" >&2
build "${args[@]}" -f Dockerfile -t "$tag"
echo "$tag"
