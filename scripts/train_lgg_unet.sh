#!/usr/bin/env bash
# Reproduce the shipped `lgg-unet`: the default recipe (configs/lgg_unet.yaml) trained with --fold full
# on the LGG patients of ../shared/data/lgg except the 6 bundled in tests/fixtures/lgg (so that
# `make demo` scores it on patients it never saw), then stored as fp16 in src/medseg/weights/.
#   bash scripts/train_lgg_unet.sh [/path/to/kaggle_3m] [TUNED_RUN] [--set KEY=VALUE ...]
#   (about 30 minutes on 2 CPU cores)
# TUNED_RUN (default runs/lgg_unet): a cross-validation of the same recipe after `medseg tune`, whose
# post-processing the shipped model takes; the weights are trained either way. Any further arguments go
# to `medseg train` (a variant of the recipe, e.g. --set data.normalization=zscore_body).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/lgg/kaggle_3m}
TUNED=${2:-runs/lgg_unet}
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
# post-processing: what `medseg tune` chose on the recipe's cross-validation, if there is one
PP=(); if [ -f "$TUNED/tune.json" ]; then PP=(--postprocess-from "$TUNED"); else echo "no $TUNED/tune.json: shipping without tuned post-processing" >&2; fi
.venv/bin/python scripts/ship_model.py runs/lgg_unet_ship/full/model.pt lgg-unet --card docs/models/lgg-unet.md "${PP[@]}"
