"""LGG reader on the real-slice fixtures: order, arrays, pairing errors, prediction round trip."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import FIXTURES
from medseg.data.formats import get_reader
from medseg.errors import MedsegError

TINY = FIXTURES / "lgg_tiny" / "kaggle_3m"
FULL = FIXTURES / "lgg" / "kaggle_3m"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    dst = tmp_path / "kaggle_3m"
    shutil.copytree(TINY, dst)
    return dst


def test_scan_numeric_slice_order_and_patients():
    spec = get_reader("lgg").scan(TINY)
    assert [c.id for c in spec.cases] == ["TCGA_CS_5393_19990606", "TCGA_CS_5395_19981004"]
    assert [c.patient for c in spec.cases] == ["TCGA_CS_5393", "TCGA_CS_5395"]
    # numeric, not lexicographic ("10" < "3" as strings)
    assert spec.cases[0].sources["numbers"] == [3, 4, 9, 10]
    assert spec.cases[1].sources["numbers"] == [2, 9, 12, 13]
    assert spec.channels == ["pre-contrast", "FLAIR", "post-contrast"]
    assert spec.classes == ["tumor"] and spec.class_kind == "multiclass" and spec.spatial_dims == 2


def test_full_fixture_order_is_1_to_n():
    spec = get_reader("lgg").scan(FULL)
    assert len(spec.cases) == 6
    for c in spec.cases:
        n = len(list(Path(c.sources["folder"]).glob("*_mask.tif")))
        assert c.sources["numbers"] == list(range(1, n + 1))
        assert Path(c.sources["images"][9]).name == f"{c.id}_10.tif"


def test_load_arrays_match_tiffs():
    r = get_reader("lgg")
    spec = r.scan(TINY)
    case = spec.cases[0]
    d = r.load(spec, case)
    assert d.image.shape == (4, 3, 256, 256) and d.image.dtype == np.uint8
    assert d.mask.shape == (4, 1, 256, 256) and d.mask.dtype == np.uint8
    assert set(np.unique(d.mask)) <= {0, 1}
    assert d.slices == ["3", "4", "9", "10"]
    raw = tifffile.imread(TINY / case.id / f"{case.id}_10.tif")  # HxWx3
    np.testing.assert_array_equal(d.image[3].transpose(1, 2, 0), raw)
    m = tifffile.imread(TINY / case.id / f"{case.id}_9_mask.tif")
    np.testing.assert_array_equal(d.mask[2, 0], (m > 127).astype(np.uint8))
    # slices 3, 4 are tumour-free, 9, 10 hold tumour
    assert d.mask.reshape(4, -1).sum(1).tolist()[:2] == [0, 0]
    assert (d.mask.reshape(4, -1).sum(1)[2:] > 0).all()


def test_write_prediction_round_trip(tmp_path: Path):
    r = get_reader("lgg")
    spec = r.scan(TINY)
    case = spec.cases[1]
    d = r.load(spec, case)
    files = r.write_prediction(spec, case, d.mask, tmp_path)
    assert [f.name for f in files] == [f"{case.id}_{n}_mask.tif" for n in (2, 9, 12, 13)]
    back = np.stack([tifffile.imread(f) for f in files])
    np.testing.assert_array_equal(back, d.mask[:, 0] * 255)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a folder") as e:
        get_reader("lgg").scan(tmp_path / "nope")
    assert e.value.path == str(tmp_path / "nope")


def test_image_without_mask(tiny: Path):
    victim = tiny / "TCGA_CS_5393_19990606" / "TCGA_CS_5393_19990606_9_mask.tif"
    victim.unlink()
    with pytest.raises(MedsegError, match=r"image without a mask \(expected TCGA_CS_5393_19990606_9_mask.tif\)") as e:
        get_reader("lgg").scan(tiny)
    assert e.value.path.endswith("TCGA_CS_5393_19990606_9.tif")
    # images only is fine
    assert get_reader("lgg").scan(tiny, require_masks=False).cases[0].sources["masks"] is None


def test_mask_without_image(tiny: Path):
    (tiny / "TCGA_CS_5395_19981004" / "TCGA_CS_5395_19981004_12.tif").unlink()
    with pytest.raises(MedsegError, match="mask without an image") as e:
        get_reader("lgg").scan(tiny)
    assert e.value.path.endswith("TCGA_CS_5395_19981004_12_mask.tif")


def test_mask_size_differs(tiny: Path):
    p = tiny / "TCGA_CS_5395_19981004" / "TCGA_CS_5395_19981004_12_mask.tif"
    tifffile.imwrite(p, np.zeros((128, 128), np.uint8))
    r = get_reader("lgg")
    spec = r.scan(tiny)
    with pytest.raises(MedsegError, match=r"mask size \(128, 128\) differs from its image's \(256, 256\)") as e:
        r.load(spec, spec.cases[1])
    assert e.value.path == str(p)


def test_truncated_tiff(tiny: Path):
    p = tiny / "TCGA_CS_5393_19990606" / "TCGA_CS_5393_19990606_4.tif"
    p.write_bytes(p.read_bytes()[:300])
    r = get_reader("lgg")
    spec = r.scan(tiny)
    with pytest.raises(MedsegError, match="cannot read TIFF") as e:
        r.load(spec, spec.cases[0])
    assert e.value.path == str(p)
