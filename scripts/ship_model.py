"""Turn a trained ``model.pt`` into a shipped model: fp16 weights under ``src/medseg/weights/NAME.pt``.

    .venv/bin/python scripts/ship_model.py runs/lgg_unet_ship/full/model.pt lgg-unet [--card docs/models/lgg-unet.md]
        [--postprocess-from runs/lgg_unet]

A model trained on every case (``--fold full``) has no validation to tune on: ``--postprocess-from``
takes the post-processing ``medseg tune`` chose on a cross-validation run of the same recipe.

Keeps the architecture, classes and pre/post-processing; drops what only mattered to training
(validation scores, dataset path); records the source run and the model card.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from medseg.bundle import load_bundle, save_bundle
from medseg.bundle import SHIPPED, WEIGHTS_DIR


def portable(path: str | Path) -> str:
    """A path as recorded in a shipped model: relative to the working directory, or its last two parts
    (a shipped file names no machine's folders)."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*p.parts[-2:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("name", choices=sorted(SHIPPED))
    ap.add_argument("--card", default=None, help="the model card (docs path) recorded in the bundle")
    ap.add_argument("--postprocess-from", type=Path, default=None, help="a tuned cross-validation run (RUN/tune.json)")
    a = ap.parse_args()
    b = load_bundle(a.bundle)
    tuned = None
    if a.postprocess_from is not None:
        tuned = json.loads((a.postprocess_from / "tune.json").read_text())
        b["postprocess"] = dict(load_bundle(a.postprocess_from / f"fold_{tuned['folds'][0]}" / "model.pt")["postprocess"])
    meta = b.get("meta", {})
    prepared = Path((meta.get("config") or {}).get("data", {}).get("prepared", ""))
    info = json.loads((prepared / "dataset.json").read_text()) if (prepared / "dataset.json").is_file() else {}
    # the patients it learned from, so that anyone can check an evaluation set against them
    patients = sorted({c["patient"] for c in info.get("cases", [])})
    config = dict(meta.get("config") or {})
    if config.get("data", {}).get("prepared"):
        config["data"] = {**config["data"], "prepared": portable(config["data"]["prepared"])}
    b["meta"] = {"name": a.name, "card": a.card, "trained_from": portable(a.bundle), "epoch": meta.get("epoch"),
                 "fold": meta.get("fold"), "config": config, "precision": meta.get("precision"),
                 "members": meta.get("members"), "fingerprint": meta.get("fingerprint"),
                 "training_patients": patients,
                 "postprocess_tuned_on": None if tuned is None else {"run": portable(tuned["run"]), "folds": tuned["folds"],
                                                                     "score_before": tuned["score_before"],
                                                                     "score": tuned["score"]}}
    out = save_bundle(b, WEIGHTS_DIR / SHIPPED[a.name], half=True)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB (fp16), sha256 {digest}")


if __name__ == "__main__":
    main()
