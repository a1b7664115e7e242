"""Evaluation: predictions vs ground truth (see docs/evaluation.md).

- ``metrics``: Dice/IoU/precision/recall, MONAI-exact HD/HD95/ASSD/NSD in mm, ``case_dice`` (LGG headline),
  the empty-mask conventions;
- data-set scores registered in ``medseg.scores`` (a competition's metric, exactly as graded);
- ``sources``: ground truth and prediction loaders (prepared, native layouts, run dirs, submissions);
- ``evaluate``: the ``medseg evaluate`` stage (metrics.csv, metrics_slices.csv, summary.json);
- ``report``: the self-contained report.html.
"""
