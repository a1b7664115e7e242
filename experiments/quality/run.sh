#!/usr/bin/env bash
# The quality estimate's figures (docs/quality.md): each data set's k-fold run re-predicted fold by fold,
# the calibration scored nested (fitted on the other folds, scored on the held-out one), and the shipped
# lgg-unet calibrated on its own training patients' out-of-fold predictions, then measured on the six
# bundled patients it never saw. Needs ../shared/data (or give the folders). On a 2-core machine:
# about 80 + 30 minutes of training, 15 of re-prediction.
#
#   bash experiments/quality/run.sh [SHARED=../shared/data]
set -euo pipefail
SHARED=${1:-../shared/data}
PY=${PY:-.venv/bin/python}
R=experiments/quality/results
mkdir -p "$R"

# LGG: leave one hospital out, the shipped recipe at 15 minutes a fold (two members side by side)
[ -f prepared/lgg_loio/dataset.json ] || $PY -m medseg prepare lgg "$SHARED/lgg/kaggle_3m" prepared/lgg_loio \
    --split group --group-regex '^TCGA_([A-Z0-9]+)_'
[ -f runs/lgg_loio_q/fold_4/model.pt ] || $PY -m medseg train configs/lgg_unet.yaml --fold all --out runs/lgg_loio_q \
    --set "data.prepared=$(realpath prepared/lgg_loio)" --set train.max_minutes=15
$PY -m medseg calibrate runs/lgg_loio_q --dry-run            # nested over all 56 patients
cp runs/lgg_loio_q/calibration.json "$R/lgg_loio.json"; cp runs/lgg_loio_q/calibration_cases.csv "$R/lgg_loio_cases.csv"
$PY -m medseg calibrate runs/lgg_loio_q --into lgg-unet       # fitted on the shipped model's 50 training patients
cp runs/lgg_loio_q/calibration.json "$R/lgg_unet_shipped.json"
rm -rf runs/quality_six
$PY -m medseg predict lgg-unet tests/fixtures/lgg/kaggle_3m runs/quality_six --quality
$PY -m medseg evaluate runs/quality_six tests/fixtures/lgg/kaggle_3m --out runs/quality_six_eval --no-report
cp runs/quality_six_eval/summary.json "$R/lgg_unet_six_summary.json"

# MSD hippocampus (3D) and the brain-tumour COCO set (2D), 3 folds of 8 and 6 minutes, side by side
[ -f prepared/hippo_q/dataset.json ] || $PY -m medseg prepare nifti "$SHARED/hippocampus" prepared/hippo_q --folds 3
[ -f prepared/coco_q/dataset.json ] || $PY -m medseg prepare coco "$SHARED/brain-tumor-coco" prepared/coco_q --split kfold --folds 3
common=(--fold all --set train.val_every=1000 --set schedule.by=time)
OMP_NUM_THREADS=1 $PY -m medseg train configs/hippocampus_3d_unet.yaml --out runs/hippo_q "${common[@]}" \
    --set "data.prepared=$(realpath prepared/hippo_q)" --set train.max_minutes=8 &
OMP_NUM_THREADS=1 $PY -m medseg train configs/brain_coco_unet.yaml --out runs/coco_q "${common[@]}" \
    --set "data.prepared=$(realpath prepared/coco_q)" --set train.max_minutes=6 &
wait
for d in hippo coco; do
    $PY -m medseg calibrate runs/${d}_q --dry-run
    cp runs/${d}_q/calibration.json "$R/${d}.json"; cp runs/${d}_q/calibration_cases.csv "$R/${d}_cases.csv"
done
