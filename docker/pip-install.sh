#!/bin/sh
# pip install "$@" in the image build: from docker/wheels/ only when build_image.sh --wheels put
# wheels there (machines that reach the package index only through their own pip settings),
# else from the package index as usual.
set -eu
if ls /tmp/build/wheels/*.whl >/dev/null 2>&1; then
  exec pip install --no-index --find-links /tmp/build/wheels "$@"
fi
exec pip install "$@"
