"""Per-case, per-class Dice, HD95 (mm) and NSD of a label map against its ground truth, using MONAI's metric functions.

Conventions for empty structures (methods.md §0, "Metrics"; the bounded penalty is ours):

============  ============  ======  ===============  =====  ==============
ground truth  prediction    Dice    HD95             NSD    ``flag``
============  ============  ======  ===============  =====  ==============
empty         empty         1       0                1      ``both_empty``
non-empty     empty         0       volume diagonal  0      ``pred_empty``
empty         non-empty     0       volume diagonal  0      ``gt_empty``
non-empty     non-empty     MONAI   MONAI            MONAI  ``""``
============  ============  ======  ===============  =====  ==============

MONAI returns NaN or inf for the empty cases (and warns); they are decided here before MONAI is called,
so every value in the output is finite and every penalty is visible in the ``flag`` column.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stages.core.errors import InputError
from stages.core.metric_names import METRIC_NAMES

__all__ = [
    "FLAGS",
    "METRIC_NAMES",
    "case_metrics",
    "summarise",
    "volume_diagonal_mm",
]


FLAGS: tuple[str, ...] = ("", "both_empty", "pred_empty", "gt_empty")
"""Every value the ``flag`` column can take."""


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of the volume's extent, the bounded HD95 penalty for a missed structure.

    Args:
        shape: spatial shape in voxels.
        spacing: voxel size in mm along each axis.

    The extent is ``shape * spacing`` (voxel faces, not centres), so it bounds every distance MONAI can
    report between two voxels of the volume.
    """
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _validate(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: float | Sequence[float],
    where: str,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Check every argument of :func:`case_metrics`; return spacing and per-class tolerances as tuples."""
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if not isinstance(arr, np.ndarray):
            raise InputError(where, f"{name} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim != 3:
            raise InputError(where, f"{name} must be a 3D label map (X, Y, Z), got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise InputError(where, f"{name} must hold integer labels, got dtype {arr.dtype}")
    if pred.shape != gt.shape:
        raise InputError(where, f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise InputError(where, f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
            raise InputError(
                where,
                f"{name} labels must lie in 0..{num_classes - 1}, found {int(arr.min())}..{int(arr.max())}",
            )
    spacing_t = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    if len(spacing_t) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise InputError(where, f"spacing must be 3 positive finite numbers (mm), got {list(spacing_t)}")
    tol = np.asarray(nsd_tolerance_mm, dtype=float).reshape(-1)
    n_fg = num_classes - 1
    if tol.size == 1:
        tol = np.repeat(tol, n_fg)
    if tol.size != n_fg:
        raise InputError(
            where, f"nsd_tolerance_mm needs one value or one per foreground class ({n_fg}), got {tol.size}"
        )
    if not np.all(np.isfinite(tol)) or np.any(tol < 0):
        raise InputError(where, f"nsd_tolerance_mm must be finite and >= 0, got {tol.tolist()}")
    return spacing_t, tuple(float(t) for t in tol)


def _bbox_slices(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, widened by ``margin`` voxels and clipped to the volume."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(1, 2, X, Y, Z) one-hot tensor (background, structure) of a binary mask, the layout MONAI expects."""
    fg = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~fg, fg]).unsqueeze(0).float()


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    nsd_tolerance_mm: float | Sequence[float],
    where: str = "case_metrics",
) -> list[dict[str, Any]]:
    """Dice, HD95 and NSD of every foreground class of one case.

    Dice is MONAI's ``compute_dice``; HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)``:
    the larger of the two directed 95th percentiles of the edge-voxel distances (Huttenlocher et al.
    1993, percentile variant as in the Medical Segmentation Decathlon); NSD is MONAI's
    ``compute_surface_dice``, the normalised surface Dice of Nikolov et al. 2021 (arXiv 2111.05408):
    the fraction of both boundaries within ``tolerance`` mm of the other. Distances are Euclidean in mm
    (``spacing`` passed to MONAI). Empty structures follow the conventions in the module docstring.

    Each class is cropped to the bounding box of ``pred == c | gt == c`` (plus one voxel, which MONAI's
    own edge extraction also adds) before MONAI sees it: the metrics are unchanged, and a 256³ volume
    with many classes never needs a full-size one-hot float tensor per class.

    Args:
        pred: predicted label map (X, Y, Z), integers 0..num_classes-1.
        gt: ground-truth label map, same shape.
        num_classes: number of classes including background 0.
        spacing: voxel size in mm along X, Y, Z.
        nsd_tolerance_mm: NSD tolerance in mm, one value for all foreground classes or one per class
            (class 1 first).
        where: the file or key named in an :class:`InputError` (e.g. the prediction's path).

    Returns:
        One dict per foreground class c = 1..num_classes-1 with ``class``, ``dice``, ``hd95`` (mm),
        ``nsd``, ``gt_empty``, ``pred_empty``, ``flag`` ("" | "both_empty" | "pred_empty" |
        "gt_empty"), ``gt_voxels`` and ``pred_voxels``.

    Raises:
        InputError: wrong shapes, dtypes, labels outside 0..num_classes-1, bad spacing or tolerances.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    spacing_t, tolerances = _validate(pred, gt, num_classes, spacing, nsd_tolerance_mm, where)
    diagonal = volume_diagonal_mm(pred.shape, spacing_t)
    # one pass over each volume for all voxel counts instead of one comparison per class
    pred_counts = np.bincount(pred.reshape(-1).astype(np.int64, copy=False), minlength=num_classes)
    gt_counts = np.bincount(gt.reshape(-1).astype(np.int64, copy=False), minlength=num_classes)

    rows: list[dict[str, Any]] = []
    for c in range(1, num_classes):
        n_pred, n_gt = int(pred_counts[c]), int(gt_counts[c])
        if n_gt == 0 and n_pred == 0:
            values, flag = {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}, "both_empty"
        elif n_pred == 0:
            values, flag = {"dice": 0.0, "hd95": diagonal, "nsd": 0.0}, "pred_empty"
        elif n_gt == 0:
            values, flag = {"dice": 0.0, "hd95": diagonal, "nsd": 0.0}, "gt_empty"
        else:
            pred_c, gt_c = pred == c, gt == c
            box = _bbox_slices(pred_c | gt_c)
            y_pred, y = _one_hot(pred_c[box]), _one_hot(gt_c[box])
            with warnings.catch_warnings():
                # MONAI 1.6 passes its own deprecated argument internally; the warning is not ours to fix
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False)
                hd95 = compute_hausdorff_distance(
                    y_pred, y, include_background=False, percentile=95, spacing=list(spacing_t)
                )
                nsd = compute_surface_dice(
                    y_pred,
                    y,
                    class_thresholds=[tolerances[c - 1]],
                    include_background=False,
                    spacing=list(spacing_t),
                )
            values = {"dice": float(dice[0, 0]), "hd95": float(hd95[0, 0]), "nsd": float(nsd[0, 0])}
            # both masks are non-empty here, so MONAI has no reason for NaN/inf; fail loudly if it does
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                raise RuntimeError(f"{where}: MONAI returned non-finite {bad} for class {c} with both masks non-empty")
            flag = ""
        rows.append(
            {
                "class": c,
                **values,
                "gt_empty": n_gt == 0,
                "pred_empty": n_pred == 0,
                "flag": flag,
                "gt_voxels": n_gt,
                "pred_voxels": n_pred,
            }
        )
    return rows


def summarise(df: Any, by: Sequence[str] = ("method", "task", "class")) -> Any:
    """Mean and standard deviation of every metric over cases, per group: the layout of the papers' tables.

    Args:
        df: pandas DataFrame of :func:`case_metrics` rows with the ``by`` columns added (one row per
            case and class); metric columns that are absent are skipped.
        by: grouping columns, e.g. ``("method", "task", "class")``; those missing from ``df`` are dropped.

    Returns:
        Long DataFrame with the group columns, ``metric``, ``mean``, ``std`` (sample standard
        deviation, ddof = 1; NaN for a single case) and ``n`` (number of cases), sorted by group then
        metric in :data:`METRIC_NAMES` order.
    """
    import pandas as pd

    keys = [k for k in by if k in df.columns]
    metrics = [m for m in METRIC_NAMES if m in df.columns]
    if not metrics:
        raise InputError("summarise", f"no metric column among {list(METRIC_NAMES)} in {list(df.columns)}")
    long = df.melt(id_vars=keys, value_vars=metrics, var_name="metric", value_name="value")
    long["metric"] = pd.Categorical(long["metric"], categories=list(metrics), ordered=True)
    grouped = long.groupby([*keys, "metric"], observed=True, sort=True)["value"]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    out["metric"] = out["metric"].astype(str)
    return out
