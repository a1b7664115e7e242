"""Patient-level k-fold splits, stratified by whether a patient has any foreground, and leave-one-group-
out splits (one fold per hospital, scanner or site, named by a pattern in the patient id).

A slice- or case-level split puts one patient's slices on both sides and inflates every score; a split
that mixes hospitals hides how a model does on a hospital it has never seen."""
from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medseg.errors import MedsegError, warn

if TYPE_CHECKING:
    from medseg.data.formats import DatasetSpec


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


_LAST_TOKEN = re.compile(r"^(?P<stem>.*?[A-Za-z]*\d+[A-Za-z]*)[-_. ]+[A-Za-z]*\d*[A-Za-z]*$")


def warn_shared_patients(spec: DatasetSpec) -> None:
    """Without a patient rule every case is its own patient; warn when the names suggest that several
    cases share one (``p01_t1``, ``p01_t2``): folds would split that patient and scores leak."""
    if any(c.patient != c.id for c in spec.cases) or len(spec.cases) < 4:
        return
    groups: dict[str, list[str]] = {}
    for c in spec.cases:
        m = _LAST_TOKEN.match(c.id)
        if m:
            groups.setdefault(m["stem"], []).append(c.id)
    shared = {k: v for k, v in groups.items() if len(v) > 1}
    if len(shared) >= 2 and max(len(v) for v in shared.values()) < len(spec.cases) / 2:
        stem, ids = next(iter(shared.items()))
        warn(f"each case is its own patient, but {len(shared)} groups of case names share a prefix "
             f"(e.g. {', '.join(ids[:3])}): if they are one patient's, pass -o patient_regex='^(.*?)[-_. ][^-_. ]*$' "
             "(first group = patient) so that no fold splits a patient", spec.root)


_TRAIN, _VAL = ("train",), ("valid", "val", "validation")


def own_split(cases: list[Any]) -> dict | None:
    """``splits.json`` with one fold, the dataset's own train/valid split, when the reader reported one
    with both sides non-empty (test cases are in neither side) and no patient on both sides."""
    train = [c.id for c in cases if (c.split or "").lower() in _TRAIN]
    val = [c.id for c in cases if (c.split or "").lower() in _VAL]
    if not train or not val:
        return None
    by_id = {c.id: c.patient for c in cases}
    shared = sorted({by_id[i] for i in train} & {by_id[i] for i in val})
    if shared:
        raise MedsegError(f"the dataset's own split has patient {shared[0]!r} on both sides "
                          f"(train and valid); use --split kfold for patient-level folds")
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.split or "none"] = counts.get(c.split or "none", 0) + 1
    return {"k": 1, "seed": None, "grouped_by": "the dataset's own split", "source_split": counts,
            "folds": [{"train": train, "val": val}]}
