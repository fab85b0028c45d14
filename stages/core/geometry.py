"""Preprocess one case (canonical orientation, crop, resample, normalise) and map predictions back exactly.

The order follows nnU-Net (Isensee et al., "nnU-Net: a self-configuring method for deep learning-based
biomedical image segmentation", Nature Methods 18, 203-211, 2021): reorient to the closest canonical
RAS orientation (exact axis permutations and flips, as nibabel's ``as_closest_canonical``), crop to the
bounding box of the non-zero image voxels, resample to the target spacing (image: cubic spline,
labels: nearest neighbour), normalise intensities (``ct``: clip to the dataset's foreground 0.5/99.5
percentiles, then z-score with the dataset's foreground mean and std; ``mr``: per-case z-score over
the non-zero mask).

Every step is recorded in a geometry dict whose keys are the manifest's geometry columns
(``orig_shape``, ``orig_spacing``, ``orig_affine``, ``orig_axcodes``, ``crop_box``, ``cropped_shape``,
``shape``, ``spacing``), so a manifest row is all :func:`restore_prediction` needs to put a
prediction back onto the original grid, orientation and affine.

Conventions: ``crop_box`` is ``[x0, x1, y0, y1, z0, z1]`` with half-open ranges (Python slices) in the
voxel indices of the canonical (RAS) full grid; ``spacing`` and ``target_spacing`` are in canonical
axis order; ``orig_spacing`` is in the original axis order. Resampling maps voxel *extents* onto each
other (``scipy.ndimage.zoom(grid_mode=True)``), so the crop covers the same physical box before and
after and ``spacing`` is the effective one, ``cropped_extent / shape``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt2axcodes, ornt_transform
from scipy import ndimage

__all__ = [
    "GEOMETRY_KEYS",
    "NORMALISATIONS",
    "apply_label_map",
    "canonical_spacing",
    "class_counts",
    "ct_statistics",
    "foreground_stats",
    "median_spacing",
    "nonzero_crop_box",
    "normalisation_for_modality",
    "preprocess_case",
    "preprocess_label",
    "resample",
    "restore_labels",
    "restore_prediction",
    "sample_foreground",
]

GEOMETRY_KEYS = (
    "orig_shape",
    "orig_spacing",
    "orig_affine",
    "orig_axcodes",
    "crop_box",
    "cropped_shape",
    "shape",
    "spacing",
)
NORMALISATIONS = ("ct", "mr")
_CANONICAL = axcodes2ornt(("R", "A", "S"))
_SPACING_RTOL = 1e-5
_EPS = 1e-8
_COUNT_BLOCK = 1 << 22  # voxels per np.bincount call (its int64 copy: 32 MiB)
_FILL_BY_LABELS_MAX = 1 << 22  # voxels up to which holes are filled by labelling (int32: 16 MiB)


# ------------------------------------------------------------------------------------------- helpers


def _as_3d(data: np.ndarray) -> np.ndarray:
    """Drop a trailing singleton 4th (5th ...) axis, as MSD validation allows."""
    data = np.asanyarray(data)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    return data


def _voxels(image: nib.spatialimages.SpatialImage | np.ndarray) -> np.ndarray:
    return np.asanyarray(image.dataobj) if isinstance(image, nib.spatialimages.SpatialImage) else np.asarray(image)


def canonical_spacing(affine: np.ndarray) -> list[float]:
    """Voxel sizes (mm) along the canonical RAS axes of the grid ``affine`` describes.

    Args:
        affine: 4x4 voxel-to-world affine.
    """
    return _canonical_spacing(affine, _io_orientation(affine))


@functools.lru_cache(maxsize=256)
def _orientation_of(rzs: bytes) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.frombuffer(rzs, dtype=np.float64).reshape(3, 3)
    return io_orientation(affine)


def _io_orientation(affine: np.ndarray) -> np.ndarray:
    """``nibabel.orientations.io_orientation(affine)``, cached on the 3x3 rotation-zoom block.

    It reads nothing else of the affine, costs an SVD per call, and the cases of a dataset nearly
    always share that block (all 260 of MSD Hippocampus do).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        return io_orientation(affine)
    return _orientation_of(np.ascontiguousarray(affine[:3, :3]).tobytes()).copy()


def _canonical_spacing(affine: np.ndarray, ornt: np.ndarray) -> list[float]:
    sizes = nib.affines.voxel_sizes(affine)
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt[:3]):
        out[int(target)] = float(sizes[axis])
    return out


def _canonical_shape(orig_shape: Sequence[int], axcodes: str) -> tuple[int, int, int]:
    ornt = axcodes2ornt(tuple(axcodes))
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = int(orig_shape[axis])
    return (out[0], out[1], out[2])


def _to_canonical(data: np.ndarray, axcodes: str) -> np.ndarray:
    return apply_orientation(data, axcodes2ornt(tuple(axcodes)))


def _from_canonical(data: np.ndarray, axcodes: str) -> np.ndarray:
    return apply_orientation(data, ornt_transform(_CANONICAL, axcodes2ornt(tuple(axcodes))))


def nonzero_crop_box(data: np.ndarray) -> list[int]:
    """Bounding box ``[x0, x1, y0, y1, z0, z1]`` (half-open) of the non-zero voxels; the full grid if none.

    Args:
        data: a 3D array.
    """
    box: list[int] = []
    nonzero = data != 0
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(nonzero.any(axis=other))
        box += [int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(data.shape[axis])]
    return box


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)``, the same voxels, computed the cheaper way for the volume.

    A crop that is non-zero everywhere (MRI bodies filling their box, CT whose air is -1000) has no
    holes, but scipy would still run its border dilation over the whole volume. A small volume
    labels its background once instead (face connectivity, scipy's default structure): holes are the
    background components that touch no face of the array, which is what scipy's dilation from the
    border leaves unreached. Large volumes keep scipy's way, whose bool temporaries take a quarter
    of the int32 component labels' memory.
    """
    if mask.all():
        return mask
    if mask.size > _FILL_BY_LABELS_MAX:
        return ndimage.binary_fill_holes(mask)
    background, count = ndimage.label(~mask)
    outside = np.zeros(count + 1, dtype=bool)
    for axis in range(mask.ndim):
        outside[np.take(background, 0, axis=axis)] = True
        outside[np.take(background, -1, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def _slices(box: Sequence[int]) -> tuple[slice, slice, slice]:
    b = [int(v) for v in box]
    return slice(b[0], b[1]), slice(b[2], b[3]), slice(b[4], b[5])


def resample(data: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample a 3D array onto ``shape`` voxels covering the same extent (deterministic, scipy).

    Args:
        data: 3D array.
        shape: the output shape.
        order: spline order (0 nearest for labels, 1 linear, 3 cubic for images).
    """
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape) == shape:
        return data
    zoom = [n / o for n, o in zip(shape, data.shape)]
    out = ndimage.zoom(data, zoom, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if tuple(out.shape) != shape:  # zoom rounds in*factor; guard the float edge case
        raise AssertionError(f"resampled to {out.shape}, wanted {shape}")
    return out


def _target_shape(
    cropped_shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[list[int], list[float]]:
    if np.allclose(spacing, target, rtol=_SPACING_RTOL, atol=0):
        return [int(s) for s in cropped_shape], [float(s) for s in spacing]
    shape = [max(1, int(np.floor(n * s / t + 0.5))) for n, s, t in zip(cropped_shape, spacing, target)]
    effective = [n * s / m for n, s, m in zip(cropped_shape, spacing, shape)]
    return shape, [float(e) for e in effective]


def class_counts(seg: np.ndarray, num_classes: int) -> list[int]:
    """Voxels per class ``0..num_classes-1`` (more if ``seg`` holds larger values), as ``np.bincount``.

    Args:
        seg: a non-negative integer label array (uint8 task classes).
        num_classes: the least number of counts returned.

    Counted in blocks: ``np.bincount`` casts its input to int64, 8 bytes a voxel of a large CT.
    """
    flat = np.asarray(seg).ravel(order="K")  # memory order: no copy of a Fortran-ordered array
    counts = np.zeros(num_classes, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_BLOCK):
        block = np.bincount(flat[start : start + _COUNT_BLOCK], minlength=num_classes)
        if block.size > counts.size:
            counts = np.concatenate([counts, np.zeros(block.size - counts.size, dtype=np.int64)])
        counts[: block.size] += block
    return [int(v) for v in counts]


def apply_label_map(
    data: np.ndarray, label_map: Mapping[int, int] | Mapping[str, int] | Sequence[int] | None
) -> np.ndarray:
    """Source label values -> task classes as uint8 (values not in the map become background 0).

    Args:
        data: a label array (integer, or integer-valued float; a trailing singleton axis is dropped).
        label_map: ``{source: class}`` (keys may be strings, as in the manifest's provenance
            ``label_map``); or the ``labels`` setting, a list of source values mapped to 1..n in
            order; ``None`` keeps the values as they are.
    """
    values = _as_3d(data)
    if values.dtype.kind == "f":
        values = np.rint(values).astype(np.int64)
    elif values.dtype.kind not in "iu":
        values = values.astype(np.int64)
    # integer labels are compared in their own dtype: an int64 copy of a CT label would take twice
    # the memory of the float32 image
    if label_map is None:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError(f"label values {values.min()}..{values.max()} do not fit uint8; give a label_map")
        return values.astype(np.uint8)
    if not isinstance(label_map, Mapping):
        label_map = {int(source): cls for cls, source in enumerate(label_map, start=1)}
    limits = np.iinfo(values.dtype)
    pairs = [(int(s), int(t)) for s, t in label_map.items() if limits.min <= int(s) <= limits.max]
    if values.dtype in (np.uint8, np.uint16):
        # one lookup pass; values outside the map find 0 (background), as in the loop below
        lut = np.zeros(int(limits.max) + 1, dtype=np.uint8)
        for source, target in pairs:
            lut[source] = target
        return lut[values]
    seg = np.zeros_like(values, dtype=np.uint8)  # the label's own memory order: the masks match it
    for source, target in pairs:  # a source out of the dtype's range can match no voxel
        seg[values == source] = target
    return seg


# ------------------------------------------------------------------------------------ normalisation


def normalisation_for_modality(modality: Mapping[str, str] | str | None) -> str:
    """``ct`` when the (first) modality is CT, else ``mr`` (nnU-Net's rule: only CT gets dataset-wide stats).

    Args:
        modality: dataset.json ``modality`` mapping, or one modality name.
    """
    if isinstance(modality, Mapping):
        modality = next(iter(modality.values()), None) if modality else None
    return "ct" if modality is not None and str(modality).strip().upper() == "CT" else "mr"


def foreground_stats(image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean, std and 0.5/99.5 percentiles of ``image`` over ``mask`` (non-zero voxels if it is empty or absent).

    Args:
        image: intensities.
        mask: boolean foreground of the same shape.
    """
    values = image[mask] if mask is not None and mask.any() else image[image != 0]
    if values.size == 0:
        values = image.ravel()
    values = values.astype(np.float64, copy=False)
    p005, p995 = np.percentile(values, [0.5, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p005": float(p005),
        "p995": float(p995),
    }


def sample_foreground(image: np.ndarray, mask: np.ndarray, max_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``max_voxels`` foreground intensities, drawn without replacement (nnU-Net samples 10,000 per case).

    Args:
        image: intensities.
        mask: boolean foreground.
        max_voxels: cap per case, so that large CT sets fit in memory.
        rng: the seeded generator that makes the draw reproducible.
    """
    values = image[mask].astype(np.float64, copy=False)
    if values.size > max_voxels:
        values = values[np.sort(rng.choice(values.size, size=max_voxels, replace=False))]
    return values


def ct_statistics(samples: Sequence[np.ndarray]) -> dict[str, float]:
    """Dataset-wide CT statistics (mean, std, p005, p995) of pooled foreground intensities (nnU-Net CTNormalization).

    Args:
        samples: per-case foreground intensities, e.g. from :func:`sample_foreground`.
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.empty(0)
    if pooled.size == 0:
        raise ValueError("no foreground voxels to compute CT statistics from")
    return foreground_stats(pooled, np.ones(pooled.shape, dtype=bool))


# planes per block of the normalisation: its temporaries (float64 for mr) stay a few MiB; volumes
# up to _NORMALISE_WHOLE voxels are done in one block (a loop costs more than it saves there)
_NORMALISE_BLOCK = 16
_NORMALISE_WHOLE = 1 << 20


def _normalise(
    image: np.ndarray, mask: np.ndarray, norm: str, ct_stats: Mapping[str, float] | None, in_place: bool = False
) -> np.ndarray:
    """The normalised image as float32; ``in_place`` overwrites ``image`` (float32) instead of allocating.

    The formula is applied block by block along the first axis; element-wise arithmetic gives each
    voxel the same bits as on the whole array (same dtypes, same operations), without whole-volume
    temporaries (the ``mr`` statistics are float64, which would make one of twice the image's size).
    """
    if norm == "ct":
        if ct_stats is None:
            raise ValueError("ct normalisation needs ct_stats (mean, std, p005, p995)")
        low, high, mean = ct_stats["p005"], ct_stats["p995"], ct_stats["mean"]
        std = max(float(ct_stats["std"]), _EPS)

        def formula(block: np.ndarray) -> np.ndarray:
            return (np.clip(block, low, high) - mean) / std

    elif norm == "mr":
        values = image[mask] if mask.any() else image.ravel()
        values = values.astype(np.float64, copy=False)
        mean, std = values.mean(), max(float(values.std()), _EPS)
        del values

        def formula(block: np.ndarray) -> np.ndarray:
            return (block - mean) / std

    else:
        raise ValueError(f"unknown normalisation {norm!r} (expected one of {NORMALISATIONS})")
    out = image if in_place and image.dtype == np.float32 else np.empty(image.shape, dtype=np.float32)
    planes = image.shape[0] if image.size <= _NORMALISE_WHOLE else _NORMALISE_BLOCK  # small: one go
    for start in range(0, image.shape[0], max(1, planes)):
        block = slice(start, start + max(1, planes))
        out[block] = formula(image[block])  # the assignment casts to float32 as np.asarray did
    return out


# ------------------------------------------------------------------------------------- forward pass


def preprocess_case(
    image: nib.Nifti1Image | Any,
    label: nib.Nifti1Image | np.ndarray | None,
    target_spacing: Sequence[float],
    norm: str,
    ct_stats: Mapping[str, float] | None = None,
    label_map: Mapping[int, int] | None = None,
    image_order: int = 3,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Reorient, crop, resample and normalise one case.

    Args:
        image: the image (3D, or 4D with a last axis of 1): a nibabel image, or any object with its
            ``dataobj`` (array) and ``affine`` (4x4), which spares building a NIfTI header.
        label: its label on the same grid (an image, or an array of the image's shape), or ``None``.
        target_spacing: mm per voxel along the canonical R, A, S axes.
        norm: ``ct`` or ``mr`` (see the module docstring).
        ct_stats: dataset foreground ``mean``, ``std``, ``p005``, ``p995`` (``ct`` only).
        label_map: source label value -> task class; values not in it become 0. ``None`` keeps the values.
        image_order: spline order for the image (3 cubic as nnU-Net, 1 linear).

    Returns ``(image float32 (1, X, Y, Z), seg uint8 (X, Y, Z) or None, geometry)``.
    """
    affine = np.asarray(image.affine, dtype=np.float64)
    data = _as_3d(np.asanyarray(image.dataobj))
    ornt = _io_orientation(affine)  # once: nib.aff2axcodes would compute it again
    axcodes = "".join(ornt2axcodes(ornt))
    orig_shape = [int(s) for s in data.shape]

    # Memory: integer and float32 voxels are cropped first and converted with the one copy the crop
    # needs (a voxel is non-zero before the float32 cast exactly when it is after it); other floats
    # (float64 from scaled integers) may round to 0, so they are converted first as before.
    if data.dtype.kind not in "biu" and data.dtype != np.float32:
        data = data.astype(np.float32)
    canon = _to_canonical(data, axcodes)  # a view: flips and transposes only
    box = nonzero_crop_box(canon)
    # nnU-Net's non-zero mask fills holes so that dark structures inside the body count as body;
    # made before the float32 crop exists, so that scipy's temporaries and the crop do not meet
    body = _fill_holes(canon[_slices(box)] != 0)
    cropped = np.array(canon[_slices(box)], dtype=np.float32, order="C")
    del data, canon
    shape, spacing = _target_shape(cropped.shape, _canonical_spacing(affine, ornt), target_spacing)
    geometry: dict[str, Any] = {
        "orig_shape": orig_shape,
        "orig_spacing": [float(s) for s in nib.affines.voxel_sizes(affine)],
        "orig_affine": [float(v) for v in affine.ravel()],
        "orig_axcodes": axcodes,
        "crop_box": box,
        "cropped_shape": [int(s) for s in cropped.shape],
        "shape": shape,
        "spacing": spacing,
    }

    resampled = resample(cropped, shape, image_order).astype(np.float32, copy=False)
    del cropped  # freed here when resampling made a new array
    if tuple(body.shape) != tuple(shape):  # resample() would hand an unchanged grid straight back
        body = resample(body.astype(np.uint8), shape, 0).astype(bool)
    # resampled is this function's own array (the crop copy or scipy's output): normalise in place
    image_out = _normalise(resampled, body, norm, ct_stats, in_place=True)[None]
    del resampled, body

    seg = None
    if label is not None:
        label_data = _as_3d(_voxels(label))
        if tuple(label_data.shape) != tuple(orig_shape):
            raise ValueError(f"label shape {label_data.shape} differs from image shape {tuple(orig_shape)}")
        seg = preprocess_label(label_data, geometry, label_map)
    return np.ascontiguousarray(image_out), seg, geometry


def preprocess_label(
    label: nib.Nifti1Image | np.ndarray, geometry: Mapping[str, Any], label_map: Mapping[int, int] | None = None
) -> np.ndarray:
    """Bring a label on the original grid onto the preprocessed grid ``geometry`` describes (nearest).

    Args:
        label: label image or array in the original orientation and shape.
        geometry: a geometry dict or manifest row.
        label_map: source value -> task class (others -> 0); ``None`` keeps the values.

    Used by :func:`preprocess_case` and by steps that receive labels later (an annotation oracle).
    """
    seg = apply_label_map(_voxels(label), label_map)
    canon = _to_canonical(seg, str(geometry["orig_axcodes"]))
    cropped = np.ascontiguousarray(canon[_slices(geometry["crop_box"])])
    return np.ascontiguousarray(resample(cropped, geometry["shape"], 0).astype(np.uint8, copy=False))


# ------------------------------------------------------------------------------------- inverse pass


def _uncrop_reorient(cropped: np.ndarray, geometry: Mapping[str, Any]) -> nib.Nifti1Image:
    axcodes = str(geometry["orig_axcodes"])
    full = np.zeros(_canonical_shape(geometry["orig_shape"], axcodes), dtype=cropped.dtype)
    full[_slices(geometry["crop_box"])] = cropped
    data = np.ascontiguousarray(_from_canonical(full, axcodes))
    affine = np.asarray(geometry["orig_affine"], dtype=np.float64).reshape(4, 4)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    return img


def restore_labels(seg: np.ndarray, geometry: Mapping[str, Any]) -> nib.Nifti1Image:
    """Map an integer map on the preprocessed grid back to the original grid (nearest neighbour).

    Args:
        seg: integer array (X, Y, Z) on the preprocessed grid.
        geometry: the case's geometry dict or manifest row.

    Returns a NIfTI image with the original shape, orientation and affine; 0 outside the crop.
    """
    seg = np.asarray(seg)
    if tuple(seg.shape) != tuple(int(s) for s in geometry["shape"]):
        raise ValueError(f"seg shape {seg.shape} is not the preprocessed shape {list(geometry['shape'])}")
    cropped = resample(seg, geometry["cropped_shape"], 0)
    return _uncrop_reorient(np.ascontiguousarray(cropped), geometry)


def restore_prediction(probabilities: Any, geometry: Mapping[str, Any]) -> nib.Nifti1Image:
    """Turn class probabilities on the preprocessed grid into a uint8 label image on the original grid.

    Each class channel is resampled linearly to the cropped canonical grid and the argmax is taken
    there (interpolating probabilities, not labels, as nnU-Net does), then the crop is padded with
    background and the reorientation undone.

    Args:
        probabilities: array (C, X, Y, Z) (numpy, or a CPU torch tensor) on the preprocessed grid;
            logits work too (the argmax of linearly interpolated scores).
        geometry: the case's geometry dict or manifest row.
    """
    if hasattr(probabilities, "detach"):
        probabilities = probabilities.detach().cpu().numpy()
    probs = np.asarray(probabilities)
    shape = tuple(int(s) for s in geometry["shape"])
    if probs.ndim != 4 or tuple(probs.shape[1:]) != shape:
        raise ValueError(f"probabilities shape {probs.shape} is not (C, {', '.join(map(str, shape))})")
    if probs.shape[0] > 255:
        raise ValueError(f"{probs.shape[0]} classes do not fit uint8")
    target = tuple(int(s) for s in geometry["cropped_shape"])
    # running argmax keeps memory at two volumes however many classes there are
    best = labels = None
    for c in range(probs.shape[0]):
        channel = resample(probs[c].astype(np.float32, copy=False), target, 1)
        if best is None:
            best, labels = channel.copy(), np.zeros(target, dtype=np.uint8)
        else:
            assert labels is not None
            better = channel > best
            best[better] = channel[better]
            labels[better] = c
    assert labels is not None
    return _uncrop_reorient(labels, geometry)


def median_spacing(spacings: Sequence[Sequence[float]]) -> list[float]:
    """Per-axis median of voxel spacings (nnU-Net's default target spacing).

    Args:
        spacings: one (3,) spacing per case, in the same (canonical) axis order.
    """
    arr = np.asarray(spacings, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 3:
        raise ValueError(f"expected a non-empty list of 3 spacings, got shape {arr.shape}")
    return [float(v) for v in np.median(arr, axis=0)]
