"""The README cannot rot: its "Your own data" commands run as written (paths pointed at small real data
made here, the 30-minute budget cut to seconds), its Python line runs, every page it links exists, every
figure in its results has a linked source, and the command line says what the README says."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from test_bad_inputs import run_cli

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_readme_is_short_and_its_links_exist():
    assert len(README.splitlines()) <= 110
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    for row in section("Results").splitlines():
        if row.startswith("| ") and re.search(r"\d\.\d", row):
            assert re.search(r"\]\((docs/[^)]+)\)", row), f"a figure without a linked source: {row}"


def _nifti(tmp: Path) -> Path:
    dst = tmp / "my_nifti"
    shutil.copytree(FIXTURES / "nifti", dst)
    return dst


def _export(tmp: Path) -> Path:
    """Two patients' DICOM series (the hippocampus MR fixture, new UIDs each) with a structure set of two
    ROIs named as the README's example names them."""
    import pydicom
    from pydicom.uid import generate_uid

    from medseg.data.formats import get_reader
    from medseg.data.formats.dicom_rtstruct import write_rtstruct

    r = get_reader("dicom", masks="masks")
    spec = r.scan(FIXTURES / "dicom")
    files, mask = spec.cases[0].sources["files"], r.load(spec, spec.cases[0]).mask
    root = tmp / "my_export"
    for patient in ("A", "B"):
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        out = []
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.PatientID, ds.PatientName = f"patient{patient}", f"Doe^{patient}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            p = root / patient / "CT" / f"IM{i:04d}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(p)
            out.append(p)
        write_rtstruct(out, mask, ["Heart", "Lung_L"], root / patient / "RS.dcm")
    return root


def _images(tmp: Path) -> Path:
    from PIL import Image

    root = tmp / "my_images"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(6, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = (rng.random((64, 64)) * 60 + 120 * disc).astype(np.uint8)
        for sub, a in (("images", img), ("masks", disc.astype(np.uint8) * 255)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / sub / f"img{i}.png")
    return root


@pytest.mark.parametrize("layout,make", [("nifti", _nifti), ("dicom", _export), ("folder", _images)])
def test_your_own_data_runs_as_written(layout, make, tmp_path, monkeypatch, capsys):
    block = next(b for b in blocks(section("Your own data"), "bash") if f"medseg prepare {layout} " in b)
    data = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert [shlex.split(ln)[1] for ln in lines] == ["prepare", "train", "predict", "evaluate"]
    for ln in lines:
        args = shlex.split(ln.split("  #")[0])[1:]
        args = ["0.1" if a == "30" and args[i - 1] == "--minutes" else a for i, a in enumerate(args)]  # seconds, not 30 min
        code, err = run_cli(monkeypatch, capsys, args)
        assert code == 0, f"{ln}\n{err}"
    ev = shlex.split(lines[3])
    assert (tmp_path / ev[ev.index("--out") + 1] / "view.html").is_file()
    assert str(data.relative_to(tmp_path)) + "/" in block  # the block names the data made for it


def test_the_python_line_runs():
    code = blocks(README, "python")[0].replace('"patient_folder_or_array"',
                                                repr(str(FIXTURES / "lgg_tiny" / "kaggle_3m" / "TCGA_CS_5393_19990606")))
    scope: dict = {}
    exec(code, scope)
    assert scope["pred"].mask.shape == scope["pred"].prob.shape == (4, 1, 256, 256)


def test_medseg_alone_prints_the_route_and_every_help_ends_with_an_example(monkeypatch, capsys):
    from typer.testing import CliRunner

    from medseg.cli import EXAMPLES, app

    out: list[str] = []
    code, _ = run_cli(monkeypatch, capsys, [], out)
    assert code == 0 and "four commands" in out[0]
    for step in ("medseg prepare", "medseg train", "medseg predict", "medseg evaluate"):
        assert step in out[0]
    for name in EXAMPLES:
        text = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        lines = [ln.strip(" │") for ln in text.splitlines() if ln.strip(" │")]
        start = max(i for i, ln in enumerate(lines) if ln.startswith("Example: "))
        assert " ".join(lines[start:]) == f"Example: {EXAMPLES[name]}", (name, lines[start:])  # the last thing said
    for step in ("prepare", "train", "predict", "evaluate"):  # the route is the README's, word for word
        assert EXAMPLES[step] in README, step
