"""Choose a task's buffer B_t of training cases kept for knowledge retention: MDS (lowest M0 SSL loss) or random.

MedSeqFT's Maximum Data Similarity (MDS) selection keeps the K training cases whose mean
self-supervised loss under the original foundation model M0 is lowest: the cases most like the
pre-training data (Ye et al., MedSeqFT, arXiv 2509.06096). ``random`` is the ablation. The table lists
every training case with its score, rank and whether it was selected, so a reader can recompute why.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.errors import InputError, run_cli
from stages.core.io import make_provenance, read_parquet, read_provenance, write_parquet
from stages.core.log import stage_log
from stages.core.settings import add_settings_argument, from_mapping, setting

__all__ = ["BufferSettings", "STRATEGIES", "buffer_size", "select", "run", "main"]


@dataclass(frozen=True)
class BufferSettings:
    """Settings of the buffer selection (defaults: the schema's, for direct callers)."""

    strategy: str = setting("mds", help="mds (lowest mean SSL loss) or random (ablation); the method decides")
    fraction: float = setting(
        0.1,
        help="K as a fraction of the task's training cases (methods.md default 10 %, ours)",
        schema="medseqft.buffer_fraction",
    )
    minimum: int = setting(
        2,
        help="K is at least this (methods.md default 2, ours), and at most the number of cases",
        schema="medseqft.buffer_min",
    )
    seed: int = setting(0, help="seed of the random strategy", schema="seed")


def buffer_size(n_cases: int, fraction: float, minimum: int) -> int:
    """K = max(minimum, round(fraction * n)), capped at n."""
    return min(n_cases, max(minimum, int(math.floor(fraction * n_cases + 0.5))))


def _mds(scores: pd.DataFrame, k: int, settings: BufferSettings) -> pd.Series:
    # ties broken by case id so the choice never depends on row order
    order = scores.sort_values(["mean", "case"], kind="mergesort").index
    return pd.Series(np.arange(len(order)) + 1, index=order).reindex(scores.index)


def _random(scores: pd.DataFrame, k: int, settings: BufferSettings) -> pd.Series:
    cases = sorted(scores["case"])
    perm = np.random.default_rng(settings.seed).permutation(len(cases))
    rank = {cases[j]: i + 1 for i, j in enumerate(perm)}
    return scores["case"].map(rank)


STRATEGIES: dict[str, Callable[[pd.DataFrame, int, BufferSettings], pd.Series]] = {"mds": _mds, "random": _random}


def select(scores: pd.DataFrame, settings: BufferSettings) -> pd.DataFrame:
    """Rank the training cases of ``scores`` (columns case, split, mean, std, scorer) and mark the K selected."""
    if settings.strategy not in STRATEGIES:
        raise InputError("strategy", f"unknown buffer strategy {settings.strategy!r}; choose from {sorted(STRATEGIES)}")
    train = scores[scores["split"] == "train"].reset_index(drop=True)
    k = buffer_size(len(train), settings.fraction, settings.minimum)
    rank = STRATEGIES[settings.strategy](train, k, settings)
    keep = ["case", "mean", "std"] + (["sem"] if "sem" in train.columns else []) + ["scorer"]
    out = train[keep].rename(columns={"mean": "score", "std": "score_std", "sem": "score_sem"})
    out["rank"] = rank.astype(int).to_numpy()
    out["selected"] = out["rank"] <= k
    out["strategy"] = settings.strategy
    return out.sort_values("rank").reset_index(drop=True)


def run(scores: Path, task: str, out: Path, settings: dict[str, Any]) -> None:
    """Write ``out`` (Parquet): case, score, score_std, [score_sem,] scorer, rank, selected, strategy, task.

    ``score_sem`` (the standard error of the SSL score over its R passes) is carried over when the
    scores table has a ``sem`` column, so a reader can see whether the buffer's margin is real.
    """
    if not scores.is_file():
        raise InputError(scores, "missing: score the task's cases first (stages.ssl_scores)")
    table = read_parquet(scores)
    missing = {"case", "split", "mean", "std", "scorer"} - set(table.columns)
    if missing:
        raise InputError(scores, f"lacks columns {sorted(missing)}")
    cfg = from_mapping(BufferSettings, settings, "select_buffer")
    chosen = select(table, cfg)
    chosen.insert(0, "task", task)
    prov = make_provenance(
        "select_buffer",
        settings,
        inputs=[scores],
        seed=cfg.seed,
        task=task,
        scorer=read_provenance(scores).get("scorer"),
        buffer_size=int(chosen["selected"].sum()),
    )
    write_parquet(chosen, out, prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.select_buffer", description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, required=True, help="ssl.parquet of the task")
    parser.add_argument("--task", required=True, help="task name")
    parser.add_argument("--out", type=Path, required=True, help="buffer Parquet to write")
    add_settings_argument(parser, BufferSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.scores, args.task, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
