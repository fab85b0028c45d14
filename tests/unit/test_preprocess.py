"""Tests for stages.preprocess: the manifest contract, the seeded split, refusals that write nothing, reruns."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.core.errors import InputError, run_cli
from stages.core.io import read_provenance, sha256_file
from stages.preprocess import main, resolve_settings, run, split_cases

SHARED = Path(__file__).resolve().parents[3] / "shared"
HIPPO = SHARED / "data" / "hippocampus"

MANIFEST_COLUMNS = [
    "case",
    "split",
    "image_path",
    "label_path",
    "image_sha256",
    "label_sha256",
    "array_sha256",
    "seg_sha256",
    "orig_shape",
    "orig_spacing",
    "orig_affine",
    "orig_axcodes",
    "crop_box",
    "cropped_shape",
    "shape",
    "spacing",
    "intensity_mean",
    "intensity_std",
    "intensity_p005",
    "intensity_p995",
    "label_counts",
    "num_classes",
]


def make_dataset(root: Path, n: int = 5, modality: str = "MRI", shape: tuple[int, int, int] = (11, 12, 9)) -> list[str]:
    """A small MSD dataset: LPS, anisotropic, a zero margin around the body, labels 0/1/2."""
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = [30, 20, -10]
    cids = [f"case_{i:03d}" for i in range(n)]
    for cid in cids:
        rng = np.random.default_rng(zlib.crc32(cid.encode()))
        image = np.zeros(shape, np.float32)
        base = -1000.0 if modality == "CT" else 300.0
        image[1:-1, 1:-1, 1:-1] = base + rng.normal(0, 50, (shape[0] - 2, shape[1] - 2, shape[2] - 2))
        label = np.zeros(shape, np.uint8)
        label[3:7, 3:8, 2:5] = 1
        label[5:7, 3:8, 5:7] = 2
        image[label > 0] += 400 + 10 * rng.normal(size=int((label > 0).sum()))
        for folder, data in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(root / folder / f"{cid}.nii.gz"))
    meta = {
        "name": "Tiny",
        "modality": {"0": modality},
        "labels": {"0": "background", "1": "one", "2": "two"},
        "numTraining": n,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cids],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return cids


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_follows_the_fractions() -> None:
    ids = [f"c{i:02d}" for i in range(20)]
    split = split_cases(ids, seed=3, val=0.2, test=0.25)
    assert split == split_cases(list(reversed(ids)), seed=3, val=0.2, test=0.25)  # input order does not matter
    counts = {k: list(split.values()).count(k) for k in ("train", "val", "test")}
    assert counts == {"train": 11, "val": 4, "test": 5}
    assert split != split_cases(ids, seed=4, val=0.2, test=0.25)


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [
        (1, 0.2, 0.2, (1, 0, 0)),
        (2, 0.2, 0.2, (2, 0, 0)),
        (3, 0.2, 0.2, (1, 1, 1)),
        (3, 0.5, 0.45, (1, 1, 1)),
        (2, 0.5, 0.45, (1, 0, 1)),
        (10, 0.25, 0.25, (4, 3, 3)),
        (10, 0.0, 0.0, (10, 0, 0)),
    ],
)
def test_split_rounding_keeps_a_training_case(n: int, val: float, test: float, expected: tuple[int, int, int]) -> None:
    split = list(split_cases([f"c{i}" for i in range(n)], 0, val, test).values())
    assert (split.count("train"), split.count("val"), split.count("test")) == expected


# -------------------------------------------------------------------------------------------- the run


def test_run_writes_cases_and_manifest(tmp_path: Path) -> None:
    cids = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    settings = {"seed": 1, "split": {"val": 0.2, "test": 0.2}, "target_spacing": [1.0, 1.0, 1.0]}
    run(tmp_path / "ds", out, settings)
    table = pq.read_table(out / "manifest.parquet")
    assert table.column_names == MANIFEST_COLUMNS
    manifest = table.to_pandas()
    assert manifest["case"].tolist() == cids
    assert sorted(manifest["split"]) == ["test", "train", "train", "train", "val"]
    assert set(manifest["num_classes"]) == {3}
    row = manifest.iloc[0]
    assert row["image_path"] == str(tmp_path / "ds" / "imagesTr" / "case_000.nii.gz")
    assert row["image_sha256"] == sha256_file(row["image_path"])
    assert row["label_sha256"] == sha256_file(row["label_path"])
    for _, r in manifest.iterrows():  # the preprocessed arrays too, as written (the audit re-checks them)
        assert r["array_sha256"] == sha256_file(out / "cases" / f"{r['case']}.npy")
        assert r["seg_sha256"] == sha256_file(out / "cases" / f"{r['case']}_seg.npy")
    assert row["orig_axcodes"] == "LPS" and list(row["orig_shape"]) == [11, 12, 9]
    assert list(row["orig_spacing"]) == [1.0, 1.0, 2.0] and len(row["orig_affine"]) == 16
    assert list(row["crop_box"]) == [1, 10, 1, 11, 1, 8] and list(row["cropped_shape"]) == [9, 10, 7]
    assert list(row["shape"]) == [9, 10, 14] and list(row["spacing"]) == [1.0, 1.0, 1.0]
    assert row["intensity_p005"] <= row["intensity_mean"] <= row["intensity_p995"]
    assert row["intensity_mean"] > 600  # over the labelled foreground, not the whole image

    image = np.load(out / "cases" / "case_000.npy")
    seg = np.load(out / "cases" / "case_000_seg.npy")
    assert image.dtype == np.float32 and image.shape == (1, 9, 10, 14)
    assert seg.dtype == np.uint8 and seg.shape == (9, 10, 14) and set(np.unique(seg)) == {0, 1, 2}
    assert list(row["label_counts"]) == np.bincount(seg.ravel(), minlength=3).tolist()
    assert abs(float(image.mean())) < 1e-3  # mr: z-scored over the body, which fills the crop here

    prov = read_provenance(out / "manifest.parquet")
    assert prov["stage"] == "preprocess" and prov["seed"] == 1 and prov["settings"] == settings
    assert prov["normalisation"] == "mr" and prov["target_spacing"] == [1.0, 1.0, 1.0]
    assert prov["label_map"] == {"1": 1, "2": 2} and prov["num_classes"] == 3
    files = sorted((tmp_path / "ds").rglob("*.nii.gz")) + [tmp_path / "ds" / "dataset.json"]
    assert prov["inputs"] == {str(p): sha256_file(p) for p in files}


def test_rerun_is_byte_identical(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    run(tmp_path / "ds", tmp_path / "a", {"seed": 5})
    run(tmp_path / "ds", tmp_path / "b", {"seed": 5})
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert sorted(first) == [
        "cases/case_000.npy",
        "cases/case_000_seg.npy",
        "cases/case_001.npy",
        "cases/case_001_seg.npy",
        "cases/case_002.npy",
        "cases/case_002_seg.npy",
        "manifest.parquet",
    ]
    assert first == second
    run(tmp_path / "ds", tmp_path / "a", {"seed": 5})  # over its own output
    assert _tree_bytes(tmp_path / "a") == second


def test_median_spacing_is_the_default_target(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=2)
    run(tmp_path / "ds", tmp_path / "out", {})
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert list(manifest["spacing"].iloc[0]) == [1.0, 1.0, 2.0]
    assert list(manifest["shape"].iloc[0]) == list(manifest["cropped_shape"].iloc[0])
    assert read_provenance(tmp_path / "out" / "manifest.parquet")["target_spacing"] == [1.0, 1.0, 2.0]


def test_label_subset_becomes_the_task_classes(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=2)
    run(tmp_path / "ds", tmp_path / "out", {"labels": [2]})
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert set(manifest["num_classes"]) == {2}
    seg = np.load(tmp_path / "out" / "cases" / "case_000_seg.npy")
    assert set(np.unique(seg)) == {0, 1} and int(seg.sum()) == 2 * 5 * 2  # the label-2 block; spacing is a no-op
    assert read_provenance(tmp_path / "out" / "manifest.parquet")["label_map"] == {"2": 1}


def test_unlabelled_set_is_a_pool(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=3)
    shutil.rmtree(tmp_path / "ds" / "labelsTr")  # unlabelled reading ignores labels entirely
    run(tmp_path / "ds", tmp_path / "out", {"labelled": False})
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    manifest = table.to_pandas()
    assert set(manifest["split"]) == {"pool"}
    assert manifest["label_path"].isna().all() and manifest["label_counts"].isna().all()
    assert manifest["num_classes"].isna().all() and manifest["seg_sha256"].isna().all()
    assert manifest["array_sha256"].notna().all()
    assert str(table.schema.field("label_path").type) == "string"
    assert not list((tmp_path / "out" / "cases").glob("*_seg.npy"))


def test_holdout_splits_pool_and_task_disjointly(tmp_path: Path) -> None:
    from stages.preprocess import held_out_cases

    ids = make_dataset(tmp_path / "ds", n=6)
    held = held_out_cases(ids, 0, 0.34)
    assert len(held) == 2 and held == held_out_cases(list(reversed(ids)), 0, 0.34)
    run(tmp_path / "ds", tmp_path / "pool", {"labelled": False, "holdout": {"fraction": 0.34, "keep": "held"}})
    run(
        tmp_path / "ds",
        tmp_path / "task",
        {"holdout": {"fraction": 0.34, "keep": "rest"}, "split": {"val": 0.0, "test": 0.25}},
    )
    pool = set(pq.read_table(tmp_path / "pool" / "manifest.parquet").to_pandas()["case"])
    task = set(pq.read_table(tmp_path / "task" / "manifest.parquet").to_pandas()["case"])
    assert pool == held and task == set(ids) - held
    with pytest.raises(InputError, match="holdout"):
        run(tmp_path / "ds", tmp_path / "bad", {"holdout": {"fraction": 1.5, "keep": "rest"}})


def test_ct_uses_training_foreground_statistics(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=5, modality="CT")
    run(tmp_path / "ds", tmp_path / "out", {"split": {"val": 0.2, "test": 0.2}})
    prov = read_provenance(tmp_path / "out" / "manifest.parquet")
    stats = prov["ct_stats"]
    assert prov["normalisation"] == "ct" and stats["p005"] < stats["mean"] < stats["p995"]
    assert -700 < stats["mean"] < -500  # foreground is -1000 + 400 on average
    image = np.load(tmp_path / "out" / "cases" / "case_000.npy")
    assert float(image.max()) <= (stats["p995"] - stats["mean"]) / stats["std"] + 1e-4
    assert float(image.min()) >= (stats["p005"] - stats["mean"]) / stats["std"] - 1e-4
    # the statistics come from training cases only
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert len(manifest[manifest["split"] == "train"]) == 3


def test_unlabelled_ct_needs_given_statistics(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=2, modality="CT")
    with pytest.raises(InputError, match="settings.ct_stats: CT normalisation of an unlabelled set needs ct_stats"):
        run(tmp_path / "ds", tmp_path / "out", {"labelled": False})
    assert not (tmp_path / "out").exists()
    given = {"mean": -500.0, "std": 100.0, "p005": -900.0, "p995": 0.0}
    run(tmp_path / "ds", tmp_path / "out", {"labelled": False, "ct_stats": given})
    assert read_provenance(tmp_path / "out" / "manifest.parquet")["ct_stats"] == given


# ------------------------------------------------------------------------------------------- refusals


def _corrupt(ds: Path, kind: str) -> str:
    if kind == "nan":
        path = ds / "imagesTr" / "case_001.nii.gz"
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).copy()
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
        return f"{path}: 1 non-finite voxels (1 NaN, 0 Inf)"
    if kind == "truncated":
        path = ds / "labelsTr" / "case_002.nii.gz"
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return f"{path}: corrupt or truncated NIfTI (gzip)"
    if kind == "missing_label":
        path = ds / "labelsTr" / "case_000.nii.gz"
        path.unlink()
        return f"{path}: listed in dataset.json (training[0].label) but the file does not exist"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "truncated", "missing_label"])
def test_refused_dataset_writes_nothing(tmp_path: Path, kind: str) -> None:
    make_dataset(tmp_path / "ds", n=3)
    expected = _corrupt(tmp_path / "ds", kind)
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        run(tmp_path / "ds", out, {})
    assert expected in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sed": 1}, "settings: unknown keys ['sed']"),
        ({"seed": "1"}, "settings.seed: must be an integer"),
        ({"labels": [0, 1]}, "settings.labels: must list distinct non-zero label values"),
        ({"labels": [3]}, "settings.labels: values [3] are not labels of"),
        ({"split": {"val": 0.5, "test": 0.5}}, "settings.split: val + test must be below 1"),
        ({"split": {"val": -0.1}}, "settings.split.val: must be a fraction in [0, 1)"),
        ({"target_spacing": [1, 1]}, "settings.target_spacing: must be null or 3 positive numbers"),
        ({"normalisation": "zscore"}, "settings.normalisation: must be 'auto', 'ct' or 'mr'"),
        ({"ct_stats": {"mean": 0}}, "settings.ct_stats: must be null or an object"),
    ],
)
def test_bad_settings_are_refused_before_writing(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    make_dataset(tmp_path / "ds", n=2)
    with pytest.raises(InputError) as info:
        run(tmp_path / "ds", tmp_path / "out", settings)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_resolve_settings_fills_defaults() -> None:
    assert resolve_settings({"split": {"val": 0.1}}) == {
        "labelled": True,
        "labels": None,
        "seed": 0,
        "split": {"val": 0.1, "test": 0.2},
        "target_spacing": None,
        "normalisation": "auto",
        "ct_stats": None,
        "max_voxels": 100_000_000,
        "holdout": None,
    }


def test_cli_refusal_exits_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path / "ds", n=2)
    expected = _corrupt(tmp_path / "ds", "missing_label")
    argv = ["--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--settings", "{}"]
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"segadapt: error: {tmp_path / 'ds'}: 1 problem(s) in the dataset:\n  {expected}\n" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        run_cli(main, [*argv[:4], "--settings", "{not json"])
    assert "segadapt: error: --settings: not valid JSON" in capsys.readouterr().err


def test_cli_run(tmp_path: Path) -> None:
    make_dataset(tmp_path / "ds", n=2)
    main(["--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--settings", '{"seed": 2}'])
    assert (tmp_path / "out" / "manifest.parquet").is_file()
    assert read_provenance(tmp_path / "out" / "manifest.parquet")["settings"] == {"seed": 2}


# ------------------------------------------------------------------------------------------ real data

# the two float32 labels (003, 243), uint8 (001) and float32 images, very different maxima
REAL_CASES = [
    "hippocampus_001",
    "hippocampus_003",
    "hippocampus_004",
    "hippocampus_006",
    "hippocampus_007",
    "hippocampus_008",
    "hippocampus_011",
    "hippocampus_014",
    "hippocampus_015",
    "hippocampus_243",
]


def test_real_hippocampus_subset_ingests(tmp_path: Path) -> None:
    if not (HIPPO / "dataset.json").is_file():
        pytest.skip(f"real data not found at {HIPPO} (../shared/data/hippocampus)")
    meta = json.loads((HIPPO / "dataset.json").read_text())
    ds = tmp_path / "hippo"
    for folder in ("imagesTr", "labelsTr"):
        (ds / folder).mkdir(parents=True)
        for cid in REAL_CASES:
            (ds / folder / f"{cid}.nii.gz").symlink_to(HIPPO / folder / f"{cid}.nii.gz")
    meta["training"] = [e for e in meta["training"] if Path(e["image"]).name[: -len(".nii.gz")] in REAL_CASES]
    meta["numTraining"] = len(meta["training"])
    (ds / "dataset.json").write_text(json.dumps(meta))

    run(ds, tmp_path / "out", {"seed": 0})
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert manifest["case"].tolist() == REAL_CASES
    assert sorted(manifest["split"].value_counts().items()) == [("test", 2), ("train", 6), ("val", 2)]
    assert set(manifest["num_classes"]) == {3} and set(manifest["orig_axcodes"]) == {"RAS"}
    for cid in REAL_CASES:
        image = np.load(tmp_path / "out" / "cases" / f"{cid}.npy")
        seg = np.load(tmp_path / "out" / "cases" / f"{cid}_seg.npy")
        assert np.isfinite(image).all() and abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1) < 0.05
        assert set(np.unique(seg)) == {0, 1, 2}
