import csv
import re

import numpy as np
import pytest
from PIL import Image

from conftest import shared
from medseg.data.formats import get_reader
from medseg.data.formats.palette import map_palette
from medseg.data.rle import parse
from medseg.data.formats.uwmgi_synthetic import write_uwmgi_from_derived, write_uwmgi_synthetic
from medseg.errors import MedsegError

CLASSES = ["large_bowel", "small_bowel", "stomach"]
FILE = re.compile(r"^train/(case\d+)/(case\d+)_day\d+/scans/slice_(\d{4})_(\d+)_(\d+)_(\d\.\d\d)_(\d\.\d\d)\.png$")


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return write_uwmgi_synthetic(tmp_path_factory.mktemp("syn") / "uw")


def _csv(root):
    with open(root / "train.csv", newline="") as f:
        return list(csv.reader(f))


def test_exact_competition_layout(default):
    files = sorted(p.relative_to(default).as_posix() for p in default.rglob("*.png"))
    assert len(files) == 3 * 2 * 12
    sizes = set()
    for f in files:
        m = FILE.match(f)
        assert m, f
        assert m[1] == m[2]  # caseN/caseN_dayM
        w, h, pw, ph = int(m[4]), int(m[5]), m[6], m[7]
        sizes.add((w, h, pw))
        assert pw == ph
        im = Image.open(default / f)
        assert im.mode == "I;16" and im.size == (w, h)
        a = np.asarray(im)
        assert a.dtype == np.uint16 and a.max() > 255  # uses the 16-bit range
    assert sizes == {(266, 266, "1.50"), (234, 234, "1.50"), (276, 276, "1.63"), (360, 310, "1.50")}
    assert {c.name for c in (default / "train").iterdir()} == {"case2", "case9", "case16"}


def test_train_csv(default):
    rows = _csv(default)
    assert rows[0] == ["id", "class", "segmentation"]
    body = rows[1:]
    assert len(body) == 72 * 3
    for i in range(0, len(body), 3):  # three rows per slice, competition class order
        assert [r[1] for r in body[i : i + 3]] == CLASSES
        assert body[i][0] == body[i + 1][0] == body[i + 2][0]
    ids = [r[0] for r in body[::3]]
    assert len(set(ids)) == 72 and ids != sorted(ids)  # all slices, not in sorted order
    empty = sum(r[2] == "" for r in body)
    assert 0 < empty < len(body)
    for r in body:  # canonical RLE, as our encoder writes it: maximal runs with gaps between them
        starts, lengths = parse(r[2], 360 * 310)
        assert np.all(starts[1:] > starts[:-1] + lengths[:-1])


def test_organs_overlap_and_vary_along_z(default):
    reader = get_reader("uwmgi")
    spec = reader.scan(default)
    overlap_slices = 0
    for case in spec.cases:
        d = reader.load(spec, case)
        per = d.mask.reshape(d.mask.shape[0], 3, -1).sum(-1)
        assert (per == 0).any() and (per > 0).any()  # organs come and go along z
        assert (per[0] == 0).all()  # the first slice is above every organ
        overlap_slices += int(((d.mask[:, 0] & d.mask[:, 2]).reshape(d.mask.shape[0], -1).any(1)).sum())
        fg = d.image[:, 0][d.mask.any(1)].mean()
        assert fg > d.image.mean()  # organs are brighter than the average tissue: learnable
    assert overlap_slices >= 3


def test_seeded(tmp_path):
    a = write_uwmgi_synthetic(tmp_path / "a", n_cases=1, days_per_case=1, slices_per_day=4, seed=5)
    b = write_uwmgi_synthetic(tmp_path / "b", n_cases=1, days_per_case=1, slices_per_day=4, seed=5)
    c = write_uwmgi_synthetic(tmp_path / "c", n_cases=1, days_per_case=1, slices_per_day=4, seed=6)
    assert _csv(a) == _csv(b) != _csv(c)
    f = next(a.rglob("*.png")).relative_to(a)
    np.testing.assert_array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f)))


@pytest.mark.realdata
def test_from_derived_sample(tmp_path):
    src = shared("uwmgi-derived-sample")
    dst = write_uwmgi_from_derived(src, tmp_path / "uw", n_slices=4)
    rows = _csv(dst)
    assert rows[0] == ["id", "class", "segmentation"] and len(rows) == 1 + 4 * 3
    pngs = sorted(dst.rglob("*.png"))
    assert len(pngs) == 4 and all(FILE.match(p.relative_to(dst).as_posix()) for p in pngs)
    reader = get_reader("uwmgi")
    spec = reader.scan(dst)
    palette = [(0, 255, 0), (255, 255, 0), (255, 0, 0)]  # large bowel green, small bowel yellow, stomach red
    found = np.zeros(3, int)
    for case in spec.cases:
        d = reader.load(spec, case)
        assert d.image.dtype == np.uint16 and d.image.shape[2:] == (234, 234)
        for z, sid in enumerate(d.slices):
            # independent path: colour mask -> nearest palette label at 512 -> nearest resize
            lab = map_palette(np.asarray(Image.open(src / "masks" / f"{sid}.png").convert("RGB")), palette)
            lab = np.asarray(Image.fromarray(lab).resize((234, 234), Image.NEAREST))
            for k in range(3):
                np.testing.assert_array_equal(d.mask[z, k], lab == k + 1)
            gray = np.asarray(Image.open(src / "images" / f"{sid}.png").convert("L").resize((234, 234), Image.BILINEAR))
            np.testing.assert_array_equal(d.image[z, 0], gray.astype(np.uint16) * 16)
        found += d.mask.reshape(d.mask.shape[0], 3, -1).any(-1).sum(0)
    assert found.sum() > 0


def test_custom_sizes_and_test_layout(tmp_path):
    root = write_uwmgi_synthetic(tmp_path / "t", n_cases=1, days_per_case=2, slices_per_day=2, split="test",
                                 with_csv=False, sizes=[(64, 48, 1.63)])
    assert not (root / "train.csv").exists()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert files == [f"test/case2/case2_day{d}/scans/slice_000{n}_64_48_1.63_1.63.png" for d in (0, 5) for n in (1, 2)]
    assert np.asarray(Image.open(root / files[0])).shape == (48, 64)
    with pytest.raises(MedsegError, match="sizes: give at least one"):
        write_uwmgi_synthetic(tmp_path / "e", sizes=[])
