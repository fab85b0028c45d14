"""MDS keeps the K training cases with the lowest mean SSL loss; random is the seeded ablation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stages.core.errors import InputError
from stages.core.io import make_provenance, read_provenance, write_parquet
from stages.select_buffer import BufferSettings, buffer_size, run, select


def scores_table() -> pd.DataFrame:
    # case_d is a test case: never a buffer candidate even though its loss is the lowest
    return pd.DataFrame(
        {
            "case": ["case_a", "case_b", "case_c", "case_d", "case_e", "case_f"],
            "split": ["train", "train", "train", "test", "train", "val"],
            "mean": [0.9, 0.2, 0.5, 0.01, 0.3, 0.0],
            "std": [0.1] * 6,
            "R": [8] * 6,
            "scorer": ["ssl"] * 6,
        }
    )


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "k"), [(4, 0.1, 2, 2), (40, 0.1, 2, 4), (45, 0.1, 2, 5), (1, 0.1, 2, 1)]
)
def test_buffer_size(n: int, fraction: float, minimum: int, k: int) -> None:
    assert buffer_size(n, fraction, minimum) == k


def test_mds_picks_the_lowest_loss_training_cases() -> None:
    out = select(scores_table(), BufferSettings(strategy="mds", fraction=0.5, minimum=1))
    assert out.loc[out["selected"], "case"].tolist() == ["case_b", "case_e"]
    assert out["case"].tolist() == ["case_b", "case_e", "case_c", "case_a"]  # ranked, train split only
    assert out["rank"].tolist() == [1, 2, 3, 4]


def test_random_is_seeded_and_ignores_scores() -> None:
    a = select(scores_table(), BufferSettings(strategy="random", fraction=0.5, minimum=1, seed=3))
    b = select(scores_table(), BufferSettings(strategy="random", fraction=0.5, minimum=1, seed=3))
    assert a.equals(b) and a["selected"].sum() == 2
    picks = {
        tuple(
            select(scores_table(), BufferSettings(strategy="random", fraction=0.5, minimum=1, seed=s)).loc[
                lambda d: d["selected"], "case"
            ]
        )
        for s in range(10)
    }
    assert len(picks) > 1


def test_stage_writes_every_case_with_provenance(tmp_path: Path) -> None:
    src = tmp_path / "ssl.parquet"
    write_parquet(scores_table(), src, make_provenance("ssl_scores", {}, scorer="ssl"))
    out = tmp_path / "buffer.parquet"
    run(src, "demo", out, {"strategy": "mds", "fraction": 0.1, "minimum": 2, "seed": 0})
    table = pd.read_parquet(out)
    assert set(table.columns) >= {"task", "case", "score", "score_std", "scorer", "rank", "selected", "strategy"}
    assert table["selected"].sum() == 2
    prov = read_provenance(out)
    assert prov["stage"] == "select_buffer" and prov["buffer_size"] == 2 and str(src) in prov["inputs"]


def test_unknown_strategy_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown buffer strategy"):
        select(scores_table(), BufferSettings(strategy="best"))
    with pytest.raises(InputError, match="missing"):
        run(tmp_path / "nope.parquet", "t", tmp_path / "o.parquet", {})
