#!/usr/bin/env bash
# Train the default model shipped in batchmask/default_model (then copy model.keras,
# model.json, history.csv and learning_curves.png from OUT into batchmask/default_model/).
#
#   scripts/train_default.sh [DATA] [OUT] [extra batchmask train options...]
#
# DATA defaults to ../shared/data/widerface-dev (600 WIDER FACE training images). The shipped
# model was made with exactly these settings: 512² input at inference, trained on 256² crops,
# per-image Dice in the loss, all 40 epochs with the best by val_dice_t50 kept (--patience 0:
# early stopping ended an earlier try at epoch 20, before the cosine schedule's low-rate
# epochs, and lost 0.02 validation Dice). All others at their defaults: alpha 1.0,
# 5 warm-up epochs, last 4 encoder blocks, BCE + Dice, random 20% validation split, seed 42.
# Wall time on 2 CPU cores: see README, "The default model". It runs on any Keras backend
# (KERAS_BACKEND=jax on a GPU machine without TensorFlow). Backbone weights: ImageNet, through
# the Keras download or a pre-filled $KERAS_HOME/models (see README, Troubleshooting).
set -euo pipefail
DATA=${1:-../shared/data/widerface-dev}
OUT=${2:-models/default}
shift $(( $# > 2 ? 2 : $# ))
exec batchmask -v train --data "$DATA" --out "$OUT" --epochs 40 --image-size 512 --crop-size 256 \
  --dice-per-image --quiet --force --patience 0 "$@"
