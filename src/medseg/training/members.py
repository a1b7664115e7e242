"""``train.members`` > 1: a fold's members trained side by side, one process each, then merged into one
bundle that averages their probabilities, with the ensemble's validation predictions and scores."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medseg.atomic import atomic_write_text
from medseg.bundle import load_bundle, save_bundle
from medseg.config import ExperimentConfig, config_dict, dump_config, load_config
from medseg.errors import MedsegError, os_error_line, warning_lines
from medseg.machine import die_with
from medseg.rundir import RunDir
from medseg.scores import score_named
from medseg.training.fit import TrainingInterrupted, _replace_val_predictions, fit_fold
from medseg.training.module import dice_scores, overlap_counts, score_columns, to_masks
from medseg.training.task import Task, check_task


def fit_members(cfg: ExperimentConfig, task: Task, ds: Any, fold: int | str, fold_dir: Path, resume: bool,
                console: Any = None) -> dict[str, float]:
    """``train.members`` > 1: the fold's members (seeds seed, seed+1, ...) trained side by side, one
    process each with an equal share of the CPU threads, in ``fold_dir/member_i`` (each with its own
    config.yaml); then one bundle holding them all (``fold_dir/model.pt``) and the ensemble's
    validation predictions and scores."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    n = cfg.train.members
    threads = max(1, torch.get_num_threads() // n)
    procs = []
    for i in range(n):
        mdir = RunDir.member_dir(fold_dir, i)
        mdir.mkdir(parents=True, exist_ok=True)
        mcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + i, "members": 1, "devices": 1})})
        atomic_write_text(mdir / "config.yaml", dump_config(mcfg))
        # a fresh interpreter (not fork: this process may hold torch threads; not multiprocessing's
        # spawn: it re-imports the caller's script)
        args = [str(mdir / "config.yaml"), str(fold), str(mdir), str(threads), f"fold {fold} member {i}",
                "1" if resume else "0", "1" if console is not None else "0", str(i)]
        # own session: a Ctrl-C reaches this process only, which passes it on once (below)
        procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from medseg.training.members import _member_main; "
                                       "_member_main(sys.argv[1:])", *args], start_new_session=True))
    if console is not None:
        console.print(f"fold {fold}: {n} members side by side, {threads} thread{'s' if threads > 1 else ''} each",
                      highlight=False)

    def stop_all() -> None:  # SIGINT: each member checkpoints and exits as on Ctrl-C
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):  # one failed: the ensemble cannot be made
                stop_all()
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop_all()
        raise TrainingInterrupted(f"interrupted; the members' last checkpoints are in {fold_dir}/member_*/checkpoints; "
                                  "continue with --resume") from None
    codes = [p.returncode for p in procs]
    failed = sorted((c == 130, i) for i, c in enumerate(codes) if c != 0)  # the cause first, not a member stopped for it
    if failed:
        i = failed[0][1]
        raise MedsegError(f"member {i} of fold {fold} failed (exit code {codes[i]}; its error is printed above)",
                          RunDir.member_dir(fold_dir, i))
    return merge_members(cfg, task, ds, fold, fold_dir)

def _member_main(argv: list[str]) -> None:
    """The process of one member (``fit_members``): CONFIG FOLD MEMBER_DIR THREADS LABEL RESUME SHOW MEMBER."""
    import sys

    import torch

    config, fold, member_dir, threads, label, resume, show, member = argv
    die_with(os.getppid())  # a SIGKILLed train must not leave members writing checkpoints a --resume races
    torch.set_num_threads(int(threads))
    console = None
    if show == "1":  # plain lines, no live progress bar: several processes share the terminal
        from rich.console import Console

        console = Console(force_terminal=False, soft_wrap=True)
    try:
        with warning_lines():  # as the parent's: one ``warning:`` line each
            cfg = load_config(config)
            ds, task = check_task(cfg, Path(config))
            fit_fold(cfg, task, ds, fold if fold == "full" else int(fold), Path(member_dir), resume == "1", console,
                     label=label, member=int(member))
    except TrainingInterrupted:
        sys.exit(130)
    except MedsegError as e:
        print(f"error: {label}: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {label}: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)

def merge_members(cfg: ExperimentConfig, task: Task, ds: Any, fold: int | str, fold_dir: Path) -> dict[str, float]:
    """One bundle of the fold's trained members (member 0's, with the others' weights in ``members``)
    and, for a validated fold, the ensemble's validation predictions (the members' probabilities
    averaged, as inference averages them) and scores, which it returns."""
    import numpy as np
    import torch

    members = [RunDir.member_dir(fold_dir, i) for i in range(cfg.train.members)]
    bundles = [load_bundle(m / "model.pt") for m in members]
    scores: dict[str, float] = {}
    if fold != "full":
        store: dict[str, dict[str, Any]] = {}
        stats: list[Any] = []
        score = score_named(task.score)
        terms = np.zeros(4)
        for cid in ds.fold(fold)[1]:
            probs = []
            for m in members:
                with np.load(RunDir.val_prediction(m, cid)) as z:
                    probs.append(z["prob"].astype(np.float32))
            prob = np.mean(probs, axis=0)
            pred = to_masks(torch.from_numpy(prob), task.class_kind, cfg.postprocess.thresholds)
            truth = torch.from_numpy(np.array(ds.mask(ds.index(cid))))  # a copy: the memory map is read-only
            stats.append((task.patients[cid], *overlap_counts(pred, truth)))
            if score is not None:
                terms += score.case_terms(pred.numpy(), truth.numpy())
            store[cid] = {"prob": prob.astype(np.float16), "mask": pred.numpy()}
        scores = dice_scores(stats, task.classes)
        if score is not None:
            scores.update(score_columns(score, terms))
        _replace_val_predictions(fold_dir, store)
    bundle = dict(bundles[0], members=[b["state_dict"] for b in bundles[1:]])
    bundle["meta"] = {**bundles[0]["meta"], "config": config_dict(cfg), "scores": scores,
                      "members": [{"seed": b["meta"]["config"]["train"]["seed"], "epoch": b["meta"]["epoch"],
                                   "scores": b["meta"]["scores"], "precision": b["meta"].get("precision")} for b in bundles]}
    save_bundle(bundle, fold_dir / "model.pt")
    return scores
