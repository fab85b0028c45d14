"""Inputs that once slipped through: each is refused naming its file and problem (or warned about
where it is legal but suspicious), before any job or with no partial output, also by hand."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from test_preprocess import make_dataset

from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.preprocess import run as preprocess

REPO = Path(__file__).resolve().parents[2]


def _refused(tmp_path: Path, settings: dict[str, Any] | None = None) -> str:
    """Preprocess ``tmp_path/ds`` (as a stage run by hand would); the refusal text; no output left."""
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        preprocess(tmp_path / "ds", out, settings or {})
    assert not (out / "cases").exists() and not (out / "manifest.parquet").exists()
    assert not [p for p in out.parent.glob(".cases*")] if out.exists() else True
    return str(info.value)


def _replace_image(path: Path, data: np.ndarray, affine: np.ndarray | None = None, slope: float | None = None) -> None:
    old = nib.load(path)
    img = nib.Nifti1Image(data, old.affine if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))


# ---- values and geometry preprocessing cannot use -------------------------------------------------
def test_float64_voxel_beyond_float32_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    bad = tmp_path / "ds" / "imagesTr" / "case_001.nii.gz"
    data = np.asarray(nib.load(bad).dataobj, dtype=np.float64)
    data[5, 5, 4] = 1e300
    _replace_image(bad, data)
    text = _refused(tmp_path)
    assert str(bad) in text and "beyond float32's range" in text and "1e+300" in text


def test_int16_scaled_beyond_float32_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    bad = tmp_path / "ds" / "imagesTr" / "case_002.nii.gz"
    data = np.asarray(nib.load(bad).dataobj).astype(np.int16)
    _replace_image(bad, data, slope=1e36)
    assert nib.load(bad).dataobj.slope == pytest.approx(1e36)
    text = _refused(tmp_path)
    assert str(bad) in text and "scl_slope 1e+36" in text and "beyond float32's range" in text


def test_constant_image_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    bad = tmp_path / "ds" / "imagesTr" / "case_000.nii.gz"
    _replace_image(bad, np.full((11, 12, 9), 7.0, np.float32))
    text = _refused(tmp_path)
    assert str(bad) in text and "constant image (every voxel is 7)" in text


def test_implausible_spacing_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    bad = tmp_path / "ds" / "imagesTr" / "case_001.nii.gz"
    affine = np.diag([1.0, 1.0, 1e-9, 1.0])  # det 1e-9: not singular, but no scanner makes 1e-9 mm slices
    _replace_image(bad, np.asarray(nib.load(bad).dataobj), affine=affine)
    # the label must share the image's grid, or the affine mismatch is what gets reported
    label = tmp_path / "ds" / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(label).dataobj), affine), str(label))
    text = _refused(tmp_path)
    assert str(bad) in text and "implausible voxel spacing 1x1x1e-09 mm" in text


def _one_case_at_12x(tmp_path: Path) -> Path:
    make_dataset(tmp_path / "ds", n=4)
    bad = tmp_path / "ds" / "imagesTr" / "case_003.nii.gz"
    affine = nib.load(bad).affine.copy()
    affine[:3, :3] *= 12
    _replace_image(bad, np.asarray(nib.load(bad).dataobj), affine=affine)
    label = tmp_path / "ds" / "labelsTr" / "case_003.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(label).dataobj), affine), str(label))
    return bad


def test_case_too_large_once_resampled_is_refused_before_writing(tmp_path: Path) -> None:
    bad = _one_case_at_12x(tmp_path)
    # 11x12x9 voxels at 12x the spacing become ~1.2 M voxels at the median spacing
    text = _refused(tmp_path, {"max_voxels": 1_000_000})
    assert str(bad) in text and "too large once resampled" in text and "raise preprocess.max_voxels" in text
    assert "case_000" not in text


def test_spacing_outlier_within_the_limit_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _one_case_at_12x(tmp_path)
    preprocess(tmp_path / "ds", tmp_path / "out", {})
    err = capsys.readouterr().err
    assert f"warning: {bad}" in err and "12.0x the dataset's median spacing" in err
    assert "case_000" not in err.replace(str(bad), "")


def test_task_whose_labels_are_all_empty_is_refused(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    for label in (tmp_path / "ds" / "labelsTr").glob("*.nii.gz"):
        data = np.asarray(nib.load(label).dataobj)
        nib.save(nib.Nifti1Image(np.where(data == 2, 2, 0).astype(np.uint8), nib.load(label).affine), str(label))
    # label 1 is empty in every case: a task that keeps only label 1 has nothing to learn
    text = _refused(tmp_path, {"labels": [1]})
    assert str(tmp_path / "ds") in text and "every label volume is empty for this task's labels [1]" in text
    preprocess(tmp_path / "ds", tmp_path / "out2", {"labels": [2]})  # label 2 is there: accepted


def test_memory_error_names_the_case_and_leaves_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.preprocess as stage

    make_dataset(tmp_path / "ds", n=4)
    real = stage.preprocess_case
    calls = []

    def preprocess_case(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("Unable to allocate 476. MiB for an array")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "preprocess_case", preprocess_case)
    text = _refused(tmp_path)
    assert "case_002.nii.gz" in text and "ran out of memory" in text
    assert not list((tmp_path / "out").rglob("*.npy"))


def test_stage_by_hand_exits_non_zero_with_the_file_and_no_traceback(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    bad = tmp_path / "ds" / "imagesTr" / "case_000.nii.gz"
    _replace_image(bad, np.full((11, 12, 9), 3.0, np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.preprocess", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode != 0 and str(bad) in proc.stderr and "constant image" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "cases").exists()


# ---- dataset.json entries that leave the dataset folder --------------------------------------------
@pytest.mark.parametrize("entry", ["../../elsewhere/case_000.nii.gz", "/abs/imagesTr/case_000.nii.gz"])
def test_dataset_entries_outside_the_folder_are_refused(tmp_path: Path, entry: str) -> None:
    make_dataset(tmp_path / "ds", n=3)
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    meta["training"][0]["image"] = entry
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(meta))
    text = _refused(tmp_path)
    assert f"{entry!r} points outside the dataset folder" in text
    with pytest.raises(InputError) as info:
        validate_config(_config(tmp_path))
    assert info.value.where == f"{tmp_path / 'ds'}/dataset.json"
    assert "points outside the dataset folder" in info.value.problem


# ---- configurations refused before any job ---------------------------------------------------------
def _config(tmp_path: Path, n: int | None = None) -> dict[str, Any]:
    if n is not None:
        make_dataset(tmp_path / "ds", n=n)
    return {
        "tasks": [
            {"name": "a", "dataset": str(tmp_path / "ds"), "labels": [1]},
            {"name": "b", "dataset": str(tmp_path / "ds"), "labels": [2]},
        ],
        "foundation": {"pool": str(tmp_path / "ds")},
        "methods": {"assft": {"enabled": False}},
    }


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (
            lambda c: c["train"].update(lr=float("nan")) if "train" in c else c.update(train={"lr": float("nan")}),
            "config: train.lr",
            "must be a finite number, got nan",
        ),
        (lambda c: c["tasks"][0].update(labels=[1, 1]), "config: tasks[0].labels", "non-unique elements"),
        (lambda c: c["tasks"][0].update(labels=[3]), "config: tasks[0].labels", "[3] are not declared by"),
        (lambda c: c["tasks"][0].update(name="all"), "config: tasks[0].name", "'all' is reserved"),
        (
            lambda c: c.update(preprocess={"split": {"val": 0.2, "test": 0.05}}),
            "config: preprocess.split.test",
            "task 'a' has 8 cases",
        ),
    ],
    ids=["lr-nan", "labels-duplicated", "labels-undeclared", "task-named-all", "no-test-case"],
)
def test_bad_config_is_refused_before_any_job(tmp_path: Path, mutate: Any, key: str, problem: str) -> None:
    config = _config(tmp_path, n=8)
    validate_config(copy.deepcopy(config))  # the unmutated one is fine
    mutate(config)
    with pytest.raises(InputError) as info:
        validate_config(config)
    assert info.value.where == key
    assert problem in info.value.problem


def test_snakemake_refuses_a_nan_learning_rate_before_any_job(tmp_path: Path) -> None:
    config = _config(tmp_path, n=8)
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config) + "train: {lr: .nan}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "workflow" / "Snakefile"),
            "-n",
            "--cores",
            "1",
            "--configfile",
            "my.yaml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "config: train.lr: must be a finite number, got nan" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
