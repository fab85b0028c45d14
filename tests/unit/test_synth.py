"""Tests for stages.synth: reproducible, valid MSD phantom datasets with the promised anatomy and geometry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from stages.core.errors import InputError
from stages.synth import CT_AXCODES, DATASETS, LESION_ABSENT_EVERY, main, resolve_settings, run

SMALL: dict[str, Any] = {"seed": 0, "shape": [24, 24, 20], "cases_per_task": 3, "pool_cases": 4}
LABELLED = [d for d in DATASETS if d != "pool"]
REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dataset(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / name / "dataset.json").read_text())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    start = time.perf_counter()
    run(out, SMALL)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def root(small_run: tuple[Path, float]) -> Path:
    return small_run[0]


def test_small_run_is_fast(small_run: tuple[Path, float]) -> None:
    assert small_run[1] < 10.0


def test_rerun_is_byte_identical(root: Path, tmp_path: Path) -> None:
    run(tmp_path / "again", SMALL)
    first, second = _files(root), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert len(first) == 4 * 2 * 3 + 4 + 5 * 1 + 1  # images + labels, pool images, dataset.json, synth.json
    for name, content in first.items():
        assert content == second[name], name
    # gzip header: mtime field (bytes 4-8) is zero, no file name flag
    gz = (root / "tubular" / "imagesTr" / "tubular_000.nii.gz").read_bytes()
    assert gz[:2] == b"\x1f\x8b" and gz[3] & 0x08 == 0 and gz[4:8] == b"\0\0\0\0"


def test_other_seed_changes_images(root: Path, tmp_path: Path) -> None:
    run(tmp_path / "seed1", {**SMALL, "seed": 1})
    for name in DATASETS:
        first = _dataset(root, name)
        other = _dataset(tmp_path / "seed1", name)
        key = "training" if first["training"] else "test"
        for a, b in zip(first[key], other[key]):
            img_a = a["image"] if isinstance(a, dict) else a
            img_b = b["image"] if isinstance(b, dict) else b
            assert img_a == img_b
            assert (root / name / img_a).read_bytes() != (tmp_path / "seed1" / name / img_b).read_bytes()


def test_adding_cases_keeps_earlier_ones(root: Path, tmp_path: Path) -> None:
    run(tmp_path / "fewer", {**SMALL, "cases_per_task": 2, "pool_cases": 1})
    fewer = _files(tmp_path / "fewer")
    full = _files(root)
    nifti = [n for n in fewer if n.endswith(".nii.gz")]
    assert len(nifti) == 4 * 2 * 2 + 1
    for name in nifti:
        assert fewer[name] == full[name], name


@pytest.mark.parametrize("name", LABELLED)
def test_labelled_layout_valid(root: Path, name: str) -> None:
    ds = _dataset(root, name)
    for key in ("name", "description", "tensorImageSize", "modality", "labels", "licence", "reference"):
        assert key in ds, key
    assert ds["tensorImageSize"] == "3D"
    assert ds["numTraining"] == len(ds["training"]) == SMALL["cases_per_task"]
    assert ds["numTest"] == 0
    declared = {int(k) for k in ds["labels"]}
    assert declared == set(range(len(declared))) and ds["labels"]["0"] == "background"
    assert sorted(ds["synth_cases"]) == [f"{name}_{i:03d}" for i in range(SMALL["cases_per_task"])]
    assert sorted(p.name for p in (root / name / "imagesTr").iterdir()) == sorted(
        Path(e["image"]).name for e in ds["training"]
    )
    ct = ds["modality"] == {"0": "CT"}
    for entry in ds["training"]:
        case = Path(entry["image"]).name.removesuffix(".nii.gz")
        assert Path(entry["label"]).name == f"{case}.nii.gz"
        img = nib.load(root / name / entry["image"])
        lab = nib.load(root / name / entry["label"])
        assert img.shape == lab.shape and len(img.shape) == 3
        np.testing.assert_allclose(img.affine, lab.affine, atol=1e-5)
        for nii in (img, lab):
            assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
            np.testing.assert_allclose(nii.get_qform(), nii.get_sform(), atol=1e-4)
        assert img.get_data_dtype() == (np.int16 if ct else np.float32)
        assert lab.get_data_dtype() == np.uint8
        labels = np.asarray(lab.dataobj)
        assert set(np.unique(labels).tolist()) <= declared
        assert np.bincount(labels.ravel(), minlength=len(declared)).tolist() == ds["synth_cases"][case]["label_voxels"]
        image = np.asarray(img.dataobj)
        assert list(image.shape) == ds["synth_cases"][case]["shape"]
        if ct:
            # air around a body: cropping to the body must remove something
            assert np.median(image[labels == 0]) < 500 and image.min() <= -900
            assert 0.2 < (image > -500).mean() < 0.95
            assert abs(float(np.median(image[labels == 1])) - 65) < 45  # liver-like HU despite bias and noise
        else:
            assert image.min() == 0.0 and 0.1 < (image != 0).mean() < 0.95
            assert np.all(labels[image == 0] == 0)


def test_organ_lesion_is_anisotropic_and_not_ras(root: Path) -> None:
    ds = _dataset(root, "organ_lesion")
    for entry in ds["training"]:
        img = nib.load(root / "organ_lesion" / entry["image"])
        codes = nib.aff2axcodes(img.affine)
        assert codes == CT_AXCODES and codes != ("R", "A", "S")
        assert codes[0] not in ("R", "L")  # a permutation, not flips only
        zooms = np.asarray(img.header.get_zooms()[:3])
        assert zooms.max() / zooms.min() > 2.0
        assert np.abs(img.affine[:3, 3]).max() > 1.0
        # thick slices along S mean fewer voxels along that axis than along the in-plane axes
        slice_axis = [c in ("S", "I") for c in codes].index(True)
        assert img.shape[slice_axis] < min(s for i, s in enumerate(img.shape) if i != slice_axis)
    for name in ("paired_organs", "tubular", "unseen"):
        entry = _dataset(root, name)["training"][0]
        assert nib.aff2axcodes(nib.load(root / name / entry["image"]).affine) == ("R", "A", "S")


@pytest.mark.parametrize("name", LABELLED)
def test_every_case_has_its_structures(root: Path, name: str) -> None:
    ds = _dataset(root, name)
    absent = []
    for i, entry in enumerate(ds["training"]):
        case = f"{name}_{i:03d}"
        present = set(np.unique(np.asarray(nib.load(root / name / entry["label"]).dataobj)).tolist())
        expected = {int(k) for k in ds["labels"]}
        if name == "organ_lesion" and not ds["synth_cases"][case]["lesion"]:
            absent.append(i)
            expected.discard(2)
        assert present == expected, case
    if name == "organ_lesion":
        assert absent == [i for i in range(SMALL["cases_per_task"]) if i % LESION_ABSENT_EVERY == 2] == [2]


def test_lesion_lies_inside_organ(root: Path) -> None:
    ds = _dataset(root, "organ_lesion")
    for entry in ds["training"]:
        labels = np.asarray(nib.load(root / "organ_lesion" / entry["label"]).dataobj)
        if (labels == 2).any():
            assert (labels == 2).sum() < (labels == 1).sum()


def test_paired_organs_are_left_and_right(root: Path) -> None:
    ds = _dataset(root, "paired_organs")
    for entry in ds["training"]:
        lab = nib.load(root / "paired_organs" / entry["label"])
        labels = np.asarray(lab.dataobj)
        centers = [nib.affines.apply_affine(lab.affine, np.argwhere(labels == k).mean(0)) for k in (1, 2)]
        assert centers[0][0] < centers[1][0]  # RAS+: left has the smaller x
        sizes = [(labels == k).sum() for k in (1, 2)]
        assert 0.6 < sizes[0] / sizes[1] < 1.6


def test_tube_is_thin(root: Path) -> None:
    ds = _dataset(root, "tubular")
    for entry in ds["training"]:
        lab = nib.load(root / "tubular" / entry["label"])
        vessel = np.asarray(lab.dataobj) == 1
        assert 0 < vessel.mean() < 0.08  # about 1 % at the default shape; the tiny test grid makes it larger
        # largest inscribed radius of a tube of radius <= 2.5 mm
        assert distance_transform_edt(vessel, sampling=lab.header.get_zooms()[:3]).max() <= 3.5
        # it runs through the volume along S
        assert vessel.any(axis=(0, 1)).mean() > 0.8


def test_cyst_wall_surrounds_cyst(root: Path) -> None:
    from scipy.ndimage import binary_dilation

    ds = _dataset(root, "unseen")
    for entry in ds["training"]:
        labels = np.asarray(nib.load(root / "unseen" / entry["label"]).dataobj)
        ring = binary_dilation(labels == 1) & (labels != 1)
        assert (labels[ring] == 2).mean() > 0.9


def test_pool_has_no_labels(root: Path) -> None:
    ds = _dataset(root, "pool")
    assert ds["training"] == [] and ds["numTraining"] == 0
    assert ds["numTest"] == len(ds["test"]) == SMALL["pool_cases"]
    assert ds["test"] == [f"./imagesTs/pool_{i:03d}.nii.gz" for i in range(SMALL["pool_cases"])]
    assert not (root / "pool" / "labelsTr").exists() and not (root / "pool" / "imagesTr").exists()
    assert sorted(p.name for p in (root / "pool" / "imagesTs").iterdir()) == [Path(t).name for t in ds["test"]]
    kinds = {ds["synth_cases"][c]["anatomy"] for c in ds["synth_cases"]}
    assert kinds == {"organ", "paired", "tube"}
    for item in ds["test"]:
        img = nib.load(root / "pool" / item)
        assert img.get_data_dtype() == np.float32 and nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_domain_shift_recorded_and_varied(root: Path) -> None:
    shifts: dict[str, list[float]] = {}
    for name in DATASETS:
        cases = _dataset(root, name)["synth_cases"]
        for params in cases.values():
            for key in ("domain_shift", "noise_sigma", "bias_strength", "blur_mm", "shape", "spacing", "axcodes"):
                assert key in params, key
        shifts[name] = [p["domain_shift"] for p in cases.values()]
        assert len(set(p["noise_sigma"] for p in cases.values())) == len(cases)
    assert max(shifts["pool"]) <= 0.5
    task_shifts = [s for name in LABELLED for s in shifts[name]]
    assert min(task_shifts) >= 0.0 and max(task_shifts) <= 1.0 and np.ptp(task_shifts) > 0.3


def test_synth_json_has_settings_and_provenance(root: Path) -> None:
    record = json.loads((root / "synth.json").read_text())
    assert record["settings"] == SMALL
    assert record["provenance"]["stage"] == "synth" and record["provenance"]["seed"] == 0
    assert set(record["datasets"]) == set(DATASETS)


def test_rerun_replaces_existing_datasets(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    stale = out / "tubular" / "imagesTr" / "tubular_099.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (out / "keep.txt").write_text("not ours")
    run(out, {**SMALL, "cases_per_task": 1, "pool_cases": 1})
    assert not stale.exists()
    assert (out / "keep.txt").read_text() == "not ours"
    assert (out / "tubular" / "imagesTr" / "tubular_000.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no staging folder left behind


@pytest.mark.parametrize(
    "settings",
    [
        {"seed": -1},
        {"seed": 1.5},
        {"shape": [24, 24]},
        {"shape": [24, 24, 4]},
        {"shape": [24, 24, "20"]},
        {"cases_per_task": 0},
        {"pool_cases": True},
        {"sed": 3},
    ],
)
def test_bad_settings_refused_before_writing(tmp_path: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(InputError, match="settings"):
        run(tmp_path / "raw", settings)
    assert list(tmp_path.iterdir()) == []


def test_resolve_settings_fills_defaults() -> None:
    assert resolve_settings({}) == {"seed": 0, "shape": [40, 40, 32], "cases_per_task": 12, "pool_cases": 16}
    assert resolve_settings({"seed": 7})["seed"] == 7


def test_cli_bad_json_exits_2(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--settings"):
        main(["--out", str(tmp_path / "raw"), "--settings", "{not json"])
    proc = subprocess.run(
        [sys.executable, "-m", "stages.synth", "--out", str(tmp_path / "raw"), "--settings", '{"seed": -3}'],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "settings.seed" in proc.stderr
    assert not (tmp_path / "raw").exists()
