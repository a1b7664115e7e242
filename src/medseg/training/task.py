"""What a training run is about: the prepared data set checked against the config, as a typed ``Task``.

    ds, task = check_task(cfg, config_path)    # task.classes, task.out_channels, task.score, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg.config import ExperimentConfig, config_dict
from medseg.data.prepared import PreparedDataset
from medseg.data.sampling import in_channels, norm_config
from medseg.errors import MedsegError
from medseg.losses import build_loss
from medseg.rundir import RunDir
from medseg.scores import score_for


@dataclass
class Task:
    """What the network learns and how it is scored: fixed by the data set and the config."""

    classes: list[str]
    class_kind: str  # multiclass (softmax over background + classes) or multilabel (a sigmoid per class)
    channels: list[str]
    in_channels: int
    out_channels: int
    spatial_dims: int
    norm: dict[str, Any]
    fingerprint: dict[str, Any]
    patients: dict[str, str] = field(default_factory=dict)  # case id -> patient
    score: str | None = None  # the data set's own score (medseg.scores), else None

    @property
    def multilabel(self) -> bool:
        return self.class_kind == "multilabel"


def selection_metric(task: Task) -> str:
    """The validation score that picks the best model: the data set's own score where it has one."""
    return f"val_{task.score}_score" if task.score else "val_dice_mean"


# keys that may change between a run and its --resume (extending training, another machine)
RESUMABLE_KEYS = {"train.epochs", "data.workers", "train.devices", "train.num_nodes", "train.accelerator", "train.strategy"}

def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

def check_task(cfg: ExperimentConfig, config_path: Path | None) -> tuple[Any, Task]:
    """Open the prepared dataset and check it against the config; returns (dataset, task info)."""
    from medseg.models import MODELS, create_model

    root = Path(cfg.data.prepared)
    if not root.exists():
        raise MedsegError(f"data.prepared: prepared dataset not found: {root}", config_path)
    ds = PreparedDataset.open(root)
    ds.verify()  # a missing or truncated array fails now, naming the file, not inside a loader worker
    if cfg.data.classes is not None and list(cfg.data.classes) != ds.classes:
        raise MedsegError(f"data.classes {cfg.data.classes} do not match the prepared dataset's classes {ds.classes} ({root})", config_path)
    if cfg.data.class_kind != "auto" and cfg.data.class_kind != ds.class_kind:
        raise MedsegError(f"data.class_kind {cfg.data.class_kind!r} does not match the prepared dataset's {ds.class_kind!r} ({root})", config_path)
    if not ds.info.get("has_masks", True) or any(c.mask is None for c in ds.cases):
        raise MedsegError("the prepared dataset has no masks (prepared with --images-only); cannot train on it", root)
    if cfg.data.mode == "3d" and all(c.shape[0] == 1 for c in ds.cases):
        raise MedsegError("data.mode 3d needs volumes; this prepared dataset holds single 2D images", config_path)
    if cfg.data.size is None and cfg.data.mode != "3d" and len({tuple(c.shape[2:]) for c in ds.cases}) > 1:
        raise MedsegError("cases differ in size: set data.size (training crop) so that slices can be batched", config_path)
    if cfg.augment.channel_fill > 0 and cfg.augment.channel_fill_source >= len(ds.channels):
        raise MedsegError(f"augment.channel_fill_source is {cfg.augment.channel_fill_source}, but the dataset has "
                          f"{len(ds.channels)} channels ({', '.join(ds.channels)}): give 0-{len(ds.channels) - 1}", config_path)
    try:
        MODELS.get(cfg.model.name)
    except MedsegError as e:
        raise MedsegError(f"model.name: {e.problem}", config_path, hint=e.hint) from None
    multilabel = ds.class_kind == "multilabel"
    task = Task(
        classes=ds.classes,
        class_kind=ds.class_kind,
        channels=ds.channels,
        in_channels=in_channels(len(ds.channels), cfg.data),
        out_channels=len(ds.classes) if multilabel else len(ds.classes) + 1,
        spatial_dims=3 if cfg.data.mode == "3d" else 2,
        norm=norm_config(ds, cfg.data.normalization),
        fingerprint=ds.fingerprint,
        patients={c.id: c.patient for c in ds.cases},
        score=task_score_name(ds),
    )
    try:
        m = create_model(cfg.model.name, task.in_channels, task.out_channels, spatial_dims=task.spatial_dims, **cfg.model.kwargs)
    except MedsegError as e:  # a misspelt or wrongly typed model.kwargs entry
        raise MedsegError(e.problem, config_path) from None
    div = int(getattr(m, "required_divisor", 1))
    if cfg.data.size is not None and any(s % div for s in cfg.data.size[-2:] if cfg.data.mode != "3d") :
        raise MedsegError(f"data.size {cfg.data.size} must be divisible by {div} for model {cfg.model.name!r}", config_path)
    if cfg.data.mode == "3d" and any(s % div for s in cfg.data.size):
        raise MedsegError(f"data.size {cfg.data.size} must be divisible by {div} for model {cfg.model.name!r}", config_path)
    if cfg.data.size is None and any(s % div for s in ds.cases[0].shape[2:]):
        raise MedsegError(f"slices are {ds.cases[0].shape[2]}x{ds.cases[0].shape[3]}, not divisible by {div} for model "
                          f"{cfg.model.name!r}: set data.size (a crop, or with data.resize a resize)", config_path)

    try:  # builds each term and computes it once: a wrongly typed kwarg fails here, not in the first step
        build_loss(cfg.loss, ds.class_kind, ds.classes, ds.fingerprint)
    except MedsegError as e:
        raise MedsegError(e.problem if e.problem.startswith("loss") else f"loss: {e.problem}", config_path) from None
    return ds, task

def task_score_name(ds: Any) -> str | None:
    """The data-set score (``medseg.scores``) of a prepared data set, if its data brings one: validation
    then adds it per case and selects the best model by it."""
    score = score_for(ds.info.get("source_format"), ds.classes)
    return None if score is None else score.name

def folds_of(ds: Any, fold: str | int, config_path: Path | None) -> list[int]:
    try:
        n = len(ds.splits()["folds"])
    except MedsegError:
        raise MedsegError("the prepared dataset has no splits.json (fewer than 2 patients?)", ds.root) from None
    if str(fold) == "all":
        if n == 0:
            raise MedsegError("the prepared dataset has no validation folds (one patient): train with --fold full", ds.root)
        return list(range(n))
    if str(fold) == "full":
        return ["full"]
    try:
        k = int(fold)
    except ValueError:
        raise MedsegError(f"--fold must be an index, 'all' or 'full', got {fold!r}", config_path) from None
    if n == 0:
        raise MedsegError("the prepared dataset has no validation folds (one patient): train with --fold full", ds.root)
    if not 0 <= k < n:
        raise MedsegError(f"fold {k} is out of range: the prepared dataset has folds 0..{n - 1}", ds.root)
    return [k]

def check_resume(cfg: ExperimentConfig, run: Path) -> None:
    saved_path = RunDir(run).config_path
    if not saved_path.is_file():
        raise MedsegError("--resume: no run here (config.yaml is missing)", run)
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(config_dict(cfg))
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise MedsegError(
            f"--resume: the config differs from this run's config.yaml at {k!r} ({saved.get(k)!r} in the run, "
            f"{now.get(k)!r} now); only {', '.join(sorted(RESUMABLE_KEYS))} may change",
            saved_path,
        )
