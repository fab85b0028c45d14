"""Record that every task dataset passed validation: the one file M0's pre-training waits for.

Pre-training is the longest job of a run. Without this marker it would start as soon as the pool is
preprocessed, beside a task whose preprocessing then fails on bad input, and Snakemake would stop
only once the pre-training had finished (hours on real data). The rule for this step takes every
task's manifest as input; ``pretrain_foundation`` takes this file as an ``ancient`` input, so adding a
task to the run rewrites the marker but never retrains M0.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from stages.core.errors import InputError, run_cli
from stages.core.io import make_provenance, save_json, sha256_file
from stages.core.log import stage_log

__all__ = ["run", "main"]


def run(manifests: Sequence[Path], out: Path) -> dict[str, dict[str, object]]:
    """Write ``out`` (JSON): per task folder, its manifest's sha256 and case counts per split.

    Args:
        manifests: ``results/data/{task}/manifest.parquet`` of every task.
        out: the marker file to write.
    """
    summary: dict[str, dict[str, object]] = {}
    for manifest in manifests:
        if not manifest.is_file():
            raise InputError(manifest, "missing: the task's preprocessing has not written its manifest")
        try:
            split = pq.read_table(manifest, columns=["split"]).column("split").to_pylist()
        except Exception as err:
            raise InputError(manifest, f"not a readable segadapt manifest ({err})") from err
        summary[manifest.parent.name] = {
            "manifest": str(manifest),
            "sha256": sha256_file(manifest),
            "cases": {s: split.count(s) for s in sorted(set(split))},
        }
    save_json({"datasets": summary, "provenance": make_provenance("data_ready", inputs=list(manifests))}, out)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.data_ready", description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", type=Path, nargs="+", required=True, help="every task's manifest.parquet")
    parser.add_argument("--out", type=Path, required=True, help="the marker JSON to write")
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.manifests, args.out)


if __name__ == "__main__":
    run_cli(main)
