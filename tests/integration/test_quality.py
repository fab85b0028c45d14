"""The Python quality gate: ruff's linter and formatter over every Python file, mypy over ``stages/core``.

Settings live in ``pyproject.toml`` (``[tool.ruff]``, ``[tool.mypy]``); the ``.smk`` files have their own
gate (snakefmt, ``snakemake --lint``) in ``test_workflow.py``. Each check names the files it failed on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIRS = ["stages", "tests", "bench", "tools"]


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_ruff_lint_is_clean() -> None:
    proc = _run("ruff", "check", "--no-cache", *PYTHON_DIRS)
    assert proc.returncode == 0, f"ruff check found problems (fix: ruff check --fix):\n{proc.stdout}{proc.stderr}"


def test_ruff_format_is_applied() -> None:
    proc = _run("ruff", "format", "--check", "--no-cache", *PYTHON_DIRS)
    assert proc.returncode == 0, f"files ruff format would change (fix: ruff format):\n{proc.stdout}{proc.stderr}"


def test_mypy_passes_on_the_core(tmp_path: Path) -> None:
    proc = _run("mypy", "--cache-dir", str(tmp_path / "mypy_cache"))
    assert proc.returncode == 0, f"mypy stages/core:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("bad, rule", [("import os\n", "F401"), ("x = 1 \n", "W291")])
def test_the_lint_gate_catches_a_defect(tmp_path: Path, bad: str, rule: str) -> None:
    """The configuration really checks: an unused import and trailing whitespace are reported."""
    (tmp_path / "bad.py").write_text(bad)
    proc = _run("ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), str(tmp_path / "bad.py"))
    assert proc.returncode == 1 and rule in proc.stdout, proc.stdout + proc.stderr
