"""End-to-end benchmark: a whole Snakemake run (the demo, or the hippocampus CPU profile) on N cores.

Runs ``snakemake --cores N`` on the chosen configuration in a fresh working folder, samples the
resident memory of Snakemake and all its jobs every half second, and then reads every rule's
``benchmark:`` file. Prints the per-rule table (jobs, summed and longest wall time, largest RSS), the
summary table of the run, and, as its last line, the wall time against the target.

    python bench/bench_pipeline.py                              # the demo (config.yaml), target 10 min
    python bench/bench_pipeline.py --profile hippocampus-cpu    # examples/hippocampus*.yaml, target 30 min
    python bench/bench_pipeline.py --work /tmp/run --keep       # keep the working folder

Dataset paths in the example configs are relative to the repository root (where the README runs
them); they are made absolute here so the run can live in any folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.core.config import validate_config

__all__ = ["PROFILES", "main"]

#: name -> (config files layered in order, as `--configfile A B` does; wall-time target in minutes)
PROFILES: dict[str, tuple[list[str], float]] = {
    "demo": (["config.yaml"], 10.0),
    "hippocampus-cpu": (["examples/hippocampus.yaml", "examples/hippocampus_cpu.yaml"], 30.0),
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Snakemake's --configfile layering: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(files: Sequence[str]) -> dict[str, Any]:
    """``files`` layered in order (the demo's config.yaml is not a base: the schema gives the defaults);
    dataset/pool/checkpoint paths made absolute from the repo."""
    config: dict[str, Any] = {}
    for name in files:
        config = _merge(config, yaml.safe_load((REPO / name).read_text()))
    if not config.get("demo", {}).get("enabled", False):
        for task in config["tasks"]:
            task["dataset"] = str((REPO / task["dataset"]).resolve())
        for key in ("pool", "checkpoint"):
            if config["foundation"].get(key):
                config["foundation"][key] = str((REPO / config["foundation"][key]).resolve())
    return config


class MemorySampler(threading.Thread):
    """Peak summed RSS of a process and its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.peak, self._done = psutil.Process(pid), interval, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def rule_table(work: Path) -> pd.DataFrame:
    """One row per rule from ``benchmarks/**.tsv``: jobs, summed and longest wall time, largest RSS."""
    rows = []
    for tsv in sorted((work / "benchmarks").rglob("*.tsv")):
        frame = pd.read_csv(tsv, sep="\t")
        rule = tsv.relative_to(work / "benchmarks").parts[0]
        rows.append({"rule_dir": rule, "s": float(frame["s"].iloc[-1]), "max_rss_mb": float(frame["max_rss"].iloc[-1])})
    jobs = pd.DataFrame(rows)
    if jobs.empty:
        return jobs
    table = jobs.groupby("rule_dir").agg(
        jobs=("s", "size"), total_s=("s", "sum"), longest_s=("s", "max"), max_rss_mb=("max_rss_mb", "max")
    )
    return table.sort_values("total_s", ascending=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)

    files, target_min = PROFILES[args.profile]
    config = build_config(files)
    validate_config(config, source=args.profile)
    work = args.work or Path(tempfile.mkdtemp(prefix=f"segadapt-bench-{args.profile}-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "-d",
        str(work),
        "--cores",
        str(args.cores),
        "--configfile",
        str(work / "config.yaml"),
    ]
    print(f"bench_pipeline: {args.profile} in {work}\n  {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(work / "snakemake.out", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - start
    if code != 0:
        print((work / "snakemake.out").read_text()[-4000:])
        print(f"bench_pipeline: snakemake failed (exit {code}); working folder kept: {work}")
        return 1
    table = rule_table(work)
    with pd.option_context("display.width", 160, "display.max_rows", 100):
        print(table.round(1).to_string())
    summary = work / "results" / "summary" / "summary.md"
    if summary.is_file():
        print(f"\n{summary}:\n{summary.read_text()}")
    print(
        f"jobs {int(table['jobs'].sum())}, job time summed {table['total_s'].sum() / 60:.1f} min, "
        f"largest job RSS {table['max_rss_mb'].max() / 1024:.2f} GB, "
        f"peak RSS of the whole run {sampler.peak / 2**30:.2f} GB"
    )
    if not args.keep and args.work is None:
        shutil.rmtree(work)
    verdict = "PASS" if wall <= target_min * 60 else "MISS"
    print(f"wall {wall / 60:.1f} min on {args.cores} cores (target <= {target_min:.0f} min): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
