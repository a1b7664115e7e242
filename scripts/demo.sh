#!/usr/bin/env bash
# The demo: the same commands a user types, on the LGG sample bundled in tests/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDSEG=.venv/bin/medseg
OUT=demo_out
mkdir -p "$OUT"
$MEDSEG prepare lgg tests/fixtures/lgg/kaggle_3m "$OUT/prepared" --overwrite --folds 2
$MEDSEG inspect "$OUT/prepared" --overlay "$OUT/overlay.png"
