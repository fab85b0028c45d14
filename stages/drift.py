"""Measure how far each method moves the foundation model: per-parameter and per-block weight drift, tables and figures.

For every model M_t a method made (one per step, in order) and every parameter tensor W of it, the
relative change ``‖W_t − W_0‖ / ‖W_0‖`` against the foundation model M0 and ``‖W_t − W_s‖ / ‖W_s‖``
against the model the step started from (M_s: M_{t-1} for sequential methods, M0 for parallel and
multi-task ones), Frobenius norms computed in float64. This is the "parameter variation" analysis of
MedSeqFT (Ye et al., arXiv 2509.06096): full fine-tuning moves every weight, LoRA retention only where
adapters were merged.

Outputs (``--out``):

- ``drift.parquet`` — one row per (method, step, parameter tensor of M_t): ``method``, ``step``,
  ``step_index`` (0-based position among the method's models), ``layer`` (parameter name), ``block``
  (:func:`block_of`), ``ndim``, ``numel``, ``in_m0`` / ``in_start`` (whether M0 / M_s has that tensor),
  ``norm_m0`` = ‖W_0‖, ``delta_m0`` = ‖W_t − W_0‖, ``rel_to_m0``, ``start`` (``m0``, or
  ``method:step`` of the start model), ``norm_prev`` = ‖W_s‖, ``delta_prev`` = ‖W_t − W_s‖, ``rel_to_prev``. A tensor the
  reference lacks (a task head added after M0) is kept, with NaN in that reference's columns and
  ``in_m0`` / ``in_start`` false. A zero reference norm gives 0 for an unchanged tensor, else inf.
- ``drift_blocks.parquet`` — one row per (method, step, block), plus the blocks ``backbone`` (every
  ``backbone.*`` tensor) and ``total`` (every tensor): the same columns aggregated over the block's
  tensors as ``rel = sqrt(Σ ‖ΔW‖²) / sqrt(Σ ‖W_ref‖²)`` over the tensors the reference has (NaN when
  it has none); ``numel`` counts every tensor of the block in M_t, ``numel_m0`` those in M0.
- ``drift_blocks.png`` (blocks × steps heat map of ``rel_to_m0``, a panel per method),
  ``drift_layers.png`` (the same per weight tensor with at least two dimensions, i.e. convolution
  kernels and linear weights, of M0) and ``drift_total.png`` (``total`` drift per step against M0 and
  against the start model, a line per method), each with a ``.prov.json`` sidecar.

Only trainable parameters are compared (buffers such as SwinUNETR's integer position index are not weights).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.style
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.figures import FIGURE_STYLE, method_colours, save_figure
from stages.core.io import make_provenance, write_parquet
from stages.core.log import stage_log
from stages.core.nets import MODEL_WEIGHTS, load_model, model_id, read_model_json
from stages.core.settings import add_settings_argument, from_mapping, setting

__all__ = [
    "BLOCKS_FIGURE",
    "BLOCKS_TABLE",
    "DRIFT_TABLE",
    "LAYERS_FIGURE",
    "TOTAL_FIGURE",
    "DriftSettings",
    "StepModel",
    "block_of",
    "block_sort_key",
    "block_drift",
    "layer_drift",
    "parse_model",
    "relative",
    "run",
    "main",
]

log = logging.getLogger("stages.drift")

DRIFT_TABLE = "drift.parquet"
BLOCKS_TABLE = "drift_blocks.parquet"
BLOCKS_FIGURE = "drift_blocks.png"
LAYERS_FIGURE = "drift_layers.png"
TOTAL_FIGURE = "drift_total.png"
M0 = "m0"

# (pattern on the parameter name, block name); the first match wins. MONAI BasicUNet: conv_0, down_1..4
# (encoder), upcat_4..1 (decoder); SwinUNETR: swinViT.patch_embed and layers1..4 (encoder, the Swin
# stages; layersKc are SwinUNETR-v2's convolutional stage blocks), encoder1..4 and encoder10 (the
# residual convolution blocks on the input and each Swin stage's output that feed the decoder: "skip"),
# decoder5..1. Decoder numbers are MONAI's own: higher is deeper.
_BLOCK_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^backbone\.conv_0\."), "encoder.0"),
    (re.compile(r"^backbone\.down_(\d+)\."), "encoder.{0}"),
    (re.compile(r"^backbone\.upcat_(\d+)\."), "decoder.{0}"),
    (re.compile(r"^backbone\.swinViT\.patch_embed\."), "encoder.0"),
    (re.compile(r"^backbone\.swinViT\.layers(\d+)c?\."), "encoder.{0}"),
    (re.compile(r"^backbone\.encoder(\d+)\."), "skip.{0}"),
    (re.compile(r"^backbone\.decoder(\d+)\."), "decoder.{0}"),
    (re.compile(r"^backbone\.(\w+)"), "backbone.{0}"),
    (re.compile(r"^ssl_heads\."), "heads.ssl"),
    (re.compile(r"^seg_heads\."), "heads.seg"),
)
# MONAI's strided UNet (FoundationNet arch "unet"): backbone.model.(1.submodule.)* then the level's
# child index (0 down, 2 up) or, at the bottom, the bottom layer's own parameter names.
_UNET_LEVEL = re.compile(r"^backbone\.model\.((?:1\.submodule\.)*)(?:(\d+)\.|[a-z])")
_BLOCK_GROUPS = {"encoder": 0, "skip": 1, "decoder": 2, "backbone": 3, "heads": 4, "other": 5}
AGGREGATES = ("backbone", "total")

LAYER_COLUMNS = [
    "method",
    "step",
    "step_index",
    "layer",
    "block",
    "ndim",
    "numel",
    "in_m0",
    "norm_m0",
    "delta_m0",
    "rel_to_m0",
    "start",
    "in_start",
    "norm_prev",
    "delta_prev",
    "rel_to_prev",
]
BLOCK_COLUMNS = [
    "method",
    "step",
    "step_index",
    "block",
    "numel",
    "numel_m0",
    "norm_m0",
    "delta_m0",
    "rel_to_m0",
    "start",
    "norm_prev",
    "delta_prev",
    "rel_to_prev",
]


def block_of(name: str) -> str:
    """The block of a parameter name: ``encoder.k``, ``skip.k``, ``decoder.k``, ``heads.ssl``, ``heads.seg`` ...

    Args:
        name: a ``model.safetensors`` key (``backbone.*``, ``ssl_heads.*``, ``seg_heads.{task}.*``).
    """
    unet = _UNET_LEVEL.match(name)
    if unet:
        # MONAI UNet: level d (0 = top) is Sequential(down "0", SkipConnection "1", up "2"); the bottom
        # layer sits inside the last SkipConnection and counts as the deepest encoder block
        depth = unet.group(1).count("submodule.")
        index = unet.group(2)
        return f"decoder.{depth}" if index == "2" else f"encoder.{depth}"
    for pattern, block in _BLOCK_RULES:
        match = pattern.match(name)
        if match:
            return block.format(*match.groups())
    return "other"


def block_sort_key(block: str) -> tuple[int, int, str]:
    """Order of blocks in tables and figures: the forward pass (encoder shallow to deep, skips, decoder deep
    to shallow), then heads, then the aggregates ``backbone`` and ``total``."""
    if block in AGGREGATES:
        return (10 + AGGREGATES.index(block), 0, block)
    group, _, index = block.partition(".")
    rank = _BLOCK_GROUPS.get(group, _BLOCK_GROUPS["other"])
    if index.isdigit():
        return (rank, -int(index) if group == "decoder" else int(index), block)
    return (rank, 0, block)


def relative(delta: float, norm: float) -> float:
    """``delta / norm``; for a zero ``norm``: 0 when ``delta`` is 0 too, else inf; NaN in, NaN out."""
    if math.isnan(delta) or math.isnan(norm):
        return math.nan
    if norm == 0.0:
        return 0.0 if delta == 0.0 else math.inf
    return delta / norm


@dataclass(frozen=True)
class StepModel:
    """One model of one method.

    Attributes:
        method: the method's name.
        step: the step that made it (a task name, or ``all`` for multi-task training).
        folder: its model folder.
        start: the model folder its training started from; None means the method's previous model in the
            given order, or M0 for its first.
    """

    method: str
    step: str
    folder: Path
    start: Path | None = None


def parse_model(spec: str) -> StepModel:
    """``METHOD:STEP:FOLDER[:START_FOLDER]`` -> :class:`StepModel`."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise InputError("--model", f"{spec!r} is not METHOD:STEP:FOLDER or METHOD:STEP:FOLDER:START_FOLDER")
    return StepModel(parts[0], parts[1], Path(parts[2]), Path(parts[3]) if len(parts) == 4 else None)


@dataclass(frozen=True)
class DriftSettings:
    """Settings of the drift step (default: the schema's, for direct callers)."""

    dpi: int = setting(100, help="resolution of the PNGs", schema="summary.dpi")

    def __post_init__(self) -> None:
        if not isinstance(self.dpi, int) or isinstance(self.dpi, bool) or self.dpi < 10:
            raise InputError("--settings", f"dpi must be an integer >= 10, got {self.dpi!r}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> DriftSettings:
        """Build from the ``--settings`` JSON object, refusing unknown keys (:func:`stages.core.settings.from_mapping`)."""
        return from_mapping(cls, settings, "drift", noun="keys")


# ------------------------------------------------------------------------------------------ numbers


def _parameters(folder: Path) -> dict[str, torch.Tensor]:
    """The trainable parameters of a model folder by name, in the network's order (strictly loaded)."""
    model = load_model(folder)
    return {name: p.detach() for name, p in model.named_parameters()}


def _norms(weights: torch.Tensor, reference: torch.Tensor | None) -> tuple[float, float]:
    """(‖reference‖, ‖weights − reference‖) in float64; NaN for both without a reference."""
    if reference is None:
        return math.nan, math.nan
    ref = reference.to(torch.float64)
    return (float(torch.linalg.vector_norm(ref)), float(torch.linalg.vector_norm(weights.to(torch.float64) - ref)))


def layer_drift(
    weights: Mapping[str, torch.Tensor],
    m0: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    where: object = "model",
) -> pd.DataFrame:
    """Per-tensor drift of ``weights`` against M0 and against the start model.

    Args:
        weights: parameters of M_t by name.
        m0: parameters of the foundation model M0.
        start: parameters of the model the step started from (M0 itself for a step from M0).
        where: what to name in the error message.

    Returns:
        Columns ``layer``, ``block``, ``ndim``, ``numel``, ``in_m0``, ``norm_m0``, ``delta_m0``, ``rel_to_m0``,
        ``in_start``, ``norm_prev``, ``delta_prev``, ``rel_to_prev`` (see the module docstring).

    Raises:
        InputError: a tensor has another shape than in a reference model.
    """
    rows = []
    for name, w in weights.items():
        for ref_name, ref in (("M0", m0), ("the start model", start)):
            if name in ref and tuple(ref[name].shape) != tuple(w.shape):
                raise InputError(
                    where,
                    f"parameter {name} has shape {tuple(w.shape)}, {tuple(ref[name].shape)} "
                    f"in {ref_name}: not the same architecture",
                )
        norm_m0, delta_m0 = _norms(w, m0.get(name))
        norm_prev, delta_prev = _norms(w, start.get(name))
        rows.append(
            {
                "layer": name,
                "block": block_of(name),
                "ndim": w.ndim,
                "numel": int(w.numel()),
                "in_m0": name in m0,
                "norm_m0": norm_m0,
                "delta_m0": delta_m0,
                "rel_to_m0": relative(delta_m0, norm_m0),
                "in_start": name in start,
                "norm_prev": norm_prev,
                "delta_prev": delta_prev,
                "rel_to_prev": relative(delta_prev, norm_prev),
            }
        )
    return pd.DataFrame(rows)


def _aggregate(part: pd.DataFrame) -> dict[str, Any]:
    def root_sum(values: pd.Series) -> float:
        return float(np.sqrt(np.sum(np.square(values.to_numpy(dtype=np.float64)))))

    have_m0 = part[part["in_m0"]]
    have_start = part[part["in_start"]]
    norm_m0 = root_sum(have_m0["norm_m0"]) if len(have_m0) else math.nan
    delta_m0 = root_sum(have_m0["delta_m0"]) if len(have_m0) else math.nan
    norm_prev = root_sum(have_start["norm_prev"]) if len(have_start) else math.nan
    delta_prev = root_sum(have_start["delta_prev"]) if len(have_start) else math.nan
    return {
        "numel": int(part["numel"].sum()),
        "numel_m0": int(have_m0["numel"].sum()),
        "norm_m0": norm_m0,
        "delta_m0": delta_m0,
        "rel_to_m0": relative(delta_m0, norm_m0),
        "norm_prev": norm_prev,
        "delta_prev": delta_prev,
        "rel_to_prev": relative(delta_prev, norm_prev),
    }


def block_drift(layers: pd.DataFrame) -> pd.DataFrame:
    """Aggregate :func:`layer_drift` rows of one model per block, plus ``backbone`` and ``total``.

    ``rel = sqrt(Σ ‖ΔW‖²) / sqrt(Σ ‖W_ref‖²)`` over the block's tensors that the reference has: the
    relative change of the block's weights taken as one vector.

    Args:
        layers: rows of one (method, step), as :func:`layer_drift` returns them.
    """
    groups: dict[str, pd.DataFrame] = {b: part for b, part in layers.groupby("block", sort=False)}
    groups["backbone"] = layers[layers["layer"].str.startswith("backbone.")]
    groups["total"] = layers
    rows = [{"block": block, **_aggregate(part)} for block, part in groups.items() if len(part)]
    rows.sort(key=lambda r: block_sort_key(r["block"]))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ figures


def _method_steps(blocks: pd.DataFrame) -> dict[str, list[str]]:
    return {
        m: grp.sort_values("step_index")["step"].drop_duplicates().tolist()
        for m, grp in blocks.groupby("method", sort=False)
    }


def _heat_panels(
    matrices: Mapping[str, tuple[np.ndarray, list[str]]], rows: Sequence[str], title: str, annotate: bool
) -> Figure:
    """One heat-map panel per method (rows × that method's steps), one shared linear colour scale."""
    finite = np.concatenate([m[np.isfinite(m)] for m, _ in matrices.values()] + [np.zeros(1)])
    vmax = float(finite.max()) or 1.0
    cols = [len(steps) for _, steps in matrices.values()]
    label_width = 0.075 * max(len(r) for r in rows) + 0.6
    height = max(3.0, 0.22 * len(rows) + 1.8) if annotate else max(3.0, 0.12 * len(rows) + 1.8)
    fig = Figure(figsize=(label_width + sum(0.6 * c + 0.5 for c in cols) + 1.2, height), layout="constrained")
    axes = fig.subplots(
        1, len(matrices), squeeze=False, sharey=True, gridspec_kw={"width_ratios": [c + 0.6 for c in cols]}
    ).ravel()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = None
    for ax, (method, (matrix, steps)) in zip(axes, matrices.items()):
        image = ax.imshow(
            np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(range(len(steps)), steps, rotation=40, ha="right", fontsize=8)
        ax.set_title(method, fontsize=9)
        if annotate:
            for i in range(matrix.shape[0]):
                for j in range(matrix.shape[1]):
                    if np.isfinite(matrix[i, j]):
                        ax.text(
                            j,
                            i,
                            f"{matrix[i, j]:.2g}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if matrix[i, j] < 0.6 * vmax else "black",
                        )
    axes[0].set_yticks(range(len(rows)), rows, fontsize=8 if annotate else 5)
    if image is not None:
        fig.colorbar(image, ax=axes.tolist(), label="‖W_t − W_0‖ / ‖W_0‖", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def blocks_heatmap(blocks: pd.DataFrame) -> Figure:
    """Relative drift against M0 per block (rows) and step (columns), a panel per method; grey: no M0 tensor.

    Args:
        blocks: the ``drift_blocks.parquet`` table.
    """
    names = sorted(set(blocks["block"]) - {"total"}, key=block_sort_key)
    matrices = {}
    for method, steps in _method_steps(blocks).items():
        grp = blocks[blocks["method"] == method]
        table = grp.pivot(index="block", columns="step", values="rel_to_m0").reindex(index=names, columns=steps)
        matrices[method] = (table.to_numpy(dtype=np.float64), steps)
    return _heat_panels(matrices, names, "Relative weight change against M0, per block", annotate=True)


def layers_heatmap(layers: pd.DataFrame, blocks: pd.DataFrame) -> Figure:
    """Relative drift against M0 per weight tensor of M0 with at least two dimensions, a panel per method.

    Args:
        layers: the ``drift.parquet`` table.
        blocks: the ``drift_blocks.parquet`` table (for the step order).
    """
    first = layers[(layers["step_index"] == 0) & layers["in_m0"]]
    first = first[first["method"] == first["method"].iloc[0]]
    names = first.loc[first["ndim"] >= 2, "layer"].tolist()
    matrices = {}
    for method, steps in _method_steps(blocks).items():
        grp = layers[layers["method"] == method]
        table = grp.pivot(index="layer", columns="step", values="rel_to_m0").reindex(index=names, columns=steps)
        matrices[method] = (table.to_numpy(dtype=np.float64), steps)
    short = [n.removeprefix("backbone.").removesuffix(".weight") for n in names]
    return _heat_panels(
        matrices,
        short,
        "Relative weight change against M0, per weight tensor",
        annotate=len(names) * max(len(s) for _, s in matrices.values()) <= 120,
    )


def total_curves(blocks: pd.DataFrame) -> Figure:
    """The ``total`` drift per step: against M0 (left, starting at M0 = 0) and against the start model (right).

    Args:
        blocks: the ``drift_blocks.parquet`` table.
    """
    total = blocks[blocks["block"] == "total"]
    colours = method_colours(list(total["method"]))
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    width = int(total["step_index"].max()) + 1
    for method, grp in total.groupby("method", sort=True):
        grp = grp.sort_values("step_index")
        x = grp["step_index"].to_numpy() + 1
        left.plot(
            np.r_[0, x],
            np.r_[0.0, grp["rel_to_m0"].to_numpy(dtype=float)],
            marker="o",
            color=colours[method],
            label=method,
        )
        right.plot(x, grp["rel_to_prev"].to_numpy(dtype=float), marker="o", color=colours[method], label=method)
    left.set_xticks(range(width + 1), ["M0"] + [str(i) for i in range(1, width + 1)])
    right.set_xticks(range(1, width + 1), [str(i) for i in range(1, width + 1)])
    left.set_title("total drift against M0", fontsize=10)
    right.set_title("drift of each step against the model it started from", fontsize=10)
    left.set_ylabel("‖W_t − W_0‖ / ‖W_0‖")
    right.set_ylabel("‖W_t − W_start‖ / ‖W_start‖")
    for ax in (left, right):
        ax.set_xlabel("step (the method's i-th model)")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0.0)
    left.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------- stage


def _check_folder(folder: Path) -> None:
    read_model_json(folder)
    if not (folder / MODEL_WEIGHTS).is_file():
        raise InputError(folder / MODEL_WEIGHTS, "model weights not found")


def run(foundation: Path, models: Sequence[StepModel], out: Path, settings: Mapping[str, Any]) -> list[Path]:
    """Compute the drift of every model against M0 and its start model; write the tables and figures to ``out``.

    Args:
        foundation: the M0 model folder.
        models: the methods' models, each method's in step order (:class:`StepModel`).
        out: output folder (see the module docstring for the files).
        settings: see :class:`DriftSettings`.

    Returns:
        The files written.
    """
    conf = DriftSettings.from_mapping(settings)
    foundation = Path(foundation)
    if not models:
        raise InputError("--model", "no models given")
    seen: set[tuple[str, str]] = set()
    for spec in models:
        if (spec.method, spec.step) in seen:
            raise InputError("--model", f"{spec.method}:{spec.step} is given twice")
        seen.add((spec.method, spec.step))
    # every folder checked before the (slow) loading and before anything is written
    for folder in [foundation] + [s.folder for s in models] + [s.start for s in models if s.start is not None]:
        _check_folder(Path(folder))

    m0 = _parameters(foundation)
    previous: dict[str, Path] = {}
    index: dict[str, int] = {}
    cache: dict[Path, dict[str, torch.Tensor]] = {}
    layer_tables, block_tables = [], []
    for spec in tqdm(models, desc="drift", mininterval=2):
        start_folder = spec.start if spec.start is not None else previous.get(spec.method, foundation)
        start_name = M0 if Path(start_folder) == foundation else _step_name(start_folder, models)
        weights = _parameters(spec.folder)
        if Path(start_folder) == foundation:
            start = m0
        else:
            if Path(start_folder) not in cache:
                cache = {Path(start_folder): _parameters(Path(start_folder))}
            start = cache[Path(start_folder)]
        step_index = index.get(spec.method, 0)
        layers = layer_drift(weights, m0, start, where=spec.folder / MODEL_WEIGHTS)
        blocks = block_drift(layers)
        for table in (layers, blocks):
            table.insert(0, "step_index", step_index)
            table.insert(0, "step", spec.step)
            table.insert(0, "method", spec.method)
            table["start"] = start_name
        layer_tables.append(layers)
        block_tables.append(blocks)
        previous[spec.method] = spec.folder
        index[spec.method] = step_index + 1
        # the next step of a sequential method starts from this model: keep it (and only it) at hand
        cache = {spec.folder: weights}
    layer_table = pd.concat(layer_tables, ignore_index=True)[LAYER_COLUMNS]
    block_table = pd.concat(block_tables, ignore_index=True)[BLOCK_COLUMNS]

    folders = [foundation] + [s.folder for s in models] + [s.start for s in models if s.start is not None]
    inputs = [Path(f) / MODEL_WEIGHTS for f in dict.fromkeys(Path(f) for f in folders)]
    recorded = {"dpi": conf.dpi}
    prov = make_provenance(
        "drift",
        recorded,
        inputs=inputs,
        foundation=model_id(foundation),
        models=[f"{s.method}:{s.step}" for s in models],
    )
    out = Path(out)
    write_parquet(layer_table, out / DRIFT_TABLE, prov)
    write_parquet(block_table, out / BLOCKS_TABLE, prov)
    written = [out / DRIFT_TABLE, out / BLOCKS_TABLE]
    with matplotlib.style.context(FIGURE_STYLE):  # ignore any user matplotlibrc: same pixels everywhere
        for name, fig, source in (
            (BLOCKS_FIGURE, blocks_heatmap(block_table), [out / BLOCKS_TABLE]),
            (LAYERS_FIGURE, layers_heatmap(layer_table, block_table), [out / DRIFT_TABLE]),
            (TOTAL_FIGURE, total_curves(block_table), [out / BLOCKS_TABLE]),
        ):
            save_figure(fig, out / name, conf.dpi, make_provenance("drift", recorded, inputs=source))
            written.append(out / name)
    log.info("drift of %d models written to %s", len(models), out)
    return written


def _step_name(folder: Path, models: Sequence[StepModel]) -> str:
    """The step name of a start folder that is one of the given models, else the folder itself."""
    for spec in models:
        if Path(spec.folder) == Path(folder):
            return f"{spec.method}:{spec.step}"
    return str(folder)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.drift", description=__doc__.splitlines()[0])
    parser.add_argument("--foundation", type=Path, required=True, help="the M0 model folder")
    parser.add_argument(
        "--model",
        type=parse_model,
        nargs="+",
        required=True,
        metavar="METHOD:STEP:FOLDER[:START_FOLDER]",
        help="each method's models in step order; START_FOLDER (default: the method's previous "
        "model, M0 for its first) is the model the step's training started from",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_settings_argument(parser, DriftSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        if not isinstance(args.settings, dict):
            raise InputError("--settings", "must be a JSON object")
        for path in run(args.foundation, args.model, args.out, args.settings):
            print(path)


if __name__ == "__main__":
    run_cli(main)
