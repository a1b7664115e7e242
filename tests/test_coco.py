"""COCO reader on 6 real (downsized) images: polygon, compressed/uncompressed RLE, bbox-only, negative."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from medseg.data.formats import get_reader
from medseg.errors import MedsegError

COCO = FIXTURES / "coco"
ANN = COCO / "_annotations.coco.json"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "coco"
    shutil.copytree(COCO, dst)
    return dst


def _doc() -> dict:
    return json.loads(ANN.read_text())


def _by_kind() -> dict[str, tuple[dict, dict]]:
    """kind of annotation -> (image entry, annotation)."""
    doc = _doc()
    images = {im["id"]: im for im in doc["images"]}
    out = {}
    for a in doc["annotations"]:
        seg = a.get("segmentation")
        kind = "bbox" if seg is None else "polygon" if isinstance(seg, list) else "rle_" + type(seg["counts"]).__name__
        out[kind] = (images[a["image_id"]], a)
    return out


def _decode_uncompressed(counts: list[int], h: int, w: int) -> np.ndarray:
    flat = np.concatenate([np.full(n, i % 2, np.uint8) for i, n in enumerate(counts)])
    return flat.reshape(w, h).T  # column-major


def test_scan_merge_and_classes():
    spec = get_reader("coco").scan(COCO)
    # merged classes take the used categories' common supercategory ("Tumor" in Roboflow exports)
    assert spec.classes == ["tumor"] and spec.class_kind == "multiclass"
    assert spec.channels == ["R", "G", "B"] and spec.spatial_dims == 2
    assert len(spec.cases) == 6
    assert all(c.patient == c.id == Path(c.sources["image"]).stem for c in spec.cases)
    sep = get_reader("coco", merge=False).scan(COCO)
    # category id 0 "Tumor" has no annotation: dropped; ids 1, 2 are named "0", "1"
    assert sep.classes == ["0", "1"] and sep.class_kind == "multilabel"
    assert get_reader("coco", merged_name="lesion").scan(ANN).classes == ["lesion"]  # ROOT may be the JSON


def test_merged_name_falls_back_to_foreground_without_a_common_supercategory(copy: Path):
    doc = _doc()
    for c in doc["categories"]:
        c["supercategory"] = f"s{c['id']}"
    (copy / "_annotations.coco.json").write_text(json.dumps(doc))
    assert get_reader("coco").scan(copy).classes == ["foreground"]


def _export_sides(tmp_path: Path, sides: dict[str, list[int]]) -> Path:
    """A Roboflow-style export root: one folder per split side, each with its images and JSON."""
    doc = _doc()
    root = tmp_path / "export_sides"
    for side, idx in sides.items():
        d = root / side
        d.mkdir(parents=True)
        ims = [doc["images"][i] for i in idx]
        ids = {im["id"] for im in ims}
        for im in ims:
            shutil.copy(COCO / im["file_name"], d / im["file_name"])
        sub = dict(doc, images=ims, annotations=[a for a in doc["annotations"] if a["image_id"] in ids])
        (d / "_annotations.coco.json").write_text(json.dumps(sub))
    return root


def test_prepare_keeps_the_exports_own_train_valid_split(tmp_path: Path):
    from medseg.data.prepare import prepare
    from medseg.data.prepared import PreparedDataset

    root = _export_sides(tmp_path, {"train": [0, 1, 2, 3], "valid": [4], "test": [5]})
    names = {side: sorted(Path(p).stem for p in (root / side).glob("*.jpg")) for side in ("train", "valid", "test")}
    out = prepare("coco", root, tmp_path / "p", workers=1)
    splits = json.loads((out / "splits.json").read_text())
    assert splits["k"] == 1 and splits["grouped_by"] == "the dataset's own split"
    assert splits["source_split"] == {"train": 4, "valid": 1, "test": 1}
    tr, va = PreparedDataset.open(out).fold(0)
    assert sorted(tr) == names["train"] and sorted(va) == names["valid"]  # test images in neither side
    kf = json.loads((prepare("coco", root, tmp_path / "k", workers=1, folds=3, split="kfold") / "splits.json").read_text())
    assert kf["k"] == 3 and kf["grouped_by"] == "patient"
    with pytest.raises(MedsegError, match="--split must be"):
        prepare("coco", root, tmp_path / "x", split="random")


def test_image_pixels_and_negative():
    r = get_reader("coco")
    spec = r.scan(COCO)
    anns_per_image = {}
    for a in _doc()["annotations"]:
        anns_per_image[a["image_id"]] = anns_per_image.get(a["image_id"], 0) + 1
    negatives = [im for im in _doc()["images"] if im["id"] not in anns_per_image]
    assert len(negatives) == 1
    for c in spec.cases:
        d = r.load(spec, c)
        assert d.image.shape == (1, 3, 128, 128) and d.image.dtype == np.uint8
        assert d.mask.shape == (1, 1, 128, 128) and d.mask.dtype == np.uint8
        ref = np.asarray(Image.open(c.sources["image"]).convert("RGB"))
        np.testing.assert_array_equal(d.image[0].transpose(1, 2, 0), ref)
        if c.id == Path(negatives[0]["file_name"]).stem:
            assert d.mask.sum() == 0
        else:
            assert d.mask.sum() > 0
    g = get_reader("coco", grayscale=True)
    gs = g.scan(COCO)
    d = g.load(gs, gs.cases[0])
    assert gs.channels == ["gray"] and d.image.shape == (1, 1, 128, 128)
    np.testing.assert_array_equal(d.image[0, 0], np.asarray(Image.open(gs.cases[0].sources["image"]).convert("L")))


def _mask_of(kind: str, merge: bool = True) -> tuple[np.ndarray, dict]:
    im, a = _by_kind()[kind]
    r = get_reader("coco", merge=merge)
    spec = r.scan(COCO)
    case = next(c for c in spec.cases if c.id == Path(im["file_name"]).stem)
    return r.load(spec, case).mask[0], a


def test_bbox_only_is_a_rectangle():
    m, a = _mask_of("bbox")
    x, y, w, h = a["bbox"]
    ys, xs = np.nonzero(m[0])
    # the filled box covers the bbox's pixels (up to the half-pixel rounding of its edges)
    assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
    assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
    assert m[0].sum() == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)  # solid rectangle


def test_polygon_is_filled_inside_its_vertices():
    m, a = _mask_of("polygon")
    poly = np.array(a["segmentation"][0]).reshape(-1, 2)
    ys, xs = np.nonzero(m[0])
    # this dataset's polygons are boxes: the raster spans the vertices' extent
    assert abs(xs.min() - poly[:, 0].min()) <= 1 and abs(xs.max() + 1 - poly[:, 0].max()) <= 1
    assert abs(ys.min() - poly[:, 1].min()) <= 1 and abs(ys.max() + 1 - poly[:, 1].max()) <= 1


def test_uncompressed_rle_decodes_exactly():
    m, a = _mask_of("rle_list", merge=False)
    ref = _decode_uncompressed(a["segmentation"]["counts"], 128, 128)
    j = a["category_id"] - 1  # used categories 1, 2 -> classes 0, 1
    np.testing.assert_array_equal(m[j], ref)
    assert m[1 - j].sum() == 0


def test_compressed_rle_matches_its_area():
    from pycocotools import mask as mask_utils

    m, a = _mask_of("rle_str")
    seg = a["segmentation"]
    assert m[0].sum() == int(mask_utils.area({"size": seg["size"], "counts": seg["counts"].encode()}))
    assert m[0].sum() > 100


def test_annotation_pointing_at_missing_image(copy: Path):
    doc = _doc()
    doc["annotations"][0]["image_id"] = 999
    (copy / "_annotations.coco.json").write_text(json.dumps(doc))
    with pytest.raises(MedsegError, match=r"annotation \d+ points at image id 999, which is not in 'images'") as e:
        get_reader("coco").scan(copy)
    assert e.value.path.endswith("_annotations.coco.json")


def test_missing_image_file(copy: Path):
    name = _doc()["images"][2]["file_name"]
    (copy / name).unlink()
    with pytest.raises(MedsegError, match="image file of image id .* is missing") as e:
        get_reader("coco").scan(copy)
    assert e.value.path == str(copy / name)


def test_truncated_jpg(copy: Path):
    name = _doc()["images"][1]["file_name"]
    p = copy / name
    p.write_bytes(p.read_bytes()[:200])
    r = get_reader("coco")
    spec = r.scan(copy)
    case = next(c for c in spec.cases if c.sources["image"] == str(p))
    with pytest.raises(MedsegError, match="cannot decode image") as e:
        r.load(spec, case)
    assert e.value.path == str(p)


def test_malformed_json(copy: Path):
    (copy / "_annotations.coco.json").write_text('{"images": [')
    with pytest.raises(MedsegError, match="malformed COCO JSON"):
        get_reader("coco").scan(copy)


def test_polygon_with_two_points(copy: Path):
    doc = _doc()
    a = next(a for a in doc["annotations"] if isinstance(a.get("segmentation"), list))
    a["segmentation"] = [[1, 1, 20, 20]]
    (copy / "_annotations.coco.json").write_text(json.dumps(doc))
    with pytest.raises(MedsegError, match=r"polygon with 2 points \(< 3\)"):
        get_reader("coco").scan(copy)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a folder or a COCO JSON file"):
        get_reader("coco").scan(tmp_path / "nope")


def _export_root(tmp_path: Path) -> Path:
    """The fixture split like a Roboflow export: train/ with 4 images, valid/ with 2, one JSON each."""
    doc = _doc()
    root = tmp_path / "export"
    for split, ims in (("train", doc["images"][:4]), ("valid", doc["images"][4:])):
        (root / split).mkdir(parents=True)
        ids = {im["id"] for im in ims}
        for im in ims:
            shutil.copyfile(COCO / im["file_name"], root / split / im["file_name"])
        part = {**doc, "images": ims, "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
        (root / split / "_annotations.coco.json").write_text(json.dumps(part))
    return root


def test_export_root_with_split_folders(tmp_path: Path):
    root = _export_root(tmp_path)
    r = get_reader("coco", merge=False)
    spec = r.scan(root)
    one = r.scan(COCO)
    # same cases, classes and masks as the single-JSON fixture; the split is remembered per case
    assert sorted(c.id for c in spec.cases) == sorted(c.id for c in one.cases)
    assert spec.classes == one.classes
    assert [c.split for c in spec.cases] == ["train"] * 4 + ["valid"] * 2
    from medseg.data.formats import guess_format

    assert guess_format(root) == "coco"  # the export root as a whole, too
    ref = {c.id: c for c in one.cases}
    for c in spec.cases:
        np.testing.assert_array_equal(r.load(spec, c).mask, r.load(one, ref[c.id]).mask)


def test_export_root_errors(tmp_path: Path):
    root = _export_root(tmp_path)
    doc = json.loads((root / "valid" / "_annotations.coco.json").read_text())
    doc["categories"][1]["name"] = "renamed"
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(doc))
    with pytest.raises(MedsegError, match="categories differ from those of .*train/_annotations.coco.json") as e:
        get_reader("coco").scan(root)
    assert e.value.path == str(root / "valid" / "_annotations.coco.json")
    doc["categories"][1]["name"] = _doc()["categories"][1]["name"]
    first = json.loads((root / "train" / "_annotations.coco.json").read_text())["images"][0]["file_name"]
    doc["images"][0]["file_name"] = first  # the same image in both splits
    shutil.copyfile(COCO / first, root / "valid" / first)
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(doc))
    with pytest.raises(MedsegError, match=f"two images named '{Path(first).stem}'") as e:
        get_reader("coco").scan(root)
    assert e.value.path == str(root / "valid" / first)
    with pytest.raises(MedsegError, match="no COCO annotation file .* in the folder or its split folders"):
        get_reader("coco").scan(tmp_path)


def test_predict_a_coco_folder_and_evaluate_it_back(tmp_path: Path, monkeypatch):
    """A COCO export folder is predicted as COCO (RGB, as the model was trained), written as
    ``<stem>_mask.png`` and scored against its own JSON; a plain folder of the same grey-as-RGB JPGs
    reaches a 3-channel model as 3 channels too."""
    import medseg.models
    from test_inference import create_model_shim, make_bundle

    from medseg.evaluation.evaluate import evaluate
    from medseg.data.formats import guess_format
    from medseg.inference.predict import predict

    monkeypatch.setattr(medseg.models, "create_model", create_model_shim)
    bp = make_bundle(tmp_path / "m.pt", channels=("R", "G", "B"), features=(4, 8, 16),
                     input={"mode": "2d", "context": 0, "stride": 1, "size": [64, 64], "resize": True})
    assert guess_format(COCO) == "coco"
    files = predict(bp, COCO, tmp_path / "pred", tta=False)
    stems = sorted(Path(im["file_name"]).stem for im in _doc()["images"])
    assert sorted(f.name for f in files) == [f"{s}_mask.png" for s in stems]
    summary = evaluate(tmp_path / "pred", COCO, out=tmp_path / "eval")
    assert summary["n_cases"] == 6
    # the same Dice by hand, for an image with a tumour
    import csv

    r = get_reader("coco")
    spec = r.scan(COCO)
    case = next(c for c in spec.cases if r.load(spec, c).mask.any())
    truth = r.load(spec, case).mask[0, 0] > 0
    pred = np.asarray(Image.open(tmp_path / "pred" / f"{case.id}_mask.png")) > 127
    rows = {row["case_id"]: row for row in csv.DictReader((tmp_path / "eval" / "metrics.csv").open())}
    assert float(rows[case.id]["dice"]) == pytest.approx(2 * (truth & pred).sum() / (truth.sum() + pred.sum()))
    plain = tmp_path / "jpgs"
    plain.mkdir()
    for f in COCO.glob("*.jpg"):
        shutil.copy(f, plain / f.name)
    assert guess_format(plain) == "folder"
    out = predict(bp, plain, tmp_path / "pred_plain", tta=False)
    assert sorted(f.name for f in out) == [f"{s}.png" for s in stems]
    from medseg import Segmenter  # the Python API reads image folders the same way

    one = Segmenter.load(bp, tta=False).predict(plain / f"{stems[0]}.jpg")
    np.testing.assert_array_equal(one.mask[0, 0] * 255, np.asarray(Image.open(tmp_path / "pred_plain" / f"{stems[0]}.png")))
