import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.formats import get_reader
from medseg.data.formats.uwmgi import CLASSES, read_submission, read_train_csv, submission_rows, write_submission
from medseg.data.rle import decode, encode
from medseg.data.formats.uwmgi_synthetic import write_uwmgi_synthetic
from medseg.errors import MedsegError


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    # 4 case-days: the four competition sizes (266, 234, 276 @1.63, 360x310)
    return write_uwmgi_synthetic(tmp_path_factory.mktemp("uw") / "data", n_cases=2, days_per_case=2, slices_per_day=5)


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_uwmgi_synthetic(tmp_path / "tiny", n_cases=1, days_per_case=1, slices_per_day=3)


def _rows(root: Path) -> list[list[str]]:
    with open(root / "train.csv", newline="") as f:
        return list(csv.reader(f))


def _write_rows(root: Path, rows: list[list[str]]) -> None:
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _pngs(root: Path) -> list[Path]:
    return sorted((root / "train").rglob("*.png"))


def test_scan_and_load_competition_layout(synth):
    rows = _rows(synth)
    assert rows[0] == ["id", "class", "segmentation"]
    truth = {(r[0], r[1]): r[2] for r in rows[1:]}
    assert len(truth) == len(rows) - 1 == 3 * 20  # 3 rows per slice, no duplicates
    reader = get_reader("uwmgi")
    spec = reader.scan(synth)
    assert spec.classes == ["large_bowel", "small_bowel", "stomach"]
    assert spec.class_kind == "multilabel" and spec.channels == ["MRI"] and spec.spatial_dims == 2
    assert len(spec.cases) == 4
    seen_sizes, overlap = set(), 0
    for case in spec.cases:
        assert case.patient == case.id.split("_")[0]
        files = sorted((synth / "train" / case.patient / case.id / "scans").iterdir())
        w, h, pw, ph = files[0].stem.split("_")[2:]
        w, h = int(w), int(h)
        d = reader.load(spec, case)
        d.check(case.id)
        assert d.image.shape == (5, 1, h, w) and d.image.dtype == np.uint16
        assert d.mask.shape == (5, 3, h, w) and d.mask.dtype == np.uint8
        assert d.spacing == (3.0, float(ph), float(pw))
        assert d.slices == [f"{case.id}_slice_{n:04d}" for n in range(1, 6)]
        for z, sid in enumerate(d.slices):
            f = next(p for p in files if p.name.startswith(f"slice_{z + 1:04d}_"))
            np.testing.assert_array_equal(d.image[z, 0], np.asarray(Image.open(f)))
            for k, cls in enumerate(CLASSES):  # channel k is exactly the csv's RLE for that class
                np.testing.assert_array_equal(d.mask[z, k], decode(truth[(sid, cls)], (h, w)))
        overlap += int((d.mask[:, 0] & d.mask[:, 2]).sum())
        seen_sizes.add((w, h, float(pw)))
    assert seen_sizes == {(266, 266, 1.5), (234, 234, 1.5), (276, 276, 1.63), (360, 310, 1.5)}
    assert overlap > 0  # stomach and large bowel overlap somewhere, and both channels keep it


def test_images_dir_as_root_finds_csv_beside_it(synth):
    spec = get_reader("uwmgi").scan(synth / "train")
    assert [c.id for c in spec.cases] == [c.id for c in get_reader("uwmgi").scan(synth).cases]
    assert spec.has_masks


def test_slices_sorted_numerically_and_csv_order_irrelevant(tiny):
    # unpadded numbers: slice 10 must come after slice 9 (a string sort would put it first)
    rename = {"0002": "9", "0003": "10"}
    for f in _pngs(tiny):
        n = f.name.split("_")[1]
        if n in rename:
            f.rename(f.with_name(f.name.replace(f"slice_{n}_", f"slice_{rename[n]}_")))
    rows = _rows(tiny)
    for r in rows[1:]:
        n = r[0].rsplit("_", 1)[1]
        r[0] = r[0][: -len(n)] + rename.get(n, n)
    _write_rows(tiny, [rows[0]] + rows[1:][::-1])  # reversed rows: order in the csv must not matter
    reader = get_reader("uwmgi")
    spec = reader.scan(tiny)
    d = reader.load(spec, spec.cases[0])
    assert d.slices == ["case2_day0_slice_0001", "case2_day0_slice_9", "case2_day0_slice_10"]
    truth = {(r[0], r[1]): r[2] for r in rows[1:]}
    for z, sid in enumerate(d.slices):
        for k, c in enumerate(CLASSES):
            np.testing.assert_array_equal(d.mask[z, k], decode(truth[(sid, c)], (266, 266)))


def test_column_major_option(tiny, tmp_path):
    reader_c = get_reader("uwmgi")
    spec = reader_c.scan(tiny)
    ref = reader_c.load(spec, spec.cases[0]).mask
    assert ref.any()
    rows = _rows(tiny)
    h, w = spec.cases[0].sources["size"]
    out = [rows[0]]
    for sid, cls, seg in rows[1:]:
        out.append([sid, cls, encode(decode(seg, (h, w), "C"), "F")])
    _write_rows(tiny, out)
    reader_f = get_reader("uwmgi", rle_order="F")
    spec_f = reader_f.scan(tiny)
    np.testing.assert_array_equal(reader_f.load(spec_f, spec_f.cases[0]).mask, ref)
    # read with the wrong order, the same strings give different (transposed) masks
    spec_c = reader_c.scan(tiny)
    assert not np.array_equal(reader_c.load(spec_c, spec_c.cases[0]).mask, ref)


def test_test_layout_without_csv(tmp_path):
    root = write_uwmgi_synthetic(tmp_path / "t", n_cases=1, days_per_case=2, slices_per_day=2, split="test", with_csv=False)
    reader = get_reader("uwmgi")
    spec = reader.scan(root, require_masks=False)
    assert not spec.has_masks and len(spec.cases) == 2
    d = reader.load(spec, spec.cases[0])
    assert d.mask is None and d.image.dtype == np.uint16 and d.image.shape[:2] == (2, 1)
    with pytest.raises(MedsegError, match=r"no train.csv beside the images \(use --images-only"):
        reader.scan(root)
    # the test folder itself as ROOT
    assert len(reader.scan(root / "test", require_masks=False).cases) == 2


def test_images_only_ignores_csv(tiny):
    spec = get_reader("uwmgi").scan(tiny, require_masks=False)
    assert not spec.has_masks and get_reader("uwmgi").load(spec, spec.cases[0]).mask is None


def test_custom_csv_option(tiny):
    os.replace(tiny / "train.csv", tiny / "labels.csv")
    with pytest.raises(MedsegError, match="no train.csv"):
        get_reader("uwmgi").scan(tiny)
    assert get_reader("uwmgi", csv="labels.csv").scan(tiny).has_masks


def test_bad_option():
    with pytest.raises(MedsegError, match=r"bad option for format 'uwmgi': rle_order"):
        get_reader("uwmgi", rle_order="X")


def test_bad_slice_file_name(tiny):
    bad = _pngs(tiny)[0].with_name("slice_0004_266.png")
    bad.write_bytes(b"")
    with pytest.raises(MedsegError, match=r"slice file name does not parse \(expected slice_XXXX_W_H_PW_PH.png\)") as e:
        get_reader("uwmgi").scan(tiny)
    assert e.value.path == str(bad)


def test_mixed_sizes_in_a_case_day(tiny):
    first = _pngs(tiny)[0]
    odd = first.with_name("slice_0004_234_234_1.50_1.50.png")
    Image.fromarray(np.zeros((234, 234), np.uint16)).save(odd)
    with pytest.raises(MedsegError, match=r"slice size 234x234 differs from the case-day's 266x266") as e:
        get_reader("uwmgi").scan(tiny)
    assert e.value.path == str(odd)


def test_csv_id_without_image(tiny):
    rows = _rows(tiny)
    rows += [["case2_day0_slice_0099", c, ""] for c in CLASSES]
    _write_rows(tiny, rows)
    with pytest.raises(MedsegError, match=r"id case2_day0_slice_0099 has no image under") as e:
        get_reader("uwmgi").scan(tiny)
    assert e.value.path == str(tiny / "train.csv")


def test_image_without_csv_rows(tiny):
    rows = [r for r in _rows(tiny) if r[0] != "case2_day0_slice_0002"]
    _write_rows(tiny, rows)
    with pytest.raises(MedsegError, match=r"image without rows in train.csv \(id case2_day0_slice_0002\)") as e:
        get_reader("uwmgi").scan(tiny)
    assert Path(e.value.path).name.startswith("slice_0002_")
    # but fine without masks
    assert len(get_reader("uwmgi").scan(tiny, require_masks=False).cases) == 1


@pytest.mark.parametrize(
    "seg, match",
    [
        ("1 2 3", r"bad RLE for id case2_day0_slice_0002, class stomach: odd number of values \(3\)"),
        ("1 2 x 4", r"bad RLE for id case2_day0_slice_0002, class stomach: token 3 \('x'\)"),
        ("10 2 5 1", r"class stomach: run 2: start 5 is not after run 1's start 10"),
        ("70700 60", r"class stomach: run 1 \(start 70700, length 60\) ends at pixel 70759, past the image end \(70756 pixels\)"),
    ],
)
def test_bad_rle_names_csv_and_id(tiny, seg, match):
    rows = _rows(tiny)
    for r in rows:
        if r[0] == "case2_day0_slice_0002" and r[1] == "stomach":
            r[2] = seg
    _write_rows(tiny, rows)
    with pytest.raises(MedsegError, match=match) as e:
        get_reader("uwmgi").scan(tiny)
    assert e.value.path == str(tiny / "train.csv")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda rows: rows + [rows[1]], r"line 11: duplicate row for id case2_day0_slice_\d{4}, class large_bowel"),
        (lambda rows: rows[:1] + [[rows[1][0], "liver", ""]] + rows[2:], r"line 2: unknown class 'liver'"),
        (lambda rows: [r for r in rows if not (r[0] == "case2_day0_slice_0003" and r[1] == "small_bowel")],
         r"id case2_day0_slice_0003 has no row for class small_bowel"),
        (lambda rows: [["id", "klass", "segmentation"]] + rows[1:], r"csv has no column class"),
        (lambda rows: rows[:1] + [["slice_1", "stomach", ""]] + rows[1:], r"line 2: id 'slice_1' is not caseN_dayM_slice_XXXX"),
    ],
)
def test_bad_csv(tiny, edit, match):
    _write_rows(tiny, edit(_rows(tiny)))
    with pytest.raises(MedsegError, match=match):
        get_reader("uwmgi").scan(tiny)


def test_image_size_disagrees_with_its_name(tiny):
    f = _pngs(tiny)[1]
    Image.fromarray(np.zeros((266, 200), np.uint16)).save(f)
    reader = get_reader("uwmgi")
    spec = reader.scan(tiny)
    with pytest.raises(MedsegError, match=r"image is 200x266 \(WxH\) but its name says 266x266") as e:
        reader.load(spec, spec.cases[0])
    assert e.value.path == str(f)


def test_unreadable_png(tiny):
    f = _pngs(tiny)[0]
    f.write_bytes(b"not a png")
    reader = get_reader("uwmgi")
    with pytest.raises(MedsegError, match=r"cannot read PNG") as e:
        reader.load(reader.scan(tiny), reader.scan(tiny).cases[0])
    assert e.value.path == str(f)


def test_header_only_csv(tiny):
    _write_rows(tiny, _rows(tiny)[:1])
    with pytest.raises(MedsegError, match=r"image without rows in train.csv \(id case2_day0_slice_0001\)"):
        get_reader("uwmgi").scan(tiny)
    (tiny / "train.csv").write_text("")
    with pytest.raises(MedsegError, match=r"empty csv \(expected header id,class,segmentation\)"):
        get_reader("uwmgi").scan(tiny)


def test_read_train_csv_checks_rle(tiny):
    rows = _rows(tiny)
    rows[2][2] = "0 3"
    _write_rows(tiny, rows)
    with pytest.raises(MedsegError, match=r"bad RLE for id .* \(line 3\): run 1: start 0 must be >= 1"):
        read_train_csv(tiny / "train.csv")


# --- submission ----------------------------------------------------------------------------------


def test_submission_rows_order_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 3, 6, 5)) > 0.6).astype(np.uint8)
    mask[1, 2] = 0  # an empty organ -> empty string
    classes = ["stomach", "large_bowel", "small_bowel"]  # channel order differs from competition order
    rows = submission_rows(["case1_day0_slice_0007", "case1_day0_slice_0008"], mask, classes)
    assert [(r[0][-4:], r[1]) for r in rows] == [
        ("0007", "large_bowel"), ("0007", "small_bowel"), ("0007", "stomach"),
        ("0008", "large_bowel"), ("0008", "small_bowel"), ("0008", "stomach"),
    ]
    assert rows[2][2] == encode(mask[0, 0]) and rows[0][2] == encode(mask[0, 1])
    assert rows[4][2] == encode(mask[1, 2]) == "" and rows[3][2] == encode(mask[1, 1]) != ""
    path = write_submission(rows, tmp_path / "sub" / "submission.csv")
    assert path.read_text().splitlines()[0] == "id,class,predicted"
    assert not list(path.parent.glob("*.tmp-*"))
    back = read_submission(path)
    assert back == {(i, c): r for i, c, r in rows}
    np.testing.assert_array_equal(decode(back[("case1_day0_slice_0008", "small_bowel")], (6, 5)), mask[1, 2])


def test_submission_rows_rejects_mismatch():
    with pytest.raises(MedsegError, match=r"does not match 2 slices x 3 classes"):
        submission_rows(["a", "b"], np.zeros((3, 3, 4, 4)), CLASSES)
    with pytest.raises(MedsegError, match=r"class 'liver' is not a UW-Madison class"):
        submission_rows(["a"], np.zeros((1, 1, 4, 4)), ["liver"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,klass,predicted\n", r"submission has no column class"),
        ("id,class\n", r"submission has no column predicted"),
        ("id,class,predicted\na,stomach,1 2\na,stomach,\n", r"line 3: duplicate row for id a, class stomach"),
        ("id,class,predicted\na,stomach,1 2 3\n", r"bad RLE for id a, class stomach \(line 2\): odd number"),
        ("", r"empty submission"),
    ],
)
def test_read_submission_errors(tmp_path, text, match):
    p = tmp_path / "submission.csv"
    p.write_text(text)
    with pytest.raises(MedsegError, match=match) as e:
        read_submission(p)
    assert e.value.path == str(p)


def test_write_prediction_appends_a_submission(synth, tmp_path):
    reader = get_reader("uwmgi")
    spec = reader.scan(synth)
    out = tmp_path / "pred"
    truth = {}
    for case in spec.cases[:2]:
        d = reader.load(spec, case)
        assert reader.write_prediction(spec, case, d.mask, out) == [out / "submission.csv"]
        truth.update({(sid, c): d.mask[z, k] for z, sid in enumerate(d.slices) for k, c in enumerate(CLASSES)})
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,class,predicted" and lines.count("id,class,predicted") == 1
    sub = read_submission(out / "submission.csv")
    assert set(sub) == set(truth) and len(lines) == 1 + len(truth)
    for (sid, c), m in truth.items():
        np.testing.assert_array_equal(decode(sub[(sid, c)], m.shape), m)


# --- CLI end to end --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_prepare_end_to_end(synth, tmp_path):
    from medseg.data.prepared import PreparedDataset

    r = _cli("prepare", "uwmgi", str(synth), str(tmp_path / "prep"), "--folds", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepared 4 cases, 2 patients, 20 slices" in r.stdout
    ds = PreparedDataset.open(tmp_path / "prep")
    assert ds.classes == CLASSES and ds.class_kind == "multilabel" and ds.channels == ["MRI"]
    assert ds.info["source_format"] == "uwmgi"
    c = ds.case("case9_day6")
    assert c.patient == "case9" and c.spacing == [3.0, 1.5, 1.5] and c.shape == [5, 1, 310, 360]
    assert c.slices[0] == "case9_day6_slice_0001"
    assert ds.image("case9_day6").dtype == np.uint16
    ref = get_reader("uwmgi")
    spec = ref.scan(synth)
    np.testing.assert_array_equal(np.asarray(ds.mask("case9_day6")), ref.load(spec, next(x for x in spec.cases if x.id == "case9_day6")).mask)
    train, val = ds.fold(0)
    assert {i.split("_")[0] for i in train}.isdisjoint({i.split("_")[0] for i in val})


def test_cli_prepare_bad_input_exits_2(tiny, tmp_path):
    rows = _rows(tiny)
    rows[4][2] = "5 5 1 1"
    _write_rows(tiny, rows)
    r = _cli("prepare", "uwmgi", str(tiny), str(tmp_path / "prep"))
    assert r.returncode == 2, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())  # rich may wrap long lines
    assert "error:" in out and "train.csv" in out and f"bad RLE for id {rows[4][0]}, class {rows[4][1]}: run 2" in out
    assert not (tmp_path / "prep").exists()


# ----------------------------------------------------------------------- bad input of issue 8 (remaining)
def test_mixed_pixel_spacing_in_a_case_day(tiny):
    odd = _pngs(tiny)[0].with_name("slice_0004_266_266_1.63_1.63.png")
    Image.fromarray(np.zeros((266, 266), np.uint16)).save(odd)
    with pytest.raises(MedsegError, match=r"pixel spacing 1.63x1.63 differs from the case-day's 1.5x1.5") as e:
        get_reader("uwmgi").scan(tiny)
    assert e.value.path == str(odd)


def test_bad_slice_file_name_in_the_test_layout_via_predict(tiny, tmp_path):
    # the test layout (images only) goes through the same scan: `medseg predict` names the file too
    (tiny / "train.csv").unlink()
    bad = _pngs(tiny)[1].with_name("slice_12_266_266.png")
    _pngs(tiny)[1].rename(bad)
    r = _cli("predict", "no-model", str(tiny), str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}: slice file name does not parse (expected slice_XXXX_W_H_PW_PH.png)"


@pytest.fixture
def submission(synth, tmp_path):
    """A perfect submission of ``synth`` and the evaluate call that scores it."""
    from medseg.evaluation.evaluate import evaluate

    truth = read_train_csv(synth / "train.csv")
    rows = [(sid, cls, rle) for sid, per in sorted(truth.items()) for cls, rle in per.items()]

    def score(rows, name="sub.csv"):
        p = write_submission(rows, tmp_path / name)
        return p, lambda: evaluate(p, synth / "train.csv", images=synth / "train", out=tmp_path / f"ev_{name}",
                                   report=False)

    return rows, score


def test_submission_id_not_in_the_truth_names_the_submission(submission):
    rows, score = submission
    p, run = score(rows + [("case2_day0_slice_0099", "stomach", "")])
    with pytest.raises(MedsegError) as e:
        run()
    assert e.value.problem == "1 ids of the submission are not in the ground truth, e.g. case2_day0_slice_0099"
    assert e.value.path == str(p)


def test_submission_missing_an_id_names_the_submission(submission):
    rows, score = submission
    sid, cls, _ = rows[7]
    p, run = score(rows[:7] + rows[8:])
    with pytest.raises(MedsegError) as e:
        run()
    assert e.value.problem == f"no row for id {sid}, class {cls}" and e.value.path == str(p)


def test_submission_rle_overlapping_itself_names_the_row(submission):
    rows, score = submission
    sid, cls, _ = rows[4]
    p, run = score(rows[:4] + [(sid, cls, "10 5 12 3")] + rows[5:])
    with pytest.raises(MedsegError, match=rf"bad RLE for id {sid}, class {cls} \(line 6\): run 2 \(start 12\) overlaps "
                       r"run 1 \(start 10, length 5, last pixel 14\)") as e:
        run()
    assert e.value.path == str(p)


def test_submission_rle_past_the_image_names_the_row(submission, synth):
    rows, score = submission
    sid, cls, _ = rows[2]  # case2_day0: 266 x 266 = 70756 pixels (the size comes from the image file names)
    p, run = score(rows[:2] + [(sid, cls, "70750 10")] + rows[3:])
    with pytest.raises(MedsegError, match=rf"bad RLE for id {sid}, class {cls}: run 1 \(start 70750, length 10\) "
                       r"ends at pixel 70759, past the image end \(70756 pixels\)") as e:
        run()
    assert e.value.path == str(p)
    r = _cli("evaluate", str(p), str(synth / "train.csv"), "--images", str(synth / "train"), "--no-report",
             "--out", str(p.parent / "ev_cli"))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {p}: bad RLE for id {sid}, class {cls}: run 1")
