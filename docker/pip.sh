#!/bin/sh
# pip COMMAND ARGS... in the image build: from docker/wheels/ only when build_image.sh --wheels put
# wheels there (machines that reach the package index only through their own pip settings),
# else from the package index as usual.
set -eu
cmd=$1
shift
if ls /tmp/build/wheels/*.whl >/dev/null 2>&1; then
  exec pip "$cmd" --no-index --find-links /tmp/build/wheels "$@"
fi
exec pip "$cmd" "$@"
