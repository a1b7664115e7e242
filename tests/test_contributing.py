"""CONTRIBUTING.md's example reader runs as written: prepare reads a data set with it."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from conftest import ROOT


def test_the_example_format_is_short_and_works(tmp_path: Path):
    text = (ROOT / "CONTRIBUTING.md").read_text()
    code = re.search(r"## Adding a data format.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) < 40  # the whole reader, imports included
    from medseg.data.formats import FORMATS

    import importlib.util
    import sys

    (tmp_path / "npz_format.py").write_text(code)
    spec = importlib.util.spec_from_file_location("npz_format", tmp_path / "npz_format.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["npz_format"] = module
    try:
        spec.loader.exec_module(module)
        rng = np.random.default_rng(0)
        (tmp_path / "data").mkdir()
        for i in range(4):
            lab = np.zeros((2, 16, 16), np.uint8)
            lab[:, 4:9, 4:9] = 1
            np.savez(tmp_path / "data" / f"p{i // 2}_t{i % 2}.npz", image=rng.random((2, 1, 16, 16)).astype(np.float32), mask=lab)
        from medseg.data.prepare import prepare
        from medseg.data.prepared import PreparedDataset

        out = prepare("npz", tmp_path / "data", tmp_path / "prep", folds=2, workers=1,
                      options={"patient_regex": r"^(p\d+)_"})
        ds = PreparedDataset.open(out)
        assert ds.patients == ["p0", "p1"] and int(np.asarray(ds.mask(0)).sum()) == 2 * 25
    finally:
        FORMATS._entries.pop("npz", None)
        sys.modules.pop("npz_format", None)
