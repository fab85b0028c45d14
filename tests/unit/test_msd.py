"""Tests for stages.core.msd: reading MSD datasets and refusing every kind of bad input by a clear message."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from stages.core.errors import InputError
from stages.core.msd import dataset_labels, load_nifti_3d, read_dataset, read_label_array, validate_dataset

SHARED = Path(__file__).resolve().parents[3] / "shared"
HIPPO = SHARED / "data" / "hippocampus"
OUTLIERS = SHARED / "data" / "hippocampus_outliers"
SHAPE = (9, 10, 11)


def _save(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def make_case(
    root: Path,
    cid: str,
    image: np.ndarray | None = None,
    label: np.ndarray | None = None,
    with_label: bool = True,
    label_affine: np.ndarray | None = None,
) -> None:
    """A small good case (blob image, labels 0/1/2) unless the caller passes something else."""
    rng = np.random.default_rng(zlib.crc32(cid.encode()))
    if image is None:
        image = (rng.random(SHAPE) * 100 + 10).astype(np.float32)
    _save(image, root / "imagesTr" / f"{cid}.nii.gz")
    if with_label:
        if label is None:
            label = np.zeros(SHAPE, np.uint8)
            label[2:5, 3:6, 4:7] = 1
            label[5:7, 3:6, 4:7] = 2
        _save(label, root / "labelsTr" / f"{cid}.nii.gz", label_affine)


def write_json(root: Path, cids: list[str], **overrides: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "Synthetic",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": len(cids),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cids],
        "test": [],
    }
    meta.update(overrides)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))
    return meta


def refusal(root: Path, labelled: bool = True) -> str:
    with pytest.raises(InputError) as info:
        validate_dataset(read_dataset(root, labelled=labelled), labelled=labelled)
    return str(info.value)


# ---------------------------------------------------------------------------------------- good input


def test_reads_and_validates_json_dataset(tmp_path: Path) -> None:
    for cid in ("case_b", "case_a"):
        make_case(tmp_path, cid)
    write_json(tmp_path, ["case_b", "case_a"])
    ds = read_dataset(tmp_path)
    assert ds.name == "Synthetic" and ds.modality == {"0": "MRI"}
    assert ds.labels == {0: "background", 1: "a", 2: "b"}
    assert [c.case_id for c in ds.cases] == ["case_a", "case_b"]
    assert ds.cases[0].image == tmp_path / "imagesTr" / "case_a.nii.gz"
    validated = validate_dataset(ds)
    assert [v.case_id for v in validated] == ["case_a", "case_b"]
    assert validated[0].shape == SHAPE and validated[0].label_values == (0, 1, 2)
    assert validated[0].image_sha256 and validated[0].label_sha256


def test_bare_folder_pairs_by_name_and_infers_labels(tmp_path: Path) -> None:
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:3, 1:3] = 4
    make_case(tmp_path, "x1", label=label)
    make_case(tmp_path, "x2")
    (tmp_path / "imagesTr" / "._x1.nii.gz").write_bytes(b"macOS fork")  # MSD tars carry these
    ds = read_dataset(tmp_path)
    assert not ds.labels_declared and [c.case_id for c in ds.cases] == ["x1", "x2"]
    validated = validate_dataset(ds)
    assert dataset_labels(ds, validated) == {0: "background", 1: "label_1", 2: "label_2", 4: "label_4"}
    declared = read_dataset(tmp_path, declared_labels={0: "bg", 1: "a", 2: "b"})
    assert "label values [4] are not in the declared label set [0, 1, 2]" in refusal_of(declared)


def refusal_of(ds: Any) -> str:
    with pytest.raises(InputError) as info:
        validate_dataset(ds)
    return str(info.value)


def test_float_labels_and_singleton_4d_are_accepted(tmp_path: Path) -> None:
    image = (np.random.default_rng(0).random(SHAPE + (1,)) + 1).astype(np.float32)
    label = np.zeros(SHAPE, np.float32)
    label[2:4, 2:4, 2:4] = 2.0
    make_case(tmp_path, "c", image=image, label=label)
    write_json(tmp_path, ["c"])
    (case,) = validate_dataset(read_dataset(tmp_path))
    assert case.shape == SHAPE and case.label_values == (0, 2)
    values = read_label_array(tmp_path / "labelsTr" / "c.nii.gz", allowed=[0, 1, 2])
    assert values.dtype.kind == "i" and set(np.unique(values)) == {0, 2}


def test_unlabelled_reads_test_and_training_images(tmp_path: Path) -> None:
    make_case(tmp_path, "tr1")
    _save(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), tmp_path / "imagesTs" / "ts1.nii.gz")
    write_json(tmp_path, ["tr1"], test=["./imagesTs/ts1.nii.gz"], numTest=1)
    ds = read_dataset(tmp_path, labelled=False)
    assert [(c.case_id, c.label) for c in ds.cases] == [("tr1", None), ("ts1", None)]
    assert [v.label for v in validate_dataset(ds, labelled=False)] == [None, None]
    (tmp_path / "dataset.json").unlink()
    assert [c.case_id for c in read_dataset(tmp_path, labelled=False).cases] == ["tr1", "ts1"]


# ------------------------------------------------------------------------------------------- refusals


def _bad_case(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """Write one good and one bad case; return the file the message must name and the expected text."""
    make_case(tmp_path, "good")
    cids = ["good", "bad"]
    img_path = tmp_path / "imagesTr" / "bad.nii.gz"
    lbl_path = tmp_path / "labelsTr" / "bad.nii.gz"
    overrides: dict[str, Any] = {}
    image = (np.random.default_rng(1).random(SHAPE) + 1).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    if kind == "missing_image":
        make_case(tmp_path, "bad")
        img_path.unlink()
        expect = (img_path, "listed in dataset.json (training[1].image) but the file does not exist")
    elif kind == "missing_label":
        make_case(tmp_path, "bad", with_label=False)
        expect = (lbl_path, "listed in dataset.json (training[1].label) but the file does not exist")
    elif kind == "shape":
        make_case(tmp_path, "bad", label=np.zeros((9, 10, 12), np.uint8))
        expect = (lbl_path, "label shape (9, 10, 12) differs from image shape (9, 10, 11)")
    elif kind == "affine":
        shifted = np.eye(4)
        shifted[0, 3] = 0.5
        make_case(tmp_path, "bad", label_affine=shifted)
        expect = (lbl_path, "label affine differs from the image's")
    elif kind == "nan":
        image[0, 0, :3] = np.nan
        make_case(tmp_path, "bad", image=image)
        expect = (img_path, "3 non-finite voxels (3 NaN, 0 Inf)")
    elif kind == "inf":
        image[1, 1, 1] = np.inf
        image[1, 1, 2] = -np.inf
        make_case(tmp_path, "bad", image=image)
        expect = (img_path, "2 non-finite voxels (0 NaN, 2 Inf)")
    elif kind == "4d":
        make_case(tmp_path, "bad", image=np.ones(SHAPE + (2,), np.float32))
        expect = (img_path, "is 4D with shape (9, 10, 11, 2): expected a 3D volume")
    elif kind == "2d":
        make_case(tmp_path, "bad", image=np.ones((9, 10), np.float32))
        expect = (img_path, "is 2D with shape (9, 10): expected a 3D volume")
    elif kind == "label_outside":
        label[0, 0, 0] = 5
        label[0, 0, 1] = 7
        make_case(tmp_path, "bad", label=label)
        expect = (lbl_path, "label values [5, 7] are not in the declared label set [0, 1, 2]")
    elif kind == "label_fraction":
        make_case(tmp_path, "bad", label=np.full(SHAPE, 0.5, np.float32))
        expect = (lbl_path, "label values are not integers: 990 voxels, e.g. [0.5]")
    elif kind == "truncated":
        make_case(tmp_path, "bad")
        raw = img_path.read_bytes()
        img_path.write_bytes(raw[: len(raw) // 2])
        expect = (img_path, "corrupt or truncated NIfTI (gzip)")
    elif kind == "truncated_header":
        make_case(tmp_path, "bad")
        lbl_path.write_bytes(lbl_path.read_bytes()[:40])  # cut inside the NIfTI header
        expect = (lbl_path, "corrupt or truncated NIfTI (gzip)")
    elif kind == "bad_trailer":
        make_case(tmp_path, "bad")
        raw = img_path.read_bytes()
        img_path.write_bytes(raw[:-8] + b"\0" * 8)  # voxels intact, CRC and length wrong
        expect = (img_path, "corrupt or truncated NIfTI (gzip)")
    elif kind == "short_data":
        make_case(tmp_path, "bad")
        raw = gzip.decompress(img_path.read_bytes())
        img_path.write_bytes(gzip.compress(raw[: len(raw) - 200], mtime=0))
        expect = (img_path, "truncated NIfTI (voxel data shorter than the header says)")
    elif kind == "not_gzip":
        make_case(tmp_path, "bad")
        img_path.write_bytes(b"this is not a NIfTI file" * 20)
        expect = (img_path, "corrupt or truncated NIfTI (gzip)")
    elif kind == "zero_byte":
        make_case(tmp_path, "bad")
        lbl_path.write_bytes(b"")
        expect = (lbl_path, "empty file (0 bytes)")
    elif kind == "num_training":
        make_case(tmp_path, "bad")
        overrides["numTraining"] = 5
        expect = (tmp_path / "dataset.json", "numTraining is 5 but 'training' lists 2 entries")
    elif kind == "duplicate":
        make_case(tmp_path, "bad")
        cids = ["good", "bad", "bad"]
        expect = (img_path, "duplicate case id 'bad'")
    elif kind == "missing_key":
        make_case(tmp_path, "bad")
        overrides["labels"] = None
        expect = (tmp_path / "dataset.json", "missing key 'labels'")
    elif kind == "mismatched_pair":
        make_case(tmp_path, "bad")
        write_json(tmp_path, cids)
        meta = json.loads((tmp_path / "dataset.json").read_text())
        meta["training"][1]["label"] = "./labelsTr/good.nii.gz"
        (tmp_path / "dataset.json").write_text(json.dumps(meta))
        return tmp_path / "dataset.json", "training[1] pairs image bad.nii.gz with label good.nii.gz of another case"
    else:
        raise AssertionError(kind)
    write_json(tmp_path, cids, **overrides)
    return expect


REFUSALS = [
    "missing_image",
    "missing_label",
    "shape",
    "affine",
    "nan",
    "inf",
    "4d",
    "2d",
    "label_outside",
    "label_fraction",
    "truncated",
    "truncated_header",
    "bad_trailer",
    "short_data",
    "not_gzip",
    "zero_byte",
    "num_training",
    "duplicate",
    "missing_key",
    "mismatched_pair",
]


@pytest.mark.parametrize("kind", REFUSALS)
def test_refuses_bad_case_by_message(tmp_path: Path, kind: str) -> None:
    where, problem = _bad_case(tmp_path, kind)
    message = refusal(tmp_path)
    assert f"{where}: {problem}" in message, message
    assert "good.nii.gz:" not in message  # only the bad file is blamed


def test_collects_every_problem_in_one_error(tmp_path: Path) -> None:
    make_case(tmp_path, "good")
    nan = np.ones(SHAPE, np.float32)
    nan[0, 0, 0] = np.nan
    make_case(tmp_path, "nan", image=nan)
    make_case(tmp_path, "shape", label=np.zeros((3, 3, 3), np.uint8))
    make_case(tmp_path, "orphan", with_label=False)
    (tmp_path / "labelsTr" / "empty.nii.gz").write_bytes(b"")
    message = refusal(tmp_path)
    assert message.startswith(f"{tmp_path}: 4 problem(s) in the dataset:")
    lines = message.splitlines()[1:]
    assert len(lines) == 4
    assert any("nan.nii.gz: 1 non-finite voxels" in line for line in lines)
    assert any("shape.nii.gz: label shape (3, 3, 3) differs" in line for line in lines)
    assert any("orphan.nii.gz: image has no label" in line for line in lines)
    assert any("empty.nii.gz: label has no image" in line for line in lines)


def test_malformed_json_is_refused(tmp_path: Path) -> None:
    make_case(tmp_path, "good")
    (tmp_path / "dataset.json").write_text('{"training": [')
    with pytest.raises(InputError, match=r"dataset\.json: malformed JSON"):
        read_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a JSON object, got list"):
        read_dataset(tmp_path)


def test_missing_folder_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset folder does not exist"):
        read_dataset(tmp_path / "nope")
    assert "no dataset.json and no NIfTI files in imagesTr/ and labelsTr/" in refusal(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    make_case(tmp_path, "good")
    make_case(tmp_path, "bad")
    write_json(tmp_path, ["good", "bad"])
    path = tmp_path / "imagesTr" / "bad.nii.gz"
    path.chmod(0)
    try:
        assert f"{path}: unreadable" in refusal(tmp_path)
    finally:
        path.chmod(0o644)


def test_load_nifti_3d_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_nifti_3d(tmp_path / "none.nii.gz")


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def hippocampus() -> Path:
    if not (HIPPO / "dataset.json").is_file():
        pytest.skip(f"real data not found at {HIPPO} (../shared/data/hippocampus)")
    return HIPPO


def test_real_hippocampus_validates(hippocampus: Path) -> None:
    ds = read_dataset(hippocampus)
    assert ds.modality == {"0": "MRI"} and ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    validated = validate_dataset(ds)
    assert len(validated) == 260
    dtypes = [v.image_dtype for v in validated]
    assert dtypes.count("float32") == 205 and dtypes.count("uint8") == 55
    by_id = {v.case_id: v for v in validated}
    for cid in ("hippocampus_003", "hippocampus_243"):  # labels stored as float32 0/1/2
        assert by_id[cid].label_values == (0, 1, 2)


def _outlier_folder(tmp_path: Path, files: dict[str, Path]) -> Path:
    root = tmp_path / "ds"
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
    return root


@pytest.fixture(scope="module")
def outliers() -> Path:
    if not OUTLIERS.is_dir():
        pytest.skip(f"outlier data not found at {OUTLIERS} (../shared/data/hippocampus_outliers)")
    return OUTLIERS


def test_outlier_118_image_without_label(tmp_path: Path, hippocampus: Path, outliers: Path) -> None:
    root = _outlier_folder(
        tmp_path,
        {
            "imagesTr/hippocampus_118.nii.gz": outliers / "imagesTr" / "hippocampus_118.nii.gz",
            "imagesTr/hippocampus_001.nii.gz": hippocampus / "imagesTr" / "hippocampus_001.nii.gz",
            "labelsTr/hippocampus_001.nii.gz": hippocampus / "labelsTr" / "hippocampus_001.nii.gz",
        },
    )
    message = refusal(root)
    expected = f"{root}/labelsTr/hippocampus_118.nii.gz"
    assert f"{root}/imagesTr/hippocampus_118.nii.gz: image has no label (expected {expected})" in message
    assert "1 problem(s)" in message


def test_outlier_010_label_without_image(tmp_path: Path, outliers: Path) -> None:
    name = "labelsTr/hippocampus_010.nii.gz"
    root = _outlier_folder(tmp_path, {name: outliers / name})
    message = refusal(root)
    expected = f"{root}/imagesTr/hippocampus_010.nii.gz"
    assert f"{root}/{name}: label has no image (expected {expected}); the file is 36x50x31 at 1x1x1 mm" in message


def test_outlier_281_label_of_another_size(tmp_path: Path, hippocampus: Path, outliers: Path) -> None:
    label = outliers / "labelsTr" / "hippocampus_281.nii.gz"
    alone = _outlier_folder(tmp_path / "alone", {"labelsTr/hippocampus_281.nii.gz": label})
    message = refusal(alone)
    assert f"{alone}/labelsTr/hippocampus_281.nii.gz: label has no image" in message
    assert "the file is 512x512x94 at 0.7344x0.7344x5 mm" in message
    # given a hippocampus image under its name, it is refused for its size, not silently resampled
    paired = _outlier_folder(
        tmp_path / "paired",
        {
            "labelsTr/hippocampus_281.nii.gz": label,
            "imagesTr/hippocampus_281.nii.gz": hippocampus / "imagesTr" / "hippocampus_001.nii.gz",
        },
    )
    message = refusal(paired)
    problem = "label shape (512, 512, 94) differs from image shape (35, 51, 35)"
    assert f"{paired}/labelsTr/hippocampus_281.nii.gz: {problem}" in message


def test_outlier_folder_lists_all_three(outliers: Path) -> None:
    message = refusal(outliers)
    assert "3 problem(s)" in message
    for name, problem in (
        ("hippocampus_118", "image has no label"),
        ("hippocampus_010", "label has no image"),
        ("hippocampus_281", "label has no image"),
    ):
        assert any(name in line and problem in line for line in message.splitlines())


def test_permission_error_is_reported_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the chmod test above cannot run as root; this one drives the same path on any user
    make_case(tmp_path, "good")
    make_case(tmp_path, "bad")
    write_json(tmp_path, ["good", "bad"])
    path = tmp_path / "labelsTr" / "bad.nii.gz"
    real_load = nib.load

    def load(filename: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(filename) == path:
            raise PermissionError(13, "Permission denied", str(filename))
        return real_load(filename, *args, **kwargs)

    monkeypatch.setattr(nib, "load", load)
    assert f"{path}: unreadable: Permission denied" in refusal(tmp_path)


def test_label_reports_shape_and_values_together(tmp_path: Path) -> None:
    label = np.full((9, 10, 12), 0.25, np.float32)
    make_case(tmp_path, "bad", label=label)
    write_json(tmp_path, ["bad"])
    message = refusal(tmp_path)
    assert "2 problem(s)" in message
    assert "label shape (9, 10, 12) differs from image shape (9, 10, 11)" in message
    assert "label values are not integers: 1080 voxels" in message
