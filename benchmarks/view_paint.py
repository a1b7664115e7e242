"""How fast a view.html opens in headless Chromium, and how large it is.

    .venv/bin/python benchmarks/view_paint.py VIEW.html [OTHER.html ...] [--runs 3]

For each file: its size, the first contentful paint and the time until the case table is built (the
page's script has run), and the time to open the first case (decode its mosaics, draw every plane),
medians of ``--runs`` cold starts (a fresh browser profile each). Prints a table and writes
benchmarks/results/view_paint.json.

To compare the view before and after a change on the same data, write both files from the same
predictions (``medseg view PRED TRUTH --out ...`` with each version) and pass both.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("<script>(async function(){const t0=performance.now();const V=window.medsegView;"
         "const fcp=(performance.getEntriesByType('paint').find(e=>e.name==='first-contentful-paint')||{}).startTime;"
         "const ready=performance.now();const id=V.data.cases.find(c=>!c.missing).id;const a=performance.now();"
         "await V.openCase(id);const opened=performance.now()-a;"
         "const p=document.createElement('pre');p.id='bench';"
         "p.textContent=JSON.stringify({fcp:fcp===undefined?null:fcp,table:ready,open_case:opened});"
         "document.body.appendChild(p);})();</script>")


def measure(page: Path, runs: int) -> dict:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as profile:
                dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                                      "--virtual-time-budget=60000", "--dump-dom", probe.as_uri()],
                                     capture_output=True, text=True, timeout=300).stdout
            rows.append(json.loads(dom.split('<pre id="bench">')[1].split("</pre>")[0].replace("&quot;", '"')))
    med = {k: statistics.median(r[k] for r in rows if r[k] is not None) if any(r[k] is not None for r in rows) else None
           for k in rows[0]}
    return {"file": page.name, "mb": round(page.stat().st_size / 2**20, 1), "cases": len(json.loads(
        page.read_text().split('<script id="data" type="application/json">')[1].split("</script>")[0])["cases"]),
            **{f"{k}_ms": None if v is None else round(v) for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pages", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    out = [measure(p, a.runs) for p in a.pages]
    keys = list(out[0])
    print("  ".join(f"{k:>14}" for k in keys))
    for r in out:
        print("  ".join(f"{str(r[k]):>14}" for k in keys))
    res = {"machine": platform.machine(), "runs": a.runs, "rows": out}
    (ROOT / "benchmarks" / "results" / "view_paint.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
