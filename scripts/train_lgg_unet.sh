#!/usr/bin/env bash
# Reproduce the shipped `lgg-unet`: the default recipe (configs/lgg_unet.yaml) trained with --fold full
# on the LGG patients of ../shared/data/lgg except the 6 bundled in tests/fixtures/lgg (so that
# `make demo` scores it on patients it never saw), then stored as fp16 in src/medseg/weights/.
#   bash scripts/train_lgg_unet.sh [/path/to/kaggle_3m] [TUNED] [--set KEY=VALUE ...]
#   (about 30 minutes on 2 CPU cores)
# TUNED: where the post-processing was chosen, a run after `medseg tune` or a tune.json-shaped file; the
# default keeps what `medseg tune --tta` chose on the recipe's leave-one-hospital-out run (docs/lgg.md).
# Any further arguments go to `medseg train` (a variant of the recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/lgg/kaggle_3m}
TUNED=${2:-experiments/lgg/lgg_postprocess_loio_zbody.json}
shift $(( $# < 2 ? $# : 2 ))
MEDSEG=.venv/bin/medseg
WORK=prepared/lgg_ship_src
rm -rf "$WORK" prepared/lgg_ship runs/lgg_unet_ship
mkdir -p "$WORK"
for d in "$SRC"/TCGA_*; do
  [ -e "tests/fixtures/lgg/kaggle_3m/$(basename "$d")" ] || ln -s "$(realpath "$d")" "$WORK/"
done
$MEDSEG prepare lgg "$WORK" prepared/lgg_ship
$MEDSEG train configs/lgg_unet.yaml --fold full --out runs/lgg_unet_ship --set data.prepared="$PWD/prepared/lgg_ship" "$@"
# post-processing: what `medseg tune` chose on a cross-validation of the recipe
PP=(); if [ -f "$TUNED" ] || [ -f "$TUNED/tune.json" ]; then PP=(--postprocess-from "$TUNED"); else echo "no $TUNED/tune.json: shipping with the config's post-processing" >&2; fi
.venv/bin/python scripts/ship_model.py runs/lgg_unet_ship/full/model.pt lgg-unet --card docs/models/lgg-unet.md "${PP[@]}"
# the quality estimate of `predict --quality`, fitted on the LOIO run's out-of-fold predictions of the shipped
# model's own training patients (docs/quality.md); a tune.json's folder is that run
if [ -f "$TUNED/tune.json" ]; then $MEDSEG calibrate "$TUNED" --into lgg-unet; else echo "no LOIO run at $TUNED: shipped without a quality calibration" >&2; fi
