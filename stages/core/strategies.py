"""Query strategies of ASSFT's active rounds as registered units: settings, extra inputs, output columns, scorer.

A strategy is one :class:`Strategy` passed to :func:`register`: its name (the ``assft.strategies``
entry and the ``{query}`` wildcard), the dataclass of its options (``assft.options.<name>`` in the
config, ``options`` in the query job's settings; every field documented), the extra inputs it
reads beyond M0's SSL scores and features (:data:`MODEL`: the previous round's predictions,
:data:`MC_DROPOUT`: Monte-Carlo dropout passes of that model), the columns it adds to
``query.parquet``, and its step function for the greedy pick (:func:`stages.core.active.greedy_select`).
``stages.query_round`` knows no strategy by name: it dispatches through :data:`STRATEGIES`, and the
query table's schema is :func:`query_schema`, derived from the registry.

Built-in strategies (ASSFT, Yang et al., arXiv 2509.10784, and the baselines of ``methods.md`` §2):

- ``dkd_asd`` — round 0: DKD alone; later rounds: ``score = w·rank(DKD) + (1−w)·rank(ASD)``,
  greedy with DKD recomputed after each pick.
- ``dkd`` — DKD alone (``rank(k)·rank(d)``, d recomputed after each pick).
- ``asd`` — ASD alone (predictive entropy inside the Otsu foreground of the previous round's model).
- ``entropy`` — whole-volume mean normalised entropy of the previous round's model.
- ``mc_dropout`` — epistemic uncertainty over T dropout passes at the head input (MONAI Label's
  ``epistemic_entropy`` by default, BALD's mutual information as an option).
- ``coreset`` — k-centre greedy on the pooled M0 features (Sener & Savarese, ICLR 2018).
- ``random`` — uniform, seeded by (seed, round).
- ``fg_random`` — nnActive's foreground-aware random (Lüth et al., TMLR 2025) on whole cases: each
  draw is, with probability ``share``, a case drawn in proportion to its predicted foreground and
  otherwise a uniform case (weighted sampling without replacement from the same seeded uniforms as
  ``random``); at round 0 it is ``random`` (``fallback = "random"``).

Strategies that read the model fall back at round 0, where no target head exists yet, to their
``fallback`` (DKD, or random for ``fg_random``). DKD's k and d are recorded for every strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from stages.core.active import (
    StepScores,
    coreset_step,
    dkd_terms,
    foreground_weights,
    scaled_rank,
    weighted_random_keys,
)
from stages.core.errors import InputError
from stages.core.settings import setting

__all__ = [
    "BASE_COLUMNS",
    "INPUTS",
    "MC_DROPOUT",
    "MODEL",
    "STRATEGIES",
    "AsdSettings",
    "Column",
    "CoresetSettings",
    "DkdAsdSettings",
    "DkdSettings",
    "EntropySettings",
    "FgRandomSettings",
    "McDropoutSettings",
    "QueryContext",
    "RandomSettings",
    "Strategy",
    "dkd_step",
    "query_schema",
    "random_step",
    "register",
    "static_step",
]

MODEL = "model"
"""Extra input: the previous round's predictions (``asd``, ``asd_flag``, ``asd_tau``, ``entropy``, ``fg_volume``)."""
MC_DROPOUT = "mc_dropout"
"""Extra input: Monte-Carlo dropout passes of the previous round's model (``mc_entropy``, ``mc_mutual_info``)."""
INPUTS = (MODEL, MC_DROPOUT)


@dataclass(frozen=True)
class Column:
    """A column of ``query.parquet``: its name, Arrow type and meaning."""

    name: str
    type: pa.DataType
    help: str


#: The columns every query table has, whatever the strategy (null where a value does not apply).
BASE_COLUMNS: tuple[Column, ...] = (
    Column("case", pa.string(), "candidate case id"),
    Column("round", pa.int64(), "the query round"),
    Column("strategy", pa.string(), "the strategy's name"),
    Column("seed", pa.int64(), "the job's seed"),
    Column("model_id", pa.string(), "the previous round's model (null without one)"),
    Column("fallback", pa.string(), "what a model-based strategy did without a model (round 0)"),
    Column("picked", pa.bool_(), "picked this round"),
    Column("pick_order", pa.int64(), "0-based order of the pick"),
    Column("score", pa.float64(), "the strategy's score (higher is picked first)"),
    Column("k", pa.float64(), "M0's SSL loss (DKD's knowledge gap), unclipped"),
    Column("k_scorer", pa.string(), "what k was computed with"),
    Column("k_used", pa.float64(), "k as ranked (winsorised or raw)"),
    Column("k_rank", pa.float64(), "scaled rank of k_used"),
    Column("d", pa.float64(), "cosine distance to the labelled-or-picked set"),
    Column("d_rank", pa.float64(), "scaled rank of d"),
    Column("dkd", pa.float64(), "k_rank x d_rank"),
)


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


@dataclass(frozen=True)
class Strategy:
    """A query strategy, registered once with :func:`register`.

    Attributes:
        name: the config's and the wildcard's name.
        settings: the dataclass of its ``options`` (``assft.options.<name>``); fields documented with
            :func:`stages.core.settings.setting`.
        step: builds the greedy step function from the context and the options.
        inputs: extra inputs it reads (:data:`MODEL`, :data:`MC_DROPOUT`).
        columns: the columns it adds to ``query.parquet`` (a column several strategies write is
            declared by each, with the same type).
        fallback: what it does without a model (round 0) when it reads one: ``dkd`` or ``random``.
        help: one line for the docs.
    """

    name: str
    settings: type
    step: Callable[[QueryContext, Any], StepScores]
    inputs: frozenset[str] = frozenset()
    columns: tuple[Column, ...] = ()
    fallback: str = "dkd"
    help: str = ""

    @property
    def needs_model(self) -> bool:
        """Scores come from the previous round's model (fallback at round 0)."""
        return MODEL in self.inputs

    @property
    def mc(self) -> bool:
        """Also needs the Monte-Carlo dropout passes."""
        return MC_DROPOUT in self.inputs


#: The registry, in registration order (which is the order of the query table's columns).
STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`STRATEGIES` after checking its declaration; returns it.

    Raises:
        ValueError: a taken name, an unknown input or fallback, a settings class that is not a
            dataclass, or a column whose name another declaration gives a different type.
    """
    if strategy.name in STRATEGIES:
        raise ValueError(f"query strategy {strategy.name!r} is registered already")
    if not dataclasses.is_dataclass(strategy.settings):
        raise ValueError(f"query strategy {strategy.name!r}: settings must be a dataclass, got {strategy.settings!r}")
    unknown = sorted(set(strategy.inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"query strategy {strategy.name!r}: unknown inputs {unknown}; known: {list(INPUTS)}")
    if strategy.fallback not in ("dkd", "random"):
        raise ValueError(f"query strategy {strategy.name!r}: fallback must be 'dkd' or 'random'")
    known = {c.name: c.type for c in _all_columns(STRATEGIES.values())}
    for column in strategy.columns:
        if column.name in known and known[column.name] != column.type:
            raise ValueError(
                f"query strategy {strategy.name!r}: column {column.name!r} is {known[column.name]} elsewhere"
            )
    STRATEGIES[strategy.name] = strategy
    return strategy


def _all_columns(strategies: Sequence[Strategy] | Any) -> list[Column]:
    seen: dict[str, Column] = {c.name: c for c in BASE_COLUMNS}
    for strategy in strategies:
        for column in strategy.columns:
            seen.setdefault(column.name, column)
    return list(seen.values())


def query_schema() -> pa.Schema:
    """Columns of ``query.parquet``: :data:`BASE_COLUMNS`, then each registered strategy's, first declaration first."""
    return pa.schema([(c.name, c.type) for c in _all_columns(STRATEGIES.values())])


# ------------------------------------------------------------------------------------------ step helpers


def _dkd(ctx: QueryContext, remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
    reference = np.concatenate([ctx.labelled_features, ctx.features[picked]]) if picked.size else ctx.labelled_features
    k_raw = None if ctx.k_raw is None else ctx.k_raw[remaining]
    return dkd_terms(ctx.k[remaining], ctx.features[remaining], reference, k_raw)


def dkd_step(ctx: QueryContext, cfg: Any = None) -> StepScores:
    """DKD alone: ``rank(k)·rank(d)`` with d recomputed after each pick (also every model strategy's fallback)."""
    return lambda remaining, picked: _dkd(ctx, remaining, picked)


def static_step(values: np.ndarray, ctx: QueryContext, extra: str | None = None) -> StepScores:
    """A score fixed per case; DKD's terms are still recorded so every table shows k and d."""

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms["score"] = values[remaining]
        if extra is not None:
            terms[extra] = values[remaining]
        return terms

    return step


def _uniforms(ctx: QueryContext) -> np.ndarray:
    """The seeded uniforms of the random strategies: one per candidate, from (seed, round) alone."""
    return np.random.default_rng([ctx.seed, ctx.round]).random(len(ctx.cases))


def random_step(ctx: QueryContext, cfg: Any = None) -> StepScores:
    """Uniform random keys from (seed, round); also ``fg_random``'s fallback."""
    return static_step(_uniforms(ctx), ctx, extra="random_key")


# ------------------------------------------------------------------------------------ built-in strategies

_MODEL_COLUMNS = (
    Column("asd", pa.float64(), "ASD: predictive entropy inside the Otsu foreground of the previous round's model"),
)
_ASD_EXTRA = (
    Column("asd_flag", pa.bool_(), "the Otsu foreground was empty (whole-volume entropy used)"),
    Column("asd_tau", pa.float64(), "the Otsu threshold"),
)
_ENTROPY = Column("entropy", pa.float64(), "whole-volume mean normalised entropy of the previous round's model")
_MC = (
    Column("mc_entropy", pa.float64(), "MONAI Label's epistemic entropy over the MC-dropout passes"),
    Column("mc_mutual_info", pa.float64(), "BALD's mutual information over the MC-dropout passes"),
)
_RANDOM_KEY = Column("random_key", pa.float64(), "the seeded uniform of the random strategies")
_FG_VOLUME = Column("fg_volume", pa.float64(), "soft predicted foreground volume of the previous round's model")


@dataclass(frozen=True)
class DkdAsdSettings:
    """ASSFT's query (ours: the combination rule)."""

    weight: float = setting(
        help="w in score = w·rank(DKD) + (1−w)·rank(ASD), in [0, 1]", schema="assft.options.dkd_asd.weight"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.weight) <= 1.0:
            raise InputError("settings.options.weight", f"must be in [0, 1], got {self.weight!r}")


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
    """Foreground-aware random (nnActive), see :func:`stages.core.active.foreground_weights`."""

    share: float = setting(
        help="fraction of draws aimed at foreground, in [0, 1] (nnActive: 1/3)", schema="assft.options.fg_random.share"
    )

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0.0 <= self.share <= 1.0:
            raise InputError("settings.options.share", f"must be a number in [0, 1], got {self.share!r}")


@dataclass(frozen=True)
class McDropoutSettings:
    """Monte-Carlo dropout (ours: dropout at the head input, see ``stages.core.inference.mc_dropout_probabilities``)."""

    passes: int = setting(
        help="T stochastic passes (>= 2; MONAI Label's default simulation size is 5)",
        schema="assft.options.mc_dropout.passes",
    )
    dropout: float = setting(
        help="dropout rate on the decoder features at the head input, in (0, 1)",
        schema="assft.options.mc_dropout.dropout",
    )
    measure: str = setting(
        help="monailabel (epistemic entropy of the MC mean over the foreground classes) or mutual_information (BALD)",
        schema="assft.options.mc_dropout.measure",
    )

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
    """Core-set k-centre greedy on the pooled M0 features."""

    metric: str = setting(
        help="euclidean (Sener & Savarese) or cosine (the distance DKD uses)", schema="assft.options.coreset.metric"
    )

    def __post_init__(self) -> None:
        if self.metric not in ("euclidean", "cosine"):
            raise InputError("settings.options.metric", f"must be 'euclidean' or 'cosine', got {self.metric!r}")


def _model_score_step(key: str) -> Callable[[QueryContext, Any], StepScores]:
    def build(ctx: QueryContext, cfg: Any) -> StepScores:
        assert ctx.model_scores is not None
        return static_step(ctx.model_scores[key], ctx)

    return build


def _mc_step(ctx: QueryContext, cfg: McDropoutSettings) -> StepScores:
    key = "mc_entropy" if cfg.measure == "monailabel" else "mc_mutual_info"
    return _model_score_step(key)(ctx, cfg)


def _fg_random_step(ctx: QueryContext, cfg: FgRandomSettings) -> StepScores:
    assert ctx.model_scores is not None
    u = _uniforms(ctx)
    weights, share = foreground_weights(ctx.model_scores["fg_volume"], cfg.share)
    keys = weighted_random_keys(u, weights)

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms.update(
            score=keys[remaining], random_key=u[remaining], fg_share=share[remaining], fg_weight=weights[remaining]
        )
        return terms

    return step


def _coreset_step(ctx: QueryContext, cfg: CoresetSettings) -> StepScores:
    centre = coreset_step(ctx.features, ctx.labelled_features, cfg.metric)

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        terms = _dkd(ctx, remaining, picked)
        terms.update(centre(remaining, picked))
        return terms

    return step


# Registration order is the column order of query.parquet: keep new strategies at the end.
register(
    Strategy(
        "dkd_asd",
        DkdAsdSettings,
        _dkd_asd_step,
        frozenset({MODEL}),
        (
            Column("dkd_rank", pa.float64(), "scaled rank of dkd"),
            *_MODEL_COLUMNS,
            Column("asd_rank", pa.float64(), "scaled rank of asd"),
            *_ASD_EXTRA,
        ),
        help="ASSFT: w·rank(DKD) + (1−w)·rank(ASD); DKD alone at round 0",
    )
)
register(Strategy("dkd", DkdSettings, dkd_step, help="DKD alone: rank(k)·rank(d)"))
register(
    Strategy(
        "asd",
        AsdSettings,
        _model_score_step("asd"),
        frozenset({MODEL}),
        (*_MODEL_COLUMNS, *_ASD_EXTRA),
        help="ASD alone (entropy inside the Otsu foreground)",
    )
)
register(
    Strategy(
        "entropy",
        EntropySettings,
        _model_score_step("entropy"),
        frozenset({MODEL}),
        (_ENTROPY,),
        help="whole-volume mean normalised entropy",
    )
)
register(
    Strategy(
        "mc_dropout",
        McDropoutSettings,
        _mc_step,
        frozenset({MODEL, MC_DROPOUT}),
        _MC,
        help="epistemic uncertainty over MC-dropout passes",
    )
)
register(
    Strategy(
        "coreset",
        CoresetSettings,
        _coreset_step,
        columns=(Column("coreset_distance", pa.float64(), "distance to the nearest centre at its pick"),),
        help="k-centre greedy on the pooled M0 features",
    )
)
register(Strategy("random", RandomSettings, random_step, columns=(_RANDOM_KEY,), help="uniform random"))
register(
    Strategy(
        "fg_random",
        FgRandomSettings,
        _fg_random_step,
        frozenset({MODEL}),
        (
            _RANDOM_KEY,
            _FG_VOLUME,
            Column("fg_share", pa.float64(), "the case's share of the predicted foreground"),
            Column("fg_weight", pa.float64(), "the case's draw weight"),
        ),
        fallback="random",
        help="nnActive's foreground-aware random",
    )
)
