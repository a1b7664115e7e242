"""Patient-level k-fold splits, stratified by whether a patient has any foreground.

A slice- or case-level split puts one patient's slices on both sides and inflates every score."""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from medseg.errors import MedsegError


def patient_folds(
    patients: Sequence[str], has_foreground: Sequence[bool], k: int = 5, seed: int = 0
) -> dict[str, int]:
    """Assign each distinct patient a fold in ``0..k-1``: strata shuffled with ``seed`` and dealt
    round-robin, continuing the deal across strata so fold sizes differ by at most one."""
    fg: dict[str, bool] = defaultdict(bool)
    for p, f in zip(patients, has_foreground, strict=True):
        fg[p] = fg[p] or bool(f)
    uniq = sorted(fg)
    if k < 2:
        raise MedsegError(f"need at least 2 folds, got {k}")
    if len(uniq) < k:
        raise MedsegError(f"{len(uniq)} patients cannot be split into {k} folds; use --folds {max(len(uniq), 2)} or fewer")
    rng = random.Random(seed)
    out: dict[str, int] = {}
    slot = 0
    for stratum in (True, False):
        members = [p for p in uniq if fg[p] is stratum]
        rng.shuffle(members)
        for p in members:
            out[p] = slot % k
            slot += 1
    return out


def make_splits(
    case_ids: Sequence[str],
    patients: Sequence[str],
    has_foreground: Sequence[bool],
    k: int = 5,
    seed: int = 0,
) -> dict:
    """The ``splits.json`` document: folds of case ids, every case of a patient on the same side."""
    assign = patient_folds(patients, has_foreground, k, seed)
    folds = []
    for f in range(k):
        val = [c for c, p in zip(case_ids, patients) if assign[p] == f]
        train = [c for c, p in zip(case_ids, patients) if assign[p] != f]
        folds.append({"train": train, "val": val})
    return {
        "k": k,
        "seed": seed,
        "grouped_by": "patient",
        "stratified_by": "patient has foreground",
        "patient_fold": assign,
        "folds": folds,
    }
