"""The audit follows provenance records through their inputs and fails, naming the file, when an input changed or is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stages import audit
from stages.core.errors import InputError
from stages.core.io import make_provenance, save_json, save_safetensors, write_parquet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """raw.txt -> data.parquet -> model.safetensors (+ model.json) -> metrics.parquet, paths relative to the run folder."""
    import torch

    monkeypatch.chdir(tmp_path)
    Path("demo").mkdir()
    Path("demo/raw.txt").write_text("voxels")
    write_parquet(
        pd.DataFrame({"case": ["a"]}),
        Path("results/data.parquet"),
        make_provenance("preprocess", {"k": 1}, inputs=["demo/raw.txt"], seed=0),
    )
    prov = make_provenance("train", {"lr": 0.1}, inputs=["results/data.parquet"], seed=0, recipe="finetune")
    save_safetensors({"w": torch.zeros(2)}, Path("results/model.safetensors"), prov)
    save_json({"arch": "tiny", "provenance": prov}, Path("results/model.json"))
    write_parquet(
        pd.DataFrame({"dice": [0.5]}),
        Path("results/metrics.parquet"),
        make_provenance(
            "evaluate",
            {},
            inputs=["results/model.safetensors", "results/model.json", "results/data.parquet"],
            method="m",
        ),
    )
    return tmp_path


def test_unchanged_chain_passes_and_shows_the_lineage(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = audit.audit(Path("results/metrics.parquet"))
    assert report.ok and report.checked == 4  # model, json, data, raw: each hashed once
    text = "\n".join(report.lines)
    for stage in ("stage: evaluate", "stage: train", "stage: preprocess"):
        assert stage in text
    assert "demo/raw.txt  ok" in text and "(lineage shown above)" in text
    assert '"recipe":"finetune"' in text and '"lr":0.1' in text
    assert audit.run(Path("results/metrics.parquet")) == 0
    assert "audit: OK, 4 recorded input files match" in capsys.readouterr().out


def test_changed_input_fails_naming_it(chain: Path) -> None:
    Path("demo/raw.txt").write_text("other voxels")
    report = audit.audit(Path("results/metrics.parquet"))
    assert not report.ok
    assert [(f.path, f.problem, f.needed_by) for f in report.findings] == [
        ("demo/raw.txt", "differs", "results/data.parquet")
    ]
    out = audit.format_report(report, quiet=True)
    assert out.startswith("audit: FAILED") and "demo/raw.txt: differs: recorded" in out


def test_missing_input_fails_and_root_resolves_relative_paths(
    chain: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("results/model.json").unlink()
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    report = audit.audit(chain / "results/metrics.parquet", root=chain)
    assert {(f.path, f.problem) for f in report.findings} == {("results/model.json", "missing")}
    assert "results/model.json  MISSING" in "\n".join(report.lines)


def test_depth_limit_and_cycles_terminate(chain: Path) -> None:
    shallow = audit.audit(Path("results/metrics.parquet"), max_depth=1)
    assert shallow.ok and shallow.checked == 3  # the direct inputs only; raw.txt is not reached
    assert sorted(shallow.truncated) == ["results/data.parquet", "results/model.json", "results/model.safetensors"]
    assert "stage: preprocess" not in "\n".join(shallow.lines)
    assert audit.audit(Path("results/metrics.parquet"), max_depth=3).checked == 4
    # a.parquet lists b.parquet, then b is rewritten to list a: the records point at each other
    write_parquet(pd.DataFrame({"x": [1]}), Path("b.parquet"), make_provenance("aggregate", {}))
    write_parquet(pd.DataFrame({"x": [1]}), Path("a.parquet"), make_provenance("aggregate", {}, inputs=["b.parquet"]))
    write_parquet(pd.DataFrame({"x": [2]}), Path("b.parquet"), make_provenance("aggregate", {}, inputs=["a.parquet"]))
    report = audit.audit(Path("a.parquet"))
    assert [(f.path, f.problem) for f in report.findings] == [("b.parquet", "differs")]


def test_artifact_without_provenance_is_refused(chain: Path) -> None:
    with pytest.raises(InputError, match="carries no segadapt provenance"):
        audit.audit(Path("demo/raw.txt"))
    with pytest.raises(InputError, match="file not found"):
        audit.audit(Path("results/nothing.parquet"))


def test_cli_exit_codes(chain: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stages.audit", *args],
            capture_output=True,
            text=True,
            cwd=chain,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )

    assert cli("results/metrics.parquet").returncode == 0
    Path("results/data.parquet").write_bytes(b"not parquet")
    proc = cli("results/metrics.parquet", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "results/data.parquet: differs" in proc.stdout and "input of results/metrics.parquet" in proc.stdout
    proc = cli("demo/raw.txt")
    assert proc.returncode == 2 and "segadapt: error: demo/raw.txt" in proc.stderr


def test_audit_rehashes_the_preprocessed_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zeroed training array after preprocessing: the audit names it and exits 1 (it said OK before)."""
    import numpy as np
    from test_preprocess import make_dataset

    from stages import preprocess

    monkeypatch.chdir(tmp_path)
    make_dataset(Path("ds"), n=3)
    preprocess.run(Path("ds"), Path("results/data/t"), {"seed": 0})
    manifest = Path("results/data/t/manifest.parquet")
    clean = audit.audit(manifest)
    assert clean.ok and clean.checked == 3 * 2 + 1 + 3 * 2  # 3 NIfTI pairs, dataset.json, 3 image + 3 label arrays
    assert "results/data/t/cases/case_001_seg.npy  ok" in "\n".join(clean.lines)

    zeroed = Path("results/data/t/cases/case_001.npy")
    array = np.load(zeroed)
    np.save(zeroed, np.zeros_like(array))  # same shape, dtype and size: only the bytes tell
    report = audit.audit(manifest)
    assert [(f.path, f.problem, f.kind) for f in report.findings] == [(str(zeroed), "differs", "array")]
    Path("results/data/t/cases/case_002_seg.npy").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.audit", str(manifest), "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        f"{zeroed}: differs" in proc.stdout
        and "preprocessed array listed in results/data/t/manifest.parquet" in proc.stdout
    )
    assert "results/data/t/cases/case_002_seg.npy: missing" in proc.stdout


def test_a_downstream_artifact_reaches_the_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audited from an artifact that lists the manifest as input, the arrays are checked as well."""
    import numpy as np
    from test_preprocess import make_dataset

    from stages import preprocess

    monkeypatch.chdir(tmp_path)
    make_dataset(Path("ds"), n=2)
    preprocess.run(Path("ds"), Path("data"), {"seed": 0, "split": {"val": 0.0, "test": 0.0}})
    write_parquet(
        pd.DataFrame({"dice": [0.5]}),
        Path("metrics.parquet"),
        make_provenance("evaluate", {}, inputs=["data/manifest.parquet"]),
    )
    assert audit.audit(Path("metrics.parquet")).ok
    np.save("data/cases/case_000_seg.npy", np.zeros((9, 10, 7), np.uint8))
    report = audit.audit(Path("metrics.parquet"))
    assert [(f.path, f.needed_by) for f in report.findings] == [
        ("data/cases/case_000_seg.npy", "data/manifest.parquet")
    ]
