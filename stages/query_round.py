"""One ASSFT query round: score every still-unlabelled pool case of a target task and pick the round's labelling budget greedily.

The pool is the task's ``train`` split; its labels are never read here (only images, the M0 SSL
scores and the M0 pooled features). The strategy is chosen by name from the registry
(:mod:`stages.core.strategies`: ASSFT's ``dkd_asd`` and its baselines), with its own settings under
``options``; this stage knows no strategy by name. Strategies that need a target model fall back at
round 0, where no target head exists yet (DKD, or uniform random for ``fg_random``), and the table's
``fallback`` column says so. Every strategy picks greedily, highest score first; exact ties go to the
candidate farther from the labelled-or-picked set (cosine d), then to the smaller case id. DKD's k and
d are recorded for every strategy, so the tables of all strategies can be compared on the same terms.

DKD's knowledge gap k (``dkd_knowledge``): ``winsorised`` (default) clips M0's SSL loss at its
``dkd_winsor_quantile`` over the round's candidates before ranking, so the first pick (where the
diversity term is 1 for everyone) is not the single most extreme, outlier-prone loss: the top tenth
share the top rank and ties go to the larger distance, then to the smaller raw loss; ``rank`` ranks
the raw loss (the earlier behaviour). The table keeps the raw ``k`` and the ``k_used``.

Output: ``query.parquet``, one row per candidate (columns: :func:`stages.core.strategies.query_schema`)
with every component score (the values at the step it was picked, or after the last pick for the
others), the combined ``score``, ``picked``, ``pick_order``, ``round``, ``strategy``, ``seed`` and
``model_id`` (null without a model).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from stages.core.active import (
    asd_score,
    greedy_select,
    mc_dropout_scores,
    mean_entropy,
    read_case_column,
    read_features,
    winsorise,
)
from stages.core.errors import InputError, run_cli
from stages.core.inference import mc_dropout_probabilities, predict_probabilities, resolve_device
from stages.core.io import make_provenance, write_parquet
from stages.core.log import stage_log
from stages.core.nets import load_model, model_id, seed_from
from stages.core.settings import add_settings_argument, from_mapping, setting
from stages.core.strategies import (
    STRATEGIES,
    AsdSettings,
    CoresetSettings,
    DkdAsdSettings,
    DkdSettings,
    EntropySettings,
    FgRandomSettings,
    McDropoutSettings,
    QueryContext,
    RandomSettings,
    Strategy,
    dkd_step,
    query_schema,
    random_step,
)

__all__ = [
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
    "QuerySettings",
    "RandomSettings",
    "Strategy",
    "query",
    "resolve_settings",
    "run",
    "main",
]

log = logging.getLogger("stages.query_round")

DKD_KNOWLEDGE = ("winsorised", "rank")


@dataclass(frozen=True, kw_only=True)
class QuerySettings:
    """The settings of a query job; the pipeline passes every one (``assft`` keys, inference, device)."""

    strategy: str = setting(help="a registered strategy (stages.core.strategies.STRATEGIES)", schema="assft.strategies")
    budget: int = setting(help="cases picked this round (all remaining ones if fewer are left)", schema="assft.budget")
    seed: int = setting(help="seeds the random strategies and the MC-dropout masks (the chain's seed)", schema="seed")
    options: dict[str, Any] = setting(
        help="the strategy's options (its settings dataclass; assft.options.<strategy>)", schema="assft.options"
    )
    dkd_knowledge: str = setting(
        help="DKD's k: winsorised (clipped at dkd_winsor_quantile) or rank (raw)", schema="assft.dkd_knowledge"
    )
    dkd_winsor_quantile: float = setting(
        help="the quantile of k over the round's candidates where it is clipped", schema="assft.dkd_winsor_quantile"
    )
    patch_size: list[int] | None = setting(
        help="sliding-window size of the model's predictions (the training patch)", schema="train.patch_size"
    )
    overlap: float = setting(help="sliding-window overlap", schema="inference.overlap")
    sw_batch_size: int = setting(help="windows per forward pass", schema="inference.sw_batch_size")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(
                "settings.strategy", f"unknown strategy {self.strategy!r}; choose from {sorted(STRATEGIES)}"
            )
        if self.budget < 1:
            raise InputError("settings.budget", f"must be an integer >= 1, got {self.budget!r}")
        if self.dkd_knowledge not in DKD_KNOWLEDGE:
            raise InputError(
                "settings.dkd_knowledge", f"must be one of {list(DKD_KNOWLEDGE)}, got {self.dkd_knowledge!r}"
            )
        if not 0.0 < self.dkd_winsor_quantile <= 1.0:
            raise InputError(
                "settings.dkd_winsor_quantile", f"must be a number in (0, 1], got {self.dkd_winsor_quantile!r}"
            )


def resolve_settings(settings: Mapping[str, Any]) -> tuple[QuerySettings, Any]:
    """Check ``settings`` against :class:`QuerySettings` and build the strategy's options dataclass.

    Returns ``(settings, options)``. Unknown and missing keys are refused, in the settings and in the
    options alike (a typo must not fall back to a default).
    """
    cfg = from_mapping(QuerySettings, settings, "query_round", "settings", noun="query settings")
    strategy = STRATEGIES[cfg.strategy]
    options = from_mapping(
        strategy.settings, cfg.options, f"query_round ({cfg.strategy})", "settings.options", noun="options"
    )
    return cfg, options


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
        step = random_step(ctx) if fallback == "random" else dkd_step(ctx)
    else:
        step = spec.step(ctx, options)
    result = greedy_select(len(ctx.cases), budget, step)
    return result.order, result.columns, fallback


#: Columns of ``query.parquet`` of the built-in strategies (null where a score does not apply); a table
#: is written with :func:`stages.core.strategies.query_schema`, which adds any strategy registered since.
QUERY_SCHEMA = query_schema()


def _floats(values: np.ndarray | None, n: int) -> list[float | None]:
    if values is None:
        return [None] * n
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def _column(values: Any, kind: pa.DataType, n: int) -> list[Any]:
    """One column's values as Python objects of the schema's type (None where absent or not finite)."""
    if values is None:
        return [None] * n
    if pa.types.is_floating(kind):
        return _floats(values, n)
    if pa.types.is_boolean(kind):
        return [bool(v) for v in values]
    return list(values)


def _model_scores(
    model_dir: Path, task: str, data: Path, cases: list[str], cfg: QuerySettings, options: Any, mc: bool
) -> dict[str, np.ndarray]:
    """ASD, entropy, soft foreground volume per class (and MC-dropout scores) of every candidate under the previous round's model."""
    device = resolve_device(cfg.device)
    model = load_model(model_dir)
    if task not in model.seg_heads:
        heads = sorted(model.seg_heads)
        raise InputError(model_dir / "model.json", f"has no segmentation head {task!r} (heads: {heads})")
    model.to(device).eval()
    patch = cfg.patch_size
    keys = ("asd", "asd_flag", "asd_tau", "entropy", "mc_entropy", "mc_mutual_info")
    out: dict[str, list[Any]] = {k: [] for k in (*keys, "fg_volume")}
    for case in tqdm(cases, desc=f"query scores {task}", mininterval=2):
        image = np.load(data / "cases" / f"{case}.npy")  # whole volume: inference reads all of it
        probs = predict_probabilities(model, task, image, patch, cfg.overlap, cfg.sw_batch_size, device)
        asd, flag, tau = asd_score(probs)
        out["asd"].append(asd)
        out["asd_flag"].append(float(flag))
        out["asd_tau"].append(tau)
        out["entropy"].append(mean_entropy(probs))
        out["fg_volume"].append(np.asarray(probs[1:], dtype=np.float64).sum(axis=(1, 2, 3)))
        if mc:
            generator = torch.Generator().manual_seed(seed_from("mc_dropout", cfg.seed, case))
            samples = mc_dropout_probabilities(
                model,
                task,
                image,
                patch,
                options.passes,
                options.dropout,
                generator,
                cfg.overlap,
                cfg.sw_batch_size,
                device,
            )
            scores = mc_dropout_scores(samples)
            out["mc_entropy"].append(scores["mc_entropy"])
            out["mc_mutual_info"].append(scores["mc_mutual_info"])
        else:
            out["mc_entropy"].append(np.nan)
            out["mc_mutual_info"].append(np.nan)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


@dataclass
class _Pool:
    """The round's candidates: the task's train split less the cases labelled so far."""

    manifest_path: Path
    cases: list[str]
    labelled: list[str]


def _pool(data: Path, round_index: int, labelled: Path | None, budget: int) -> _Pool:
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
    if len(cases) < budget:
        log.warning("round %d: only %d candidates for a budget of %d; picking all", round_index, len(cases), budget)
    return _Pool(manifest_path, cases, labelled_cases)


@dataclass
class _Knowledge:
    """DKD's knowledge gap of the candidates: as ranked (``k``), unclipped (``k_raw``), its cap and scorer."""

    k: np.ndarray
    k_raw: np.ndarray | None
    k_cap: float | None
    scorer: list[str]


def _knowledge(ssl_scores: Path, cases: list[str], cfg: QuerySettings) -> _Knowledge:
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
    scorer = scores.loc[cases, "scorer"].astype(str).tolist()
    if cfg.dkd_knowledge == "winsorised":
        clipped, cap = winsorise(k, cfg.dkd_winsor_quantile)
        return _Knowledge(clipped, k, cap, scorer)
    return _Knowledge(k, None, None, scorer)


def _table(
    cases: list[str],
    round_index: int,
    cfg: QuerySettings,
    mid: str | None,
    fallback: str | None,
    order: list[int],
    columns: Mapping[str, np.ndarray],
    knowledge: _Knowledge,
    model_scores: Mapping[str, np.ndarray] | None,
) -> pa.Table:
    """The query table: the schema of :func:`query_schema`, each column from the step's columns, else the model's."""
    n = len(cases)
    pick_order = {idx: i for i, idx in enumerate(order)}
    ms = dict(model_scores or {})
    if "fg_volume" in ms:
        ms["fg_volume"] = ms["fg_volume"].sum(axis=1)
    known: dict[str, Any] = {
        "case": cases,
        "round": [round_index] * n,
        "strategy": [cfg.strategy] * n,
        "seed": [cfg.seed] * n,
        "model_id": [mid] * n,
        "fallback": [fallback] * n,
        "picked": [i in pick_order for i in range(n)],
        "pick_order": [pick_order.get(i) for i in range(n)],
        "k": knowledge.k if knowledge.k_raw is None else knowledge.k_raw,
        "k_scorer": knowledge.scorer,
        "k_used": knowledge.k,
    }
    schema = query_schema()
    data = {}
    for field in schema:
        values = known[field.name] if field.name in known else columns.get(field.name, ms.get(field.name))
        data[field.name] = _column(values, field.type, n)
    return pa.Table.from_pydict(data, schema=schema)


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
    """Score the unlabelled pool of ``task`` and write ``out`` (``query.parquet``, see :func:`query_schema`).

    Args:
        data: the task's preprocessed folder (``manifest.parquet``, ``cases/{case}.npy``); only images
            of pool cases are read.
        task: the task name (the model's segmentation head).
        ssl_scores: M0's SSL scores of the task (``scores/{task}/ssl.parquet``): k(x).
        features: M0's pooled features of the task (``scores/{task}/features.parquet``).
        round_index: the query round r (0, 1, ...).
        out: the Parquet file to write.
        settings: see :class:`QuerySettings`.
        labelled: the labelled set so far (``labelled.parquet`` of round r−1); None at round 0.
        model_dir: the previous round's model folder; None at round 0. Ignored by the strategies that
            read no model (``dkd``, ``coreset``, ``random``), whose tables then carry no model scores.
    """
    data, out = Path(data), Path(out)
    cfg, options = resolve_settings(settings)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise InputError("--round", f"must be an integer >= 0, got {round_index!r}")
    strategy = STRATEGIES[cfg.strategy]
    if strategy.needs_model and model_dir is None and round_index > 0:
        raise InputError(
            "--model", f"strategy {cfg.strategy!r} needs the previous round's model at round {round_index}"
        )
    use_model = model_dir is not None and strategy.needs_model
    if use_model and cfg.patch_size is None:
        raise InputError("settings.patch_size", "is needed to predict with the model (the training patch size)")

    pool = _pool(data, round_index, labelled, cfg.budget)
    cases = pool.cases
    knowledge = _knowledge(ssl_scores, cases, cfg)
    feats = read_features(features, cases)
    labelled_feats = read_features(features, pool.labelled) if pool.labelled else np.zeros((0, feats.shape[1]))
    model_scores = None
    mid = None
    if use_model:
        assert model_dir is not None
        absent = [c for c in cases if not (data / "cases" / f"{c}.npy").is_file()]
        if absent:
            raise InputError(data / "cases", f"missing preprocessed images of {absent[:10]}")
        mid = model_id(model_dir)
        model_scores = _model_scores(model_dir, task, data, cases, cfg, options, strategy.mc)

    ctx = QueryContext(cases, knowledge.k, feats, labelled_feats, model_scores, cfg.seed, round_index, knowledge.k_raw)
    order, columns, fallback = query(ctx, cfg.strategy, options, cfg.budget)
    table = _table(cases, round_index, cfg, mid, fallback, order, columns, knowledge, model_scores)

    inputs = [pool.manifest_path, ssl_scores, features]
    inputs += [labelled] if labelled is not None else []
    inputs += [model_dir / "model.safetensors"] if use_model and model_dir is not None else []
    prov = make_provenance(
        "query_round",
        dict(settings),
        inputs=inputs,
        seed=cfg.seed,
        task=task,
        round=round_index,
        strategy=cfg.strategy,
        options=dataclasses.asdict(options),
        budget=cfg.budget,
        model_id=mid,
        fallback=fallback,
        k_scorer=sorted(set(knowledge.scorer)),
        picked=[cases[i] for i in order],
        dkd_knowledge=cfg.dkd_knowledge,
        dkd_winsor_quantile=cfg.dkd_winsor_quantile,
        k_cap=knowledge.k_cap,
        labelled=sorted(pool.labelled),
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
    add_settings_argument(parser, QuerySettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(
            args.data,
            args.task,
            args.ssl_scores,
            args.features,
            args.round,
            args.out,
            args.settings,
            labelled=args.labelled,
            model_dir=args.model,
        )


if __name__ == "__main__":
    run_cli(main)
