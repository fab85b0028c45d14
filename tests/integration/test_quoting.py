"""Paths from the configuration reach the shell quoted: a space, a quote or ``$(...)`` in a folder name
is a folder name, never shell syntax."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from conftest import TINY, make_workdir, snakemake

ODD = "odd dir's $(touch PWNED)"


def _config(work: Path) -> dict:
    config = yaml.safe_load(TINY.read_text())
    config["demo"]["out"] = ODD
    for task in config["tasks"]:
        task["dataset"] = task["dataset"].replace("demo/", f"{ODD}/", 1)
    config["foundation"]["pool"] = f"{ODD}/pool"
    config["assft"].update(annotation="inbox", inbox=f"in box's $(touch PWNED2) {work}")
    return config


def test_config_paths_reach_the_shell_quoted(tmp_path: Path) -> None:
    work = tmp_path / "work"
    config = _config(work)
    make_workdir(work, config)

    # every printed command splits back into the literal paths
    proc = snakemake(work, "-n", "-p")
    prefix = "Shell command: "
    commands = [line[len(prefix) :] for line in proc.stdout.splitlines() if line.startswith(prefix)]
    inbox = [shlex.split(c) for c in commands if "--inbox" in c]
    assert inbox, "the annotate jobs take --inbox"
    for argv in inbox:
        assert argv[argv.index("--inbox") + 1] == config["assft"]["inbox"]
    synth = [shlex.split(c) for c in commands if "stages.synth" in c]
    assert len(synth) == 1 and synth[0][synth[0].index("--out") + 1] == ODD
    datasets = [a[a.index("--dataset") + 1] for a in map(shlex.split, commands) if "--dataset" in a]
    assert f"{ODD}/organ_lesion" in datasets and f"{ODD}/pool" in datasets

    # and the demo step runs for real: its folder is made under the odd name, nothing is executed
    snakemake(work, f"{ODD}/synth.json")
    assert (work / ODD / "organ_lesion" / "dataset.json").is_file()
    assert not list(work.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
