#!/usr/bin/env bash
# Train the default model shipped in batchmask/default_model (then copy model.keras,
# model.json, history.csv and learning_curves.png from OUT into batchmask/default_model/).
#
#   scripts/train_default.sh [DEV] [POOL] [OUT] [extra batchmask train options...]
#
# DEV and POOL default to ../shared/data/widerface-dev (600 WIDER FACE training images, 5
# events) and ../shared/data/widerface-pool (2,422 WIDER FACE validation images, all 61
# events). The shipped model was made with exactly these settings: the lean decoder (the
# default), 512² input at inference, trained on 256² crops with per-image Dice in the loss;
# 10% of every event held out for validation (--split stratified), which also picks the kept
# epoch and the threshold; 12 epochs (2 warm-up with the encoder frozen, then the last 4
# encoder blocks), about 32,500 image-steps, every epoch run (--patience 0). Others at their
# defaults: alpha 1.0, BCE + Dice, augmentation on, seed 42. --time-limit 95 is a safety net
# for a busy machine. Wall time on 2 CPU cores: see README, "The default model". It runs on any
# Keras backend (KERAS_BACKEND=jax on a GPU machine without TensorFlow). Backbone weights:
# ImageNet, through the Keras download or a pre-filled $KERAS_HOME/models (README,
# Troubleshooting).
set -euo pipefail
DEV=${1:-../shared/data/widerface-dev}
POOL=${2:-../shared/data/widerface-pool}
OUT=${3:-models/default}
shift $(( $# > 3 ? 3 : $# ))
exec batchmask -v train --data "$DEV" --data "$POOL" --split stratified --val-fraction 0.1 --seed 42 \
  --out "$OUT" --epochs 12 --warmup-epochs 2 --image-size 512 --crop-size 256 --dice-per-image \
  --patience 0 --time-limit 95 --quiet --force "$@"
