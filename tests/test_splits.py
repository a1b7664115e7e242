from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.data.splits import make_splits, patient_folds
from medseg.errors import MedsegError


@settings(max_examples=50, deadline=None)
@given(
    n_patients=st.integers(5, 40),
    cases_per=st.integers(1, 3),
    k=st.integers(2, 5),
    seed=st.integers(0, 10),
    data=st.data(),
)
def test_split_properties(n_patients, cases_per, k, seed, data):
    patients = [f"p{i}" for i in range(n_patients) for _ in range(cases_per)]
    cases = [f"{p}_c{j}" for j, p in enumerate(patients)]
    fg = data.draw(st.lists(st.booleans(), min_size=len(cases), max_size=len(cases)))
    s = make_splits(cases, patients, fg, k=k, seed=seed)
    vals = [set(f["val"]) for f in s["folds"]]
    # every case validated exactly once; train is the complement
    assert sorted(c for v in vals for c in v) == sorted(cases)
    for f, v in zip(s["folds"], vals):
        assert set(f["train"]) | v == set(cases) and not (set(f["train"]) & v)
    # no patient on both sides of any fold
    owner = dict(zip(cases, patients))
    for v in vals:
        ps = {owner[c] for c in v}
        assert all(owner[c] not in ps for c in set(cases) - v)
    # balanced patient counts and stratified foreground
    sizes = [len({owner[c] for c in v}) for v in vals]
    assert max(sizes) - min(sizes) <= 1
    pat_fg = {p: any(f for q, f in zip(patients, fg) if q == p) for p in set(patients)}
    fg_sizes = [sum(pat_fg[p] for p in {owner[c] for c in v}) for v in vals]
    assert max(fg_sizes) - min(fg_sizes) <= 1
    # deterministic, and independent of the order the cases were listed in (file-system order varies)
    assert make_splits(cases, patients, fg, k=k, seed=seed) == s
    perm = data.draw(st.permutations(range(len(cases))))
    s2 = make_splits([cases[i] for i in perm], [patients[i] for i in perm], [fg[i] for i in perm], k=k, seed=seed)
    assert s2["patient_fold"] == s["patient_fold"]
    assert [set(f["val"]) for f in s2["folds"]] == vals


def test_seed_changes_the_assignment_and_is_recorded():
    patients = [f"p{i}" for i in range(20)]
    a = make_splits(patients, patients, [i % 2 == 0 for i in range(20)], k=5, seed=0)
    b = make_splits(patients, patients, [i % 2 == 0 for i in range(20)], k=5, seed=1)
    assert a["patient_fold"] != b["patient_fold"]
    assert (a["seed"], b["seed"], a["k"], a["grouped_by"]) == (0, 1, 5, "patient")


def test_stratification_spreads_foreground():
    patients = [f"p{i}" for i in range(10)]
    fg = [True] * 5 + [False] * 5
    assign = patient_folds(patients, fg, k=5, seed=3)
    for f in range(5):
        members = [p for p in patients if assign[p] == f]
        assert sum(fg[patients.index(p)] for p in members) == 1


def test_too_few_patients():
    with pytest.raises(MedsegError, match="3 patients cannot be split into 5 folds"):
        patient_folds(["a", "b", "c"], [True, False, True], k=5)


def test_group_splits_leave_one_group_out():
    from medseg.data.splits import group_splits

    ids = ["TCGA_CS_1_a", "TCGA_CS_1_b", "TCGA_DU_2", "TCGA_HT_3", "TCGA_DU_4"]
    patients = ["TCGA_CS_1", "TCGA_CS_1", "TCGA_DU_2", "TCGA_HT_3", "TCGA_DU_4"]
    s = group_splits(ids, patients, r"^TCGA_([A-Z0-9]+)_")
    assert s["k"] == 3 and [f["name"] for f in s["folds"]] == ["CS", "DU", "HT"]
    assert s["folds"][0] == {"name": "CS", "train": ["TCGA_DU_2", "TCGA_HT_3", "TCGA_DU_4"],
                             "val": ["TCGA_CS_1_a", "TCGA_CS_1_b"]}
    assert s["folds"][1]["val"] == ["TCGA_DU_2", "TCGA_DU_4"]
    assert s["groups"] == {"CS": ["TCGA_CS_1"], "DU": ["TCGA_DU_2", "TCGA_DU_4"], "HT": ["TCGA_HT_3"]}
    assert s["patient_fold"] == {"TCGA_CS_1": 0, "TCGA_DU_2": 1, "TCGA_DU_4": 1, "TCGA_HT_3": 2}


@pytest.mark.parametrize("regex,says", [
    ("^TCGA_[A-Z]+_", "has no capture group"),
    ("^TCGA_([A-Z]+", "is not a regular expression"),
    (r"^TCGA_(\d+)_", "finds no group in patient id 'TCGA_CS_1'"),
    ("^(TCGA)_", "puts every patient in one group ('TCGA')"),
])
def test_group_splits_refused(regex: str, says: str):
    from medseg.data.splits import group_splits

    with pytest.raises(MedsegError, match=re.escape(says)):
        group_splits(["a", "b"], ["TCGA_CS_1", "TCGA_DU_2"], regex)
