#!/usr/bin/env bash
# Model-quality experiments on a GPU machine (JAX backend), PARALLEL (default 2) at a time.
#
#   DATA=.devdata/wf WEIGHTS=.devdata/weights EPOCHS=40 MINUTES=6 PARALLEL=2 OUT=/tmp/out scripts/device_experiments.sh
#
# DATA: a WIDER folder (e.g. made by scripts/shrink_wider.py); WEIGHTS: folder with the Keras
# MobileNet .h5 files. Each "proxy-*" run trains on 4 of the 5 event folders and validates on the
# fifth (--split event, seed 42); "final" trains the default-model configuration on all events
# with a random 15% validation split. Results: $OUT/runs/<name>/ and $OUT/summary.tsv.
# Keep PARALLEL small: 10 runs at once on a 16-core H100 host drove the load average to 100
# (each XLA compilation uses every core) and no run got past epoch 1 in 5 minutes, while one
# run alone trains an epoch in 1.2 s (docs/experiments.md).
set -uo pipefail
DATA=${DATA:-.devdata/wf}
EPOCHS=${EPOCHS:-40}
MINUTES=${MINUTES:-6}
PARALLEL=${PARALLEL:-2}
OUT=${OUT:-/tmp/bm-experiments}
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export KERAS_HOME=${KERAS_HOME:-$(mktemp -d)}
mkdir -p "$KERAS_HOME/models" "$OUT/runs"
cp "${WEIGHTS:-.devdata/weights}"/*.h5 "$KERAS_HOME/models/"
PY=${PY:-python3}

common=(--data "$DATA" --epochs "$EPOCHS" --warmup-epochs 5 --batch-size 16 --learning-rate 1e-3
        --seed 42 --time-limit "$MINUTES" --quiet --force)
declare -A RUNS=(
  [proxy-a100-s320]="--split event --image-size 320"
  [proxy-a100-s384]="--split event --image-size 384"
  [proxy-a100-s448]="--split event --image-size 448"
  [proxy-a100-s224]="--split event --image-size 224"
  [proxy-a025-s224]="--split event --image-size 224 --alpha 0.25"
  [proxy-a025-s384]="--split event --image-size 384 --alpha 0.25"
  [proxy-a100-s384-all13]="--split event --image-size 384 --trainable-blocks 13"
  [proxy-a100-s384-logdice]="--split event --image-size 384 --loss bce_logdice"
  [proxy-a100-s384-noaug]="--split event --image-size 384 --no-augment"
  [final]="${FINAL_ARGS:---split random --val-fraction 0.15 --image-size 384}"
)
for name in "${!RUNS[@]}"; do
  [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]] && continue
  while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n; done
  # shellcheck disable=SC2086
  ( $PY -m batchmask train "${common[@]}" ${RUNS[$name]} --out "$OUT/runs/$name" \
      > "$OUT/runs/$name.log" 2>&1; echo "exit $?" >> "$OUT/runs/$name.log" ) &
done
wait
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for d in sorted((out / "runs").iterdir()):
    mj = d / "model.json"
    if not mj.is_file():
        continue
    m = json.loads(mj.read_text())
    v = m.get("metrics", {}).get("validation", {})
    t = m.get("training", {})
    rows.append([d.name, m["model"]["image_size"], m["model"]["alpha"], t.get("epochs_run"), t.get("best_epoch"),
                 t.get("wall_s"), v.get("threshold"), v.get("dice"), v.get("iou"), v.get("soft_dice_global")])
hdr = ["run", "size", "alpha", "epochs", "best", "wall_s", "threshold", "dice", "iou", "soft_dice_global"]
lines = ["\t".join(hdr)] + ["\t".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in r) for r in rows]
(out / "summary.tsv").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
