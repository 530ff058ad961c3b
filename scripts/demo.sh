#!/usr/bin/env bash
# Set up batchmask in ./.venv (with the test tools) and run the demo on the images shipped in
# demo/wider: face masks + coverage.csv (10 images: in process; more: Ray workers), then an
# evaluation report against the boxes.
# Needs only Python >= 3.11 and the package index; no ../shared, no other network.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
.venv/bin/batchmask run --input demo/wider/images --output demo-out --workers 2 --overlays
.venv/bin/batchmask evaluate --data demo/wider --out demo-out/evaluation --report demo-out/report
echo
echo "Demo done. Masks: demo-out/masks/, table: demo-out/coverage.csv, previews: demo-out/overlays/,"
echo "evaluation: demo-out/evaluation/metrics.json, report: demo-out/report/index.html"
