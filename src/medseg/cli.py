"""The ``medseg`` command line: a thin typer app that parses, then calls each stage's function."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medseg.errors import MedsegError, naming, os_error_line, warning_lines
from medseg.text import plural

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Medical image segmentation, fast on a CPU.",
                  epilog="Example: medseg prepare nifti my_nifti/ prepared/mine  (run `medseg` alone for the four-command route)")
console = Console()
# the last line of each command's --help: one command a user can adapt
EXAMPLES = {
    "formats": "medseg formats",
    "prepare": "medseg prepare nifti my_nifti/ prepared/mine",
    "inspect": "medseg inspect prepared/mine --overlay overlay.png",
    "models": "medseg models --benchmark",
    "plan": "medseg plan prepared/mine --minutes 60 --out plan.yaml",
    "train": "medseg train prepared/mine --auto --minutes 30 --fold full --out runs/mine",
    "evaluate": "medseg evaluate masks/ my_nifti/ --out eval/",
    "predict": "medseg predict runs/mine my_nifti/imagesTr/ masks/",
    "tune": "medseg tune runs/mine --tta",
    "calibrate": "medseg calibrate runs/mine",
    "view": "medseg view masks/ my_nifti/ --out view.html",
    "export": "medseg export runs/mine model.onnx",
}
_STEPS = {"prepare": "read your layout, split by patient", "train": "plan a network for it, train it",
          "predict": "masks in the input's own layout", "evaluate": "metrics, report.html, view.html"}
ROUTE = ("From a folder of scans to masks, in four commands (docs: README.md, \"Your own data\"):\n\n"
         + "\n".join(f"  {EXAMPLES[k]:<75}{what}" for k, what in _STEPS.items())
         + "\n\nLayouts: `medseg formats` (nifti, dicom, folder, lgg, uwmgi, coco). Every command: `medseg --help`.")


def _example(name: str) -> str:
    return f"Example: {EXAMPLES[name]}"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("medseg")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        print(f"medseg {v}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Medical image segmentation, fast on a CPU."""
    if ctx.invoked_subcommand is None:  # `medseg` alone: the route, not a wall of options
        print(ROUTE)
        raise typer.Exit()


def _kv(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise MedsegError(f"{what} must be key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


@app.command(epilog=_example("formats"))
def formats() -> None:
    """List the dataset formats medseg reads."""
    from rich.table import Table

    from medseg.data.formats import FORMATS

    t = Table(title="dataset formats")
    t.add_column("name")
    t.add_column("description")
    t.add_column("patients (folds never split one)")
    t.add_column("options")
    for name in FORMATS.names():
        r = FORMATS.get(name)
        opts = ", ".join(f"{k}={f.default!r}" for k, f in r.Options.model_fields.items())
        t.add_row(name, r.description, r.patients, opts)
    console.print(t)


@app.command(epilog=_example("prepare"))
def prepare(
    format: str = typer.Argument(..., help="reader name (see `medseg formats`)"),
    input: Path = typer.Argument(..., help="the dataset in its native layout"),
    output: Path = typer.Argument(..., help="where to write the prepared dataset"),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="reader option key=value (repeatable)"),
    folds: int = typer.Option(5, help="number of patient-level folds"),
    seed: int = typer.Option(0, help="seed of the fold assignment"),
    split: str = typer.Option("auto", help="'auto': the dataset's own train/valid split where it has one (Roboflow exports), else folds; 'kfold': always folds; 'group': one fold per group of --group-regex (leave one hospital out)"),
    group_regex: Optional[str] = typer.Option(None, help="with --split group: the group (hospital, scanner) of a patient is this regex's first capture group in its id, e.g. '^TCGA_([A-Z0-9]+)_'"),
    workers: Optional[int] = typer.Option(None, help="worker processes (default: min(CPU count, 4)); 1 reads in this process"),
    images_only: bool = typer.Option(False, "--images-only", help="no masks (data to predict on)"),
    overwrite: bool = typer.Option(False, help="replace an existing prepared dataset"),
    labels: Optional[str] = typer.Option(None, help="DICOM: labels as seg or rtstruct files beside the series "
                                         "(ROI names to classes with -o rois=class:Name|Other,...)"),
    spacing: str = typer.Option("auto", help="volumes: 'auto' resamples cases off the data set's target spacing "
                                "(the median; docs/planning.md) to it, 'native' keeps each as read, Z,Y,X sets it (mm)"),
) -> None:
    """Read a dataset in its native layout and write a prepared dataset with patient-level splits."""
    import time

    from medseg.data.prepare import prepare as run_prepare
    from medseg.data.prepared import PreparedDataset

    t0 = time.perf_counter()
    options = _kv(option, "--option")
    if labels is not None:
        options["labels"] = labels  # a reader without label objects refuses the option by name
    with naming(output):
        out = run_prepare(
            format, input, output, options=options, folds=folds, seed=seed, split=split,
            overwrite=overwrite, workers=workers, require_masks=not images_only, progress=sys.stderr.isatty(),
            spacing=spacing, group_regex=group_regex,
        )
    ds = PreparedDataset.open(out)
    dt = time.perf_counter() - t0
    target = ds.fingerprint.get("target_spacing")
    if target:
        moved = sum(c.native is not None for c in ds.cases)
        console.print(f"resampled {moved} of {plural(len(ds), 'case')} to {' x '.join(f'{v:g}' for v in target)} mm (z, y, x)")
    n_slices = ds.fingerprint["n_slices"]
    console.print(
        f"[green]prepared[/] {plural(len(ds), 'case')}, {plural(len(ds.patients), 'patient')}, "
        f"{plural(n_slices, 'slice')} in {dt:.1f} s ({n_slices / dt:.0f} slices/s) -> {out}"
    )


@app.command(epilog=_example("inspect"))
def inspect(
    prepared: Path = typer.Argument(..., help="a prepared dataset"),
    overlay: Optional[Path] = typer.Option(None, help="write a sample overlay PNG here"),
) -> None:
    """Summarise a prepared dataset (cases, patients, classes, foreground, intensities)."""
    from medseg.data.inspect import inspect_dataset

    inspect_dataset(prepared, overlay=overlay, console=console)


@app.command(epilog=_example("models"))
def models(
    benchmark: bool = typer.Option(False, "--benchmark", help="also build and time each model: parameters, GFLOPs, "
                                   "forward images/s on this machine (takes a minute or two)"),
) -> None:
    """List the registered models (with --benchmark: size, cost and speed on this machine)."""
    from medseg.models.table import print_model_table

    print_model_table(console, benchmark=benchmark)


@app.command(epilog=_example("plan"))
def plan(
    prepared: Path = typer.Argument(..., help="prepared dataset (medseg prepare)"),
    minutes: float = typer.Option(30.0, help="wall-clock training budget per fold"),
    device: str = typer.Option("auto", help="plan for: auto (a GPU when PyTorch sees one), cpu, cuda"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="with --device cuda: the card's memory in GiB; "
                                               "plans for a GPU this machine need not have (write here, train on a cluster)"),
    out: Path = typer.Option(Path("plan.yaml"), help="where to write the plan (a config `medseg train` runs)"),
) -> None:
    """Write a complete training config for a prepared dataset, each choice commented with the fingerprint
    value and the rule that produced it."""
    from medseg.training.plan import plan as make_plan, write_plan

    if out.exists():
        raise MedsegError("already exists; choose another --out or remove it", out)
    p = make_plan(prepared, minutes, device, gpu_memory)
    write_plan(p, out)
    d = p.config["data"]
    console.print(f"[green]planned[/] {d['mode']}, size {'x'.join(map(str, d['size']))}, batch {d['batch_size']}, "
                  f"{p.config['model']['name']} {p.config['model']['kwargs']['features']}, {p.config['loss']['terms'][0]['name']}, "
                  f"{minutes:g} min on {p.fingerprint['device']} -> {out}", highlight=False)


@app.command(epilog=_example("train"))
def train(
    config: Path = typer.Argument(..., help="experiment YAML, or a prepared dataset with --auto"),
    fold: str = typer.Option("0", help="fold index, 'all' for k-fold cross-validation, or 'full' to train on every case (no validation)"),
    set: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: a.b=value (repeatable)"),
    out: Optional[Path] = typer.Option(None, help="run directory (default: runs/<config name>)"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
    auto: bool = typer.Option(False, "--auto", help="CONFIG is a prepared dataset: plan (medseg plan) and train"),
    minutes: float = typer.Option(30.0, help="with --auto: the wall-clock budget per fold"),
) -> None:
    """Train a model on a prepared dataset."""
    from medseg.training.fit import TrainingInterrupted
    from medseg.training.run import remove_unstarted, train as run_train

    made: list[Path] = []  # what --auto creates goes again if training never reaches a checkpoint
    if auto:
        from medseg.training.plan import plan as make_plan, write_plan

        out = out or Path("runs") / config.resolve().name
        if not resume:
            p = make_plan(config, minutes, "auto")  # a bad data set fails before anything is written
            made = [out] if not out.exists() else []
            out.mkdir(parents=True, exist_ok=True)
            write_plan(p, out / "plan.yaml")
        console.print(f"plan: {out / 'plan.yaml'}", highlight=False)
        config = out / "plan.yaml"
    elif config.is_dir():
        raise MedsegError("is a folder: pass an experiment YAML, or add --auto to plan one for this prepared dataset", config)
    try:
        with naming(out or Path("runs") / config.stem):
            run_train(config, fold=fold, overrides=_kv(set, "--set"), out=out, resume=resume, console=console)
    except BaseException as e:
        remove_unstarted(made)
        if isinstance(e, TrainingInterrupted):
            print(str(e), file=sys.stderr)
            raise typer.Exit(130) from None  # the shell's convention for SIGINT
        raise


@app.command(epilog=_example("evaluate"))
def evaluate(
    pred: Path = typer.Argument(..., help="predictions folder, submission CSV, or a run directory"),
    truth: Optional[Path] = typer.Argument(None, help="prepared dataset or native layout with masks"),
    out: Optional[Path] = typer.Option(None, help="where to write metrics.csv, summary.json, report.html"),
    format: Optional[str] = typer.Option(None, help="reader for a native TRUTH layout (guessed if absent)"),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="reader option key=value for TRUTH, "
                                               "as in prepare (e.g. -o masks=labels/ for DICOM)"),
    images: Optional[Path] = typer.Option(None, help="UW-Madison: the train/ image folder beside train.csv"),
    empty: str = typer.Option("skip", help="empty-vs-empty convention for Dice/HD: skip (NaN), one, zero"),
    nsd_tolerance: float = typer.Option(1.0, help="surface Dice tolerance in mm"),
    report: bool = typer.Option(True, help="also write report.html (plots and overlays) and view.html (every slice, error components)"),
    uw_score: str = typer.Option("competition", help="UW-Madison score: 'competition' (its written definition) or "
                                 "'mlebench' (the public mle-bench grader's, for its medal thresholds)"),
    unfinished: bool = typer.Option(False, "--unfinished", help="a run directory whose training did not finish: score "
                                    "its validation predictions so far instead of refusing"),
) -> None:
    """Compare predictions with ground truth: metrics.csv, summary.json, report.html.

    PRED is a predictions folder (the input's layout), a UW-Madison submission CSV, a prepared dataset, or a run directory (TRUTH omitted: its validation predictions are scored). TRUTH may also be a plain folder of label maps (<case>.png or <case>.nii.gz), paired with PRED's files by name. Metrics and empty-mask conventions: docs/evaluation.md."""
    from medseg.evaluation.evaluate import evaluate as run_evaluate

    with naming(out or pred):
        run_evaluate(pred, truth, out=out, fmt=format, images=images, empty=empty, nsd_tolerance=nsd_tolerance,
                     console=console, report=report, score_variant=uw_score, options=_kv(option, "--option"),
                     unfinished=unfinished)


@app.command(epilog=_example("predict"))
def predict(
    model: str = typer.Argument(..., help="run directory, checkpoint, .onnx file or shipped model name; "
                                "several separated by commas average their probabilities (see --weights)"),
    input: Path = typer.Argument(..., help="images to segment: a folder or file in a layout a reader understands"),
    output: Path = typer.Argument(..., help="output folder (mirrors the input's layout)"),
    format: Optional[str] = typer.Option(None, help="reader for INPUT (guessed if absent)"),
    folds: str = typer.Option("best", help="'best', 'all' to ensemble every fold of a k-fold run, fold indices '0,2', or 'full'"),
    weights: Optional[str] = typer.Option(None, help="weights of the models in MODEL, e.g. 0.6,0.4 (default: equal)"),
    tta: Optional[bool] = typer.Option(None, help="flip test-time augmentation (default: the model's)"),
    tta_flips: Optional[str] = typer.Option(None, help="TTA flips: axis groups, e.g. '-1;-2;-1,-2' (-1 width, -2 height, -3 depth); implies --tta"),
    save_probabilities: bool = typer.Option(False, help="also write probability maps"),
    overwrite: bool = typer.Option(False, help="allow writing into a folder that holds results"),
    backend: str = typer.Option("auto", help="auto (onnxruntime for .onnx, else PyTorch), torch or onnx"),
    min_size: Optional[int] = typer.Option(None, help="drop components under N pixels (default: the model's)"),
    largest_cc: Optional[bool] = typer.Option(None, help="keep the largest component per class (default: the model's)"),
    components: Optional[str] = typer.Option(None, help="where --min-size and --largest-cc find components: 'slice' or "
                                             "'volume' (a 2D model's slices joined in 3D; default: the model's)"),
    presence: Optional[str] = typer.Option(None, help="zero a class whose max probability is below this: "
                                           "one number, or one per class (0.5,0.3,0.4)"),
    threshold: Optional[str] = typer.Option(None, help="decision threshold (multilabel or one-class models): one number, or one per class"),
    device: str = typer.Option("auto", help="auto (a GPU when PyTorch sees one), cpu, cuda or cuda:N"),
    write_as: Optional[str] = typer.Option(None, "--as", help="DICOM input: write each series' masks as nifti (default), "
                                           "seg (a DICOM Segmentation object) or rtstruct (contours for planning systems)"),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="reader option key=value for INPUT, as in "
                                               "prepare (e.g. -o nonfinite=zero)"),
    unfinished: bool = typer.Option(False, "--unfinished", help="use a run whose training did not finish (its best "
                                    "epoch so far) instead of refusing it"),
    quality: bool = typer.Option(False, "--quality", help="also write quality.csv and quality.json: per case and "
                                 "structure a predicted Dice, a review flag and the signals they come from; "
                                 "RTSTRUCT/SEG outputs carry the flag in each structure's description"),
    save_uncertainty: bool = typer.Option(False, "--save-uncertainty", help="also write per-voxel uncertainty maps (the "
                                          "share of views that disagree with the mask) where probabilities would go; implies --quality"),
    review_below: Optional[float] = typer.Option(None, help="flag a structure for review when its predicted Dice is "
                                                 "below this (default: the model's, else 0.7)"),
) -> None:
    """Segment new scans with a trained model; outputs mirror the input's layout. With --quality, the cases to
    review are listed at the end (docs/quality.md)."""
    from medseg.inference.predict import parse_flips, parse_probabilities, parse_weights, predict as run_predict

    pp = {"min_size": min_size, "largest_cc": largest_cc, "components": components,
          "presence": parse_probabilities(presence, "--presence"),
          "thresholds": parse_probabilities(threshold, "--threshold")}
    if tta_flips is not None:
        if tta is False:
            raise MedsegError("--tta-flips and --no-tta contradict each other")
        tta = parse_flips(tta_flips)
    with naming(output):
        run_predict(model, input, output, fmt=format, folds=folds, tta=tta,
                    save_probabilities=save_probabilities, overwrite=overwrite, console=console,
                    backend=backend, postprocess=pp, weights=parse_weights(weights) if weights else None, device=device,
                    write_as=write_as, unfinished=unfinished, options=_kv(option, "--option"), quality=quality,
                    save_uncertainty=save_uncertainty, review_below=review_below)


@app.command(epilog=_example("tune"))
def tune(
    run: Path = typer.Argument(..., help="run directory of a multilabel or one-class model (UW-Madison, LGG)"),
    folds: str = typer.Option("all", help="'all' or fold indices '0,2': whose validation cases to tune on"),
    data: Optional[Path] = typer.Option(None, help="prepared dataset (default: the run's data.prepared)"),
    tta: Optional[bool] = typer.Option(None, help="tune with flip TTA (re-predicts the validation cases) or without, and store "
                                       "that in the bundles (default: the model's own setting)"),
    thresholds: str = typer.Option("0.3,0.4,0.5,0.6,0.7", help="decision thresholds to try, comma-separated"),
    presence: str = typer.Option("0.5,0.6,0.7,0.8,0.9", help="presence thresholds to try (besides none)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the choice, change no model.pt"),
    device: str = typer.Option("auto", help="where TTA re-predicts: auto (a GPU when PyTorch sees one), cpu, cuda or cuda:N"),
) -> None:
    """Choose per-class thresholds, class-presence thresholds and the largest-component rule on the
    validation folds (for the UW-Madison competition score, else the mean Dice per case); write them into
    every fold's model.pt (used by `medseg predict`)."""
    from medseg.evaluation.tune import tune as run_tune

    def floats(text: str, what: str) -> list[float]:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise MedsegError(f"--{what} must be comma-separated numbers, got {text!r}") from None

    run_tune(run, folds=folds, data=data, tta=tta, thresholds=floats(thresholds, "thresholds"),
             presence=floats(presence, "presence"), write=not dry_run, console=console, device=device)


@app.command(epilog=_example("calibrate"))
def calibrate(
    run: Path = typer.Argument(..., help="run directory trained with validation folds"),
    into: Optional[str] = typer.Option(None, help="write the calibration into this bundle (a model.pt or shipped model "
                                       "trained the same way) instead of the run's folds"),
    folds: str = typer.Option("all", help="'all' or fold indices '0,2': whose validation cases to fit on"),
    data: Optional[Path] = typer.Option(None, help="prepared dataset (default: the run's data.prepared)"),
    review_below: float = typer.Option(0.7, help="a structure under this real Dice is a failure; predict flags "
                                       "predicted Dice under it"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the figures, change no model.pt"),
    device: str = typer.Option("auto", help="where the folds re-predict: auto, cpu, cuda or cuda:N"),
) -> None:
    """Fit the quality estimate of `predict --quality` on the run's out-of-fold predictions and store it in
    the bundles; print its nested figures (Spearman, failures caught at 10/20/30 % review). docs/quality.md."""
    from medseg.evaluation.calibrate import calibrate as run_calibrate

    with naming(run):
        run_calibrate(run, folds=folds, data=data, into=into, review_below=review_below, write=not dry_run,
                      device=device, console=console)


@app.command(epilog=_example("view"))
def view(
    pred: Path = typer.Argument(..., help="predictions folder (the input's layout), submission, prepared dataset, or run directory"),
    truth: Optional[Path] = typer.Argument(None, help="ground truth, as for evaluate (omit for a run directory)"),
    out: Optional[Path] = typer.Option(None, help="the HTML file (default: PRED_view.html, or RUN/view.html)"),
    format: Optional[str] = typer.Option(None, help="reader for a native TRUTH layout (guessed if absent)"),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="reader option key=value for TRUTH"),
    image: Optional[Path] = typer.Option(None, "--image", help="without TRUTH: the images the predictions were made from "
                                         "(predictions shown alone); with TRUTH: images for a truth that holds none"),
    open_it: bool = typer.Option(True, "--open/--no-open", help="open it in the browser when there is a display"),
) -> None:
    """Scroll every slice of every case with truth and prediction overlays, and jump to each false-positive
    and false-negative component: one self-contained HTML file (no server, no network)."""
    import os

    from medseg.evaluation.viewer import view as make_view

    path = make_view(pred, truth, out=out, fmt=format, images=image, options=_kv(option, "--option"), console=console)
    if open_it and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin"):
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command(epilog=_example("export"))
def export(
    model: str = typer.Argument(..., help="run directory, checkpoint or shipped model name"),
    output: Path = typer.Argument(..., help="the .onnx file to write (a .json of pre/post-processing beside it)"),
    opset: int = typer.Option(17, help="ONNX opset"),
    folds: str = typer.Option("best", help="which fold of a k-fold run: 'best' or its index"),
    size: Optional[str] = typer.Option(None, help="H,W: export for this one input size; predict then runs windows of it "
                                       "(default: any size; swin_unetr always gets one, the training size)"),
    int8: Optional[Path] = typer.Option(None, help="PREPARED: quantize to int8, calibrated on slices of this prepared "
                                        "dataset; refused unless the masks agree with PyTorch's on 99.9% of pixels"),
    calibration_slices: int = typer.Option(64, help="--int8: slices to calibrate on (as many others check the result)"),
    overwrite: bool = typer.Option(False, help="replace an existing OUTPUT (and its .json)"),
    unfinished: bool = typer.Option(False, "--unfinished", help="export a run whose training did not finish (its "
                                    "best epoch so far) instead of refusing it"),
) -> None:
    """Export a model to ONNX with its pre- and post-processing description."""
    from medseg.inference.export import export_onnx, parse_size

    with naming(output):
        export_onnx(model, output, opset=opset, console=console, folds=folds,
                    size=parse_size(size) if size else None, int8=int8, calibration_slices=calibration_slices,
                    overwrite=overwrite, unfinished=unfinished)


def main() -> None:
    try:
        with warning_lines():
            app()
    except MedsegError as e:
        # plain stderr, never wrapped: users grep and copy the path from this line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # permissions, a full disk: the file and the system's reason, no traceback
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
