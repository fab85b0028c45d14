"""The summary numbers: methods x tasks means, the sequential matrix and BWT, paired bootstrap CIs, budget and log tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import aggregate
from stages.core.errors import InputError
from stages.core.io import make_provenance, read_parquet, read_provenance, write_parquet

TASKS = ["liver", "spleen", "kidney"]
# R[i][j]: per-case Dice (two cases, two foreground classes each) of medseqft after step i on task j;
# a case's value is the mean of its two classes, so each cell below is the mean over cases of these.
R_SEQ = {
    ("liver", "liver"): [(0.8, 0.6), (0.9, 0.7)],  # cases 0.7, 0.8 -> 0.75
    ("spleen", "liver"): [(0.6, 0.4), (0.7, 0.5)],  # 0.5, 0.6 -> 0.55
    ("spleen", "spleen"): [(0.9, 0.9), (0.8, 0.6)],  # 0.9, 0.7 -> 0.8
    ("kidney", "liver"): [(0.5, 0.3), (0.6, 0.4)],  # 0.4, 0.5 -> 0.45
    ("kidney", "spleen"): [(0.7, 0.7), (0.6, 0.4)],  # 0.7, 0.5 -> 0.6
    ("kidney", "kidney"): [(0.9, 0.7), (0.7, 0.7)],  # 0.8, 0.7 -> 0.75
}
R_MEAN = {
    ("liver", "liver"): 0.75,
    ("spleen", "liver"): 0.55,
    ("spleen", "spleen"): 0.8,
    ("kidney", "liver"): 0.45,
    ("kidney", "spleen"): 0.6,
    ("kidney", "kidney"): 0.75,
}
# BWT = mean_{j<n}(R[n, j] - R[j, j]) = ((0.45 - 0.75) + (0.6 - 0.8)) / 2
BWT_MEDSEQFT = -0.25


def _rows(method: str, step: str, task: str, per_case: list[tuple[float, float]], metric: str = "dice") -> list[dict]:
    rows = []
    for i, classes in enumerate(per_case):
        # class 0 never enters a summary (evaluate writes foreground only; a stray background row must be ignored)
        rows.append(
            {
                "method": method,
                "step": step,
                "task": task,
                "case": f"{task}_{i:03d}",
                "class": 0,
                "metric": metric,
                "value": 99.0,
                "flag": "",
            }
        )
        for c, v in enumerate(classes, start=1):
            rows.append(
                {
                    "method": method,
                    "step": step,
                    "task": task,
                    "case": f"{task}_{i:03d}",
                    "class": c,
                    "metric": metric,
                    "value": v,
                    "flag": "",
                }
            )
    return rows


def metrics_frame() -> pd.DataFrame:
    rows = []
    for (step, task), vals in R_SEQ.items():
        rows += _rows("medseqft", step, task, vals)
        rows += _rows("medseqft", step, task, [(10 * a, 10 * b) for a, b in vals], "hd95")
    # an active-learning chain on an unseen task: steps are rounds, never part of R or the own-step table
    for step in ("round0", "round1", "round1+selective"):
        rows += _rows("assft_dkd_asd", step, "unseen", [(0.2, 0.4)])
    for task in TASKS:
        rows += _rows("parallel_ft", task, task, [(0.5, 0.5), (0.6, 0.4)])  # 0.5, 0.5
        rows += _rows("parallel_ft", task, task, [(20.0, 10.0), (30.0, 10.0)], "hd95")  # 15, 20
        rows += _rows("multitask_ft", "all", task, [(0.4, 0.2), (0.6, 0.6)])  # 0.3, 0.6
    return pd.DataFrame(rows)


def write_metrics(folder: Path, df: pd.DataFrame) -> list[Path]:
    paths = []
    for (method, step), part in df.groupby(["method", "step"]):
        path = folder / "eval" / method / step / "metrics.parquet"
        write_parquet(part.reset_index(drop=True), path, make_provenance("evaluate", {}, method=method, step=step))
        paths.append(path)
    return paths


def test_summary_mean_is_the_mean_over_cases_of_the_class_mean() -> None:
    summary = aggregate.summary_table(metrics_frame())
    dice = summary[summary["metric"] == "dice"].set_index(["method", "task"])
    # medseqft on each task uses the step that learned it (the diagonal of R)
    assert dice.loc[("medseqft", "liver"), "mean"] == pytest.approx(0.75)
    assert dice.loc[("medseqft", "spleen"), "mean"] == pytest.approx(0.8)
    assert dice.loc[("medseqft", "spleen"), "std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert dice.loc[("medseqft", "kidney"), "cases"] == 2
    # the multi-task model is scored with its one step "all"
    assert dice.loc[("multitask_ft", "kidney"), "step"] == "all"
    assert dice.loc[("multitask_ft", "kidney"), "mean"] == pytest.approx(0.45)
    hd = summary[summary["metric"] == "hd95"].set_index(["method", "task"])
    assert hd.loc[("parallel_ft", "liver"), "mean"] == pytest.approx(17.5)
    assert len(dice) == 9  # 3 methods x 3 tasks, no row of an earlier task under a later step


def test_sequential_matrix_and_backward_transfer_match_hand_computation() -> None:
    cases = aggregate.case_table(metrics_frame())
    forgetting = aggregate.sequential_matrix(cases, TASKS)
    assert set(forgetting["method"]) == {"medseqft"}  # parallel and multi-task are never re-evaluated
    got = {(s, t): d for s, t, d in zip(forgetting["step"], forgetting["task"], forgetting["dice"])}
    assert got.keys() == R_MEAN.keys()
    for key, value in R_MEAN.items():
        assert got[key] == pytest.approx(value)
    bwt = aggregate.backward_transfer(forgetting)
    assert bwt["bwt"].iloc[0] == pytest.approx(BWT_MEDSEQFT)
    assert bwt["tasks"].iloc[0] == 3 and bwt["final_step"].iloc[0] == "kidney"
    # without an explicit order the steps are ordered by how many tasks each was evaluated on
    inferred = aggregate.sequential_matrix(cases)
    pd.testing.assert_frame_equal(inferred, forgetting)


def test_sequential_matrix_refuses_a_missing_earlier_task() -> None:
    df = metrics_frame()
    df = df[~((df["method"] == "medseqft") & (df["step"] == "kidney") & (df["task"] == "liver"))]
    with pytest.raises(InputError, match="after step kidney has no Dice on earlier task liver"):
        aggregate.sequential_matrix(aggregate.case_table(df), TASKS)
    with pytest.raises(InputError, match="outside the task order"):
        aggregate.sequential_matrix(aggregate.case_table(metrics_frame()), ["liver", "spleen"])


def test_bootstrap_ci_contains_the_true_difference_and_is_seeded() -> None:
    rng = np.random.default_rng(7)
    diffs = 0.05 + rng.normal(0.0, 0.02, size=40)
    a = aggregate.bootstrap_mean_ci(diffs, 2000, 0.95, np.random.default_rng(1))
    b = aggregate.bootstrap_mean_ci(diffs, 2000, 0.95, np.random.default_rng(1))
    c = aggregate.bootstrap_mean_ci(diffs, 2000, 0.95, np.random.default_rng(2))
    assert a == b and a != c
    assert a[0] < diffs.mean() < a[1]
    # width close to the normal-theory 2 * 1.96 * s / sqrt(n)
    expected = 2 * 1.96 * diffs.std(ddof=1) / np.sqrt(diffs.size)
    assert a[1] - a[0] == pytest.approx(expected, rel=0.15)


def test_bootstrap_ci_covers_the_true_difference_at_about_its_level() -> None:
    # 300 simulated studies of 25 paired cases with true mean difference 0.05: a 95 % interval should
    # contain 0.05 in about 95 % of them (the percentile bootstrap runs slightly under at small n)
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(300):
        diffs = 0.05 + rng.normal(0.0, 0.03, size=25)
        low, high = aggregate.bootstrap_mean_ci(diffs, 400, 0.95, rng)
        hits += low < 0.05 < high
    assert 0.89 <= hits / 300 <= 0.99


def test_paired_comparison_uses_the_same_cases_and_own_step_models() -> None:
    cases = aggregate.case_table(metrics_frame())
    conf = aggregate.SummarySettings(reference="medseqft", n_boot=500, seed=3)
    paired = aggregate.paired_comparisons(cases, conf)
    row = paired[(paired["method"] == "parallel_ft") & (paired["task"] == "spleen") & (paired["metric"] == "dice")]
    # medseqft own step on spleen: cases 0.9, 0.7; parallel_ft: 0.5, 0.5 -> differences 0.4, 0.2
    assert row["mean_diff"].iloc[0] == pytest.approx(0.3)
    assert row["cases"].iloc[0] == 2
    assert 0.2 - 1e-12 <= row["ci_low"].iloc[0] <= 0.3 <= row["ci_high"].iloc[0] <= 0.4 + 1e-12
    multi = paired[(paired["method"] == "multitask_ft") & (paired["task"] == "liver") & (paired["metric"] == "dice")]
    assert multi["step"].iloc[0] == "all" and multi["mean_diff"].iloc[0] == pytest.approx(0.75 - 0.45)
    assert set(zip(paired["method"], paired["metric"])) == {
        ("parallel_ft", "dice"),
        ("parallel_ft", "hd95"),
        ("multitask_ft", "dice"),
    }
    # a comparison's interval does not depend on which other methods exist
    alone = aggregate.paired_comparisons(cases[cases["method"] != "multitask_ft"], conf)
    pd.testing.assert_frame_equal(
        alone[alone["method"] == "parallel_ft"].reset_index(drop=True),
        paired[paired["method"] == "parallel_ft"].reset_index(drop=True),
    )
    # no reference in the metrics: no rows, no error
    absent = aggregate.paired_comparisons(cases, aggregate.SummarySettings(reference="assft"))
    assert absent.empty and list(absent.columns) == aggregate.PAIRED_COLUMNS


def test_train_logs_are_labelled_by_the_workflow_not_parsed_from_paths() -> None:
    label = aggregate.parse_train_log("medseqft:liver:teacher:/x/a:b/train_log.parquet")
    assert label == aggregate.TrainLog("medseqft", "liver", "teacher", Path("/x/a:b/train_log.parquet"))
    assert aggregate.parse_train_log("foundation:pretrain:pretrain:results/foundation/pretrain_log.parquet").stage == (
        "pretrain"
    )
    with pytest.raises(InputError, match="expected METHOD:STEP:STAGE:FILE"):
        aggregate.parse_train_log("results/runs/medseqft/liver/train_log.parquet")
    with pytest.raises(InputError, match="unknown stage 'student'"):
        aggregate.parse_train_log("medseqft:liver:student:x.parquet")


def _write_logs(root: Path) -> list[aggregate.TrainLog]:
    labels = []
    for job, rel, extra in (
        (("foundation", "pretrain", "pretrain"), "foundation/pretrain_log.parquet", {"inpaint": [1.0, 0.8]}),
        (("medseqft", "liver", "teacher"), "runs/medseqft/liver/teacher/train_log.parquet", {"seg": [2.0, 1.5]}),
        (("medseqft", "liver", "adapter"), "runs/medseqft/liver/adapter/train_log.parquet", {"kd": [0.1, 0.05]}),
    ):
        df = pd.DataFrame({"step": [1, 2], "loss": [2.0, 1.0], **extra})
        write_parquet(df, root / rel, make_provenance("train", {}))
        labels.append(aggregate.TrainLog(*job, root / rel))
    return labels


def test_run_writes_every_table_and_reruns_byte_identically(tmp_path: Path) -> None:
    metric_paths = write_metrics(tmp_path, metrics_frame())
    logs = _write_logs(tmp_path)
    rounds = pd.DataFrame(
        {
            "strategy": ["random"] * 4 + ["dkd_asd"] * 2,
            "round": [0, 0, 1, 1, 0, 1],
            "labels": [2, 2, 4, 4, 2, 4],
            "seed": [0, 1, 0, 1, 0, 0],
            "dice": [0.3, 0.5, 0.6, 0.8, 0.45, 0.75],
        }
    )
    write_parquet(rounds, tmp_path / "rounds.parquet", make_provenance("query_round", {}))
    settings = {"reference": "medseqft", "n_boot": 300, "seed": 0, "order": TASKS}
    out = tmp_path / "summary"
    aggregate.run(metric_paths, out, settings, logs, [tmp_path / "rounds.parquet"])
    names = [
        "metrics.parquet",
        "cases.parquet",
        "summary.parquet",
        "forgetting.parquet",
        "bwt.parquet",
        "paired.parquet",
        "forgetting_paired.parquet",
        "budget.parquet",
        "training_logs.parquet",
        "summary.md",
        "summary.html",
    ]
    first = {n: (out / n).read_bytes() for n in names}

    md = (out / "summary.md").read_text()
    assert md.splitlines()[0] == "# segadapt summary"
    # columns sorted: kidney, liver, spleen; the own-step diagonal of R with its sample std
    assert "| medseqft | 0.750 ± 0.071 | 0.750 ± 0.071 | 0.800 ± 0.141 | 0.767 |" in md
    assert "### medseqft (BWT -0.250)" in md
    assert "<h1>segadapt summary</h1>" in (out / "summary.html").read_text()
    assert read_parquet(out / "bwt.parquet")["bwt"].iloc[0] == pytest.approx(BWT_MEDSEQFT)

    budget = read_parquet(out / "budget.parquet").set_index(["strategy", "round"])
    assert budget.loc[("random", 1), "dice_mean"] == pytest.approx(0.7)
    assert budget.loc[("random", 1), "dice_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert budget.loc[("random", 1), "seeds"] == 2
    logs_table = read_parquet(out / "training_logs.parquet")
    assert set(zip(logs_table["method"], logs_table["stage"])) == {
        ("foundation", "pretrain"),
        ("medseqft", "teacher"),
        ("medseqft", "adapter"),
    }
    assert logs_table["iteration"].tolist() == [1, 2] * 3
    assert set(read_provenance(out / "summary.parquet")["inputs"]) == {str(p) for p in metric_paths}
    assert set(read_provenance(out / "training_logs.parquet")["inputs"]) == {str(label.path) for label in logs}
    assert read_provenance(out / "summary.md")["stage"] == "aggregate"  # sidecar

    aggregate.run(metric_paths, out, settings, logs, [tmp_path / "rounds.parquet"])
    assert {n: (out / n).read_bytes() for n in names} == first


def test_run_without_budget_or_logs_writes_empty_tables(tmp_path: Path) -> None:
    df = metrics_frame()
    paths = write_metrics(tmp_path, df[df["method"] == "parallel_ft"])
    aggregate.main(["--metrics", *map(str, paths), "--out", str(tmp_path / "s"), "--settings", '{"n_boot": 100}'])
    for name in (
        "budget.parquet",
        "training_logs.parquet",
        "forgetting.parquet",
        "bwt.parquet",
        "paired.parquet",
        "forgetting_paired.parquet",
    ):
        assert read_parquet(tmp_path / "s" / name).empty, name
    assert "No comparison: `medseqft`" in (tmp_path / "s" / "summary.md").read_text()


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    paths = write_metrics(tmp_path, metrics_frame())
    bad = tmp_path / "bad.parquet"
    write_parquet(pd.DataFrame({"method": ["x"], "value": [1.0]}), bad, make_provenance("evaluate", {}))
    with pytest.raises(InputError, match=r"bad\.parquet: lacks columns"):
        aggregate.run([*paths, bad], tmp_path / "out", {})
    stray = tmp_path / "elsewhere" / "train_log.parquet"
    write_parquet(pd.DataFrame({"step": [1], "oops": [1.0]}), stray, make_provenance("train", {}))
    with pytest.raises(InputError, match=r"train_log\.parquet: lacks columns \['loss'\]"):
        aggregate.run(paths, tmp_path / "out", {}, train_logs=[aggregate.TrainLog("m", "s", "train", stray)])
    with pytest.raises(InputError, match="unknown keys"):
        aggregate.run(paths, tmp_path / "out", {"n_bootstrap": 10})
    assert not (tmp_path / "out").exists()


def test_assft_is_compared_with_its_baselines_after_the_last_round() -> None:
    """ASSFT's final model (last round + selective) minus each baseline, random averaged over its seeds."""
    from stages.aggregate import SummarySettings, active_paired_comparisons, case_table

    rows = []
    models = [
        ("assft_dkd_asd", "round1+selective", 0.8),
        ("assft_dkd_asd", "round1", 0.7),
        ("assft_dkd_asd", "round1+all", 0.75),
        ("assft_random", "round1", 0.6),
        ("assft_random", "round0", 0.5),
        ("assft_dkd_asd", "round0", 0.55),
    ]
    for method, step, base in models:
        for seed in [0, 1] if method == "assft_random" else [0]:
            for c in range(4):
                rows.append(
                    {
                        "method": method,
                        "step": step,
                        "task": "unseen",
                        "case": f"c{c}",
                        "class": 1,
                        "metric": "dice",
                        "value": base + 0.01 * c + 0.02 * seed,
                        "flag": "",
                        "seed": seed,
                    }
                )
    paired = active_paired_comparisons(case_table(pd.DataFrame(rows)), SummarySettings(n_boot=200))
    assert list(paired["reference"].unique()) == ["assft_dkd_asd@round1+selective", "assft_dkd_asd@round1"]
    out = paired[paired["reference"] == "assft_dkd_asd@round1+selective"].set_index("method")
    assert sorted(out.index) == ["assft_dkd_asd@round1", "assft_dkd_asd@round1+all", "assft_random@round1"]
    assert out.loc["assft_random@round1", "mean_diff"] == pytest.approx(0.19)  # 0.8 - mean(0.60, 0.62)
    assert out.loc["assft_dkd_asd@round1", "mean_diff"] == pytest.approx(0.10)
    assert (out["cases"] == 4).all()
    # the query strategy alone: DKD+ASD's last-round model against the other strategies' last-round
    # models (same labels, same steps), never against semi-supervised models or its own chain
    query = paired[paired["reference"] == "assft_dkd_asd@round1"].set_index("method")
    assert list(query.index) == ["assft_random@round1"]
    assert query.loc["assft_random@round1", "mean_diff"] == pytest.approx(0.09)  # 0.7 - mean(0.60, 0.62)
    assert query.loc["assft_random@round1", "cases"] == 4


def test_without_semi_supervision_the_round_model_is_the_only_active_reference() -> None:
    """No semi-supervised model: the last round model is ASSFT's, compared once with each baseline."""
    from stages.aggregate import SummarySettings, active_paired_comparisons, case_table

    rows = [
        {
            "method": method,
            "step": "round1",
            "task": "unseen",
            "case": f"c{c}",
            "class": 1,
            "metric": "dice",
            "value": base + 0.01 * c,
            "flag": "",
            "seed": 0,
        }
        for method, base in [("assft_dkd_asd", 0.7), ("assft_random", 0.6), ("assft_fg_random", 0.65)]
        for c in range(3)
    ]
    out = active_paired_comparisons(case_table(pd.DataFrame(rows)), SummarySettings(n_boot=100))
    assert set(out["reference"]) == {"assft_dkd_asd@round1"}
    assert out.set_index("method")["mean_diff"].to_dict() == pytest.approx(
        {"assft_fg_random@round1": 0.05, "assft_random@round1": 0.10}
    )


# ------------------------------------------------------------------ training seeds (issue 16, item 6)


def test_one_seed_hierarchical_bootstrap_is_the_case_bootstrap() -> None:
    rng = np.random.default_rng(5)
    ref, other = rng.normal(0.7, 0.1, size=(1, 30)), rng.normal(0.6, 0.1, size=(1, 30))
    mean, low, high, seed_sd = aggregate.hierarchical_bootstrap_ci(ref, other, 500, 0.95, np.random.default_rng(9))
    case = aggregate.bootstrap_mean_ci(ref[0] - other[0], 500, 0.95, np.random.default_rng(9))
    assert (low, high) == case and mean == pytest.approx((ref - other).mean()) and np.isnan(seed_sd)
    # seed values need not match for one seed each: there is nothing to resample at the seed level
    again = aggregate.hierarchical_bootstrap_ci(ref, other, 500, 0.95, np.random.default_rng(9), paired_seeds=False)
    assert again[1:3] == case


@pytest.mark.parametrize("resampling", ["shared", "per_seed"])
def test_seed_noise_without_case_noise_gets_an_interval_over_the_seed_spread(resampling: str) -> None:
    # the difference is the same on every case of a seed but varies between seeds: a case bootstrap of the
    # seed-averaged differences would give a zero-width interval; resampling seeds must give the seed spread
    effects = np.array([0.00, 0.04, 0.08, 0.12, 0.16])
    ref = np.repeat(effects[:, None], 20, axis=1) + 0.5
    other = np.full_like(ref, 0.5)
    mean, low, high, seed_sd = aggregate.hierarchical_bootstrap_ci(
        ref, other, 4000, 0.95, np.random.default_rng(0), case_resampling=resampling
    )
    assert mean == pytest.approx(0.08) and seed_sd == pytest.approx(np.std(effects, ddof=1))
    # at least mean ± one standard error of the seed mean, never beyond the seeds' range
    se = np.std(effects, ddof=1) / np.sqrt(effects.size)
    assert effects.min() <= low <= mean - se and mean + se <= high <= effects.max()
    case_only = aggregate.bootstrap_mean_ci((ref - other).mean(axis=0), 4000, 0.95, np.random.default_rng(0))
    assert case_only[1] - case_only[0] == pytest.approx(0.0, abs=1e-12)


def test_hierarchical_bootstrap_covers_a_seed_and_case_effect_at_about_its_level() -> None:
    # 200 studies, 8 seeds x 30 cases: true effect 0.05, seed sd 0.03, case sd 0.05 (crossed: the same cases
    # under every seed); the two-way interval should cover 0.05 in most studies
    rng = np.random.default_rng(21)
    hits = 0
    for _ in range(200):
        case_effect = rng.normal(0.0, 0.05, size=30)
        seed_effect = rng.normal(0.0, 0.03, size=(8, 1))
        diffs = 0.05 + seed_effect + case_effect + rng.normal(0.0, 0.01, size=(8, 30))
        _, low, high, _ = aggregate.hierarchical_bootstrap_ci(diffs, np.zeros_like(diffs), 400, 0.95, rng)
        hits += low < 0.05 < high
    assert 0.85 <= hits / 200 <= 1.0


def test_unpaired_seeds_compare_the_means_and_are_seeded() -> None:
    rng = np.random.default_rng(3)
    ref, other = rng.normal(0.7, 0.05, size=(3, 12)), rng.normal(0.6, 0.05, size=(2, 12))
    a = aggregate.hierarchical_bootstrap_ci(ref, other, 300, 0.9, np.random.default_rng(1), paired_seeds=False)
    b = aggregate.hierarchical_bootstrap_ci(ref, other, 300, 0.9, np.random.default_rng(1), paired_seeds=False)
    assert a[:3] == b[:3] and np.isnan(a[3])
    assert a[0] == pytest.approx(ref.mean() - other.mean()) and a[1] < a[0] < a[2]
    with pytest.raises(ValueError, match="paired seeds need as many seeds"):
        aggregate.hierarchical_bootstrap_ci(ref, other, 300, 0.9, np.random.default_rng(1))


def two_seed_metrics() -> pd.DataFrame:
    """A fake evaluation under training seeds 0 and 1: medseqft (2N steps), parallel_ft (N), parallel_ft_2x (2N).

    Dice per (method, seed, case) on task liver, one foreground class, three test cases.
    """
    values = {
        ("medseqft", 0): [0.80, 0.70, 0.60],  # seed mean 0.70
        ("medseqft", 1): [0.90, 0.80, 0.70],  # 0.80
        ("parallel_ft", 0): [0.60, 0.50, 0.40],  # 0.50
        ("parallel_ft", 1): [0.60, 0.50, 0.40],  # 0.50
        ("parallel_ft_2x", 0): [0.70, 0.70, 0.70],  # 0.70
        ("parallel_ft_2x", 1): [0.80, 0.80, 0.80],  # 0.80
    }
    return pd.DataFrame(
        [r for (method, seed), v in values.items() for r in _seed_rows(method, seed, "liver", "liver", v)]
    )


def _seed_rows(method: str, seed: int, step: str, task: str, per_case: list[float]) -> list[dict]:
    """Dice rows of one foreground class, one per test case, under a training seed."""
    return [
        {
            "method": method,
            "step": step,
            "task": task,
            "case": f"{task}_{i:03d}",
            "class": 1,
            "metric": "dice",
            "value": v,
            "flag": "",
            "seed": seed,
        }
        for i, v in enumerate(per_case)
    ]


def test_aggregate_of_a_two_seed_evaluation_gives_the_seed_table(tmp_path: Path) -> None:
    df = two_seed_metrics()
    paths = []
    for (method, seed), part in df.groupby(["method", "seed"]):
        # where the workflow puts them: the first seed in the old layout, later seeds one level down
        folder = tmp_path / "eval" / (method if seed == 0 else f"{method}/seed{seed}") / "liver"
        write_parquet(part.reset_index(drop=True), folder / "metrics.parquet", make_provenance("evaluate", {}))
        paths.append(folder / "metrics.parquet")
    settings = {
        "reference": "medseqft",
        "n_boot": 500,
        "seed": 0,
        "training_steps": {"medseqft": 12, "parallel_ft": 6, "parallel_ft_2x": 12},
    }
    out = tmp_path / "summary"
    aggregate.run(paths, out, settings)

    summary = read_parquet(out / "summary.parquet").set_index("method")
    assert summary.loc["medseqft", "mean"] == pytest.approx(0.75)
    assert summary.loc["medseqft", "seeds"] == 2
    assert summary.loc["medseqft", "seed_std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert summary.loc["parallel_ft", "seed_std"] == pytest.approx(0.0)
    # the std over cases is over each case's mean over seeds: (0.85, 0.75, 0.65)
    assert summary.loc["medseqft", "std"] == pytest.approx(0.1) and summary.loc["medseqft", "cases"] == 3

    paired = read_parquet(out / "paired.parquet").set_index("method")
    full = paired.loc["parallel_ft"]
    assert full["mean_diff"] == pytest.approx(0.25) and full["seeds_ref"] == 2 and full["seeds"] == 2
    assert full["seed_sd"] == pytest.approx(np.std([0.2, 0.3], ddof=1))  # per-seed differences 0.2, 0.3
    assert not full["compute_matched"] and (full["steps_ref"], full["steps"]) == (12, 6)
    matched = paired.loc["parallel_ft_2x"]
    # the differences are (0.1, 0, -0.1) under both seeds: the mean is 0 and no seed spread
    assert matched["mean_diff"] == pytest.approx(0.0, abs=1e-12) and matched["seed_sd"] == pytest.approx(0.0)
    assert matched["compute_matched"] and matched["ci_low"] < 0 < matched["ci_high"]

    md = (out / "summary.md").read_text()
    assert "## Dice: mean ± sd over training seeds" in md
    assert "| medseqft | 0.750 ± 0.071 (2) |" in md
    assert "| parallel_ft_2x | liver | Dice | 2 / 2 | 3 | 0.000 |" in md and "| 12 / 12 | yes |" in md
    assert "| 12 / 6 | no |" in md
    assert "resampling training seeds, then test cases" in md


def test_one_seed_summary_has_no_seed_table(tmp_path: Path) -> None:
    df = two_seed_metrics()
    paths = write_metrics(tmp_path, df[df["seed"] == 0])
    aggregate.run(paths, tmp_path / "s", {"n_boot": 100})
    md = (tmp_path / "s" / "summary.md").read_text()
    assert "over training seeds" not in md and "over test cases (one training seed on each side)" in md
    paired = read_parquet(tmp_path / "s" / "paired.parquet")
    assert (paired["seeds"] == 1).all() and paired["seed_sd"].isna().all() and (paired["steps"] == -1).all()
    with pytest.raises(InputError, match="case_resampling must be one of"):
        aggregate.run(paths, tmp_path / "t", {"case_resampling": "nested"})


def test_equal_steps_control_is_in_the_assft_table() -> None:
    rows = []
    models = [
        ("assft_dkd_asd", "round1+selective", 0.8),
        ("assft_dkd_asd", "round1+continue", 0.75),
        ("assft_dkd_asd", "round1", 0.7),
        ("assft_random", "round1", 0.6),
    ]
    for method, step, base in models:
        for seed in (0, 1):
            for c in range(4):
                rows.append(
                    {
                        "method": method,
                        "step": step,
                        "task": "unseen",
                        "case": f"c{c}",
                        "class": 1,
                        "metric": "dice",
                        "value": base + 0.01 * c + 0.02 * seed,
                        "flag": "",
                        "seed": seed,
                    }
                )
    steps = {
        "assft_dkd_asd@round1+selective": 12,
        "assft_dkd_asd@round1+continue": 12,
        "assft_dkd_asd@round1": 6,
        "assft_random@round1": 6,
    }
    conf = aggregate.SummarySettings(n_boot=200, training_steps=steps)
    paired = aggregate.active_paired_comparisons(aggregate.seed_case_table(pd.DataFrame(rows)), conf)
    out = paired[paired["reference"] == "assft_dkd_asd@round1+selective"].set_index("method")
    control = out.loc["assft_dkd_asd@round1+continue"]
    assert control["mean_diff"] == pytest.approx(0.05) and control["compute_matched"]
    assert control["seed_sd"] == pytest.approx(0.0) and control["seeds_ref"] == control["seeds"] == 2
    assert not out.loc["assft_random@round1", "compute_matched"]
    # the query strategy alone is compared at equal labels and equal steps
    query = paired[paired["reference"] == "assft_dkd_asd@round1"].set_index("method")
    assert query.loc["assft_random@round1", "compute_matched"]
    assert query.loc["assft_random@round1", "mean_diff"] == pytest.approx(0.10)


# ------------------------------------------------ forgetting over seeds: BWT intervals and comparisons


def two_seed_sequence() -> pd.DataFrame:
    """liver then spleen under seeds 0 and 1, three test cases per task, one foreground class.

    medseqft keeps more of liver than sequential_ft; each cell below lists the three cases' Dice.
    """
    cells = {
        # (method, seed, step, task): per-case Dice
        ("medseqft", 0, "liver", "liver"): [0.80, 0.80, 0.80],
        ("medseqft", 0, "spleen", "liver"): [0.70, 0.60, 0.50],  # change -0.1, -0.2, -0.3: -0.2
        ("medseqft", 0, "spleen", "spleen"): [0.9, 0.9, 0.9],
        ("medseqft", 1, "liver", "liver"): [0.90, 0.90, 0.90],
        ("medseqft", 1, "spleen", "liver"): [0.90, 0.80, 0.70],  # change 0.0, -0.1, -0.2: -0.1
        ("medseqft", 1, "spleen", "spleen"): [0.9, 0.9, 0.9],
        ("sequential_ft", 0, "liver", "liver"): [0.80, 0.80, 0.80],
        ("sequential_ft", 0, "spleen", "liver"): [0.20, 0.10, 0.00],  # change -0.6, -0.7, -0.8: -0.7
        ("sequential_ft", 0, "spleen", "spleen"): [0.9, 0.9, 0.9],
        ("sequential_ft", 1, "liver", "liver"): [0.80, 0.80, 0.80],
        ("sequential_ft", 1, "spleen", "liver"): [0.40, 0.30, 0.20],  # change -0.4, -0.5, -0.6: -0.5
        ("sequential_ft", 1, "spleen", "spleen"): [0.9, 0.9, 0.9],
    }
    return pd.DataFrame([r for key, per_case in cells.items() for r in _seed_rows(*key, per_case)])


def test_bwt_has_its_seed_spread_and_an_interval_over_seeds_then_cases() -> None:
    df = two_seed_sequence()
    settings = aggregate.SummarySettings(n_boot=2000, order=("liver", "spleen"))
    forgetting = aggregate.sequential_matrix(aggregate.case_table(df), settings.order)
    seeded = aggregate.seed_case_table(df)
    bwt = aggregate.bwt_intervals(aggregate.backward_transfer(forgetting), forgetting, seeded, settings)
    bwt = bwt.set_index("method")
    assert bwt.loc["medseqft", "bwt"] == pytest.approx(-0.15)
    assert bwt.loc["medseqft", "seeds"] == 2 and bwt.loc["medseqft", "cases"] == 3
    assert bwt.loc["medseqft", "seed_sd"] == pytest.approx(np.std([-0.2, -0.1], ddof=1))
    # the per-seed, per-case changes span -0.3 .. 0.0: the interval lies inside and holds the mean
    assert -0.3 <= bwt.loc["medseqft", "ci_low"] < -0.15 < bwt.loc["medseqft", "ci_high"] <= 0.0
    assert bwt.loc["sequential_ft", "bwt"] == pytest.approx(-0.6)
    # one seed: the case interval, no seed spread
    one = seeded[seeded["seed"] == 0]
    bwt1 = aggregate.bwt_intervals(aggregate.backward_transfer(forgetting), forgetting, one, settings)
    assert (bwt1["seeds"] == 1).all() and bwt1["seed_sd"].isna().all() and bwt1["ci_low"].notna().all()
    # a chain one seed behind (seed 1 has no model after spleen yet): BWT only over seed 0, never the
    # mean of seed 0's R[n, j] against both seeds' R[j, j]
    behind = df[~((df["seed"] == 1) & (df["step"] == "spleen"))]
    r_behind = aggregate.sequential_matrix(aggregate.case_table(behind), settings.order)
    bwt2 = aggregate.bwt_intervals(
        aggregate.backward_transfer(r_behind), r_behind, aggregate.seed_case_table(behind), settings
    ).set_index("method")
    assert aggregate.backward_transfer(r_behind).set_index("method").loc["medseqft", "bwt"] == pytest.approx(-0.25)
    assert bwt2.loc["medseqft", "bwt"] == pytest.approx(-0.2) and bwt2.loc["medseqft", "seeds"] == 1


def test_forgetting_comparison_of_two_sequential_methods() -> None:
    df = two_seed_sequence()
    settings = aggregate.SummarySettings(n_boot=2000, order=("liver", "spleen"))
    forgetting = aggregate.sequential_matrix(aggregate.case_table(df), settings.order)
    table = aggregate.forgetting_comparisons(forgetting, aggregate.seed_case_table(df), settings)
    rows = table.set_index("quantity")
    assert set(table["method"]) == {"sequential_ft"} and set(table["reference"]) == {"medseqft"}
    # BWT: seed 0 -0.2 - (-0.7) = 0.5, seed 1 -0.1 - (-0.5) = 0.4 (the same on every case)
    assert rows.loc["bwt", "mean_diff"] == pytest.approx(0.45)
    assert rows.loc["bwt", "seed_sd"] == pytest.approx(np.std([0.5, 0.4], ddof=1))
    assert 0.4 - 1e-12 <= rows.loc["bwt", "ci_low"] < 0.45 < rows.loc["bwt", "ci_high"] <= 0.5 + 1e-12
    # retained Dice on liver after spleen: seed 0 0.6 - 0.1 = 0.5, seed 1 0.8 - 0.3 = 0.5
    assert rows.loc["retained", "mean_diff"] == pytest.approx(0.5)
    assert rows.loc["retained", "seeds_ref"] == 2 and rows.loc["retained", "cases"] == 3
    assert rows.loc["bwt", "tasks"] == 2 and rows.loc["bwt", "final_step"] == "spleen"
    # a chain that learned the tasks in the other order is not compared (task order inferred here)
    swap = {"liver": "spleen", "spleen": "liver"}
    reverse = df[df["method"] == "sequential_ft"]
    reverse = reverse.assign(method="reverse", step=reverse["step"].map(swap), task=reverse["task"].map(swap))
    both = pd.concat([df, reverse], ignore_index=True)
    inferred = aggregate.SummarySettings(n_boot=200)
    forgetting = aggregate.sequential_matrix(aggregate.case_table(both), inferred.order)
    table = aggregate.forgetting_comparisons(forgetting, aggregate.seed_case_table(both), inferred)
    assert set(table["method"]) == {"sequential_ft"}


def test_a_mean_over_tasks_weighs_every_task_the_same() -> None:
    # task a: 2 cases of difference 0.1; task b: 6 cases of 0.3; no noise: the mean over tasks is 0.2
    a, b = np.full((2, 2), 0.1), np.full((2, 6), 0.3)
    mean, low, high, seed_sd = aggregate.hierarchical_bootstrap_tasks(
        [a, b], [np.zeros_like(a), np.zeros_like(b)], 500, 0.95, np.random.default_rng(0)
    )
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2) and high == pytest.approx(0.2)
    assert seed_sd == pytest.approx(0.0)
    # one task: the same draws as hierarchical_bootstrap_ci
    rng = np.random.default_rng(7)
    ref, other = rng.random((3, 9)), rng.random((3, 9))
    for resampling in ("shared", "per_seed"):
        one = aggregate.hierarchical_bootstrap_tasks(
            [ref], [other], 300, 0.9, np.random.default_rng(2), case_resampling=resampling
        )
        assert one == aggregate.hierarchical_bootstrap_ci(
            ref, other, 300, 0.9, np.random.default_rng(2), case_resampling=resampling
        )
    with pytest.raises(ValueError, match="one matrix per task"):
        aggregate.hierarchical_bootstrap_tasks([a], [], 10, 0.9, np.random.default_rng(0))


def test_summary_shows_the_bwt_interval_and_the_forgetting_comparison(tmp_path: Path) -> None:
    df = two_seed_sequence()
    paths = []
    for (method, seed, step), part in df.groupby(["method", "seed", "step"]):
        folder = tmp_path / "eval" / f"{method}/seed{seed}" / step
        write_parquet(part.reset_index(drop=True), folder / "metrics.parquet", make_provenance("evaluate", {}))
        paths.append(folder / "metrics.parquet")
    out = tmp_path / "summary"
    aggregate.run(paths, out, {"n_boot": 400, "order": ["liver", "spleen"]})
    md = (out / "summary.md").read_text()
    assert "| method | BWT | seeds | seed sd | 95 % CI | tasks | final step |" in md
    assert "| medseqft | -0.150 | 2 | 0.071 | [" in md
    assert "### Forgetting compared: medseqft − each sequential method" in md
    assert "| sequential_ft | BWT | 2 / 2 | 3 | +0.450 | [" in md
    assert "| sequential_ft | retained | 2 / 2 | 3 | +0.500 | [" in md
    assert read_parquet(out / "forgetting_paired.parquet").shape[0] == 2
