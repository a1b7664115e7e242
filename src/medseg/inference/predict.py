"""``medseg predict MODEL INPUT OUTPUT``: segment every case a reader finds in INPUT, write OUTPUT in
the input's own layout (each reader's ``write_prediction``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medseg.data.formats import FORMATS, get_reader, guess_format
from medseg.data.formats.base import case_path
from medseg.errors import MedsegError, warn
from medseg.inference.pipeline import model_channels
from medseg.inference.postprocess import check_probability
from medseg.inference.segmenter import Segmenter
from medseg.machine import resolve_device


def shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process when a launcher started several (torchrun sets
    RANK/WORLD_SIZE/LOCAL_RANK, SLURM's srun SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); (0, 1, 0) alone."""
    import os

    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in os.environ and world in os.environ:
            try:
                return int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, os.environ[rank]))
            except ValueError:
                raise MedsegError(f"{rank}={os.environ[rank]!r}, {world}={os.environ[world]!r}: not process numbers") from None
    return 0, 1, 0

def parse_flips(text: str) -> list[list[int]]:
    """``"-1;-2;-1,-2"`` -> ``[[-1], [-2], [-1, -2]]``: TTA flips as groups of spatial axes (negative,
    counted from the last: -1 width, -2 height, -3 depth)."""
    out: list[list[int]] = []
    for group in (g.strip() for g in text.split(";")):
        if not group:
            continue
        try:
            axes = [int(a) for a in group.split(",")]
        except ValueError:
            axes = []
        if not axes or any(a not in (-1, -2, -3) for a in axes) or len(set(axes)) != len(axes):
            raise MedsegError(f"bad TTA flip {group!r}: expected axes -1 (width), -2 (height) or -3 (depth), "
                              "comma-separated, groups separated by ';' (e.g. '-1;-2;-1,-2')")
        out.append(axes)
    if not out:
        raise MedsegError("empty --tta-flips: give at least one group, e.g. '-1;-2'")
    return out


def parse_weights(text: str) -> list[float]:
    """``"0.6,0.4"`` -> ``[0.6, 0.4]`` (ensemble weights)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MedsegError(f"bad --weights {text!r}: expected numbers separated by commas, e.g. 0.6,0.4") from None


def parse_probabilities(text: str | None, option: str) -> float | list[float] | None:
    """``"0.5"`` -> 0.5, ``"0.5,0.3,0.4"`` -> per-class list (``--presence``, ``--threshold``)."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise MedsegError(f"bad {option} {text!r}: expected a number or one per class separated by commas") from None
    for v in vals:
        check_probability(v, option)
    return vals[0] if len(vals) == 1 else vals


_LOCK = ".medseg-lock"
_STAGE = ".partial-"


def _ours(p: Path) -> bool:
    """predict's own bookkeeping in OUT: the lock and staging folders, not results."""
    return p.name.startswith((_LOCK, _STAGE))


class _OutputLock:
    """One writer per OUT: an exclusive lock on ``OUT/.medseg-lock`` (one per shard of a sharded run), so
    that a second ``predict`` into the same folder fails at once instead of interleaving its masks. The
    lock dies with its process; staging folders of a run that died are removed by the next."""

    def __init__(self, output: Path, rank: int, world: int):
        self.path = output / (_LOCK if world == 1 else f"{_LOCK}-{rank}")
        self.world = world
        self.fd: int | None = None

    def __enter__(self) -> "_OutputLock":
        import fcntl
        import os
        import shutil

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(self.fd, 64).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            raise MedsegError(f"another medseg predict is writing into this folder{f' (process {other})' if other else ''}",
                              self.path.parent, hint="wait for it, or choose another output folder") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        if self.world == 1:  # no other writer now: every staging folder here is a dead run's
            for p in self.path.parent.glob(f"{_STAGE}*"):
                shutil.rmtree(p, ignore_errors=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        import os

        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)


def _check_output(output: Path, overwrite: bool, input: Path | None = None) -> None:
    if output.exists() and not output.is_dir():
        raise MedsegError("output exists and is not a folder", output)
    if input is not None and output.exists():
        src = input.resolve() if input.is_dir() else input.resolve().parent
        if output.resolve() == src:  # masks named like their images would replace them
            raise MedsegError("the output folder is the input folder; predictions could replace the images",
                              output, hint="choose another output folder")
    if output.is_dir() and any(not _ours(p) for p in output.iterdir()) and not overwrite:
        raise MedsegError(
            "output folder already holds files",
            output,
            hint="pass --overwrite to write into it (only the files medseg writes are replaced; nothing is deleted), "
            "or choose an empty folder",
        )


def predict(
    model: str | Path | Segmenter,
    input: str | Path,
    output: str | Path,
    fmt: str | None = None,
    folds: str = "best",
    tta: bool | list[list[int]] | None = None,
    save_probabilities: bool = False,
    overwrite: bool = False,
    console: Any = None,
    backend: str = "auto",
    postprocess: dict[str, Any] | None = None,
    progress: bool | None = None,
    weights: list[float] | None = None,
    device: str = "auto",
    write_as: str | None = None,
    unfinished: bool = False,
    options: dict[str, Any] | None = None,
    quality: bool = False,
    save_uncertainty: bool = False,
    review_below: float | None = None,
) -> list[Path]:
    """Segment every case of ``input`` with ``model`` and write the masks under ``output``; return the files.

    ``model`` may name several models (``"runs/a,runs/b"`` or a list): the ``weights``-weighted mean of
    their probabilities (``Segmenter.load``), or be a loaded ``Segmenter`` (then ``folds``, ``tta``, ``backend``,
    ``weights`` and ``device`` are its own), reused across calls. ``write_as``: the output form where a
    layout has several (DICOM: ``nifti``, ``seg`` or ``rtstruct``). ``quality``: also write ``quality.csv``
    and ``quality.json`` (``medseg.inference.quality``: signals, predicted Dice and a review flag per case and
    structure, flagged below ``review_below``, default the model's or 0.7); ``save_uncertainty``: each
    voxel's share of views that disagree with the mask, written as the layout writes probabilities."""
    import sys

    input, output = Path(input), Path(output)
    t0 = time.perf_counter()
    if save_uncertainty and save_probabilities:
        raise MedsegError("--save-uncertainty and --save-probabilities write the same files: choose one")
    if review_below is not None:
        check_probability(review_below, "--review-below")
    quality = quality or save_uncertainty
    fmt = fmt or guess_format(input)
    # the input's errors come before the model's: the channel count is peeked, the model loaded later
    loaded = isinstance(model, Segmenter)
    n = (len(model.channels) if loaded else model_channels(model, folds)) if fmt in ("folder", "coco") else None
    options = {**FORMATS.get(fmt).options_for_model(n), **(options or {})}
    if write_as is not None:  # how a layout with several output forms writes its masks (DICOM: nifti or seg)
        if "write_as" not in FORMATS.get(fmt).Options.model_fields:
            raise MedsegError(f"--as is for inputs with several output forms (DICOM); {fmt} predictions are written "
                              "in the input's own layout")
        options = {**options, "write_as": write_as, "algorithm": Path(str(model)).name if not loaded else model.name}
    reader = get_reader(fmt, **options)
    spec = reader.survey(input, require_masks=False)
    _check_output(output, overwrite, input)
    rank, world, local = shard()
    if world > 1:  # one of several processes (torchrun, srun): every world-th case, on this process's GPU
        if reader.aggregate_files:
            raise MedsegError(f"{fmt} predictions gather every case in {', '.join(reader.aggregate_files)}: "
                              "predict them in one process, not sharded")
        import dataclasses
        import torch

        spec = dataclasses.replace(spec, cases=spec.cases[rank::world])
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
    seg = model if loaded else Segmenter.load(model, folds=folds, tta=tta, backend=backend, weights=weights,
                                              device=resolve_device(device), unfinished=unfinished)
    if write_as is not None and not getattr(reader.options, "classes", None):
        reader.options.classes = list(seg.classes)  # a SEG's segments and an RTSTRUCT's ROIs are named after them
    import os
    import shutil

    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        with _OutputLock(output, rank, world):
            # every file goes to a hidden staging folder and moves into OUT only when every case is done:
            # a failure or Ctrl-C leaves OUT as it was
            stage = output / f"{_STAGE}{os.getpid()}"
            try:
                who = f" (process {rank + 1} of {world})" if world > 1 else ""
                q = {"on": quality, "uncertainty": save_uncertainty, "below": review_below} if quality else None
                return _run(seg, reader, spec, fmt, output, stage, save_probabilities, console, postprocess, progress,
                            t0, who, q)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        if created and output.is_dir() and not any(not _ours(p) for p in output.iterdir()):
            shutil.rmtree(output, ignore_errors=True)  # nothing true was written: leave nothing behind
        raise


def _publish(stage: Path, output: Path, files: list[Path]) -> list[Path]:
    """Move the staged files into ``output`` (same file system: each a rename), keeping their relative
    paths; files a reader wrote elsewhere stay where they are."""
    import os

    out = []
    for f in dict.fromkeys(Path(f) for f in files):  # a submission is named once per case
        try:
            dst = output / f.relative_to(stage)
        except ValueError:
            out.append(f)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dst)
        out.append(dst)
    return out


def _run(seg: Any, reader: Any, spec: Any, fmt: str, output: Path, stage: Path, save_probabilities: bool, console: Any,
         postprocess: dict[str, Any] | None, progress: bool | None, t0: float, who: str = "",
         quality: dict[str, Any] | None = None) -> list[Path]:
    import sys

    from medseg.inference import quality as qm
    from medseg.inference import quality_files as qf

    stage.mkdir()
    written: list[Path] = []
    n_slices = 0
    if seg.spec.input.spacing and not reader.has_spacing:
        warn(f"the {fmt} layout stores no voxel size: the volumes are used as they are, not resampled to the "
             f"model's {seg.spec.input.spacing} mm", spec.root)
    show = (console is not None and sys.stderr.isatty()) if progress is None else progress
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]predict[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=console, transient=True)
    else:
        bar = None
    # slices, not cases: one patient's volume is the whole job for a single-case input
    total = sum(reader.slice_count(spec, c) for c in spec.cases) if show else 0
    task = bar.add_task("", total=total, unit="slices") if bar else None
    if bar:
        bar.start()
    # reading the next case and writing the last one overlap the network's work on this one (one thread
    # each: a reader's writes stay in case order, as a submission that appends needs)
    from concurrent.futures import ThreadPoolExecutor

    qrows: list[dict[str, Any]] = []
    if quality:
        _, cal = qm.quality_of(seg)
        below = quality["below"]
        if below is None:
            below = next((float(m.spec.quality["review_below"]) for m in seg.members
                          if (m.spec.quality or {}).get("review_below") is not None), qm.REVIEW_BELOW)
        if qm.ensure_views(seg):
            warn(f"{seg.name} is one network without TTA: --quality compares flip TTA views "
                 f"({', '.join(str(f) for f in seg.flips)}), so the masks are TTA's")
        if cal is None:
            warn(f"{seg.name} carries no quality calibration (fit one with `medseg calibrate RUN`): predicted_dice is "
                 "the views' agreement with the mask, not a calibrated Dice")
        if quality["uncertainty"]:
            reader.map_name = "uncertainty"  # the maps are named for what they hold
        reader.notes = {}  # per case, a line per structure for the layouts that can carry one (RTSTRUCT, SEG)
    with ThreadPoolExecutor(1) as loads, ThreadPoolExecutor(1) as writes:
        pending = []
        try:
            ahead = loads.submit(reader.read, spec, spec.cases[0]) if spec.cases else None
            for i, case in enumerate(spec.cases):
                data = ahead.result()
                if i + 1 < len(spec.cases):
                    ahead = loads.submit(reader.read, spec, spec.cases[i + 1])
                where, spacing = case_path(case, spec), data.spacing if reader.has_spacing else None
                maps = None
                if quality:
                    pred, rows, unc = qm.predict_quality(seg, data.image, spec.spatial_dims, postprocess, where, spacing,
                                                         below, uncertainty=quality["uncertainty"])
                    qrows += [{"case": case.id, **r} for r in rows]
                    reader.notes[case.id] = [qf.note(r) for r in rows]
                    maps = unc if quality["uncertainty"] else (pred.prob if save_probabilities else None)
                else:
                    pred = seg.predict(data.image, probabilities=save_probabilities, spatial_dims=spec.spatial_dims,
                                       postprocess_overrides=postprocess, where=where, spacing=spacing)
                    maps = pred.prob if save_probabilities else None
                pending.append(writes.submit(reader.write_prediction, spec, case, pred.mask, stage, maps))
                n_slices += data.image.shape[0]
                if bar:
                    bar.update(task, advance=data.image.shape[0], description=case.id)
            for f in pending:
                written += f.result()
        finally:
            if bar:
                bar.stop()
    finish = getattr(reader, "finish_predictions", None)  # e.g. a submission CSV gathered over cases
    if callable(finish):
        written += list(finish(spec, stage) or [])
    if quality:
        written += qf.write_quality(qrows, stage, {"model": seg.name, "calibrated": cal is not None,
                                                   "review_below": below})
    # a submission built up over the cases replaces an earlier run's whole (--overwrite)
    written = _publish(stage, output, [Path(f) for f in written])
    dt = time.perf_counter() - t0
    if console is not None:
        console.print(
            f"[green]predicted[/]{who} {len(spec.cases)} case{'s' if len(spec.cases) != 1 else ''}, {n_slices} slices "
            f"with {seg.name} ({seg.backend}{' on ' + seg.device if seg.device != 'cpu' else ''}, {len(seg.nets)} fold{'s' if len(seg.nets) != 1 else ''}"
            f"{', weights ' + ','.join(f'{w:.3g}' for w in seg.weights) if seg.is_ensemble else ''}, "
            f"tta {'x' + str(1 + len(seg.flips)) if seg.flips else 'off'}) in {dt:.1f} s "
            f"({n_slices / max(dt, 1e-9):.1f} slices/s) -> {output}"
        )
        if quality:
            qf.print_review(qrows, below, console, output / "quality.csv")
    return written
