"""Tests for stages.core.metrics: hand-computed Dice, HD95 and NSD, spacing, empty-case conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from stages.core.errors import InputError
from stages.core.metrics import FLAGS, METRIC_NAMES, case_metrics, summarise, volume_diagonal_mm

SHAPES = [(33, 34, 35), (17, 19, 21)]
ANISO = (1.5, 0.7, 2.2)


def _cube(shape: tuple[int, int, int], corner: tuple[int, int, int], side: int, label: int = 1) -> np.ndarray:
    vol = np.zeros(shape, dtype=np.uint8)
    vol[tuple(slice(c, c + side) for c in corner)] = label
    return vol


def _shifted(corner: tuple[int, int, int], axis: int, k: int) -> tuple[int, int, int]:
    out = list(corner)
    out[axis] += k
    return (out[0], out[1], out[2])


def _only(rows: list[dict], cls: int = 1) -> dict:
    (row,) = [r for r in rows if r["class"] == cls]
    return row


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("side", [5, 8])
def test_dice_of_one_voxel_shift_is_side_minus_one_over_side(shape, axis, side):
    # overlap s^2 (s - 1) voxels, each cube s^3: Dice = 2 s^2 (s-1) / 2 s^3 = (s - 1) / s
    corner = (3, 4, 5)
    gt = _cube(shape, corner, side)
    pred = _cube(shape, _shifted(corner, axis, 1), side)
    row = _only(case_metrics(pred, gt, 2, ANISO, 1.0))
    assert row["dice"] == pytest.approx((side - 1) / side, rel=1e-6)
    assert row["flag"] == ""
    assert row["gt_voxels"] == row["pred_voxels"] == side**3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_shifted_cube_is_shift_times_axis_spacing(shape, axis, k):
    # Two identical cubes of side s, shifted by k < s voxels along `axis`. Every edge voxel of the other
    # cube lies on the far side of the shift, so an edge voxel is at most k * spacing[axis] from the
    # nearest edge of the other cube (0 on the shared side faces, j steps for the j-th non-shared ring,
    # at most k for the trailing face), and the whole leading face attains k * spacing[axis] exactly.
    # That face holds s^2 of the s^3 - (s-2)^3 edge voxels (> 20 % for s = 8), more than the top 5 %,
    # so the 95th percentile in each direction equals the maximum: HD95 = k * spacing[axis] in mm.
    side = 8
    corner = (4, 5, 6)
    gt = _cube(shape, corner, side)
    pred = _cube(shape, _shifted(corner, axis, k), side)
    row = _only(case_metrics(pred, gt, 2, ANISO, 0.1))
    assert row["hd95"] == pytest.approx(k * ANISO[axis], rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_hd95_of_single_voxels_is_their_distance_in_mm(shape):
    gt = np.zeros(shape, dtype=np.int16)
    pred = np.zeros(shape, dtype=np.int16)
    gt[5, 6, 7] = 1
    pred[9, 6, 10] = 1
    expected = math.hypot(4 * ANISO[0], 3 * ANISO[2])
    row = _only(case_metrics(pred, gt, 2, ANISO, expected + 0.01))
    assert row["hd95"] == pytest.approx(expected, rel=1e-6)
    assert row["dice"] == 0.0
    assert row["nsd"] == pytest.approx(1.0)
    below = _only(case_metrics(pred, gt, 2, ANISO, expected - 0.01))
    assert below["nsd"] == pytest.approx(0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [0, 2])
def test_nsd_is_one_within_tolerance_and_below_one_beyond(shape, axis):
    k, side = 2, 7
    corner = (3, 3, 3)
    gt = _cube(shape, corner, side)
    pred = _cube(shape, _shifted(corner, axis, k), side)
    offset_mm = k * ANISO[axis]
    within = _only(case_metrics(pred, gt, 2, ANISO, offset_mm + 1e-3))
    beyond = _only(case_metrics(pred, gt, 2, ANISO, offset_mm - 1e-3))
    assert within["nsd"] == pytest.approx(1.0)
    # the two leading faces (s^2 voxels each) are exactly offset_mm away, so they fall outside
    assert 0.0 < beyond["nsd"] < 1.0
    assert beyond["nsd"] <= 1.0 - 2 * side**2 / (2 * (side**3 - (side - 2) ** 3)) + 1e-6
    # NSD at zero tolerance counts only the shared side faces
    zero = _only(case_metrics(pred, gt, 2, ANISO, 0.0))
    assert zero["nsd"] < beyond["nsd"]


def _blobs(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two different, irregular three-class label maps (deterministic)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(2):
        vol = np.zeros(shape, dtype=np.uint8)
        for label in (1, 2):
            centre = rng.uniform(0.3, 0.7, size=3) * np.array(shape)
            radii = rng.uniform(3.0, 7.0, size=3)
            vol[(((grid - centre) / radii) ** 2).sum(-1) < 1.0] = label
        maps.append(vol)
    return maps[0], maps[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_doubled_spacing_doubles_hd95_and_keeps_dice(shape):
    pred, gt = _blobs(shape, seed=1)
    base = case_metrics(pred, gt, 3, ANISO, [1.0, 2.0])
    doubled = case_metrics(pred, gt, 3, [2 * s for s in ANISO], [2.0, 4.0])
    for a, b in zip(base, doubled, strict=True):
        assert a["flag"] == b["flag"] == ""
        assert a["hd95"] > 0
        assert b["hd95"] == pytest.approx(2 * a["hd95"], rel=1e-5)
        assert b["dice"] == pytest.approx(a["dice"])
        # tolerance doubled with the spacing: the same boundary voxels pass
        assert b["nsd"] == pytest.approx(a["nsd"])


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_monai_on_full_one_hot_volume(shape):
    # per-class cropping is an optimisation only: the numbers equal MONAI on the uncropped one-hot volume
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    pred, gt = _blobs(shape, seed=2)
    tol = [1.5, 2.5]
    rows = case_metrics(pred, gt, 3, ANISO, tol)
    yp, y = (
        torch.nn.functional.one_hot(torch.from_numpy(v).long(), 3).movedim(-1, 0)[None].float() for v in (pred, gt)
    )
    dice = compute_dice(yp, y, include_background=False, ignore_empty=False)[0]
    hd95 = compute_hausdorff_distance(yp, y, percentile=95, spacing=list(ANISO))[0]
    nsd = compute_surface_dice(yp, y, class_thresholds=tol, spacing=list(ANISO))[0]
    for i, row in enumerate(rows):
        assert row["dice"] == pytest.approx(float(dice[i]), abs=1e-7)
        assert row["hd95"] == pytest.approx(float(hd95[i]), abs=1e-6)
        assert row["nsd"] == pytest.approx(float(nsd[i]), abs=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_structure_touching_the_border_scores_like_one_inside(shape):
    # cropping is clipped at the volume border; edges there must still count as surface
    side, k, axis = 6, 2, 1
    inside = case_metrics(
        _cube(shape, _shifted((5, 5, 5), axis, k), side), _cube(shape, (5, 5, 5), side), 2, ANISO, 1.0
    )
    border = case_metrics(
        _cube(shape, _shifted((0, 0, 0), axis, k), side), _cube(shape, (0, 0, 0), side), 2, ANISO, 1.0
    )
    for name in METRIC_NAMES:
        assert border[0][name] == pytest.approx(inside[0][name])


@pytest.mark.parametrize("shape", SHAPES)
def test_empty_case_conventions_and_flags(shape):
    spacing = (0.8, 1.0, 3.0)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))
    assert volume_diagonal_mm(shape, spacing) == pytest.approx(diagonal)
    cube = _cube(shape, (2, 2, 2), 4)
    empty = np.zeros(shape, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask warnings must not be reached
        both = _only(case_metrics(empty, empty, 2, spacing, 1.0))
        missed = _only(case_metrics(empty, cube, 2, spacing, 1.0))
        spurious = _only(case_metrics(cube, empty, 2, spacing, 1.0))
    assert (both["dice"], both["hd95"], both["nsd"], both["flag"]) == (1.0, 0.0, 1.0, "both_empty")
    assert both["gt_empty"] and both["pred_empty"]
    assert (missed["dice"], missed["nsd"], missed["flag"]) == (0.0, 0.0, "pred_empty")
    assert missed["hd95"] == pytest.approx(diagonal)
    assert not missed["gt_empty"] and missed["pred_empty"]
    assert (missed["gt_voxels"], missed["pred_voxels"]) == (64, 0)
    assert (spurious["dice"], spurious["nsd"], spurious["flag"]) == (0.0, 0.0, "gt_empty")
    assert spurious["hd95"] == pytest.approx(diagonal)
    assert spurious["gt_empty"] and not spurious["pred_empty"]
    for row in (both, missed, spurious):
        assert row["flag"] in FLAGS
        assert all(math.isfinite(row[m]) for m in METRIC_NAMES)


def test_multiclass_rows_per_class_tolerances_and_keys():
    shape = (33, 34, 35)
    gt = _cube(shape, (2, 2, 2), 6, label=1)
    gt[20:26, 20:26, 20:26] = 2
    pred = _cube(shape, (2, 2, 2), 6, label=1)  # class 1 perfect, class 2 missed, class 3 absent
    pred[30, 30, 30] = 4  # class 4 spurious
    rows = case_metrics(pred, gt, 5, (1.0, 1.0, 1.0), [1.0, 2.0, 3.0, 4.0])
    assert [r["class"] for r in rows] == [1, 2, 3, 4]
    assert [r["flag"] for r in rows] == ["", "pred_empty", "both_empty", "gt_empty"]
    assert (rows[0]["dice"], rows[0]["hd95"], rows[0]["nsd"]) == (pytest.approx(1.0), 0.0, pytest.approx(1.0))
    assert rows[1]["gt_voxels"] == 216 and rows[3]["pred_voxels"] == 1
    expected_keys = {"class", "dice", "hd95", "nsd", "gt_empty", "pred_empty", "flag", "gt_voxels", "pred_voxels"}
    assert all(set(r) == expected_keys for r in rows)
    assert pd.DataFrame(rows)["class"].dtype.kind == "i"


@pytest.mark.parametrize(
    ("pred", "gt", "num_classes", "spacing", "tol", "match"),
    [
        (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 8), np.uint8), 2, (1, 1, 1), 1.0, "differs"),
        (np.zeros((5, 6), np.uint8), np.zeros((5, 6), np.uint8), 2, (1, 1, 1), 1.0, "3D"),
        (np.full((5, 6, 7), 3, np.uint8), np.zeros((5, 6, 7), np.uint8), 3, (1, 1, 1), 1.0, "0..2"),
        (np.zeros((5, 6, 7), np.float32), np.zeros((5, 6, 7), np.uint8), 2, (1, 1, 1), 1.0, "integer"),
        (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 7), np.uint8), 2, (1, 1), 1.0, "spacing"),
        (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 7), np.uint8), 2, (1, 0, 1), 1.0, "spacing"),
        (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 7), np.uint8), 3, (1, 1, 1), [1, 2, 3], "one per"),
        (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 7), np.uint8), 2, (1, 1, 1), -1.0, ">= 0"),
        (np.zeros((5, 6, 7), np.uint8), np.zeros((5, 6, 7), np.uint8), 1, (1, 1, 1), 1.0, "num_classes"),
    ],
)
def test_bad_arguments_raise_input_error_naming_the_problem(pred, gt, num_classes, spacing, tol, match):
    with pytest.raises(InputError, match=match) as info:
        case_metrics(pred, gt, num_classes, spacing, tol, where="eval/x/case_001.nii.gz")
    assert info.value.where == "eval/x/case_001.nii.gz"


def test_summarise_mean_std_per_group():
    df = pd.DataFrame(
        {
            "method": ["a", "a", "a", "b"],
            "task": ["t", "t", "t", "t"],
            "case": ["c1", "c2", "c3", "c1"],
            "class": [1, 1, 1, 1],
            "dice": [0.5, 0.7, 0.9, 0.4],
            "hd95": [1.0, 2.0, 3.0, 5.0],
            "nsd": [1.0, 1.0, 1.0, 0.0],
        }
    )
    out = summarise(df)
    assert list(out.columns) == ["method", "task", "class", "metric", "mean", "std", "n"]
    a = out[out["method"] == "a"].set_index("metric")
    assert list(a.index) == list(METRIC_NAMES)
    assert a.loc["dice", "mean"] == pytest.approx(0.7)
    assert a.loc["dice", "std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert a.loc["hd95", "n"] == 3
    assert out[out["method"] == "b"].set_index("metric").loc["hd95", "mean"] == pytest.approx(5.0)
