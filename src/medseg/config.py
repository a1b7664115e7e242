"""The experiment config: YAML in, pydantic-validated, every error naming the key and the file.

    cfg = load_config("configs/lgg_unet.yaml", overrides={"train.epochs": "3"})

Relative paths (``data.prepared``, ``train.init``) resolve against the config file's folder, so a config travels with
its data; a ``--set data.prepared=...`` override resolves against the current folder, like any path
typed on a command line. ``dump_config`` writes the fully resolved config (absolute paths, every default spelled
out) that a run stores and that reproduces the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import MedsegError


class _Section(BaseModel):
    # unknown keys are errors: a typo must never silently fall back to a default
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    prepared: str
    mode: Literal["2d", "2.5d", "3d"] = "2d"
    context: int = Field(0, ge=0)  # 2.5D: slices i-k..i+k
    stride: int = Field(1, ge=1)  # 2.5D: distance between context slices
    size: Optional[list[int]] = None  # training crop [h, w] or [d, h, w]; None = whole slice
    resize: bool = False  # resize slices to size instead of random crop/pad
    fg_oversample: float = Field(0.33, ge=0.0, le=1.0)  # nnU-Net's default 1/3
    normalization: Literal["zscore_case", "zscore_body", "dataset"] = "zscore_case"
    batch_size: int = Field(8, ge=1)
    val_batch_size: int = Field(16, ge=1)
    # loader processes; auto: none on a CPU (measured fastest on 2 cores, docs/training.md), one per spare
    # core (up to 12) on a GPU, with pinned memory
    workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = "auto"
    # keep the training cases in the GPU's memory and cut batches there (data/resident.py); auto: on a GPU
    # when they take under a quarter of its free memory
    on_device: Union[Literal["auto"], bool] = "auto"
    classes: Optional[list[str]] = None  # when given, must equal the prepared dataset's classes
    class_kind: Literal["auto", "multiclass", "multilabel"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.mode == "2.5d" and self.context < 1:
            raise ValueError("mode 2.5d needs context >= 1")
        if self.size is not None:
            want = 3 if self.mode == "3d" else 2
            if len(self.size) != want:
                raise ValueError(f"size must have {want} values for mode {self.mode}")
            if any(s < 1 for s in self.size):
                raise ValueError("size values must be positive")
        if self.mode == "3d" and self.size is None:
            raise ValueError("mode 3d needs a patch size [d, h, w]")
        return self


class ModelConfig(_Section):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class LossTerm(_Section):
    name: str  # a registered loss (medseg.losses.LOSSES): dice, ce, bce, dice_ce, dice_bce, focal, tversky, ...
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        from medseg.losses import LOSSES  # torch: only when a config is validated

        if v not in LOSSES:
            import difflib

            close = difflib.get_close_matches(v, LOSSES.names(), n=1)
            raise ValueError(f"unknown loss {v!r} (known: {', '.join(LOSSES.names())})"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        return v


class LossConfig(_Section):
    terms: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="dice"), LossTerm(name="ce")])
    # class weights of the (B)CE terms: None, "auto" (from the fingerprint's class frequencies) or a list
    class_weights: Union[None, Literal["auto"], list[float]] = None
    deep_supervision_weights: Optional[list[float]] = None

    @field_validator("terms")
    @classmethod
    def _nonempty(cls, v: list[LossTerm]) -> list[LossTerm]:
        if not v:
            raise ValueError("at least one loss term is needed")
        return v


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = 0.99  # sgd (nnU-Net's value)
    nesterov: bool = True


class ScheduleConfig(_Section):
    name: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    power: float = 0.9  # poly
    # what the decay runs over: optimizer steps (epochs x steps_per_epoch, reproducible), or the
    # wall-clock budget train.max_minutes, so that the schedule ends with the budget on any machine
    by: Literal["steps", "time"] = "steps"


class EarlyStopping(_Section):
    patience: int = Field(10, ge=1)  # in validations
    min_delta: float = 0.0


class TrainConfig(_Section):
    epochs: int = Field(50, ge=1)
    steps_per_epoch: int = Field(250, ge=1)
    val_every: int = Field(1, ge=1)
    early_stopping: Optional[EarlyStopping] = None
    ema: Optional[float] = Field(None, gt=0, lt=1)  # decay, e.g. 0.999
    clip: Optional[float] = Field(1.0, gt=0)
    accumulate: int = Field(1, ge=1)
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = "auto"
    channels_last: Union[Literal["auto"], bool] = "auto"
    seed: int = 0
    # N networks per fold, seeds seed..seed+N-1, trained side by side (separate processes, the CPU
    # threads split between them) and bundled as one model averaging their probabilities
    members: int = Field(1, ge=1)
    # auto: on a CPU (bit-exact resumes); off on a GPU, where cuDNN then picks its fastest kernels
    deterministic: Union[Literal["auto"], bool] = "auto"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = "auto"  # auto: every visible GPU, or 1 CPU process
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    # wall-clock budget: training stops after the step that spends it, whatever the epoch, and
    # validates once more; with schedule.by: time the LR schedule runs over it (epochs is then a cap)
    max_minutes: Optional[float] = Field(None, gt=0)
    # start from trained weights (fine-tuning, a resolution schedule): a run directory (fold K starts from
    # its fold K), a model.pt or checkpoint, or a shipped model's name; the network must match model
    init: Optional[str] = None

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_number(cls, v: Any) -> Any:
        return "32" if v == 32 and not isinstance(v, bool) else v  # YAML and --set read 32 as a number

    @model_validator(mode="after")
    def _members_alone(self) -> "TrainConfig":
        if self.members > 1 and (self.devices not in (1, "auto") or self.num_nodes > 1 or self.strategy != "auto"):
            raise ValueError("train.members > 1 trains the members side by side on one device; "
                             "it does not combine with devices, num_nodes or strategy (DDP)")
        return self


class AugmentConfig(_Section):
    enabled: bool = True
    flip: float = Field(0.5, ge=0, le=1)  # probability per spatial axis
    flip_axes: Optional[list[int]] = None  # spatial axes (0 = first), default: all in-plane axes
    rotate: float = Field(0.3, ge=0, le=1)  # probability
    rotate_degrees: float = 15.0
    scale: float = Field(0.3, ge=0, le=1)
    scale_range: list[float] = Field(default_factory=lambda: [0.85, 1.15])
    elastic: float = Field(0.0, ge=0, le=1)  # probability of a smooth random displacement (grid distortion)
    elastic_magnitude: float = 0.03  # displacement std in normalised [-1, 1] coordinates
    elastic_grid: int = 4  # control points per axis
    gamma: float = Field(0.3, ge=0, le=1)
    gamma_range: list[float] = Field(default_factory=lambda: [0.7, 1.5])
    contrast: float = Field(0.15, ge=0, le=1)
    contrast_range: list[float] = Field(default_factory=lambda: [0.75, 1.25])
    noise: float = Field(0.15, ge=0, le=1)
    noise_std: float = 0.1
    # what differs between scanners, off by default: a smooth multiplicative bias field (coil
    # sensitivity), blur, and a lower acquisition resolution (downsampled, then back)
    bias_field: float = Field(0.0, ge=0, le=1)
    bias_field_magnitude: float = Field(0.3, ge=0)  # std of the field's log at its control points
    blur: float = Field(0.0, ge=0, le=1)
    blur_sigma: list[float] = Field(default_factory=lambda: [0.5, 1.5])  # pixels
    lowres: float = Field(0.0, ge=0, le=1)
    lowres_factor: list[float] = Field(default_factory=lambda: [1.0, 2.0])  # pixel size multiplied by
    # gamma and contrast draw their on/off and factor per channel (each slice's own in a 2.5D stack)
    # instead of per sample: for sequences whose contrasts vary independently between scanners
    intensity_per_channel: bool = False
    # probability, per sample and per other channel, of replacing that channel with channel
    # ``channel_fill_source``: mimics datasets that fill a missing sequence with another one (the LGG
    # set fills a missing pre- or post-contrast scan with FLAIR, channel 1)
    channel_fill: float = Field(0.0, ge=0, le=1)
    channel_fill_source: int = Field(0, ge=0)


class PostprocessConfig(_Section):
    """Decision and clean-up rules stored in the bundle; ``medseg predict`` flags override them."""

    # per class, default 0.5: multilabel models, and a one-class softmax model's foreground probability
    # (0.5 = argmax); a softmax over several classes decides by argmax
    thresholds: Optional[list[float]] = None
    # zero class j (per slice in 2D, per volume in 3D) where its max probability is under presence[j];
    # one number for every class, a list per class, None = off
    presence: Union[None, float, list[float]] = None
    min_size: int = Field(0, ge=0)  # drop components under N pixels/voxels
    largest_cc: bool = False
    # where min_size and largest_cc find components: None = the model's own (slices in 2D, volume in 3D);
    # "volume" joins a 2D model's slices of one case in 3D (LGG: a tumour spans slices)
    components: Optional[Literal["slice", "volume"]] = None

    @field_validator("thresholds", "presence")
    @classmethod
    def _unit(cls, v):
        vals = v if isinstance(v, list) else [] if v is None else [v]
        if any(not 0.0 <= x <= 1.0 for x in vals):
            raise ValueError("probabilities must be in [0, 1]")
        if isinstance(v, list) and not v:
            raise ValueError("give one value per class (or one number for presence), not an empty list")
        return v


class InferenceConfig(_Section):
    """``medseg predict``'s defaults for a trained model (stored in the bundle; CLI flags override)."""

    tta: bool = False  # flip test-time augmentation on by default
    # groups of spatial axes to flip (-1 width, -2 height, -3 depth); None = each in-plane axis
    # ([[-1], [-2]]; 3D models add [-3])
    tta_flips: Optional[list[list[int]]] = None
    overlap: float = Field(0.5, ge=0.0, lt=1.0)  # 3D sliding-window overlap

    @field_validator("tta_flips")
    @classmethod
    def _flips(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one flip group, e.g. [[-1], [-2]], or null for the default")
        for g in v:
            if not g or any(a not in (-1, -2, -3) for a in g) or len(set(g)) != len(g):
                raise ValueError(f"bad flip group {g}: axes -1 (width), -2 (height), -3 (depth), each once")
        return v


class ExperimentConfig(_Section):
    data: DataConfig
    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @model_validator(mode="after")
    def _tta_axes(self) -> "ExperimentConfig":
        if self.schedule.by == "time" and self.train.max_minutes is None:
            raise ValueError("schedule.by: time needs train.max_minutes (the budget the schedule runs over)")
        if self.data.mode != "3d" and any(-3 in g for g in self.inference.tta_flips or []):
            raise ValueError("inference.tta_flips: axis -3 (depth) is for 3D models only")
        return self


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _set_key(doc: dict[str, Any], key: str, value: Any, path: Path | None) -> None:
    parts = key.split(".")
    if not all(parts):
        raise MedsegError(f"override key {key!r} is malformed", path)
    node = doc
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise MedsegError(f"override {key!r}: {p!r} is not a section", path)
        node = nxt
    node[parts[-1]] = value


def apply_overrides(doc: dict[str, Any], overrides: dict[str, str] | None, path: Path | None = None) -> dict[str, Any]:
    """``{"train.epochs": "3"}`` -> set doc["train"]["epochs"] = 3 (values parsed as YAML scalars/lists)."""
    for key, raw in (overrides or {}).items():
        try:
            value = yaml.load(raw, Loader=UniqueKeyLoader) if isinstance(raw, str) else raw
        except yaml.constructor.ConstructorError as e:  # {a: 1, a: 2} in a --set value
            raise MedsegError(f"--set {key}: {' '.join(str(e.problem).split())}") from None
        except yaml.YAMLError:
            value = raw
        if isinstance(raw, str) and value is None and raw.strip() not in ("null", "~", ""):
            value = raw
        _set_key(doc, key, value, path)
    return doc


def parse_config(doc: Any, path: Path | None = None, base: Path | None = None) -> ExperimentConfig:
    if not isinstance(doc, dict):
        raise MedsegError("config must be a YAML mapping of sections (data, model, ...)", path)
    try:
        cfg = ExperimentConfig.model_validate(doc)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        key = _loc(first["loc"])
        if first["type"] == "extra_forbidden":
            msg = f"unknown key {key!r}"
        elif first["type"] == "missing":
            msg = f"missing key {key!r}"
        else:
            msg = f"{key}: {first['msg']} (got {first.get('input')!r})"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        raise MedsegError(msg, path) from None
    if base is not None:
        cfg.data.prepared = _resolved(cfg.data.prepared, base)
        if cfg.train.init and not _is_shipped(cfg.train.init):
            cfg.train.init = _resolved(cfg.train.init, base)
    return cfg


def _resolved(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _is_shipped(name: str) -> bool:
    from medseg.bundle import SHIPPED

    return name in SHIPPED and not Path(name).exists()


def load_config(path: str | Path, overrides: dict[str, str] | None = None) -> ExperimentConfig:
    """Read, override, validate and resolve a config file."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError("config file not found", path)
    try:
        doc = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise yaml_error(e, path) from None
    except UnicodeDecodeError as e:
        raise MedsegError(f"not a text file (byte {e.start} is not UTF-8)", path) from None
    check_override_keys(overrides)
    if isinstance(doc, dict):
        apply_overrides(doc, overrides, path)
        # a path typed on the command line is relative to where it was typed, not to the config file
        for key in ("data.prepared", "train.init"):
            given = (overrides or {}).get(key)
            sec, name = key.split(".")
            if isinstance(given, str) and isinstance(doc.get(sec), dict) and given.strip() and not _is_shipped(given):
                doc[sec][name] = str(Path(given).expanduser().resolve())
    return parse_config(doc, path, base=path.resolve().parent)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (by default the second silently
    replaces the first, and the error, if any, then names the wrong key)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); the second would "
                        "replace the first", key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key: the base loader says so
                continue
        return super().construct_mapping(node, deep)


def yaml_error(e: yaml.YAMLError, path: Path) -> MedsegError:
    """One line, ``file:line: problem``, for a YAML syntax error or a tag that would build an object."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("tag", 1)[1].strip(" '")
        problem = f"tag {tag} is not allowed: a config holds plain values, never objects"
    context = getattr(e, "context", None)
    if context and not isinstance(e, yaml.constructor.ConstructorError):
        problem = f"{' '.join(str(context).split())}: {problem}"
    return MedsegError(f"invalid YAML: {problem}", where)


def check_override_keys(overrides: dict[str, str] | None) -> None:
    """Each ``--set a.b`` must name a config key: a typo is the command line's, with the nearest key."""
    import difflib

    for key in overrides or {}:
        model: Any = ExperimentConfig
        parts = key.split(".")
        for i, part in enumerate(parts):
            fields = getattr(model, "model_fields", None)
            if fields is None:  # a free-form value (a dict option): anything below goes
                break
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1)
                section = ".".join(parts[:i]) or "the config's top level"
                hint = f"did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else f"known: {', '.join(fields)}"
                raise MedsegError(f"--set {key}: {section} has no key {part!r}", hint=hint)
            ann = fields[part].annotation
            options = (ann, *getattr(ann, "__args__", ()))
            if any(a is dict or getattr(a, "__origin__", None) is dict for a in options):
                break  # a free-form mapping (model.kwargs): its keys are the model's to check
            model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if model is None and i < len(parts) - 1:
                raise MedsegError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section")


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
