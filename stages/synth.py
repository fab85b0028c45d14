"""Generate the embedded demo data: seeded synthetic 3D phantoms written as real MSD-layout NIfTI datasets.

Five datasets are written under ``out_dir`` (names fixed, the pipeline config refers to them):

- ``organ_lesion`` — CT-like (int16 Hounsfield units, air about -1000), labels 0 background, 1 organ,
  2 lesion. Anisotropic spacing (0.8 x 0.8 x 2.0 mm in RAS terms) and stored in a non-RAS orientation
  (voxel axes ``P, I, L``: a permutation with flips) with a non-zero origin, so the geometry code must
  really reorient. Cases whose index is ``2 mod 6`` have no lesion (recorded as ``"lesion": false``).
- ``paired_organs`` — MRI-like, labels 0, 1 left, 2 right: two mirrored ellipsoid organs.
- ``tubular`` — MRI-like, labels 0, 1 vessel: a thin helical tube (radius 1.5-2.5 mm) along a limb.
- ``unseen`` — MRI-like, labels 0, 1 cyst, 2 wall: a ring-walled cyst, anatomy the pool never shows.
- ``pool`` — unlabelled MRI-like images of organ / paired-organ / tube anatomy (``imagesTs/``,
  ``"training": []``) for self-supervised pre-training.

Every image has a body of non-zero tissue inside zero background (MRI) or air (CT), a smooth
multiplicative bias field, partial-volume blur and noise. Each case draws a ``domain_shift`` level in
[0, 1] (pool: [0, 0.5]) that scales noise, bias strength, blur and gain, so cases differ in how much
they resemble the pool; every drawn parameter is recorded in ``dataset.json`` under ``synth_cases``.

Determinism: case ``i`` of dataset ``d`` draws from ``numpy.random.default_rng([seed, key(d), i])``,
so adding cases leaves earlier ones unchanged; NIfTI files are gzip-compressed with ``mtime=0`` and no
file name, so a rerun with the same seed gives byte-identical files. Each dataset is built in a
temporary sibling folder and swapped into place whole (:func:`stages.core.io.build_folder`), so a
killed run leaves no half-written dataset.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.io import atomic_path, build_folder, make_provenance, save_json
from stages.core.log import stage_log
from stages.core.settings import add_settings_argument

__all__ = [
    "CT_AXCODES",
    "CT_SPACING",
    "DATASETS",
    "DEFAULT_SETTINGS",
    "LESION_ABSENT_EVERY",
    "main",
    "resolve_settings",
    "run",
]

DEFAULT_SETTINGS: dict[str, Any] = {"seed": 0, "shape": [40, 40, 32], "cases_per_task": 12, "pool_cases": 16}

#: dataset folder names, in the order they are written
DATASETS: tuple[str, ...] = ("organ_lesion", "paired_organs", "tubular", "unseen", "pool")

#: ``organ_lesion`` voxel spacing along R, A, S (mm) before reorientation: thick axial slices
CT_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.0)
#: ``organ_lesion`` stored voxel-axis directions (nibabel axcodes): permuted and flipped, not RAS
CT_AXCODES: tuple[str, str, str] = ("P", "I", "L")
#: ``organ_lesion`` case ``i`` has no lesion when ``i % LESION_ABSENT_EVERY == 2``
LESION_ABSENT_EVERY = 6

_MIN_AXIS, _MAX_AXIS = 8, 512  # 8 matches the config schema; below that no anatomy fits
_GZIP_LEVEL = 1  # nibabel's own default: noise barely compresses, speed matters more

# Internal tissue classes: every anatomy is a class map, rendered through a per-modality lookup table.
AIR, TISSUE, FAT, BONE, ORGAN, LESION, ORGAN_L, ORGAN_R, VESSEL, CYST, WALL = range(11)
_N_CLASSES = 11

# Hounsfield units of mixed abdominal soft tissue, fat, bone, a liver-like organ and a hyperdense lesion.
_CT_HU = np.array([-1000, 10, -95, 500, 65, 125, 65, 65, 180, 10, 90], dtype=np.float64)
# Arbitrary positive MRI units (T1-like): bright fat, dark cortical bone, fluid-filled cyst dark,
# enhancing cyst wall and vessel bright.
_MR_UNITS = np.array([0, 300, 560, 80, 520, 760, 600, 600, 1000, 90, 820], dtype=np.float64)


@dataclass(frozen=True)
class _Grid:
    """A voxel grid in RAS orientation: ``shape`` voxels of ``spacing`` mm, centred on the origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def fov(self) -> np.ndarray:
        return np.asarray(self.shape, dtype=np.float64) * np.asarray(self.spacing)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open (broadcastable) grids of the voxel-centre coordinates in mm, centred on 0."""
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]
        return tuple(np.ix_(*axes))  # type: ignore[return-value]


@dataclass(frozen=True)
class _TaskSpec:
    """What one dataset is: its anatomy, modality, labels and geometry."""

    name: str
    description: str
    modality: str
    labels: dict[str, str]
    anatomy: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    axcodes: tuple[str, str, str] = ("R", "A", "S")
    labelled: bool = True


_TASKS: dict[str, _TaskSpec] = {
    "organ_lesion": _TaskSpec(
        "organ_lesion",
        "Synthetic CT-like abdomen: a large smooth organ with a small hyperdense lesion; anisotropic "
        "spacing and a non-RAS orientation",
        "CT",
        {"0": "background", "1": "organ", "2": "lesion"},
        "organ",
        CT_SPACING,
        CT_AXCODES,
    ),
    "paired_organs": _TaskSpec(
        "paired_organs",
        "Synthetic MRI-like volume with two mirrored ellipsoid organs",
        "MRI",
        {"0": "background", "1": "left", "2": "right"},
        "paired",
    ),
    "tubular": _TaskSpec(
        "tubular",
        "Synthetic MRI-angiography-like limb with one thin curved vessel",
        "MRI",
        {"0": "background", "1": "vessel"},
        "tube",
    ),
    "unseen": _TaskSpec(
        "unseen",
        "Synthetic MRI-like volume with a ring-walled cyst (anatomy absent from the pre-training pool)",
        "MRI",
        {"0": "background", "1": "cyst", "2": "wall"},
        "cyst",
    ),
    "pool": _TaskSpec(
        "pool",
        "Unlabelled synthetic MRI-like pool (organ, paired-organ and vessel anatomy) for self-supervised pre-training",
        "MRI",
        {"0": "background"},
        "mixed",
        labelled=False,
    ),
}

# Internal class -> task label, per anatomy.
_LABEL_MAPS: dict[str, dict[int, int]] = {
    "organ": {ORGAN: 1, LESION: 2},
    "paired": {ORGAN_L: 1, ORGAN_R: 2},
    "tube": {VESSEL: 1},
    "cyst": {CYST: 1, WALL: 2},
}
_POOL_KINDS: tuple[str, ...] = ("organ", "paired", "tube")


# --------------------------------------------------------------------------------------------------
# settings


def resolve_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``settings`` over :data:`DEFAULT_SETTINGS` and validate them.

    Args:
        settings: the ``synth`` config subsection; unknown keys are refused.

    Raises:
        InputError: naming the offending ``settings.<key>``.
    """
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise InputError("settings", f"must be a JSON object, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise InputError(f"settings.{unknown[0]}", f"unknown key (allowed: {', '.join(DEFAULT_SETTINGS)})")
    merged = {**DEFAULT_SETTINGS, **settings}

    def _int(key: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"settings.{key}", f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise InputError(f"settings.{key}", f"must be in [{lo}, {hi}], got {value}")
        return int(value)

    shape = merged["shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise InputError("settings.shape", f"must be a list of 3 integers, got {shape!r}")
    return {
        "seed": _int("seed", merged["seed"], 0, 2**63 - 1),
        "shape": [_int("shape", s, _MIN_AXIS, _MAX_AXIS) for s in shape],
        "cases_per_task": _int("cases_per_task", merged["cases_per_task"], 1, 10_000),
        "pool_cases": _int("pool_cases", merged["pool_cases"], 1, 10_000),
    }


# --------------------------------------------------------------------------------------------------
# random building blocks


def _case_rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, dataset name, case index)."""
    key = int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key, index])


def _smooth_field(rng: np.random.Generator, grid: _Grid, sigma_mm: float) -> np.ndarray:
    """White noise low-passed with a Gaussian of ``sigma_mm``, rescaled to zero mean and unit std."""
    white = rng.standard_normal(grid.shape, dtype=np.float32)
    field = gaussian_filter(white, sigma=[sigma_mm / s for s in grid.spacing], mode="reflect")
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def _bias_field(rng: np.random.Generator, grid: _Grid, degree: int = 3) -> np.ndarray:
    """A smooth log-bias field: random Legendre polynomial of total degree <= ``degree``, unit std.

    The polynomial model is the one of Van Leemput et al., IEEE TMI 18(10) 1999 (also MONAI's
    ``RandBiasField``); it is far cheaper than low-passing noise at the scale of the whole volume.
    """
    coeffs = rng.standard_normal((degree + 1,) * 3)
    i, j, k = np.indices(coeffs.shape)
    coeffs[(i + j + k > degree) | (i + j + k == 0)] = 0.0
    axes = [np.linspace(-1.0, 1.0, n) for n in grid.shape]
    field = np.polynomial.legendre.leggrid3d(*axes, coeffs).astype(np.float32)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def _rotation(rng: np.random.Generator, yaw_deg: float, tilt_deg: float) -> np.ndarray:
    """A random rotation: yaw about S within +-yaw_deg, pitch and roll within +-tilt_deg."""
    angles = rng.uniform(-1.0, 1.0, size=3) * np.array([yaw_deg, tilt_deg, tilt_deg])
    return Rotation.from_euler("zyx", angles, degrees=True).as_matrix()


def _ellipsoid_rho(
    coords: Sequence[np.ndarray], center: Sequence[float], semi_axes: Sequence[float], rot: np.ndarray
) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside); ``rot``'s columns are the ellipsoid axes in world mm."""
    d = [c - c0 for c, c0 in zip(coords, center)]
    rho2: np.ndarray | float = 0.0
    for k in range(3):
        u = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
        rho2 = rho2 + (u / semi_axes[k]) ** 2
    return np.sqrt(rho2)


def _cylinder_rho(coords: Sequence[np.ndarray], center: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """Normalised radius of an elliptic cylinder along S (a trunk or limb), broadcast to the full grid."""
    x, y, z = coords
    rho = np.sqrt(((x - center[0]) / semi_axes[0]) ** 2 + ((y - center[1]) / semi_axes[1]) ** 2)
    return np.broadcast_to(rho, np.broadcast_shapes(rho.shape, z.shape))


# --------------------------------------------------------------------------------------------------
# anatomy: each returns a class map (uint8) and the drawn parameters

_Anatomy = tuple[np.ndarray, dict[str, Any]]


def _anatomy_organ(rng: np.random.Generator, grid: _Grid, shape_field: np.ndarray, lesion: bool) -> _Anatomy:
    """Trunk with fat, spine, a large smooth liver-like organ and optionally a small lesion inside it."""
    coords = grid.coords()
    fov = grid.fov
    cls = np.full(grid.shape, AIR, dtype=np.uint8)
    body_c = rng.uniform(-0.04, 0.04, size=2) * fov[:2]
    body_ax = np.array([0.44, 0.36]) * fov[:2] * rng.uniform(0.9, 1.05)
    body_rho = _cylinder_rho(coords, body_c, body_ax) + 0.04 * shape_field
    cls[body_rho < 1.0] = TISSUE
    cls[(body_rho >= 0.86) & (body_rho < 1.0)] = FAT
    spine_c = (body_c[0], body_c[1] - 0.68 * body_ax[1], 0.0)
    spine_r = 0.13 * body_ax[1]
    spine = _ellipsoid_rho(coords, spine_c, (spine_r, spine_r, 1e6), np.eye(3)) < 1.0
    cls[spine] = BONE

    # Liver-like: on the patient's right (+x in RAS), anterior of the spine.
    scale = rng.uniform(0.85, 1.15)
    organ_c = (
        body_c[0] + rng.uniform(0.1, 0.25) * body_ax[0],
        body_c[1] + rng.uniform(-0.05, 0.15) * body_ax[1],
        rng.uniform(-0.15, 0.15) * fov[2],
    )
    organ_ax = np.array([0.62 * body_ax[0], 0.62 * body_ax[1], 0.38 * fov[2]]) * scale
    rot = _rotation(rng, 25.0, 8.0)
    organ = (_ellipsoid_rho(coords, organ_c, organ_ax, rot) + 0.12 * shape_field < 1.0) & (body_rho < 0.84) & ~spine
    cls[organ] = ORGAN
    params: dict[str, Any] = {
        "organ_center_mm": organ_c,
        "organ_semi_axes_mm": organ_ax,
        "lesion": bool(lesion),
    }
    if lesion:
        radius = rng.uniform(0.07, 0.12) * float(min(fov[:2]))
        depth = distance_transform_edt(organ, sampling=grid.spacing)
        candidates = np.flatnonzero(depth >= radius + 1.0)
        if candidates.size == 0:  # a small organ: put the lesion at its deepest point, shrunk to fit
            candidates = np.array([int(np.argmax(depth))])
            radius = max(float(depth.flat[candidates[0]]) - 0.5, 1.5 * max(grid.spacing))
        center_idx = np.unravel_index(int(rng.choice(candidates)), grid.shape)
        lesion_c = [float(c.ravel()[i]) for c, i in zip(coords, center_idx)]
        lesion_ax = radius * rng.uniform(0.85, 1.15, size=3)
        lesion_rot = _rotation(rng, 180.0, 30.0)
        lesion_mask = (_ellipsoid_rho(coords, lesion_c, lesion_ax, lesion_rot) + 0.05 * shape_field < 1.0) & organ
        lesion_mask[center_idx] = True  # never vanish on a coarse grid
        cls[lesion_mask] = LESION
        params.update({"lesion_center_mm": lesion_c, "lesion_radius_mm": radius})
    return cls, params


def _anatomy_paired(rng: np.random.Generator, grid: _Grid, shape_field: np.ndarray) -> _Anatomy:
    """Head-like ellipsoid body with two mirrored ellipsoid organs (left at -x, right at +x in RAS)."""
    coords = grid.coords()
    fov = grid.fov
    cls = np.full(grid.shape, AIR, dtype=np.uint8)
    body_c = rng.uniform(-0.03, 0.03, size=3) * fov
    body_ax = np.array([0.42, 0.42, 0.42]) * fov * rng.uniform(0.9, 1.05, size=3)
    body_rho = _ellipsoid_rho(coords, body_c, body_ax, _rotation(rng, 10.0, 5.0)) + 0.04 * shape_field
    cls[body_rho < 1.0] = TISSUE
    cls[(body_rho >= 0.9) & (body_rho < 1.0)] = FAT  # scalp-like bright rim

    offset = rng.uniform(0.3, 0.42) * body_ax[0]
    center_yz = body_c[1:] + rng.uniform(-0.08, 0.08, size=2) * fov[1:]
    base_ax = np.array([0.12, 0.2, 0.18]) * fov * rng.uniform(0.85, 1.15)
    rot_left = _rotation(rng, 20.0, 10.0)
    mirror = np.diag([-1.0, 1.0, 1.0])
    # Mirror the shape perturbation about the mid-sagittal plane too, so the pair stays mirrored.
    sym_field = 0.5 * (shape_field + shape_field[::-1])
    params: dict[str, Any] = {"organ_offset_mm": offset}
    sides = (("left", -1.0, rot_left, ORGAN_L), ("right", 1.0, mirror @ rot_left @ mirror, ORGAN_R))
    for side, sign, rot, label in sides:
        center = (body_c[0] + sign * offset, center_yz[0], center_yz[1])
        semi = base_ax * rng.uniform(0.92, 1.08, size=3)  # a little natural asymmetry
        organ = (_ellipsoid_rho(coords, center, semi, rot) + 0.08 * sym_field < 1.0) & (body_rho < 0.88)
        cls[organ] = label
        params[f"{side}_center_mm"] = center
        params[f"{side}_semi_axes_mm"] = semi
    return cls, params


def _anatomy_tube(rng: np.random.Generator, grid: _Grid, shape_field: np.ndarray) -> _Anatomy:
    """Limb-like elliptic cylinder with one helical vessel of radius 1.5-2.5 mm running along it."""
    coords = grid.coords()
    fov = grid.fov
    cls = np.full(grid.shape, AIR, dtype=np.uint8)
    body_c = rng.uniform(-0.03, 0.03, size=2) * fov[:2]
    body_ax = np.array([0.43, 0.4]) * fov[:2] * rng.uniform(0.9, 1.05)
    body_rho = _cylinder_rho(coords, body_c, body_ax) + 0.04 * shape_field
    cls[body_rho < 1.0] = TISSUE
    cls[(body_rho >= 0.88) & (body_rho < 1.0)] = FAT

    radius = float(rng.uniform(1.5, 2.5))
    helix_r = float(rng.uniform(0.2, 0.4)) * float(min(body_ax))
    axis_c = body_c + rng.uniform(-0.1, 0.1, size=2) * body_ax
    turns = float(rng.uniform(0.5, 1.2))
    phase = float(rng.uniform(0.0, 2.0 * np.pi))
    wobble_amp, wobble_freq, wobble_phase = rng.uniform(0.0, 0.15), rng.uniform(1.5, 3.0), rng.uniform(0, 2 * np.pi)
    z_half = 0.6 * fov[2]  # runs out of both ends of the volume
    length_est = 2 * z_half + 2 * np.pi * helix_r * turns * 2
    t = np.linspace(0.0, 1.0, int(np.ceil(length_est / 0.2)) + 1)
    z = -z_half + 2 * z_half * t
    r_t = helix_r * (1.0 + wobble_amp * np.sin(2 * np.pi * wobble_freq * t + wobble_phase))
    ang = phase + 2 * np.pi * turns * t
    centerline = np.stack([axis_c[0] + r_t * np.cos(ang), axis_c[1] + r_t * np.sin(ang), z], axis=1)

    # Exact distance to the densely sampled centre line (0.2 mm steps), only near it.
    x, y, zz = np.broadcast_arrays(*coords)
    points = np.stack([x.ravel(), y.ravel(), zz.ravel()], axis=1)
    dist, _ = cKDTree(centerline).query(points, distance_upper_bound=radius + 1.0)
    vessel = (dist <= radius).reshape(grid.shape) & (body_rho < 0.95)
    cls[vessel] = VESSEL
    params = {
        "vessel_radius_mm": radius,
        "helix_radius_mm": helix_r,
        "helix_turns": turns,
        "helix_axis_mm": axis_c,
    }
    return cls, params


def _anatomy_cyst(rng: np.random.Generator, grid: _Grid, shape_field: np.ndarray) -> _Anatomy:
    """Ellipsoid body with one fluid-filled cyst (label 1) wrapped in an enhancing wall (label 2)."""
    coords = grid.coords()
    fov = grid.fov
    cls = np.full(grid.shape, AIR, dtype=np.uint8)
    body_c = rng.uniform(-0.03, 0.03, size=3) * fov
    body_ax = np.array([0.43, 0.4, 0.42]) * fov * rng.uniform(0.9, 1.05, size=3)
    body_rho = _ellipsoid_rho(coords, body_c, body_ax, _rotation(rng, 15.0, 5.0)) + 0.04 * shape_field
    cls[body_rho < 1.0] = TISSUE
    cls[(body_rho >= 0.9) & (body_rho < 1.0)] = FAT

    cyst_r = float(rng.uniform(0.12, 0.2)) * float(min(fov))
    cyst_c = body_c + rng.uniform(-0.15, 0.15, size=3) * fov
    cyst_ax = cyst_r * rng.uniform(0.8, 1.2, size=3)
    cyst_rho = _ellipsoid_rho(coords, cyst_c, cyst_ax, _rotation(rng, 180.0, 40.0)) + 0.06 * shape_field
    cyst = (cyst_rho < 1.0) & (body_rho < 0.7)
    thickness = float(rng.uniform(1.5, 3.0))
    wall = (distance_transform_edt(~cyst, sampling=grid.spacing) <= thickness) & ~cyst & (body_rho < 0.86)
    cls[wall] = WALL
    cls[cyst] = CYST
    return cls, {"cyst_center_mm": cyst_c, "cyst_semi_axes_mm": cyst_ax, "wall_thickness_mm": thickness}


# --------------------------------------------------------------------------------------------------
# rendering


def _draw_shift(rng: np.random.Generator, modality: str, max_shift: float) -> dict[str, float]:
    """Per-case acquisition parameters, all scaled by one ``domain_shift`` level in [0, max_shift]."""
    shift = float(rng.uniform(0.0, max_shift))
    jitter = rng.uniform(0.7, 1.3, size=2)
    if modality == "CT":
        noise = 4.0 + 30.0 * shift * jitter[0]  # HU: low-dose-like at the top
        bias = 0.002 + 0.012 * shift * jitter[1]  # std of the log attenuation: up to ~20 HU in soft tissue
    else:
        noise = 0.01 + 0.14 * shift * jitter[0]  # relative to soft tissue
        bias = 0.03 + 0.3 * shift * jitter[1]
    return {
        "domain_shift": shift,
        "noise_sigma": float(noise),
        "bias_strength": float(bias),
        "blur_mm": float(0.8 * shift * rng.uniform(0.5, 1.0)),
        "gain": float(np.exp(shift * rng.uniform(-0.8, 0.8))) if modality != "CT" else 1.0,
    }


def _render(
    rng: np.random.Generator, grid: _Grid, cls: np.ndarray, modality: str, acq: Mapping[str, float]
) -> np.ndarray:
    """Class map -> image: tissue contrast with texture, partial-volume blur, bias field, noise.

    CT bias multiplies the linear attenuation (HU + 1000), like a smooth cupping artefact; MRI bias
    multiplies the signal (Sled et al., IEEE TMI 17(1) 1998, the N3 model) and MRI noise is Rician
    (magnitude of complex Gaussian noise); MRI background is exactly 0 so cropping to non-zero works.
    """
    base = _CT_HU if modality == "CT" else _MR_UNITS
    lut = base.copy()
    if modality == "CT":
        lut[1:] += rng.uniform(-8.0, 8.0, size=_N_CLASSES - 1)
    else:
        lut[1:] *= rng.uniform(0.9, 1.1, size=_N_CLASSES - 1)
    texture = _smooth_field(rng, grid, 1.5)
    bias_field = _bias_field(rng, grid)
    img = lut[cls].astype(np.float32)
    tex_amp = 6.0 if modality == "CT" else 0.04 * float(lut[TISSUE])
    img += np.where(cls == AIR, 0.0, tex_amp * texture).astype(np.float32)
    # Slice-profile blur: 0.4 voxel along every axis plus the case's extra blur in mm.
    sigma = [0.4 + acq["blur_mm"] / s for s in grid.spacing]
    img = gaussian_filter(img, sigma=sigma, mode="nearest")
    bias = np.exp(acq["bias_strength"] * bias_field)
    if modality == "CT":
        img = (img + 1000.0) * bias - 1000.0
        img += acq["noise_sigma"] * rng.standard_normal(grid.shape, dtype=np.float32)
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    img = img * bias * acq["gain"]
    sigma_abs = acq["noise_sigma"] * float(lut[TISSUE]) * acq["gain"]
    noise = rng.standard_normal((2, *grid.shape), dtype=np.float32) * sigma_abs
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    img[cls == AIR] = 0.0
    return img.astype(np.float32)


def _case_grid(rng: np.random.Generator, nominal: Sequence[int], spacing: Sequence[float]) -> _Grid:
    """A grid covering the nominal field of view (``nominal`` mm) +-10 % per axis at ``spacing``."""
    fov = np.asarray(nominal, dtype=np.float64) * rng.uniform(0.9, 1.1, size=3)
    shape = tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing))
    return _Grid(shape, tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def _make_case(
    spec: _TaskSpec, index: int, settings: Mapping[str, Any]
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None, dict[str, Any]]:
    """Generate one case: image, label (None for the pool) and its recorded parameters."""
    rng = _case_rng(settings["seed"], spec.name, index)
    if spec.labelled:
        anatomy, spacing, max_shift = spec.anatomy, spec.spacing, 1.0
    else:
        anatomy, spacing, max_shift = _POOL_KINDS[index % len(_POOL_KINDS)], (1.0, 1.0, 1.0), 0.5
    grid = _case_grid(rng, settings["shape"], spacing)
    shape_field = _smooth_field(rng, grid, 6.0)
    anatomy_fns: dict[str, Callable[..., _Anatomy]] = {
        "paired": _anatomy_paired,
        "tube": _anatomy_tube,
        "cyst": _anatomy_cyst,
    }
    if anatomy == "organ":
        # Lesion-free organ cases test empty-class handling; the pool's organs always have one.
        lesion = not (spec.labelled and index % LESION_ABSENT_EVERY == 2)
        cls, anat_params = _anatomy_organ(rng, grid, shape_field, lesion)
    else:
        cls, anat_params = anatomy_fns[anatomy](rng, grid, shape_field)
    acq = _draw_shift(rng, spec.modality, max_shift)
    image = _render(rng, grid, cls, spec.modality, acq)

    label = None
    if spec.labelled:
        label = np.zeros(grid.shape, dtype=np.uint8)
        for internal, value in _LABEL_MAPS[anatomy].items():
            label[cls == internal] = value

    # Scanner-like origin: voxel (0,0,0) of the RAS grid sits at -fov/2 plus a per-case table offset.
    offset_range = np.array([30.0, 30.0, 30.0 if spec.modality != "CT" else 200.0])
    offset = rng.uniform(-1.0, 1.0, size=3) * offset_range
    ras_affine = np.diag([*grid.spacing, 1.0])
    ras_affine[:3, 3] = -(np.asarray(grid.shape) - 1) / 2.0 * np.asarray(grid.spacing) + offset
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(spec.axcodes))
    affine = ras_affine @ inv_ornt_aff(ornt, grid.shape)
    image = apply_orientation(image, ornt)
    image_nii = _nifti(image, affine)
    label_nii = _nifti(apply_orientation(label, ornt), affine) if label is not None else None

    params: dict[str, Any] = {"anatomy": anatomy, **acq, **anat_params}
    params["shape"] = list(image.shape)
    params["spacing"] = [float(z) for z in image_nii.header.get_zooms()[:3]]
    params["axcodes"] = "".join(nib.aff2axcodes(affine))
    if label is not None:
        params["label_voxels"] = np.bincount(label.ravel(), minlength=len(spec.labels)).tolist()
    return image_nii, label_nii, _jsonable(params)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image with qform and sform both set (code 1, scanner anatomical) and mm units."""
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _jsonable(obj: Any) -> Any:
    """Plain JSON types with floats rounded to 6 digits, so dataset.json stays readable."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), 6)
    return obj


def _save_nifti_gz(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``.nii.gz`` atomically with a fixed gzip header (mtime 0, no file name): byte-reproducible."""
    raw = img.to_bytes()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
            gz.write(raw)


# --------------------------------------------------------------------------------------------------
# datasets and the folder swap


def _write_dataset(spec: _TaskSpec, folder: Path, settings: Mapping[str, Any], progress: tqdm) -> dict[str, Any]:
    """Write one MSD dataset (images, labels, dataset.json) into ``folder``; return its summary."""
    n_cases = settings["cases_per_task"] if spec.labelled else settings["pool_cases"]
    image_dir = "imagesTr" if spec.labelled else "imagesTs"
    entries: list[Any] = []
    cases: dict[str, Any] = {}
    for index in range(n_cases):
        case = f"{spec.name}_{index:03d}"
        image, label, params = _make_case(spec, index, settings)
        _save_nifti_gz(image, folder / image_dir / f"{case}.nii.gz")
        if label is not None:
            _save_nifti_gz(label, folder / "labelsTr" / f"{case}.nii.gz")
            entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            entries.append(f"./imagesTs/{case}.nii.gz")
        cases[case] = params
        progress.update(1)
    dataset = {
        "name": spec.name,
        "description": spec.description,
        "reference": "segadapt synthetic phantoms (python -m stages.synth)",
        "licence": "CC0-1.0",
        "release": f"seed {settings['seed']}",
        "tensorImageSize": "3D",
        "modality": {"0": spec.modality},
        "labels": spec.labels,
        "numTraining": len(entries) if spec.labelled else 0,
        "numTest": 0 if spec.labelled else len(entries),
        "training": entries if spec.labelled else [],
        "test": [] if spec.labelled else entries,
        "synth_cases": cases,
        "provenance": make_provenance("synth", dict(settings), seed=settings["seed"], dataset=spec.name),
    }
    save_json(dataset, folder / "dataset.json")
    return {"cases": n_cases, "modality": spec.modality, "labels": spec.labels}


def run(out_dir: Path, settings: Mapping[str, Any] | None = None) -> None:
    """Write the demo datasets (:data:`DATASETS`) and ``synth.json`` under ``out_dir``.

    Args:
        out_dir: destination folder; existing dataset folders in it are replaced one by one.
        settings: ``seed``, ``shape`` (nominal field of view in voxels at 1 mm), ``cases_per_task``,
            ``pool_cases``; missing keys take :data:`DEFAULT_SETTINGS`.

    Raises:
        InputError: bad settings (before anything is written).
    """
    resolved = resolve_settings(settings)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 4 * resolved["cases_per_task"] + resolved["pool_cases"]
    summary: dict[str, Any] = {}
    with tqdm(total=total, desc="synth", unit="case", file=sys.stderr) as progress:
        for name in DATASETS:
            # each dataset is built aside and swapped in whole (stages.core.io.build_folder); the
            # record, Snakemake's output, is written last
            summary[name] = build_folder(
                out_dir / name, lambda folder, name=name: _write_dataset(_TASKS[name], folder, resolved, progress)
            )
    save_json(
        {
            "settings": resolved,
            "datasets": summary,
            "provenance": make_provenance("synth", resolved, seed=resolved["seed"]),
        },
        out_dir / "synth.json",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m stages.synth --out DIR [--settings JSON]``."""
    parser = argparse.ArgumentParser(prog="python -m stages.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the MSD datasets into")
    add_settings_argument(parser)  # seed, shape, cases_per_task, pool_cases (resolve_settings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
