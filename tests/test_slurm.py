"""The slurm profile runs the tiny demo DAG through a real single-node Slurm cluster, and a failing job fails the run."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slurm_cluster import SlurmCluster, SlurmUnavailable, single_node_slurm

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
METHOD = "parallel_ft"
METRICS = "results/summary/metrics.parquet"
JOBS = 2
# Snakemake answers SIGTERM by waiting for its running jobs, so `timeout` gets -k to make sure it ends.
RUN_TIMEOUT_S = 420
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node cluster for this module; skipped only where Slurm cannot be had (not root, offline)."""
    stack = contextlib.ExitStack()
    try:
        cluster = stack.enter_context(single_node_slurm(tmp_path_factory.mktemp("slurm")))
    except SlurmUnavailable as err:
        pytest.skip(f"no single-node Slurm cluster: {err}")
    with stack:
        yield cluster


def ci_profile(cluster: SlurmCluster, path: Path) -> Path:
    """The repository's slurm profile with only what this throw-away cluster needs changed.

    Args:
        cluster: the running test cluster.
        path: folder to write the profile into.
    """
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    memory_mb = min(2000, cluster.memory_mb // JOBS)
    profile.update({
        "default-resources": {**profile["default-resources"], "slurm_partition": cluster.partition,
                              "mem_mb": memory_mb, "runtime": 15},
        "jobs": JOBS,
        "retries": 0,  # a failure must show at once, not after a resubmission
        "latency-wait": 5,  # one machine, no shared file system to wait for
        "slurm-status-command": "squeue",  # the test cluster has no accounting, so no sacct
        "slurm-init-seconds-before-status-checks": 1,
        "seconds-between-status-checks": 1,
        # The rules ask for workstation-sized memory; a CI node may have less than two such jobs need.
        "set-resources": {rule: {"mem_mb": memory_mb} for rule in rule_names()},
    })
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def rule_names() -> list[str]:
    """Names of the workflow's rules, read from the rule files."""
    names = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        names.update(re.findall(r"^\s*rule (\w+):", smk.read_text(), flags=re.MULTILINE))
    return sorted(names)


def slurm_config() -> dict:
    """tests/configs/tiny.yaml cut to one method: the Slurm path is under test here, not the methods.

    Every job through Slurm costs about 12 s of submission and polling on top of its work, so the
    full tiny DAG (every method) would take many minutes.
    """
    config = yaml.safe_load(TINY.read_text())
    for name, method in config["methods"].items():
        method["enabled"] = name == METHOD
    if "transfer" in config:
        config["transfer"]["enabled"] = False
    return config


def run_snakemake(snakefile: Path, workdir: Path, profile: Path,
                  *targets: str) -> tuple[subprocess.CompletedProcess[str], float]:
    cmd = ["timeout", "-k", "20", str(RUN_TIMEOUT_S), sys.executable, "-m", "snakemake",
           "-s", str(snakefile), "-d", str(workdir), "--profile", str(profile), *targets]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    return proc, time.monotonic() - start


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's own view of the jobs (finished ones stay listed for MinJobAge seconds)."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
                          capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split() for line in proc.stdout.splitlines())


@pytest.fixture(scope="module")
def tiny_slurm_run(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """Run the tiny demo DAG once with the CI profile: (workdir, Snakemake's output, seconds)."""
    tmp = tmp_path_factory.mktemp("tiny_slurm")
    work = tmp / "work"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(slurm_config(), sort_keys=False))
    proc, seconds = run_snakemake(SNAKEFILE, work, ci_profile(slurm, tmp / "profile"), METRICS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake exited {proc.returncode} after {seconds:.0f} s:\n{out[-8000:]}\n{slurm.logs()}"
    return work, out, seconds


def test_tiny_dag_runs_through_slurm(tiny_slurm_run: tuple[Path, str, float]) -> None:
    work, out, _ = tiny_slurm_run
    metrics = pd.read_parquet(work / METRICS)
    dice = metrics[metrics["metric"] == "dice"]
    assert set(dice["task"]) == {"organ_lesion", "paired_organs"}
    assert dice["value"].between(0, 1).all()
    assert (work / "results" / "foundation" / "model.safetensors").is_file()

    # Every job went through sbatch and Slurm saw each one finish.
    job_ids = SUBMITTED.findall(out)
    assert len(job_ids) >= 8, out[-4000:]  # data, preprocessing, pretraining, 2 trainings, 2 evaluations
    states = slurm_states(job_ids)
    assert set(states) == set(job_ids)
    assert set(states.values()) == {"COMPLETED"}, states


def test_failing_job_fails_the_run(slurm: SlurmCluster, tmp_path: Path) -> None:
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        'rule all:\n    input: "b.txt"\n\n'
        'rule broken:\n    output: "b.txt"\n    shell: "echo about to fail; exit 3"\n'
    )
    work = tmp_path / "work"
    work.mkdir()
    proc, _ = run_snakemake(snakefile, work, ci_profile(slurm, tmp_path / "profile"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    (job_id,) = SUBMITTED.findall(out)
    assert f"SLURM-job '{job_id}' failed" in out, out[-4000:]
    assert slurm_states([job_id]) == {job_id: "FAILED"}
    assert not (work / "b.txt").exists()
