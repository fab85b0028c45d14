"""Every import is a declared dependency, and every place that installs packages uses the one lock.

A fresh install of the README's first command once crashed on ``skimage``, which no file declared,
while CI passed on a machine that happened to have it: these tests make that impossible.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

_spec = importlib.util.spec_from_file_location("write_lock", REPO / "tools" / "write_lock.py")
write_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_lock)

#: imports of `stages/` that belong to an extra, not to the runtime: module -> extra. Each must be
#: imported inside a function, so that the package works without the extra.
OPTIONAL_IN_STAGES = {"docker": "docker"}


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


RUNTIME = _names(PROJECT["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}


# the project's own modules: the package, and the scripts under bench/, tools/ and tests/ that import one
# another from their folder (bench/study_lr_sweep.py imports bench/bench_supervised.py)
LOCAL_MODULES = {"stages"} | {p.stem for folder in ("bench", "tools", "tests") for p in (REPO / folder).rglob("*.py")}


def third_party_imports(path: Path) -> dict[str, list[tuple[int, bool]]]:
    """``{top-level module: [(line, at module level?), ...]}`` of the non-stdlib, non-project imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found: dict[str, list[tuple[int, bool]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            name = module.split(".")[0]
            if name in sys.stdlib_module_names or name in LOCAL_MODULES:
                continue
            if name.startswith("test_"):
                continue
            found.setdefault(name, []).append((node.lineno, id(node) in top_level))
    return found


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide ``module`` (empty if none does)."""
    return {canonicalize_name(d) for d in md.packages_distributions().get(module, [])}


def undeclared(files: list[Path], allowed: set[str], optional: dict[str, str] | None = None) -> list[str]:
    """Problems: each import in ``files`` that no distribution in ``allowed`` provides."""
    optional = optional or {}
    problems = []
    for path in files:
        for module, sites in sorted(third_party_imports(path).items()):
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{sites[0][0]}"
            if module in optional:
                if any(top for _, top in sites):
                    problems.append(f"{where}: `{module}` (extra {optional[module]!r}) imported at module level")
                if canonicalize_name(module) not in EXTRAS.get(optional[module], set()):
                    problems.append(f"{where}: `{module}` is not in extra {optional[module]!r}")
                continue
            dists = distributions_of(module)
            if not dists:
                problems.append(f"{where}: `{module}` is imported but no installed package provides it; declare it")
            elif not dists & allowed:
                problems.append(f"{where}: `{module}` comes from {sorted(dists)}, declared nowhere in pyproject.toml")
    return problems


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def test_every_import_of_the_package_is_a_runtime_dependency() -> None:
    files = _python_files("stages")
    assert len(files) > 30
    assert undeclared(files, RUNTIME, OPTIONAL_IN_STAGES) == []


def test_every_import_of_tests_bench_and_tools_is_declared() -> None:
    allowed = RUNTIME | EXTRAS["test"]
    assert undeclared(_python_files("tests", "bench", "tools"), allowed) == []


def test_the_check_catches_an_undeclared_import(tmp_path: Path) -> None:
    module = tmp_path / "otsu.py"
    module.write_text("import numpy\n\n\ndef f():\n    from skimage.filters import threshold_otsu\n    import pytest\n")
    problems = undeclared([module], RUNTIME)
    assert len(problems) == 2, problems
    assert "`skimage`" in problems[0] or "`skimage`" in problems[1]
    assert any("`pytest`" in p and "declared nowhere" in p for p in problems)
    extra = tmp_path / "launcher.py"
    extra.write_text("import docker\n")
    assert "imported at module level" in undeclared([extra], RUNTIME, OPTIONAL_IN_STAGES)[0]


# ---- one truth for versions --------------------------------------------------------------------------
LOCK = write_lock.read_lock()


def test_the_lock_pins_every_requirement_within_pyproject() -> None:
    for req in write_lock.roots():
        name = canonicalize_name(req.name)
        assert name in LOCK, f"{req.name} is in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(LOCK[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={LOCK[name]}, outside pyproject's {req.specifier}"
        )
    assert "segadapt" not in LOCK
    # the versions a run's numbers depend on
    for name in ("torch", "monai", "peft", "numpy", "scipy", "pandas", "pyarrow", "nibabel"):
        assert name in LOCK


def test_this_environment_is_the_locked_one() -> None:
    """The suite runs on exactly the locked versions (the README installs with `-c requirements.lock`)."""
    installed = write_lock.closure(write_lock.roots())
    locked = {k: v for k, v in LOCK.items() if k != "pip"}
    differ = {
        n: (installed.get(n), locked.get(n)) for n in set(installed) | set(locked) if installed.get(n) != locked.get(n)
    }
    assert not differ, (
        f"installed vs requirements.lock differ: {differ}; install with "
        "`pip install -c requirements.lock -e '.[test]'` (or rewrite the lock: python tools/write_lock.py)"
    )


def test_a_bad_lock_line_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "requirements.lock"
    bad.write_text("numpy==2.4.6\nscipy>=1.13\n")
    with pytest.raises(ValueError, match=r"requirements.lock:2: 'scipy>=1.13' is not an exact pin"):
        write_lock.read_lock(bad)


def _readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("## Quick start") : readme.index("## What the demo does")]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_ci_envs_and_containers_install_with_the_lock() -> None:
    demo, tests = _readme_commands()
    assert demo.startswith("pip install -c requirements.lock -e . &&") and "snakemake" in demo
    assert tests.startswith("pip install -c requirements.lock -e '.[test]' &&") and tests.endswith("pytest")
    # CI runs the README's test command itself (read from the README), in a virtualenv it makes
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "python3 -m venv" in ci and "PYTHONNOUSERSITE=1" in ci
    env = yaml.safe_load((REPO / "envs" / "segadapt.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-c ../requirements.lock" in pip
    assert "LOCK=$REPO/requirements.lock" in (REPO / "containers" / "build.sh").read_text()
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert "--constraint /wheelhouse/requirements.lock" in (REPO / "containers" / dockerfile).read_text()
    assert not (REPO / "containers" / "requirements.lock").exists(), "one lock only: the repository's"
