#!/usr/bin/env bash
# Train the default model shipped in batchmask/default_model.
#
#   scripts/train_default.sh [DATA] [OUT] [extra batchmask train options...]
#
# DATA defaults to ../shared/data/widerface-dev (600 WIDER FACE training images). It runs on
# any Keras backend; on a GPU machine without TensorFlow use KERAS_BACKEND=jax. Backbone
# weights: ImageNet (Keras download, or a pre-filled $KERAS_HOME/models; see README).
set -euo pipefail
DATA=${1:-../shared/data/widerface-dev}
OUT=${2:-models/default}
shift $(( $# > 2 ? 2 : $# ))
exec batchmask train --data "$DATA" --out "$OUT" \
  --image-size 384 --alpha 1.0 --epochs 40 --warmup-epochs 5 --batch-size 16 \
  --learning-rate 1e-3 --trainable-blocks 4 --loss bce_dice \
  --split random --val-fraction 0.15 --seed 42 --force "$@"
