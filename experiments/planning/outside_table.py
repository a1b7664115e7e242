"""docs/planning.md's tables from results/outside.json, shared_budgets.json and outside_ablations.json.

    python experiments/planning/outside_table.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results"
BUDGETS = ("15", "60", "120")


def _cell(entry: dict | None) -> str:
    return "—" if entry is None else f"{entry['mean_dice']:.3f}"


def main() -> None:
    res = json.loads((HERE / "outside.json").read_text())
    shared = HERE / "shared_budgets.json"
    rows = list(res.items()) + (list(json.loads(shared.read_text()).items()) if shared.exists() else [])
    print("| data set | test patients | reference Dice | 0.95 × reference | plan, 15 / 60 / 120 CPU-min |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        plan = r.get("plan_dice", {})
        cells = " / ".join(_cell(plan.get(b)) for b in BUDGETS)
        ref = r.get("reference_dice")
        refs = f"{ref:.3f} | {0.95 * ref:.3f}" if ref else "none published | —"
        print(f"| {r.get('name', name)} | {len(r.get('test_patients', []))} | {refs} | {cells} |")
    abl = HERE / "outside_ablations.json"
    if abl.exists():
        print()
        print("| data set | budget | plan | Dice | the plan's geometry |")
        print("|---|---|---|---|---|")
        for name, tags in json.loads(abl.read_text()).items():
            for tag, by in tags.items():
                for m, e in by.items():
                    now = res.get(name, {}).get("plan_dice", {}).get(m)
                    for label, x in (("now", now), (tag.replace("_", " "), e)):
                        if x:
                            p = x["plan"]
                            geo = (f"{'x'.join(map(str, p['size']))} {'resized' if p['resize'] else 'crops'}, batch "
                                   f"{p['batch']}, widths {p['widths'][0]}..{p['widths'][-1]}")
                            print(f"| {name} | {m} min | {label} | {x['mean_dice']:.3f} | {geo} |")


if __name__ == "__main__":
    main()
