"""The HTML report builds from a finished run, shows every summary figure and table, and the summary's lineage audits clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"


def test_report_builds_from_the_tiny_run(tiny_run: Path, tmp_path: Path) -> None:
    """``tiny_run`` (tests/conftest.py): the working folder of a finished run of tests/configs/tiny.yaml."""
    order = yaml.safe_load((tiny_run / "config.yaml").read_text())["order"]
    figures = ["dice_boxplots.png", "training_loss.png", "forgetting.png", *[f"overlay_{t}.png" for t in order]]
    summary = tiny_run / "results" / "summary"
    for name in figures:
        assert (summary / "plots" / name).read_bytes().startswith(b"\x89PNG"), name
    bwt = pd.read_parquet(summary / "bwt.parquet")
    assert "medseqft" in set(bwt["method"]) and bwt["bwt"].between(-1, 1).all()
    assert (summary / "summary.md").read_text().startswith("# segadapt summary")

    report = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tiny_run), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for name in [*figures, "summary.html"]:
        assert f'"name": "{name}"' in text, name
    # captions (rendered reST) and the workflow description reached the report
    for phrase in ("Per-case Dice", "sequential matrix R", "best and the worst test case", "segadapt-audit"):
        assert phrase in text, phrase

    # every recorded input of the summary and of a figure is still the file it was made from
    for artifact in ("results/summary/summary.parquet", f"results/summary/plots/overlay_{order[0]}.png"):
        proc = subprocess.run(
            [sys.executable, "-m", "stages.audit", artifact, "--quiet"],
            cwd=tiny_run,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith("audit: OK")
