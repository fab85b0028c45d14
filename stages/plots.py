"""Draw the summary figures from the summary tables: Dice boxes, forgetting maps, budget and loss curves, overlays.

Every number comes from the tables ``stages.aggregate`` wrote (``cases``, ``forgetting``, ``bwt``,
``budget``, ``training_logs``); this module only draws. Overlays read the original NIfTI image and
label (the manifest's ``image_path``/``label_path``, relative to the run's working directory, label
values mapped to task classes as ``stages.evaluate`` does) and the prediction in original geometry.
PNGs are rendered with matplotlib's Agg canvas (no pyplot) at a fixed DPI, in matplotlib's default style
and with no software/date metadata, so a rerun gives the same bytes; each carries its lineage in a
``.prov.json`` sidecar.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.style
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stages.aggregate import last_round_rows
from stages.core.errors import InputError, run_cli
from stages.core.figures import FIGURE_STYLE, method_colours, save_figure
from stages.core.geometry import apply_label_map
from stages.core.io import make_provenance, read_parquet, read_provenance
from stages.core.log import stage_log
from stages.core.settings import add_settings_argument, from_mapping, setting

__all__ = [
    "DICE_FIGURE",
    "FORGETTING_FIGURE",
    "BUDGET_FIGURE",
    "TRAINING_FIGURE",
    "Overlay",
    "PlotSettings",
    "overlay_name",
    "parse_overlay",
    "method_colours",
    "dice_boxplots",
    "forgetting_heatmaps",
    "budget_curves",
    "training_curves",
    "case_overlay",
    "save_figure",
    "run",
    "main",
]

DICE_FIGURE = "dice_boxplots.png"
FORGETTING_FIGURE = "forgetting.png"
BUDGET_FIGURE = "budget.png"
TRAINING_FIGURE = "training_loss.png"
STAGE_ORDER = ("pretrain", "train", "teacher", "adapter")
STAGE_TITLES = {
    "pretrain": "M0 pre-training (SSL loss)",
    "train": "step models (full FT / multi-task / no-LoRA)",
    "teacher": "K&G knowledge stage (teacher)",
    "adapter": "K&G retention stage (LoRA)",
}


@dataclass(frozen=True)
class PlotSettings:
    """Settings of the figures (defaults: the schema's, for direct callers)."""

    reference: str = setting(
        "medseqft", help="the method whose best and worst test case per task are drawn", schema="summary.reference"
    )
    dpi: int = setting(100, help="resolution of every PNG", schema="summary.dpi")

    def __post_init__(self) -> None:
        if not isinstance(self.dpi, int) or isinstance(self.dpi, bool) or self.dpi < 10:
            raise InputError("--settings", f"dpi must be an integer >= 10, got {self.dpi!r}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> PlotSettings:
        """Build from the ``--settings`` JSON object, refusing unknown keys (:func:`stages.core.settings.from_mapping`)."""
        return from_mapping(cls, settings, "plots", noun="keys")


@dataclass(frozen=True)
class Overlay:
    """One overlay figure: the reference method's model of ``step`` on ``task``.

    Attributes:
        task: the task drawn.
        step: the step whose model predicted it (the task itself, or ``all`` for multi-task).
        predictions: the evaluation's predictions folder (``eval/{method}/{step}/predictions``; the
            cases are under ``{task}/{case}.nii.gz``).
        data: the task's preprocessed folder (its ``manifest.parquet`` names the original files).
    """

    task: str
    step: str
    predictions: Path
    data: Path


def parse_overlay(spec: str) -> Overlay:
    """``TASK:STEP:PREDICTIONS_DIR:DATA_DIR`` -> :class:`Overlay`."""
    parts = spec.split(":")
    if len(parts) != 4 or not all(parts):
        raise InputError("--overlay", f"{spec!r} is not TASK:STEP:PREDICTIONS_DIR:DATA_DIR")
    return Overlay(parts[0], parts[1], Path(parts[2]), Path(parts[3]))


def overlay_name(task: str) -> str:
    """File name of a task's overlay figure."""
    return f"overlay_{task}.png"


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return (n + cols - 1) // cols, cols


# ------------------------------------------------------------------------------------------ figures


def _boxplot_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """The Dice rows the box plots draw, ``method`` renamed to the box's label, ``colour_key`` its colour's.

    Own-step models (labelled by method); a run with none (only active-learning chains, e.g. an
    ASSFT-only study) draws the chains' last-round models instead, labelled ``method@step``.
    """
    dice = cases[cases["metric"] == "dice"]
    own = dice[dice["own_step"]]
    if not own.empty:
        return own.assign(colour_key=own["method"])
    _, active = last_round_rows(dice)
    return active.assign(colour_key=active["method"], method=active["method"] + "@" + active["step"])


def dice_boxplots(cases: pd.DataFrame, colours: Mapping[str, Any]) -> Figure:
    """Per task, a box of per-case Dice for each method (own-step model), cases drawn as points.

    A run with no own-step model draws its active-learning chains' last-round models; a run with no
    test-set Dice at all gets a figure that says so, so the declared file always exists.

    Args:
        cases: ``cases.parquet`` of ``stages.aggregate`` (rows marked ``own_step`` are drawn).
        colours: method -> colour.
    """
    dice = _boxplot_rows(cases)
    if dice.empty:
        fig = Figure(figsize=(4.0, 2.0), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no test-set Dice in this run", ha="center", va="center")
        ax.set_axis_off()
        return fig
    keys = dict(zip(dice["method"], dice["colour_key"]))
    tasks = sorted(dice["task"].unique())
    rows, cols = _grid(len(tasks), 3)
    width = max(3.0, 0.55 * dice.groupby("task")["method"].nunique().max() + 1.5)
    fig = Figure(figsize=(width * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        part = dice[dice["task"] == task]
        methods = sorted(part["method"].unique())
        values = [part[part["method"] == m]["value"].to_numpy() for m in methods]
        boxes = ax.boxplot(values, patch_artist=True, widths=0.6, showfliers=False)
        for patch, m in zip(boxes["boxes"], methods):
            patch.set_facecolor(colours[keys[m]])
            patch.set_alpha(0.45)
        for i, v in enumerate(values, start=1):
            # fixed, evenly spread offsets instead of random jitter: same picture every run
            offsets = np.linspace(-0.12, 0.12, v.size) if v.size > 1 else np.zeros(1)
            ax.scatter(i + offsets, v, s=12, color="black", zorder=3)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice (mean over foreground classes)")
        ax.set_title(f"{task} (n = {part.groupby('method')['case'].nunique().max()} test cases)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    return fig


def forgetting_heatmaps(forgetting: pd.DataFrame, bwt: pd.DataFrame) -> Figure | None:
    """Per sequential method, R[i, j] (model after step i, task j) as a heat map, BWT in the title.

    Args:
        forgetting: ``forgetting.parquet`` (method, step, task, step_index, task_index, dice).
        bwt: ``bwt.parquet`` (method, bwt).
    """
    if forgetting.empty:
        return None
    methods = sorted(forgetting["method"].unique())
    rows, cols = _grid(len(methods), 3)
    n = int(forgetting["step_index"].max()) + 1
    side = max(3.2, 0.9 * n + 2.0)
    fig = Figure(figsize=(side * cols, side * rows * 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, method in zip(axes, methods):
        grp = forgetting[forgetting["method"] == method]
        k = int(grp["step_index"].max()) + 1
        r = np.full((k, k), np.nan)
        r[grp["step_index"].to_numpy(), grp["task_index"].to_numpy()] = grp["dice"].to_numpy()
        steps = grp.sort_values("step_index")["step"].unique().tolist()
        image = ax.imshow(np.ma.masked_invalid(r), cmap="viridis", vmin=0.0, vmax=1.0)
        for i in range(k):
            for j in range(i + 1):
                ax.text(
                    j,
                    i,
                    f"{r[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if r[i, j] < 0.6 else "black",
                )
        ax.set_xticks(range(k), steps, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(k), [f"after {s}" for s in steps], fontsize=8)
        ax.set_xlabel("task evaluated")
        b = bwt[bwt["method"] == method]["bwt"]
        ax.set_title(method + (f"  (BWT {b.iloc[0]:+.3f})" if not b.empty else ""), fontsize=10)
    for ax in axes[len(methods) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes[: len(methods)].tolist(), label="mean Dice", shrink=0.8)
    return fig


def budget_curves(budget: pd.DataFrame, colours: Mapping[str, Any]) -> Figure | None:
    """Dice against the number of labelled cases per query strategy, mean ± std over seeds.

    Args:
        budget: ``budget.parquet`` (strategy, round, labels, dice_mean, dice_std, seeds).
        colours: strategy -> colour.
    """
    if budget.empty:
        return None
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for strategy, grp in budget.groupby("strategy", sort=True):
        grp = grp.sort_values("labels")
        x = grp["labels"].to_numpy(dtype=float)
        mean = grp["dice_mean"].to_numpy(dtype=float)
        std = np.nan_to_num(grp["dice_std"].to_numpy(dtype=float))
        seeds = int(grp["seeds"].max())
        ax.plot(x, mean, marker="o", color=colours[strategy], label=f"{strategy} ({seeds} seed{'s' * (seeds != 1)})")
        ax.fill_between(x, mean - std, mean + std, color=colours[strategy], alpha=0.2, linewidth=0)
    ax.set_xlabel("labelled cases")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def training_curves(logs: pd.DataFrame, colours: Mapping[str, Any]) -> Figure | None:
    """Training loss against iteration, one panel per kind of job, one line per job; validation Dice
    (where the job computed it) as markers on a right-hand axis.

    Args:
        logs: ``training_logs.parquet`` (method, step, stage, iteration, loss, ...).
        colours: method -> colour.
    """
    if logs.empty:
        return None
    stages = [s for s in STAGE_ORDER if s in set(logs["stage"])] + sorted(set(logs["stage"]) - set(STAGE_ORDER))
    rows, cols = _grid(len(stages), 2)
    fig = Figure(figsize=(6.5 * cols, 4.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    styles = ("-", "--", ":", "-.")
    for ax, stage in zip(axes, stages):
        part = logs[logs["stage"] == stage]
        for (method, step), grp in part.groupby(["method", "step"], sort=True):
            steps = sorted(part[part["method"] == method]["step"].unique())
            grp = grp.sort_values("iteration")
            ax.plot(
                grp["iteration"],
                grp["loss"],
                linestyle=styles[steps.index(step) % len(styles)],
                color=colours.get(method, "black"),
                label=f"{method} / {step}",
                linewidth=1.2,
            )
        ax.set_title(STAGE_TITLES.get(stage, stage), fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 + len(part.groupby(["method", "step"])) // 12)
        _val_dice(ax, part, colours)
    for ax in axes[len(stages) :]:
        ax.set_visible(False)
    return fig


def _val_dice(ax: Any, part: pd.DataFrame, colours: Mapping[str, Any]) -> None:
    """Validation Dice (the trainer's ``val_score``, where computed) on a right-hand axis, as markers.

    The best point of each job, the checkpoint it wrote, is ringed, so a plateau and the chosen step show.
    """
    if "val_score" not in part.columns:
        return
    val = part[np.isfinite(part["val_score"].astype(float))]
    if val.empty:
        return
    right = ax.twinx()
    for (method, _), grp in val.groupby(["method", "step"], sort=True):
        grp = grp.sort_values("iteration")
        colour = colours.get(method, "black")
        right.plot(
            grp["iteration"],
            grp["val_score"],
            marker="o",
            markersize=3,
            linestyle="-",
            linewidth=0.6,
            alpha=0.8,
            color=colour,
        )
        best = grp.loc[grp["val_score"].idxmax()]
        right.plot([best["iteration"]], [best["val_score"]], marker="o", markersize=8, fillstyle="none", color=colour)
    right.set_ylabel("validation Dice (o, best ringed)")
    right.set_ylim(0.0, 1.0)


def _canonical(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    # the closest RAS orientation: axis 2 is then (inferior -> superior), so [:, :, z] is an axial slice
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, zooms  # type: ignore[return-value]


def _slice_index(gt: np.ndarray, pred: np.ndarray) -> int:
    # the middle of the axial extent of ground truth and prediction together; the volume's middle if both are empty
    z = np.nonzero(((gt > 0) | (pred > 0)).any(axis=(0, 1)))[0]
    return int((z[0] + z[-1]) // 2) if z.size else gt.shape[2] // 2


def case_overlay(
    task: str,
    picks: Sequence[tuple[str, str, float]],
    images: Sequence[Path],
    labels: Sequence[Path],
    predictions: Sequence[Path],
    label_setting: Any,
    num_classes: int,
    class_names: Mapping[str, str] | None = None,
) -> Figure:
    """Rows of (image, image + ground truth, image + prediction) at the axial slice through the structures.

    Args:
        task: task name (title).
        picks: (role, case, Dice) per row, e.g. ``("best", "case_003", 0.91)``.
        images, labels, predictions: the original NIfTI image, label and prediction of each row's case.
        label_setting: the task's ``labels`` setting (source label values -> task classes), as evaluation uses it.
        num_classes: classes including background.
        class_names: class index (as a string) -> name, for the legend.
    """
    cmap = ListedColormap([matplotlib.colormaps["tab10"](i % 10) for i in range(max(1, num_classes - 1))])
    norm = BoundaryNorm(np.arange(cmap.N + 1) - 0.5, cmap.N)  # class c is drawn in colour c - 1, exactly
    fig = Figure(figsize=(9.0, 3.1 * len(picks)), layout="constrained")
    axes = fig.subplots(len(picks), 3, squeeze=False)
    for row, (role, case, dice), image, label, pred in zip(axes, picks, images, labels, predictions):
        img, zooms = _canonical(image)
        gt_raw, _ = _canonical(label)
        gt = apply_label_map(gt_raw, label_setting)
        pr, _ = _canonical(pred)
        pr = pr.astype(np.int64)
        if gt.shape != img.shape or pr.shape != img.shape:
            raise InputError(pred, f"shape {pr.shape} / label {gt.shape} differ from the image's {img.shape}")
        z = _slice_index(gt, pr)
        lo, hi = np.percentile(img, [0.5, 99.5])
        aspect = zooms[1] / zooms[0]
        for ax, overlay, title in zip(row, (None, gt, pr), ("image", "ground truth", "prediction")):
            ax.imshow(
                img[:, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest"
            )
            if overlay is not None:
                seg = overlay[:, :, z].T.astype(np.int64)
                ax.imshow(
                    np.ma.masked_where(seg == 0, seg - 1),
                    cmap=cmap,
                    norm=norm,
                    alpha=0.5,
                    origin="lower",
                    aspect=aspect,
                    interpolation="nearest",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"{title}" if overlay is not None else f"{role}: {case}\nDice {dice:.3f}, axial slice {z}", fontsize=9
            )
    names = class_names or {}
    handles = [
        Patch(color=cmap(c - 1), alpha=0.5, label=names.get(str(c), f"class {c}")) for c in range(1, num_classes)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, len(handles)), fontsize=8)
    fig.suptitle(task, fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------- stage


def _table(summary: Path, name: str, required: Sequence[str]) -> pd.DataFrame:
    path = summary / name
    if not path.is_file():
        raise InputError(path, "file not found (run stages.aggregate first)")
    df = read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"lacks columns {missing}")
    return df


def _overlay_inputs(spec: Overlay, cases: pd.DataFrame, reference: str) -> dict[str, Any]:
    """Check one overlay's inputs and choose its cases (validation before any figure is written)."""
    manifest_path = spec.data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "file not found")
    dice = cases[
        (cases["method"] == reference)
        & (cases["step"] == spec.step)
        & (cases["task"] == spec.task)
        & (cases["metric"] == "dice")
    ]
    if dice.empty:
        raise InputError(
            "--overlay", f"no Dice of method {reference}, step {spec.step} on task {spec.task} in cases.parquet"
        )
    ranked = dice.sort_values(["value", "case"], ascending=[False, True])
    best, worst = ranked.iloc[0], ranked.iloc[-1]
    picks = [("best", str(best["case"]), float(best["value"]))]
    if worst["case"] != best["case"]:
        picks.append(("worst", str(worst["case"]), float(worst["value"])))
    manifest = read_parquet(manifest_path).set_index("case")
    images, labels, preds = [], [], []
    for _, case, _ in picks:
        if case not in manifest.index:
            raise InputError(manifest_path, f"has no case {case}")
        info = manifest.loc[case]
        label = info["label_path"]
        if label is None or pd.isna(label):
            raise InputError(manifest_path, f"case {case} has no label")
        pred = spec.predictions / spec.task / f"{case}.nii.gz"
        for p in (Path(info["image_path"]), Path(label), pred):
            if not p.is_file():
                raise InputError(p, f"file not found (case {case}; paths are relative to the run's working folder)")
        images.append(Path(info["image_path"]))
        labels.append(Path(label))
        preds.append(pred)
    prov = read_provenance(manifest_path)
    label_setting = prov.get("settings", {}).get("labels")
    names = prov.get("labels") if isinstance(prov.get("labels"), dict) else None
    num_classes = int(manifest["num_classes"].iloc[0])
    return {
        "picks": picks,
        "images": images,
        "labels": labels,
        "predictions": preds,
        "label_setting": label_setting,
        "num_classes": num_classes,
        "class_names": names,
        "manifest": manifest_path,
    }


def run(summary: Path, out: Path, settings: Mapping[str, Any], overlays: Sequence[Overlay] = ()) -> list[Path]:
    """Draw every figure the tables support into ``out``; return the files written.

    Args:
        summary: the summary folder of ``stages.aggregate``.
        out: folder of the PNGs: ``dice_boxplots.png``, ``forgetting.png`` (when a method was evaluated
            at several steps), ``budget.png`` (when there are active-learning rounds),
            ``training_loss.png`` (when there are training logs), ``overlay_{task}.png`` per overlay.
        settings: see :class:`PlotSettings`.
        overlays: the reference method's predictions to draw (best and worst test case by Dice).
    """
    conf = PlotSettings.from_mapping(settings)
    cases = _table(summary, "cases.parquet", ("method", "step", "task", "case", "metric", "value", "own_step"))
    forgetting = _table(summary, "forgetting.parquet", ("method", "step", "task", "step_index", "task_index", "dice"))
    bwt = _table(summary, "bwt.parquet", ("method", "bwt"))
    budget = _table(summary, "budget.parquet", ("strategy", "labels", "dice_mean", "dice_std", "seeds"))
    logs = _table(summary, "training_logs.parquet", ("method", "step", "stage", "iteration", "loss"))
    plans = [(o, _overlay_inputs(o, cases, conf.reference)) for o in overlays]

    colours = method_colours(list(cases["method"]) + list(logs["method"]))
    recorded = {"reference": conf.reference, "dpi": conf.dpi}
    written: list[Path] = []

    def emit(fig: Figure | None, name: str, inputs: Sequence[Path], **extra: Any) -> None:
        if fig is None:
            return
        save_figure(fig, out / name, conf.dpi, make_provenance("plots", recorded, inputs=list(inputs), **extra))
        written.append(out / name)

    with matplotlib.style.context(FIGURE_STYLE):  # ignore any user matplotlibrc: same pixels everywhere
        emit(dice_boxplots(cases, colours), DICE_FIGURE, [summary / "cases.parquet"])
        emit(
            forgetting_heatmaps(forgetting, bwt),
            FORGETTING_FIGURE,
            [summary / "forgetting.parquet", summary / "bwt.parquet"],
        )
        emit(budget_curves(budget, method_colours(budget["strategy"])), BUDGET_FIGURE, [summary / "budget.parquet"])
        emit(training_curves(logs, colours), TRAINING_FIGURE, [summary / "training_logs.parquet"])
        for spec, plan in plans:
            fig = case_overlay(
                spec.task,
                plan["picks"],
                plan["images"],
                plan["labels"],
                plan["predictions"],
                plan["label_setting"],
                plan["num_classes"],
                plan["class_names"],
            )
            emit(
                fig,
                overlay_name(spec.task),
                [summary / "cases.parquet", plan["manifest"], *plan["images"], *plan["labels"], *plan["predictions"]],
                method=conf.reference,
                step=spec.step,
                task=spec.task,
                cases={role: case for role, case, _ in plan["picks"]},
            )
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, required=True, help="summary folder of stages.aggregate")
    parser.add_argument("--out", type=Path, required=True, help="folder of the figures")
    parser.add_argument(
        "--overlay",
        type=parse_overlay,
        nargs="*",
        default=[],
        metavar="TASK:STEP:PREDICTIONS:DATA",
        help="draw the reference method's best and worst test case of TASK (model of STEP)",
    )
    add_settings_argument(parser, PlotSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        if not isinstance(args.settings, dict):
            raise InputError("--settings", "must be a JSON object")
        for path in run(args.summary, args.out, args.settings, args.overlay):
            print(path)


if __name__ == "__main__":
    run_cli(main)
