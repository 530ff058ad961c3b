#!/usr/bin/env bash
# Continue the shipped default model on its own data (`batchmask train --init-from default`):
# the default's recipe (512² input, 256² crops, per-image Dice, lean decoder), no warm-up, the
# fine-tuning rate 5e-5 (--learning-rate 5e-4 x 0.1) with a fresh cosine over EPOCHS epochs, every
# epoch run and the best kept; the same stratified 10% validation split (seed 42) as the
# default, so the two are compared on the same 308 images (scripts/compare_models.py).
#
#   scripts/finetune_default.sh [DEV] [POOL] [OUT] [extra batchmask train options...]
#
# Resumable: if it stops (--time-limit, a kill), `batchmask train --resume OUT` goes on.
set -euo pipefail
DEV=${1:-../shared/data/widerface-dev}
POOL=${2:-../shared/data/widerface-pool}
OUT=${3:-models/default-ft}
shift $(( $# > 3 ? 3 : $# ))
exec batchmask -v train --init-from default --data "$DEV" --data "$POOL" --split stratified --val-fraction 0.1 \
  --seed 42 --out "$OUT" --epochs "${EPOCHS:-8}" --patience 0 --time-limit 88 --quiet --force "$@"
