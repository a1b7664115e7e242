"""The interactive view: error components found where they were planted, the page driven in headless
Chromium (sort, open a case, move to a slice, toggle the prediction) with canvas pixels checked, and
``medseg view`` marking the cases it cannot show."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from medseg.evaluation.viewer import components, mosaic
from medseg.training.synthetic import make_synthetic

RED = [230, 25, 75]  # the first class's colour


def view_data(page: str) -> dict:
    """The JSON a view page embeds."""
    return json.loads(page.split('<script id="data" type="application/json">')[1].split("</script>")[0])


def test_components_are_islands_and_missed_structures():
    t = np.zeros((4, 1, 16, 16), np.uint8)
    p = np.zeros_like(t)
    t[1, 0, 2:6, 2:6] = 1  # found (touched by the prediction)
    p[1, 0, 3:7, 3:7] = 1
    p[2, 0, 10:13, 10:15] = 1  # an island: FP, 15 voxels
    t[3, 0, 8:11, 1:4] = 1  # missed: FN, 9 voxels centred at (9, 2)
    got = components(t, p, ["a"])
    assert got == [{"kind": "FP", "class": "a", "voxels": 15, "z0": 2, "z1": 2, "z": 2, "y": 11, "x": 12},
                   {"kind": "FN", "class": "a", "voxels": 9, "z0": 3, "z1": 3, "z": 3, "y": 9, "x": 2}]


def test_mosaic_tiles_slices_row_major():
    v = np.arange(5)[:, None, None] * np.ones((5, 2, 3), int)
    m, cols = mosaic(v)
    assert cols == 3 and m.shape == (4, 9)
    assert m[0, 3] == 1 and m[2, 0] == 3 and m[2, 3] == 4 and m[2, 6] == 0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A synthetic truth and a prediction equal to it but for an FP island in case00 (slice 1, rows and
    columns 0-2) and a missed disc in case01 (slice 3); evaluated, with the view written."""
    from medseg.evaluation.evaluate import evaluate

    root = tmp_path_factory.mktemp("v")
    truth = make_synthetic(root / "truth", n_patients=3, slices=6, size=32)
    pred = root / "pred"
    shutil.copytree(truth, pred)
    meta = json.loads((pred / "dataset.json").read_text())
    files = {c["id"]: pred / c["mask"] for c in meta["cases"]}
    m0 = np.load(files["case00"], mmap_mode="r+")
    assert not m0[1].any()  # slice 1 of case00 holds no truth
    m0[1, 0, 0:3, 0:3] = 1  # in a corner: no disc of slices 0 or 2 reaches it (26-connected)
    m0.flush()
    m1 = np.load(files["case01"], mmap_mode="r+")
    assert m1[3, 0].any()
    m1[3, 0] = 0
    m1.flush()
    evaluate(pred, truth, out=root / "eval")
    return root


def test_evaluate_writes_the_view_with_the_planted_components(planted):
    page = (planted / "eval" / "view.html").read_text()
    data = view_data(page)
    cases = {c["id"]: c for c in data["cases"]}
    assert set(cases) == {"case00", "case01", "case02"} and data["planes"] == 3
    assert cases["case00"]["components"] == [{"kind": "FP", "class": "disc", "voxels": 9, "z0": 1, "z1": 1, "z": 1, "y": 1, "x": 1}]
    fn = cases["case01"]["components"]
    assert len(fn) == 1 and fn[0]["kind"] == "FN" and fn[0]["z"] == 3 and fn[0]["class"] == "disc"
    assert cases["case02"]["components"] == [] and cases["case02"]["metrics"]["dice"] == 1.0
    assert "http" not in page.replace("http-equiv", "")  # opens with no network


def _chromium(page: Path, script: str, out: Path) -> dict:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the view's data is still checked")
    probe = ("<script>(async function(){const V=window.medsegView,out={};try{" + script + "}catch(e){out.err=String(e)}"
             "const p=document.createElement('pre');p.id='test-out';p.textContent=JSON.stringify(out);"
             "document.body.appendChild(p);})();</script>")
    out.write_text(page.read_text().replace("</body>", probe + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                              "--disable-background-networking", f"--user-data-dir={profile}",
                              "--virtual-time-budget=20000", "--dump-dom", out.as_uri()],
                             capture_output=True, text=True, timeout=180).stdout
    import html

    res = json.loads(html.unescape(dom.split('<pre id="test-out">')[1].split("</pre>")[0]))
    assert "err" not in res, res["err"]
    return res


def test_the_page_in_chromium_sorts_opens_scrolls_and_toggles(planted, tmp_path):
    from medseg.data.prepared import PreparedDataset

    edge = np.argwhere(PreparedDataset.open(planted / "truth").mask("case01")[1, 0])[0]  # topmost disc pixel: an outline
    res = _chromium(planted / "eval" / "view.html", f"""
      V.sortBy('dice'); out.asc = V.rows(); V.sortBy('dice'); out.desc = V.rows();
      await V.openCase('case00'); out.z0 = V.state.p[2]; V.setSlice(1);
      out.on = V.pixel('axial', 1, 1); V.toggle('pred', false); out.off = V.pixel('axial', 1, 1); V.toggle('pred', true);
      out.comps = document.getElementById('comps').textContent;
      out.worst = document.getElementById('worst').textContent;
      const cor = document.getElementById('plane-coronal'); out.coronal = [cor.width, cor.height];
      await V.openCase('case01'); V.setSlice(1); out.edge = V.pixel('axial', {edge[1]}, {edge[0]});
      V.toggle('truth', false); out.edge_off = V.pixel('axial', {edge[1]}, {edge[0]});
    """, tmp_path / "probe.html")
    page = (planted / "eval" / "view.html").read_text()
    dice = {c["id"]: c["metrics"]["dice"] for c in
            view_data(page)["cases"]}
    assert res["asc"] == sorted(dice, key=dice.get) and res["desc"] == res["asc"][::-1]
    assert res["desc"][0] == "case02" and len(set(dice.values())) == 3
    assert res["z0"] == 1  # a case opens at its largest error component
    r, g, b, _ = res["on"]
    assert r > g + 50 and r > b  # the island, filled with the class's colour
    assert res["off"][0] == res["off"][1] == res["off"][2]  # the grey image beneath once the prediction is hidden
    assert "FP disc: 9 voxels (9.0 mm\u00b3), slices 2-2" in res["comps"] and "FP disc: 9 voxels" in res["worst"]
    assert "FN disc" in res["worst"] and res["coronal"] == [32, 6]
    assert res["edge"][:3] == RED  # the truth's outline drawn over the prediction's fill
    assert res["edge_off"][:3] != RED


def test_cli_view_marks_cases_it_cannot_show(planted, tmp_path, capsys, monkeypatch):
    import sys

    from medseg.cli import main

    pred = tmp_path / "pred"
    shutil.copytree(planted / "pred", pred)
    meta = json.loads((pred / "dataset.json").read_text())
    meta["cases"] = [c for c in meta["cases"] if c["id"] != "case02"]  # a prediction folder missing a case
    (pred / "dataset.json").write_text(json.dumps(meta))
    f = pred / next(c["mask"] for c in meta["cases"] if c["id"] == "case01")
    np.save(f, np.load(f)[..., :-2])  # and one whose size disagrees with the truth
    out = tmp_path / "v.html"
    monkeypatch.setattr(sys, "argv", ["medseg", "view", str(pred), str(planted / "truth"), "--out", str(out), "--no-open"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "skipped case02: no prediction for case case02" in said and "view of 1 of 3 cases (1 error component)" in said
    assert "skipped case01: case case01: prediction shape (6, 2, 32, 30) differs from the truth's (6, 2, 32, 32)" in said
    page = out.read_text()
    data = view_data(page)
    missing = [c for c in data["cases"] if c.get("missing")]
    assert [c["id"] for c in missing] == ["case01", "case02"] and "no prediction" in missing[1]["missing"]
    assert "differs from the truth" in missing[0]["missing"]


def test_cli_view_of_predictions_over_their_images_without_truth(tmp_path, capsys, monkeypatch):
    import sys

    from conftest import ROOT

    from medseg.cli import main
    from medseg.inference.predict import predict

    src = ROOT / "tests" / "fixtures" / "lgg_tiny" / "kaggle_3m"
    pred = tmp_path / "pred"
    predict("lgg-unet", src, pred, tta=False, device="cpu", progress=False)
    monkeypatch.setattr(sys, "argv", ["medseg", "view", str(pred), "--image", str(src), "--no-open"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    page = (tmp_path / "pred_view.html").read_text()
    data = view_data(page)
    assert [c["id"] for c in data["cases"]] == sorted(p.name for p in src.iterdir() if p.is_dir())
    assert all(c["truth"] is False and c["components"] == [] and c["z"] == 4 for c in data["cases"])
    monkeypatch.setattr(sys, "argv", ["medseg", "view", str(pred), "--no-open"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "give TRUTH, or --image" in capsys.readouterr().err


def _oriented_view(tmp: Path) -> Path:
    """One 6 x 32 x 32 volume with an identity (RAS) affine: truth in the superior-anterior-right corner
    (high z, y and x indices), the prediction finding its left half, plus a false-positive island."""
    from medseg.evaluation.metrics import case_metrics
    from medseg.evaluation.viewer import ViewWriter, case_metrics_row

    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (6, 1, 32, 32)).astype(np.int16)
    truth = np.zeros((6, 1, 32, 32), np.uint8)
    truth[4:6, 0, 24:28, 24:28] = 1
    pred = np.zeros_like(truth)
    pred[4:6, 0, 24:28, 24:26] = 1  # TP on x 24-25; x 26-27 missed (FN)
    pred[1, 0, 2:5, 2:5] = 1  # FP island, posterior-left-inferior
    w = ViewWriter(["a <b>"], 3)
    rows = case_metrics(pred, truth, spacing=(1.0, 1.0, 1.0))
    w.add_case("<img src=x onerror=document.title=42>", "p'1", image, truth, pred, (1.0, 1.0, 1.0),
               case_metrics_row(rows), affine=np.eye(4))
    w.add_case("second", "p2", image, truth, truth, (1.0, 1.0, 1.0), case_metrics_row(case_metrics(truth, truth, spacing=(1, 1, 1))),
               affine=np.eye(4))
    return w.write(tmp / "v.html", "orientation <script>")


def test_the_view_is_oriented_and_safe_with_crosshair_errors_and_strip(tmp_path):
    """In Chromium: a name with markup runs nothing; with a RAS affine the truth in the superior-anterior-
    right corner is drawn top-left in axial (R left, A up), top in coronal and sagittal, with the letters
    where the anatomy is; the crosshair is drawn on its overlay; TP / FP / FN get their colours where they
    were planted; the per-slice Dice strip and the opening slice follow the errors; sorting shows the worst
    first; a slider's arrow keys stay the slider's."""
    page = _oriented_view(tmp_path)
    bad = "<img src=x onerror=document.title=42>"
    res = _chromium(page, f"""
      out.title = document.title; out.imgs = document.querySelectorAll('#cases img, #legend b').length;
      out.cell = document.querySelector('#cases td').textContent;
      await V.openCase({json.dumps(bad)});
      out.opened = V.state.p.slice(); out.strip = V.strip();
      V.goTo({{x: 25, y: 25, z: 4}});
      out.ax = V.pixel('axial', 6, 6); out.ax_far = V.pixel('axial', 28, 28);
      out.cor = V.pixel('coronal', 6, 1); out.sag = V.pixel('sagittal', 6, 1);
      out.lax = V.letters('axial'); out.lcor = V.letters('coronal'); out.lsag = V.letters('sagittal');
      const [ci, cj] = V.screenOf('axial', V.state.p); out.cij = [ci, cj];
      const ov = document.getElementById('cross-axial'), f = ov.width / 32;
      out.cross_on = V.crossPixel('axial', Math.floor((ci + 0.5) * f), 3); out.cross_off = V.crossPixel('axial', 2, 2);
      V.toggle('cross', false); out.cross_hidden = V.crossPixel('axial', Math.floor((ci + 0.5) * f), 3);
      V.mode('errors');
      out.tp = V.pixel('axial', 6, 6); out.fn = V.pixel('axial', 4, 6);
      V.goTo({{x: 3, y: 3, z: 1}}); out.fp = V.pixel('axial', 28, 28);
      out.read = V.readout('axial', 28, 28);
      V.sortBy('hd95'); out.hd_first = V.rows()[0];
      out.arrow = document.querySelector('#cases th[data-k="hd95"] .arrow').textContent;
      const before = V.state.p.slice(), sl = document.getElementById('slice');
      sl.dispatchEvent(new KeyboardEvent('keydown', {{key: 'ArrowUp', bubbles: true}}));
      out.kept = JSON.stringify(V.state.p) === JSON.stringify(before);
      document.body.dispatchEvent(new KeyboardEvent('keydown', {{key: 'ArrowUp', bubbles: true}}));
      out.moved = V.state.p[2] - before[2];
    """, tmp_path / "probe.html")
    assert res["title"] == "orientation <script>" and res["imgs"] == 0 and res["cell"] == bad
    # opens at slice 2 (index 1): the FP island's 9 voxels are more errors than either slice's 8 missed voxels
    assert res["opened"] == [3, 3, 1] and res["strip"][:4] == [None, 0.0, None, None]
    assert 0 < res["strip"][4] < 1
    for got in (res["ax"], res["cor"], res["sag"]):  # x 25 -> column 6 from the left; y 25 -> row 6; z 4 -> row 1
        assert got[0] > got[1] + 40, got  # filled with the class colour
    assert res["ax_far"][0] == res["ax_far"][1] == res["ax_far"][2]  # grey: the opposite corner holds nothing
    assert (res["lax"]["l"]["text"], res["lax"]["r"]["text"], res["lax"]["t"]["text"], res["lax"]["b"]["text"]) == ("R", "L", "A", "P")
    assert res["lax"]["l"]["x"] < 0.2 and res["lax"]["r"]["x"] > 0.8 and res["lax"]["t"]["y"] < 0.2
    assert (res["lcor"]["l"]["text"], res["lcor"]["t"]["text"]) == ("R", "S")
    assert (res["lsag"]["l"]["text"], res["lsag"]["t"]["text"]) == ("A", "S")
    assert res["cij"] == [6, 6]
    r, g, b, a = res["cross_on"]
    assert a > 150 and r > 200 and g > 180 and b < 80
    assert res["cross_off"][3] == 0 and res["cross_hidden"][3] == 0
    assert res["tp"][1] > res["tp"][0] + 40 and res["tp"][1] > res["tp"][2]  # green
    assert res["fn"][2] > res["fn"][0] + 40  # blue: x 27 of the truth, not predicted
    assert res["fp"][0] > res["fp"][1] + 60 and res["fp"][0] > res["fp"][2] + 60  # red
    assert "slice 2, row 4, column 4" in res["read"] and "L 3.0, P 3.0, I 1.0 mm" not in res["read"]
    assert "R 3.0, A 3.0, S 1.0 mm" in res["read"] and "prediction a <b>" in res["read"] and "truth -" in res["read"]
    assert res["hd_first"] == bad and res["arrow"] == " \u25bc"
    assert res["kept"] and res["moved"] == 1


def test_ct_is_windowed_in_hounsfield_units_with_presets(tmp_path):
    """An int16 CT is stored exactly (two bytes a voxel): the soft-tissue preset (W 400, L 40) draws water
    (0 HU) mid-grey, air black and bone white, and the readout gives the voxel's HU."""
    from medseg.evaluation.viewer import ViewWriter

    ct = np.full((3, 1, 16, 16), -1000, np.int16)  # air
    ct[:, 0, 4:12, 4:12] = 0  # water
    ct[:, 0, 6:8, 6:8] = 1200  # bone
    m = np.zeros((3, 1, 16, 16), np.uint8)
    w = ViewWriter(["organ"], 3)
    w.add_case("ct", "p", ct, m, m, (2.0, 1.0, 1.0), {}, affine=np.diag([-1.0, -1.0, 2.0, 1.0]))
    page = w.write(tmp_path / "ct.html", "ct")
    data = view_data(page.read_text())
    assert data["cases"][0]["raw"] == {"offset": -1000, "min": -1000, "max": 1200}
    res = _chromium(page, """
      await V.openCase('ct'); V.toggle('cross', false); V.goTo({x: 6, y: 6, z: 1});
      out.disabled = Array.from(document.getElementById('preset').options).filter(o => o.disabled).length;
      V.preset('400,40');
      const [bi, bj] = V.screenOf('axial', [6, 6, 1]), [wi, wj] = V.screenOf('axial', [10, 10, 1]);
      out.bone = V.pixel('axial', bi, bj); out.water = V.pixel('axial', wi, wj); out.air = V.pixel('axial', 0, 0);
      out.read = V.readout('axial', wi, wj); out.wl = document.getElementById('wl').textContent;
    """, tmp_path / "probe.html")
    assert res["disabled"] == 0  # HU: every preset applies
    assert res["bone"][0] == 255 and res["air"][0] == 0 and abs(res["water"][0] - 102) <= 1  # (0 - (40 - 400 / 2)) / 400 * 255
    assert "value 0 |" in res["read"] and res["wl"] == "W 400 L 40"


def test_every_channel_of_a_three_channel_image_can_be_shown_in_fewer_bytes(tmp_path):
    """LGG's three channels go into one colour JPEG (no chroma subsampling), no larger than the one grey
    channel the view stored before; switching channel draws that channel's pixels."""
    import tifffile

    from conftest import FIXTURES
    from medseg.evaluation.viewer import JPEG_QUALITY, ViewWriter, _data_uri, mosaic, to_bytes

    folder = FIXTURES / "lgg" / "kaggle_3m" / "TCGA_HT_7860_19960513"
    files = sorted((f for f in folder.glob("*.tif") if not f.name.endswith("_mask.tif")), key=lambda f: int(f.stem.split("_")[-1]))
    image = np.stack([tifffile.imread(f) for f in files]).transpose(0, 3, 1, 2)
    masks = np.stack([tifffile.imread(f.with_name(f.stem + "_mask.tif")) > 0 for f in files])[:, None].astype(np.uint8)
    w = ViewWriter(["tumor"], 2, "px")
    w.add_case("lgg", "p", image, masks, masks, None, {})
    case = w.cases[0]
    assert case["channels"] == ["channel 1", "channel 2", "channel 3"] and case["display"] == w.channel
    before = _data_uri(mosaic(to_bytes(image[:, w.channel])[0])[0], "jpeg")  # the one grey channel, at 85
    assert JPEG_QUALITY == 85 and len(case["img"]) <= len(before)
    page = w.write(tmp_path / "lgg.html", "lgg")
    z = int(masks.sum(axis=(1, 2, 3)).argmax())
    res = _chromium(page, f"""
      await V.openCase('lgg'); V.toggle('cross', false); V.toggle('pred', false); V.toggle('truth', false); V.setSlice({z});
      out.chan = V.state.chan; const px = [];
      for (let k = 0; k < 3; k++) {{ V.channel(k); px.push(V.pixel('axial', 128, 128)[0]); }} out.px = px;
    """, tmp_path / "probe.html")
    want = [int(to_bytes(image[:, k])[0][z, 128, 128]) for k in range(3)]
    assert res["chan"] == w.channel
    assert all(abs(a - b) <= 16 for a, b in zip(res["px"], want)), (res["px"], want)
    assert len(set(want)) > 1 and len(set(res["px"])) > 1  # the channels differ there, and so does the drawing


def test_a_zoomed_plane_scrolls_inside_its_box(tmp_path):
    """At the largest zoom the planes overflow their box, which scrolls (pans) instead of pushing the table
    off the page."""
    page = _oriented_view(tmp_path)
    res = _chromium(page, """
      await V.openCase('second'); document.getElementById('zoom').value = 12; V.setSlice(4);
      const box = document.getElementById('planes-box'), st = getComputedStyle(box);
      out.overflow = st.overflow; out.scrolls = box.scrollWidth > box.clientWidth || box.scrollHeight > box.clientHeight;
      out.fits = box.getBoundingClientRect().width <= window.innerWidth;
    """, tmp_path / "probe.html")
    assert res["overflow"] == "auto" and res["scrolls"] and res["fits"]
