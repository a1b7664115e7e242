#!/usr/bin/env bash
# Leave-one-institution-out cross-validation of the LGG recipe: one fold per hospital code in the
# patient id (TCGA_<CODE>_...), each fold trained on the other hospitals only, then
#   - the nested score (rules chosen on the other folds' patients, `medseg tune`'s "nested" figure), and
#   - per-institution per-patient 3D Dice with the recipe's fixed rules (lgg_cv_dice.py).
# About 5 x 30 minutes of training on a 2-core machine.
#
#   bash experiments/lgg/loio.sh KAGGLE_3M [OUT=runs/lgg_loio] [PREPARED=prepared/lgg_loio] [CONFIG=configs/lgg_unet.yaml]
set -euo pipefail
SRC=${1:?the kaggle_3m folder}
OUT=${2:-runs/lgg_loio}
PREPARED=${3:-prepared/lgg_loio}
CONFIG=${4:-configs/lgg_unet.yaml}
PY=${PY:-.venv/bin/python}

[ -f "$PREPARED/dataset.json" ] || $PY -m medseg prepare lgg "$SRC" "$PREPARED" --split group --group-regex '^TCGA_([A-Z0-9]+)_'
$PY -m medseg train "$CONFIG" --fold all --out "$OUT" --set "data.prepared=$(realpath "$PREPARED")"
$PY -m medseg tune "$OUT" --tta   # RUN/tune.json: "nested" = each fold scored with the rules chosen on the others
K=$($PY -c "import json,sys; print(','.join(str(i) for i in range(len(json.load(open(sys.argv[1]))['folds']))))" "$PREPARED/splits.json")
$PY experiments/lgg/lgg_cv_dice.py "loio=$OUT" --folds "$K" --tta \
    --postprocess-from experiments/lgg/lgg_postprocess.json --out experiments/lgg/results/lgg_cv_dice_loio.json
