from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medseg.config import apply_overrides, dump_config, load_config, parse_config
from medseg.errors import MedsegError


def _write(tmp: Path, doc: dict, name: str = "exp.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(doc))
    return p


BASE = {"data": {"prepared": "prep", "size": [64, 64]}, "model": {"name": "unet"}}


def test_relative_prepared_path_resolves_against_the_config_folder(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = load_config(_write(sub, BASE))
    assert cfg.data.prepared == str((sub / "prep").resolve())
    assert cfg.train.steps_per_epoch == 250 and cfg.data.mode == "2d"


def test_prepared_override_resolves_against_the_current_folder(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(sub, BASE), {"data.prepared": "data/prep"})
    assert cfg.data.prepared == str(tmp_path / "data" / "prep")


def test_init_path_resolves_as_data_prepared_does_and_a_shipped_name_stays_a_name(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    p = _write(sub, {**BASE, "train": {"init": "../runs/stage1"}})
    assert load_config(p).train.init == str(tmp_path / "runs" / "stage1")  # against the config's folder
    assert load_config(p, {"train.init": "runs/other"}).train.init == str(tmp_path / "runs" / "other")  # against cwd
    assert load_config(p, {"train.init": "lgg-unet"}).train.init == "lgg-unet"
    assert load_config(_write(sub, {**BASE, "train": {"init": "lgg-unet"}}, "b.yaml")).train.init == "lgg-unet"


def test_unknown_key_is_an_error_naming_the_key_and_the_file(tmp_path):
    p = _write(tmp_path, {**BASE, "train": {"epohcs": 3}})
    with pytest.raises(MedsegError) as e:
        load_config(p)
    assert e.value.path == str(p)
    assert e.value.problem == "unknown key 'train.epohcs'"


def test_wrong_type_names_the_key(tmp_path):
    p = _write(tmp_path, {**BASE, "train": {"epochs": "many"}})
    with pytest.raises(MedsegError) as e:
        load_config(p)
    assert e.value.problem.startswith("train.epochs: ")
    assert "'many'" in e.value.problem


def test_missing_section_and_bad_mode_constraints(tmp_path):
    with pytest.raises(MedsegError, match="missing key 'model'"):
        load_config(_write(tmp_path, {"data": BASE["data"]}))
    with pytest.raises(MedsegError, match="2.5d needs context"):
        load_config(_write(tmp_path, {**BASE, "data": {"prepared": "p", "mode": "2.5d"}}))
    with pytest.raises(MedsegError, match="3d needs a patch size"):
        load_config(_write(tmp_path, {**BASE, "data": {"prepared": "p", "mode": "3d"}}))
    with pytest.raises(MedsegError, match="size must have 3 values"):
        load_config(_write(tmp_path, {**BASE, "data": {"prepared": "p", "mode": "3d", "size": [8, 8]}}))


def test_overrides_parse_yaml_values_and_create_nested_keys(tmp_path):
    p = _write(tmp_path, BASE)
    cfg = load_config(p, {"train.epochs": "7", "data.size": "[32, 48]", "model.kwargs.base": "8",
                          "data.prepared": "/abs/data", "optim.name": "sgd", "train.ema": "0.99"})
    assert cfg.train.epochs == 7
    assert cfg.data.size == [32, 48]
    assert cfg.model.kwargs == {"base": 8}
    assert cfg.data.prepared == "/abs/data"
    assert cfg.optim.name == "sgd" and cfg.train.ema == 0.99
    with pytest.raises(MedsegError, match="--set train.nope: train has no key 'nope'") as e:
        load_config(p, {"train.nope": "1"})
    assert e.value.path is None  # the command line's typo, not the file's
    with pytest.raises(MedsegError, match=r"--set train.epoch: train has no key 'epoch' \(did you mean 'train.epochs'\?\)"):
        load_config(p, {"train.epoch": "1"})
    with pytest.raises(MedsegError, match="'data' is not a section"):
        apply_overrides({"data": 3}, {"data.x": "1"})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, {**BASE, "loss": {"terms": [{"name": "dice_ce", "weight": 2.0}], "class_weights": "auto"}}))
    text = dump_config(cfg)
    again = parse_config(yaml.safe_load(text))
    assert again == cfg
    assert again.loss.terms[0].weight == 2.0 and again.loss.class_weights == "auto"


def test_unknown_loss_name_is_rejected(tmp_path):
    with pytest.raises(MedsegError, match=r"loss.terms.0.name"):
        load_config(_write(tmp_path, {**BASE, "loss": {"terms": [{"name": "lovasz"}]}}))


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ ships no YAML"
    from medseg.models import MODELS, model_info

    names = {f.name for f in files}
    # later stages and docs refer to these by name
    assert {"uwmgi_25d_unet.yaml", "brain_coco_unet.yaml", "hippocampus_3d_unet.yaml", "lgg_unet.yaml"} <= names
    lgg = set()
    for f in files:
        cfg = load_config(f)
        assert cfg.model.name in MODELS, f
        nd = 3 if cfg.data.mode == "3d" else 2
        info = model_info(cfg.model.name, spatial_dims=nd, **cfg.model.kwargs)
        assert nd in info["dims"], f
        assert cfg.data.size is not None and all(s % info["required_divisor"] == 0 for s in cfg.data.size), f
        assert cfg.data.prepared.startswith(str(root.parent / "prepared")), f
        if f.name.startswith("lgg_"):
            lgg.add(cfg.model.name)
    assert lgg == set(MODELS.names())  # one LGG config per registered model
    uw = load_config(root / "uwmgi_25d_unet.yaml")
    assert (uw.data.mode, uw.data.context, uw.loss.terms[0].name) == ("2.5d", 1, "dice_bce")
    hip = load_config(root / "hippocampus_3d_unet.yaml")
    assert hip.data.mode == "3d" and len(hip.data.size) == 3


def test_lgg_accuracy_recipe_is_the_default_recipe_with_twice_the_clock_on_twice_the_members():
    """docs/lgg.md compares the two recipes as 'the same, with twice the clock spent on twice the
    members': keep it true."""
    root = Path(__file__).resolve().parents[1] / "configs"
    base, best = (load_config(root / n).model_dump() for n in ("lgg_unet.yaml", "lgg_unet_best.yaml"))
    assert best["train"]["max_minutes"] == 2 * base["train"]["max_minutes"]
    assert best["train"]["members"] == 2 * base["train"]["members"] == 4
    assert best["schedule"]["by"] == base["schedule"]["by"] == "time"
    assert best["inference"]["tta"] and base["inference"]["tta"]
    for part in ("data", "model", "loss", "optim", "schedule", "augment", "postprocess", "inference"):
        assert best[part] == base[part], part
    ignore = {"max_minutes", "members", "epochs", "val_every"}  # the budget, and caps sized to the clock
    assert {k: v for k, v in best["train"].items() if k not in ignore} == \
        {k: v for k, v in base["train"].items() if k not in ignore}
