from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.errors import MedsegError
from medseg.training.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("d") / "syn", n_patients=6, slices=4, size=32)


@pytest.fixture(scope="module")
def syn_ml(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("d") / "synml", n_patients=4, slices=4, size=32, class_kind="multilabel")


def _cfg(tmp: Path, prepared: Path, **over) -> Path:
    doc = {
        "data": {"prepared": str(prepared), "size": [32, 32], "batch_size": 4},
        "model": {"name": "unet", "kwargs": {"base": 8, "depth": 3}},
        "optim": {"lr": 0.003},
        "train": {"epochs": 2, "steps_per_epoch": 3, "seed": 1},
    }
    for k, v in over.items():
        if "__" not in k:  # a whole section
            doc[k] = v
            continue
        sec, key = k.split("__")
        doc.setdefault(sec, {})[key] = v
    p = tmp / "exp.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _rows(run: Path, fold: int = 0) -> list[dict[str, str]]:
    return list(csv.DictReader((run / f"fold_{fold}" / "metrics.csv").open()))


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_lr_schedule_warmup_then_cosine():
    from medseg.config import ExperimentConfig
    from medseg.training.module import lr_lambda

    cfg = ExperimentConfig.model_validate({"data": {"prepared": "x"}, "model": {"name": "unet"},
                                           "train": {"epochs": 3, "steps_per_epoch": 4},
                                           "schedule": {"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.0}})
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert f(12) == pytest.approx(0.0)


def test_one_epoch_lowers_the_loss_and_writes_the_run_dir(tmp_path, syn):
    from medseg.training.run import train

    cfg = _cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=12, augment__enabled=False,
               schedule__name="constant")
    run = tmp_path / "run"
    res = train(cfg, fold="0", out=run)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1"]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_loss", "val_dice_disc", "val_dice_square",
                             "val_dice_mean", "lr", "images_per_s", "seconds", "peak_rss_mb"]
    assert rows[0]["step"] == "12" and float(rows[0]["images_per_s"]) > 0
    assert 50 < float(rows[0]["peak_rss_mb"]) <= float(rows[-1]["peak_rss_mb"])  # a peak only grows
    for f in ("config.yaml", "splits.json", "fold_0/model.pt", "fold_0/checkpoints/last.ckpt",
              "fold_0/checkpoints/best.ckpt", "fold_0/progress.png"):
        assert (run / f).is_file(), f
    assert any((run / "fold_0" / "tb").iterdir())
    # the loss went down: the first steps' loss (tensorboard-free: from the checkpointed model) vs after
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "fold_0" / "tb"))
    ev.Reload()
    steps = [e.value for e in ev.Scalars("train_loss_step")]
    assert len(steps) >= 4 and np.mean(steps[-3:]) < np.mean(steps[:3])
    # the resolved config reproduces the run: same validation Dice from a rerun of config.yaml
    res2 = train(run / "config.yaml", fold="0", out=tmp_path / "run2")
    assert res2["0"]["val_dice_mean"] == pytest.approx(res["0"]["val_dice_mean"], abs=1e-6)
    assert res2["0"]["train_loss"] == pytest.approx(res["0"]["train_loss"], rel=1e-5)


def test_bundle_and_val_predictions_match_the_head(tmp_path, syn, syn_ml):
    from medseg.bundle import build_model, load_bundle
    from medseg.training.run import train

    for prep, kind, out_ch in ((syn, "multiclass", 3), (syn_ml, "multilabel", 2)):
        run = tmp_path / kind
        train(_cfg(tmp_path, prep, train__epochs=1, train__steps_per_epoch=2), out=run)
        b = load_bundle(run / "fold_0" / "model.pt")
        assert b["class_kind"] == kind and b["arch"]["out_channels"] == out_ch and b["arch"]["in_channels"] == 1
        assert b["input"]["mode"] == "2d" and b["normalization"] == {"mode": "zscore_case"}
        assert b["meta"]["fold"] == 0 and "val_dice_mean" in b["meta"]["scores"]
        if kind == "multilabel":
            assert b["postprocess"]["thresholds"] == [0.5, 0.5]
        model = build_model(b)
        preds = sorted((run / "fold_0" / "val_predictions").glob("*.npz"))
        from medseg.data.prepared import PreparedDataset

        ds = PreparedDataset.open(prep)
        val = ds.fold(0)[1]
        assert [p.stem for p in preds] == sorted(val)
        z = np.load(preds[0])
        assert z["prob"].dtype == np.float16 and z["prob"].shape == (4, out_ch, 32, 32)
        assert z["mask"].dtype == np.uint8 and z["mask"].shape == (4, 2, 32, 32)
        # the bundle's model reproduces the stored probabilities (inference loads exactly this)
        from medseg.data import normalize

        img = np.asarray(ds.image(preds[0].stem))
        m, s, c = normalize.stats_for(img, b["normalization"])
        with torch.no_grad():
            logits = model(torch.from_numpy(normalize.apply(img, m, s, c, 1)))
        prob = torch.sigmoid(logits) if kind == "multilabel" else torch.softmax(logits, 1)
        assert np.allclose(prob.numpy(), z["prob"].astype(np.float32), atol=2e-3)


def test_resume_extends_to_the_same_weights(tmp_path, syn):
    from medseg.training.run import train

    cfg = _cfg(tmp_path, syn, schedule__name="constant")
    train(cfg, out=tmp_path / "straight", overrides={"train.epochs": "2"})
    train(cfg, out=tmp_path / "split", overrides={"train.epochs": "1"})
    assert len(_rows(tmp_path / "split")) == 1
    train(cfg, out=tmp_path / "split", overrides={"train.epochs": "2"}, resume=True)
    a = _weights(tmp_path / "straight" / "fold_0" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "split" / "fold_0" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ra, rb = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["epoch"] for r in rb] == ["1", "2"]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_bad_inputs_fail_before_training(tmp_path, syn):
    from medseg.training.run import train

    cfg = _cfg(tmp_path, syn)
    with pytest.raises(MedsegError, match="model.name: unknown model 'nonet'") as e:
        train(cfg, overrides={"model.name": "nonet"}, out=tmp_path / "r")
    assert e.value.path == str(cfg)
    with pytest.raises(MedsegError, match="prepared dataset not found"):
        train(cfg, overrides={"data.prepared": str(tmp_path / "nothing")}, out=tmp_path / "r")
    with pytest.raises(MedsegError, match=r"data.classes \['tumour'\] do not match the prepared dataset's classes \['disc', 'square'\]"):
        train(cfg, overrides={"data.classes": "[tumour]"}, out=tmp_path / "r")
    with pytest.raises(MedsegError, match="data.class_kind 'multilabel' does not match"):
        train(cfg, overrides={"data.class_kind": "multilabel"}, out=tmp_path / "r")
    with pytest.raises(MedsegError, match=r"fold 5 is out of range: the prepared dataset has folds 0..1"):
        train(cfg, fold="5", out=tmp_path / "r")
    with pytest.raises(MedsegError, match="'dice_bce' is for multilabel"):
        train(cfg, overrides={"loss.terms": "[{name: dice_bce}]"}, out=tmp_path / "r")
    with pytest.raises(MedsegError, match=r"augment.channel_fill_source is 5, but the dataset has 1 channels \(c0\): give 0-0"):
        train(cfg, overrides={"augment.channel_fill": "0.2", "augment.channel_fill_source": "5"}, out=tmp_path / "r")
    with pytest.raises(MedsegError, match=r"data.size \[30, 30\] must be divisible by 4"):
        train(cfg, overrides={"data.size": "[30, 30]"}, out=tmp_path / "r")
    odd = make_synthetic(tmp_path / "odd", n_patients=4, slices=2, size=30)
    with pytest.raises(MedsegError, match=r"slices are 30x30, not divisible by 4 for model 'unet': set data.size"):
        train(cfg, overrides={"data.prepared": str(odd), "data.size": "null"}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    run = tmp_path / "ok"
    train(cfg, out=run, overrides={"train.epochs": "1", "train.steps_per_epoch": "1"})
    with pytest.raises(MedsegError, match="already has checkpoints; pass --resume"):
        train(cfg, out=run)
    with pytest.raises(MedsegError, match=r"differs from this run's config.yaml at 'optim.lr' \(0.003 in the run, 0.01 now\)"):
        train(cfg, out=run, overrides={"optim.lr": "0.01"}, resume=True)
    with pytest.raises(MedsegError, match="no run here"):
        train(cfg, out=tmp_path / "empty", resume=True)


@pytest.mark.slow
def test_sigint_and_sigkill_mid_run_then_resume(tmp_path, syn):
    """End-to-end through the CLI: Ctrl-C (SIGINT), then SIGKILL, each once a last.ckpt exists; the
    checkpoint stays loadable, the run dir stays whole, and --resume goes on to the end."""
    # a cap far beyond what the signals wait for: on a loaded machine the watcher can be starved for
    # seconds, and a short run could reach its end before the signal lands
    cfg = _cfg(tmp_path, syn, train__epochs=400, train__steps_per_epoch=10, schedule__name="constant")
    run = tmp_path / "run"
    last = run / "fold_0" / "checkpoints" / "last.ckpt"
    # SIGUSR1 dumps every thread's stack (a hang after SIGINT then says where); SIGINT's disposition is
    # printed at start (a child that inherits SIG_IGN cannot be interrupted)
    code = ("import sys, signal, faulthandler, torch; faulthandler.register(signal.SIGUSR1, all_threads=True); "
            "print('SIGINT handler:', signal.getsignal(signal.SIGINT), flush=True); torch.set_num_threads(1); "
            "from medseg.cli import main; sys.argv[0]='medseg'; main()")
    base = [sys.executable, "-c", code, "train", str(cfg), "--out", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run_then(sig: int, extra: list[str], min_rows: int) -> tuple[int, str]:
        log = tmp_path / f"log{sig}.txt"
        with log.open("w") as fh:
            # Ctrl-C as from a terminal: the child starts with SIGINT's default action, whatever this
            # worker process inherited or had set (an ignored SIGINT is inherited through exec)
            p = subprocess.Popen(base + extra, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            t0 = time.time()
            try:
                # upper bounds only (each wait ends as soon as its condition holds): generous, so that a
                # loaded CI machine fails nothing, and each failure says which wait ran out, with the log
                ready = False
                while time.time() - t0 < 240 and p.poll() is None and not ready:
                    ready = last.exists() and (run / "fold_0" / "metrics.csv").exists() and len(_rows(run)) >= min_rows
                    time.sleep(0.05)
                assert p.poll() is None, "training finished before it could be killed:\n" + log.read_text()
                assert ready, f"no checkpoint and {min_rows} metrics rows after 240 s:\n" + log.read_text()[-6000:]
                p.send_signal(sig)
                try:
                    rc = p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGUSR1)
                    time.sleep(2)
                    text = log.read_text()
                    pytest.fail(f"signal {sig} did not stop training within 120 s:\n{text[:200]}\n...\n{text[-6000:]}")
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return rc, log.read_text()

    def check_whole() -> int:
        ck = torch.load(last, map_location="cpu", weights_only=True)  # loadable
        done = ck["epoch"] + 1  # Lightning stores the 0-based index of the epoch that just ended
        assert 1 <= done < 400
        rows = _rows(run)  # the CSV is whole (atomic rewrite), one row per finished epoch
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        assert len(rows) in (done, done + 1)  # a row may be written just before its checkpoint
        return done

    rc, log = run_then(signal.SIGINT, [], 1)
    assert rc == 130, log
    assert "interrupted; last checkpoint: " in log and "continue with --resume" in log
    assert "Traceback" not in log
    first = check_whole()
    # first + 2 rows: the resumed process has written a row after a checkpoint beyond ``first``
    # (the CSV may already hold row first + 1 from before the interrupt)
    rc, _ = run_then(signal.SIGKILL, ["--resume"], first + 2)
    assert rc == -signal.SIGKILL
    done = check_whole()
    assert done > first
    out = subprocess.run(base + ["--resume", "--set", "train.epochs=" + str(done + 2)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [int(r["epoch"]) for r in _rows(run)] == list(range(1, done + 3))
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] + 1 == done + 2
    # nothing half-written is left in the run dir
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("mode", ["2.5d", "3d"])
def test_25d_and_3d_runs_store_their_input_geometry(tmp_path, syn, mode):
    from medseg.bundle import load_bundle
    from medseg.training.run import train

    over = {"data__mode": mode, "train__epochs": 1, "train__steps_per_epoch": 2}
    if mode == "2.5d":
        over.update(data__context=1, data__stride=2)
    else:
        over.update(data__size=[4, 16, 16])
    run = tmp_path / "r"
    train(_cfg(tmp_path, syn, **over), out=run)
    b = load_bundle(run / "fold_0" / "model.pt")
    assert b["input"]["mode"] == mode
    assert b["arch"]["in_channels"] == (3 if mode == "2.5d" else 1)
    assert b["arch"]["spatial_dims"] == (3 if mode == "3d" else 2)
    z = np.load(sorted((run / "fold_0" / "val_predictions").glob("*.npz"))[0])
    assert z["prob"].shape == (4, 3, 32, 32) and z["mask"].shape == (4, 2, 32, 32)
    # multiclass: the mask channels are the argmax of the stored probabilities
    lab = z["prob"].astype(np.float32).argmax(1)
    assert np.array_equal(z["mask"][:, 0], (lab == 1).astype(np.uint8))


def test_validation_every_n_epochs_and_always_after_the_last(tmp_path, syn):
    from medseg.training.run import train

    run = tmp_path / "r"
    train(_cfg(tmp_path, syn, train__epochs=3, train__steps_per_epoch=1, train__val_every=2), out=run)
    rows = _rows(run)
    assert [r["val_dice_mean"] != "" for r in rows] == [False, True, True]
    assert rows[0]["val_loss"] == "" and rows[0]["train_loss"] != ""


def test_fold_all_trains_each_fold_and_writes_the_cv_summary(tmp_path, syn):
    import json

    from medseg.training.run import train

    run = tmp_path / "cv"
    res = train(_cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=1), fold="all", out=run)
    assert sorted(res) == ["0", "1"]
    summary = json.loads((run / "cv_summary.json").read_text())
    best = [max(float(r["val_dice_mean"]) for r in _rows(run, k)) for k in (0, 1)]
    assert summary["folds"]["1"]["val_dice_mean"] == pytest.approx(best[1])
    assert summary["mean"]["val_dice_mean"] == pytest.approx(np.mean(best))
    assert summary["std"]["val_dice_mean"] == pytest.approx(np.std(best))
    assert set(summary["mean"]) == {"val_dice_disc", "val_dice_square", "val_dice_mean"}
    for k in (0, 1):
        assert (run / f"fold_{k}" / "model.pt").is_file()
    # each fold validated on its own patients
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(syn)
    for k in (0, 1):
        assert sorted(p.stem for p in (run / f"fold_{k}" / "val_predictions").glob("*.npz")) == sorted(ds.fold(k)[1])


def test_early_stopping_stops_after_patience_validations(tmp_path, syn):
    from medseg.training.run import train

    run = tmp_path / "es"
    # min_delta 1.0: no Dice can improve by more than 1, so the 2nd validation is the first without progress
    train(_cfg(tmp_path, syn, train__epochs=5, train__steps_per_epoch=1,
               train__early_stopping={"patience": 1, "min_delta": 1.0}), out=run)
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_ema_bundle_holds_the_scored_averaged_weights(tmp_path, syn):
    from medseg.bundle import load_bundle
    from medseg.training.run import train

    run = tmp_path / "ema"
    train(_cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=3, train__ema=0.5), out=run)
    ck = torch.load(run / "fold_0" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    avg = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    raw = {k[len("model."):]: v for k, v in ck["current_model_state"].items() if k.startswith("model.")}
    sd = load_bundle(run / "fold_0" / "model.pt")["state_dict"]
    assert sd.keys() == avg.keys()
    for k in sd:
        assert torch.equal(sd[k], avg[k].float() if avg[k].is_floating_point() else avg[k]), k
    assert any(not torch.equal(avg[k], raw[k]) for k in avg if avg[k].is_floating_point())


def test_accumulation_counts_optimizer_steps_and_poly_warmup_reaches_the_floor(tmp_path, syn):
    from medseg.config import load_config
    from medseg.training.fit import precision_for
    from medseg.training.run import train

    cfg = _cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=4, train__accumulate=2,
               optim={"name": "sgd", "lr": 0.01}, schedule={"name": "poly", "warmup_epochs": 0.5, "min_lr_ratio": 0.01})
    run = tmp_path / "acc"
    train(cfg, out=run)
    row = _rows(run)[0]
    # 4 batches / accumulate 2 = 2 optimizer steps; warm-up 1 step, then poly to the floor at step 2
    assert row["step"] == "2"
    assert float(row["lr"]) == pytest.approx(0.01 * 0.01)
    assert precision_for(load_config(cfg), "cpu") == "32-true"
    assert precision_for(load_config(cfg, {"train.precision": "bf16-mixed"}), "cpu") == "bf16-mixed"


def test_auto_precision_is_bf16_on_cpus_with_amx_and_the_bundle_records_it(tmp_path, syn, monkeypatch):
    import torch

    import medseg.training.fit as fit_mod
    from medseg.training.run import train
    from medseg.config import load_config
    from medseg.bundle import load_bundle

    cfg = _cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=2)
    monkeypatch.setattr(fit_mod, "cpu_has_bf16_units", lambda: True)
    assert fit_mod.precision_for(load_config(cfg), "cpu") == "bf16-mixed"
    assert fit_mod.precision_for(load_config(cfg, {"train.precision": "32"}), "cpu") == "32-true"
    train(cfg, out=tmp_path / "bf16")
    b = load_bundle(tmp_path / "bf16" / "fold_0" / "model.pt")
    assert b["meta"]["precision"] == "bf16-mixed" and b["meta"]["config"]["train"]["precision"] == "auto"
    assert all(t.dtype == torch.float32 for t in b["state_dict"].values() if t.is_floating_point())
    # validation ran the network in fp32, as predict does: the bundle reproduces the stored probabilities
    from medseg.data import normalize
    from medseg.data.prepared import PreparedDataset
    from medseg.bundle import build_model

    f = sorted((tmp_path / "bf16" / "fold_0" / "val_predictions").glob("*.npz"))[0]
    img = np.asarray(PreparedDataset.open(syn).image(f.stem))
    m, s, c = normalize.stats_for(img, b["normalization"])
    with torch.no_grad():
        prob = torch.softmax(build_model(b)(torch.from_numpy(normalize.apply(img, m, s, c, 1))), 1).numpy()
    err = np.abs(prob - np.load(f)["prob"].astype(np.float32)).max()
    assert err < 5e-4, err  # float16 storage: half a unit in the last place is 2.4e-4
    monkeypatch.setattr(fit_mod, "cpu_has_bf16_units", lambda: False)
    assert fit_mod.precision_for(load_config(cfg), "cpu") == "32-true"


def test_cli_reports_config_errors_on_one_line_and_exits_2(tmp_path, syn, capsys, monkeypatch):
    from medseg.cli import main

    cfg = _cfg(tmp_path, syn)
    monkeypatch.setattr(sys, "argv", ["medseg", "train", str(cfg), "--set", "train.epohcs=3", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    # a typo on the command line is blamed on the command line, with the nearest key
    assert capsys.readouterr().err == "error: --set train.epohcs: train has no key 'epohcs' (did you mean 'train.epochs'?)\n"
    assert not (tmp_path / "r").exists()


def test_patient_dice_pools_each_patients_cases_and_skips_empty_pairs():
    from medseg.training.module import dice_scores, patient_dice

    a = np.array
    stats = [("p1", a([2, 0]), a([3, 0]), a([3, 0])),  # (patient, intersection, |pred|, |truth|) per class
             ("p1", a([1, 0]), a([1, 0]), a([2, 0])),
             ("p2", a([0, 1]), a([2, 1]), a([0, 1]))]
    d = patient_dice(stats)
    # p1 class 0 over both cases: 2*3 / (4 + 5); class 1 empty in truth and prediction: skipped (NaN)
    assert d.shape == (2, 2)
    assert d[0, 0] == pytest.approx(6 / 9) and math.isnan(d[0, 1])
    assert d[1].tolist() == [0.0, 1.0]
    # per class, the mean over patients of the defined ones
    assert dice_scores(stats, ["a", "b"]) == pytest.approx({"val_dice_a": 3 / 9, "val_dice_b": 1.0, "val_dice_mean": 2 / 3})


def test_checkpoint_writes_replace_the_old_file_whole_or_not_at_all(tmp_path, monkeypatch):
    from medseg.training.callbacks import atomic_checkpoint_io

    io = atomic_checkpoint_io()
    p = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, p)
    assert torch.load(p, weights_only=True)["epoch"] == 1

    def dies_half_way(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2}, p)
    monkeypatch.undo()
    assert torch.load(p, weights_only=True)["epoch"] == 1  # the old checkpoint, whole
    assert [q.name for q in p.parent.iterdir()] == ["last.ckpt"]


def test_fold_full_trains_on_every_case_and_keeps_the_final_weights(tmp_path, syn):
    from medseg.data.prepared import PreparedDataset
    from medseg.bundle import load_bundle
    from medseg.bundle import resolve_model
    from medseg.inference.segmenter import Segmenter
    from medseg.training.run import train

    run = tmp_path / "full"
    train(_cfg(tmp_path, syn, train__epochs=2, train__steps_per_epoch=2), fold="full", out=run)
    rows = list(csv.DictReader((run / "full" / "metrics.csv").open()))
    assert len(rows) == 2 and all(r["val_dice_mean"] == "" for r in rows)  # no validation at all
    assert not (run / "full" / "checkpoints" / "best.ckpt").exists()
    b = load_bundle(run / "full" / "model.pt")
    assert b["meta"]["fold"] == "full" and b["meta"]["epoch"] == 2
    last = _weights(run / "full" / "checkpoints" / "last.ckpt")
    for k, v in b["state_dict"].items():  # the final weights, not an earlier epoch's
        torch.testing.assert_close(v, last["model." + k].to(v.dtype))
    # every case fed the sampler: a run directory with only full/ predicts with it
    assert resolve_model(run)[1] == [run / "full" / "model.pt"]
    ds = PreparedDataset.open(syn)
    assert Segmenter.load(run).predict(ds.image(ds.cases[0].id)).mask.shape[0] == ds.cases[0].shape[0]
    with pytest.raises(MedsegError, match="full/model.pt"):
        resolve_model(tmp_path, "full")


def test_max_minutes_stops_training_on_the_clock(tmp_path, syn):
    from medseg.training.run import train

    run = tmp_path / "clock"
    t0 = time.perf_counter()
    # 0.002 min = 0.12 s: Lightning checks the clock after each step, so only a few of the 10000 run
    train(_cfg(tmp_path, syn, train__epochs=2, train__steps_per_epoch=10000, train__max_minutes=0.002), out=run)
    assert time.perf_counter() - t0 < 120
    rows = _rows(run)
    assert len(rows) == 1 and int(rows[0]["step"]) < 10000  # stopped inside the first epoch
    # ... and validated once more before stopping, though epoch 1 of 2 was not a validation epoch
    assert rows[0]["val_dice_mean"] != ""
    assert (run / "fold_0" / "model.pt").is_file()


def test_time_schedule_runs_over_the_budget(tmp_path, syn):
    from medseg.training.run import train

    run = tmp_path / "bytime"
    cfg = _cfg(tmp_path, syn, train__epochs=50, train__steps_per_epoch=10000, train__max_minutes=0.01,
               schedule={"name": "cosine", "by": "time", "min_lr_ratio": 0.05})
    train(cfg, out=run)
    rows = _rows(run)
    assert len(rows) == 1  # the budget, not the 50 x 10000 steps, ended it
    # the last step saw the whole budget spent: the LR is at the schedule's floor
    assert float(rows[0]["lr"]) == pytest.approx(0.003 * 0.05, rel=1e-6)


def test_time_schedule_needs_a_budget(tmp_path, syn):
    from medseg.config import load_config

    with pytest.raises(MedsegError, match="max_minutes"):
        load_config(_cfg(tmp_path, syn, schedule={"name": "cosine", "by": "time"}))


def test_lr_lambda_follows_progress_and_time_budget_survives_resume():
    from medseg.config import parse_config
    from medseg.training.callbacks import TimeBudget
    from medseg.training.module import lr_lambda

    cfg = parse_config({"data": {"prepared": "x"}, "model": {"name": "unet"},
                        "schedule": {"name": "cosine", "by": "time", "min_lr_ratio": 0.0},
                        "train": {"max_minutes": 10}}, None)
    progress = [0.0]
    f = lr_lambda(cfg, lambda: progress[0])
    for p, want in [(0.0, 1.0), (0.25, 0.5 * (1 + math.cos(math.pi / 4))), (0.5, 0.5), (1.0, 0.0)]:
        progress[0] = p
        assert f(7) == pytest.approx(want)  # the step count no longer matters
    a = TimeBudget(10)
    a.offset = 150.0
    b = TimeBudget(10)
    b.load_state_dict(a.state_dict())
    assert b.elapsed() == pytest.approx(150.0) and b.fraction() == pytest.approx(0.25)


def test_members_train_side_by_side_and_bundle_as_one_model_averaging_them(tmp_path, syn):
    from medseg.config import load_config
    from medseg.data.prepared import PreparedDataset
    from medseg.bundle import build_model, load_bundle
    from medseg.inference.export import export_onnx
    from medseg.models.member_mean import MemberMean
    from medseg.inference.segmenter import Segmenter
    from medseg.training.members import merge_members
    from medseg.training.run import train
    from medseg.training.task import check_task

    run = tmp_path / "m"
    # precision 32: each member trains in its own process, where conftest's pin of the AMX check does not reach
    res = train(_cfg(tmp_path, syn, train__epochs=2, train__steps_per_epoch=3, train__members=2, train__precision="32"),
                out=run)
    fold = run / "fold_0"
    b = load_bundle(fold / "model.pt")
    m0, m1 = (load_bundle(fold / f"member_{i}" / "model.pt") for i in (0, 1))
    assert [m["seed"] for m in b["meta"]["members"]] == [1, 2]  # the config's seed, then the next
    assert [yaml.safe_load((fold / f"member_{i}" / "config.yaml").read_text())["train"]["seed"] for i in (0, 1)] == [1, 2]
    assert b["meta"]["config"]["train"]["members"] == 2 and len(b["members"]) == 1
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(v, m0["state_dict"][k])
        torch.testing.assert_close(b["members"][0][k], m1["state_dict"][k])
    assert any(not torch.equal(v, m1["state_dict"][k]) for k, v in m0["state_dict"].items())  # two trainings
    # one network whose activation is the mean of the members' probabilities
    net = build_model(b)
    assert isinstance(net, MemberMean)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = (torch.softmax(build_model(m0)(x), 1) + torch.softmax(build_model(m1)(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(net(x), 1), want, atol=1e-6, rtol=0)
    # the fold's validation predictions are the members' mean, and the run predicts them as one model
    ds = PreparedDataset.open(syn)
    files = sorted((fold / "val_predictions").glob("*.npz"))
    assert [f.stem for f in files] == sorted(ds.fold(0)[1])
    for f in files:
        mean = sum(np.load(fold / f"member_{i}" / "val_predictions" / f.name)["prob"].astype(np.float32) for i in (0, 1)) / 2
        stored = np.load(f)["prob"].astype(np.float32)
        assert np.abs(stored - mean).max() < 1e-3 and not np.allclose(stored[:, 1:], 0, atol=0.05)
    from medseg.evaluation.sources import run_predictions

    assert sorted(run_predictions(run)[0].curves) == ["fold_0/member_0", "fold_0/member_1"]  # evaluate's report
    seg = Segmenter.load(run)
    p = seg.predict(np.asarray(ds.image(files[0].stem)), probabilities=True)
    assert np.abs(p.prob.astype(np.float32) - np.load(files[0])["prob"][:, 1:].astype(np.float32)).max() < 3e-3
    export_onnx(run, tmp_path / "m.onnx")  # one graph holding both members (it checks its logits against PyTorch's)
    q = Segmenter.load(tmp_path / "m.onnx").predict(np.asarray(ds.image(files[0].stem)), probabilities=True)
    assert np.abs(q.prob.astype(np.float32) - p.prob.astype(np.float32)).max() < 2e-3
    # the fold's score is the ensemble's: Dice of the argmax of the averaged probabilities, pooled per
    # patient. Members given the truth plus independent noise: the average beats either member
    cfg = load_config(run / "config.yaml")
    _, task = check_task(cfg, run / "config.yaml")
    rng = np.random.default_rng(0)
    probs = {}
    for f in files:
        shape = np.load(f)["prob"].shape
        truth = np.asarray(ds.mask(ds.index(f.stem)))
        onehot = np.concatenate([1 - truth.max(1, keepdims=True), truth], axis=1).astype(np.float32)
        for i in (0, 1):
            r = np.exp(2 * onehot + rng.normal(0, 1.5, shape)).astype(np.float32)
            probs[f.stem, i] = r / r.sum(1, keepdims=True)
            np.savez_compressed(fold / f"member_{i}" / "val_predictions" / f.name, prob=probs[f.stem, i].astype(np.float16),
                                mask=np.zeros((shape[0], 2, *shape[2:]), np.uint8))
    scores = merge_members(cfg, task, ds, 0, fold)

    def by_hand(pick) -> float:
        pooled: dict[str, np.ndarray] = {}
        for f in files:
            lab = pick(f.stem).argmax(1)
            truth = np.asarray(ds.mask(ds.index(f.stem)))
            for c in (0, 1):
                pred = lab == c + 1
                t = truth[:, c].astype(bool)
                acc = pooled.setdefault((task.patients[f.stem], c), np.zeros(3))
                acc += [(pred & t).sum(), pred.sum(), t.sum()]
        per_class = [np.nanmean([2 * a[0] / (a[1] + a[2]) if a[1] + a[2] else np.nan
                                 for (p, cc), a in pooled.items() if cc == c]) for c in (0, 1)]
        return float(np.mean(per_class))

    def mean_of(stem):
        return (probs[stem, 0].astype(np.float16).astype(np.float32) + probs[stem, 1].astype(np.float16).astype(np.float32)) / 2

    expected = by_hand(mean_of)
    assert scores["val_dice_mean"] == pytest.approx(expected, abs=1e-9)
    assert expected > max(by_hand(lambda s, i=i: probs[s, i]) for i in (0, 1)) + 0.02
    assert load_bundle(fold / "model.pt")["meta"]["scores"] == scores
    assert res["0"]["val_dice_mean"] == b["meta"]["scores"]["val_dice_mean"]
    # a second start refuses (the members hold checkpoints); --resume extends every member
    with pytest.raises(MedsegError, match="already has checkpoints"):
        train(run / "config.yaml", out=run)
    before = (fold / "model.pt").stat().st_mtime_ns
    train(run / "config.yaml", out=run, overrides={"train.epochs": "3"}, resume=True)
    assert [len(list(csv.DictReader((fold / f"member_{i}" / "metrics.csv").open()))) for i in (0, 1)] == [3, 3]
    assert (fold / "model.pt").stat().st_mtime_ns > before  # merged again


def test_members_refuse_ddp_and_a_failed_member_is_named(tmp_path, syn):
    from medseg.training.run import train

    cfg = _cfg(tmp_path, syn, train__members=2, train__precision="32")
    with pytest.raises(MedsegError, match=r"train.members > 1 trains the members side by side on one device"):
        train(cfg, overrides={"train.devices": "2"}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # member 1 cannot write its checkpoints (a file where its folder goes): it fails, the run says which
    blocked = tmp_path / "r" / "fold_0" / "member_1" / "checkpoints"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("")
    with pytest.raises(MedsegError, match="member 1 of fold 0 failed") as e:
        train(cfg, out=tmp_path / "r")
    assert e.value.path == str(blocked.parent)
    assert not (tmp_path / "r" / "fold_0" / "model.pt").exists()


def test_init_starts_each_fold_and_member_from_the_source_runs_own(tmp_path, syn):
    """``train.init``: fold K of a run starts from the source run's fold K, member i from its member i;
    a wrong source stops before any training, naming the file and the problem."""
    import json

    from medseg.bundle import load_bundle
    from medseg.training.run import train

    def learnt(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # BatchNorm's running statistics move at any lr
        return {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}

    src = tmp_path / "src"
    train(_cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=2, train__members=2, train__precision="32"),
          fold="1", out=src)
    a = load_bundle(src / "fold_1" / "model.pt")
    # an lr of 1e-12: AdamW moves each weight by about the lr, so the weights are the ones the run started from
    cfg = _cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=1, train__members=2, train__precision="32",
               train__init=str(src), optim={"lr": 1e-12})
    train(cfg, fold="1", out=tmp_path / "ft")
    b = load_bundle(tmp_path / "ft" / "fold_1" / "model.pt")
    for got, want in ((b["state_dict"], a["state_dict"]), (b["members"][0], a["members"][0])):
        for k, v in learnt(want).items():
            torch.testing.assert_close(got[k], v, atol=1e-8, rtol=0)
    assert any(not torch.equal(v, a["members"][0][k]) for k, v in learnt(a["state_dict"]).items())  # two networks

    def fails(match: str, fold: str = "1", **over) -> None:
        out = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"
        with pytest.raises(MedsegError, match=match):
            train(_cfg(tmp_path, syn, train__epochs=1, train__steps_per_epoch=1, train__precision="32", **over),
                  fold=fold, out=out)
        assert not list(out.glob("fold_*/**/*.ckpt"))  # nothing trained

    fails(r"train\.init: fold\(s\) \[0\] not trained", train__init=str(src), fold="0")
    fails(r"fold_1/model.pt: train\.init: the network does not match the config's \(kwargs",
          train__init=str(src), model={"name": "unet", "kwargs": {"base": 4, "depth": 3}})
    fails(r"train\.init: model file or folder not found", train__init=str(tmp_path / "nope"))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    fails(r"bad\.pt: train\.init: cannot read model bundle: damaged", train__init=str(tmp_path / "bad.pt"))
    splits = json.loads((src / "splits.json").read_text())
    pf = splits["patient_fold"]
    p0 = next(p for p, f in pf.items() if f == 1)
    p1 = next(p for p, f in pf.items() if f != 1)
    pf[p0], pf[p1] = pf[p1], pf[p0]  # one patient of fold 1 swapped with one of another fold
    (src / "splits.json").write_text(json.dumps(splits))
    fails(r"train\.init: this run's folds differ from the dataset's", train__init=str(src))
