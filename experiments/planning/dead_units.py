"""What a collapsed class's network looks like inside: for a trained 2D/2.5D run, every U-Net block's
share of dead units (channels whose activation is positive on under 1% of the validation pixels), and
each output's softmax mean and spread over the validation slices. Written to
experiments/planning/results/dead_units.json under the run's name.

    .venv/bin/python experiments/planning/dead_units.py RUN [--fold 0] [--cases 10]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from medseg.bundle import build_model, load_bundle
    from medseg.data.sampling import ValCases
    from medseg.rundir import RunDir
    from medseg.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--cases", type=int, default=10)
    a = ap.parse_args()
    fold = a.run / f"fold_{a.fold}"
    b = load_bundle(fold / "model.pt")
    model = build_model(b).eval()
    cfg = load_config(a.run / "config.yaml")
    rd = RunDir(a.run)
    from medseg.data.prepared import PreparedDataset

    ds = PreparedDataset.open(cfg.data.prepared)
    ids = rd.split_val_cases(a.fold, ds)[: a.cases]
    val = ValCases(cfg.data.prepared, ids, cfg.data, b["normalization"])
    acts: dict[str, list[np.ndarray]] = {}

    def hook(name):
        def f(_m, _i, out):
            x = out.detach().float()
            acts.setdefault(name, []).append((x > 0).float().mean(dim=(0, 2, 3)).numpy())
        return f

    for i, blk in enumerate(model.enc):
        blk.register_forward_hook(hook(f"enc{i}"))
    for i, blk in enumerate(model.dec):
        blk.register_forward_hook(hook(f"dec{i}"))
    probs = []
    d = int(b["input"].get("divisor", 16))
    with torch.no_grad():
        for n in range(len(val)):
            x = val[n]["image"]
            h, w = x.shape[-2:]
            x = torch.nn.functional.pad(x, (0, (-w) % d, 0, (-h) % d))
            p = torch.softmax(model(x), dim=1)[..., :h, :w]
            probs.append(p.numpy())
    out = {"blocks": {}, "outputs": {}}
    for name, v in acts.items():
        alive = np.mean(v, axis=0)  # share of pixels where each channel is positive
        out["blocks"][name] = {"channels": int(alive.size), "dead": int((alive < 0.01).sum()),
                               "alive_share": [round(float(s), 3) for s in alive]}
    names = ["background", *b["classes"]]
    flat = [q.transpose(1, 0, 2, 3).reshape(q.shape[1], -1) for q in probs]  # cases differ in size
    for j, nm in enumerate(names):
        v = np.concatenate([f[j] for f in flat])
        out["outputs"][nm] = {"mean": float(v.mean()), "std": float(v.std()), "max": float(v.max())}
    for name, r in out["blocks"].items():
        print(f"{name:6s} {r['dead']:3d} of {r['channels']:3d} channels dead")
    for nm, r in out["outputs"].items():
        print(f"{nm:12s} softmax mean {r['mean']:.3f} std {r['std']:.3f} max {r['max']:.3f}")
    res = Path(__file__).resolve().parent / "results" / "dead_units.json"
    results = json.loads(res.read_text()) if res.exists() else {}
    results[a.run.name] = out
    res.write_text(json.dumps(results, indent=1))
    print(f"-> {res} [{a.run.name!r}]")


if __name__ == "__main__":
    main()
