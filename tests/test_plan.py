"""``medseg plan``: the rules that turn a fingerprint into a config, each checked on a data set built to
trigger it, the bad inputs it refuses, and the CLI round trip plan -> train."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.training.plan import plan, render, write_plan
from medseg.training.synthetic import make_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("p") / "syn", n_patients=4, slices=6, size=48)


def _edit(src: Path, dst: Path, info=None, spacing=None, spatial_dims=None) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    if spacing is not None:
        for c in meta["cases"]:
            c["spacing"] = spacing
    if spatial_dims is not None:
        meta["spatial_dims"] = spatial_dims
    if info:
        info(meta)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_a_plan_is_a_valid_config_with_a_reason_for_each_choice(tmp_path, syn):
    p = plan(syn, minutes=5, device="cpu")
    out = write_plan(p, tmp_path / "new" / "plan.yaml")  # its folder made, as train's --out is
    cfg = load_config(out)  # the plan validates as any hand-written config
    assert cfg.train.max_minutes == 5 and cfg.schedule.by == "time"
    text = out.read_text()
    for key in ("data.mode", "data.size", "data.normalization", "data.fg_oversample", "model", "loss", "augment.flip.width"):
        assert f"# {key}: " in text, key
    assert yaml.safe_load(text)["data"]["prepared"] == str(Path(syn).resolve())


def test_mode_follows_anisotropy_and_the_layout(tmp_path, syn):
    iso = _edit(syn, tmp_path / "iso", spacing=[1.0, 1.0, 1.0], spatial_dims=3)
    p = plan(iso, device="cpu")
    assert p.config["data"]["mode"] == "3d"
    size = p.config["data"]["size"]
    depth = len(p.config["model"]["kwargs"]["features"]) - 1
    assert all(s % 2**depth == 0 for s in size) and size[1] >= 48
    # a small volume: the patch leaves voxels of the budget over, spent on a larger batch (capped at 8)
    assert p.config["data"]["batch_size"] == min(8, 2 * 48**3 // int(np.prod(size)))
    thick = _edit(syn, tmp_path / "thick", spacing=[4.0, 1.0, 1.0], spatial_dims=3)
    p = plan(thick, device="cpu")
    assert p.config["data"]["mode"] == "2.5d" and p.config["data"]["context"] == 2
    assert "anisotropy 4.0 >= 3" in p.why["data.mode"]
    flat = _edit(syn, tmp_path / "flat", spacing=[4.0, 1.0, 1.0], spatial_dims=2)
    assert plan(flat, device="cpu").config["data"]["mode"] == "2d"


def test_loss_and_normalisation_follow_the_labels_and_the_intensities(tmp_path, syn):
    assert plan(syn, device="cpu").config["loss"]["terms"][0]["name"] == "dice_ce"
    ml = make_synthetic(tmp_path / "ml", n_patients=3, slices=4, size=32, class_kind="multilabel")
    assert plan(ml, device="cpu").config["loss"]["terms"][0]["name"] == "dice_bce"
    assert plan(syn, device="cpu").config["data"]["normalization"] == "zscore_case"

    def ct(meta):
        meta["fingerprint"]["intensity"]["c0"]["percentiles"]["0.5"] = -1000.0

    p = plan(_edit(syn, tmp_path / "ct", info=ct), device="cpu")
    assert p.config["data"]["normalization"] == "dataset" and "Hounsfield" in p.why["data.normalization"]


def _boxes(root: Path, cols: slice) -> Path:
    """Every foreground slice's structures replaced by one box: rows 18-29 (centred), columns ``cols``."""
    meta = json.loads((root / "dataset.json").read_text())
    for c in meta["cases"]:
        m = np.load(root / c["mask"], mmap_mode="r+")
        m[:] = 0
        for j, zs in enumerate(c["fg_slices"]):
            m[zs, j, 18:30, cols] = 1
        m.flush()
    return root


def test_flips_only_along_axes_where_the_foreground_is_centred(tmp_path, syn):
    centred = _boxes(_edit(syn, tmp_path / "centred", spatial_dims=2), slice(18, 30))
    p = plan(centred, device="cpu")
    assert p.config["augment"]["flip_axes"] == [0, 1] and p.config["inference"]["tta_flips"] == [[-2], [-1]]
    left = _boxes(_edit(syn, tmp_path / "left", spatial_dims=2), slice(2, 14))  # not mirror-symmetric left-right
    p = plan(left, device="cpu")
    assert p.config["augment"]["flip_axes"] == [0] and p.config["inference"]["tta_flips"] == [[-2]]
    assert "not flipped" in p.why["augment.flip.width"] and "0.16, 0.16" in p.why["augment.flip.width"]  # columns 2-13: 7.5 / 47
    vol = _boxes(_edit(syn, tmp_path / "vol", spacing=[1.0, 1.0, 1.0], spatial_dims=3), slice(2, 14))
    assert plan(vol, device="cpu").config["augment"]["flip_axes"] == [1]  # 3D: axis 0 is depth, 1 height


def test_plans_that_cannot_be_made_say_why(tmp_path, syn):
    def one_patient(meta):
        for c in meta["cases"]:
            c["patient"] = "p00"

    with pytest.raises(MedsegError, match="1 patient\\(s\\): a plan needs at least 2"):
        plan(_edit(syn, tmp_path / "one", info=one_patient))

    def empty(meta):
        for c in meta["fingerprint"]["classes"].values():
            c["voxel_fraction"] = 0.0

    with pytest.raises(MedsegError, match="no case holds any foreground"):
        plan(_edit(syn, tmp_path / "empty", info=empty))

    def constant(meta):
        meta["fingerprint"]["intensity"]["c0"].update(std=0.0, min=7.0, max=7.0)

    with pytest.raises(MedsegError, match="channel 'c0' is constant"):
        plan(_edit(syn, tmp_path / "const", info=constant))


def test_cli_plan_then_train_the_plan(tmp_path, syn, monkeypatch, capsys):
    from typer.testing import CliRunner

    from medseg.cli import app, main

    out = tmp_path / "plan.yaml"
    r = CliRunner().invoke(app, ["plan", str(syn), "--minutes", "0.05", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "planned 2d" in r.output or "planned 3d" in r.output
    for argv, said in ((["plan", str(syn), "--out", str(out)], f"error: {out}: already exists; choose another --out"),
                       (["train", str(syn)], f"error: {syn}: is a folder: pass an experiment YAML, or add --auto")):
        monkeypatch.setattr(sys, "argv", ["medseg", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2 and capsys.readouterr().err.startswith(said)
    r = CliRunner().invoke(app, ["train", str(out), "--out", str(tmp_path / "run"),
                                 "--set", "train.members=1", "--set", "train.steps_per_epoch=2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "fold_0" / "model.pt").is_file()


def test_render_puts_each_reason_above_its_section(syn):
    text = render(plan(syn, device="cpu"))
    assert text.index("# loss: ") < text.index("\nloss:") < text.index("# augment.flip")


def test_gpu_batch_from_two_measured_steps(tmp_path, syn, monkeypatch):
    from medseg.training import plan as planmod
    from medseg.training.plan import fit_batch

    mib = 2**20
    # 300 MiB at batch 2, 500 at 4: 100 MiB fixed + 100 per sample
    assert fit_batch(300 * mib, 500 * mib, 2, 4, 1000 * mib, 64) == 9
    assert fit_batch(300 * mib, 500 * mib, 2, 4, 1000 * mib, 8) == 8
    assert fit_batch(300 * mib, 500 * mib, 2, 4, 150 * mib, 64) == 1  # nothing fits: one sample, not zero
    # on a GPU the plan asks the measurement, with this data set's channels, outputs and size
    seen = {}

    def fake(kwargs, nd, in_ch, out_ch, size, start, memory=None):
        seen.update(nd=nd, in_ch=in_ch, out_ch=out_ch, size=size, start=start)
        return 24, "24: measured"

    monkeypatch.setattr(planmod, "resolve_device", lambda d: "cuda")
    monkeypatch.setattr(planmod, "_cuda_visible", lambda: True)
    monkeypatch.setattr(planmod, "gpu_batch", fake)
    p = plan(syn, device="cuda")
    assert p.config["data"]["batch_size"] == 24 and p.why["data.batch_size"] == "24: measured"
    # the measurement starts from the size rule's batch (here its cap, 8: a small volume, a GPU budget)
    assert seen == {"nd": 3, "in_ch": 1, "out_ch": 3, "size": p.config["data"]["size"], "start": 8}


def test_channel_fill_when_cases_hold_a_copied_channel(tmp_path):
    from medseg.data.prepared import PreparedDataset

    src = make_synthetic(tmp_path / "three", n_patients=5, slices=4, size=32, channels=3)
    assert "channel_fill" not in plan(src, device="cpu").config["augment"]  # every channel its own
    ds = PreparedDataset.open(src)
    for i in (1, 3):  # two cases fill their missing channel 0 and channel 2 with channel 1
        path = src / ds.cases[i].image
        img = np.load(path)
        img[:, 0] = img[:, 1]
        if i == 3:
            img[:, 2] = img[:, 1]
        np.save(path, img)
    p = plan(src, device="cpu")
    # pairs (0,1) twice, (0,2) and (1,2) once: channel 1 is in 3 pairs, 0 in 3, 2 in 2 -> tie to index 0
    assert p.config["augment"]["channel_fill"] == 0.2 and p.config["augment"]["channel_fill_source"] == 0
    assert p.why["augment.channel_fill"].startswith("2 of 5 cases hold a channel identical to another")


def test_no_channel_fill_when_every_case_copies_its_channels(tmp_path):
    from medseg.data.prepared import PreparedDataset

    src = make_synthetic(tmp_path / "grey", n_patients=4, slices=3, size=32, channels=3)
    ds = PreparedDataset.open(src)
    for c in ds.cases:  # a grey image stored as RGB, as in JPEG exports
        img = np.load(src / c.image)
        img[:, 1] = img[:, 0]
        img[:, 2] = img[:, 0]
        np.save(src / c.image, img)
    p = plan(src, device="cpu")
    assert "channel_fill" not in p.config["augment"]
    assert p.why["augment.channel_fill"].startswith("every one of the 4 cases looked at holds a channel identical")


def test_3d_patch_rounds_down_and_spends_the_budget_on_the_batch():
    from medseg.training.plan import patch_3d

    # hippocampus-sized volumes: 3 poolings (36/8 >= 4), the patch inside the volume, 2*48^3 // (32*48*32) = 4
    assert patch_3d([36, 50, 35], 48**3) == ([32, 48, 32], 3, 4, 1.0)
    # a volume above the budget is scaled to it (by 48/128 per axis): one budget per patch, batch 2
    patch, depth, batch, scale = patch_3d([128, 128, 128], 48**3)
    assert scale == pytest.approx(48 / 128) and patch == [48, 48, 48] and depth == 3 and batch == 2
    # tiny volumes: one pooling, even sizes, the batch capped at 8
    assert patch_3d([10, 12, 9], 48**3) == ([10, 12, 8], 1, 8, 1.0)


def test_a_gpu_plan_is_written_without_a_gpu_from_the_cards_memory(tmp_path, syn, monkeypatch):
    """`medseg plan --device cuda --gpu-memory N` on a machine without a GPU: the batch comes from an
    estimate of the step's memory (saved activations counted on the meta device), smaller cards get smaller
    batches, and without --gpu-memory the plan says what it needs."""
    import medseg.training.plan as plan_mod
    from medseg.training.plan import step_bytes_estimate

    monkeypatch.setattr(plan_mod, "_cuda_visible", lambda: False)
    with pytest.raises(MedsegError, match="needs the card's memory: --gpu-memory GiB"):
        plan(syn, device="cuda")
    with pytest.raises(MedsegError, match="--gpu-memory must be the card's memory in GiB"):
        plan(syn, device="cuda", gpu_memory=-1)
    big = plan(syn, device="cuda", gpu_memory=80)
    assert big.fingerprint["device"] == "cuda (80 GiB, planned without it)"
    assert "estimated without a GPU" in big.why["data.batch_size"] and "60% of 80 GiB" in big.why["data.batch_size"]
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(syn)
    d = big.config["data"]
    kw, size, nd = big.config["model"]["kwargs"], d["size"], 3 if d["mode"] == "3d" else 2
    in_ch = len(ds.channels) * ((2 * d["context"] + 1) if d["mode"] == "2.5d" else 1)
    out_ch = len(ds.classes) + (0 if ds.class_kind == "multilabel" else 1)
    a, b, c = (step_bytes_estimate(kw, nd, in_ch, out_ch, size, n) for n in (2, 4, 6))
    assert a < b < c and abs((c - b) - (b - a)) <= 0.01 * (c - a)  # linear in the batch: fixed + per sample
    per = (b - a) / 2
    tiny = plan(syn, device="cuda", gpu_memory=(a + 1.5 * per) / 0.6 / 2**30)  # room for 3.5 samples: 3
    assert tiny.config["data"]["batch_size"] == min(3, big.config["data"]["batch_size"])
    write_plan(big, tmp_path / "gpu.yaml")
    assert load_config(tmp_path / "gpu.yaml").data.batch_size == big.config["data"]["batch_size"]


def _rings(root: Path, width: int) -> Path:
    """Class 0 (``disc``) on every foreground slice replaced by a ring ``width`` px wide (radius 150),
    class 1 (``square``) by a disc (radius 60), in 512 x 512 slices."""
    meta = json.loads((root / "dataset.json").read_text())
    yy, xx = np.mgrid[:512, :512]
    r = np.hypot(yy - 256, xx - 256)
    for c in meta["cases"]:
        m = np.load(root / c["mask"], mmap_mode="r+")
        m[:] = 0
        m[c["fg_slices"][0], 0] = (r >= 150) & (r < 150 + width)
        m[c["fg_slices"][1], 1] = r < 60
        m.flush()
    return root


def test_thickness_of_a_band_a_ring_and_a_disc():
    from medseg.training.plan_sample import thickness

    yy, xx = np.mgrid[:512, :512]
    r = np.hypot(yy - 256, xx - 256)
    for w in (2, 6, 14):  # a ring's edges are the staircase of a circle: Crofton's pi/4 makes them true
        assert thickness((r >= 150) & (r < 150 + w)) == pytest.approx(w, rel=0.03)
    assert thickness(r < 60) == pytest.approx(60, rel=0.02)  # a disc: half its diameter
    band = np.zeros((400, 100), bool)
    band[:, 40:43] = True  # axis-aligned: 2 * 1200 / ((800 + 6) * pi / 4)
    assert thickness(band) == pytest.approx(2 * 1200 / (806 * np.pi / 4))
    assert np.isnan(thickness(np.zeros((8, 8))))


@pytest.mark.parametrize("width, expect", [(24, "resize128"), (14, "resize160"), (6, "crop")])
def test_a_thin_class_keeps_its_pixels(tmp_path, width, expect):
    """512 px slices go to 128 px on a CPU (x 0.25), unless a class would be thinner than 4 px there:
    a 24 px ring (6 px after) keeps the rule; a 14 px ring (3.5 px) is resized only by 4/14 (146 px, 160
    for 5 poolings); a 6 px ring needs x 0.67 (341 px, more than 1.5 x 128): 128 px crops at native size."""
    src = make_synthetic(tmp_path / "syn", n_patients=3, slices=2, size=512)
    ds = _rings(_edit(src, tmp_path / "rings", spatial_dims=2), width)
    p = plan(ds, device="cpu")
    data = p.config["data"]
    if expect == "crop":
        assert data["size"] == [128, 128] and not data.get("resize") and data["batch_size"] == 16
        assert "crops at native resolution" in p.why["data.size"] and "square" not in p.why["data.size"]
        assert "the thinnest class, disc (6.0 px thick at native size), would be 1.5 px" in p.why["data.size"]
    elif expect == "resize160":
        assert data["size"] == [160, 160] and data["resize"] is True
        assert data["batch_size"] == 16 * 128 * 128 // (160 * 160)  # the pixels per step kept: 10
        assert "keeps 4 px" in p.why["data.size"]
    else:
        assert data["size"] == [128, 128] and data["resize"] is True and data["batch_size"] == 16
        assert "thinnest" not in p.why["data.size"]
    gpu = plan(ds, device="cuda", gpu_memory=80).config["data"]  # a GPU takes whole 512 px slices anyway
    assert gpu["size"] == [512, 512]
