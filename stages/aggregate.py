"""Compute each summary number once: methods x tasks tables, forgetting and BWT, paired CIs, budget and loss tables.

Tables are Parquet under the summary folder (figures and the report read them, never recompute) and a
Markdown + HTML rendering of the same numbers. Conventions (docs/methods.md §0, §3):

- a case's value of a metric is the mean over its foreground classes;
- a method is scored on a task with the model of the step that learned it (its *own step*: step ==
  task, or ``all`` for a multi-task model) — the layout of the MedSeqFT and ASSFT papers' tables;
- methods evaluated after several steps (rows with step != task) give the sequential matrix
  R[i, j] = mean Dice on task j after step i and backward transfer
  BWT = 1/(n-1) Σ_{j<n} (R[n, j] − R[j, j]) (Lopez-Paz & Ranzato, Gradient Episodic Memory, NeurIPS 2017);
- a model trained under several training seeds (the metrics' ``seed`` column) is summarised by the mean
  over seeds and its spread (sd over seeds of the per-seed mean over cases); paired comparisons resample
  seeds, then cases (:func:`hierarchical_bootstrap_ci`), so an interval is a method effect, not the case
  noise of one run; each row says how many optimiser steps made the two models (compute-matched or not).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.errors import InputError, run_cli
from stages.core.io import atomic_path, make_provenance, read_parquet, save_json, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.methods import ACTIVE_PREFIX, active_method
from stages.core.metric_names import METRIC_NAMES

__all__ = [
    "MULTITASK_STEP",
    "SummarySettings",
    "case_table",
    "own_step",
    "summary_table",
    "sequential_matrix",
    "backward_transfer",
    "bwt_intervals",
    "forgetting_comparisons",
    "bootstrap_mean_ci",
    "hierarchical_bootstrap_ci",
    "hierarchical_bootstrap_tasks",
    "seed_case_table",
    "paired_comparisons",
    "budget_table",
    "TrainLog",
    "parse_train_log",
    "training_log_table",
    "render_markdown",
    "render_html",
    "run",
    "main",
]

MULTITASK_STEP = "all"
SUMMARY_METRICS = METRIC_NAMES
PAIRED_METRICS = ("dice", "hd95")
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "nsd": "NSD"}
METRIC_COLUMNS = ("method", "step", "task", "case", "class", "metric", "value")
BUDGET_COLUMNS = ("strategy", "round", "labels", "seed", "dice")
LOG_STAGES = ("train", "teacher", "adapter", "pretrain")

FORGETTING_COLUMNS = ["method", "step", "task", "step_index", "task_index", "dice", "cases"]
BWT_COLUMNS = ["method", "bwt", "tasks", "final_step", "seeds", "cases", "seed_sd", "ci_low", "ci_high", "ci"]
# what the forgetting comparison compares: the change on the earlier tasks, and where they end up
# (bwt: R[n, j] − R[j, j]; retained: R[n, j]) -> the name the summary shows
FORGETTING_QUANTITIES = {"bwt": "BWT", "retained": "retained"}
# a paired difference with its interval: every comparison table has these columns
INTERVAL_COLUMNS = ["cases", "mean_diff", "ci_low", "ci_high", "ci", "n_boot", "seed", "seeds_ref", "seeds", "seed_sd"]
PAIRED_COLUMNS = [
    "reference",
    "method",
    "task",
    "step",
    "metric",
    *INTERVAL_COLUMNS,
    "steps_ref",
    "steps",
    "compute_matched",
]
FORGETTING_PAIRED_COLUMNS = ["reference", "method", "quantity", "tasks", "final_step", *INTERVAL_COLUMNS]
CASE_RESAMPLING = ("shared", "per_seed")
BUDGET_OUT_COLUMNS = ["strategy", "round", "labels", "dice_mean", "dice_std", "seeds"]
LOG_KEYS = ["method", "step", "stage", "iteration"]


@dataclass(frozen=True)
class SummarySettings:
    """Settings of the summary (the config's ``summary`` section plus the run seed and task order).

    Attributes:
        reference: method every other method is compared against in the paired comparison
            (``medseqft``; later ``assft`` against its baselines). Absent from the metrics: no comparison.
        n_boot: bootstrap resamples of the paired mean difference.
        ci: coverage of the percentile bootstrap interval.
        seed: base seed of the bootstrap; each comparison derives its own stream from it and its names,
            so adding a method never changes another comparison's interval.
        order: the sequential task order (steps of R); empty = inferred from the metrics (a later
            step is evaluated on more tasks).
        labels_per_round: ASSFT's labelling budget per round; when > 0 the budget curves are also
            read from the metrics of the active-learning chains (method ``assft_<strategy>``, step
            ``round<r>``: the model fine-tuned on the labels of rounds 0..r).
        training_steps: optimiser steps of the training jobs that made each compared model from its start
            model, by method (``medseqft``: teacher + student) or by ``method@step`` for the active-learning
            models (``assft_dkd_asd@round1+selective``); the workflow passes them. A paired row whose two
            models have the same known count is marked compute-matched.
        case_resampling: how the hierarchical bootstrap draws cases after the seeds: ``shared`` (one draw of
            the test cases per resample, used by every drawn seed: the same cases are tested under every
            seed) or ``per_seed`` (an independent draw within each drawn seed, the nested scheme).
    """

    reference: str = "medseqft"
    n_boot: int = 2000
    ci: float = 0.95
    seed: int = 0
    order: tuple[str, ...] = field(default_factory=tuple)
    labels_per_round: int = 0
    training_steps: Mapping[str, int] = field(default_factory=dict)
    case_resampling: str = "shared"

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> SummarySettings:
        """Build from the ``--settings`` JSON object, refusing unknown keys and bad values by name."""
        known = {"reference", "n_boot", "ci", "seed", "order", "labels_per_round", "training_steps", "case_resampling"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError("--settings", f"unknown keys {unknown} (known: {sorted(known)})")
        convert = {"order": lambda v: tuple(v or ()), "training_steps": lambda v: dict(v or {})}
        out = cls(**{k: convert.get(k, lambda v: v)(v) for k, v in settings.items()})
        if not isinstance(out.n_boot, int) or out.n_boot < 1:
            raise InputError("--settings", f"n_boot must be a positive integer, got {out.n_boot!r}")
        if not 0 < float(out.ci) < 1:
            raise InputError("--settings", f"ci must lie in (0, 1), got {out.ci!r}")
        if out.case_resampling not in CASE_RESAMPLING:
            raise InputError(
                "--settings", f"case_resampling must be one of {list(CASE_RESAMPLING)}, got {out.case_resampling!r}"
            )
        bad = {k: v for k, v in out.training_steps.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise InputError("--settings", f"training_steps must map names to step counts >= 0, got {bad}")
        return out


# ------------------------------------------------------------------------------------------ tables


def case_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per method, step, task, case and metric: the mean over the case's foreground classes.

    A model evaluated under several seeds (active-learning chains) gets the mean over its seeds too.

    ``own_step`` marks the rows scored with the model of the step that learned the task (see :func:`own_step`).

    Args:
        metrics: the long metrics table of ``stages.evaluate`` (one row per case, class and metric).
    """
    fg = metrics[metrics["class"] >= 1]
    out = (
        fg.groupby(["method", "step", "task", "case", "metric"], sort=True)["value"]
        .agg(value="mean", classes="count")
        .reset_index()
    )
    out["classes"] = out["classes"].astype("int64")
    # marks the rows of the methods x tasks table, so figures select them without re-deriving the rule
    out["own_step"] = _own_mask(out)
    return out


def own_step(cases: pd.DataFrame) -> pd.DataFrame:
    """Rows scored with the model of the step that learned the task: step == task, else the multi-task step ``all``."""
    return cases[_own_mask(cases)].sort_values(["method", "task", "metric", "case"]).reset_index(drop=True)


def _own_mask(cases: pd.DataFrame) -> np.ndarray:
    own = (cases["step"] == cases["task"]).to_numpy()
    have = set(zip(cases["method"][own], cases["task"][own]))
    multi = (cases["step"] == MULTITASK_STEP).to_numpy() & np.array(
        [(m, t) not in have for m, t in zip(cases["method"], cases["task"])], dtype=bool
    )
    return own | multi


def seed_case_table(metrics: pd.DataFrame, default_seed: int = 0) -> pd.DataFrame:
    """As :func:`case_table` but one row per training seed too (column ``seed``): the unit of the seed spread.

    Metrics without a ``seed`` column (or with an empty one) count as one run under ``default_seed``.
    """
    fg = metrics[metrics["class"] >= 1]
    seeds = fg["seed"] if "seed" in fg.columns else pd.Series(np.nan, index=fg.index)
    fg = fg.assign(seed=pd.to_numeric(seeds, errors="coerce").fillna(default_seed).astype("int64"))
    out = fg.groupby(["method", "step", "task", "seed", "case", "metric"], sort=True)["value"].mean().reset_index()
    out["own_step"] = _own_mask(out)
    return out


def summary_table(metrics: pd.DataFrame, default_seed: int = 0) -> pd.DataFrame:
    """Mean, sample std (ddof 1; NaN for one case) and case count per method, task and metric, own-step model.

    With several training seeds a case's value is its mean over seeds; ``seeds`` counts them and
    ``seed_std`` is the sample std over seeds of each seed's mean over cases (NaN for one seed).

    Args:
        metrics: the long metrics table (case, class, metric rows) of every evaluated model.
        default_seed: the seed of metrics without a ``seed`` column.
    """
    own = own_step(case_table(metrics))
    out = (
        own.groupby(["method", "task", "metric"], sort=True)
        .agg(step=("step", "first"), mean=("value", "mean"), std=("value", "std"), cases=("value", "count"))
        .reset_index()
    )
    out["cases"] = out["cases"].astype("int64")
    per_seed = seed_case_table(metrics, default_seed)
    per_seed = per_seed[per_seed["own_step"]]
    per_seed = per_seed.groupby(["method", "task", "metric", "seed"], sort=True)["value"].mean().reset_index()
    spread = (
        per_seed.groupby(["method", "task", "metric"], sort=True)["value"]
        .agg(seeds="count", seed_std="std")
        .reset_index()
    )
    out = out.merge(spread, on=["method", "task", "metric"], how="left")
    out["seeds"] = out["seeds"].astype("int64")
    return out[["method", "step", "task", "metric", "mean", "std", "cases", "seeds", "seed_std"]]


def _step_order(method_cases: pd.DataFrame, order: Sequence[str]) -> list[str]:
    steps = set(method_cases["step"]) - {MULTITASK_STEP}
    if order:
        stray = sorted(steps - set(order))
        if stray:
            raise InputError(
                "--metrics",
                f"method {method_cases['method'].iloc[0]} has steps {stray} outside the task order {list(order)}",
            )
        return [s for s in order if s in steps]
    # without an order, a later step has been evaluated on more tasks (every earlier task plus its own)
    width = method_cases.groupby("step")["task"].nunique()
    return sorted(steps, key=lambda s: (int(width[s]), s))


def _sequence_dice(cases: pd.DataFrame) -> pd.DataFrame:
    dice = cases[cases["metric"] == "dice"]
    # a step of a sequential method is named after the task it learned; other step names (the multi-task
    # "all", active-learning rounds "round0" ...) never form R
    return dice[dice["step"].isin(set(dice["task"]))]


def _sequences(cases: pd.DataFrame, order: Sequence[str] = ()) -> dict[str, list[str]]:
    """Methods that have R (evaluated after a later step on an earlier task) -> their steps in order."""
    dice = _sequence_dice(cases)
    seq = dice[dice["step"] != dice["task"]]
    return {m: _step_order(dice[dice["method"] == m], order) for m in sorted(seq["method"].unique())}


def sequential_matrix(cases: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """R[i, j] = mean Dice over test cases on task j with the model after step i, long format.

    Only methods evaluated at several steps named after tasks (some row with step != task where the step
    is a task name) have R; the multi-task step ``all`` and active-learning rounds are left out.

    Args:
        cases: the per-case table of :func:`case_table`.
        order: the task order; empty = inferred (see :class:`SummarySettings`).
    """
    dice = _sequence_dice(cases)
    rows = []
    for method, steps in _sequences(cases, order).items():
        mc = dice[dice["method"] == method]
        for i, step in enumerate(steps):
            for j, task in enumerate(steps[: i + 1]):
                cell = mc[(mc["step"] == step) & (mc["task"] == task)]["value"]
                if cell.empty:
                    raise InputError(
                        "--metrics",
                        f"method {method}: the model after step {step} has no Dice on "
                        f"earlier task {task}; R[i, j] needs every task j <= i",
                    )
                rows.append(
                    {
                        "method": method,
                        "step": step,
                        "task": task,
                        "step_index": i,
                        "task_index": j,
                        "dice": float(cell.mean()),
                        "cases": int(cell.count()),
                    }
                )
    return pd.DataFrame(rows, columns=FORGETTING_COLUMNS)


def backward_transfer(forgetting: pd.DataFrame) -> pd.DataFrame:
    """BWT per method: mean over j < n of R[n, j] − R[j, j] (Lopez-Paz & Ranzato 2017); negative = forgetting.

    Args:
        forgetting: the long R of :func:`sequential_matrix`.
    """
    rows = []
    for method, grp in forgetting.groupby("method", sort=True):
        n = int(grp["step_index"].max())
        if n < 1:
            continue
        r = {(int(a), int(b)): float(v) for a, b, v in zip(grp["step_index"], grp["task_index"], grp["dice"])}
        bwt = float(np.mean([r[(n, j)] - r[(j, j)] for j in range(n)]))
        final = grp[grp["step_index"] == n]["step"].iloc[0]
        rows.append({"method": method, "bwt": bwt, "tasks": n + 1, "final_step": final})
    return pd.DataFrame(rows, columns=BWT_COLUMNS[:4])


def _stream(seed: int, *names: str) -> np.random.Generator:
    # one stream per comparison, keyed by its names: results do not depend on which others exist
    digest = hashlib.sha256("\0".join(names).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")]))


def bootstrap_mean_ci(diffs: np.ndarray, n_boot: int, ci: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (Efron & Tibshirani 1993, ch. 13).

    Args:
        diffs: one difference per case.
        n_boot: resamples (cases drawn with replacement).
        ci: coverage, e.g. 0.95.
        rng: the generator that draws the resamples.
    """
    d = np.asarray(diffs, dtype=np.float64)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def hierarchical_bootstrap_ci(
    ref: np.ndarray,
    other: np.ndarray,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
    paired_seeds: bool = True,
    case_resampling: str = "shared",
) -> tuple[float, float, float, float]:
    """Percentile interval of the mean difference ``ref − other`` that resamples training seeds, then cases.

    Each resample draws seeds with replacement (the same draw for both models when ``paired_seeds``: the
    two share each seed's run, e.g. ASSFT's semi-supervised model and its equal-steps control continue
    the same round model; otherwise each model's seeds are drawn on their own), then test cases with
    replacement. ``shared`` draws the cases once per resample for every drawn seed (the test cases are
    the same under every seed, a crossed design, and the case term is then not divided by the number of
    seeds); ``per_seed`` draws them anew within each drawn seed (the nested scheme). With one seed on
    both sides no seed is drawn: the result equals :func:`bootstrap_mean_ci` on the case differences.

    Args:
        ref, other: per-seed, per-case values, shape (seeds, cases), the same cases in the same column
            order (rows of ``ref`` and ``other`` are the same seeds, in order, when ``paired_seeds``).
        n_boot: resamples.
        ci: coverage, e.g. 0.95.
        rng: the generator that draws the resamples.
        paired_seeds: whether row k of ``ref`` and of ``other`` come from the same seed.
        case_resampling: ``shared`` or ``per_seed`` (see above).

    Returns:
        (mean difference, interval low, interval high, sample sd over seeds of the per-seed mean difference;
        NaN unless the seeds are paired and there are several).
    """
    return hierarchical_bootstrap_tasks([ref], [other], n_boot, ci, rng, paired_seeds, case_resampling)


def hierarchical_bootstrap_tasks(
    ref: Sequence[np.ndarray],
    other: Sequence[np.ndarray],
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
    paired_seeds: bool = True,
    case_resampling: str = "shared",
) -> tuple[float, float, float, float]:
    """:func:`hierarchical_bootstrap_ci` of a mean over tasks: each task weighs the same, whatever its cases.

    The quantity is mean over tasks k of (mean over seeds and cases of ``ref[k] − other[k]``), as BWT
    averages R[n, j] − R[j, j] over the earlier tasks j. A resample draws the seeds once (the same seeds
    for every task: they are the same runs) and each task's test cases on their own. With one task this
    is :func:`hierarchical_bootstrap_ci`, draw for draw.

    Args:
        ref, other: one (seeds, cases_k) matrix per task; every task's matrices have the same seed rows.
        n_boot, ci, rng, paired_seeds, case_resampling: as :func:`hierarchical_bootstrap_ci`.
    """
    if len(ref) != len(other) or not ref:
        raise ValueError(f"ref and other need one matrix per task, got {len(ref)} and {len(other)}")
    r = [np.asarray(m, dtype=np.float64) for m in ref]
    o = [np.asarray(m, dtype=np.float64) for m in other]
    for a, b in zip(r, o):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
            raise ValueError(f"ref and other must be (seeds, cases) with the same cases, got {a.shape} and {b.shape}")
    if len({a.shape[0] for a in r}) != 1 or len({b.shape[0] for b in o}) != 1:
        raise ValueError("every task's matrix must hold the same seeds")
    if case_resampling not in CASE_RESAMPLING:
        raise ValueError(f"case_resampling must be one of {CASE_RESAMPLING}, got {case_resampling!r}")
    n_ref, n_other = r[0].shape[0], o[0].shape[0]
    if paired_seeds and n_ref != n_other:
        raise ValueError(f"paired seeds need as many seeds on both sides, got {n_ref} and {n_other}")
    alpha = (1.0 - ci) / 2.0
    if n_ref == 1 and n_other == 1:
        diffs = [a[0] - b[0] for a, b in zip(r, o)]
        per_task = []
        for d in diffs:
            idx = rng.integers(0, d.size, size=(n_boot, d.size))
            per_task.append(d[idx].mean(axis=1))
        means = np.mean(per_task, axis=0)
        low, high = np.quantile(means, [alpha, 1.0 - alpha])
        return float(np.mean([d.mean() for d in diffs])), float(low), float(high), float("nan")

    def draw_seeds(n_seeds: int) -> np.ndarray:
        return rng.integers(0, n_seeds, size=(n_boot, n_seeds))

    def resampled(values: np.ndarray, seeds: np.ndarray, cases: np.ndarray | None) -> np.ndarray:
        # the mean over the drawn seeds and the drawn cases, per resample
        if cases is not None:  # shared: one case draw for every drawn seed
            weights = np.zeros((n_boot, values.shape[0]))
            np.add.at(weights, (np.arange(n_boot)[:, None], seeds), 1.0 / seeds.shape[1])
            per_case = weights @ values  # (n_boot, cases): mean over the drawn seeds
            return np.take_along_axis(per_case, cases, axis=1).mean(axis=1)
        n_cases = values.shape[1]
        within = rng.integers(0, n_cases, size=(*seeds.shape, n_cases))
        return values[seeds[:, :, None], within].mean(axis=(1, 2))

    def case_draw(n_cases: int) -> np.ndarray | None:
        return rng.integers(0, n_cases, size=(n_boot, n_cases)) if case_resampling == "shared" else None

    if paired_seeds:
        d = [a - b for a, b in zip(r, o)]
        seeds = draw_seeds(n_ref)
        means = np.mean([resampled(dk, seeds, case_draw(dk.shape[1])) for dk in d], axis=0)
        per_seed = np.mean([dk.mean(axis=1) for dk in d], axis=0)
        point, seed_sd = float(np.mean([dk.mean() for dk in d])), float(per_seed.std(ddof=1))
    else:
        seeds_r, seeds_o = draw_seeds(n_ref), draw_seeds(n_other)
        per_task = []
        for a, b in zip(r, o):
            cases = case_draw(a.shape[1])
            per_task.append(resampled(a, seeds_r, cases) - resampled(b, seeds_o, cases))
        means = np.mean(per_task, axis=0)
        point, seed_sd = float(np.mean([a.mean() - b.mean() for a, b in zip(r, o)])), float("nan")
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return point, float(low), float(high), seed_sd


def _seed_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Values of one model as a seed x case matrix (rows: seeds in order, columns: cases in order)."""
    return rows.pivot_table(index="seed", columns="case", values="value", aggfunc="mean").sort_index()


def _compare(
    ref_rows: pd.DataFrame, other_rows: pd.DataFrame, settings: SummarySettings, names: Sequence[str]
) -> dict[str, Any] | None:
    """One paired row (mean, interval, seed counts and spread) of ref − other on their common cases."""
    a, b = _seed_matrix(ref_rows), _seed_matrix(other_rows)
    # a case counts when every seed of both models has it
    common = sorted(set(a.columns[a.notna().all()]) & set(b.columns[b.notna().all()]))
    if not common:
        return None
    paired = list(a.index) == list(b.index)
    mean, low, high, seed_sd = hierarchical_bootstrap_ci(
        a[common].to_numpy(),
        b[common].to_numpy(),
        settings.n_boot,
        settings.ci,
        _stream(settings.seed, *names),
        paired_seeds=paired,
        case_resampling=settings.case_resampling,
    )
    return _interval_row(len(common), (mean, low, high, seed_sd), len(a.index), len(b.index), settings)


def _interval_row(
    cases: int, result: tuple[float, float, float, float], seeds_ref: int, seeds: int, settings: SummarySettings
) -> dict[str, Any]:
    """The :data:`INTERVAL_COLUMNS` of one comparison from a bootstrap's (mean, low, high, seed sd)."""
    mean, low, high, seed_sd = result
    return {
        "cases": int(cases),
        "mean_diff": mean,
        "ci_low": low,
        "ci_high": high,
        "ci": float(settings.ci),
        "n_boot": int(settings.n_boot),
        "seed": int(settings.seed),
        "seeds_ref": int(seeds_ref),
        "seeds": int(seeds),
        "seed_sd": seed_sd,
    }


def _steps_of(settings: SummarySettings, ref: str, other: str) -> dict[str, Any]:
    known = settings.training_steps
    mine, theirs = known.get(ref), known.get(other)
    return {
        "steps_ref": -1 if mine is None else int(mine),
        "steps": -1 if theirs is None else int(theirs),
        "compute_matched": mine is not None and mine == theirs,
    }


def _forgetting_cells(
    seeded: pd.DataFrame, method: str, steps: Sequence[str]
) -> tuple[list[int], dict[str, tuple[pd.DataFrame, pd.DataFrame]]] | None:
    """Per earlier task j: Dice after the last step (R[n, j]) and after step j (R[j, j]), seed x case.

    Only the seeds that have every cell, and per task the cases that every such seed has at both steps.
    None when no seed or some task no case is left.
    """
    dice = seeded[(seeded["method"] == method) & (seeded["metric"] == "dice")]
    final = steps[-1]
    raw = {
        task: (
            _seed_matrix(dice[(dice["step"] == final) & (dice["task"] == task)]),
            _seed_matrix(dice[(dice["step"] == task) & (dice["task"] == task)]),
        )
        for task in steps[:-1]
    }
    seeds = sorted(set.intersection(*[set(a.index) & set(b.index) for a, b in raw.values()]))
    if not seeds:
        return None
    cells = {}
    for task, (after, own) in raw.items():
        a, b = after.loc[seeds], own.loc[seeds]
        common = sorted(set(a.columns[a.notna().all()]) & set(b.columns[b.notna().all()]))
        if not common:
            return None
        cells[task] = (a[common], b[common])
    return seeds, cells


def _forgetting_steps(forgetting: pd.DataFrame) -> dict[str, list[str]]:
    return {
        method: grp.sort_values(["step_index", "task_index"])["step"].drop_duplicates().tolist()
        for method, grp in forgetting.groupby("method", sort=True)
    }


def bwt_intervals(
    bwt: pd.DataFrame, forgetting: pd.DataFrame, seeded: pd.DataFrame, settings: SummarySettings
) -> pd.DataFrame:
    """BWT with its training-seed spread and a percentile interval that resamples seeds, then cases.

    ``bwt`` is recomputed over the seeds that have every cell of the chain (the R table averages each cell
    over whichever seeds have it, which differ while a run is incomplete).

    Per seed and case, R[n, j] − R[j, j] on each earlier task j (the same test cases are scored after both
    steps); the interval is :func:`hierarchical_bootstrap_tasks` of that change against zero (tasks weigh
    equally, as in BWT). ``seed_sd`` is the sample sd of the per-seed BWT (NaN for one seed); one seed
    gives the case bootstrap, so its interval says nothing about run-to-run variation.

    Args:
        bwt: :func:`backward_transfer`'s table.
        forgetting: :func:`sequential_matrix`'s R (its step order).
        seeded: the per-seed, per-case table of :func:`seed_case_table`.
        settings: ``n_boot``, ``ci``, ``seed``, ``case_resampling``.
    """
    out = bwt.copy()
    for col in BWT_COLUMNS[4:]:
        out[col] = np.nan
    steps = _forgetting_steps(forgetting)
    for i, method in enumerate(out["method"]):
        found = _forgetting_cells(seeded, method, steps[method])
        if found is None:
            continue
        seeds, cells = found
        change = [(a - b).to_numpy() for a, b in cells.values()]
        point, low, high, seed_sd = hierarchical_bootstrap_tasks(
            change,
            [np.zeros_like(c) for c in change],
            settings.n_boot,
            settings.ci,
            _stream(settings.seed, method, "bwt"),
            case_resampling=settings.case_resampling,
        )
        # BWT over the seeds whose chain is complete, so that a run stopped half-way (or one seed behind)
        # never pairs R[n, j] of some seeds with R[j, j] of others; equal to R's BWT once every seed is in
        out.loc[i, ["bwt", "seeds", "cases", "seed_sd", "ci_low", "ci_high", "ci"]] = [
            point,
            len(seeds),
            sum(c.shape[1] for c in change),
            seed_sd,
            low,
            high,
            settings.ci,
        ]
    return out.astype({"seeds": "Int64", "cases": "Int64"})


def _forgetting_values(cell: tuple[pd.DataFrame, pd.DataFrame], cases: list[str], quantity: str) -> np.ndarray:
    after, own = cell[0][cases], cell[1][cases]
    return (after - own).to_numpy() if quantity == "bwt" else after.to_numpy()


def forgetting_comparisons(forgetting: pd.DataFrame, seeded: pd.DataFrame, settings: SummarySettings) -> pd.DataFrame:
    """Reference − each other sequential method of the same task order: BWT and the Dice kept on earlier tasks.

    ``bwt``: the difference of (R[n, j] − R[j, j]), how much less (positive) the reference forgets;
    ``retained``: the difference of R[n, j], where the earlier tasks end up (it also holds how well each
    method learned them). Per earlier task on the cases both methods have, averaged over tasks; intervals
    as :func:`hierarchical_bootstrap_tasks` (seeds paired where both ran the same seeds). This is the
    comparison of buffers (MDS, random, none) and of retention against sequential FT, EWC or LwF.
    """
    steps = _forgetting_steps(forgetting)
    ref_name = settings.reference
    if ref_name not in steps:
        return pd.DataFrame(columns=FORGETTING_PAIRED_COLUMNS)
    mine = _forgetting_cells(seeded, ref_name, steps[ref_name])
    if mine is None:
        return pd.DataFrame(columns=FORGETTING_PAIRED_COLUMNS)
    rows = []
    for method, order in steps.items():
        if method == ref_name or order != steps[ref_name]:
            continue
        theirs = _forgetting_cells(seeded, method, order)
        if theirs is None:
            continue
        (seeds_a, a), (seeds_b, b) = mine, theirs
        common = {t: sorted(set(a[t][0].columns) & set(b[t][0].columns)) for t in a}
        if not all(common.values()):
            continue
        for quantity in FORGETTING_QUANTITIES:
            result = hierarchical_bootstrap_tasks(
                [_forgetting_values(a[t], common[t], quantity) for t in a],
                [_forgetting_values(b[t], common[t], quantity) for t in a],
                settings.n_boot,
                settings.ci,
                _stream(settings.seed, ref_name, method, "forgetting", quantity),
                paired_seeds=seeds_a == seeds_b,
                case_resampling=settings.case_resampling,
            )
            rows.append(
                {
                    "reference": ref_name,
                    "method": method,
                    "quantity": quantity,
                    "tasks": len(order),
                    "final_step": order[-1],
                    **_interval_row(sum(len(c) for c in common.values()), result, len(seeds_a), len(seeds_b), settings),
                }
            )
    return pd.DataFrame(rows, columns=FORGETTING_PAIRED_COLUMNS)


def paired_comparisons(cases: pd.DataFrame, settings: SummarySettings) -> pd.DataFrame:
    """Reference − other on the same test cases, per task and metric, own-step models: mean and bootstrap CI.

    The interval resamples training seeds, then cases (:func:`hierarchical_bootstrap_ci`; one seed: the
    case bootstrap); seeds are paired when both methods ran under the same seeds.

    Args:
        cases: the per-seed, per-case table of :func:`seed_case_table` (a table without ``seed``, as
            :func:`case_table` writes it, counts as one seed).
        settings: ``reference``, ``n_boot``, ``ci``, ``seed``, ``training_steps``, ``case_resampling``.
    """
    own = own_step(cases if "seed" in cases.columns else cases.assign(seed=settings.seed))
    own = own[own["metric"].isin(PAIRED_METRICS)]
    ref = own[own["method"] == settings.reference]
    rows = []
    for (method, task, metric), other in own[own["method"] != settings.reference].groupby(
        ["method", "task", "metric"], sort=True
    ):
        mine = ref[(ref["task"] == task) & (ref["metric"] == metric)]
        if mine.empty:
            continue
        row = _compare(mine, other, settings, (settings.reference, method, task, metric))
        if row is None:
            continue
        rows.append(
            {
                "reference": settings.reference,
                "method": method,
                "task": task,
                "step": str(other["step"].iloc[0]),
                "metric": metric,
                **row,
                **_steps_of(settings, settings.reference, method),
            }
        )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


ACTIVE_REFERENCE = active_method("dkd_asd")


def last_round_rows(cases: pd.DataFrame) -> tuple[str | None, pd.DataFrame]:
    """The active-learning chains' rows of the last query round: ``round<R>`` and its continuations.

    Returns ``("round<R>", rows)`` where rows are every ``assft_*`` model at step ``round<R>`` or
    ``round<R>+<variant>`` (semi-supervised, continued), or ``(None, no rows)`` without any round.
    """
    active = cases[cases["method"].str.startswith(ACTIVE_PREFIX)]
    rounds = active["step"].str.extract(r"^round(\d+)", expand=False).dropna().astype(int)
    if rounds.empty:
        return None, active.iloc[:0]
    last = f"round{rounds.max()}"
    return last, active[(active["step"] == last) | active["step"].str.startswith(f"{last}+")]


def active_paired_comparisons(cases: pd.DataFrame, settings: SummarySettings) -> pd.DataFrame:
    """ASSFT against its baselines on the same test cases after the last query round (docs/methods.md §2).

    The reference is ASSFT's final model: the DKD+ASD chain after the last round with selective
    semi-supervision (``round<R>+selective``; without it, ``round<R>``). It is compared with every other
    strategy's last-round models (random and the other query baselines, under their own seeds) and with
    its own semi-supervision baselines (``+all``; none = ``round<R>``; ``+continue``, the equal-steps
    control: the round model fine-tuned as long again on the labelled cases only). Intervals resample
    the chains' seeds, then cases (paired by seed where both ran the same seeds). Rows name ``method@step``.

    Where the reference is semi-supervised, the DKD+ASD chain's own last-round model (``round<R>``) is a
    second reference against the other strategies' last-round models: the same labels and the same
    training steps, so it isolates the query strategy, as ``+continue`` isolates the pseudo-labels.
    """
    if "seed" not in cases.columns:
        cases = cases.assign(seed=settings.seed)
    last, at_last = last_round_rows(cases[cases["metric"].isin(PAIRED_METRICS)])
    if last is None:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    mine = at_last[at_last["method"] == ACTIVE_REFERENCE]
    ref_step = f"{last}+selective" if (mine["step"] == f"{last}+selective").any() else last
    ref = mine[mine["step"] == ref_step]
    others = at_last[~((at_last["method"] == ACTIVE_REFERENCE) & (at_last["step"] == ref_step))]
    rows = _active_rows(f"{ACTIVE_REFERENCE}@{ref_step}", ref, others, settings)
    if ref_step != last:
        query_only = others[(others["step"] == last) & (others["method"] != ACTIVE_REFERENCE)]
        rows += _active_rows(f"{ACTIVE_REFERENCE}@{last}", mine[mine["step"] == last], query_only, settings)
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _active_rows(
    reference: str, ref: pd.DataFrame, others: pd.DataFrame, settings: SummarySettings
) -> list[dict[str, Any]]:
    """Paired rows of one active-learning reference model against each ``method@step`` in ``others``."""
    rows = []
    for (method, step, task, metric), other in others.groupby(["method", "step", "task", "metric"], sort=True):
        mine_rows = ref[(ref["task"] == task) & (ref["metric"] == metric)]
        if mine_rows.empty:
            continue
        name = f"{method}@{step}"
        row = _compare(mine_rows, other, settings, (reference, name, task, metric))
        if row is None:
            continue
        rows.append(
            {
                "reference": reference,
                "method": name,
                "task": task,
                "step": step,
                "metric": metric,
                **row,
                **_steps_of(settings, reference, name),
            }
        )
    return rows


def active_rounds(metrics: pd.DataFrame, labels_per_round: int) -> pd.DataFrame:
    """Rows ``strategy, round, labels, seed, dice`` of the ASSFT chains' round models.

    A round's Dice is the mean over test cases of the case's mean foreground-class Dice, per seed.

    Args:
        metrics: the long metrics table.
        labels_per_round: labels revealed per round (round r has used (r + 1) times this many).
    """
    if labels_per_round <= 0:
        return pd.DataFrame(columns=BUDGET_COLUMNS)
    dice = metrics[
        (metrics["metric"] == "dice") & (metrics["class"] >= 1) & metrics["method"].str.startswith(ACTIVE_PREFIX)
    ]
    rnd = dice["step"].str.extract(r"^round(\d+)$", expand=False)
    dice = dice[rnd.notna()].assign(round=rnd.dropna().astype(int))
    if dice.empty:
        return pd.DataFrame(columns=BUDGET_COLUMNS)
    per_case = dice.groupby(["method", "round", "seed", "case"])["value"].mean().reset_index()
    per_seed = per_case.groupby(["method", "round", "seed"])["value"].mean().reset_index()
    return pd.DataFrame(
        {
            "strategy": per_seed["method"].str.slice(len(ACTIVE_PREFIX)),
            "round": per_seed["round"].astype("int64"),
            "labels": ((per_seed["round"] + 1) * labels_per_round).astype("int64"),
            "seed": per_seed["seed"].astype("int64"),
            "dice": per_seed["value"].astype(float),
        }
    )[list(BUDGET_COLUMNS)]


def budget_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """Label-budget curve: mean and std of Dice over seeds per strategy, round and number of labels.

    Args:
        rounds: active-learning rounds, columns ``strategy, round, labels, seed, dice``.
    """
    if rounds.empty:
        return pd.DataFrame(columns=BUDGET_OUT_COLUMNS)
    out = (
        rounds.groupby(["strategy", "round", "labels"], sort=True)
        .agg(dice_mean=("dice", "mean"), dice_std=("dice", "std"), seeds=("seed", "nunique"))
        .reset_index()
    )
    out["seeds"] = out["seeds"].astype("int64")
    return out[BUDGET_OUT_COLUMNS]


@dataclass(frozen=True)
class TrainLog:
    """A training job's log and the job that wrote it, as the workflow labels it (never read from the path)."""

    method: str
    step: str
    stage: str
    """``train`` (the job that made the step's model), ``teacher`` / ``adapter`` (K&G RFT's knowledge and
    retention stages) or ``pretrain`` (M0's pre-training, method ``foundation``)."""
    path: Path


def parse_train_log(text: str) -> TrainLog:
    """A ``METHOD:STEP:STAGE:FILE`` label (the file may itself hold colons)."""
    parts = text.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise InputError("--train-logs", f"expected METHOD:STEP:STAGE:FILE, got {text!r}")
    method, step, stage, path = parts
    if stage not in LOG_STAGES:
        raise InputError("--train-logs", f"unknown stage {stage!r} in {text!r}; one of {list(LOG_STAGES)}")
    return TrainLog(method, step, stage, Path(path))


def training_log_table(logs: Mapping[TrainLog, pd.DataFrame]) -> pd.DataFrame:
    """Every training log in one table: method, step, stage, iteration (the log's optimiser step), then its columns.

    Args:
        logs: labelled log -> the log read from its file.
    """
    frames = []
    for label, log in logs.items():
        frame = log.rename(columns={"step": "iteration"}).copy()
        frame.insert(0, "stage", label.stage)
        frame.insert(0, "step", label.step)
        frame.insert(0, "method", label.method)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=LOG_KEYS + ["loss"])
    table = pd.concat(frames, ignore_index=True)
    value_cols = sorted(c for c in table.columns if c not in LOG_KEYS)
    return table[LOG_KEYS + value_cols].sort_values(LOG_KEYS).reset_index(drop=True)


# ------------------------------------------------------------------------------------- rendering


@dataclass
class Section:
    """One part of the summary document: a heading, an optional paragraph and an optional table of strings."""

    level: int
    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 3) -> str:
    if not np.isfinite(value):
        return "–"
    # a difference that rounds to zero has no sign worth showing
    return f"{0.0:.{digits}f}" if round(value, digits) == 0 else f"{value:+.{digits}f}"


def _paired_section(reference: str, paired: pd.DataFrame, settings: SummarySettings) -> Section:
    pct = f"{round(100 * settings.ci)} %"
    rows = []
    for r in paired.itertuples(index=False):
        steps = "–" if r.steps_ref < 0 or r.steps < 0 else f"{r.steps_ref} / {r.steps}"
        matched = "yes" if r.compute_matched else ("–" if steps == "–" else "no")
        rows.append(
            [
                r.method,
                r.task,
                METRIC_TITLES[r.metric],
                f"{r.seeds_ref} / {r.seeds}",
                str(r.cases),
                _signed(r.mean_diff),
                f"[{_signed(r.ci_low)}, {_signed(r.ci_high)}]",
                _fmt(r.seed_sd),
                steps,
                matched,
            ]
        )
    several = bool(((paired["seeds_ref"] > 1) | (paired["seeds"] > 1)).any())
    how = (
        "resampling training seeds, then test cases"
        + (
            " (one case draw shared by every drawn seed)"
            if settings.case_resampling == "shared"
            else " (cases drawn anew within each seed)"
        )
        + "; seeds are paired where both sides ran the same seeds"
        if several
        else "over test cases (one training seed on each side)"
    )
    return Section(
        2,
        f"Paired comparison: {reference} − each method",
        f"Mean over the same test cases and training seeds of ({reference} − method), {pct} percentile "
        f"bootstrap interval {how} ({settings.n_boot} resamples, seed {settings.seed}); seed sd: the "
        "sample sd over paired seeds of the per-seed mean difference. Training steps: optimiser steps of "
        "the jobs that made each model from its start model (K&G RFT: teacher + student; a "
        "semi-supervised or continued ASSFT model: its round model's steps + the continuation's); "
        "compute-matched when equal. Dice: positive favours the reference; HD95: negative favours it.",
        [
            "method",
            "task",
            "metric",
            "seeds (ref / method)",
            "cases",
            "mean difference",
            f"{pct} CI",
            "seed sd",
            "training steps (ref / method)",
            "compute-matched",
        ],
        rows,
    )


def _sections(
    summary: pd.DataFrame,
    forgetting: pd.DataFrame,
    bwt: pd.DataFrame,
    paired: pd.DataFrame,
    budget: pd.DataFrame,
    logs: pd.DataFrame,
    settings: SummarySettings,
    forgetting_paired: pd.DataFrame,
) -> list[Section]:
    out = [
        Section(
            1,
            "segadapt summary",
            "Test-set mean ± sample std over cases; a case's value is the mean over its foreground classes. "
            "Each method is scored with the model of the step that learned the task (`all` for multi-task "
            "training). A value without ± comes from a single case. A model trained under several seeds has "
            "each case's mean over its seeds here; the spread between seeds has its own table.",
        )
    ]
    for metric in SUMMARY_METRICS:
        part = summary[summary["metric"] == metric]
        if part.empty:
            continue
        tasks = sorted(part["task"].unique())
        rows = []
        for method, grp in part.groupby("method", sort=True):
            cells = []
            for t in tasks:
                r = grp[grp["task"] == t]
                if r.empty:
                    cells.append("–")
                elif int(r["cases"].iloc[0]) < 2:
                    cells.append(_fmt(r["mean"].iloc[0]))
                else:
                    cells.append(f"{_fmt(r['mean'].iloc[0])} ± {_fmt(r['std'].iloc[0])}")
            rows.append([method, *cells, _fmt(grp["mean"].mean())])
        out.append(
            Section(
                2,
                f"{METRIC_TITLES[metric]}: mean ± std over test cases",
                "The last column is the mean of the method's task means.",
                ["method", *tasks, "mean over tasks"],
                rows,
            )
        )
    seeded = summary[summary["seeds"] > 1] if "seeds" in summary.columns else summary.iloc[:0]
    for metric in SUMMARY_METRICS:
        part = seeded[seeded["metric"] == metric]
        if part.empty:
            continue
        tasks = sorted(summary.loc[summary["metric"] == metric, "task"].unique())
        rows = []
        for method, grp in summary[(summary["metric"] == metric) & summary["method"].isin(set(part["method"]))].groupby(
            "method", sort=True
        ):
            cells = []
            for t in tasks:
                r = grp[grp["task"] == t]
                cells.append(
                    "–"
                    if r.empty
                    else f"{_fmt(r['mean'].iloc[0])} ± {_fmt(r['seed_std'].iloc[0])} ({int(r['seeds'].iloc[0])})"
                )
            rows.append([method, *cells])
        out.append(
            Section(
                2,
                f"{METRIC_TITLES[metric]}: mean ± sd over training seeds",
                "Methods trained under several seeds: the mean over seeds of each seed's mean over test "
                "cases ± the sample sd of those per-seed means (number of seeds in brackets). The "
                "spread between runs that differ only in their seed is the noise a method effect must "
                "exceed.",
                ["method", *tasks],
                rows,
            )
        )
    if not forgetting.empty:
        out.append(
            Section(
                2,
                "Forgetting: R[i, j] = mean Dice on task j after step i",
                "Rows: the model after each training step; columns: the tasks learned so far. "
                "BWT = mean over j < n of R[n, j] − R[j, j] (Lopez-Paz & Ranzato 2017); "
                "negative values mean earlier tasks were forgotten.",
            )
        )
        for method, grp in forgetting.groupby("method", sort=True):
            steps = grp.sort_values("step_index")["step"].unique().tolist()
            cells = {(s, t): d for s, t, d in zip(grp["step"], grp["task"], grp["dice"])}
            rows = [[f"after {s}", *[_fmt(cells[(s, t)]) if (s, t) in cells else "" for t in steps]] for s in steps]
            b = bwt[bwt["method"] == method]
            title = method + (f" (BWT {_signed(b['bwt'].iloc[0])})" if not b.empty else "")
            out.append(Section(3, title, "", ["model \\ task", *steps], rows))
        pct = f"{round(100 * settings.ci)} %"
        out.append(
            Section(
                3,
                "Backward transfer",
                "BWT: the mean of the per-seed BWT over the seeds whose chain is complete; seed sd: their "
                f"sample sd; {pct} percentile "
                "bootstrap interval of the per-case change R[n, j] − R[j, j] resampling training seeds, then "
                f"test cases ({settings.n_boot} resamples; with one seed an interval over test cases only).",
                ["method", "BWT", "seeds", "seed sd", f"{pct} CI", "tasks", "final step"],
                [
                    [
                        r.method,
                        _signed(r.bwt),
                        "–" if pd.isna(r.seeds) else str(int(r.seeds)),
                        _fmt(r.seed_sd),
                        "–" if not np.isfinite(r.ci_low) else f"[{_signed(r.ci_low)}, {_signed(r.ci_high)}]",
                        str(r.tasks),
                        r.final_step,
                    ]
                    for r in bwt.itertuples(index=False)
                ],
            )
        )
        if not forgetting_paired.empty:
            out.append(
                Section(
                    3,
                    f"Forgetting compared: {settings.reference} − each sequential method",
                    f"Per earlier task on the test cases both methods have, then averaged over tasks: "
                    f"`BWT` compares R[n, j] − R[j, j] (positive: {settings.reference} forgets less), "
                    "`retained` compares R[n, j], the Dice kept on the earlier tasks after the last step "
                    f"(positive: {settings.reference} keeps more). {pct} percentile bootstrap interval "
                    "resampling training seeds (paired where both ran the same seeds), then test cases; "
                    "seed sd: the sample sd over paired seeds of the per-seed difference.",
                    ["method", "quantity", "seeds (ref / method)", "cases", "mean difference", f"{pct} CI", "seed sd"],
                    [
                        [
                            r.method,
                            FORGETTING_QUANTITIES[r.quantity],
                            f"{r.seeds_ref} / {r.seeds}",
                            str(r.cases),
                            _signed(r.mean_diff),
                            f"[{_signed(r.ci_low)}, {_signed(r.ci_high)}]",
                            _fmt(r.seed_sd),
                        ]
                        for r in forgetting_paired.itertuples(index=False)
                    ],
                )
            )
    if paired.empty or not (paired["reference"] == settings.reference).any():
        out.append(
            Section(
                2,
                f"Paired comparison against {settings.reference}",
                f"No comparison: `{settings.reference}` has no own-step metrics, or shares no test "
                "case with another method.",
            )
        )
    for reference, part in paired.groupby("reference", sort=False):
        out.append(_paired_section(reference, part, settings))
    if not budget.empty:
        rows = [
            [s, str(r), str(n), _fmt(m), _fmt(sd), str(k)]
            for s, r, n, m, sd, k in zip(
                budget["strategy"],
                budget["round"],
                budget["labels"],
                budget["dice_mean"],
                budget["dice_std"],
                budget["seeds"],
            )
        ]
        out.append(
            Section(
                2,
                "Label-budget curves",
                "Dice after each active-learning round, mean and std over seeds.",
                ["strategy", "round", "labels", "Dice mean", "Dice std", "seeds"],
                rows,
            )
        )
    if not logs.empty:
        rows = []
        for (method, step, stage), grp in logs.groupby(["method", "step", "stage"], sort=True):
            last = grp.sort_values("iteration").iloc[-1]
            first = grp.sort_values("iteration").iloc[0]
            rows.append([method, step, stage, str(int(last["iteration"])), _fmt(first["loss"]), _fmt(last["loss"])])
        out.append(
            Section(
                2,
                "Training jobs",
                "Loss at the first and the last logged iteration of every job.",
                ["method", "step", "stage", "iterations", "first loss", "last loss"],
                rows,
            )
        )
    return out


def render_markdown(sections: Sequence[Section]) -> str:
    """The sections as GitHub-flavoured Markdown (first line ``# segadapt summary``)."""
    lines: list[str] = []
    for s in sections:
        lines += ["#" * s.level + " " + s.title, ""]
        if s.text:
            lines += [s.text, ""]
        if s.header:
            lines.append("| " + " | ".join(s.header) + " |")
            lines.append("|" + "---|" * len(s.header))
            lines += ["| " + " | ".join(r) + " |" for r in s.rows]
            lines.append("")
    return "\n".join(lines)


def render_html(sections: Sequence[Section]) -> str:
    """The sections as one self-contained HTML page (the report shows it in a frame)."""
    style = (
        "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
        "td:first-child,th:first-child{text-align:left}p{max-width:60em}"
    )
    body = []
    for s in sections:
        body.append(f"<h{s.level}>{html.escape(s.title)}</h{s.level}>")
        if s.text:
            body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s.text)) + "</p>")
        if s.header:
            body.append(
                "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr></thead><tbody>"
            )
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in s.rows]
            body.append("</tbody></table>")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>segadapt summary</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ------------------------------------------------------------------------------------------- stage


def _read_checked(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not Path(path).is_file():
        raise InputError(path, "file not found")
    try:
        df = read_parquet(path)
    except Exception as err:  # a truncated or foreign file: say which one
        raise InputError(path, f"not a readable Parquet table ({err})") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"lacks columns {missing} (has {list(df.columns)})")
    return df


def run(
    metrics: Sequence[Path],
    out: Path,
    settings: Mapping[str, Any],
    train_logs: Sequence[TrainLog] = (),
    budget: Sequence[Path] = (),
) -> None:
    """Write every summary table under ``out``.

    Args:
        metrics: metrics tables of ``stages.evaluate`` (one per evaluated model).
        out: the summary folder: ``metrics.parquet`` (all rows), ``cases.parquet`` (per case, mean over
            foreground classes), ``summary.parquet``, ``forgetting.parquet``, ``bwt.parquet`` (with
            its seed spread and interval), ``paired.parquet``, ``forgetting_paired.parquet``,
            ``budget.parquet``, ``training_logs.parquet`` (empty tables with their columns where
            nothing applies) and ``summary.md`` / ``summary.html``.
        settings: see :class:`SummarySettings`.
        train_logs: the training logs, each labelled with the job that wrote it.
        budget: active-learning round tables (``strategy, round, labels, seed, dice``).
    """
    conf = SummarySettings.from_mapping(settings)
    if not metrics:
        raise InputError("--metrics", "no metrics tables given")
    # validate and compute everything before the first write
    frames = [_read_checked(p, METRIC_COLUMNS) for p in metrics]
    logs = {label: _read_checked(label.path, ("step", "loss")) for label in train_logs}
    rounds = [_read_checked(p, BUDGET_COLUMNS) for p in budget]

    table = (
        pd.concat(frames, ignore_index=True)
        .sort_values(["method", "step", "task", "case", "class", "metric"])
        .reset_index(drop=True)
    )
    cases = case_table(table)
    seeded = seed_case_table(table, conf.seed)
    summary = summary_table(table, conf.seed)
    forgetting = sequential_matrix(cases, conf.order)
    bwt = bwt_intervals(backward_transfer(forgetting), forgetting, seeded, conf)
    forgetting_paired = forgetting_comparisons(forgetting, seeded, conf)
    paired = pd.concat([paired_comparisons(seeded, conf), active_paired_comparisons(seeded, conf)], ignore_index=True)
    paired = paired.astype({"compute_matched": bool}) if not paired.empty else paired
    rounds = [r for r in [*rounds, active_rounds(table, conf.labels_per_round)] if not r.empty]
    budget_curve = budget_table(
        pd.concat(rounds, ignore_index=True) if rounds else pd.DataFrame(columns=BUDGET_COLUMNS)
    )
    log_table = training_log_table(logs)

    log_paths = [label.path for label in train_logs]
    hashes = {str(p): sha256_file(p) for p in [*metrics, *log_paths, *budget]}
    recorded = {
        "reference": conf.reference,
        "n_boot": conf.n_boot,
        "ci": conf.ci,
        "seed": conf.seed,
        "labels_per_round": conf.labels_per_round,
        "order": list(conf.order),
        "training_steps": dict(sorted(conf.training_steps.items())),
        "case_resampling": conf.case_resampling,
    }

    def prov(paths: Sequence[Path]) -> dict[str, Any]:
        return make_provenance("aggregate", recorded, inputs={str(p): hashes[str(p)] for p in paths}, seed=conf.seed)

    write_parquet(table, out / "metrics.parquet", prov(metrics))
    write_parquet(cases, out / "cases.parquet", prov(metrics))
    write_parquet(summary, out / "summary.parquet", prov(metrics))
    write_parquet(forgetting, out / "forgetting.parquet", prov(metrics))
    write_parquet(bwt, out / "bwt.parquet", prov(metrics))
    write_parquet(paired, out / "paired.parquet", prov(metrics))
    write_parquet(forgetting_paired, out / "forgetting_paired.parquet", prov(metrics))
    write_parquet(budget_curve, out / "budget.parquet", prov(budget))
    write_parquet(log_table, out / "training_logs.parquet", prov(log_paths))
    sections = _sections(summary, forgetting, bwt, paired, budget_curve, log_table, conf, forgetting_paired)
    for name, text in (("summary.md", render_markdown(sections)), ("summary.html", render_html(sections))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    # the rendered documents carry their lineage in a sidecar (stages.audit reads it)
    tables = [
        out / n
        for n in (
            "summary.parquet",
            "forgetting.parquet",
            "bwt.parquet",
            "paired.parquet",
            "forgetting_paired.parquet",
            "budget.parquet",
            "training_logs.parquet",
        )
    ]
    for name in ("summary.md", "summary.html"):
        save_json(make_provenance("aggregate", recorded, inputs=tables, seed=conf.seed), out / f"{name}.prov.json")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, nargs="+", required=True, help="metrics Parquet files")
    parser.add_argument("--out", type=Path, required=True, help="summary folder")
    parser.add_argument(
        "--train-logs",
        type=parse_train_log,
        nargs="*",
        default=[],
        help="METHOD:STEP:STAGE:FILE per training log (stage: train, teacher, adapter, pretrain)",
    )
    parser.add_argument(
        "--budget",
        type=Path,
        nargs="*",
        default=[],
        help="active-learning round tables (strategy, round, labels, seed, dice)",
    )
    parser.add_argument(
        "--settings",
        type=json.loads,
        default={},
        help="JSON object: reference, n_boot, ci, seed, order, labels_per_round, training_steps, case_resampling",
    )
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        if not isinstance(args.settings, dict):
            raise InputError("--settings", "must be a JSON object")
        run(args.metrics, args.out, args.settings, args.train_logs, args.budget)


if __name__ == "__main__":
    run_cli(main)
