"""The conda environment pins the same packages and versions as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _requirements(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", line.strip())
        if m and not line.startswith("-"):
            out[m.group(1).lower()] = m.group(2).replace(" ", "")
    return out


def test_conda_env_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # Snakemake runs the jobs from outside the environment; the environment runs the stages
    pinned = {k: v for k, v in _requirements(project["dependencies"]).items() if k != "snakemake"}
    env = yaml.safe_load((REPO / "envs" / "segadapt.yaml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_lists, "envs/segadapt.yaml has no pip section"
    in_env = _requirements([x for x in pip_lists[0] if not x.startswith("-e")])
    assert in_env == pinned
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert python and python[0] == "python=3.11"
    assert any(str(x).startswith("-e ") for x in pip_lists[0]), "the env installs the project itself"


def test_every_rule_uses_the_conda_env() -> None:
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = len(re.findall(r"^\s*rule \w+:", text, flags=re.M))
        assert text.count('"../../envs/segadapt.yaml"') == rules, smk.name
