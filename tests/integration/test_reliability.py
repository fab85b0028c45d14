"""Reliability: training killed through Snakemake resumes bit-identically, one run per folder, bad input stops early.

The kill-and-resume tests drive the real workflow (tests/configs/kill_resume.yaml: one task, MedSeqFT's
teacher -> LoRA retention -> merge -> evaluation, 16 updates per training job, a checkpoint every 2)
with the harness of bench/kill_resume.py. A folder prepared up to the MDS buffer (the training jobs'
last input) is built once and copied for the uninterrupted reference and for every killed run, so
only the interrupted jobs differ between them. docs/bad_inputs.md lists every refused input and the
test of each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import yaml

from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.core.io import read_provenance, write_parquet

REPO = Path(__file__).resolve().parents[2]


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "bench" / "kill_resume.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


kr = _harness()
CHECKPOINT_EVERY = 2
STEPS = 16


def _copy(src: Path, dest: Path) -> Path:
    """A copy of a working folder, Snakemake's records and file times included (so nothing reruns)."""
    shutil.copytree(src, dest, symlinks=True)
    shutil.rmtree(dest / ".harness", ignore_errors=True)
    return dest


def _ok(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder built up to the MDS buffer: demo data, preprocessing, M0, scores."""
    work = kr.make_workdir(tmp_path_factory.mktemp("prepared") / "w")
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["train"]["steps"] == STEPS and config["train"]["checkpoint_every"] == CHECKPOINT_EVERY
    _ok(kr.snakemake(work, kr.PREPARED), "preparing the folder")
    return work


@pytest.fixture(scope="module")
def reference(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same DAG run without interruption."""
    work = _copy(prepared, tmp_path_factory.mktemp("reference") / "w")
    _ok(kr.snakemake(work, kr.TARGET), "the reference run")
    return work


# ------------------------------------------------------------------------------------- kill and resume


@dataclass(frozen=True)
class KillPoint:
    """Where and how one run is killed.

    Args:
        job: a key of the harness's ``JOBS``.
        at_step: kill once this start of the job has written a checkpoint of at least this many
            updates; 0 = once its process runs (jobs without checkpoints).
        sig: the signal.
        target: ``"job"``: the job's own Python process (Slurm's time limit or ``scancel`` of a job
            step, the OOM killer); ``"snakemake"``: Snakemake's whole process group (Ctrl-C in a
            terminal, a lost login, ``kill -9`` of the session).
    """

    job: str
    at_step: int
    sig: signal.Signals
    target: str


KILLS = [
    KillPoint("teacher", 2, signal.SIGTERM, "job"),  # saves at the step it is in: an off-grid resume
    KillPoint("teacher", 6, signal.SIGKILL, "job"),  # back to the last periodic checkpoint
    KillPoint("retention", 2, signal.SIGTERM, "snakemake"),  # Snakemake exits and releases its lock
    KillPoint("retention", 6, signal.SIGKILL, "snakemake"),  # the lock stays: --unlock first
    KillPoint("retention", 10, signal.SIGKILL, "job"),
    KillPoint("merge", 0, signal.SIGTERM, "snakemake"),  # a job without a checkpoint simply reruns
]


def _kill(work: Path, point: KillPoint, name: str) -> dict[str, object]:
    """Start Snakemake, kill it at ``point``, wait until every process is gone; what happened."""
    job = kr.JOBS[point.job]
    run = kr.Run(work, kr.TARGET, name=name)
    try:
        (pid, *_) = kr.wait_until(lambda: kr.job_pids(work, job), run)
        seen = 0
        if point.at_step:

            def reached() -> int | None:
                step = kr.checkpoint_step(work, job, since=run.started)
                return step if step is not None and step >= point.at_step else None

            seen = kr.wait_until(reached, run)
        try:
            # freeze it while we look, so that a fast job cannot finish before the signal lands
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pytest.fail(f"{point}: the job ended before the kill point")
        logs = {key: kr.read_log(work, spec) for key, spec in kr.JOBS.items()}
        if point.target == "job":
            os.kill(pid, point.sig)
        else:
            run.kill_group(point.sig)
        kr.signal_quietly(pid, signal.SIGCONT)
        code = run.wait(timeout=300)
    finally:
        if run.running():
            run.kill_group(signal.SIGKILL)
            run.wait()
    kr.wait_no_stage_processes(work)
    assert code != 0, f"{point}: snakemake exited 0 after the kill:\n{run.output[-3000:]}"
    return {
        "seen": seen,
        "logs_before": logs,
        "log_after": kr.read_log(work, job),
        "checkpoint": kr.checkpoint_step(work, job),
        "output": run.output,
    }


def test_killed_jobs_resume_and_end_bit_identical(prepared: Path, reference: Path, tmp_path: Path) -> None:
    """Six kills (SIGTERM/SIGKILL, job/Snakemake, three jobs), each followed by the same command again."""
    work = _copy(prepared, tmp_path / "w")
    pending: tuple[str, int] | None = None  # (job, step) that the next start of the job must resume from
    for i, point in enumerate(KILLS):
        event = _kill(work, point, f"start{i}")
        # the DAG runs one job at a time, in order: the previous kill's job has been restarted by now
        if pending is not None:
            job, step = pending
            assert step in kr.resume_steps(event["logs_before"][job]), (
                f"after kill {i - 1}, {job} did not resume from step {step}:\n{event['logs_before'][job][-2000:]}"
            )
            pending = None
        saved = kr.saved_steps(event["log_after"])
        if kr.JOBS[point.job].work is not None:
            step = event["checkpoint"]
            assert step is not None and step >= event["seen"] >= point.at_step > 0
            if point.sig == signal.SIGTERM:
                # the trainer caught the signal, finished its update, saved and exited (143)
                assert saved == [step], f"{point}: {event['log_after'][-2000:]}"
            else:
                assert not saved and step % CHECKPOINT_EVERY == 0, f"{point}: {event['log_after'][-2000:]}"
            pending = (point.job, step)
        locks = work / ".snakemake" / "locks"
        if point.target == "snakemake" and point.sig == signal.SIGKILL:
            # nothing released the lock: the next start is refused until --unlock
            refused = kr.snakemake(work, kr.TARGET)
            assert refused.returncode != 0
            assert "Directory cannot be locked" in refused.stdout + refused.stderr
            _ok(kr.snakemake(work, "--unlock"), "snakemake --unlock")
        assert not locks.is_dir() or not any(locks.iterdir()), f"a lock is left after kill {i} ({point})"
    _ok(kr.snakemake(work, kr.TARGET), "the last rerun")
    if pending is not None:
        job, step = pending
        assert step in kr.resume_steps(kr.read_log(work, kr.JOBS[job])), f"{job} did not resume from step {step}"

    problems = kr.compare_files(reference, work, kr.COMPARED)
    assert not problems, f"not bit-identical to the uninterrupted run: {problems}"
    # the training logs carry over the resumes: every update once, the very same losses
    for sub in ("teacher", "adapter"):
        rel = f"results/runs/medseqft/organ_lesion/{sub}/train_log.parquet"
        ours, theirs = pd.read_parquet(work / rel), pd.read_parquet(reference / rel)
        assert ours["step"].tolist() == list(range(1, STEPS + 1))
        assert read_provenance(work / rel)["resumed_from"] > 0
        pd.testing.assert_frame_equal(ours.drop(columns="seconds"), theirs.drop(columns="seconds"), check_exact=True)


# ---------------------------------------------------------------------------------------- concurrency


def test_second_snakemake_on_one_folder_is_refused_and_unlock_recovers(prepared: Path, tmp_path: Path) -> None:
    work = _copy(prepared, tmp_path / "w")
    first = kr.Run(work, kr.TARGET, name="first")
    try:
        (trainer, *_) = kr.wait_until(lambda: kr.job_pids(work, kr.JOBS["teacher"]), first)
        os.kill(trainer, signal.SIGSTOP)  # holds the first run (and its lock) while the second tries
        second = kr.snakemake(work, kr.TARGET)
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout + second.stderr
        assert first.running(), "the refused second run disturbed the first"
        first.kill_group(signal.SIGKILL)
        first.wait()
    finally:
        if first.running():
            first.kill_group(signal.SIGKILL)
            first.wait()
    kr.wait_no_stage_processes(work)
    stale = kr.snakemake(work, kr.TARGET)
    assert stale.returncode != 0 and "Directory cannot be locked" in stale.stdout + stale.stderr
    _ok(kr.snakemake(work, "--unlock"), "snakemake --unlock")
    plan = kr.snakemake(work, kr.TARGET, "-n")
    _ok(plan, "the dry run after --unlock")
    assert "train_teacher" in plan.stdout or "train_retention" in plan.stdout


# ----------------------------------------------------------------------------------------- bad inputs


def _good_dataset(root: Path, n: int = 3) -> Path:
    from test_preprocess import make_dataset

    make_dataset(root, n=n)
    return root


def test_preprocess_cli_refuses_a_corrupt_dataset_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    ds = _good_dataset(tmp_path / "ds")
    image = ds / "imagesTr" / "case_001.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    label = ds / "labelsTr" / "case_002.nii.gz"
    label.write_bytes(b"")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.preprocess", "--dataset", str(ds), "--out", str(out), "--settings", "{}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    # after the progress bar, one message naming every bad file
    message = proc.stderr[proc.stderr.index("segadapt: error:") :].splitlines()
    assert message[0] == f"segadapt: error: {ds}: 2 problem(s) in the dataset:"
    assert message[1].startswith(f"  {image}: corrupt or truncated NIfTI (gzip)")
    assert message[2] == f"  {label}: empty file (0 bytes)" and len(message) == 3
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def _singular_affine_image(path: Path) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.ones((9, 10, 11), np.float32), np.eye(4))
    img.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # nibabel refuses to write it as a qform
    img.set_qform(None, code=0)
    nib.save(img, str(path))


def _array_file(path: Path, dtype: str, fill: complex, first: float | None = None) -> None:
    """A 9x10x11 volume of ``fill`` (``first`` in its first voxel when given)."""
    import numpy as np
    from test_msd import SHAPE, _save

    data = np.full(SHAPE, fill, dtype)
    if first is not None:
        data[0, 0, 0] = first
    _save(data, path)


def _gzip_of_zeros(path: Path) -> None:
    import gzip

    path.write_bytes(gzip.compress(b"\0" * 400, mtime=0))


def _set_entry(root: Path, index: int, value: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    if value is None:
        del meta["training"][index]["label"]
    else:
        meta["training"][index] = value
    (root / "dataset.json").write_text(json.dumps(meta))


# refusals of stages.core.msd that test_msd.py does not drive: (json overrides, then a change, expected text)
MORE_DATASET_REFUSALS = {
    "labels_not_an_object": (
        {"labels": ["background", "a"]},
        None,
        "dataset.json: 'labels' must be a non-empty object of value -> name, got ['background', 'a']",
    ),
    "label_key_not_a_number": (
        {"labels": {"0": "background", "one": "a"}},
        None,
        "dataset.json: 'labels' entry 'one': 'a' is not an integer label value",
    ),
    "no_background_label": (
        {"labels": {"1": "a", "2": "b"}},
        None,
        "dataset.json: 'labels' has no background value 0 (values [1, 2])",
    ),
    "modality_not_an_object": ({"modality": "MRI"}, None, "dataset.json: 'modality' must be an object, got 'MRI'"),
    "two_modalities": (
        {"modality": {"0": "T1", "1": "T2"}},
        None,
        "dataset.json: 2 modalities {'0': 'T1', '1': 'T2'}: only single-channel datasets are supported",
    ),
    "training_not_a_list": (
        {"training": {"a": 1}, "numTraining": None},
        None,
        "dataset.json: 'training' must be a list, got dict",
    ),
    "entry_not_an_object": (
        {},
        lambda r: _set_entry(r, 1, "./imagesTr/bad.nii.gz"),
        "dataset.json: training[1] must be an object with 'image' and 'label', got './imagesTr/bad.nii.gz'",
    ),
    "entry_without_label": (
        {},
        lambda r: _set_entry(r, 1, None),
        "dataset.json: training[1] has an image but no 'label'",
    ),
    "entry_not_nifti": (
        {},
        lambda r: _set_entry(r, 1, {"image": "./imagesTr/bad.png", "label": "./labelsTr/bad.nii.gz"}),
        "dataset.json: training[1].image: expected a path to a .nii.gz file, got './imagesTr/bad.png'",
    ),
    "singular_affine": (
        {},
        lambda r: _singular_affine_image(r / "imagesTr" / "bad.nii.gz"),
        "imagesTr/bad.nii.gz: has a singular or non-finite affine [[1.0, 0.0, 0.0, 0.0], "
        "[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]",
    ),
    "complex_voxels": (
        {},
        lambda r: _array_file(r / "imagesTr" / "bad.nii.gz", "complex64", 1j),
        "imagesTr/bad.nii.gz: unsupported voxel type complex64 (expected a real-valued scalar image)",
    ),
    "nan_in_label": (
        {},
        lambda r: _array_file(r / "labelsTr" / "bad.nii.gz", "float32", 0, float("nan")),
        "labelsTr/bad.nii.gz: label has 1 non-finite voxels (NaN/Inf)",
    ),
    "label_beyond_int64": (
        {},
        lambda r: _array_file(r / "labelsTr" / "bad.nii.gz", "float64", 0, 1e30),
        "labelsTr/bad.nii.gz: label values out of integer range",
    ),
    "gzip_of_no_nifti": (
        {},
        lambda r: _gzip_of_zeros(r / "imagesTr" / "bad.nii.gz"),
        "imagesTr/bad.nii.gz: not a readable NIfTI file (corrupt or truncated header): Cannot work out file type of",
    ),
}


@pytest.mark.parametrize("kind", sorted(MORE_DATASET_REFUSALS))
def test_more_dataset_refusals_name_the_file(tmp_path: Path, kind: str) -> None:
    from test_msd import make_case, refusal, write_json

    overrides, change, expected = MORE_DATASET_REFUSALS[kind]
    make_case(tmp_path, "good")
    make_case(tmp_path, "bad")
    write_json(tmp_path, ["good", "bad"], **overrides)
    if change is not None:
        change(tmp_path)
    message = refusal(tmp_path)
    prefix = "" if expected.startswith("training[") else f"{tmp_path}/"
    assert f"  {prefix}{expected}" in message, message


def test_unlabelled_dataset_json_without_images_is_refused(tmp_path: Path) -> None:
    from test_msd import make_case, refusal, write_json

    make_case(tmp_path, "good")
    write_json(tmp_path, ["good"], training=None, numTraining=None, test=None)
    assert f"{tmp_path}/dataset.json: has neither 'training' nor 'test': no images to read" in refusal(
        tmp_path, labelled=False
    )


def _real_data_config(tmp_path: Path, task_dataset: Path, pool: Path) -> dict[str, object]:
    config = yaml.safe_load(kr.CONFIG.read_text())
    config["demo"]["enabled"] = False
    config["tasks"] = [{"name": "organ_lesion", "dataset": str(task_dataset)}]
    config["foundation"]["pool"] = str(pool)
    return config


def test_bad_dataset_stops_snakemake_in_preprocessing_before_any_training(tmp_path: Path) -> None:
    ds = _good_dataset(tmp_path / "task")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["numTraining"] = 7
    (ds / "dataset.json").write_text(json.dumps(meta))
    pool = _good_dataset(tmp_path / "pool")
    work = kr.make_workdir(tmp_path / "w", _real_data_config(tmp_path, ds, pool))
    proc = kr.snakemake(work)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        f"segadapt: error: {ds}: 1 problem(s) in the dataset:\n"
        f"  {ds / 'dataset.json'}: numTraining is 7 but 'training' lists 3 entries"
    ) in text
    assert "Error in rule preprocess_task" in text
    # no training job started: M0 is not pre-trained, nothing under runs/, no partial manifest
    assert not (work / "logs" / "foundation").exists() and not (work / "results" / "runs").exists()
    assert not (work / "results" / "foundation").exists() and not (work / "results" / "data").exists()


def test_pretraining_waits_for_every_dataset_to_be_validated(tmp_path: Path) -> None:
    """What M0 needs, in a dry run: the order of the DAG, whatever the number of cores."""
    work = kr.make_workdir(tmp_path / "w", yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text()))
    plan = kr.snakemake(work, "-n", "results/foundation/model.safetensors")
    _ok(plan, "the dry run")
    assert "preprocess_pool" in plan.stdout
    assert "preprocess_task" in plan.stdout, "pretrain_foundation can start before the tasks are validated"


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (lambda c: c["assft"].update(budget=-1), "config: assft.budget", "-1 is less than the minimum of 1"),
        (lambda c: c["assft"].update(budget="two"), "config: assft.budget", "'two' is not of type 'integer'"),
        (lambda c: c["assft"].update(rounds=0), "config: assft.rounds", "0 is less than the minimum of 1"),
        (lambda c: c["assft"].update(budgte=2), "config: assft", "unknown key"),
        (lambda c: c["assft"].update(target="nope"), "config: assft.target", "names no task in `tasks`: 'nope'"),
        (
            lambda c: c.update(unseen=[]),
            "config: assft.target",
            "set a target task (or list one in `unseen`) for ASSFT",
        ),
        (
            lambda c: c["tasks"][0].update(dataset="/nonexistent/Task01"),
            "config: tasks[0].dataset",
            "'/nonexistent/Task01' is not an MSD dataset folder (no dataset.json, no imagesTr/)",
        ),
    ],
)
def test_bad_assft_and_task_config_names_the_key(change: object, key: str, problem: str) -> None:
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    change(config)  # type: ignore[operator]
    with pytest.raises(InputError) as err:
        validate_config(config)
    assert err.value.where == key and problem in err.value.problem, str(err.value)


def _budget_beyond_pool() -> dict[str, object]:
    """tiny.yaml with ASSFT asking 2 rounds x 3 labels of a target whose training split holds 3 cases."""
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    assert config["demo"]["cases_per_task"] == 5 and config["preprocess"]["split"] == {"val": 0.2, "test": 0.2}
    config["assft"].update(budget=3, rounds=2)  # 5 cases -> 3 train, 1 val, 1 test
    return config


def test_assft_budget_beyond_the_pool_is_refused_by_the_config() -> None:
    with pytest.raises(InputError) as err:
        validate_config(_budget_beyond_pool())
    assert err.value.where == "config: assft.budget"
    assert err.value.problem == (
        "2 rounds x 3 labels = 6 cases, but the target task 'unseen' has 3 training cases "
        "(5 in demo.cases_per_task, split val 0.2 / test 0.2): lower assft.budget or "
        "assft.rounds"
    )


def test_assft_budget_that_fits_exactly_is_accepted() -> None:
    config = _budget_beyond_pool()
    config["assft"].update(budget=1, rounds=3)  # 3 labels of 3 training cases
    validate_config(config)


def test_assft_budget_is_counted_from_a_real_dataset(tmp_path: Path) -> None:
    """Outside the demo the target's cases are counted from its dataset.json (not opened)."""
    from test_msd import make_case, write_json

    for i in range(5):
        make_case(tmp_path / "t", f"c{i}")
    write_json(tmp_path / "t", [f"c{i}" for i in range(5)])
    config = _budget_beyond_pool()
    config["tasks"] = [*config["tasks"], {"name": "real", "dataset": str(tmp_path / "t")}]
    config["unseen"] = ["real"]
    config["assft"]["target"] = "real"
    with pytest.raises(InputError) as err:
        validate_config(config)
    assert err.value.where == "config: assft.budget"
    assert f"has 3 training cases (5 in {tmp_path / 't'}," in err.value.problem
    config["assft"].update(budget=1)
    validate_config(config)


def test_assft_budget_beyond_the_pool_stops_snakemake_before_any_job(tmp_path: Path) -> None:
    """The workflow refuses the config up front; the query round keeps its own check as a second line."""
    from stages.query_round import run as query_round

    work = kr.make_workdir(tmp_path / "w", _budget_beyond_pool())
    plan = subprocess.run(kr.snakemake_cmd(work, "-n"), capture_output=True, text=True, timeout=300)
    assert plan.returncode != 0
    assert "segadapt: error: config: assft.budget: 2 rounds x 3 labels = 6 cases" in plan.stdout + plan.stderr
    assert "rule pretrain_foundation" not in plan.stdout
    # round 1 finds no case left once round 0 took all three
    data = tmp_path / "data"
    manifest = pd.DataFrame({"case": ["a", "b", "c", "d", "e"], "split": ["train", "train", "train", "val", "test"]})
    write_parquet(manifest, data / "manifest.parquet", {"stage": "test"})
    labelled = tmp_path / "labelled.parquet"
    write_parquet(pd.DataFrame({"case": ["a", "b", "c"], "round": [0, 0, 0]}), labelled, {"stage": "test"})
    settings = {
        "strategy": "random",
        "budget": 3,
        "seed": 0,
        "options": {},
        "dkd_knowledge": "winsorised",
        "dkd_winsor_quantile": 0.9,
        "patch_size": None,
        "overlap": 0.5,
        "sw_batch_size": 4,
        "device": "cpu",
    }
    with pytest.raises(InputError) as err:
        query_round(
            data,
            "t",
            tmp_path / "ssl.parquet",
            tmp_path / "features.parquet",
            1,
            tmp_path / "q.parquet",
            settings,
            labelled=labelled,
        )
    assert str(err.value) == (
        f"{data / 'manifest.parquet'}: no unlabelled case left for round 1: lower the budget or the number of rounds"
    )
