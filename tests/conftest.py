"""Shared test fixtures: paths of the repository and of ../shared, and one tiny run of the demo DAG.

Layout: ``tests/unit/`` tests a function or one stage in-process (seconds each); ``tests/integration/``
runs Snakemake, the installers, containers, Slurm or the quality gate (minutes). ``pytest`` runs both;
``pytest tests/unit`` is the quick loop. Case builders live beside the unit tests that own them
(``test_preprocess.make_dataset``, ``test_msd.make_case``); integration tests import them from there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SNAKEFILE = REPO / "workflow" / "Snakefile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# the unit tests' case builders, importable by name from both folders
sys.path.insert(0, str(REPO / "tests" / "unit"))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_data() -> Path:
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"{data} is absent: the real-data tests need ../shared/data beside the repository")
    return data


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    """Run Snakemake on the project's workflow in ``workdir`` (2 cores); raise with its output on failure."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def make_workdir(path: Path, config: dict | None = None) -> Path:
    """A working folder holding ``config.yaml`` (the tiny test config unless given)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config or yaml.safe_load(TINY.read_text())))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo DAG (tests/configs/tiny.yaml), run once for the whole session; its working folder."""
    work = make_workdir(tmp_path_factory.mktemp("tiny"))
    snakemake(work)
    return work
