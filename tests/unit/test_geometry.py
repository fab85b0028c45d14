"""Tests for stages.core.geometry: preprocessing one case and restoring predictions onto the original grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from stages.core.geometry import (
    GEOMETRY_KEYS,
    apply_label_map,
    canonical_spacing,
    ct_statistics,
    foreground_stats,
    median_spacing,
    nonzero_crop_box,
    normalisation_for_modality,
    preprocess_case,
    preprocess_label,
    restore_labels,
    restore_prediction,
    sample_foreground,
)

SHAPE = (23, 30, 17)


def _affine(kind: str) -> np.ndarray:
    """Voxel-to-world affines: identity, flipped anisotropic (LPS), permuted (PLS) and oblique."""
    a = np.eye(4)
    if kind == "ras":
        return a
    if kind == "lps":
        a[:3, :3] = np.diag([-0.8, -1.3, 2.5])
    elif kind == "pls_permuted":
        a[:3, :3] = [[0, -1.3, 0], [-0.8, 0, 0], [0, 0, 2.5]]
    elif kind == "oblique":
        t = np.deg2rad(12)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        a[:3, :3] = rot @ np.array([[0, 0, 1.7], [-0.9, 0, 0], [0, 1.1, 0]])
    a[:3, 3] = [12.5, -40.0, 7.25]
    return a


def _volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image: noisy body inside a zero margin (so the crop bites); label: nested ellipsoids 1 and 2 inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, np.float32)
    image[2:20, 3:27, 1:15] = 100 + rng.normal(0, 10, (18, 24, 14)).astype(np.float32)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    label = np.zeros(SHAPE, np.uint8)
    label[(x - 11) ** 2 / 36 + (y - 15) ** 2 / 64 + (z - 8) ** 2 / 16 < 1] = 1
    label[(x - 11) ** 2 / 9 + (y - 15) ** 2 / 16 + (z - 8) ** 2 / 4 < 1] = 2
    image[label > 0] += 50
    return image, label


def _interior(label: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Voxels at least ``iterations`` voxels away from any class boundary."""
    inside = np.zeros(label.shape, bool)
    for value in np.unique(label):
        inside |= ndimage.binary_erosion(label == value, iterations=iterations, border_value=1)
    return inside


@pytest.mark.parametrize("kind", ["ras", "lps", "pls_permuted", "oblique"])
def test_round_trip_restores_shape_affine_and_labels(kind: str) -> None:
    affine = _affine(kind)
    image, label = _volume()
    arr, seg, geo = preprocess_case(
        nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine), [1.0, 1.0, 1.0], "mr"
    )
    assert set(geo) == set(GEOMETRY_KEYS)
    assert arr.dtype == np.float32 and arr.shape == (1, *geo["shape"])
    assert seg is not None and seg.dtype == np.uint8 and seg.shape == tuple(geo["shape"])
    assert geo["orig_shape"] == list(SHAPE) and geo["orig_axcodes"] == "".join(nib.aff2axcodes(affine))
    assert np.allclose(np.reshape(geo["orig_affine"], (4, 4)), affine)
    assert np.allclose(geo["orig_spacing"], nib.affines.voxel_sizes(affine))
    assert np.allclose(geo["spacing"], 1.0, atol=0.05)

    one_hot = np.eye(3, dtype=np.float32)[seg].transpose(3, 0, 1, 2)
    for restored in (restore_labels(seg, geo), restore_prediction(one_hot, geo)):
        out = np.asanyarray(restored.dataobj)
        assert out.shape == SHAPE and out.dtype == np.uint8
        assert np.allclose(restored.affine, affine, atol=1e-5)
        assert (out == label).mean() >= 0.98
        inside = _interior(label)
        assert np.array_equal(out[inside], label[inside])


@pytest.mark.parametrize("kind", ["lps", "pls_permuted"])
def test_equal_spacing_is_a_no_op_and_exact(kind: str) -> None:
    affine = _affine(kind)
    image, label = _volume(1)
    target = canonical_spacing(affine)
    arr, seg, geo = preprocess_case(nib.Nifti1Image(image, affine), label, target, "mr")
    assert geo["shape"] == geo["cropped_shape"] and geo["spacing"] == target
    assert np.array_equal(np.asanyarray(restore_labels(seg, geo).dataobj), label)
    # the image is only reoriented, cropped and z-scored: redo that by hand
    canon = nib.orientations.apply_orientation(image, nib.orientations.axcodes2ornt(tuple(geo["orig_axcodes"])))
    b = geo["crop_box"]
    crop = canon[b[0] : b[1], b[2] : b[3], b[4] : b[5]].astype(np.float64)
    assert np.allclose(arr[0], (crop - crop.mean()) / crop.std(), atol=1e-5)


def test_canonical_spacing_and_crop_box_follow_the_orientation() -> None:
    affine = _affine("pls_permuted")  # array axis 0 -> P (0.8 mm), axis 1 -> L (1.3 mm), axis 2 -> S
    assert canonical_spacing(affine) == pytest.approx([1.3, 0.8, 2.5])
    image, _ = _volume()
    _, _, geo = preprocess_case(nib.Nifti1Image(image, affine), None, canonical_spacing(affine), "mr")
    # body is [2:20, 3:27, 1:15] in array axes; canonical R = flipped axis 1, A = flipped axis 0
    assert geo["crop_box"] == [30 - 27, 30 - 3, 23 - 20, 23 - 2, 1, 15]
    assert geo["cropped_shape"] == [24, 18, 14]
    assert nonzero_crop_box(np.zeros((4, 5, 6))) == [0, 4, 0, 5, 0, 6]


def test_anisotropic_target_changes_shape_and_singleton_4d_is_squeezed() -> None:
    image, label = _volume()
    arr, seg, geo = preprocess_case(
        nib.Nifti1Image(image[..., None], np.eye(4)), label, [2.0, 0.5, 1.0], "mr", image_order=1
    )
    assert geo["cropped_shape"] == [18, 24, 14] and geo["shape"] == [9, 48, 14]
    assert geo["spacing"] == pytest.approx([2.0, 0.5, 1.0])
    assert arr.shape == (1, 9, 48, 14) and seg is not None and seg.shape == (9, 48, 14)


def test_mr_normalisation_is_zscore_over_the_body() -> None:
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    body = (x - 11) ** 2 / 81 + (y - 15) ** 2 / 144 + (z - 8) ** 2 / 49 < 1
    image = np.where(body, 1000 + np.random.default_rng(2).normal(0, 300, SHAPE), 0).astype(np.float32)
    image[10:12, 14:16, 7:9] = 0  # a dark hole inside the body still counts as body (nnU-Net fills holes)
    arr, _, geo = preprocess_case(nib.Nifti1Image(image, np.eye(4)), None, [1, 1, 1], "mr")
    b = geo["crop_box"]
    mask = body[b[0] : b[1], b[2] : b[3], b[4] : b[5]]
    assert not mask.all()  # the mask is not the whole crop
    inside = arr[0][mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4
    assert np.all(arr[0][~mask] < -2)  # background keeps its contrast, below the body


def test_ct_normalisation_clips_then_standardises() -> None:
    image, label = _volume()
    image[3, 4, 2] = 5000.0
    image[4, 4, 2] = -3000.0
    stats = {"mean": 120.0, "std": 20.0, "p005": 60.0, "p995": 170.0}
    arr, _, _ = preprocess_case(nib.Nifti1Image(image, np.eye(4)), label, [1, 1, 1], "ct", stats, image_order=1)
    assert float(arr.max()) == pytest.approx((170 - 120) / 20)
    assert float(arr.min()) == pytest.approx((60 - 120) / 20)
    with pytest.raises(ValueError, match="needs ct_stats"):
        preprocess_case(nib.Nifti1Image(image, np.eye(4)), None, [1, 1, 1], "ct")
    with pytest.raises(ValueError, match="unknown normalisation"):
        preprocess_case(nib.Nifti1Image(image, np.eye(4)), None, [1, 1, 1], "zscore")


def test_ct_statistics_from_sampled_foreground() -> None:
    image, label = _volume()
    mask = label > 0
    a = sample_foreground(image, mask, 50, np.random.default_rng(0))
    b = sample_foreground(image, mask, 50, np.random.default_rng(0))
    assert a.size == 50 and np.array_equal(a, b)
    full = sample_foreground(image, mask, 10**9, np.random.default_rng(0))
    assert full.size == int(mask.sum())
    stats = ct_statistics([full])
    assert stats == pytest.approx(foreground_stats(image, mask))
    assert stats["p005"] <= stats["mean"] <= stats["p995"]
    with pytest.raises(ValueError, match="no foreground"):
        ct_statistics([np.empty(0)])


def test_label_map_selects_and_renumbers_classes() -> None:
    affine = _affine("lps")
    image, label = _volume()
    _, seg, geo = preprocess_case(nib.Nifti1Image(image, affine), label, [1, 1, 1], "mr", label_map={2: 1})
    assert seg is not None and set(np.unique(seg)) == {0, 1}
    _, seg_all, _ = preprocess_case(nib.Nifti1Image(image, affine), label, [1, 1, 1], "mr")
    assert seg_all is not None and np.array_equal(seg == 1, seg_all == 2)
    assert np.array_equal(preprocess_label(nib.Nifti1Image(label, affine), geo, {2: 1}), seg)


def test_preprocessing_is_deterministic() -> None:
    affine = _affine("oblique")
    image, label = _volume()
    first = preprocess_case(nib.Nifti1Image(image, affine), label, [1.2, 0.9, 1.5], "mr")
    second = preprocess_case(nib.Nifti1Image(image.copy(), affine), label.copy(), [1.2, 0.9, 1.5], "mr")
    assert first[0].tobytes() == second[0].tobytes() and first[1].tobytes() == second[1].tobytes()
    assert first[2] == second[2]


def test_restore_refuses_wrong_shapes() -> None:
    image, label = _volume()
    _, _seg, geo = preprocess_case(nib.Nifti1Image(image, np.eye(4)), label, [1, 1, 1], "mr")
    with pytest.raises(ValueError, match="probabilities shape"):
        restore_prediction(np.zeros((2, 3, 4, 5), np.float32), geo)
    with pytest.raises(ValueError, match="not the preprocessed shape"):
        restore_labels(np.zeros((3, 4, 5), np.uint8), geo)


def test_restore_prediction_accepts_a_manifest_row_of_arrays() -> None:
    # pandas hands list columns back as numpy arrays
    affine = _affine("lps")
    image, label = _volume()
    _, seg, geo = preprocess_case(nib.Nifti1Image(image, affine), label, [1, 1, 1], "mr")
    row = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in geo.items()}
    logits = np.eye(3, dtype=np.float32)[seg].transpose(3, 0, 1, 2) * 5 - 2
    out = restore_prediction(logits, row)
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(restore_prediction(logits, geo).dataobj))


def test_median_spacing_and_modality_rule() -> None:
    assert median_spacing([[1, 1, 3], [1, 2, 5], [3, 1, 4]]) == [1.0, 1.0, 4.0]
    with pytest.raises(ValueError):
        median_spacing([])
    assert normalisation_for_modality({"0": "CT"}) == "ct"
    assert normalisation_for_modality({"0": "MRI"}) == "mr"
    assert normalisation_for_modality({}) == "mr"
    assert normalisation_for_modality("ct") == "ct"


def test_apply_label_map_forms() -> None:
    label = np.array([0, 1, 2, 3, 2], np.float32).reshape(5, 1, 1, 1)  # float, with a singleton 4th axis
    assert apply_label_map(label, None).ravel().tolist() == [0, 1, 2, 3, 2]
    assert apply_label_map(label, [2]).ravel().tolist() == [0, 0, 1, 0, 1]
    assert apply_label_map(label, [3, 1]).ravel().tolist() == [0, 2, 0, 1, 0]
    assert apply_label_map(label, {"2": 1, "1": 2}).ravel().tolist() == [0, 2, 1, 0, 1]
    assert apply_label_map(label, [2]).dtype == np.uint8
    with pytest.raises(ValueError, match="do not fit uint8"):
        apply_label_map(np.array([[[300]]]), None)
