"""The marker M0's pre-training waits for: every task manifest, hashed and counted."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stages.core.errors import InputError
from stages.core.io import read_json, sha256_file, write_parquet
from stages.data_ready import main


def _manifest(path: Path, splits: list[str]) -> Path:
    frame = pd.DataFrame({"case": [f"c{i}" for i in range(len(splits))], "split": splits})
    write_parquet(frame, path, {"stage": "test"})
    return path


def test_marker_lists_each_task_with_its_hash_and_split_counts(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a" / "manifest.parquet", ["train", "train", "val", "test"])
    b = _manifest(tmp_path / "b" / "manifest.parquet", ["train", "test"])
    out = tmp_path / "ready.json"
    main(["--manifests", str(a), str(b), "--out", str(out)])
    datasets = read_json(out)["datasets"]
    assert datasets["a"] == {"manifest": str(a), "sha256": sha256_file(a), "cases": {"test": 1, "train": 2, "val": 1}}
    assert datasets["b"]["cases"] == {"test": 1, "train": 1}
    first = out.read_bytes()
    main(["--manifests", str(a), str(b), "--out", str(out)])
    assert out.read_bytes() == first  # no timestamps: reruns are byte-identical


@pytest.mark.parametrize("broken", ["missing", "not_parquet"])
def test_bad_manifest_is_named_and_nothing_is_written(tmp_path: Path, broken: str) -> None:
    good = _manifest(tmp_path / "a" / "manifest.parquet", ["train"])
    bad = tmp_path / "b" / "manifest.parquet"
    if broken == "not_parquet":
        bad.parent.mkdir()
        bad.write_text("not a table")
    out = tmp_path / "ready.json"
    with pytest.raises(InputError) as err:
        main(["--manifests", str(good), str(bad), "--out", str(out)])
    assert err.value.where == str(bad)
    assert not out.exists()
