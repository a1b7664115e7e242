#!/usr/bin/env bash
# The demo: the commands a user types, end to end, on the 6 real LGG patients bundled in tests/fixtures.
# prepare (patient-level folds) -> train briefly on 4 patients -> predict the 2 held-out patients in
# their own layout, with that fresh model and with the shipped `lgg-unet` (trained without these 6
# patients) -> evaluate both against their masks (metrics + report.html) -> export ONNX -> predict again.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDSEG=.venv/bin/medseg
OUT=demo_out
SAMPLE=tests/fixtures/lgg/kaggle_3m
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "1/8 prepare the bundled LGG sample (6 patients, 3 patient-level folds)" \
  $MEDSEG prepare lgg "$SAMPLE" "$OUT/prepared" --folds 3
$MEDSEG inspect "$OUT/prepared" --overlay "$OUT/overlay.png"

# the recipe's clock schedule, given 2 minutes instead of 30: it ends annealed on any machine, and it
# validates once, on the final model, so no checkpoint is chosen on the held-out patients scored below
step "2/8 train the LGG recipe for 2 minutes on folds 1-2" \
  $MEDSEG train configs/lgg_unet.yaml --fold 0 --out "$OUT/run" \
    --set data.prepared="$PWD/$OUT/prepared" --set train.max_minutes=2 --set train.steps_per_epoch=25

# the held-out patients of fold 0, in their native kaggle_3m layout
mkdir -p "$OUT/heldout"
for p in $(.venv/bin/python -c "import json,sys; s=json.load(open('$OUT/prepared/splits.json')); print(' '.join(p for p,f in s['patient_fold'].items() if f==0))"); do
  ln -s "$PWD/$SAMPLE/$(ls "$SAMPLE" | grep "^${p}_")" "$OUT/heldout/"
done

step "3/8 predict the held-out patients with the fresh model (masks in the input's own layout)" \
  $MEDSEG predict "$OUT/run" "$OUT/heldout" "$OUT/pred"

step "4/8 evaluate the fresh model against their masks (metrics.csv, summary.json, report.html)" \
  $MEDSEG evaluate "$OUT/pred" "$OUT/heldout" --out "$OUT/eval"

step "5/8 predict the same patients with the shipped model lgg-unet (nothing to download)" \
  $MEDSEG predict lgg-unet "$OUT/heldout" "$OUT/pred_shipped"

step "6/8 evaluate the shipped model" \
  $MEDSEG evaluate "$OUT/pred_shipped" "$OUT/heldout" --out "$OUT/eval_shipped"

step "7/8 export to ONNX" \
  $MEDSEG export "$OUT/run" "$OUT/model.onnx"

step "8/8 predict again with onnxruntime" \
  $MEDSEG predict "$OUT/model.onnx" "$OUT/heldout" "$OUT/pred_onnx"

printf '\n'
.venv/bin/python scripts/demo_summary.py "fresh (2 min)=$PWD/$OUT/eval" "lgg-unet=$PWD/$OUT/eval_shipped"
