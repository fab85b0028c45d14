"""Read a Medical Segmentation Decathlon dataset and validate every case, reporting all problems at once.

An MSD dataset is a folder with ``dataset.json`` (``modality``, ``labels``, ``numTraining``, a
``training`` list of ``{"image", "label"}`` and a ``test`` list of image paths, all written as
``./imagesTr/<case>.nii.gz``) beside ``imagesTr/``, ``labelsTr/`` and ``imagesTs/`` (Antonelli et al.,
"The Medical Segmentation Decathlon", Nature Communications 13, 4128, 2022). A bare folder without
``dataset.json`` is read by pairing ``imagesTr/<case>.nii.gz`` with ``labelsTr/<case>.nii.gz``.

:func:`read_dataset` builds the case list and records structural problems (dataset.json
inconsistencies, unpaired files) instead of stopping at the first; :func:`validate_dataset` then
opens every file and raises one :class:`~stages.core.errors.InputError` listing every problem, one line
each, naming the file. Only single-channel (3D) datasets are supported.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm import tqdm

from stages.core.errors import InputError
from stages.core.io import sha256_file

__all__ = [
    "mm_text",
    "Case",
    "Dataset",
    "ValidatedCase",
    "dataset_labels",
    "load_nifti_3d",
    "read_dataset",
    "read_label_array",
    "validate_dataset",
]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One case: its id (file name without ``.nii.gz``), its image and, for labelled sets, its label."""

    case_id: str
    image: Path
    label: Path | None


@dataclass
class Dataset:
    """A dataset as read from disk, before its files are opened.

    Args:
        root: the dataset folder, as given (paths below are built from it, not resolved).
        name: ``dataset.json``'s ``name``, else the folder name.
        modality: channel index (as a string) -> modality name, e.g. ``{"0": "MRI"}``; empty without
            ``dataset.json``.
        labels: label value -> name; declared by ``dataset.json`` or the caller. Empty when they are
            to be inferred from the label files (see ``labels_declared``).
        cases: the cases, sorted by id.
        labels_declared: whether ``labels`` is a declaration to check label files against.
        problems: ``(file or key, problem)`` found while reading; :func:`validate_dataset` reports them
            with the problems it finds in the files.
    """

    root: Path
    name: str
    modality: dict[str, str]
    labels: dict[int, str]
    cases: list[Case]
    labels_declared: bool = True
    problems: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)  # an ndarray field has no tuple equality
class ValidatedCase:
    """A case whose files were opened and checked, with what the next steps need from their headers.

    Args:
        case_id: the case id.
        image: the image file.
        label: the label file, or ``None`` for unlabelled reading.
        shape: the 3D image shape (a trailing singleton 4th axis is squeezed away).
        affine: the image's voxel-to-world affine (4x4).
        image_dtype: the stored data type of the image.
        label_values: the distinct values in the label file (empty without a label).
        image_sha256: SHA-256 of the image file.
        label_sha256: SHA-256 of the label file, or ``None``.
        voxels: the arrays validation read, kept only when :func:`validate_dataset` was asked to
            (``keep_bytes``): ``"image"`` (3D, scaling applied, only for images without scaling, where
            stored and scaled values are the same array) and ``"label"`` (3D, as stored). A consumer
            pops them to free the memory; what is absent is read from the file again.
    """

    case_id: str
    image: Path
    label: Path | None
    shape: tuple[int, int, int]
    affine: np.ndarray
    image_dtype: str
    label_values: tuple[int, ...]
    image_sha256: str
    label_sha256: str | None
    voxels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------- reading


def _case_id(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _proxy(img: Any) -> Any:
    """A NIfTI image's ``ArrayProxy`` (nibabel types ``dataobj`` as ArrayLike, without slope, inter, ...)."""
    return img.dataobj


def _header_summary(path: Path) -> str:
    """'; the file is 512x512x94 at 0.734x0.734x5 mm' from the header alone, to tell orphans apart."""
    try:
        img: Any = nib.load(path)
        shape = "x".join(str(int(s)) for s in img.shape)
        zooms = "x".join(f"{float(z):.4g}" for z in img.header.get_zooms()[:3])
    except Exception:  # an unreadable orphan is still just an orphan; its content is not checked
        return ""
    return f"; the file is {shape} at {zooms} mm"


def _nifti_files(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder by case id; hidden files (macOS ``._*`` forks in MSD tars) are skipped."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        cid = _case_id(path)
        if cid is None:
            log.info("ignoring %s: not a NIfTI file", path)
            continue
        found[cid] = path
    return found


def _parse_labels(raw: Any, where: str, problems: list[tuple[str, str]]) -> dict[int, str]:
    """MSD ``labels`` is ``{"0": "background", ...}``; nnU-Net v2 writes ``{"background": 0, ...}``: accept both."""
    if not isinstance(raw, Mapping) or not raw:
        problems.append((where, f"'labels' must be a non-empty object of value -> name, got {raw!r}"))
        return {}
    labels: dict[int, str] = {}
    for key, value in raw.items():
        try:
            labels[int(key)] = str(value)
            continue
        except (TypeError, ValueError):
            pass
        if isinstance(value, int) and not isinstance(value, bool):
            labels[value] = str(key)
        else:
            problems.append((where, f"'labels' entry {key!r}: {value!r} is not an integer label value"))
    if labels and 0 not in labels:
        problems.append((where, f"'labels' has no background value 0 (values {sorted(labels)})"))
    return labels


#: how an entry of dataset.json that leaves its folder is reported (the config check looks for it)
OUTSIDE_FOLDER = "points outside the dataset folder"


def _entry_path(root: Path, entry: Any, where: str, problems: list[tuple[str, str]]) -> Path | None:
    # ``where`` is the entry's place in dataset.json (``training[3].image``): a malformed entry is a
    # problem of that file, so the message names the file and the entry
    if not isinstance(entry, str) or _case_id(Path(entry)) is None:
        problems.append((str(root / "dataset.json"), f"{where}: expected a path to a .nii.gz file, got {entry!r}"))
        return None
    path = root / entry
    if not _inside(entry):
        # MSD paths are relative to the dataset folder; one that leaves it reads a file nobody
        # audits with the dataset (and that a container, which mounts only this folder, cannot see)
        problems.append((str(root / "dataset.json"), f"{where}: {entry!r} {OUTSIDE_FOLDER} {root}"))
        return None
    if not path.is_file():
        problems.append((str(path), f"listed in dataset.json ({where}) but the file does not exist"))
        return None
    return path


def _inside(entry: str) -> bool:
    """Whether a ``dataset.json`` path stays inside the dataset folder: relative, and no ``..`` leaves it.

    Decided on the text alone: files inside the folder may be symlinks to elsewhere (ASSFT's labelled
    folders link the original images), which is fine.
    """
    if Path(entry).is_absolute():
        return False
    parts = Path(os.path.normpath(entry)).parts
    return bool(parts) and parts[0] != ".."


def _add_case(cases: dict[str, Case], case: Case, problems: list[tuple[str, str]]) -> None:
    if case.case_id in cases:
        problems.append((str(case.image), f"duplicate case id {case.case_id!r} (also {cases[case.case_id].image})"))
        return
    cases[case.case_id] = case


def _read_json_dataset(
    root: Path, meta_path: Path, labelled: bool, problems: list[tuple[str, str]]
) -> tuple[str, dict[str, str], Any, dict[str, Case]]:
    where = str(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as err:
        raise InputError(meta_path, f"unreadable: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(meta_path, f"malformed JSON: {err}") from err
    if not isinstance(meta, dict):
        raise InputError(meta_path, f"must hold a JSON object, got {type(meta).__name__}")

    required = ["modality", "training", "labels"] if labelled else ["modality"]
    for key in required:
        if key not in meta:
            problems.append((where, f"missing key {key!r}"))
    if not labelled and "training" not in meta and "test" not in meta:
        problems.append((where, "has neither 'training' nor 'test': no images to read"))

    modality_raw = meta.get("modality", {})
    if not isinstance(modality_raw, Mapping):
        problems.append((where, f"'modality' must be an object, got {modality_raw!r}"))
        modality_raw = {}
    modality = {str(k): str(v) for k, v in modality_raw.items()}
    if len(modality) > 1:
        problems.append((where, f"{len(modality)} modalities {modality}: only single-channel datasets are supported"))

    cases: dict[str, Case] = {}
    for key, count_key in (("training", "numTraining"), ("test", "numTest")):
        entries = meta.get(key, [])
        if not isinstance(entries, list):
            problems.append((where, f"{key!r} must be a list, got {type(entries).__name__}"))
            continue
        count = meta.get(count_key)
        if count is not None and count != len(entries):
            problems.append((where, f"{count_key} is {count!r} but {key!r} lists {len(entries)} entries"))
        if key == "test" and labelled:
            continue
        for i, entry in enumerate(entries):
            at = f"{key}[{i}]"
            if key == "training":
                if not isinstance(entry, Mapping) or "image" not in entry:
                    problems.append((where, f"{at} must be an object with 'image' and 'label', got {entry!r}"))
                    continue
                image = _entry_path(root, entry["image"], f"{at}.image", problems)
                label = None
                if labelled:
                    if "label" not in entry:
                        problems.append((where, f"{at} has an image but no 'label'"))
                        continue
                    label = _entry_path(root, entry["label"], f"{at}.label", problems)
                    if label is None:
                        continue
            else:
                # MSD writes test entries as bare paths; some tools write {"image": ...}
                raw = entry.get("image") if isinstance(entry, Mapping) else entry
                image = _entry_path(root, raw, at, problems)
                label = None
            if image is None:
                continue
            cid = _case_id(image)
            assert cid is not None
            if label is not None and _case_id(label) != cid:
                problems.append((where, f"{at} pairs image {image.name} with label {label.name} of another case"))
            _add_case(cases, Case(cid, image, label), problems)
    name = str(meta.get("name") or root.name)
    return name, modality, meta.get("labels"), cases


def _read_bare_dataset(root: Path, labelled: bool, problems: list[tuple[str, str]]) -> dict[str, Case]:
    images = _nifti_files(root / "imagesTr")
    cases: dict[str, Case] = {}
    if labelled:
        labels = _nifti_files(root / "labelsTr")
        for cid, image in images.items():
            if cid not in labels:
                problems.append((str(image), f"image has no label (expected {root / 'labelsTr' / image.name})"))
                continue
            _add_case(cases, Case(cid, image, labels[cid]), problems)
        for cid, label in labels.items():
            if cid not in images:
                expected = root / "imagesTr" / label.name
                problems.append((str(label), f"label has no image (expected {expected}){_header_summary(label)}"))
    else:
        for folder in ("imagesTr", "imagesTs"):
            for cid, image in _nifti_files(root / folder).items():
                _add_case(cases, Case(cid, image, None), problems)
    if not cases and not problems:
        wanted = "imagesTr/ and labelsTr/" if labelled else "imagesTr/ or imagesTs/"
        problems.append((str(root), f"no dataset.json and no NIfTI files in {wanted}"))
    return cases


def read_dataset(root: Path, labelled: bool = True, declared_labels: Mapping[int, str] | None = None) -> Dataset:
    """Read a dataset folder into a :class:`Dataset` without opening its images.

    Args:
        root: the dataset folder.
        labelled: read image/label pairs (``training``); otherwise read every image without labels
            (``test`` entries and ``training`` images, or ``imagesTs/`` and ``imagesTr/``).
        declared_labels: label value -> name; overrides ``dataset.json``'s ``labels``. Without
            ``dataset.json`` and without this, the label set is inferred by :func:`dataset_labels`
            as the union of the values found in the label files.

    Problems that do not stop the case list from being built (numTraining mismatch, files listed
    but missing, unpaired files, duplicate ids) go into ``Dataset.problems``, to be reported by
    :func:`validate_dataset`; a missing folder or an unreadable/malformed ``dataset.json`` raises
    :class:`InputError` at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder does not exist")
    problems: list[tuple[str, str]] = []
    meta_path = root / "dataset.json"
    labels_raw: Any = None
    modality: dict[str, str] = {}
    if meta_path.exists():
        name, modality, labels_raw, cases = _read_json_dataset(root, meta_path, labelled, problems)
    else:
        name, cases = root.name, _read_bare_dataset(root, labelled, problems)

    if declared_labels is not None:
        labels = {int(k): str(v) for k, v in declared_labels.items()}
        declared = True
    elif labels_raw is not None:
        # an unlabelled reading does not use the labels, so their problems do not block it
        labels = _parse_labels(labels_raw, str(meta_path), problems if labelled else [])
        declared = True
    else:
        labels, declared = {}, False
    return Dataset(
        root=root,
        name=name,
        modality=modality,
        labels=labels,
        cases=[cases[k] for k in sorted(cases)],
        labels_declared=declared,
        problems=problems,
    )


# ------------------------------------------------------------------------------------------ validation


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _verify_gzip(path: Path) -> None:
    """Decompress the whole stream so that a bad CRC or a cut-off trailer is caught too.

    nibabel stops reading once it has the voxels it needs, so it misses damage after them.
    """
    with gzip.open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass


# Compressed files up to this size are read in one go; larger ones are streamed so that a big CT
# never holds its compressed and decompressed bytes next to its voxel array.
_IN_MEMORY_MAX_BYTES = 64 << 20


def _load_in_memory(
    path: Path, like: nib.Nifti1Image | None, scaled: bool
) -> tuple[nib.Nifti1Image, np.ndarray] | None:
    """A small ``.nii.gz`` file decompressed in one call and its voxels read from memory, or None.

    Streaming through ``GzipFile`` and then :func:`_verify_gzip` decompress every file twice, and
    ``nib.load`` opens it once more per image class it sniffs; for a set of small volumes (MSD
    Hippocampus: 35 x 50 x 35 voxels) that costs more than the voxels. ``gzip.decompress`` checks the
    CRC and the length of every member as ``_verify_gzip`` does. Whenever anything does not fit, None
    sends the caller down nibabel's own path, which then reports the problem in its own words.

    Args:
        path: the file.
        like: the image ``nib.load`` made of it: its voxels are read with a proxy of the same
            specification (shape, dtype, offset, scaling, order) over the bytes in memory, and it is
            what is returned. None parses the bytes as ``nib.load`` would a NIfTI-1 file (its header
            sniff, ``Nifti1Header.may_contain_header``) and gives up otherwise.
        scaled: as in :func:`load_nifti_3d`.
    """
    if not path.name.endswith(".nii.gz"):
        return None
    try:
        if path.stat().st_size > _IN_MEMORY_MAX_BYTES:
            return None
        raw = gzip.decompress(path.read_bytes())
        if like is None:
            if not nib.Nifti1Header.may_contain_header(raw[: nib.Nifti1Header.sizeof_hdr]):
                return None
            img = nib.Nifti1Image.from_bytes(raw)
            proxy = _proxy(img)
        else:
            img, spec = like, _proxy(like)
            proxy = type(spec)(
                io.BytesIO(raw),
                (spec.shape, spec.dtype, spec.offset, spec.slope, spec.inter),
                mmap=False,
                order=spec.order,
            )
        data = np.asanyarray(proxy) if scaled else np.asanyarray(proxy.get_unscaled())
    except Exception:
        return None
    return img, data


def load_nifti_3d(path: Path, scaled: bool = True, verify: bool = True) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Open a NIfTI file and read its voxels as a 3D array (a trailing singleton axis is squeezed).

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        scaled: apply the header's ``scl_slope``/``scl_inter``; ``False`` keeps the stored integers
            (a quarter of the memory of the float64 that scaling gives a large CT).
        verify: check the whole gzip stream (CRC, trailer) even past the voxels; ``False`` is for
            files already validated, where a large file is then decompressed once instead of twice.

    Returns the image (for its affine and header) and the voxel array (scaling applied, stored dtype
    otherwise). Raises :class:`InputError` naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise InputError(path, "file not found") from err
    except OSError as err:
        raise InputError(path, f"unreadable: {err.strerror or err}") from err
    if size == 0:
        raise InputError(path, "empty file (0 bytes)")
    try:
        if not os.access(path, os.R_OK):
            raise PermissionError(13, "permission denied")
        loaded = None if verify else _load_in_memory(path, None, scaled)
        if loaded is not None:
            img, data = loaded
        else:
            img = cast(Any, nib.load(path))  # the header only: voxels are read on demand
            if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
                raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
            # one decompression both reads the voxels and checks the whole stream
            loaded = _load_in_memory(path, img, scaled) if verify else None
            if loaded is not None:
                data = loaded[1]
            else:
                data = np.asanyarray(img.dataobj) if scaled else np.asanyarray(_proxy(img).get_unscaled())
                if verify and path.name.endswith(".gz"):
                    _verify_gzip(path)
    except InputError:
        raise
    except PermissionError as err:
        raise InputError(path, f"unreadable: {err.strerror or err}") from err
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(path, f"corrupt or truncated NIfTI (gzip): {_one_line(err)}") from err
    except ImageFileError as err:
        text = _one_line(err)
        if "gzip" in text:
            raise InputError(path, f"corrupt or truncated NIfTI (gzip): {text}") from err
        if path.name.endswith(".gz"):
            # a stream cut inside the header reads as "cannot work out file type": tell the two apart
            try:
                _verify_gzip(path)
            except (EOFError, zlib.error, OSError) as gz_err:
                raise InputError(path, f"corrupt or truncated NIfTI (gzip): {_one_line(gz_err)}") from err
        raise InputError(path, f"not a readable NIfTI file (corrupt or truncated header): {text}") from err
    except OSError as err:
        text = _one_line(err)
        if "Expected" in text and "bytes" in text:
            raise InputError(path, f"truncated NIfTI (voxel data shorter than the header says): {text}") from err
        raise InputError(path, f"unreadable: {text}") from err
    except Exception as err:  # nibabel raises assorted header errors (HeaderDataError, ValueError ...)
        raise InputError(path, f"not a readable NIfTI file: {type(err).__name__}: {_one_line(err)}") from err

    if data.dtype.kind not in "biuf":
        raise InputError(path, f"unsupported voxel type {data.dtype} (expected a real-valued scalar image)")
    if data.ndim > 3:
        if all(s == 1 for s in data.shape[3:]):
            data = data.reshape(data.shape[:3])
        else:
            raise InputError(path, f"is {data.ndim}D with shape {tuple(data.shape)}: expected a 3D volume")
    if data.ndim != 3:
        raise InputError(path, f"is {data.ndim}D with shape {tuple(data.shape)}: expected a 3D volume")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(path, f"has a singular or non-finite affine {img.affine.tolist()}")
    return img, data


def read_label_array(path: Path, allowed: Iterable[int] | None = None) -> np.ndarray:
    """Read a label file as an integer array, checking it holds whole numbers (and only ``allowed`` ones).

    Args:
        path: the label file.
        allowed: the declared label values; ``None`` skips that check.

    Integer-valued floats (some MSD labels are stored as float32) are accepted and cast.
    """
    _, data = load_nifti_3d(path)
    return _label_values_checked(path, data, allowed)[0]


_COUNT_BLOCK = 1 << 22


def _unique_values(data: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``data``, as ``np.unique`` gives them.

    Labels are nearly always uint8: counting with ``bincount`` is one pass, several times faster
    than ``np.unique``'s hashing on the many small volumes of a dataset.
    """
    if data.dtype in (np.uint8, np.uint16, np.bool_) and data.size:
        flat = data.ravel(order="K")  # memory order: no copy of nibabel's Fortran-ordered arrays
        flat = flat.view(np.uint8) if data.dtype == np.bool_ else flat
        seen = np.zeros(np.iinfo(flat.dtype).max + 1, dtype=bool)
        # in blocks: bincount casts its input to int64, 8 bytes a voxel of a large CT label
        for start in range(0, flat.size, _COUNT_BLOCK):
            seen |= np.bincount(flat[start : start + _COUNT_BLOCK], minlength=seen.size) > 0
        return np.flatnonzero(seen).astype(data.dtype)
    return np.unique(data)


def _label_values_checked(
    path: Path, data: np.ndarray, allowed: Iterable[int] | None, want_values: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The label as integers and, if checked against ``allowed`` or wanted, its distinct values."""
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(path, f"label has {int(bad.sum())} non-finite voxels (NaN/Inf)")
        fractional = data != np.round(data)
        if fractional.any():
            examples = np.unique(data[fractional])[:5].tolist()
            raise InputError(path, f"label values are not integers: {int(fractional.sum())} voxels, e.g. {examples}")
        if data.size and (data.min() < np.iinfo(np.int64).min or data.max() > np.iinfo(np.int64).max):
            raise InputError(path, "label values out of integer range")
        data = data.astype(np.int64)
    elif data.dtype.kind == "b":
        data = data.astype(np.uint8)
    values = _unique_values(data) if allowed is not None or want_values else None
    if allowed is not None:
        assert values is not None
        allowed_set = set(int(v) for v in allowed)
        extra = sorted(int(v) for v in values if int(v) not in allowed_set)
        if extra:
            raise InputError(path, f"label values {extra} are not in the declared label set {sorted(allowed_set)}")
    return data, values


def _image_problems(
    case: Case, keep: dict[str, np.ndarray], budget: list[int]
) -> tuple[nib.Nifti1Image | None, tuple[int, ...] | None, list[tuple[str, str]]]:
    try:
        img, data = load_nifti_3d(case.image, scaled=False)
    except InputError as err:
        return None, None, [(err.where, err.problem)]
    problems = []
    where = str(case.image)
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(data)))
            problems.append((where, f"{bad} non-finite voxels ({n_nan} NaN, {bad - n_nan} Inf)"))
    if not problems:
        problems += _intensity_problems(where, img, data)
    spacing = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    if np.all(np.isfinite(spacing)) and (spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM):
        problems.append(
            (
                where,
                f"implausible voxel spacing {mm_text(spacing)} mm in the header (expected "
                f"{MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm per axis): check its affine / pixdim",
            )
        )
    # without scl_slope/scl_inter nibabel's scaled read returns the stored array itself
    if _proxy(img).slope == 1 and _proxy(img).inter == 0:
        _keep(keep, "image", data, budget)
    return img, tuple(int(s) for s in data.shape), problems


#: voxel sizes outside this range (mm) are a broken header, not an image: 1 um to 10 cm
MIN_SPACING_MM, MAX_SPACING_MM = 1e-3, 100.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def mm_text(spacing: Any) -> str:
    """``1x1x2.5``: a spacing (mm) as messages show it."""
    return "x".join(f"{float(v):.4g}" for v in spacing)


def _intensity_problems(where: str, img: nib.Nifti1Image, data: np.ndarray) -> list[tuple[str, str]]:
    """Values preprocessing cannot use: beyond float32 once the header's scaling is applied, or constant."""
    low, high = float(np.min(data)), float(np.max(data))
    slope, inter = _proxy(img).slope, _proxy(img).inter
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    with np.errstate(over="ignore", invalid="ignore"):
        ends = np.array([low, high], dtype=np.float64) * slope + inter
    biggest = float(np.max(np.abs(ends)))
    if not np.isfinite(biggest) or biggest > _FLOAT32_MAX:
        scaling = (
            f" (stored {low:.4g} to {high:.4g}, scl_slope {slope:g}, scl_inter {inter:g})"
            if (slope != 1.0 or inter != 0.0)
            else ""
        )
        return [
            (
                where,
                f"intensities reach {biggest:.4g}{scaling}, beyond float32's range "
                f"({_FLOAT32_MAX:.4g}): preprocessing would turn the volume into Inf/NaN",
            )
        ]
    if low == high:
        return [(where, f"constant image (every voxel is {low * slope + inter:g}): nothing to segment or learn from")]
    return []


def _keep(keep: dict[str, np.ndarray], key: str, data: np.ndarray, budget: list[int]) -> None:
    """Put ``data`` into ``keep`` if it fits into what is left of ``budget[0]`` (bytes), and charge it."""
    if data.nbytes <= budget[0]:
        keep[key] = data
        budget[0] -= data.nbytes


def _label_problems(
    case: Case,
    dataset: Dataset,
    img: nib.Nifti1Image | None,
    shape: tuple[int, ...] | None,
    affine_atol: float,
    keep: dict[str, np.ndarray],
    budget: list[int],
) -> tuple[tuple[int, ...], list[tuple[str, str]]]:
    if case.label is None:
        return (), [(str(case.image), "image has no label")]
    where = str(case.label)
    try:
        lbl, data = load_nifti_3d(case.label)
    except InputError as err:
        return (), [(err.where, err.problem)]
    problems = []
    if shape is not None and tuple(data.shape) != shape:
        problems.append((where, f"label shape {tuple(data.shape)} differs from image shape {shape} ({case.image})"))
    elif img is not None and not np.allclose(lbl.affine, img.affine, rtol=0, atol=affine_atol):
        diff = float(np.max(np.abs(lbl.affine - img.affine)))
        problems.append(
            (
                where,
                f"label affine differs from the image's ({case.image}) by up to {diff:.4g} mm "
                f"(tolerance {affine_atol:g})",
            )
        )
    try:
        allowed = dataset.labels if dataset.labels_declared else None
        _, found = _label_values_checked(case.label, data, allowed, want_values=True)
        assert found is not None
        values = tuple(int(v) for v in found)
    except InputError as err:
        return (), [*problems, (err.where, err.problem)]
    if not problems:
        _keep(keep, "label", data, budget)
    return values, problems


def _validate_case(
    case: Case, dataset: Dataset, labelled: bool, affine_atol: float, budget: list[int]
) -> tuple[ValidatedCase | None, list[tuple[str, str]]]:
    keep: dict[str, np.ndarray] = {}
    spent = budget[0]
    img, shape, problems = _image_problems(case, keep, budget)
    values: tuple[int, ...] = ()
    if labelled:
        values, label_problems = _label_problems(case, dataset, img, shape, affine_atol, keep, budget)
        problems += label_problems
    if problems or img is None or shape is None:
        budget[0] = spent  # nothing of a refused case is kept
        return None, problems
    label = case.label if labelled else None
    return (
        ValidatedCase(
            case_id=case.case_id,
            image=case.image,
            label=label,
            shape=(shape[0], shape[1], shape[2]),
            affine=np.asarray(img.affine, dtype=np.float64),
            image_dtype=str(img.get_data_dtype()),
            label_values=values,
            image_sha256=sha256_file(case.image),
            label_sha256=sha256_file(label) if label is not None else None,
            voxels=keep,
        ),
        [],
    )


def validate_dataset(
    dataset: Dataset, labelled: bool = True, affine_atol: float = 1e-3, keep_bytes: int = 0
) -> list[ValidatedCase]:
    """Open and check every case; raise one :class:`InputError` listing every problem found.

    Checks, per case: the file exists, is readable, non-empty, an intact (gzip) NIfTI; the image is 3D
    (a trailing singleton axis is allowed) with finite voxels; for labelled sets, the label exists,
    has whole-number values within the declared set, the image's shape and (within ``affine_atol``)
    its affine. The structural problems :func:`read_dataset` recorded are reported too.

    Args:
        dataset: from :func:`read_dataset`.
        labelled: check labels (must match how the dataset was read).
        affine_atol: largest absolute difference allowed between image and label affine entries (mm).
        keep_bytes: keep up to this many bytes of the arrays read, in total, in the cases' ``voxels``,
            so that a caller reading every case next (preprocess) does not decompress the files
            again; 0 keeps nothing.

    Returns the validated cases, in the dataset's order. Nothing is written.
    """
    problems = list(dataset.problems)
    if not dataset.cases and not problems:
        problems.append((str(dataset.root), "no cases found"))
    validated: list[ValidatedCase] = []
    budget = [max(0, int(keep_bytes))]
    for case in tqdm(dataset.cases, desc=f"validate {dataset.name}", mininterval=2, leave=False):
        good, found = _validate_case(case, dataset, labelled, affine_atol, budget)
        problems.extend(found)
        if good is not None:
            validated.append(good)
    if problems:
        lines = "\n".join(f"  {where}: {problem}" for where, problem in problems)
        raise InputError(dataset.root, f"{len(problems)} problem(s) in the dataset:\n{lines}")
    return validated


def dataset_labels(dataset: Dataset, validated: Iterable[ValidatedCase]) -> dict[int, str]:
    """The dataset's label set: the declared one, else the union of values found (``label_<v>``, 0 = background)."""
    if dataset.labels_declared:
        return dict(sorted(dataset.labels.items()))
    values = {0}
    for case in validated:
        values.update(case.label_values)
    return {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}
