"""The code hash follows exactly the modules a stage imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from stages.core.codehash import code_hash, module_closure

REPO = Path(__file__).resolve().parents[2]


def test_closure_contains_own_and_core_imports() -> None:
    closure = module_closure("aggregate")
    assert "stages.aggregate" in closure and "stages.core.io" in closure and "stages" in closure
    # aggregate does not run the metrics or the networks: a change there must not rerun it
    assert "stages.core.metrics" not in closure
    assert "stages.core.nets" not in closure


def test_closure_is_transitive() -> None:
    # evaluate imports core.metrics; io imports codehash lazily inside a function, still found
    closure = module_closure("evaluate")
    assert "stages.core.metrics" in closure and "stages.core.codehash" in closure


def _hash_in(root: Path, step: str) -> str:
    code = f"from stages.core.codehash import code_hash; print(code_hash({step!r}))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_hash_changes_only_for_stages_that_import_the_changed_module(tmp_path: Path) -> None:
    """Edit a copy of the package: metrics.py changes evaluate's hash but not aggregate's."""
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: _hash_in(tmp_path, s) for s in ("aggregate", "evaluate")}
    assert before["aggregate"] == code_hash("aggregate")
    with open(tmp_path / "stages" / "core" / "metrics.py", "a") as fh:
        fh.write("\n# a change\n")
    after = {s: _hash_in(tmp_path, s) for s in ("aggregate", "evaluate")}
    assert after["aggregate"] == before["aggregate"]
    assert after["evaluate"] != before["evaluate"]
