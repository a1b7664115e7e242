from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def tiny_run(tmp: Path, *, n_patients: int = 4, steps: int = 1, fold: str = "0", **sections) -> Path:
    """A tiny one-channel U-Net trained for one epoch on synthetic data (``make_synthetic``): what a command
    needs, not what it finds. ``sections`` add to the config (e.g. ``inference={"tta": True}``)."""
    import yaml

    from medseg.training.run import train
    from medseg.training.synthetic import make_synthetic

    syn = make_synthetic(tmp / "syn", n_patients=n_patients, slices=4, size=32, channels=1)
    cfg = tmp / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"prepared": str(syn), "batch_size": 4},
                                   "model": {"name": "unet", "kwargs": {"base": 8, "depth": 3}},
                                   "train": {"epochs": 1, "steps_per_epoch": steps}, **sections}))
    train(cfg, fold=fold, out=tmp / "run")
    return tmp / "run"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is missing (set MEDSEG_SHARED_DATA)")
    return p


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # two cores shared by xdist workers: one torch thread each avoids oversubscription
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:
        pass
    # precision "auto" picks bf16 on CPUs with AMX: the suite's numbers must not depend on the CI machine
    import medseg.training.fit

    monkeypatch.setattr(medseg.training.fit, "cpu_has_bf16_units", lambda: False)
    yield


def dciodvfy_errors(path) -> list[str]:
    """dicom3tools' verdict on a DICOM file: its "Error" lines (the test skips when dciodvfy is absent)."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
