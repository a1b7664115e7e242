"""report.html: parsed for its sections (always) and rendered in headless Chromium (when installed)."""
from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg.evaluation.evaluate import build_summary
from medseg.evaluation.metrics import case_metrics
from medseg.evaluation.report import pick_cases, write_report

CLASSES = ["stomach", "large_bowel"]


class Parsed(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.rows = 0
        self._table: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("link", "script", "a") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if tag == "table":
            self._table.append(a.get("id", ""))
        if tag == "tr" and self._table and self._table[-1] == "cases-table":
            self.rows += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()


def make_report(tmp: Path, curves: bool = True) -> Path:
    rng = np.random.default_rng(0)
    rows, shown, scores = [], [], {}
    for i in range(5):
        truth = np.zeros((4, 2, 32, 32), np.uint8)
        truth[1:3, 0, 8:20, 8:20] = 1
        truth[1:4, 1, 18:28, 4:14] = 1
        pred = np.roll(truth, i, axis=3)
        for k, r in enumerate(case_metrics(pred, truth, spacing=(2.0, 1.0, 1.0))):
            rows.append({"case_id": f"case{i}", "patient": f"p{i // 2}", "class": CLASSES[k], **r})
        scores[f"case{i}"] = float(np.mean([r["dice"] for r in rows[-2:]]))
        image = rng.integers(0, 1000, (4, 1, 32, 32)).astype(np.int16)
        if i < 3:
            shown.append((f"ex{i}", f"case{i}", scores[f"case{i}"], image, truth, pred))
    summary = build_summary(rows, CLASSES, empty="skip", nsd_tolerance=1.0)
    summary.update(pred="p", truth="t")
    cv = {}
    if curves:
        f = tmp / "metrics.csv"
        f.write_text("epoch,train_loss,val_loss,val_dice_stomach,val_dice_large_bowel,lr\n"
                     + "".join(f"{e},{1 / (e + 1)},{1.1 / (e + 1)},{e / 10},{e / 12},0.01\n" for e in range(6)))
        cv = {"fold_0": f}
    return write_report(tmp / "report.html", summary, rows, CLASSES, shown, curves=cv)


def test_pick_cases():
    assert pick_cases({"a": 0.5, "b": 0.9, "c": 0.1}) == [("best", "b"), ("median", "a"), ("worst", "c")]
    assert pick_cases({"a": 0.5}) == [("best", "a")]
    assert pick_cases({}) == []


def test_report_sections_and_self_contained(tmp_path: Path):
    text = make_report(tmp_path).read_text()
    p = Parsed(text)
    for section in ("summary", "summary-table", "patient-table", "plots", "examples", "curves", "cases", "cases-table",
                    "conventions"):
        assert section in p.ids, section
    assert p.rows == 1 + 5 * 2  # header + one row per case x class
    assert p.links == []  # nothing fetched: no external script, stylesheet or link
    assert len(p.imgs) == 1 + 3 + 1  # box plots, three overlays, one fold's curves
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in text.replace("http-equiv", "")
    assert "stomach" in text and "large_bowel" in text
    no_curves = Parsed(make_report(tmp_path, curves=False).read_text())
    assert "curves" not in no_curves.ids


def test_report_renders_in_chromium(tmp_path: Path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the HTML is still checked by the parse test")
    report = make_report(tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([exe, *flags, f"--user-data-dir={profile}", "--dump-dom", report.as_uri()],
                             capture_output=True, text=True, timeout=120)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,1800",
                        report.as_uri()], capture_output=True, timeout=120)
    parsed = Parsed(dom.stdout)
    for section in ("summary", "plots", "examples", "curves", "cases", "conventions"):
        assert section in parsed.ids, section
    # the inline sorting script works: click the Dice header twice (ascending, then descending)
    click = "<script>var h=document.querySelectorAll('#cases-table th')[5];h.click();h.click();</script>"
    sorted_page = tmp_path / "sorted.html"
    sorted_page.write_text(report.read_text().replace("</body>", click + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        dom2 = subprocess.run([exe, *flags, f"--user-data-dir={profile}", "--dump-dom", sorted_page.as_uri()],
                              capture_output=True, text=True, timeout=120).stdout
    body = dom2.split("id=\"cases-table\"")[1].split("</tbody>")[0]
    dice = [float(row.split("<td>")[6].split("</td>")[0]) for row in body.split("<tr>")[2:]]
    assert len(dice) == 10 and dice == sorted(dice, reverse=True) and dice[0] > dice[-1]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (1800, 1280)
    assert img.std() > 20  # not a blank page: text, plots and overlays were drawn


def test_the_report_draws_classes_in_the_views_colours():
    from medseg.evaluation.report import _colours
    from medseg.evaluation.viewer import COLOURS

    got = _colours(3)
    assert [tuple(round(v * 255) for v in c) for c in got] == [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in COLOURS[:3]]


def test_names_from_files_are_text_in_the_report(tmp_path: Path):
    """A case id, patient and class name holding markup (a NIfTI named so, a DICOM PatientName) are
    escaped in report.html: no element of theirs is created."""
    bad = "<img src=x onerror=document.title=42>"
    truth = np.zeros((2, 1, 16, 16), np.uint8)
    truth[:, 0, 4:9, 4:9] = 1
    rows = [{"case_id": bad, "patient": "p'<b>", "class": "<i>c</i>", **r}
            for r in case_metrics(truth, truth, spacing=(1.0, 1.0, 1.0))]
    summary = build_summary(rows, ["<i>c</i>"], empty="skip", nsd_tolerance=1.0)
    summary.update(pred=bad, truth="t")
    image = np.zeros((2, 1, 16, 16), np.int16)
    page = write_report(tmp_path / "report.html", summary, rows, ["<i>c</i>"], [("best", bad, 1.0, image, truth, truth)]).read_text()
    parsed = Parsed(page)
    assert not any(src == "x" for src in parsed.imgs) and "<i>c</i>" not in page and "p'<b>" not in page
    assert "&lt;img src=x onerror=document.title=42&gt;" in page
