"""``train.init``: start training from trained weights (fine-tuning, or a resolution schedule).

    weights = warm_start_weights(cfg, task, ds, fold, member)   # a state_dict for SegModule.model
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medseg.bundle import bundle_from_checkpoint, load_bundle, resolve_model
from medseg.errors import MedsegError
from medseg.training.task import Task


def _source(spec: str, fold: int | str, ds: Any) -> Path:
    """The bundle to start fold ``fold`` from. A run directory gives its own fold ``fold`` (so a fold's
    validation patients stay unseen), after checking the run was split as this dataset is."""

    run = Path(spec).expanduser()
    if run.is_dir() and not (run / "model.pt").is_file() and fold != "full":
        splits = run / "splits.json"
        if splits.is_file():
            try:
                theirs = json.loads(splits.read_text()).get("patient_fold")
            except ValueError:
                theirs = None
            if theirs != ds.splits().get("patient_fold"):
                raise MedsegError(f"this run's folds differ from the dataset's (its splits.json); fold {fold} "
                                  "would start from weights trained on its own validation patients", run)
        return resolve_model(run, [int(fold)])[1][0]
    return resolve_model(spec, "best")[1][0]


def warm_start_weights(cfg: Any, task: Task, ds: Any, fold: int | str, member: int = 0) -> dict[str, Any]:
    """The weights ``train.init`` names for ``fold``, checked against the config's network; member ``i``
    of a ``train.members`` run starts from the source's member ``i`` (cycling when it has fewer)."""
    try:
        return _weights(cfg, task, ds, fold, member)
    except MedsegError as e:  # say which setting led to the file
        raise MedsegError(f"train.init: {e.problem}", e.path, e.hint) from None


def _weights(cfg: Any, task: Task, ds: Any, fold: int | str, member: int) -> dict[str, Any]:
    path = _source(str(cfg.train.init), fold, ds)
    if path.suffix == ".onnx":
        raise MedsegError("an ONNX file cannot be trained; give the run directory or model.pt it was exported from", path)
    b = bundle_from_checkpoint(path) if path.suffix == ".ckpt" else load_bundle(path)
    a = b["arch"]
    want = {"name": cfg.model.name, "in_channels": task.in_channels, "out_channels": task.out_channels,
            "spatial_dims": task.spatial_dims, "kwargs": dict(cfg.model.kwargs)}
    got = {k: a.get(k, {} if k == "kwargs" else None) for k in want}
    if got != want:
        diff = "; ".join(f"{k} {got[k]!r} here, {want[k]!r} in the config" for k in want if got[k] != want[k])
        raise MedsegError(f"the network does not match the config's ({diff})", path)
    nets = [b["state_dict"], *(b.get("members") or [])]
    return nets[member % len(nets)]
