"""The GPU code paths, run on the CPU: batches cut from a resident copy of the training cases equal the
loader's, training with them reaches the same weights, and device choices fail with one clear line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import default_collate

from medseg.config import AugmentConfig, DataConfig
from medseg.data.augment import augment_batch
from medseg.data.resident import DeviceBatches, resident_bytes
from medseg.data.sampling import TrainSamples
from medseg.errors import MedsegError
from medseg.training.synthetic import make_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("g") / "syn", n_patients=4, slices=5, size=24)


@pytest.mark.parametrize("kw", [
    {"size": [16, 16]},  # random crops, fg-centred: per-sample windows
    {},  # whole slices: one gather
    {"size": [32, 32], "resize": True},  # whole slices resized: one batched resize
    {"mode": "2.5d", "context": 1, "stride": 2, "size": [20, 20], "resize": True},
    {"mode": "2.5d", "context": 1, "size": [16, 16]},
    {"mode": "3d", "size": [4, 16, 16]},
    {"size": [32, 32], "resize": True, "normalization": "dataset"},  # clipping to the fingerprint's percentiles
])
def test_device_batches_equal_the_loaders_batches(syn, kw):
    cfg = DataConfig(prepared=str(syn), fg_oversample=0.5, **kw)
    norm = {"mode": "zscore_case"}
    if kw.get("normalization") == "dataset":
        from medseg.data.prepared import PreparedDataset
        from medseg.data.sampling import norm_config

        norm = norm_config(PreparedDataset.open(syn), "dataset")
    s = TrainSamples(str(syn), ["case00", "case01", "case02"], cfg, seed=0, norm=norm)
    idx = list(range(40, 56))
    x0, y0 = default_collate([s[g] for g in idx])
    x, y = DeviceBatches(s, "cpu").batch(idx)
    assert torch.equal(x, x0) and torch.equal(y, y0) and y.dtype == torch.uint8


def test_resident_bytes_counts_images_in_their_widened_dtype_and_masks(syn):
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(syn)
    s = TrainSamples(str(syn), ["case00", "case01"], DataConfig(prepared=str(syn)), seed=0, norm={"mode": "zscore_case"})
    want = 0
    for cid in ("case00", "case01"):
        img, msk = ds.image(ds.index(cid)), ds.mask(ds.index(cid))
        want += img.size * max(img.dtype.itemsize, 4 if img.dtype == np.uint16 else 1) + msk.size
    assert resident_bytes(s) == want


def test_noise_on_the_cpu_is_drawn_from_the_step_generator_as_before():
    cfg = AugmentConfig(flip=0, rotate=0, scale=0, gamma=0, contrast=0, noise=1.0, noise_std=0.1)
    img = torch.zeros(3, 2, 8, 8)
    x, _ = augment_batch(img, torch.zeros(3, 1, 8, 8, dtype=torch.uint8), cfg, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.rand(3, generator=g)  # the per-sample "noise on" draw
    assert torch.allclose(x, torch.randn(img.shape, generator=g) * 0.1)


def _cfg(tmp: Path, prepared: Path, **data) -> Path:
    doc = {"data": {"prepared": str(prepared), "size": [32, 32], "resize": True, "batch_size": 4, **data},
           "model": {"name": "unet", "kwargs": {"base": 8, "depth": 3}},
           "schedule": {"name": "constant"},
           "train": {"epochs": 2, "steps_per_epoch": 3, "seed": 1}}
    p = tmp / "exp.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_training_on_resident_batches_reaches_the_loaders_weights(tmp_path, syn):
    from medseg.training.run import train

    cfg = _cfg(tmp_path, syn)
    train(cfg, out=tmp_path / "loader", overrides={"data.on_device": "false", "data.workers": "0"})
    train(cfg, out=tmp_path / "resident", overrides={"data.on_device": "true"})
    a, b = (torch.load(tmp_path / r / "fold_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for r in ("loader", "resident"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loader_workers_and_device_choices():
    from medseg.machine import check_gpus, loader_workers, resolve_device

    assert loader_workers("auto", "cpu") == 0 and loader_workers(3, "gpu") == 3
    assert 0 <= loader_workers("auto", "gpu") <= 12
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="sees no CUDA GPU"):
            check_gpus("auto")
        with pytest.raises(MedsegError, match="sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_training_on_a_gpu_without_one_is_one_clear_error(tmp_path, syn):
    from medseg.training.run import train

    with pytest.raises(MedsegError, match="train.accelerator gpu asked for, but PyTorch sees no CUDA GPU"):
        train(_cfg(tmp_path, syn), out=tmp_path / "r", overrides={"train.accelerator": "gpu"})


def _tiny_unet(out: int = 2):
    from medseg.models import create_model

    torch.manual_seed(0)
    return create_model("unet", 3, out, features=[4, 8, 16]).eval()


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_the_gpu_step_on_a_cpu_equals_the_numpy_pipeline(kind):
    from medseg.inference.backends import TorchNet, activate
    from medseg.inference.windows import resize

    net = TorchNet(_tiny_unet(), "cpu")
    x = np.random.default_rng(0).normal(size=(5, 3, 40, 40)).astype(np.float32)
    flips = [None, [-1], [-2]]
    want = np.zeros((5, 2, 32, 32), np.float32)
    xs = resize(x, (32, 32))
    for f in flips:
        v = xs if f is None else np.ascontiguousarray(np.flip(xs, f))
        p = activate(net(v), kind)
        want += p if f is None else np.flip(p, f)
    want = resize(want / 3, (40, 40))
    got = net.mean_probs([net], x, flips, kind, (32, 32), (40, 40))
    assert got.shape == (5, 2, 40, 40)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_out_of_gpu_memory_halves_the_batch_once_and_says_so(recwarn):
    from medseg.inference.backends import TorchNet

    class Small(torch.nn.Module):
        spatial_dims = 2

        def forward(self, x):
            if x.shape[0] > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return x * 2

    net = TorchNet(Small(), "cpu")
    x = np.arange(8 * 2 * 4, dtype=np.float32).reshape(8, 2, 2, 2)
    np.testing.assert_array_equal(net(x), x * 2)
    assert net.limit == 2  # 8 failed, 4 failed, 2 fit
    said = [str(w.message) for w in recwarn]
    assert said == ["out of GPU memory on cpu at a batch of 8: predicting 4 at a time",
                    "out of GPU memory on cpu at a batch of 4: predicting 2 at a time"]
    np.testing.assert_array_equal(net(x[:5]), x[:5] * 2)  # the batch that fitted is kept: no new warning
    assert len(recwarn) == 2

    class Never(torch.nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(MedsegError, match="out of GPU memory on cpu with a batch of one 2x2 input: use --device cpu"):
        TorchNet(Never(), "cpu")(x)


def test_sharded_predict_writes_each_case_once_as_one_process_does(tmp_path):
    """Two processes as torchrun starts them (RANK/WORLD_SIZE) split the cases; together they write the
    files one process writes, byte for byte, and leave no staging folder behind."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    src = ROOT / "tests" / "fixtures" / "lgg_tiny" / "kaggle_3m"
    base = [sys.executable, "-m", "medseg", "predict", "lgg-unet", str(src)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    r = subprocess.run([*base, str(tmp_path / "one"), "--device", "cpu"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    procs = [subprocess.Popen([*base, str(tmp_path / "two"), "--device", "cpu", "--overwrite"],
                              env={**env, "RANK": str(k), "WORLD_SIZE": "2", "LOCAL_RANK": str(k)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(f"(process {k + 1} of 2)" in o[0] + o[1] for k, o in enumerate(outs))
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert one and [p for p in two if (tmp_path / "two" / p).is_file()] == one
    assert not [p for p in two if ".partial-" in str(p)]
    for p in one:
        assert (tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes(), p


def test_shard_reads_the_launchers_environment(monkeypatch):
    from medseg.inference.predict import shard

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert shard() == (1, 4, 1)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MedsegError, match="not process numbers"):
        shard()


def test_gpu_benchmark_runs_its_table_at_cpu_scale(tmp_path):
    """benchmarks/gpu.py on a machine without a GPU: the same phases, a few steps each, and its JSON."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--out", str(out),
                        "--lgg", str(ROOT / "tests" / "fixtures" / "lgg_tiny" / "kaggle_3m")],
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [row["network"] for row in res["training"]] == ["lgg recipe unet", "monai unet (peer)"]
    for row in res["training"]:
        e2e = row["train_on_device"]
        assert row["model_only_img_s"] > 0 and e2e["img_s"] > 0
        assert e2e["vs_model_only"] == pytest.approx(e2e["img_s"] / row["model_only_img_s"], rel=0.01)  # of rounded figures
        assert len(e2e["epochs_img_s"]) == 2 and 0 <= e2e["val_dice"] <= 1
    assert res["predict"]["slices"] == 8 and res["predict"]["tta"] == 3 and res["predict"]["slices_per_s"] > 0
    assert res["patients"] == 2 and "lgg recipe unet" in r.stdout
