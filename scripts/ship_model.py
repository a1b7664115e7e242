"""Turn a trained ``model.pt`` into a shipped model: fp16 weights under ``src/medseg/weights/NAME.pt``.

    .venv/bin/python scripts/ship_model.py runs/lgg_unet_ship/full/model.pt lgg-unet [--card docs/models/lgg-unet.md]
        [--postprocess-from runs/lgg_unet]

A model trained on every case (``--fold full``) has no validation to tune on: ``--postprocess-from``
takes the post-processing ``medseg tune`` chose on a cross-validation run of the same recipe (the run,
its ``tune.json``, or a JSON file that keeps that choice: ``experiments/lgg/lgg_postprocess*.json``).

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
from medseg.errors import MedsegError
from medseg.evaluation.tune import tune_file, tuned_rules
from medseg.text import portable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("name", choices=sorted(SHIPPED))
    ap.add_argument("--card", default=None, help="the model card (docs path) recorded in the bundle")
    ap.add_argument("--postprocess-from", type=Path, default=None,
                    help="a tuned cross-validation run, its tune.json, or a JSON file of the same shape")
    a = ap.parse_args()
    b = load_bundle(a.bundle)
    tuned = None
    if a.postprocess_from is not None:
        b["postprocess"] = {**b.get("postprocess", {}), **tuned_rules(a.postprocess_from)}
        f = tune_file(a.postprocess_from)
        t = json.loads(f.read_text())
        # where the rules were chosen, and how they scored there (a kept choice names its run and scores)
        tuned = {"from": portable(f), **{k: (portable(t[k]) if k == "run" else t[k])
                                          for k in ("run", "folds", "score_before", "score", "nested_score", "note") if k in t}}
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
                 "postprocess_tuned_on": tuned}
    out = save_bundle(b, WEIGHTS_DIR / SHIPPED[a.name], half=True)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB (fp16), sha256 {digest}")


if __name__ == "__main__":
    try:
        main()
    except MedsegError as e:
        raise SystemExit(f"error: {e}") from None
