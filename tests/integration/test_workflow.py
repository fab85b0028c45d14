"""The workflow: formatted, lint-clean, and the tiny demo DAG runs end to end with Snakemake."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, SNAKEFILE, TINY, make_workdir, snakemake

from stages.core.io import read_provenance


def test_snakefmt_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", str(REPO / "workflow")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "-s", str(SNAKEFILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_every_rule_has_log_benchmark_code_hash_and_calls_a_stage() -> None:
    text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    rules = re.split(r"\n\s*rule (\w+):", text)[1:]
    assert len(rules) >= 10
    for name, body in zip(rules[::2], rules[1::2]):
        # memory_mb(...) doubles the request on each retry (--retries), so an OOM-killed job can succeed
        for directive in ("log:", "benchmark:", "code=code_hash(", "python -m stages.", "mem_mb=memory_mb("):
            assert directive in body, f"rule {name} lacks {directive}"


def test_bad_config_stops_before_any_job(tmp_path: Path) -> None:
    config = yaml.safe_load(TINY.read_text())
    config["train"]["steps"] = "ten"
    work = make_workdir(tmp_path / "w", config)
    proc = snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert "config: train.steps: 'ten' is not of type 'integer'" in proc.stdout + proc.stderr
    assert not (work / "results").exists()


def test_snakemake_refuses_what_validate_config_refuses(tmp_path: Path) -> None:
    """The analysis checks live in stages.core.config: Snakemake stops with validate_config's message."""
    from stages.core.config import validate_config
    from stages.core.errors import InputError

    config = yaml.safe_load(TINY.read_text())
    config["analysis"]["landscape"]["task"] = "unseen"
    with pytest.raises(InputError) as err:
        validate_config(copy.deepcopy(config), check_paths=False)
    work = make_workdir(tmp_path / "w", config)
    proc = snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert f"segadapt: error: {err.value}" in proc.stdout + proc.stderr
    assert not (work / "results").exists()


def test_the_workflow_hashes_and_runs_its_own_stages_package(tmp_path: Path) -> None:
    """Another `stages` earlier on the path (an install of another clone) is not what the code hash reads
    or what the jobs import: the Snakefile puts its repository first, for itself and the jobs."""
    shadow = tmp_path / "shadow" / "stages"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the shadow stages package was imported')\n")
    work = make_workdir(tmp_path / "w")
    # jobs call `python`: this interpreter's, as in an activated virtualenv
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "PATH": path}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(work), "--cores", "1"]
    proc = subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a job (`python -m stages.synth`, run in the working folder) imports the repository's package too
    proc = subprocess.run([*cmd, "demo/synth.json"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "demo" / "synth.json").is_file()


def dry_run_outputs(work: Path, *args: str) -> list[str]:
    """Output files of the jobs a dry run would run."""
    proc = snakemake(work, "-n", *args)
    return re.findall(r"^\s+output: (.+)$", proc.stdout, flags=re.M)


def test_chain_order_in_dag(tmp_path: Path) -> None:
    """M_{t-1} -> M_t: the teacher of step 2 starts from step 1's merged model."""
    work = make_workdir(tmp_path / "w")
    proc = snakemake(work, "-n", "-p")
    teacher_cmds = [
        line
        for line in proc.stdout.splitlines()
        if "--recipe finetune" in line and "medseqft/paired_organs/teacher" in line
    ]
    assert teacher_cmds and "--init results/runs/medseqft/organ_lesion " in teacher_cmds[0]
    first = [
        line
        for line in proc.stdout.splitlines()
        if "--recipe finetune" in line and "medseqft/organ_lesion/teacher" in line
    ]
    assert first and "--init results/foundation " in first[0]
    retention = [
        line
        for line in proc.stdout.splitlines()
        if "--recipe retention" in line and "medseqft/paired_organs/adapter" in line
    ]
    # the retention stage of step 2 sees the buffers of both tasks, in order
    assert retention and re.search(
        r"buffers/mds/organ_lesion\.parquet:\S+ results/buffers/mds/paired_organs\.parquet", retention[0]
    )


def test_two_training_seeds_and_compute_matched_baselines_dry_run(tmp_path: Path) -> None:
    """seeds: [0, 1] repeats every training run (seed 1 one level down, in its own chain) and every ASSFT chain;
    the 2x baselines train twice `train.steps`; the one-seed layout of seed 0 is unchanged."""
    config = yaml.safe_load(TINY.read_text())
    config["seeds"] = [0, 1]
    config["methods"].update(parallel_ft_2x={"enabled": True}, sequential_ft_2x={"enabled": True})
    work = make_workdir(tmp_path / "w", config)
    proc = snakemake(work, "-n", "-p")
    outputs = set(re.findall(r"^\s+output: ([^,\n]+)", proc.stdout, flags=re.M))
    evals = {o for o in outputs if o.startswith("results/eval/")}
    methods = ["medseqft", "ablation_no_lora", "parallel_ft", "parallel_ft_2x", "sequential_ft_2x", "ewc", "lwf"]
    expected = {
        f"results/eval/{m}{level}/{t}/metrics.parquet"
        for m in methods
        for level in ("", "/seed1")
        for t in ("organ_lesion", "paired_organs")
    }
    expected |= {
        f"results/eval/{m}{level}/unseen/metrics.parquet"
        for m in ("transfer_from_m0", "transfer_from_medseqft")
        for level in ("", "/seed1")
    }
    expected |= {f"results/eval/multitask_ft{level}/all/metrics.parquet" for level in ("", "/seed1")}
    assert evals == expected
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout.split("Job stats:")[1].split("total")[0], flags=re.M))
    # per seed: 4 parallel(_2x) + 1 sequential_ft_2x + 1 EWC + 1 LwF + 2 transfer full-FT jobs (the first
    # step of sequential_ft_2x is parallel_ft_2x's, EWC's and LwF's parallel_ft's: reuse_first_steps; and
    # EWC's Fisher of its first step); 2 + 2 teachers; 2 multi-task;
    # ASSFT: 3 strategies (dkd_asd, random, fg_random) x 2 rounds, each round model evaluated, plus DKD+ASD's
    # semi-supervised model and its equal-steps control
    assert {k: int(v) for k, v in jobs.items() if k.startswith(("train_", "evaluate_", "merge"))} == {
        "train_full_ft": 18,
        "train_teacher": 8,
        "train_retention": 4,
        "train_retention_full": 4,
        "merge_adapter": 4,
        "train_multitask": 2,
        "evaluate_model": 34,
        "train_round": 12,
        "train_semisupervised": 2,
        "train_continue": 2,
        "evaluate_active_model": 16,
    }
    assert int(jobs["estimate_fisher"]) == 2  # the first step's Fisher, per seed
    assert int(jobs["reuse_first_step"]) == 6
    cmds = proc.stdout.splitlines()
    reused = [c for c in cmds if "python -m stages.reuse " in c]
    assert len(reused) == 6 and any(
        "--source results/runs/parallel_ft_2x/seed1/organ_lesion --out results/runs/sequential_ft_2x/seed1/organ_lesion"
        in c
        for c in reused
    )
    assert any(
        "--source results/runs/parallel_ft/organ_lesion --out results/runs/ewc/organ_lesion" in c for c in reused
    )
    teacher = [c for c in cmds if "--out results/runs/medseqft/seed1/paired_organs/teacher " in c]
    # seed 1's chain: M_1 of seed 1, trained under seed 1
    assert teacher and "--init results/runs/medseqft/seed1/organ_lesion " in teacher[0] and '"seed":1' in teacher[0]
    doubled = [c for c in cmds if "--out results/runs/sequential_ft_2x/paired_organs " in c]
    assert doubled and "--init results/runs/sequential_ft_2x/organ_lesion " in doubled[0] and '"steps":12' in doubled[0]
    assert '"steps":6' in next(c for c in cmds if "--out results/runs/parallel_ft/organ_lesion " in c)
    seed1_eval = next(c for c in cmds if "--out results/eval/medseqft/seed1/organ_lesion " in c)
    assert "--method medseqft " in seed1_eval and '"seed":1' in seed1_eval
    assert {
        f"results/active/unseen/{q}/seed{s}/round1/query.parquet"
        for q in ("dkd_asd", "random", "fg_random")
        for s in (0, 1)
    } <= outputs
    ewc = next(c for c in cmds if "--out results/runs/ewc/seed1/paired_organs " in c)
    assert "--recipe ewc " in ewc and "--fisher results/runs/ewc/seed1/organ_lesion/fisher " in ewc
    aggregate = next(c for c in cmds if "python -m stages.aggregate" in c)
    assert '"parallel_ft_2x":12' in aggregate and '"medseqft":12' in aggregate and '"parallel_ft":6' in aggregate
    assert '"assft_dkd_asd@round1+continue":12' in aggregate and '"assft_dkd_asd@round1":6' in aggregate


def test_one_training_seed_keeps_the_layout(tmp_path: Path) -> None:
    """No `seeds`: one run per method, in results/runs/{method}/{step}; the ASSFT control is in the DAG."""
    outputs = dry_run_outputs(make_workdir(tmp_path / "w"))
    assert not [o for o in outputs if "/seed1" in o or "results/runs/medseqft/seed0" in o]
    assert "results/runs/medseqft/paired_organs/model.safetensors" in " ".join(outputs)
    assert any("dkd_asd/seed0/round1/model_continue/model.safetensors" in o for o in outputs)
    assert not any("random/seed0/round1/model_continue" in o for o in outputs)


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Path:
    return tiny_run


def test_tiny_dag_produces_metrics_for_every_method_and_task(run: Path) -> None:
    metrics = pd.read_parquet(run / "results" / "summary" / "metrics.parquet")
    dice = metrics[metrics["metric"] == "dice"]
    assert set(dice["method"]) == {
        "medseqft",
        "ablation_no_lora",
        "parallel_ft",
        "multitask_ft",
        "transfer_from_m0",
        "transfer_from_medseqft",
        "assft_dkd_asd",
        "assft_random",
        "assft_fg_random",
        "ewc",
        "lwf",
    }
    assert set(dice.loc[dice["method"] == "parallel_ft", "task"]) == {"organ_lesion", "paired_organs"}
    assert set(dice.loc[dice["method"] == "transfer_from_m0", "task"]) == {"unseen"}
    assert dice["value"].between(0, 1).all()
    assert {"hd95", "nsd"} <= set(metrics["metric"])
    assert (run / "results" / "summary" / "summary.md").read_text().startswith("# segadapt summary")


def test_tiny_dag_compares_assft_with_its_equal_steps_control(run: Path) -> None:
    paired = pd.read_parquet(run / "results" / "summary" / "paired.parquet")
    active = paired[paired["reference"] == "assft_dkd_asd@round1+selective"].set_index(["method", "metric"])
    control = active.loc[("assft_dkd_asd@round1+continue", "dice")]
    assert control["compute_matched"] and control["steps"] == control["steps_ref"] == 12
    assert not active.loc[("assft_random@round1", "dice"), "compute_matched"]
    kg = paired[(paired["reference"] == "medseqft") & (paired["method"] == "parallel_ft")]
    assert not kg["compute_matched"].any() and (kg["steps_ref"] == 12).all() and (kg["steps"] == 6).all()
    assert (paired["seeds"] == 1).all()
    md = (run / "results" / "summary" / "summary.md").read_text()
    assert "## Paired comparison: assft_dkd_asd@round1+selective − each method" in md
    # the query strategy alone: DKD+ASD's round model against random's and foreground-aware random's
    query = paired[paired["reference"] == "assft_dkd_asd@round1"]
    query = query[query["metric"] == "dice"].set_index("method")
    assert sorted(query.index) == ["assft_fg_random@round1", "assft_random@round1"]
    assert query["compute_matched"].all() and (query["steps"] == 6).all()
    assert "## Paired comparison: assft_dkd_asd@round1 − each method" in md


def test_ewc_and_lwf_are_in_the_summary_and_the_forgetting_table(run: Path) -> None:
    """The continual-learning baselines: evaluated on every task so far, in the BWT table; EWC's Fisher of
    the first step is an artifact the second step's training names as an input."""
    summary = run / "results" / "summary"
    bwt = pd.read_parquet(summary / "bwt.parquet")
    assert {"ewc", "lwf", "medseqft"} <= set(bwt["method"])
    forgetting = pd.read_parquet(summary / "forgetting.parquet")
    assert set(forgetting.loc[forgetting["method"] == "ewc", "task"]) == {"organ_lesion", "paired_organs"}
    assert "| ewc |" in (summary / "summary.md").read_text()
    # the forgetting of every sequential chain is compared with medseqft's, each with its interval
    compared = pd.read_parquet(summary / "forgetting_paired.parquet")
    assert set(compared["method"]) == set(bwt["method"]) - {"medseqft"} and {"ewc", "lwf"} <= set(compared["method"])
    assert set(compared["quantity"]) == {"bwt", "retained"} and (compared["ci_low"] <= compared["ci_high"]).all()
    assert bwt["ci_low"].notna().all() and (bwt["seeds"] == 1).all()
    # their first step is parallel FT's first model, copied byte for byte and said so (reuse_first_steps)
    runs = run / "results" / "runs"
    for method in ("ewc", "lwf"):
        record = json.loads((runs / method / "organ_lesion" / "reused_from.json").read_text())
        assert record["source"] == "results/runs/parallel_ft/organ_lesion"
        copied = (runs / method / "organ_lesion" / "model.safetensors").read_bytes()
        assert copied == (runs / "parallel_ft" / "organ_lesion" / "model.safetensors").read_bytes()
    fisher = run / "results" / "runs" / "ewc" / "organ_lesion" / "fisher" / "fisher.safetensors"
    inputs = read_provenance(run / "results" / "runs" / "ewc" / "paired_organs" / "model.safetensors")["inputs"]
    assert any(k.endswith("ewc/organ_lesion/fisher/fisher.safetensors") for k in inputs) and fisher.is_file()
    logs = pd.read_parquet(summary / "training_logs.parquet")
    second = logs[(logs["method"] == "ewc") & (logs["step"] == "paired_organs")]
    assert second["ewc"].iloc[0] == 0.0 and (second["ewc"].iloc[2:] > 0).all()
    assert (logs.loc[(logs["method"] == "lwf") & (logs["step"] == "paired_organs"), "lwf"].iloc[2:] > 0).all()


def test_tiny_dag_produces_the_analyses(run: Path) -> None:
    """Drift of every method's models against M0, and a landscape per chosen method, as DAG outputs."""
    analysis = run / "results" / "analysis"
    blocks = pd.read_parquet(analysis / "drift" / "drift_blocks.parquet")
    assert {"medseqft", "ablation_no_lora", "parallel_ft", "multitask_ft"} <= set(blocks["method"])
    total = blocks[blocks["block"] == "backbone"]
    assert (total["rel_to_m0"] > 0).all() and np.isfinite(total["rel_to_m0"]).all()
    for method in ("medseqft", "parallel_ft"):
        grid = pd.read_parquet(analysis / "landscape" / method / "landscape.parquet")
        assert set(grid["kind"]) == {"1d", "2d"} and np.isfinite(grid["loss"]).all()
        assert len(grid[grid["kind"] == "2d"]) == 9  # points: 3 per axis in tiny.yaml
        assert (analysis / "landscape" / method / "landscape_2d.png").stat().st_size > 0
    assert (analysis / "drift" / "drift_blocks.png").stat().st_size > 0


def test_sequential_model_is_evaluated_on_every_earlier_task(run: Path) -> None:
    """R[i, j]: the model of step 2 is evaluated on task 1 with task 1's head (forgetting)."""
    m = pd.read_parquet(run / "results" / "eval" / "medseqft" / "paired_organs" / "metrics.parquet")
    assert set(m["task"]) == {"organ_lesion", "paired_organs"}
    spec = yaml.safe_load((run / "results" / "runs" / "medseqft" / "paired_organs" / "model.json").read_text())
    assert spec["heads"] == {"organ_lesion": 3, "paired_organs": 3}


def test_buffers_hold_the_lowest_ssl_loss_cases(run: Path) -> None:
    for task in ("organ_lesion", "paired_organs"):
        buf = pd.read_parquet(run / "results" / "buffers" / "mds" / f"{task}.parquet")
        ssl = pd.read_parquet(run / "results" / "scores" / task / "ssl.parquet")
        train = ssl[ssl["split"] == "train"].sort_values("mean")
        assert sorted(buf.loc[buf["selected"], "case"]) == sorted(train["case"].head(2))
        assert buf["selected"].sum() == 2  # K = max(2, 10 % of 3 training cases)


def test_predictions_are_in_original_geometry(run: Path) -> None:
    manifest = pd.read_parquet(run / "results" / "data" / "organ_lesion" / "manifest.parquet")
    test_cases = manifest[manifest["split"] == "test"]
    assert len(test_cases) >= 1
    for row in test_cases.itertuples():
        pred = nib.load(
            run
            / "results"
            / "eval"
            / "parallel_ft"
            / "organ_lesion"
            / "predictions"
            / "organ_lesion"
            / f"{row.case}.nii.gz"
        )
        label = nib.load(run / row.label_path)
        assert pred.shape == label.shape
        assert np.allclose(pred.affine, label.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_scores_and_features_for_every_task(run: Path) -> None:
    for task in ("organ_lesion", "paired_organs", "unseen"):
        ssl = pd.read_parquet(run / "results" / "scores" / task / "ssl.parquet")
        feats = pd.read_parquet(run / "results" / "scores" / task / "features.parquet")
        manifest = pd.read_parquet(run / "results" / "data" / task / "manifest.parquet")
        assert sorted(ssl["case"]) == sorted(manifest["case"]) == sorted(feats["case"])
        assert (ssl["scorer"] == "ssl").all() and (ssl["R"] == 4).all()
        assert np.isfinite(ssl["mean"]).all()


def test_noop_rerun_runs_nothing(run: Path) -> None:
    proc = snakemake(run, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout


def _with_config(run: Path, name: str, change) -> str:
    config = yaml.safe_load((run / "config.yaml").read_text())
    change(config)
    alt = run / name
    alt.write_text(yaml.safe_dump(config))
    return str(alt)


def test_changing_train_settings_reruns_only_training_and_after(run: Path) -> None:
    alt = _with_config(run, "alt_steps.yaml", lambda c: c["train"].update(steps=7))
    outputs = " ".join(dry_run_outputs(run, "--configfile", alt))
    assert "runs/parallel_ft/organ_lesion/model.safetensors" in outputs and "eval/" in outputs
    for upstream in ("foundation/", "results/data/", "scores/", "buffers/", "demo/"):
        assert upstream not in outputs, outputs


def test_evaluation_setting_reruns_only_evaluation(run: Path) -> None:
    alt = _with_config(run, "alt_nsd.yaml", lambda c: c["evaluate"].update(nsd_tolerance_mm=3.0))
    outputs = dry_run_outputs(run, "--configfile", alt)
    assert outputs and all("/eval" in o or "/summary/" in o for o in outputs), outputs


def test_medseqft_setting_leaves_other_methods_alone(run: Path) -> None:
    alt = _with_config(run, "alt_kd.yaml", lambda c: c.setdefault("medseqft", {}).update(kd_temperature=3.0))
    outputs = " ".join(dry_run_outputs(run, "--configfile", alt))
    assert "runs/medseqft/organ_lesion/adapter" in outputs
    # the first step's teachers come before any retention stage; later teachers start from M_1, which changes
    for other in (
        "runs/parallel_ft/",
        "runs/multitask_ft/",
        "organ_lesion/teacher/",
        "foundation/",
        "transfer_from_m0",
    ):
        assert other not in outputs, other


def test_disabled_method_setting_reruns_nothing(run: Path) -> None:
    alt = _with_config(run, "alt_off.yaml", lambda c: c["methods"]["sequential_ft"].update(enabled=False))
    assert dry_run_outputs(run, "--configfile", alt) == []


@pytest.mark.parametrize("engine", ["docker", "apptainer"])
def test_switching_the_container_engine_reruns_nothing(run: Path, engine: str) -> None:
    """The engine wraps the same commands (shell.prefix / container:), and their outputs are the same bytes."""
    alt = _with_config(
        run, f"alt_{engine}.yaml", lambda c: c.update(container={"engine": engine, "image": "segadapt:cpu"})
    )
    assert dry_run_outputs(run, "--configfile", alt) == []


def test_import_checkpoint_instead_of_pretraining(run: Path, tmp_path: Path) -> None:
    """foundation.checkpoint: M0 is imported (key prefixes mapped) and scored like a pre-trained one."""
    from safetensors.torch import load_file

    state = load_file(run / "results" / "foundation" / "model.safetensors")
    ckpt = tmp_path / "external.pt"
    torch.save({"state_dict": {k.replace("backbone.", "encoder."): v for k, v in state.items()}}, ckpt)

    def use_checkpoint(c):
        c["foundation"].update(checkpoint=str(ckpt), prefix_map={"encoder.": "backbone."})

    config = yaml.safe_load((run / "config.yaml").read_text())
    use_checkpoint(config)
    work = make_workdir(tmp_path / "w", config)
    snakemake(work, "results/scores/organ_lesion/ssl.parquet")
    imported = load_file(work / "results" / "foundation" / "model.safetensors")
    assert imported.keys() == state.keys() and all(torch.equal(imported[k], state[k]) for k in state)
    assert (work / "results" / "foundation" / "feature_stats.safetensors").is_file()
    scores = pd.read_parquet(work / "results" / "scores" / "organ_lesion" / "ssl.parquet")
    assert (scores["scorer"] == "ssl").all()
    assert not (work / "results" / "foundation" / "pretrain_log.parquet").exists()


def test_appending_a_task_runs_only_new_jobs(run: Path) -> None:
    def append(c):
        c["tasks"].append({"name": "tubular", "dataset": "demo/tubular"})
        c["order"].append("tubular")

    outputs = " ".join(dry_run_outputs(run, "--configfile", _with_config(run, "alt_append.yaml", append)))
    assert "runs/medseqft/tubular/model.safetensors" in outputs
    # earlier steps of the chain and their data are untouched
    for old in (
        "runs/medseqft/organ_lesion/",
        "runs/medseqft/paired_organs/",
        "runs/parallel_ft/organ_lesion/",
        "results/data/organ_lesion/",
        "results/foundation/",
        "buffers/mds/organ_lesion",
    ):
        assert old not in outputs, old


def test_reordering_tasks_reruns_from_the_first_change(run: Path) -> None:
    outputs = " ".join(
        dry_run_outputs(
            run,
            "--configfile",
            _with_config(run, "alt_order.yaml", lambda c: c.update(order=["paired_organs", "organ_lesion"])),
        )
    )
    assert "runs/medseqft/paired_organs/model.safetensors" in outputs
    assert "runs/medseqft/organ_lesion/model.safetensors" in outputs
    # parallel methods do not depend on the order
    assert "runs/parallel_ft/" not in outputs


def test_assft_rounds_query_annotate_and_budget_curve(run: Path) -> None:
    active = run / "results" / "active" / "unseen"
    manifest = pd.read_parquet(run / "results" / "data" / "unseen" / "manifest.parquet")
    pool = set(manifest.loc[manifest["split"] == "train", "case"])
    labelled_by: dict[str, set[str]] = {}
    for strategy in ("dkd_asd", "random"):
        labelled: set[str] = set()
        for r in (0, 1):
            query = pd.read_parquet(active / strategy / "seed0" / f"round{r}" / "query.parquet")
            picked = set(query.loc[query["picked"], "case"])
            assert len(picked) == 1 and picked <= pool - labelled  # budget 1, never a labelled case again
            assert set(query["case"]) == pool - labelled  # every still-unlabelled candidate is scored
            labelled |= picked
            folder = active / strategy / "seed0" / f"round{r}" / "labelled"
            assert set(pd.read_parquet(folder / "labelled.parquet")["case"]) == labelled
            # the oracle revealed exactly the queried labels: no other label file is reachable
            assert {p.name[: -len("_seg.npy")] for p in (folder / "cases").glob("*_seg.npy")} == labelled
        labelled_by[strategy] = labelled
    round1 = pd.read_parquet(active / "dkd_asd" / "seed0" / "round1" / "query.parquet")
    assert round1["asd"].notna().any()  # round 1 uses the round-0 model for ASD
    pseudo = pd.read_parquet(active / "dkd_asd" / "seed0" / "round1" / "pseudo_selective" / "pseudo.parquet")
    assert set(pseudo["case"]) == pool - labelled_by["dkd_asd"]  # every still-unlabelled case is considered
    budget = pd.read_parquet(run / "results" / "summary" / "budget.parquet")
    assert set(zip(budget["strategy"], budget["labels"])) == {
        (s, n) for s in ("dkd_asd", "random", "fg_random") for n in (1, 2)
    }
    assert budget["dice_mean"].between(0, 1).all()
    # foreground-aware random: round 0 is random's own draw (no target model yet), round 1 weighs the
    # candidates by the round-0 model's predicted foreground
    fg = [pd.read_parquet(active / "fg_random" / "seed0" / f"round{r}" / "query.parquet") for r in (0, 1)]
    plain = pd.read_parquet(active / "random" / "seed0" / "round0" / "query.parquet")
    assert fg[0]["fallback"].eq("random").all()
    assert set(fg[0].loc[fg[0]["picked"], "case"]) == set(plain.loc[plain["picked"], "case"])
    assert fg[1]["fallback"].isna().all() and fg[1]["fg_weight"].sum() == pytest.approx(1.0)
    ssl = pd.read_parquet(run / "results" / "scores" / "unseen" / "ssl.parquet")
    assert {"sem", "half_a", "half_b", "split_half_r"} <= set(ssl.columns)
