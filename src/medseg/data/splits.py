"""Patient-level k-fold splits, stratified by whether a patient has any foreground, and leave-one-group-
out splits (one fold per hospital, scanner or site, named by a pattern in the patient id).

A slice- or case-level split puts one patient's slices on both sides and inflates every score; a split
that mixes hospitals hides how a model does on a hospital it has never seen."""
from __future__ import annotations

import random
import re
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


def group_splits(case_ids: Sequence[str], patients: Sequence[str], regex: str) -> dict:
    """Leave-one-group-out: the group of a patient is the first capture group of ``regex`` searched in its
    id; one fold per group (sorted by name), validating on that group and training on all others."""
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise MedsegError(f"--group-regex {regex!r} is not a regular expression: {e}") from None
    if pat.groups < 1:
        raise MedsegError(f"--group-regex {regex!r} has no capture group: put the group's part of the patient id "
                          "in parentheses, e.g. '^TCGA_([A-Z0-9]+)_'")
    group: dict[str, str] = {}
    for p in patients:
        if p not in group:
            m = pat.search(p)
            if m is None or not m.group(1):
                raise MedsegError(f"--group-regex {regex!r} finds no group in patient id {p!r}")
            group[p] = m.group(1)
    names = sorted(set(group.values()))
    if len(names) < 2:
        raise MedsegError(f"--group-regex {regex!r} puts every patient in one group ({names[0]!r}): nothing to "
                          "leave out")
    folds = []
    for g in names:
        folds.append({"name": g, "train": [c for c, p in zip(case_ids, patients) if group[p] != g],
                      "val": [c for c, p in zip(case_ids, patients) if group[p] == g]})
    return {"k": len(names), "seed": None, "grouped_by": f"group (leave one out): {regex}",
            "groups": {g: sorted(p for p in group if group[p] == g) for g in names},
            "patient_fold": {p: names.index(group[p]) for p in sorted(group)}, "folds": folds}
