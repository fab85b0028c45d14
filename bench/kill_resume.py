"""Kill Snakemake runs at random points, rerun until the DAG completes, compare bit for bit with an uninterrupted run.

Each kill picks, with a seeded ``random.Random``, a delay, a victim (one running ``python -m stages.*``
job of this working folder, or the whole Snakemake process group) and a signal (SIGTERM, as Slurm
sends at a time limit, or SIGKILL). After a SIGKILL of Snakemake itself the folder stays locked, so the
next start is refused and ``snakemake --unlock`` comes first, as docs/usage.md says. When the wanted
number of kills is reached the run is left to finish; then every file under ``results/`` of the
reference is compared byte for byte (training logs excepted: they hold wall-clock seconds).

    python bench/kill_resume.py [--kills 50] [--seed 0] [--max-delay 16] [--steps 120] [--keep DIR]

The last line is ``kills: N, resumed: M, identical: yes|no``; ``resumed`` counts training jobs whose
log shows ``resuming from step N`` with N > 0. The module is also the harness of
tests/integration/test_reliability.py (processes, checkpoints, logs, comparisons).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMPARED",
    "CONFIG",
    "JOBS",
    "PREPARED",
    "SNAKEFILE",
    "TARGET",
    "JobSpec",
    "Run",
    "checkpoint_step",
    "compare_files",
    "job_pids",
    "main",
    "make_workdir",
    "read_log",
    "result_files",
    "resume_steps",
    "saved_steps",
    "signal_quietly",
    "snakemake",
    "snakemake_cmd",
    "stage_pids",
    "stray_temporaries",
    "wait_no_stage_processes",
    "wait_until",
]

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
CONFIG = REPO / "tests" / "configs" / "kill_resume.yaml"
TARGET = "results/eval/medseqft/organ_lesion/metrics.parquet"
"""What a run asks for: MedSeqFT's step 1 (teacher, LoRA retention, merge) and its evaluation."""
PREPARED = "results/buffers/mds/organ_lesion.parquet"
"""The last file the training jobs read: a folder built up to it can be copied for every run."""
COMPARED = [
    "results/runs/medseqft/organ_lesion/teacher/model.safetensors",
    "results/runs/medseqft/organ_lesion/teacher/model.json",
    "results/runs/medseqft/organ_lesion/adapter/adapter_model.safetensors",
    "results/runs/medseqft/organ_lesion/adapter/run.json",
    "results/runs/medseqft/organ_lesion/model.safetensors",
    "results/runs/medseqft/organ_lesion/model.json",
    TARGET,
]
"""The files the kill tests compare (the training logs hold wall-clock seconds and the resume point)."""
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
_RESUMING = re.compile(r"resuming from step (\d+)")
_SAVED = re.compile(r"checkpoint saved at step (\d+); exiting")


@dataclass(frozen=True)
class JobSpec:
    """One job of the kill-resume DAG, as the harness finds it.

    Args:
        name: short name.
        module: the stage module its process runs (``python -m <module>``).
        log: its log file, relative to the working folder.
        work: its resumable-state folder (``--work``), None for jobs without checkpoints.
    """

    name: str
    module: str
    log: str
    work: str | None = None


JOBS = {
    "pretrain": JobSpec("pretrain", "stages.pretrain", "logs/foundation/pretrain.log", "results/work/foundation"),
    "teacher": JobSpec(
        "teacher",
        "stages.train",
        "logs/train/medseqft/organ_lesion_teacher.log",
        "results/work/medseqft/organ_lesion/teacher",
    ),
    "retention": JobSpec(
        "retention",
        "stages.train",
        "logs/train/medseqft/organ_lesion_retention.log",
        "results/work/medseqft/organ_lesion/adapter",
    ),
    "merge": JobSpec("merge", "stages.merge", "logs/merge/medseqft/organ_lesion.log"),
    "evaluate": JobSpec("evaluate", "stages.evaluate", "logs/evaluate/medseqft/organ_lesion.log"),
}


# ----------------------------------------------------------------------------------------- snakemake


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    """The Snakemake command line of the project's workflow in ``workdir``: 2 cores, one thread per job.

    One thread per job because on a shared, busy 2-core machine a job with two OpenMP threads is many
    times slower (0.3-2.7 s against 0.06 s per update of the retention job, measured), and because a
    run must be resumed with the thread count it started with: the float sums of a multi-threaded
    conv3d depend on it, so 1 and 2 threads give different weights.
    """
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(SNAKEFILE),
        "-d",
        str(workdir),
        "--cores",
        "2",
        "--max-threads",
        "1",
        *args,
    ]


def snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run Snakemake to its end and return the finished process (output captured, not checked)."""
    return subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, timeout=timeout)


def make_workdir(path: Path, config: dict[str, Any] | None = None) -> Path:
    """A working folder holding ``config.yaml`` (tests/configs/kill_resume.yaml unless given)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config or yaml.safe_load(CONFIG.read_text())))
    return path


class Run:
    """One Snakemake process started in its own session, so that its whole process group can be signalled.

    Args:
        workdir: the working folder.
        args: further Snakemake arguments (targets, flags).
        name: the file under ``workdir/.harness/`` that collects its output.
    """

    def __init__(self, workdir: Path, *args: str, name: str = "run") -> None:
        self.workdir = Path(workdir)
        out_dir = self.workdir / ".harness"
        out_dir.mkdir(exist_ok=True)
        self.output_path = out_dir / f"{name}.out"
        self.started = time.time()
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(
                snakemake_cmd(self.workdir, *args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_group(self, sig: int) -> None:
        """Signal Snakemake and every job it started (they share its process group)."""
        os.killpg(self.proc.pid, sig)

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace")


# ------------------------------------------------------------------------------------------ processes


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def stage_pids(workdir: Path, module: str | None = None) -> dict[int, list[str]]:
    """The ``python -m stages.*`` processes running in ``workdir`` (pid -> argv), optionally of one module.

    Only processes whose working directory is ``workdir`` count, so jobs of other runs on the same
    machine are never touched; the ``bash -c`` wrapper Snakemake puts around a job has the module only
    inside one string and is not matched.
    """
    here = Path(workdir).resolve()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = _argv(pid)
        if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
            continue
        name = argv[argv.index("-m") + 1]
        if not name.startswith("stages.") or (module is not None and name != module):
            continue
        if _cwd(pid) == here:
            found[pid] = argv
    return found


def job_pids(workdir: Path, job: JobSpec) -> list[int]:
    """The running processes of ``job`` in ``workdir``."""
    pids = stage_pids(workdir, job.module)
    if job.work is None:
        return sorted(pids)
    return sorted(pid for pid, argv in pids.items() if job.work in argv)


def signal_quietly(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` unless it is gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_no_stage_processes(workdir: Path, timeout: float = 120) -> None:
    """Wait until no job process is left in ``workdir`` (a SIGTERMed trainer finishes its step and saves first).

    Raises:
        TimeoutError: some are still running after ``timeout`` seconds.
    """
    deadline = time.time() + timeout
    while stage_pids(workdir):
        if time.time() > deadline:
            raise TimeoutError(f"job processes still running in {workdir}: {stage_pids(workdir)}")
        time.sleep(0.05)


def wait_until(predicate: Callable[[], Any], run: Run | None = None, timeout: float = 600, poll: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        RuntimeError: ``run`` ended first.
        TimeoutError: ``timeout`` seconds passed.
    """
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if run is not None and not run.running():
            value = predicate()
            if value:
                return value
            raise RuntimeError(f"snakemake ended (exit {run.proc.returncode}) first:\n{run.output[-4000:]}")
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s in vain")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------- checkpoints

_STEP_CACHE: dict[Path, tuple[tuple[int, int], int]] = {}


def checkpoint_step(workdir: Path, job: JobSpec, since: float = 0.0) -> int | None:
    """Updates done in ``job``'s latest checkpoint written after ``since`` (a time.time()), or None."""
    import torch

    if job.work is None:
        return None
    best = None
    for path in (Path(workdir) / job.work).glob("*/checkpoint_latest.pt"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime < since:
            continue
        key = (st.st_ino, st.st_mtime_ns)
        cached = _STEP_CACHE.get(path)
        if cached is None or cached[0] != key:
            try:
                # the trainer renames a complete file into place, so an open one is never half-written
                step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
            except (OSError, RuntimeError, EOFError):
                continue
            _STEP_CACHE[path] = (key, step)
        step = _STEP_CACHE[path][1]
        best = step if best is None else max(best, step)
    return best


def resume_steps(text: str) -> list[int]:
    """The ``resuming from step N`` points of a job log."""
    return [int(m) for m in _RESUMING.findall(text)]


def saved_steps(text: str) -> list[int]:
    """The ``checkpoint saved at step N; exiting`` points of a job log (a trainer that got SIGTERM)."""
    return [int(m) for m in _SAVED.findall(text)]


def read_log(workdir: Path, job: JobSpec) -> str:
    path = Path(workdir) / job.log
    return path.read_text(errors="replace") if path.is_file() else ""


# ---------------------------------------------------------------------------------------- comparison


def compare_files(reference: Path, other: Path, files: Iterable[str]) -> dict[str, str]:
    """``{file: problem}`` for every file that is missing from ``other`` or differs from ``reference``."""
    problems = {}
    for rel in files:
        a, b = Path(reference) / rel, Path(other) / rel
        if not b.is_file():
            problems[rel] = "missing"
        elif a.read_bytes() != b.read_bytes():
            problems[rel] = "differs"
    return problems


def result_files(workdir: Path) -> list[str]:
    """Every file under ``results/`` a rerun must reproduce: not the resumable state, not the logs of wall time."""
    root = Path(workdir)
    files = []
    for path in sorted((root / "results").rglob("*")):
        rel = str(path.relative_to(root))
        if not path.is_file() or rel.startswith("results/work/") or path.name.startswith("."):
            continue
        if path.name in ("train_log.parquet", "pretrain_log.parquet"):
            continue
        files.append(rel)
    return files


def stray_temporaries(workdir: Path) -> list[str]:
    """Temporary files of atomic writes left in results/ (a process killed inside a write leaves one)."""
    root = Path(workdir)
    return sorted(
        str(p.relative_to(root))
        for p in (root / "results").rglob(".*.tmp*")
        if "results/work/" not in str(p.relative_to(root)) + "/"
    )


# ------------------------------------------------------------------------------------- the random run


@dataclass
class Tally:
    """What the random run did."""

    kills: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    unlocks: int = 0
    starts: int = 0
    seen_logs: set[tuple[str, str]] = field(default_factory=set)


def _random_kill(run: Run, workdir: Path, rng: random.Random, max_delay: float, tally: Tally) -> bool:
    """Once a job runs, wait a random delay, then kill a random job (or Snakemake's group) with a random signal.

    Returns:
        True if a kill was made, False if the run ended first.
    """
    try:
        wait_until(lambda: stage_pids(workdir), run, timeout=1800, poll=0.05)
    except RuntimeError:
        return False
    deadline = time.time() + rng.uniform(0.0, max_delay)
    while time.time() < deadline:
        if not run.running():
            return False
        time.sleep(0.02)
    sig_name = rng.choice(sorted(SIGNALS))
    on_job = rng.random() < 0.8
    victims = sorted(stage_pids(workdir).items())
    if not run.running():
        return False
    if on_job and victims:
        pid, argv = rng.choice(victims)
        module = argv[argv.index("-m") + 1]
        job = next((j.name for j in JOBS.values() if j.module == module and (j.work is None or j.work in argv)), module)
        try:
            os.kill(pid, SIGNALS[sig_name])
            tally.kills.append(f"{sig_name} {job}")
        except ProcessLookupError:
            on_job = False  # it ended in between: take Snakemake instead
    if not (on_job and victims):
        try:
            run.kill_group(SIGNALS[sig_name])
        except ProcessLookupError:
            return False
        tally.kills.append(f"{sig_name} snakemake")
    print(f"kill {len(tally.kills)}: {tally.kills[-1]} after {time.time() - run.started:.1f} s", file=sys.stderr)
    return True


def _note_resumes(workdir: Path, tally: Tally) -> None:
    for job in JOBS.values():
        text = read_log(workdir, job)
        steps = [s for s in resume_steps(text) if s > 0]
        # each start of a job rewrites its log; its first, time-stamped lines tell the starts apart
        key = (job.name, text[:300])
        if steps and key not in tally.seen_logs:
            tally.seen_logs.add(key)
            tally.resumed.append(f"{job.name}@{steps[-1]}")


def random_run(workdir: Path, kills: int, seed: int, max_delay: float) -> Tally:
    """Start, kill and restart Snakemake in ``workdir`` until ``kills`` kills were made and the DAG is complete."""
    rng = random.Random(seed)
    tally = Tally()
    while True:
        tally.starts += 1
        run = Run(workdir, TARGET, name=f"start{tally.starts}")
        if len(tally.kills) < kills and _random_kill(run, workdir, rng, max_delay, tally):
            try:
                run.wait(timeout=300)
            except subprocess.TimeoutExpired:
                run.kill_group(signal.SIGKILL)
                run.wait()
            wait_no_stage_processes(workdir)
            # a job's log is rewritten by its next start: read who resumed before it is
            _note_resumes(workdir, tally)
            continue
        code = run.wait()
        wait_no_stage_processes(workdir)
        _note_resumes(workdir, tally)
        if code == 0:
            return tally
        if "Directory cannot be locked" in run.output:
            unlock = snakemake(workdir, "--unlock")
            if unlock.returncode != 0:
                raise RuntimeError(f"snakemake --unlock failed:\n{unlock.stdout}\n{unlock.stderr}")
            tally.unlocks += 1
            continue
        if tally.starts > 10 * kills + 20:
            raise RuntimeError(f"the run does not finish:\n{run.output[-4000:]}")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run the reference and the killed run, compare, print the tally."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="kills to make before letting the run finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the delays, victims and signals")
    # a training job spends its first ~10 s importing and loading, then ~0.07 s per update at 1 thread
    parser.add_argument("--max-delay", type=float, default=16.0, help="longest wait (s) from a job's start to a kill")
    parser.add_argument("--steps", type=int, default=120, help="train.steps (a checkpoint every 3 updates)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the two working folders under this folder")
    args = parser.parse_args(argv)

    config = yaml.safe_load(CONFIG.read_text())
    config["train"].update(steps=args.steps, checkpoint_every=3)
    config["foundation"]["pretrain"].update(steps=max(4, args.steps // 5), checkpoint_every=3)
    root = args.keep or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    reference, killed = make_workdir(root / "reference", config), make_workdir(root / "killed", config)
    started = time.time()
    ref = snakemake(reference, TARGET, timeout=3600)
    if ref.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{ref.stdout[-4000:]}\n{ref.stderr[-4000:]}")
    ref_seconds = time.time() - started
    print(f"reference run: {ref_seconds:.0f} s", file=sys.stderr)
    started = time.time()
    tally = random_run(killed, args.kills, args.seed, args.max_delay)
    files = result_files(reference)
    problems = compare_files(reference, killed, files)
    extra = sorted(set(result_files(killed)) - set(files))
    print(f"killed run: {time.time() - started:.0f} s, {tally.starts} starts, {tally.unlocks} unlocks", file=sys.stderr)
    print(
        f"compared {len(files)} files; differing or missing: {problems or 'none'}; extra: {extra or 'none'}",
        file=sys.stderr,
    )
    print(f"stray temporaries: {stray_temporaries(killed) or 'none'}", file=sys.stderr)
    print(f"resumed: {tally.resumed}", file=sys.stderr)
    kinds: dict[str, int] = {}
    for k in tally.kills:
        kinds[k] = kinds.get(k, 0) + 1
    print(f"kills by kind: {dict(sorted(kinds.items()))}", file=sys.stderr)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    identical = "yes" if not problems and not extra else "no"
    print(f"kills: {len(tally.kills)}, resumed: {len(tally.resumed)}, identical: {identical}")


if __name__ == "__main__":
    main()
