"""A screenshot of a view.html case page, taken by headless Chromium (for docs/img/).

    python scripts/screenshot_view.py EVAL/view.html docs/img/view_case.png [--case ID] [--size 1400,900]

Opens ``--case`` (default: the case holding the largest error component) at that component's slice.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("view", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--case", default=None)
    ap.add_argument("--size", default="1400,900")
    a = ap.parse_args()
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("error: chromium is not installed")
    page = a.view.read_text()
    open_case = (f"V.openCase({json.dumps(a.case)})" if a.case else
                 "document.querySelector('#worst li[data-w]') ? (document.querySelector('#worst li[data-w]').click(), null) : "
                 "V.openCase(V.data.cases[0].id)")
    probe = f"<script>(function(){{const V=window.medsegView;{open_case};}})();</script>"
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "view.html"
        probed.write_text(page.replace("</body>", probe + "</body>"))
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", "--virtual-time-budget=20000", f"--window-size={a.size}",
                        f"--screenshot={a.out.resolve()}", probed.as_uri()], check=True, capture_output=True, timeout=180)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
