#!/bin/sh
# Remove from the run-time venv what batchmask never imports, in the same build step that
# installed it (a later layer could not shrink the image): the packages' own test suites, Ray's
# Java worker jars and RLlib, pyarrow's Flight RPC and its S3 filesystem (batchmask writes Parquet
# through fsspec/s3fs, and pyarrow.fs skips a missing S3 module), ONNX Runtime's transformer-optimisation tools, C++
# headers and Cython sources.
# The image test runs a demo (masks, coverage.csv, results.parquet) in process and on Ray after it.
set -eu
sp=$(echo "$1"/lib/python3*/site-packages)
[ -d "$sp/pyarrow" ] || { echo "slim.sh: no site-packages with pyarrow under $1" >&2; exit 1; }
find "$sp" -depth -type d \( -name tests -o -name test \) -path "*/site-packages/*/*" -exec rm -rf {} +
rm -rf "$sp/ray/jars" "$sp/ray/rllib" "$sp/pyarrow/include" "$sp/pyarrow/src" \
  "$sp"/pyarrow/libarrow_flight.so* "$sp"/pyarrow/libarrow_python_flight.so* "$sp"/pyarrow/_flight.* \
  "$sp"/pyarrow/libarrow_s3.so* "$sp"/pyarrow/_s3fs.* "$sp"/pyarrow/_pyarrow_cpp_tests.* \
  "$sp/onnxruntime/transformers"
find "$sp/pyarrow" -maxdepth 1 \( -name '*.pyx' -o -name '*.pxd' \) -delete
