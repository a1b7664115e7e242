"""The run directory: what ``medseg train`` writes and every later stage reads, in one place.

    from medseg.rundir import RunDir
    run = RunDir("runs/lgg")
    run.bundles("best")            # [runs/lgg/fold_2/model.pt]
    run.dataset()                  # the prepared dataset it was trained on

Layout::

    RUN/config.yaml                the resolved experiment config
    RUN/splits.json                the folds it was trained with
    RUN/cv_summary.json            per-fold best scores (--fold all); picks the "best" fold
    RUN/tune.json                  what `medseg tune` chose
    RUN/fold_K/ (or RUN/full/)     state.json (training or finished), model.pt (the bundle),
                                   checkpoints/{last,best}.ckpt, metrics.csv,
                                   progress.png, tb/, val_predictions/<case>.npz (prob, mask)
    RUN/fold_K/member_I/           with train.members > 1: each member trained as a fold of its own
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.atomic import atomic_write_text
from medseg.data.prepared import case_stem
from medseg.errors import MedsegError, warn

_FOLD = re.compile(r"^fold_(\d+)$")
Folds = str | Sequence[int]


class RunDir:
    """A run directory; every path and rule about its layout lives here."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- files of the run ------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits_path(self) -> Path:
        return self.root / "splits.json"

    @property
    def cv_summary_path(self) -> Path:
        return self.root / "cv_summary.json"

    @property
    def tune_path(self) -> Path:
        return self.root / "tune.json"

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """A run directory: a saved config and at least one fold folder (``looks_like_run``: the folders
        without the config)."""
        p = Path(path)
        return RunDir.looks_like_run(p) and (p / "config.yaml").is_file()

    @staticmethod
    def looks_like_run(path: str | Path) -> bool:
        p = Path(path)
        return p.is_dir() and any(p.glob("fold_*"))

    def fold_dir(self, fold: int | str) -> Path:
        """RUN/fold_K, or RUN/full for ``--fold full``."""
        return self.root / ("full" if fold == "full" else f"fold_{fold}")

    @staticmethod
    def member_dir(fold_dir: Path, member: int) -> Path:
        return fold_dir / f"member_{member}"

    @staticmethod
    def val_prediction(fold_dir: Path, case_id: str) -> Path:
        return fold_dir / "val_predictions" / f"{case_stem(case_id)}.npz"

    # --- whether a fold's training finished ---------------------------------------------------
    @staticmethod
    def mark(fold_dir: Path, finished: bool, **info: Any) -> None:
        """Record that a fold's training started (``finished=False``) or ended; a fold killed in between
        keeps saying ``training``, so that later stages know its model.pt is only the best so far."""
        import os
        import socket
        import time

        state = {"state": "finished" if finished else "training", "pid": os.getpid(), "host": socket.gethostname(),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_text(fold_dir / "state.json", json.dumps(state, indent=1))

    @staticmethod
    def unfinished(fold_dir: Path) -> str | None:
        """Why ``fold_dir``'s training is not finished (None when it finished, or was trained before runs
        recorded their state)."""
        p = Path(fold_dir) / "state.json"
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text())
        except (OSError, ValueError):
            return "its state.json is unreadable"
        if state.get("state") == "finished":
            return None
        last = Path(fold_dir) / "checkpoints" / "last.ckpt"
        return ("its training did not finish" + (f" (started {state.get('time')})" if state.get("time") else "")
                + ("; the last checkpoint is " + str(last) if last.is_file() else "; it has no checkpoint yet"))

    @classmethod
    def check_finished(cls, bundles: list[Path], unfinished: bool = False) -> None:
        """An error naming the first bundle whose fold did not finish training, or with ``unfinished`` a
        warning: its model.pt is the best epoch so far, not the run's result."""
        for b in bundles:
            why = cls.unfinished(Path(b).parent)
            if why is None:
                continue
            if not unfinished:
                raise MedsegError(f"{why}: model.pt is only the best epoch so far", Path(b).parent,
                                  hint="continue it with `medseg train ... --resume`, or pass --unfinished to use it as it is")
            warn(f"{why}: using its best epoch so far (--unfinished)", Path(b).parent)

    # --- trained folds -----------------------------------------------------------------------
    def trained_folds(self) -> dict[int, Path]:
        """{fold index: fold folder} of the folds that hold a ``model.pt``."""
        found = {}
        for d in sorted(self.root.glob("fold_*")):
            m = _FOLD.match(d.name)
            if m and (d / "model.pt").is_file():
                found[int(m.group(1))] = d
        return found

    def fold_dirs(self, folds: Folds = "all") -> list[tuple[int, Path]]:
        """(index, folder) of the trained folds chosen by ``folds`` ("all", "0,2" or [0, 2])."""
        found = self.trained_folds()
        if not found:
            raise MedsegError("not a run directory: no fold_K/model.pt (train first)", self.root)
        if isinstance(folds, str) and folds == "all":
            return sorted(found.items())
        ks = _fold_list(folds)
        missing = [k for k in ks if k not in found]
        if missing:
            raise MedsegError(f"fold {missing[0]} has no model.pt (folds here: {', '.join(map(str, sorted(found)))})",
                              self.root)
        return [(k, found[k]) for k in ks]

    def bundles(self, folds: Folds = "best", unfinished: bool = False) -> list[Path]:
        """``_bundles`` of unfinished folds refused (``check_finished``)."""
        out = self._bundles(folds)
        self.check_finished(out, unfinished)
        return out

    def _bundles(self, folds: Folds = "best") -> list[Path]:
        """The ``model.pt`` files chosen by ``folds``: "best" (by ``cv_summary.json``), "all", "0,2",
        [0, 2], or "full" (the model trained on every case, also taken when it is the only one). A fold
        folder itself gives its own bundle."""
        if (self.root / "model.pt").is_file():
            return [self.root / "model.pt"]
        full = self.fold_dir("full") / "model.pt"
        found = self.trained_folds()
        if folds == "full" or (full.is_file() and not found):
            if not full.is_file():
                raise MedsegError("no model trained on every case here (expected full/model.pt; train with --fold full)",
                                  self.root)
            return [full]
        if not found:
            raise MedsegError("no trained model in this run directory (expected fold_K/model.pt or full/model.pt)",
                              self.root)
        if folds == "all":
            return [found[k] / "model.pt" for k in sorted(found)]
        if folds == "best":
            return [found[self.best_fold(found)] / "model.pt"]
        wanted = _fold_list(folds)
        missing = [k for k in wanted if k not in found]
        if missing:
            raise MedsegError(f"fold(s) {missing} not trained; available: {sorted(found)}", self.root)
        return [found[k] / "model.pt" for k in wanted]

    def best_fold(self, found: dict[int, Any]) -> int:
        """The fold with the highest validation score in ``cv_summary.json`` (else the lowest index)."""
        if len(found) == 1:
            return next(iter(found))
        if self.cv_summary_path.is_file():
            try:
                data = json.loads(self.cv_summary_path.read_text())
                metric = data.get("selected_by", "val_dice_mean")
                scores = {int(k): float(row[metric]) for k, row in data.get("folds", {}).items()
                          if isinstance(row, dict) and row.get(metric) is not None}
                scores = {k: v for k, v in scores.items() if k in found}
                if scores:
                    return max(scores, key=lambda k: (scores[k], -k))
            except (ValueError, KeyError, TypeError):
                pass
        return min(found)

    # --- what it was trained on -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        import yaml

        try:
            doc = yaml.safe_load(self.config_path.read_text()) or {}
        except FileNotFoundError:
            raise MedsegError("no config.yaml in the run", self.root) from None
        except (OSError, yaml.YAMLError) as e:
            raise MedsegError(f"cannot read the run's config ({' '.join(str(e).split())})", self.config_path) from None
        if not isinstance(doc, dict):
            raise MedsegError("the run's config is not a mapping", self.config_path)
        return doc

    def dataset(self, override: str | Path | None = None) -> Path:
        """The prepared dataset the run was trained on (``data.prepared``: absolute, or relative to the
        working directory, the run, or the run's parent), or ``override`` (``--data``)."""
        if override is not None:
            return Path(override)
        if not self.config_path.is_file():
            raise MedsegError("no config.yaml in the run (pass --data PREPARED)", self.root)
        prepared = (self.config().get("data") or {}).get("prepared")
        if not prepared:
            raise MedsegError("config has no data.prepared (the prepared dataset of the run)", self.config_path)
        p = Path(prepared)
        cand = [p] if p.is_absolute() else [p, self.root / p, self.root.parent / p]
        found = next((c for c in cand if (c / "dataset.json").is_file()), None)
        if found is None:
            raise MedsegError(f"the run's prepared dataset {prepared!r} is not found (pass --data PREPARED)",
                              self.config_path)
        return found

    def splits(self) -> dict[str, Any] | None:
        return json.loads(self.splits_path.read_text()) if self.splits_path.is_file() else None

    # --- validation predictions ----------------------------------------------------------------
    def val_predictions(self, unfinished: bool = False) -> dict[str, Path]:
        """{file stem: ``.npz``} of every fold's validation predictions (a case in two folds is an error;
        a fold whose training did not finish as in ``check_finished``)."""
        files: dict[str, Path] = {}
        for fold in sorted(self.root.glob("fold_*"), key=lambda p: p.name):
            if any((fold / "val_predictions").glob("*.npz")):
                self.check_finished([fold / "model.pt"], unfinished)
            for f in sorted((fold / "val_predictions").glob("*.npz")):
                if f.stem in files:
                    raise MedsegError(f"case {f.stem} has validation predictions in two folds "
                                      f"({files[f.stem].parent.parent.name})", f)
                files[f.stem] = f
        return files

    def val_cases(self, fold: int, ds: Any) -> list[str]:
        """The case ids a fold's training validated (its ``val_predictions``), as ids of ``ds``."""
        vp = self.fold_dir(fold) / "val_predictions"
        files = sorted(vp.glob("*.npz")) if vp.is_dir() else []
        if not files:
            raise MedsegError("no validation predictions (val_predictions/*.npz): train this fold first, or use --tta",
                              self.fold_dir(fold))
        by_name = {case_stem(c.id): c.id for c in ds.cases}
        out = []
        for f in files:
            if f.stem not in by_name:
                raise MedsegError(f"validation prediction of a case that is not in the prepared dataset {ds.root}", f)
            out.append(by_name[f.stem])
        return out

    def split_val_cases(self, fold: int, ds: Any) -> list[str]:
        """A fold's validation case ids from the run's ``splits.json`` (else the dataset's)."""
        splits = self.splits() or ds.splits()
        try:
            return list(splits["folds"][fold]["val"])
        except (KeyError, IndexError):
            raise MedsegError(f"splits.json has no fold {fold}", self.splits_path) from None

    def curves(self) -> dict[str, Path]:
        """{label: metrics.csv} of every fold's (and member's) training curves."""
        out: dict[str, Path] = {}
        for fold in sorted(self.root.glob("fold_*"), key=lambda p: p.name):
            if (fold / "metrics.csv").is_file():
                out[fold.name] = fold / "metrics.csv"
            for m in sorted(fold.glob("member_*/metrics.csv")):
                out[f"{fold.name}/{m.parent.name}"] = m
        return out


def _fold_list(folds: Folds) -> list[int]:
    try:
        return [int(f) for f in (folds.split(",") if isinstance(folds, str) else folds)]
    except ValueError:
        raise MedsegError(f"folds must be 'best', 'all', 'full' or fold indices like 0,2; got {folds!r}") from None


__all__ = ["RunDir"]
