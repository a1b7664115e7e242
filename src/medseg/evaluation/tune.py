"""``medseg tune RUN``: per-class decision thresholds, the class-presence rule and the largest-component
rule, chosen on the validation folds, written into every fold's ``model.pt``. The objective is the data
set's own score where its data brings one (``medseg.scores``), else the mean per-case Dice (each case's
whole volume, as the literature scores LGG). Multilabel models and one-class softmax models (the
threshold applies to the foreground probability) are tuned; a softmax over several classes decides by
argmax.

    medseg tune runs/exp             # with the model's own TTA setting (inference.tta of its config)
    medseg tune runs/exp --no-tta    # from RUN/fold_K/val_predictions/*.npz, and TTA off in the bundles
    medseg tune runs/exp --tta       # re-predict the validation cases with flip TTA, and TTA on

The probabilities tuned on are those ``medseg predict`` will produce: without TTA, the validation
predictions training stored (the same network on the same slices); with TTA (the bundle's
``tta.enabled``, or ``--tta``), the validation cases are predicted again through
:class:`medseg.inference.segmenter.Segmenter` with the bundle's flips.

For each class j and each candidate ``(t, p)`` of the grid (threshold ``t``; presence ``p``: zero the
class on a slice whose maximum probability is under ``p``, or no presence rule), the out-of-fold
predictions of every validated case are decided exactly as ``medseg predict`` decides them
(``prob > t``, then :func:`medseg.inference.postprocess.postprocess` with the bundle's rules) and scored
with the score's own terms, the ones ``medseg evaluate`` uses. A data-set score is a ratio of sums, and
each class contributes its own sums (a Dice sum and count, a distance sum and count), so the best
combination over classes is found exactly by summing the per-class tables over every combination of
candidates, not by tuning classes one at a time. Ties keep the bundle's current setting, then the
smaller grid value.

The pooled choice is scored on the cases it was chosen on, so its score is optimistic. ``tune.json``'s
``nested`` scores each fold with the rules chosen on the other folds alone: the honest estimate of the
tuned pipeline on new patients.

A presence threshold at or below the decision threshold changes nothing (a slice whose maximum is
under ``t`` has no pixel over ``t``), so only ``p > t`` is tried. The whole grid is scored twice: with
the bundle's clean-up rules, and with the largest component kept per class (over the case's volume,
slices joined, as a tumour or an organ is one object); the better wins, ties keeping the bundle's.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import atomic_write_text
from medseg.bundle import load_bundle, save_bundle
from medseg.data.prepared import PreparedDataset
from medseg.errors import MedsegError
from medseg.evaluation.metrics import case_dice
from medseg.inference.postprocess import COMPONENTS, merge_config, postprocess, thresholds_for
from medseg.inference.segmenter import Segmenter
from medseg.machine import resolve_device
from medseg.rundir import RunDir
from medseg.scores import score_for, score_named
from medseg.text import plural

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
PRESENCE = (0.5, 0.6, 0.7, 0.8, 0.9)
_MAX_COMBINATIONS = 2_000_000  # beyond this, classes are chosen one at a time (coordinate ascent)

Candidate = tuple[float, "float | None"]


def candidates(thresholds: Sequence[float], presence: Sequence[float], current: Candidate | None = None) -> list[Candidate]:
    """The grid of one class: every threshold without a presence rule, then with each presence above it.
    ``current`` (the bundle's setting) comes first, so that it wins ties."""
    for v in [*thresholds, *presence]:
        if not 0.0 <= float(v) <= 1.0 or not math.isfinite(float(v)):
            raise MedsegError(f"tuning grid values must be probabilities in [0, 1], got {v}")
    out: list[Candidate] = [] if current is None else [current]
    for t in sorted({float(v) for v in thresholds}):
        for p in [None, *sorted({float(v) for v in presence if float(v) > t})]:
            if (t, p) not in out:
                out.append((t, p))
    return out


def class_terms(
    prob: np.ndarray,
    truth: np.ndarray,
    grid: Sequence[Candidate],
    rules: dict[str, Any] | None = None,
    spatial_dims: int = 2,
    objective: str = "dice",
) -> np.ndarray:
    """Score sums of one class of one case(-day) for every candidate of ``grid``, ``[len(grid), 4]``:
    for a data-set score (``medseg.scores``, by name) its terms; for ``dice`` (the volume's Dice, 1, 0, 0),
    a volume with neither truth nor prediction scoring 1.

    ``prob[z, h, w]`` is the class's probability, ``truth[z, h, w]`` its mask; ``rules`` the bundle's
    other post-processing (``min_size``, ``largest_cc``), applied after the presence rule as in
    ``medseg predict``."""

    score = None if objective == "dice" else score_named(objective)

    prob = np.asarray(prob, dtype=np.float32)
    truth = np.asarray(truth) != 0
    slice_max = prob.reshape(prob.shape[0], -1).max(axis=1)[:, None]  # [z, 1], as the segmenter's slice_max
    rules = {"min_size": int((rules or {}).get("min_size") or 0), "largest_cc": bool((rules or {}).get("largest_cc")),
             "components": (rules or {}).get("components")}
    out = np.zeros((len(grid), 4), np.float64)
    for c, (t, p) in enumerate(grid):
        mask = (prob > t).astype(np.uint8)[:, None]  # [z, 1, h, w]
        postprocess(mask, slice_max, {"presence": None if p is None else [p], **rules}, spatial_dims)
        if score is None:
            out[c] = (case_dice(mask[:, 0], truth, empty="one"), 1, 0.0, 0)
        else:
            out[c] = score.class_terms(mask[:, 0], truth)
    return out


def best_combination(tables: Sequence[np.ndarray], objective: str = "dice") -> tuple[list[int], float]:
    """The candidate index per class maximising the objective of the summed tables (``tables[j]``:
    ``[candidates_j, 4]`` sums of class j, see :func:`class_terms`), and that score."""
    task_score = None if objective == "dice" else score_named(objective)

    def score(total: np.ndarray) -> np.ndarray:
        if task_score is not None:
            return task_score.value(total)
        d, nd = total[..., 0], total[..., 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(nd > 0, d / np.maximum(nd, 1), 1.0)

    sizes = [len(t) for t in tables]
    if math.prod(sizes) <= _MAX_COMBINATIONS:
        total = np.zeros((4,))
        for j, t in enumerate(tables):
            total = total[..., None, :] + t.reshape((1,) * j + (len(t), 4))
        s = score(total)
        idx = [int(i) for i in np.unravel_index(int(np.argmax(s)), s.shape)]  # first maximum: earlier candidates win ties
    else:  # coordinate ascent from the first candidates
        idx = [0] * len(tables)
        for _ in range(10):
            changed = False
            for j in range(len(tables)):
                rest = sum(tables[i][idx[i]] for i in range(len(tables)) if i != j)
                best = int(np.argmax(score(tables[j] + rest)))
                if score(tables[j][best] + rest) > score(tables[j][idx[j]] + rest):
                    idx[j], changed = best, True
            if not changed:
                break
    final = sum(t[i] for t, i in zip(tables, idx))
    return idx, float(score(np.asarray(final)))


def _choose(tables: dict, folds: Sequence[int], n_variants: int, objective: str) -> tuple[int, list[int], float]:
    """The rule set and per-class candidates maximising the objective over the cases of ``folds``
    (``tables[fold][variant][class]``): ``(variant, candidate index per class, score)``; ties keep the
    earlier rule set (the bundle's)."""
    k = len(tables[folds[0]][0])
    results = [best_combination([sum(tables[f][v][j] for f in folds) for j in range(k)], objective)
               for v in range(n_variants)]
    v = max(range(n_variants), key=lambda i: (results[i][1], -i))
    return v, results[v][0], results[v][1]


def nested_scores(tables: dict, folds: Sequence[int], n_variants: int, objective: str = "dice") -> dict:
    """{fold: (variant, candidate index per class, score)}: each fold scored with the rules chosen on the
    other folds' cases alone. Empty with fewer than 2 folds."""
    out = {}
    if len(folds) < 2:
        return out
    for fk in folds:
        v, ix, _ = _choose(tables, [f for f in folds if f != fk], n_variants, objective)
        out[fk] = (v, ix, best_combination([t[i : i + 1] for t, i in zip(tables[fk][v], ix)], objective)[1])
    return out


# ----------------------------------------------------------------------------------------- the command
def _same_components(a: dict, b: dict) -> bool:
    """Whether two rule sets apply the same component rule (``components`` matters only with ``largest_cc``)."""
    if bool(a.get("largest_cc")) != bool(b.get("largest_cc")):
        return False
    return not a.get("largest_cc") or a.get("components") == b.get("components")


def _fmt(c: Candidate) -> str:
    return f"t {c[0]:.2f}, presence {'off' if c[1] is None else f'{c[1]:.2f}'}"


def tune(
    run: str | Path,
    *,
    folds: str | Sequence[int] = "all",
    data: str | Path | None = None,
    tta: bool | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    presence: Sequence[float] = PRESENCE,
    write: bool = True,
    console: Any = None,
    progress: Callable[[int, int], None] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Choose per-class thresholds and presence thresholds on the validation folds of ``run`` and (with
    ``write``) store them in each fold's ``model.pt`` ``postprocess``; writes ``RUN/tune.json`` and returns
    its content. ``tta``: None follows the bundle's ``tta.enabled``; True/False override it (and are
    stored in the bundles, so that ``medseg predict`` runs as tuned). ``device``: where TTA re-predicts."""

    run = Path(run)
    if not run.is_dir():
        raise MedsegError("run directory not found", run)
    rd = RunDir(run)
    fold_dirs = rd.fold_dirs(folds)
    bundles = {k: load_bundle(d / "model.pt") for k, d in fold_dirs}
    b0 = bundles[fold_dirs[0][0]]
    use_tta = bool((b0.get("tta") or {}).get("enabled")) if tta is None else bool(tta)
    classes = list(b0["classes"])
    multiclass = b0["class_kind"] != "multilabel"
    if multiclass and len(classes) > 1:
        raise MedsegError(f"tune chooses per-class thresholds: this model is a softmax over {len(classes)} classes "
                          "(argmax decides); nothing to tune", fold_dirs[0][1] / "model.pt")
    for k, b in bundles.items():
        if list(b["classes"]) != classes:
            raise MedsegError(f"fold {k} has classes {b['classes']}, fold {fold_dirs[0][0]} {classes}", run)
    ds_path = rd.dataset(data)
    if not ds_path.exists():
        raise MedsegError("prepared dataset of the run not found (pass --data PREPARED)", ds_path)
    ds = PreparedDataset.open(ds_path)
    if ds.classes != classes or any(c.mask is None for c in ds.cases):
        raise MedsegError(f"the prepared dataset (classes {ds.classes}) does not hold the model's classes {classes} "
                          "with masks", ds_path)
    task_score = score_for(ds.info.get("source_format"), ds.classes)
    objective = task_score.name if task_score is not None else "dice"
    pp = merge_config(b0.get("postprocess"), None)
    # the bundle's clean-up rules first (its score is the "before"), then no component rule and the largest
    # component over the case's volume: both weighed again on every tune, so a rule an earlier tune chose
    # is not kept for good
    variants = [pp]
    for cand in ({**pp, "largest_cc": False},
                 {**pp, "largest_cc": True, "components": "volume" if ds.spatial_dims == 2 else None}):
        if not any(_same_components(cand, v) for v in variants):
            variants.append(cand)
    k = len(classes)
    cur_t = thresholds_for(pp, k)
    cur_p = pp.get("presence")
    cur_p = [None] * k if cur_p is None else ([float(cur_p)] * k if isinstance(cur_p, (int, float)) else list(cur_p))
    grids = [candidates(thresholds, presence, (float(cur_t[j]), None if cur_p[j] is None else float(cur_p[j])))
             for j in range(k)]
    fold_ids = [fk for fk, _ in fold_dirs]
    # per fold, so that the chosen setting can be reported fold by fold (mean ± std over folds)
    tables = {fk: [[np.zeros((len(g), 4)) for g in grids] for _ in variants] for fk in fold_ids}
    jobs = [(fk, fd, cid) for fk, fd in fold_dirs
            for cid in (rd.split_val_cases(fk, ds) if use_tta else rd.val_cases(fk, ds))]
    if len({cid for _, _, cid in jobs}) != len(jobs):
        raise MedsegError("a case is validated by two of the chosen folds (not a k-fold run?)", run)
    seg = {}
    for n_cases, (fk, fd, cid) in enumerate(jobs, start=1):
        i = ds.index(cid)
        if use_tta:
            if fk not in seg:
                seg[fk] = Segmenter.load(fd / "model.pt", tta=True, device=resolve_device(device))
            prob = seg[fk].predict(np.asarray(ds.image(i)), probabilities=True, spatial_dims=ds.spatial_dims).prob
        else:
            with np.load(RunDir.val_prediction(fd, cid)) as z:
                prob = z["prob"]
            if multiclass and prob.shape[1] == k + 1:  # training stores the softmax with its background
                prob = prob[:, 1:]
        truth = np.asarray(ds.mask(i))
        if prob.shape[0] != truth.shape[0] or prob.shape[1] != k or prob.shape[2:] != truth.shape[2:]:
            raise MedsegError(f"validation prediction {tuple(prob.shape)} does not fit case {cid} "
                              f"({truth.shape[0]} slices x {k} classes x {truth.shape[2]}x{truth.shape[3]})",
                              fd / "val_predictions")
        for v, rules in enumerate(variants):
            for j in range(k):
                tables[fk][v][j] += class_terms(prob[:, j], truth[:, j], grids[j], rules, ds.spatial_dims, objective)
        if progress:
            progress(n_cases, len(jobs))
        if console is not None and n_cases % 25 == 0:  # the real data takes minutes: show it moves
            console.print(f"  {n_cases}/{len(jobs)} cases", highlight=False)
    v_best, idx, best = _choose(tables, fold_ids, len(variants), objective)
    pooled = [[sum(tables[fk][v][j] for fk in fold_ids) for j in range(k)] for v in range(len(variants))]
    rules = variants[v_best]
    before = best_combination([t[:1] for t in pooled[0]], objective)[1]
    per_fold = {str(fk): {"score_before": best_combination([t[:1] for t in tables[fk][0]], objective)[1],
                          "score": best_combination([t[i : i + 1] for t, i in zip(tables[fk][v_best], idx)], objective)[1]}
                for fk in fold_ids}
    # nested: each fold scored with the rules chosen on the other folds alone (an honest estimate of
    # the tuned pipeline; the pooled choice above is scored on the cases it was chosen on)
    nested = {str(fk): {"score": sc, "thresholds": [grids[j][ix[j]][0] for j in range(k)],
                        "presence": [grids[j][ix[j]][1] for j in range(k)], "largest_cc": bool(variants[v].get("largest_cc"))}
              for fk, (v, ix, sc) in nested_scores(tables, fold_ids, len(variants), objective).items()}
    chosen = [grids[j][idx[j]] for j in range(k)]
    per_class = []
    for j, c in enumerate(classes):
        d, nd, h, nh = pooled[v_best][j][idx[j]]
        per_class.append({"class": c, "threshold": chosen[j][0], "presence": chosen[j][1],
                          "dice": d / nd if nd else None, "hd": h / nh if nh else None,
                          "before": {"threshold": grids[j][0][0], "presence": grids[j][0][1]}})
    result = {"run": str(run.resolve()), "dataset": str(ds_path), "folds": fold_ids,
              "case_days": len(jobs), "tta": use_tta, "objective": objective, "score_before": before, "score": best,
              "largest_cc": bool(rules.get("largest_cc")), "components": rules.get("components"), "per_fold": per_fold,
              "nested": nested,
              "grid": {"thresholds": sorted({float(v) for v in thresholds}), "presence": sorted({float(v) for v in presence})},
              "classes": per_class, "written": False}
    if write:
        for fk, fd in fold_dirs:
            b = bundles[fk]
            b["postprocess"] = {**merge_config(b.get("postprocess"), None),
                                "thresholds": [c[0] for c in chosen], "presence": [c[1] for c in chosen],
                                "largest_cc": bool(rules.get("largest_cc")), "components": rules.get("components")}
            if tta is not None:
                b["tta"] = {**(b.get("tta") or {}), "enabled": use_tta}
            b["meta"] = {**(b.get("meta") or {}), "tuned": {"score": best, "score_before": before, "tta": use_tta,
                                                          "objective": objective, "case_days": len(jobs)}}
            save_bundle(b, fd / "model.pt")
        result["written"] = True
        atomic_write_text(rd.tune_path, json.dumps(result, indent=1))
    if console is not None:
        console.print(f"tuned on {plural(len(jobs), 'validation case')} of {'folds' if len(fold_dirs) > 1 else 'fold'} "
                      f"{', '.join(str(fk) for fk, _ in fold_dirs)}{' with flip TTA' if use_tta else ''}: "
                      f"{task_score.label if task_score is not None else 'mean Dice per case'} {before:.4f} -> {best:.4f}",
                      highlight=False)
        lcc = ("keep the largest component" + (" (over the volume)" if rules.get("components") == "volume" else
                                               " (per slice)") if rules.get("largest_cc") else "no component rule")
        console.print(f"  component rule: {lcc} (chosen from {plural(len(variants), 'rule set')} "
                      "on the same cases)", highlight=False)
        for r, c in zip(per_class, chosen):
            console.print(f"  {r['class']:12s} {_fmt(c)}", highlight=False)
        if len(fold_ids) > 1:
            sc = [per_fold[str(fk)]["score"] for fk in fold_ids]
            console.print(f"  per fold: {', '.join(f'{v:.4f}' for v in sc)}; mean {np.mean(sc):.4f} ± {np.std(sc):.4f} "
                          "(rules chosen on these cases: optimistic)", highlight=False)
            ns = [nested[str(fk)]["score"] for fk in fold_ids]
            console.print(f"  nested, each fold with the rules chosen on the others: {', '.join(f'{v:.4f}' for v in ns)}; "
                          f"mean {np.mean(ns):.4f} ± {np.std(ns):.4f}", highlight=False)
        if write:
            console.print(f"written into {len(fold_dirs)} model.pt (postprocess{', tta' if tta is not None else ''}) and {rd.tune_path}",
                          highlight=False)
    return result


def tune_file(where: str | Path) -> Path:
    """``where`` itself when it is a file (a tune.json, or a file that keeps one's choice), else the run's
    tune.json."""
    where = Path(where)
    return where if where.is_file() else RunDir(where).tune_path


def tuned_rules(where: str | Path) -> dict[str, Any]:
    """The post-processing a tune chose, as bundle ``postprocess`` keys: ``where`` is a tuned run, its
    ``tune.json``, or any JSON file of the same shape (``classes`` with ``threshold`` and ``presence``,
    ``largest_cc``, ``components``), which keeps a choice once its run is gone."""
    f = tune_file(where)
    if not f.is_file():
        raise MedsegError("no such file", f, hint=f"run `medseg tune {where}` first, or give a tune.json")
    try:
        t = json.loads(f.read_text())
        rules = {"thresholds": [float(c["threshold"]) for c in t["classes"]],
                 "presence": [None if c["presence"] is None else float(c["presence"]) for c in t["classes"]],
                 "largest_cc": bool(t["largest_cc"]), "components": t["components"]}
    except (ValueError, KeyError, TypeError) as e:
        raise MedsegError(f"not a tune.json written by `medseg tune` ({type(e).__name__}: {e})", f) from None
    if not rules["thresholds"] or rules["components"] not in (None, *COMPONENTS):
        raise MedsegError("not a tune.json written by `medseg tune` (no classes, or components not slice/volume/null)", f)
    return rules


__all__ = ["tune", "tune_file", "tuned_rules", "candidates", "class_terms", "best_combination", "nested_scores", "THRESHOLDS", "PRESENCE"]
