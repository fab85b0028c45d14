"""Gather every metrics table into one summary: the long table, and methods x tasks means in Markdown."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from stages.core.errors import InputError, run_cli
from stages.core.io import atomic_path, make_provenance, read_parquet, write_parquet

__all__ = ["run", "main", "summary_table"]


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean and std per method, task and metric over cases and foreground classes (evaluation on the model's own step)."""
    own = metrics[metrics["step"] == metrics["task"]]
    case_means = own.groupby(["method", "task", "metric", "case"], as_index=False)["value"].mean()
    return (
        case_means.groupby(["method", "task", "metric"])["value"]
        .agg(mean="mean", std="std", cases="count")
        .reset_index()
    )


def _markdown(summary: pd.DataFrame) -> str:
    lines = ["# segadapt summary", ""]
    for metric, unit in (("dice", ""), ("hd95", " (mm)"), ("nsd", "")):
        part = summary[summary["metric"] == metric]
        if part.empty:
            continue
        tasks = sorted(part["task"].unique())
        lines += [f"## {metric.upper()}{unit}: mean ± std over test cases", ""]
        lines.append("| method | " + " | ".join(tasks) + " | mean |")
        lines.append("|---" * (len(tasks) + 2) + "|")
        for method, grp in part.groupby("method"):
            cells = []
            for t in tasks:
                r = grp[grp["task"] == t]
                cells.append(f"{r['mean'].iloc[0]:.3f} ± {r['std'].fillna(0).iloc[0]:.3f}" if len(r) else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {grp['mean'].mean():.3f} |")
        lines.append("")
    return "\n".join(lines)


def run(metrics: Sequence[Path], out: Path, settings: dict[str, Any]) -> None:
    """Concatenate ``metrics`` into ``out/metrics.parquet``; write ``out/summary.parquet`` and ``out/summary.md``."""
    if not metrics:
        raise InputError("--metrics", "no metrics tables given")
    frames = [read_parquet(p) for p in metrics]
    table = pd.concat(frames, ignore_index=True).sort_values(["method", "step", "task", "case", "class", "metric"])
    prov = make_provenance("aggregate", settings, inputs=list(metrics))
    write_parquet(table, out / "metrics.parquet", prov)
    summary = summary_table(table)
    write_parquet(summary, out / "summary.parquet", prov)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(_markdown(summary))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.aggregate", description=__doc__)
    parser.add_argument("--metrics", type=Path, nargs="+", required=True, help="metrics Parquet files")
    parser.add_argument("--out", type=Path, required=True, help="summary folder")
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON object of settings")
    args = parser.parse_args(argv)
    run(args.metrics, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
