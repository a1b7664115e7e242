"""DDP through Lightning on 2 CPU processes (gloo), launched with torchrun as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medseg.training.synthetic import make_synthetic

SCRIPT = r'''
import os, sys
import torch
torch.set_num_threads(1)
from medseg.config import load_config
from medseg.training.fit import fit_fold
from medseg.training.task import check_task
cfg_path, out = sys.argv[1], sys.argv[2]
cfg = load_config(cfg_path)
ds, task = check_task(cfg, None)
trainer, module = fit_fold(cfg, task, ds, 0, __import__("pathlib").Path(out) / "fold_0", False)
rank = trainer.global_rank
torch.save({"world": trainer.world_size, "rank": rank, "step": trainer.global_step,
            "state": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
            "rank_world": trainer.train_dataloader.sampler.last_rank_world}, os.path.join(out, f"rank{rank}.pt"))
'''


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    prep = make_synthetic(tmp_path / "syn", n_patients=4, slices=4, size=32)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"prepared": str(prep), "size": [32, 32], "batch_size": 2},
        "model": {"name": "unet", "kwargs": {"base": 8, "depth": 3}},
        "train": {"epochs": 1, "steps_per_epoch": 3, "accelerator": "cpu", "devices": 2, "strategy": "ddp"},
    }))
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(cfg), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(out / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert a["world"] == b["world"] == 2 and {a["rank"], b["rank"]} == {0, 1}
    assert a["step"] == b["step"] == 3
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    # the sampler saw the process group, so the ranks drew disjoint samples (see test_sampling)
    assert a["rank_world"] == (a["rank"], 2) and b["rank_world"] == (b["rank"], 2)
    assert (out / "fold_0" / "metrics.csv").is_file() and (out / "fold_0" / "checkpoints" / "last.ckpt").is_file()
