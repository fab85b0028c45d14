"""Map the validation loss around a trained model along filter-normalised random directions (1D curve, 2D surface), resumably.

The method of Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets"
(NeurIPS 2018): draw Gaussian directions d₁, d₂ in weight space (seeded), rescale each filter of each
direction to the norm of the matching filter of the weights (*filter normalisation*, their §4, so the
picture does not depend on the scale invariance of normalised layers), and evaluate
``L(α, β) = loss(W + α·d₁ + β·d₂)`` on a grid. Filters are the slices along dimension 0 of every weight
with at least two dimensions (output channels of a convolution or linear layer; for a transposed
convolution, whose weight is (in, out, ...), dimension 0 too, as in Li et al.'s code). One-dimensional
parameters (biases, normalisation scales and shifts) get a zero direction, Li et al.'s
``ignore='biasbn'``. Only the parameters the task's prediction depends on are moved: the backbone and
the task's segmentation head.

The loss is the training loss (:func:`stages.core.losses.segmentation_loss`, Dice + CE) on a fixed
batch: the first ``cases`` labelled cases of the ``val`` split (sorted by case id; the ``train`` split
when there is no labelled validation case, with a warning), one ``patch_size`` patch each, centred on
the case's foreground centroid (the volume centre without foreground) and clipped into the volume
(zero padding where the volume is smaller). The value at a grid point is the mean of the per-patch
losses (each batch's loss weighted by its number of patches), under ``torch.no_grad`` in eval mode.

Outputs (``--out``): ``landscape.parquet`` with one row per grid point — ``kind`` (``1d``: along d₁
only, ``beta`` = 0; ``2d``: the (α, β) grid), ``i`` and ``j`` (grid indices along α and β; ``j`` = 0
for ``1d``), ``alpha``, ``beta``, ``loss`` — and ``landscape_1d.png`` / ``landscape_2d.png`` for the
dimensions asked for. The loss at the origin (the model's own) is in the provenance (``origin_loss``).
Partial results are kept in ``--work`` (not a declared output), in a sub-folder named by the hash of
the job's settings and inputs, after every grid point: an interrupted job (SIGTERM, SIGINT, a crash)
continues where it stopped and writes byte-identical output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.style
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy import ndimage
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.figures import FIGURE_STYLE, save_figure
from stages.core.inference import resolve_device
from stages.core.io import config_hash, make_provenance, read_json, read_parquet, save_json, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.losses import segmentation_loss
from stages.core.nets import MODEL_WEIGHTS, FoundationNet, load_model, model_id
from stages.core.sampling import CaseStore
from stages.core.settings import add_settings_argument
from stages.core.signals import StopSignal

__all__ = [
    "CURVE_FIGURE",
    "SURFACE_FIGURE",
    "STATE_NAME",
    "TABLE",
    "LandscapeSettings",
    "choose_cases",
    "filter_normalised_direction",
    "fixed_patches",
    "grid_points",
    "landscape_parameters",
    "patch_loss",
    "random_directions",
    "run",
    "main",
]

log = logging.getLogger("stages.landscape")

TABLE = "landscape.parquet"
CURVE_FIGURE = "landscape_1d.png"
SURFACE_FIGURE = "landscape_2d.png"
STATE_NAME = "landscape_state.json"
COLUMNS = ["kind", "i", "j", "alpha", "beta", "loss"]
_EPS = 1e-10  # Li et al.'s guard against a zero-norm random filter


@dataclass(frozen=True)
class LandscapeSettings:
    """Settings of the loss landscape.

    Attributes:
        seed: seeds the random directions.
        dims: which plots: 1 (loss along d₁) and/or 2 (the (α, β) surface).
        points: grid points per axis (odd, with a symmetric range, puts the model itself on the grid).
        range: [low, high] of α and β, in units of the filter-normalised direction (Li et al. use [-1, 1]).
        cases: number of validation cases (one patch each).
        patch_size: patch side lengths (voxels); the network's divisibility rules apply.
        batch_size: patches per forward pass.
        device: torch device ("cpu", "cuda").
        dpi: resolution of the PNGs.
    """

    seed: int = 0
    dims: tuple[int, ...] = (1, 2)
    points: int = 11
    range: tuple[float, float] = (-1.0, 1.0)
    cases: int = 4
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    device: str = "cpu"
    dpi: int = 100

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> LandscapeSettings:
        """Build from the ``--settings`` JSON object, refusing unknown keys and bad values."""
        known = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise InputError("--settings", f"unknown keys {unknown} (known: {known})")
        s = dict(settings)

        def fail(key: str, problem: str) -> InputError:
            return InputError(f"--settings: {key}", f"{problem}, got {s[key]!r}")

        def integer(key: str, minimum: int) -> None:
            if key in s and (not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < minimum):
                raise fail(key, f"must be an integer >= {minimum}")

        for key, minimum in (("seed", 0), ("points", 2), ("cases", 1), ("batch_size", 1), ("dpi", 10)):
            integer(key, minimum)
        if "dims" in s:
            dims = s["dims"]
            if not isinstance(dims, list) or not dims or any(d not in (1, 2) or isinstance(d, bool) for d in dims):
                raise fail("dims", "must be a non-empty list of 1 and/or 2")
            s["dims"] = tuple(sorted(set(dims)))
        if "range" in s:
            r = s["range"]
            if (
                not isinstance(r, list)
                or len(r) != 2
                or not all(isinstance(v, (int, float)) for v in r)
                or not r[0] < r[1]
            ):
                raise fail("range", "must be [low, high] with low < high")
            s["range"] = (float(r[0]), float(r[1]))
        if "patch_size" in s:
            p = s["patch_size"]
            if not isinstance(p, list) or len(p) != 3 or not all(isinstance(v, int) and v >= 1 for v in p):
                raise fail("patch_size", "must be three positive integers")
            s["patch_size"] = tuple(p)
        if "device" in s and not isinstance(s["device"], str):
            raise fail("device", "must be a string")
        return cls(**s)


# ---------------------------------------------------------------------------------------- directions


def landscape_parameters(model: FoundationNet, task: str) -> dict[str, torch.nn.Parameter]:
    """The parameters moved: the backbone's and ``task``'s segmentation head's, in the network's order.

    Args:
        model: the network.
        task: the segmentation head whose loss is mapped.
    """
    prefixes = ("backbone.", f"seg_heads.{task}.")
    return {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}


def filter_normalised_direction(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction for one parameter, filter-normalised (Li et al. 2018, §4).

    For a weight with at least two dimensions, each filter ``d_i`` (a slice along dimension 0) becomes
    ``d_i / (‖d_i‖ + 1e-10) · ‖W_i‖``; a one-dimensional parameter gets zeros (``ignore='biasbn'``).
    The random numbers are drawn on the CPU, so a seed gives the same direction on every device.

    Args:
        weight: the parameter W.
        generator: a CPU ``torch.Generator``; one normal draw of ``weight``'s shape is taken from it,
            for one-dimensional parameters too, so the directions of later parameters do not depend on
            this rule.
    """
    d = torch.randn(tuple(weight.shape), generator=generator, dtype=torch.float32)
    w = weight.detach().to("cpu", torch.float32)
    if w.ndim < 2:
        return torch.zeros_like(w)
    w_norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
    d_norm = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
    scale = (w_norm / (d_norm + _EPS)).reshape((-1,) + (1,) * (w.ndim - 1))
    return d * scale


def random_directions(weights: Mapping[str, torch.Tensor], seed: int, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """``count`` filter-normalised directions over ``weights``, drawn in order from one seeded generator.

    Args:
        weights: parameters by name, in the network's order.
        seed: seed of the ``torch.Generator``.
        count: number of directions (d₁ first; the 1D curve uses d₁ alone).
    """
    generator = torch.Generator().manual_seed(int(seed))
    return [{name: filter_normalised_direction(w, generator) for name, w in weights.items()} for _ in range(count)]


# ------------------------------------------------------------------------------------------- the loss


def choose_cases(manifest: pd.DataFrame, count: int, where: object = "manifest") -> tuple[list[str], str]:
    """The first ``count`` labelled cases (sorted ids) of the ``val`` split, else of ``train``.

    Args:
        manifest: the task's manifest (columns ``case``, ``split``, ``label_path``).
        count: how many.
        where: the manifest's path, for messages.

    Returns:
        (cases, split used).
    """
    labelled = manifest[manifest["label_path"].notna()]
    for split in ("val", "train"):
        cases = sorted(labelled.loc[labelled["split"] == split, "case"].astype(str))
        if cases:
            if split == "train":
                log.warning("%s: no labelled validation case; the loss landscape uses training cases", where)
            return cases[:count], split
    raise InputError(where, "has no labelled case in the val or train split to compute a loss on")


def fixed_patches(store: CaseStore, patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch per case, centred on the foreground centroid (volume centre without foreground), clipped in.

    Args:
        store: the cases, with labels.
        patch_size: patch side lengths; along an axis where the volume is smaller, the volume sits at
            the patch's start and the rest is zero (image) and background (label).

    Returns:
        images float32 (N, C, *patch_size), labels int64 (N, 1, *patch_size), in the store's case order.
    """
    patch = tuple(int(p) for p in patch_size)
    images = np.zeros((len(store.cases), store.in_channels, *patch), dtype=np.float32)
    labels = np.zeros((len(store.cases), 1, *patch), dtype=np.int64)
    for n, case in enumerate(store.cases):
        image, label = store.image(case), store.label(case)
        assert label is not None
        shape = label.shape
        mask = np.asarray(label) > 0
        centre = np.rint(ndimage.center_of_mass(mask)).astype(int) if mask.any() else np.array([s // 2 for s in shape])
        lower = [int(np.clip(c - p // 2, 0, max(0, s - p))) for c, p, s in zip(centre, patch, shape)]
        src = tuple(slice(lo, min(lo + p, s)) for lo, p, s in zip(lower, patch, shape))
        dst = tuple(slice(0, sl.stop - sl.start) for sl in src)
        images[(n, slice(None), *dst)] = image[(slice(None), *src)]
        labels[(n, 0, *dst)] = label[src]
    return torch.from_numpy(images), torch.from_numpy(labels)


@torch.no_grad()
def patch_loss(
    model: FoundationNet,
    task: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> float:
    """Mean Dice + CE training loss of ``model`` on fixed patches: each batch's loss weighted by its size.

    Args:
        model: the network (put in eval mode here).
        task: the segmentation head.
        images: (N, C, *patch) float32.
        labels: (N, 1, *patch) class indices.
        batch_size: patches per forward pass.
        device: where the model lives.
    """
    model.eval()
    loss_fn = segmentation_loss()
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        total += float(loss_fn(model.segment(x, task), y)) * x.shape[0]
    return total / images.shape[0]


def grid_points(conf: LandscapeSettings) -> tuple[np.ndarray, list[tuple[str, int, int, float, float]]]:
    """The axis values and every grid point ``(kind, i, j, alpha, beta)``: the 1D row first, then the 2D grid.

    Axis values within 1e-12 of the range of zero are set to exactly 0, so an odd, symmetric grid holds
    the unperturbed model itself.
    """
    lo, hi = conf.range
    axis = np.linspace(lo, hi, conf.points)
    axis[np.abs(axis) <= 1e-12 * (hi - lo)] = 0.0
    points: list[tuple[str, int, int, float, float]] = []
    if 1 in conf.dims:
        points += [("1d", i, 0, float(a), 0.0) for i, a in enumerate(axis)]
    if 2 in conf.dims:
        points += [("2d", i, j, float(a), float(b)) for j, b in enumerate(axis) for i, a in enumerate(axis)]
    return axis, points


@dataclass
class _Perturber:
    """Sets the moved parameters to ``W + α·d₁ + β·d₂`` (from the saved W each time, so order does not matter)."""

    params: dict[str, torch.nn.Parameter]
    origin: dict[str, torch.Tensor] = field(default_factory=dict)
    d1: dict[str, torch.Tensor] = field(default_factory=dict)
    d2: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def set(self, alpha: float, beta: float) -> None:
        for name, p in self.params.items():
            if p.ndim < 2:
                continue  # zero direction: the parameter stays exactly as trained
            p.copy_(self.origin[name].add(self.d1[name], alpha=alpha).add_(self.d2[name], alpha=beta))


# -------------------------------------------------------------------------------------------- resuming


def _load_state(path: Path, job_hash: str) -> dict[int, float]:
    if not path.is_file():
        return {}
    try:
        state = read_json(path)
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable partial results ({err}); delete {path.parent} to start over") from err
    if state.get("job_hash") != job_hash:
        raise InputError(
            path,
            f"was written for job {state.get('job_hash')}, this job is {job_hash}; delete {path.parent} to start over",
        )
    return {int(k): float(v) for k, v in state["losses"].items()}


# ------------------------------------------------------------------------------------------- figures


def curve_figure(table: pd.DataFrame, origin_loss: float, title: str) -> Figure:
    """The loss along d₁ (``kind == "1d"`` rows), the trained model marked at α = 0."""
    rows = table[table["kind"] == "1d"].sort_values("i")
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(rows["alpha"], rows["loss"], marker="o", markersize=3, color="tab:blue")
    ax.scatter([0.0], [origin_loss], color="tab:red", zorder=3, label=f"trained model (loss {origin_loss:.4f})")
    ax.set_xlabel("α (filter-normalised direction d₁)")
    ax.set_ylabel("validation loss (Dice + CE)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def surface_figure(table: pd.DataFrame, axis: np.ndarray, origin_loss: float, title: str) -> Figure:
    """Filled contours of the loss over (α, β) (``kind == "2d"`` rows), the trained model marked at (0, 0)."""
    rows = table[table["kind"] == "2d"]
    surface = np.full((axis.size, axis.size), np.nan)
    surface[rows["j"].to_numpy(), rows["i"].to_numpy()] = rows["loss"].to_numpy(dtype=np.float64)
    finite = surface[np.isfinite(surface)]
    fig = Figure(figsize=(5.8, 4.8), layout="constrained")
    ax = fig.subplots()
    if finite.size and finite.max() > finite.min():
        levels = np.linspace(finite.min(), finite.max(), 16)
        filled = ax.contourf(axis, axis, np.ma.masked_invalid(surface), levels=levels, cmap="viridis")
        lines = ax.contour(
            axis, axis, np.ma.masked_invalid(surface), levels=levels[::3], colors="white", linewidths=0.6
        )
        ax.clabel(lines, fontsize=6, fmt="%.3g")
        fig.colorbar(filled, ax=ax, label="validation loss (Dice + CE)", format="%.4g")
    else:
        ax.imshow(surface, origin="lower", extent=(axis[0], axis[-1], axis[0], axis[-1]), cmap="viridis")
    ax.scatter([0.0], [0.0], marker="*", s=90, color="tab:red", zorder=3, label=f"trained model ({origin_loss:.4f})")
    ax.set_xlabel("α (direction d₁)")
    ax.set_ylabel("β (direction d₂)")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return fig


# ---------------------------------------------------------------------------------------------- stage


def run(
    model_dir: Path,
    data: Path,
    task: str,
    out: Path,
    work: Path,
    settings: Mapping[str, Any],
    method: str | None = None,
    step: str | None = None,
) -> list[Path]:
    """Evaluate the loss landscape of ``model_dir`` on ``task`` and write the table and figures to ``out``.

    Args:
        model_dir: the model folder (it must carry ``task``'s head).
        data: the task's preprocessed folder (``manifest.parquet`` + ``cases/``).
        task: the task name.
        out: output folder.
        work: folder for partial results (not a declared output).
        settings: see :class:`LandscapeSettings`.
        method, step: what the model is (titles and provenance only).

    Returns:
        The files written.
    """
    conf = LandscapeSettings.from_mapping(settings)
    model_dir, data, out, work = Path(model_dir), Path(data), Path(out), Path(work)
    device = resolve_device(conf.device)
    model = load_model(model_dir)
    if task not in model.seg_heads:
        raise InputError(
            model_dir / "model.json", f"has no segmentation head {task!r} (heads: {sorted(model.seg_heads)})"
        )
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: run the preprocess step for this task first")
    manifest = read_parquet(manifest_path)
    classes = int(manifest["num_classes"].iloc[0])
    if int(model.seg_heads[task].out_channels) != classes:
        raise InputError(
            model_dir / "model.json",
            f"head {task!r} has {model.seg_heads[task].out_channels} classes, {manifest_path} has {classes}",
        )
    cases, split = choose_cases(manifest, conf.cases, manifest_path)
    store = CaseStore(data, cases, with_labels=True)
    images, labels = fixed_patches(store, conf.patch_size)

    axis, points = grid_points(conf)
    unique = sorted({(a, b) for _, _, _, a, b in points} | {(0.0, 0.0)}, key=lambda ab: (ab[1], ab[0]))
    inputs = {str(p): sha256_file(p) for p in (model_dir / MODEL_WEIGHTS, manifest_path)}
    recorded = {**settings}
    job_hash = config_hash({"task": task, "settings": recorded, "cases": cases, "inputs": inputs})
    state_path = work / job_hash / STATE_NAME
    losses = _load_state(state_path, job_hash)
    if losses:
        log.info("landscape: resuming with %d of %d grid points done (%s)", len(losses), len(unique), state_path)

    model.to(device)
    params = landscape_parameters(model, task)
    d1, d2 = random_directions(params, conf.seed, 2)
    perturber = _Perturber(
        params,
        {n: p.detach().clone() for n, p in params.items()},
        {n: d.to(device) for n, d in d1.items()},
        {n: d.to(device) for n, d in d2.items()},
    )
    stop = StopSignal("landscape", "grid point", log)
    bar = tqdm(total=len(unique), initial=len(losses), desc=f"landscape {task}", file=sys.stderr, mininterval=1.5)
    try:
        with stop.installed():
            for k, (alpha, beta) in enumerate(unique):
                if k in losses:
                    continue
                perturber.set(alpha, beta)
                losses[k] = patch_loss(model, task, images, labels, conf.batch_size, device)
                save_json({"job_hash": job_hash, "losses": {str(i): v for i, v in sorted(losses.items())}}, state_path)
                bar.update(1)
                if stop.signum is not None and len(losses) < len(unique):
                    log.warning(
                        "landscape: %d of %d grid points saved in %s; exiting", len(losses), len(unique), state_path
                    )
                    raise SystemExit(128 + stop.signum)
    finally:
        bar.close()
    perturber.set(0.0, 0.0)

    by_point = {ab: losses[k] for k, ab in enumerate(unique)}
    table = pd.DataFrame(
        [
            {"kind": kind, "i": i, "j": j, "alpha": a, "beta": b, "loss": by_point[(a, b)]}
            for kind, i, j, a, b in points
        ],
        columns=COLUMNS,
    )
    origin_loss = by_point[(0.0, 0.0)]
    extra = {
        "task": task,
        "method": method,
        "step": step,
        "cases": cases,
        "split": split,
        "model_id": model_id(model_dir),
        "origin_loss": origin_loss,
    }
    prov = make_provenance("landscape", recorded, inputs=inputs, seed=conf.seed, **extra)
    write_parquet(table, out / TABLE, prov)
    written = [out / TABLE]
    title = ", ".join([method or "model"] + ([f"model of step {step}"] if step else []) + [f"task {task}"])
    with matplotlib.style.context(FIGURE_STYLE):  # ignore any user matplotlibrc: same pixels everywhere
        figures = []
        if 1 in conf.dims:
            figures.append((CURVE_FIGURE, curve_figure(table, origin_loss, title)))
        if 2 in conf.dims:
            figures.append((SURFACE_FIGURE, surface_figure(table, axis, origin_loss, title)))
        for name, fig in figures:
            save_figure(
                fig, out / name, conf.dpi, make_provenance("landscape", recorded, inputs=[out / TABLE], **extra)
            )
            written.append(out / name)
    log.info("landscape of %s on %s: %d grid points, loss at the model %.6g", model_dir, task, len(table), origin_loss)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.landscape", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, required=True, help="the task's preprocessed folder")
    parser.add_argument("--task", required=True, help="task (segmentation head) whose loss is mapped")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--work", type=Path, required=True, help="folder for partial results (resumable)")
    parser.add_argument("--method", default=None, help="method that made the model (titles, provenance)")
    parser.add_argument("--step", default=None, help="step that made the model (titles, provenance)")
    add_settings_argument(parser, LandscapeSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        for path in run(args.model, args.data, args.task, args.out, args.work, args.settings, args.method, args.step):
            print(path)


if __name__ == "__main__":
    run_cli(main)
