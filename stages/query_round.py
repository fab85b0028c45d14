"""One ASSFT query round: score every still-unlabelled pool case of a target task and pick the round's labelling budget greedily.

The pool is the task's ``train`` split; its labels are never read here (only images, the M0 SSL
scores and the M0 pooled features). Strategies (ASSFT, Yang et al., arXiv 2509.10784, and the
baselines of ``methods.md`` §2), chosen by name with their own settings under ``options``:

- ``dkd_asd`` — round 0: DKD alone; later rounds: ``score = w·rank(DKD) + (1−w)·rank(ASD)`` (w = 0.5),
  greedy with DKD recomputed after each pick.
- ``dkd`` — DKD alone (``rank(k)·rank(d)``, d recomputed after each pick).
- ``asd`` — ASD alone (predictive entropy inside the Otsu foreground of the previous round's model).
- ``entropy`` — whole-volume mean normalised entropy of the previous round's model.
- ``mc_dropout`` — epistemic uncertainty over T dropout passes at the head input (MONAI Label's
  ``epistemic_entropy`` by default, BALD's mutual information as an option).
- ``coreset`` — k-centre greedy on the pooled M0 features (Sener & Savarese, ICLR 2018).
- ``random`` — uniform, seeded by (seed, round); run several seeds as separate jobs.
- ``fg_random`` — nnActive's foreground-aware random (Lüth et al., TMLR 2025) on whole cases: each
  draw is, with probability ``share`` (1/3 as in nnActive's "33 % foreground" random), a case drawn in
  proportion to its predicted foreground and otherwise a uniform case; weighted sampling without
  replacement from the same seeded uniforms as ``random``. The foreground comes from the previous
  round's model (pool labels are unknown); at round 0 no model has a head for the target, so the draw
  is uniform and identical to ``random``'s with the same seed (``fallback = "random"``).

Strategies that need a target model (``dkd_asd``, ``asd``, ``entropy``, ``mc_dropout``) fall back to
DKD at round 0, where no target head exists yet (``fg_random`` to uniform random), and the table's
``fallback`` column says so. Every
strategy picks greedily, highest score first; exact ties go to the candidate farther from the
labelled-or-picked set (cosine d), then to the smaller case id. DKD's k and d are recorded for every
strategy, so the tables of all strategies can be compared on the same terms.

DKD's knowledge gap k (``dkd_knowledge``): ``winsorised`` (default) clips M0's SSL loss at its
``dkd_winsor_quantile`` over the round's candidates before ranking, so the first pick (where the
diversity term is 1 for everyone) is not the single most extreme, outlier-prone loss: the top tenth
share the top rank and ties go to the larger distance, then to the smaller raw loss; ``rank`` ranks
the raw loss (the earlier behaviour). The table keeps the raw ``k`` and the ``k_used``.

Output: ``query.parquet``, one row per candidate with every component score (the values at the step
it was picked, or after the last pick for the others), the combined ``score``, ``picked``,
``pick_order``, ``round``, ``strategy``, ``seed`` and ``model_id`` (null without a model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from stages.core.active import (
    StepScores,
    asd_score,
    coreset_step,
    dkd_terms,
    foreground_weights,
    greedy_select,
    mc_dropout_scores,
    mean_entropy,
    read_case_column,
    read_features,
    scaled_rank,
    weighted_random_keys,
    winsorise,
)
from stages.core.errors import InputError, run_cli
from stages.core.inference import mc_dropout_probabilities, predict_probabilities, resolve_device
from stages.core.io import make_provenance, write_parquet
from stages.core.log import stage_log
from stages.core.nets import load_model, model_id, seed_from

__all__ = [
    "DEFAULT_SETTINGS",
    "QUERY_SCHEMA",
    "STRATEGIES",
    "AsdSettings",
    "CoresetSettings",
    "DkdAsdSettings",
    "DkdSettings",
    "EntropySettings",
    "FgRandomSettings",
    "McDropoutSettings",
    "QueryContext",
    "RandomSettings",
    "Strategy",
    "query",
    "resolve_settings",
    "run",
    "main",
]

log = logging.getLogger("stages.query_round")

#: Settings of a query job; ``options`` holds the chosen strategy's own settings (its dataclass fields).
DEFAULT_SETTINGS: dict[str, Any] = {
    "strategy": "dkd_asd",  # a key of STRATEGIES
    "budget": 2,  # cases picked this round (all remaining ones if fewer are left)
    "seed": 0,  # random strategies; MC-dropout masks
    "options": {},  # the strategy's settings (see its dataclass)
    "dkd_knowledge": "winsorised",  # DKD's k: "winsorised" (clipped at dkd_winsor_quantile) or "rank" (raw)
    "dkd_winsor_quantile": 0.9,  # the quantile of k over the round's candidates where it is clipped
    "patch_size": None,  # sliding-window size for the model's predictions (needed with a model)
    "overlap": 0.5,  # sliding-window overlap (methods.md)
    "sw_batch_size": 4,  # windows per forward pass
    "device": "cpu",
}


# ------------------------------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class DkdAsdSettings:
    """ASSFT's query (ours: the combination rule).

    Attributes:
        weight: w in ``score = w·rank(DKD) + (1−w)·rank(ASD)``, in [0, 1] (methods.md default 0.5).
    """

    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.weight) <= 1.0:
            raise InputError("settings.options.weight", f"must be in [0, 1], got {self.weight!r}")


@dataclass(frozen=True)
class DkdSettings:
    """DKD alone; no settings of its own (k from ssl.parquet, d cosine on the M0 features)."""


@dataclass(frozen=True)
class AsdSettings:
    """ASD alone; no settings of its own (Otsu foreground per case)."""


@dataclass(frozen=True)
class EntropySettings:
    """Whole-volume mean normalised entropy; no settings of its own."""


@dataclass(frozen=True)
class RandomSettings:
    """Uniform random picks; the draw is seeded by the job's ``seed`` and the round."""


@dataclass(frozen=True)
class FgRandomSettings:
    """Foreground-aware random (nnActive), see :func:`stages.core.active.foreground_weights`.

    Attributes:
        share: fraction of draws aimed at foreground, in [0, 1] (nnActive's "33 % foreground" random: 1/3).
    """

    share: float = 1.0 / 3.0

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0.0 <= self.share <= 1.0:
            raise InputError("settings.options.share", f"must be a number in [0, 1], got {self.share!r}")


@dataclass(frozen=True)
class McDropoutSettings:
    """Monte-Carlo dropout (ours: dropout at the head input, see ``stages.core.inference.mc_dropout_probabilities``).

    Attributes:
        passes: T stochastic passes (>= 2; MONAI Label's default simulation size is 5).
        dropout: dropout rate on the decoder features at the head input, in (0, 1).
        measure: ``monailabel`` (MONAI Label's epistemic entropy of the MC mean over the foreground
            classes) or ``mutual_information`` (BALD).
    """

    passes: int = 8
    dropout: float = 0.2
    measure: str = "monailabel"

    def __post_init__(self) -> None:
        if not isinstance(self.passes, int) or self.passes < 2:
            raise InputError("settings.options.passes", f"must be an integer >= 2, got {self.passes!r}")
        if not 0.0 < float(self.dropout) < 1.0:
            raise InputError("settings.options.dropout", f"must be in (0, 1), got {self.dropout!r}")
        if self.measure not in ("monailabel", "mutual_information"):
            raise InputError(
                "settings.options.measure", f"must be 'monailabel' or 'mutual_information', got {self.measure!r}"
            )


@dataclass(frozen=True)
class CoresetSettings:
    """Core-set k-centre greedy on the pooled M0 features.

    Attributes:
        metric: ``euclidean`` (Sener & Savarese) or ``cosine`` (the distance DKD uses).
    """

    metric: str = "euclidean"

    def __post_init__(self) -> None:
        if self.metric not in ("euclidean", "cosine"):
            raise InputError("settings.options.metric", f"must be 'euclidean' or 'cosine', got {self.metric!r}")


@dataclass
class QueryContext:
    """What a strategy scores: the candidates (ascending case id) and everything known about them.

    Args:
        cases: candidate case ids, sorted.
        k: (n,) knowledge gap, M0's mean SSL loss (or its feature-distance fallback).
        features: (n, D) pooled M0 features of the candidates.
        labelled_features: (m, D) pooled M0 features of the labelled cases.
        model_scores: per-candidate arrays from the previous round's model (``asd``, ``entropy``,
            ``mc_entropy``, ``mc_mutual_info``; ``fg_volume`` (n, foreground classes), the soft
            predicted volume), or None without a model.
        seed: the job's seed.
        round: the query round.
        k_raw: (n,) the unclipped knowledge gap when ``k`` is winsorised (DKD's tie-break), else None.
    """

    cases: list[str]
    k: np.ndarray
    features: np.ndarray
    labelled_features: np.ndarray
    model_scores: dict[str, np.ndarray] | None
    seed: int
    round: int
    k_raw: np.ndarray | None = None


def _dkd(ctx: QueryContext, remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
    reference = np.concatenate([ctx.labelled_features, ctx.features[picked]]) if picked.size else ctx.labelled_features
    k_raw = None if ctx.k_raw is None else ctx.k_raw[remaining]
    return dkd_terms(ctx.k[remaining], ctx.features[remaining], reference, k_raw)


def _dkd_step(ctx: QueryContext, cfg: Any) -> StepScores:
    return lambda remaining, picked: _dkd(ctx, remaining, picked)


def _dkd_asd_step(ctx: QueryContext, cfg: DkdAsdSettings) -> StepScores:
    assert ctx.model_scores is not None
    asd = ctx.model_scores["asd"]

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms["dkd_rank"] = scaled_rank(terms["dkd"])
        terms["asd_rank"] = scaled_rank(asd[remaining])
        terms["score"] = cfg.weight * terms["dkd_rank"] + (1.0 - cfg.weight) * terms["asd_rank"]
        return terms

    return step


def _static_step(values: np.ndarray, ctx: QueryContext, extra: str | None = None) -> StepScores:
    """A score fixed per case; DKD's terms are still recorded so every table shows k and d."""

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms["score"] = values[remaining]
        if extra is not None:
            terms[extra] = values[remaining]
        return terms

    return step


def _asd_step(ctx: QueryContext, cfg: Any) -> StepScores:
    assert ctx.model_scores is not None
    return _static_step(ctx.model_scores["asd"], ctx)


def _entropy_step(ctx: QueryContext, cfg: Any) -> StepScores:
    assert ctx.model_scores is not None
    return _static_step(ctx.model_scores["entropy"], ctx)


def _mc_step(ctx: QueryContext, cfg: McDropoutSettings) -> StepScores:
    assert ctx.model_scores is not None
    key = "mc_entropy" if cfg.measure == "monailabel" else "mc_mutual_info"
    return _static_step(ctx.model_scores[key], ctx)


def _uniforms(ctx: QueryContext) -> np.ndarray:
    """The seeded uniforms of the random strategies: one per candidate, from (seed, round) alone."""
    return np.random.default_rng([ctx.seed, ctx.round]).random(len(ctx.cases))


def _random_step(ctx: QueryContext, cfg: Any) -> StepScores:
    return _static_step(_uniforms(ctx), ctx, extra="random_key")


def _fg_random_step(ctx: QueryContext, cfg: FgRandomSettings) -> StepScores:
    assert ctx.model_scores is not None
    u = _uniforms(ctx)
    weights, share = foreground_weights(ctx.model_scores["fg_volume"], cfg.share)
    keys = weighted_random_keys(u, weights)

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms.update(score=keys[remaining], random_key=u[remaining], fg_share=share[remaining],
                     fg_weight=weights[remaining])
        return terms

    return step


def _coreset_step(ctx: QueryContext, cfg: CoresetSettings) -> StepScores:
    centre = coreset_step(ctx.features, ctx.labelled_features, cfg.metric)

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms.update(centre(remaining, picked))
        return terms

    return step


@dataclass(frozen=True)
class Strategy:
    """A query strategy: its settings dataclass, what it needs, and how it scores.

    Attributes:
        settings: the dataclass of its ``options``.
        needs_model: scores come from the previous round's model (DKD fallback at round 0).
        mc: also needs the Monte-Carlo dropout passes.
        step: builds the greedy step function from the context and the settings.
        fallback: what a model-based strategy does without a model (round 0): ``dkd`` or ``random``.
    """

    settings: type
    needs_model: bool
    mc: bool
    step: Callable[[QueryContext, Any], StepScores]
    fallback: str = "dkd"


STRATEGIES: dict[str, Strategy] = {
    "dkd_asd": Strategy(DkdAsdSettings, True, False, _dkd_asd_step),
    "dkd": Strategy(DkdSettings, False, False, _dkd_step),
    "asd": Strategy(AsdSettings, True, False, _asd_step),
    "entropy": Strategy(EntropySettings, True, False, _entropy_step),
    "mc_dropout": Strategy(McDropoutSettings, True, True, _mc_step),
    "coreset": Strategy(CoresetSettings, False, False, _coreset_step),
    "random": Strategy(RandomSettings, False, False, _random_step),
    "fg_random": Strategy(FgRandomSettings, True, False, _fg_random_step, fallback="random"),
}

DKD_KNOWLEDGE = ("winsorised", "rank")


def resolve_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Complete ``settings`` with :data:`DEFAULT_SETTINGS`, check them, and build the strategy's options.

    Returns ``(settings, options dataclass)``. Unknown keys are refused (a typo must not fall back to
    a default).
    """
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise InputError("settings", f"unknown query settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    cfg = {**DEFAULT_SETTINGS, **dict(settings)}
    if cfg["strategy"] not in STRATEGIES:
        raise InputError("settings.strategy", f"unknown strategy {cfg['strategy']!r}; choose from {sorted(STRATEGIES)}")
    if isinstance(cfg["budget"], bool) or not isinstance(cfg["budget"], int) or cfg["budget"] < 1:
        raise InputError("settings.budget", f"must be an integer >= 1, got {cfg['budget']!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise InputError("settings.seed", f"must be an integer, got {cfg['seed']!r}")
    if cfg["dkd_knowledge"] not in DKD_KNOWLEDGE:
        raise InputError("settings.dkd_knowledge", f"must be one of {list(DKD_KNOWLEDGE)}, got {cfg['dkd_knowledge']!r}")
    q = cfg["dkd_winsor_quantile"]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
        raise InputError("settings.dkd_winsor_quantile", f"must be a number in (0, 1], got {q!r}")
    options = cfg["options"] or {}
    if not isinstance(options, Mapping):
        raise InputError("settings.options", f"must be an object, got {options!r}")
    kind = STRATEGIES[cfg["strategy"]].settings
    known = {f.name for f in dataclasses.fields(kind)}
    bad = sorted(set(options) - known)
    if bad:
        raise InputError("settings.options", f"unknown options {bad} for {cfg['strategy']!r}; known: {sorted(known)}")
    return cfg, kind(**dict(options))


# ------------------------------------------------------------------------------------------------- query


def query(
    ctx: QueryContext, strategy: str, options: Any, budget: int
) -> tuple[list[int], dict[str, np.ndarray], str | None]:
    """Pick ``budget`` candidates of ``ctx`` with ``strategy``.

    Returns ``(pick order as candidate indices, per-candidate columns, fallback)`` where ``fallback``
    is the strategy's fallback (``"dkd"``, or ``"random"`` for ``fg_random``) when a model-based
    strategy had no model (round 0) and None otherwise.
    """
    spec = STRATEGIES[strategy]
    fallback = None
    if spec.needs_model and ctx.model_scores is None:
        fallback = spec.fallback
        step = _random_step(ctx, RandomSettings()) if fallback == "random" else _dkd_step(ctx, DkdSettings())
    else:
        step = spec.step(ctx, options)
    result = greedy_select(len(ctx.cases), budget, step)
    return result.order, result.columns, fallback


#: Columns of ``query.parquet`` (fixed for every strategy, null where a score does not apply).
QUERY_SCHEMA = pa.schema(
    [
        ("case", pa.string()),
        ("round", pa.int64()),
        ("strategy", pa.string()),
        ("seed", pa.int64()),
        ("model_id", pa.string()),
        ("fallback", pa.string()),
        ("picked", pa.bool_()),
        ("pick_order", pa.int64()),
        ("score", pa.float64()),
        ("k", pa.float64()),
        ("k_scorer", pa.string()),
        ("k_used", pa.float64()),
        ("k_rank", pa.float64()),
        ("d", pa.float64()),
        ("d_rank", pa.float64()),
        ("dkd", pa.float64()),
        ("dkd_rank", pa.float64()),
        ("asd", pa.float64()),
        ("asd_rank", pa.float64()),
        ("asd_flag", pa.bool_()),
        ("asd_tau", pa.float64()),
        ("entropy", pa.float64()),
        ("mc_entropy", pa.float64()),
        ("mc_mutual_info", pa.float64()),
        ("coreset_distance", pa.float64()),
        ("random_key", pa.float64()),
        ("fg_volume", pa.float64()),
        ("fg_share", pa.float64()),
        ("fg_weight", pa.float64()),
    ]
)


def _floats(values: np.ndarray | None, n: int) -> list[float | None]:
    if values is None:
        return [None] * n
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def _model_scores(
    model_dir: Path, task: str, data: Path, cases: list[str], cfg: dict[str, Any], options: Any, mc: bool
) -> dict[str, np.ndarray]:
    """ASD, entropy, soft foreground volume per class (and MC-dropout scores) of every candidate under the previous round's model."""
    device = resolve_device(cfg["device"])
    model = load_model(model_dir)
    if task not in model.seg_heads:
        heads = sorted(model.seg_heads)
        raise InputError(model_dir / "model.json", f"has no segmentation head {task!r} (heads: {heads})")
    model.to(device).eval()
    patch = cfg["patch_size"]
    keys = ("asd", "asd_flag", "asd_tau", "entropy", "mc_entropy", "mc_mutual_info")
    out: dict[str, list[Any]] = {k: [] for k in (*keys, "fg_volume")}
    for case in tqdm(cases, desc=f"query scores {task}", mininterval=2):
        image = np.load(data / "cases" / f"{case}.npy")  # whole volume: inference reads all of it
        probs = predict_probabilities(model, task, image, patch, cfg["overlap"], cfg["sw_batch_size"], device)
        asd, flag, tau = asd_score(probs)
        out["asd"].append(asd)
        out["asd_flag"].append(float(flag))
        out["asd_tau"].append(tau)
        out["entropy"].append(mean_entropy(probs))
        out["fg_volume"].append(np.asarray(probs[1:], dtype=np.float64).sum(axis=(1, 2, 3)))
        if mc:
            generator = torch.Generator().manual_seed(seed_from("mc_dropout", cfg["seed"], case))
            samples = mc_dropout_probabilities(
                model, task, image, patch, options.passes, options.dropout, generator,
                cfg["overlap"], cfg["sw_batch_size"], device,
            )
            scores = mc_dropout_scores(samples)
            out["mc_entropy"].append(scores["mc_entropy"])
            out["mc_mutual_info"].append(scores["mc_mutual_info"])
        else:
            out["mc_entropy"].append(np.nan)
            out["mc_mutual_info"].append(np.nan)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def run(
    data: Path,
    task: str,
    ssl_scores: Path,
    features: Path,
    round_index: int,
    out: Path,
    settings: Mapping[str, Any],
    labelled: Path | None = None,
    model_dir: Path | None = None,
) -> None:
    """Score the unlabelled pool of ``task`` and write ``out`` (``query.parquet``, see :data:`QUERY_SCHEMA`).

    Args:
        data: the task's preprocessed folder (``manifest.parquet``, ``cases/{case}.npy``); only images
            of pool cases are read.
        task: the task name (the model's segmentation head).
        ssl_scores: M0's SSL scores of the task (``scores/{task}/ssl.parquet``): k(x).
        features: M0's pooled features of the task (``scores/{task}/features.parquet``).
        round_index: the query round r (0, 1, ...).
        out: the Parquet file to write.
        settings: see :data:`DEFAULT_SETTINGS`.
        labelled: the labelled set so far (``labelled.parquet`` of round r−1); None at round 0.
        model_dir: the previous round's model folder; None at round 0. Ignored by the strategies that
            need no model (``dkd``, ``coreset``, ``random``), whose tables then carry no model scores.
    """
    data, out = Path(data), Path(out)
    cfg, options = resolve_settings(settings)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise InputError("--round", f"must be an integer >= 0, got {round_index!r}")
    strategy = STRATEGIES[cfg["strategy"]]
    if strategy.needs_model and model_dir is None and round_index > 0:
        raise InputError(
            "--model", f"strategy {cfg['strategy']!r} needs the previous round's model at round {round_index}"
        )
    use_model = model_dir is not None and strategy.needs_model
    if use_model and cfg["patch_size"] is None:
        raise InputError("settings.patch_size", "is needed to predict with the model (the training patch size)")

    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the task first")
    # only the split is read: the manifest's label columns describe pool labels the query must not see
    manifest = pd.read_parquet(manifest_path, columns=["case", "split"])
    pool = sorted(manifest.loc[manifest["split"] == "train", "case"].astype(str))
    if not pool:
        raise InputError(manifest_path, "has no 'train' cases: the query pool is empty")
    labelled_cases = read_case_column(labelled, "labelled") if labelled is not None else []
    outside = sorted(set(labelled_cases) - set(pool))
    if outside:
        raise InputError(labelled, f"labelled cases not in the task's train split: {outside[:10]}")
    if labelled is not None:
        rounds = pd.read_parquet(labelled).get("round")
        if rounds is not None and len(rounds) and int(rounds.max()) >= round_index:
            latest = int(rounds.max())
            raise InputError(labelled, f"holds labels of round {latest}, not earlier than round {round_index}")
    cases = [c for c in pool if c not in set(labelled_cases)]
    if not cases:
        raise InputError(
            manifest_path, f"no unlabelled case left for round {round_index}: lower the budget or the number of rounds"
        )
    if len(cases) < cfg["budget"]:
        log.warning("round %d: only %d candidates for a budget of %d; picking all",
                    round_index, len(cases), cfg["budget"])

    if not ssl_scores.is_file():
        raise InputError(ssl_scores, "missing: score the task with M0 first (stages.ssl_scores)")
    scores = pd.read_parquet(ssl_scores)
    if not {"case", "mean", "scorer"} <= set(scores.columns):
        raise InputError(ssl_scores, "lacks columns case, mean, scorer")
    scores = scores.assign(case=scores["case"].astype(str)).set_index("case")
    missing = [c for c in cases if c not in scores.index]
    if missing:
        raise InputError(ssl_scores, f"no SSL score for {len(missing)} candidate(s): {missing[:10]}")
    k = scores.loc[cases, "mean"].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(k)):
        raise InputError(ssl_scores, "SSL scores contain non-finite values")
    k_scorer = scores.loc[cases, "scorer"].astype(str).tolist()
    k_raw = None
    k_cap = None
    if cfg["dkd_knowledge"] == "winsorised":
        k_raw = k
        k, k_cap = winsorise(k, cfg["dkd_winsor_quantile"])
    feats = read_features(features, cases)
    labelled_feats = read_features(features, labelled_cases) if labelled_cases else np.zeros((0, feats.shape[1]))
    if use_model:
        absent = [c for c in cases if not (data / "cases" / f"{c}.npy").is_file()]
        if absent:
            raise InputError(data / "cases", f"missing preprocessed images of {absent[:10]}")

    mid = model_id(model_dir) if use_model else None
    model_scores = (
        _model_scores(model_dir, task, data, cases, cfg, options, strategy.mc) if use_model else None
    )
    ctx = QueryContext(cases, k, feats, labelled_feats, model_scores, cfg["seed"], round_index, k_raw)
    order, columns, fallback = query(ctx, cfg["strategy"], options, cfg["budget"])

    n = len(cases)
    pick_order = {idx: i for i, idx in enumerate(order)}
    ms = model_scores or {}
    flag = ms.get("asd_flag")
    table = pa.Table.from_pydict(
        {
            "case": cases,
            "round": [round_index] * n,
            "strategy": [cfg["strategy"]] * n,
            "seed": [cfg["seed"]] * n,
            "model_id": [mid] * n,
            "fallback": [fallback] * n,
            "picked": [i in pick_order for i in range(n)],
            "pick_order": [pick_order.get(i) for i in range(n)],
            "score": _floats(columns.get("score"), n),
            "k": _floats(k if k_raw is None else k_raw, n),
            "k_scorer": k_scorer,
            "k_used": _floats(k, n),
            "k_rank": _floats(columns.get("k_rank"), n),
            "d": _floats(columns.get("d"), n),
            "d_rank": _floats(columns.get("d_rank"), n),
            "dkd": _floats(columns.get("dkd"), n),
            "dkd_rank": _floats(columns.get("dkd_rank"), n),
            "asd": _floats(ms.get("asd"), n),
            "asd_rank": _floats(columns.get("asd_rank"), n),
            "asd_flag": [None] * n if flag is None else [bool(v) for v in flag],
            "asd_tau": _floats(ms.get("asd_tau"), n),
            "entropy": _floats(ms.get("entropy"), n),
            "mc_entropy": _floats(ms.get("mc_entropy"), n),
            "mc_mutual_info": _floats(ms.get("mc_mutual_info"), n),
            "coreset_distance": _floats(columns.get("coreset_distance"), n),
            "random_key": _floats(columns.get("random_key"), n),
            "fg_volume": _floats(None if "fg_volume" not in ms else ms["fg_volume"].sum(axis=1), n),
            "fg_share": _floats(columns.get("fg_share"), n),
            "fg_weight": _floats(columns.get("fg_weight"), n),
        },
        schema=QUERY_SCHEMA,
    )
    inputs = [manifest_path, ssl_scores, features]
    inputs += [labelled] if labelled is not None else []
    inputs += [model_dir / "model.safetensors"] if use_model else []
    prov = make_provenance(
        "query_round", dict(settings), inputs=inputs, seed=cfg["seed"], task=task, round=round_index,
        strategy=cfg["strategy"], options=dataclasses.asdict(options), budget=cfg["budget"], model_id=mid,
        fallback=fallback, k_scorer=sorted(set(k_scorer)), picked=[cases[i] for i in order],
        dkd_knowledge=cfg["dkd_knowledge"], dkd_winsor_quantile=cfg["dkd_winsor_quantile"], k_cap=k_cap,
        labelled=sorted(labelled_cases),
    )
    write_parquet(table, out, prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.query_round", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the task's preprocessed folder")
    parser.add_argument("--task", required=True, help="task name (the model's segmentation head)")
    parser.add_argument("--ssl-scores", type=Path, required=True, help="M0 SSL scores of the task (ssl.parquet)")
    parser.add_argument("--features", type=Path, required=True, help="M0 pooled features (features.parquet)")
    parser.add_argument("--round", type=int, required=True, help="the query round, 0-based")
    parser.add_argument("--labelled", type=Path, default=None, help="previous round's labelled.parquet")
    parser.add_argument("--model", type=Path, default=None, help="the previous round's model folder (none at round 0)")
    parser.add_argument("--out", type=Path, required=True, help="query.parquet to write")
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON object (see DEFAULT_SETTINGS)")
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.data, args.task, args.ssl_scores, args.features, args.round, args.out, args.settings,
            labelled=args.labelled, model_dir=args.model)


if __name__ == "__main__":
    run_cli(main)
