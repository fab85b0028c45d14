"""Tests for stages.annotate: the oracle reveals only queried labels, rounds accumulate, the inbox stops and continues."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from stages.annotate import LABELLED_SCHEMA, inbox_files, main, run
from stages.core.errors import InputError, run_cli
from stages.core.io import write_parquet
from stages.core.sampling import CaseStore
from stages.preprocess import run as preprocess

AFFINE = np.array([[-1.0, 0, 0, 30], [0, -1.0, 0, 20], [0, 0, 2.0, -10], [0, 0, 0, 1]])


def _make_dataset(root: Path, n: int = 6, shape: tuple[int, int, int] = (11, 12, 9)) -> list[str]:
    """A small MSD dataset (LPS, anisotropic, zero margin), labels 0/1/2 that differ per case."""
    cids = [f"case_{i:03d}" for i in range(n)]
    for i, cid in enumerate(cids):
        rng = np.random.default_rng(zlib.crc32(cid.encode()))
        image = np.zeros(shape, np.float32)
        image[1:-1, 1:-1, 1:-1] = 300 + rng.normal(0, 50, (shape[0] - 2, shape[1] - 2, shape[2] - 2))
        label = np.zeros(shape, np.uint8)
        label[3 : 6 + i % 3, 3:8, 2:5] = 1
        label[6:8, 3 : 5 + i % 4, 5:7] = 2
        image[label > 0] += 400
        for folder, data in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, AFFINE), str(root / folder / f"{cid}.nii.gz"))
    meta = {
        "name": "Tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "one", "2": "two"},
        "numTraining": n,
        "test": [],
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cids],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return cids


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("annotate")
    _make_dataset(root / "raw")
    preprocess(root / "raw", root / "data", {"split": {"val": 0.0, "test": 0.17}})
    return {"raw": root / "raw", "data": root / "data"}


@pytest.fixture
def task(built: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy (tests delete and alter label files)."""
    raw, data = tmp_path / "raw", tmp_path / "data"
    shutil.copytree(built["raw"], raw)
    shutil.copytree(built["data"], data)
    manifest = pd.read_parquet(data / "manifest.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(data / "manifest.parquet")
    # point the manifest at this copy's label files (the module fixture's could be shared otherwise)
    fixed = table.set_column(
        table.schema.get_field_index("label_path"),
        "label_path",
        [[str(raw / "labelsTr" / f"{c}.nii.gz") for c in manifest["case"]]],
    )
    pq.write_table(fixed.replace_schema_metadata(table.schema.metadata), data / "manifest.parquet")
    train = sorted(manifest.loc[manifest["split"] == "train", "case"])
    return {"raw": raw, "data": data, "root": tmp_path, "train": train}  # type: ignore[dict-item]


def _query(path: Path, picked: list[str], candidates: list[str], round_index: int = 0) -> Path:
    order = {c: i for i, c in enumerate(picked)}
    write_parquet(
        pd.DataFrame(
            {
                "case": candidates,
                "round": round_index,
                "picked": [c in order for c in candidates],
                "pick_order": pd.array([order.get(c) for c in candidates], dtype="Int64"),
            }
        ),
        path,
        {"stage": "test"},
    )
    return path


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_oracle_reveals_only_the_queried_labels(task: dict, tmp_path: Path) -> None:
    train = task["train"]
    picked, others = train[:2], train[2:]
    # the oracle must not even open the other labels: remove them
    for case in others:
        (task["raw"] / "labelsTr" / f"{case}.nii.gz").unlink()
    out = tmp_path / "labelled"
    run(_query(tmp_path / "q.parquet", picked, train), task["data"], out, {"mode": "oracle"})

    assert _tree(out) == sorted(
        ["cases", "labelled.parquet", "manifest.parquet"]
        + [f"cases/{c}.npy" for c in picked]
        + [f"cases/{c}_seg.npy" for c in picked]
    )
    for path in out.rglob("*"):
        target = path.resolve()
        if target.name.endswith("_seg.npy"):
            assert target.parent == (out / "cases").resolve() and not path.is_symlink()
            assert target.name[: -len("_seg.npy")] in picked
        elif path.is_symlink():
            assert target == (task["data"] / "cases" / path.name).resolve() and path.stem in picked
    for case in picked:  # the oracle maps labelsTr exactly as preprocessing did
        np.testing.assert_array_equal(
            np.load(out / "cases" / f"{case}_seg.npy"), np.load(task["data"] / "cases" / f"{case}_seg.npy")
        )
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["case"].tolist() == sorted(picked) and manifest["split"].eq("train").all()
    assert manifest["label_path"].str.startswith(str(task["raw"] / "labelsTr")).all()
    labelled = pd.read_parquet(out / "labelled.parquet")
    assert list(labelled.columns) == LABELLED_SCHEMA.names
    assert labelled["case"].tolist() == sorted(picked) and labelled["round"].eq(0).all()
    # what training would sample: the revealed cases only
    assert CaseStore(out, list(manifest["case"])).num_classes_seen == 3
    for case in others:
        with pytest.raises(InputError, match="missing preprocessed array"):
            CaseStore(out, [case])


def test_rounds_accumulate_and_a_case_is_labelled_once(task: dict, tmp_path: Path) -> None:
    train = task["train"]
    first, second = tmp_path / "r0", tmp_path / "r1"
    run(_query(tmp_path / "q0.parquet", train[:1], train), task["data"], first, {"mode": "oracle"})
    rest = train[1:]
    run(
        _query(tmp_path / "q1.parquet", rest[:2], rest, 1),
        task["data"],
        second,
        {"mode": "oracle", "image_link": "copy"},
        previous=first / "labelled.parquet",
    )
    labelled = pd.read_parquet(second / "labelled.parquet")
    assert labelled["case"].tolist() == [train[0], *sorted(rest[:2])]
    assert labelled["round"].tolist() == [0, 1, 1]
    seg = f"cases/{train[0]}_seg.npy"
    assert (second / seg).read_bytes() == (first / seg).read_bytes()
    assert not any(p.is_symlink() for p in second.rglob("*"))  # image_link: copy
    assert sorted(pd.read_parquet(second / "manifest.parquet")["case"]) == sorted(train[:3])
    from stages.audit import manifest_arrays
    from stages.core.io import sha256_file

    for folder, n in ((first, 1), (second, 3)):  # each manifest lists the arrays its folder holds, as they are
        arrays = manifest_arrays(folder / "manifest.parquet")
        assert len(arrays) == 2 * n and all(sha256_file(folder / name) == digest for name, digest in arrays)
    with pytest.raises(InputError, match="already labelled"):
        run(
            _query(tmp_path / "bad.parquet", train[:1], train, 1),
            task["data"],
            tmp_path / "r1b",
            {"mode": "oracle"},
            previous=first / "labelled.parquet",
        )
    assert not (tmp_path / "r1b").exists()


def test_rerun_with_another_query_leaves_no_stale_label(task: dict, tmp_path: Path) -> None:
    train, out = task["train"], tmp_path / "labelled"
    run(_query(tmp_path / "a.parquet", train[:1], train), task["data"], out, {"mode": "oracle"})
    run(_query(tmp_path / "b.parquet", train[1:2], train), task["data"], out, {"mode": "oracle"})
    assert _tree(out / "cases") == sorted([f"{train[1]}.npy", f"{train[1]}_seg.npy"])


def test_oracle_refuses_a_label_changed_since_preprocessing(task: dict, tmp_path: Path) -> None:
    train = task["train"]
    path = task["raw"] / "labelsTr" / f"{train[0]}.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((11, 12, 9), np.uint8), AFFINE), str(path))
    with pytest.raises(InputError, match="changed since preprocessing"):
        run(_query(tmp_path / "q.parquet", train[:1], train), task["data"], tmp_path / "labelled", {"mode": "oracle"})
    assert not (tmp_path / "labelled").exists()


def test_inbox_stops_until_every_file_is_there_then_continues(
    task: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = task["train"]
    picked = train[:2]
    inbox, out = tmp_path / "inbox", tmp_path / "labelled"
    args = [
        "--query",
        str(_query(tmp_path / "q.parquet", picked, train)),
        "--data",
        str(task["data"]),
        "--inbox",
        str(inbox),
        "--out",
        str(out),
        "--settings",
        json.dumps({"mode": "inbox"}),
    ]

    def attempt() -> tuple[int | None, str]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, args)
        return exit_info.value.code, capsys.readouterr().err

    code, err = attempt()
    assert code == 2
    assert all(str(inbox / f"{c}.nii.gz") in err for c in picked)
    assert not out.exists()
    request = pd.read_csv(inbox_files(inbox, 0)["csv"])
    assert request["case"].tolist() == picked
    assert request["expected_file"].tolist() == [str(inbox / f"{c}.nii.gz") for c in picked]
    assert "1: one" in inbox_files(inbox, 0)["instructions"].read_text()

    shutil.copy(task["raw"] / "labelsTr" / f"{picked[0]}.nii.gz", inbox / f"{picked[0]}.nii.gz")
    code, err = attempt()
    assert code == 2 and "waiting for 1 of 2" in err
    assert str(inbox / f"{picked[1]}.nii.gz") in err and str(inbox / f"{picked[0]}.nii.gz") not in err
    assert not out.exists()

    shutil.copy(task["raw"] / "labelsTr" / f"{picked[1]}.nii.gz", inbox / f"{picked[1]}.nii.gz")
    main(args)
    labelled = pd.read_parquet(out / "labelled.parquet")
    assert labelled["mode"].eq("inbox").all()
    assert labelled["source"].tolist() == [str(inbox / f"{c}.nii.gz") for c in sorted(picked)]
    for case in picked:
        np.testing.assert_array_equal(
            np.load(out / "cases" / f"{case}_seg.npy"), np.load(task["data"] / "cases" / f"{case}_seg.npy")
        )


def test_inbox_annotations_are_validated_like_any_input(task: dict, tmp_path: Path) -> None:
    train = task["train"]
    picked = train[:3]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((11, 12, 8), np.uint8), AFFINE), str(inbox / f"{picked[0]}.nii.gz"))
    bad_values = np.zeros((11, 12, 9), np.uint8)
    bad_values[4, 4, 4] = 7
    nib.save(nib.Nifti1Image(bad_values, AFFINE), str(inbox / f"{picked[1]}.nii.gz"))
    nib.save(
        nib.Nifti1Image(np.zeros((11, 12, 9), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])),
        str(inbox / f"{picked[2]}.nii.gz"),
    )
    with pytest.raises(InputError) as err:
        run(
            _query(tmp_path / "q.parquet", picked, train),
            task["data"],
            tmp_path / "labelled",
            {"mode": "inbox"},
            inbox=inbox,
        )
    text = str(err.value)
    assert "3 problem(s)" in text and "label shape (11, 12, 8)" in text
    assert "[7] are not in the declared label set" in text and "label affine differs" in text
    assert not (tmp_path / "labelled").exists()


def test_inbox_label_of_another_size_is_refused_from_its_header(
    task: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.annotate as stage

    train = task["train"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # tiny on disk, 64 MB decoded: its voxels must never be read
    nib.save(nib.Nifti1Image(np.zeros((400, 400, 400), np.uint8), AFFINE), str(inbox / f"{train[0]}.nii.gz"))
    read = []
    real = stage.read_label_array
    monkeypatch.setattr(stage, "read_label_array", lambda path, *a, **k: read.append(path) or real(path, *a, **k))
    with pytest.raises(InputError) as err:
        run(
            _query(tmp_path / "q.parquet", train[:1], train),
            task["data"],
            tmp_path / "labelled",
            {"mode": "inbox"},
            inbox=inbox,
        )
    assert "label shape (400, 400, 400) (from its header) differs from the image's (11, 12, 9)" in str(err.value)
    assert read == []
    assert not (tmp_path / "labelled").exists()


def test_inbox_mode_needs_the_inbox(task: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--inbox"):
        run(
            _query(tmp_path / "q.parquet", task["train"][:1], task["train"]),
            task["data"],
            tmp_path / "o",
            {"mode": "inbox"},
        )
