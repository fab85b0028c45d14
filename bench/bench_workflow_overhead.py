"""Benchmark of workflow overhead: a 10-task dry run and a no-op rerun as multiples of Snakemake's own start-up.

Working folder: a temporary folder whose ``config.yaml`` is the repository's demo ``config.yaml`` with
10 tasks (``task0`` ... ``task9`` on the demo's four labelled phantom datasets in turn; ``task0-8`` in
the sequential order, ``task9`` the unseen / ASSFT target), every method as the demo config enables
it. Snakemake runs as the tests run it: ``python -m snakemake -s workflow/Snakefile -d WORK --cores 2``
(the workflow's default profile applies).

- dry run: ``snakemake -n`` on the fresh folder: the whole DAG (several hundred jobs) is built.
- no-op rerun: ``snakemake`` on a folder where every output is complete. Running the real pipeline
  would take hours, so completeness is made: every output ``snakemake --summary`` lists is created
  empty (a folder for ``directory()`` outputs, found from the rules' declarations), then
  ``snakemake --touch`` marks them up to date in DAG order. A dry run must then report nothing to do
  (checked; redone up to 3 times, in case a stage module changed meanwhile and with it a rule's
  ``code`` parameter).
- baseline: ``snakemake -n`` on a one-rule Snakefile in an empty folder: Snakemake's own start-up
  (interpreter, imports, parsing, an empty DAG), with the same Python and ``--cores 2``.

The three alternate (dry run, rerun, baseline, then reversed ...) ``--reps`` times after a warm-up;
medians are reported.

    python bench/bench_workflow_overhead.py [--tasks 10] [--reps 5] [--keep DIR]

Last line: ``workflow overhead ratio X.XXx (target <= 3x): PASS|MISS`` (the larger of the two
multiples), preceded by each multiple against the target.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml
from _common import REPO, interleaved, load_line, median, verdict

__all__ = ["main", "make_config"]

TARGET = 3.0
SNAKEFILE = REPO / "workflow" / "Snakefile"
LABELLED_DEMO = ["organ_lesion", "paired_organs", "tubular", "unseen"]
ONE_RULE = 'rule all:\n    output:\n        "done.txt",\n    shell:\n        "touch {output}"\n'


def make_config(n_tasks: int) -> dict:
    """The demo configuration with ``n_tasks`` tasks (the last one unseen and the ASSFT target).

    Args:
        n_tasks: number of tasks, at least 2.
    """
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    names = [f"task{i}" for i in range(n_tasks)]
    config["tasks"] = [
        {"name": name, "dataset": f"{config['demo']['out']}/{LABELLED_DEMO[i % len(LABELLED_DEMO)]}"}
        for i, name in enumerate(names)
    ]
    config["order"] = names[:-1]
    config["unseen"] = names[-1:]
    config["assft"]["target"] = names[-1]
    return config


def _snakemake(workdir: Path, *args: str, snakefile: Path = SNAKEFILE) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"bench_workflow_overhead: {' '.join(cmd[2:])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _directory_outputs() -> set[str]:
    """Last path components of the ``directory()`` outputs the rules declare (``cases``, ``predictions``)."""
    names = set()
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        for pattern in re.findall(r'directory\(\s*f?"([^"]+)"', rules.read_text()):
            names.add(pattern.rstrip("/").rsplit("/", 1)[-1])
    return names


def _complete(workdir: Path) -> int:
    """Create every output of the DAG and mark it up to date (``--touch``); return the number of outputs."""
    summary = _snakemake(workdir, "--summary").stdout.splitlines()
    start = next(i for i, line in enumerate(summary) if line.startswith("output_file\t"))
    outputs = [line.split("\t", 1)[0] for line in summary[start + 1 :] if line.strip()]
    folders = _directory_outputs()
    for rel in outputs:
        path = workdir / rel
        if path.name in folders:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    _snakemake(workdir, "--touch")
    return len(outputs)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, build the working folders, time the dry run, the no-op rerun and the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median reported), >= 3")
    parser.add_argument("--keep", type=Path, default=None, help="build the folders here and keep them")
    args = parser.parse_args(argv)
    if args.reps < 3 or args.tasks < 2:
        parser.error("--reps must be >= 3 and --tasks >= 2")

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="bench_workflow_overhead."))
    try:
        dry, done, one = tmp / "dry", tmp / "done", tmp / "one"
        for work in (dry, done):
            work.mkdir(parents=True, exist_ok=True)
            (work / "config.yaml").write_text(yaml.safe_dump(make_config(args.tasks)))
        one.mkdir(parents=True, exist_ok=True)
        (one / "Snakefile").write_text(ONE_RULE)

        jobs = re.search(r"^total\s+(\d+)", _snakemake(dry, "-n").stdout, re.M)
        for _attempt in range(3):  # a stage module edited meanwhile changes the rules' code params
            n_outputs = _complete(done)
            check = _snakemake(done, "-n")
            if "Nothing to be done" in check.stdout + check.stderr:
                break
        else:
            sys.exit(f"bench_workflow_overhead: the completed folder still has work:\n{check.stdout[-3000:]}")

        runs = {
            "dry": lambda: _snakemake(dry, "-n"),
            "rerun": lambda: _snakemake(done),
            "startup": lambda: _snakemake(one / "work", "-n", snakefile=one / "Snakefile"),
        }
        load_before = load_line()
        times = interleaved(runs, args.reps)
        load_after = load_line()
        med = {k: median(v) for k, v in times.items()}
        print(f"{load_before} (before), {load_after.split(', ', 1)[1]} (after)")
        print(
            f"config: demo config.yaml with {args.tasks} tasks: {jobs.group(1) if jobs else '?'} jobs, "
            f"{n_outputs} outputs; reps: {args.reps}"
        )
        for key, label in (
            ("startup", "Snakemake start-up (one-rule Snakefile, -n, empty folder)"),
            ("dry", f"dry run of the {args.tasks}-task DAG (-n)"),
            ("rerun", "no-op rerun of the completed folder"),
        ):
            runs_txt = " ".join(f"{t:.2f}" for t in times[key])
            print(f"{label}: median {med[key]:.2f} s  [{runs_txt}]")
        dry_ratio, rerun_ratio = med["dry"] / med["startup"], med["rerun"] / med["startup"]
        print(verdict("dry run / start-up", dry_ratio, TARGET, higher_is_better=False))
        print(verdict("no-op rerun / start-up", rerun_ratio, TARGET, higher_is_better=False))
        print(verdict("workflow overhead", max(dry_ratio, rerun_ratio), TARGET, higher_is_better=False))
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
