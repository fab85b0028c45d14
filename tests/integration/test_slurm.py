"""The cluster profiles: both parse, and the slurm one runs the tiny DAG on a real single-node Slurm cluster."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from slurm_cluster import SlurmCluster, SlurmUnavailable, single_node_slurm

from stages.core.config import validate_config

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
METHOD = "parallel_ft"
METRICS = "results/summary/metrics.parquet"
JOBS = 2
# Snakemake answers SIGTERM by waiting for its running jobs, so `timeout` also gets -k.
RUN_TIMEOUT_S = 420
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")
# Beside the tiny DAG: a job that fails, and a job that asks for a GPU the way the GPU rules do.
SIDE_SNAKEFILE = """\
rule all:
    input:
        "never.txt",
        "gpu.txt",


rule broken:
    output:
        "never.txt",
    shell:
        "echo about to fail; exit 3"


rule on_gpu:
    output:
        "gpu.txt",
    resources:
        gpu=1,
    shell:
        "echo $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES > {output}"
"""


@dataclass(frozen=True)
class Run:
    """One finished Snakemake run: its working directory, exit code, output (stdout + stderr) and duration."""

    workdir: Path
    returncode: int
    output: str
    seconds: float


def write_config(workdir: Path, config: dict) -> Path:
    """A Snakemake working directory holding `config` as its config.yaml."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


@pytest.mark.parametrize("profile", ["slurm", "local-gpu"])
def test_profile_is_accepted_by_snakemake(profile: str, tmp_path: Path) -> None:
    # A misspelt key is an "unrecognized arguments" error; a dry run needs no cluster and no GPU.
    work = write_config(tmp_path / "work", yaml.safe_load(TINY.read_text()))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(SNAKEFILE),
            "-d",
            str(work),
            "-n",
            "--profile",
            str(REPO / "workflow" / "profiles" / profile),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "This was a dry-run" in proc.stdout + proc.stderr


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


def rule_names() -> list[str]:
    """Names of the workflow's rules, read from the rule files (derived ones: `use rule A as B with:`)."""
    names: set[str] = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        names.update(re.findall(r"^\s*rule (\w+):", text, flags=re.MULTILINE))
        names.update(re.findall(r"^\s*use rule \w+ as (\w+)", text, flags=re.MULTILINE))
    return sorted(names)


def ci_profile(cluster: SlurmCluster, path: Path) -> Path:
    """The repository's slurm profile with only what this throw-away cluster needs changed.

    Args:
        cluster: the running test cluster.
        path: folder to write the profile's config.yaml into.
    """
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    memory_mb = min(2000, cluster.memory_mb // JOBS)
    profile.update(
        {
            "default-resources": {
                **profile["default-resources"],
                "slurm_partition": cluster.partition,
                "mem_mb": memory_mb,
                "runtime": 15,
            },
            "jobs": JOBS,
            "retries": 0,  # a failure must show at once, not after a resubmission
            "latency-wait": 5,  # one machine, no shared file system to wait for
            "slurm-status-command": "squeue",  # the test cluster has no accounting, so no sacct
            "slurm-init-seconds-before-status-checks": 1,
            "seconds-between-status-checks": 1,
            # The rules ask for workstation-sized memory; a CI node may have less than two such jobs need.
            "set-resources": {rule: {"mem_mb": memory_mb} for rule in rule_names()},
        }
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def slurm_config() -> dict:
    """tests/configs/tiny.yaml cut to one method and no optional parts: the Slurm path is under test here.

    Each job through Slurm costs about 12 s of submission and polling on top of its work, so the
    whole tiny DAG (every method) would take many minutes. Optional parts are the top-level sections
    with an `enabled` switch (transfer, analysis.*); the demo data stays on, it is the input.
    """
    config = validate_config(yaml.safe_load(TINY.read_text()))  # defaults filled: every switch is there
    for name, method in config["methods"].items():
        method["enabled"] = name == METHOD
    for name, section in config.items():
        if name in ("demo", "methods") or not isinstance(section, dict):
            continue
        # a switch of its own (transfer) or switches of its parts (analysis: drift, landscape)
        for part in [section, *section.values()]:
            if isinstance(part, dict) and "enabled" in part:
                part["enabled"] = False
    return config


@contextlib.contextmanager
def snakemake_run(snakefile: Path, workdir: Path, profile: Path, *targets: str) -> Iterator[list[Run]]:
    """Start Snakemake in the background; on leaving the block wait for it and append its Run to the list."""
    log = workdir.parent / f"{workdir.name}.snakemake.txt"
    cmd = [
        "timeout",
        "-k",
        "20",
        str(RUN_TIMEOUT_S),
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(snakefile),
        "-d",
        str(workdir),
        "--profile",
        str(profile),
        *targets,
    ]
    result: list[Run] = []
    start = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield result
            returncode = proc.wait(timeout=RUN_TIMEOUT_S + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result.append(Run(workdir, returncode, log.read_text(), time.monotonic() - start))


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's own view of the jobs (finished ones stay listed for the test cluster's MinJobAge)."""
    proc = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(line.split() for line in proc.stdout.splitlines())


@pytest.fixture(scope="module")
def slurm_runs(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The tiny DAG with the CI profile and, beside it on the same cluster, the side workflow.

    Running both at once costs the side run almost nothing: on its own it would add about 35 s, mostly
    the plugin's status-poll back-off.
    """
    tmp = tmp_path_factory.mktemp("slurm_runs")
    profile = ci_profile(slurm, tmp / "profile")
    tiny = write_config(tmp / "tiny", slurm_config())
    side = tmp / "side"
    side.mkdir()
    (side / "Snakefile").write_text(SIDE_SNAKEFILE)
    with snakemake_run(side / "Snakefile", side, profile) as side_run:
        with snakemake_run(SNAKEFILE, tiny, profile, METRICS) as tiny_run:
            pass
    return {"tiny": tiny_run[0], "side": side_run[0]}


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_dag_runs_through_slurm(slurm: SlurmCluster, slurm_runs: dict[str, Run]) -> None:
    run = slurm_runs["tiny"]
    assert run.returncode == 0, (
        f"exit {run.returncode} after {run.seconds:.0f} s:\n{run.output[-8000:]}\n{slurm.logs()}"
    )
    metrics = pd.read_parquet(run.workdir / METRICS)
    dice = metrics[metrics["metric"] == "dice"]
    assert set(dice["task"]) == {"organ_lesion", "paired_organs"}
    assert dice["value"].between(0, 1).all()
    assert (run.workdir / "results" / "foundation" / "model.safetensors").is_file()

    # The jobs went through sbatch, and Slurm itself saw every one of them complete.
    job_ids = SUBMITTED.findall(run.output)
    assert len(job_ids) >= 8, run.output[-4000:]  # data, preprocessing, pretraining, 2 trainings, 2 evaluations
    assert slurm_states(job_ids) == dict.fromkeys(job_ids, "COMPLETED")


def submitted_job(run: Run, rule: str) -> str:
    """The Slurm job id of the (one) job of a rule, from the Slurm log paths in the Snakemake output."""
    (job_id,) = set(re.findall(rf"slurm_logs/rule_{rule}/(\d+)\.log", run.output))
    return job_id


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_job_fails_the_run(slurm_runs: dict[str, Run]) -> None:
    run = slurm_runs["side"]
    assert run.returncode == 1, run.output[-4000:]
    job_id = submitted_job(run, "broken")
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'FAILED'" in run.output, run.output[-4000:]
    assert slurm_states([job_id]) == {job_id: "FAILED"}
    assert not (run.workdir / "never.txt").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_gpu_resource_becomes_a_slurm_gpu(slurm_runs: dict[str, Run]) -> None:
    # keep-going (from the slurm profile) lets this job finish although its sibling failed
    run = slurm_runs["side"]
    job_id = submitted_job(run, "on_gpu")
    assert slurm_states([job_id]) == {job_id: "COMPLETED"}
    # Slurm allocated the node's one GPU to the job and exposed it the CUDA way
    assert (run.workdir / "gpu.txt").read_text().split() == [job_id, "0"]
