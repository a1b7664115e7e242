"""``medseg inspect``: the summary rows and the overlay PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from rich.console import Console

from conftest import FIXTURES
from medseg.data.inspect import inspect_dataset, top_slices
from medseg.data.prepare import prepare
from medseg.data.prepared import PreparedDataset
from medseg.errors import MedsegError

TINY = FIXTURES / "lgg_tiny" / "kaggle_3m"


@pytest.fixture(scope="module")
def lgg(tmp_path_factory) -> Path:
    return prepare("lgg", TINY, tmp_path_factory.mktemp("p") / "lgg", workers=1, folds=2)


def test_rows_and_table(lgg: Path, tmp_path: Path):
    console = Console(record=True, width=200)
    png = tmp_path / "sub" / "overlay.png"
    rows = dict(inspect_dataset(lgg, overlay=png, console=console))
    text = console.export_text()
    masks = [tifffile.imread(p) > 127 for p in sorted(TINY.rglob("*_mask.tif"))]
    vox = 100 * np.mean(masks)
    slc = 100 * np.mean([m.any() for m in masks])
    assert rows["cases"] == "2" and rows["patients"] == "2" and rows["slices"] == "8"
    assert rows["channels"] == "pre-contrast, FLAIR, post-contrast"
    assert rows["classes"] == "tumor (multiclass)"
    assert rows["class tumor"] == f"voxels {vox:.3f}%, slices {slc:.1f}%, cases 100.0%"
    assert rows["shape (z, c, h, w)"] == "4 x 3 x 256 x 256"
    assert rows["spacing (z, y, x) mm"] == "1 x 1 x 1"
    assert rows["folds (val cases)"] == "1, 1"
    flair = np.stack([tifffile.imread(p)[..., 1] for p in sorted(TINY.rglob("*.tif")) if not p.name.endswith("_mask.tif")])
    assert rows["intensity FLAIR"].startswith(f"range {flair.min()}..{flair.max()}, p0.5..p99.5 ")
    for k, v in rows.items():
        assert k in text and v in text
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = Image.open(png).size
    assert w > 400 and h > 100
    assert f"overlay -> {png}" in " ".join(text.split())


def test_top_slices_one_per_case_first(lgg: Path):
    ds = PreparedDataset.open(lgg)
    fg = {(i, z): int(np.asarray(ds.mask(i)[z]).sum()) for i in range(len(ds)) for z in range(4)}
    best = {i: max(fg[i, z] for z in range(4)) for i in range(len(ds))}
    picks = top_slices(ds, 3)
    # first the best slice of each case (largest first), then the best remaining slice overall
    assert [(p[1], p[0]) for p in picks[:2]] == sorted(best.items(), key=lambda t: -t[1])
    first_two = {(p[1], p[2]) for p in picks[:2]}
    assert picks[2][0] == max(v for k, v in fg.items() if k not in first_two)
    for n, i, z in picks:
        assert fg[i, z] == n


def test_not_a_prepared_dataset(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a prepared dataset"):
        inspect_dataset(tmp_path, overlay=None, console=Console(record=True))
