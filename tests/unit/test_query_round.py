"""Tests for stages.query_round: every strategy on a tiny label-free pool, round-0 fallback, seeds, refusals, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.core.errors import InputError, run_cli
from stages.core.io import read_provenance, write_parquet
from stages.core.nets import FoundationNet, model_id, save_model
from stages.query_round import QUERY_SCHEMA, STRATEGIES, main, run

TASK = "tiny"
POOL = [f"case_{i:02d}" for i in range(7)]
HELD_OUT = ["case_90", "case_91"]  # val / test: never candidates
SETTINGS = {
    "strategy": "dkd_asd",
    "budget": 2,
    "seed": 0,
    "options": {},
    "dkd_knowledge": "winsorised",
    "dkd_winsor_quantile": 0.9,
    "patch_size": [16, 16, 16],
    "overlap": 0.25,
    "sw_batch_size": 2,
    "device": "cpu",
}
#: each strategy's options these tests start from (a test sets what it is about)
OPTIONS = {
    "dkd_asd": {"weight": 0.5},
    "fg_random": {"share": 1 / 3},
    "coreset": {"metric": "euclidean"},
    "mc_dropout": {"passes": 8, "dropout": 0.2, "measure": "monailabel"},
}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A preprocessed task folder *without any label file*, M0 scores and features, a model with the head."""
    root = tmp_path_factory.mktemp("task")
    data = root / "data"
    rng = np.random.default_rng(0)
    cases = POOL + HELD_OUT
    shapes = [(13 + i % 3, 11 + i % 4, 9 + i % 2) for i in range(len(cases))]
    for case, shape in zip(cases, shapes):
        (data / "cases").mkdir(parents=True, exist_ok=True)
        np.save(data / "cases" / f"{case}.npy", rng.normal(size=(1, *shape)).astype(np.float32))
    splits = ["train"] * len(POOL) + ["val", "test"]
    write_parquet(pd.DataFrame({"case": cases, "split": splits}), data / "manifest.parquet", {"stage": "test"})
    # k: distinct SSL losses; features: two tight clusters plus loners, so diversity matters
    base = np.eye(8)
    feats = [base[0] + 0.01 * i * base[5] for i in range(3)] + [base[1], base[2] + 0.01 * base[6], base[2], base[3]]
    feats += [base[4], base[7]]
    write_parquet(
        pd.DataFrame(
            {
                "case": cases,
                "split": splits,
                "mean": np.linspace(3.0, 1.0, len(cases)),
                "std": 0.1,
                "R": 4,
                "scorer": "ssl",
            }
        ),
        root / "ssl.parquet",
        {"stage": "test"},
    )
    flat = pa.array(np.concatenate(feats).astype(np.float32))
    table = pa.table(
        {
            "case": cases,
            "split": splits,
            "feature": pa.FixedSizeListArray.from_arrays(flat, 8),
            "model_id": ["m0"] * len(cases),
        }
    )
    write_parquet(table, root / "features.parquet", {"stage": "test"})
    net = FoundationNet("basicunet", arch_kwargs={"features": [4, 4, 8, 8, 16, 4]}, heads={TASK: 3}, seed=0)
    save_model(net, root / "model", {"stage": "test"})
    write_parquet(pd.DataFrame({"case": [POOL[0]], "round": [0]}), root / "labelled.parquet", {"stage": "test"})
    return {
        "data": data,
        "ssl": root / "ssl.parquet",
        "features": root / "features.parquet",
        "model": root / "model",
        "labelled": root / "labelled.parquet",
        "root": root,
    }


def _run(
    task: dict[str, Path], out: Path, round_index: int, model: bool = True, labelled: bool = True, **settings
) -> pd.DataFrame:
    settings = {**SETTINGS, **settings}
    settings["options"] = {**OPTIONS.get(settings["strategy"], {}), **settings["options"]}
    run(
        task["data"],
        TASK,
        task["ssl"],
        task["features"],
        round_index,
        out,
        settings,
        labelled=task["labelled"] if labelled else None,
        model_dir=task["model"] if model else None,
    )
    return pd.read_parquet(out)


def test_round_zero_model_strategies_fall_back_to_dkd(task: dict[str, Path], tmp_path: Path) -> None:
    table = _run(task, tmp_path / "q.parquet", 0, model=False, labelled=False, strategy="dkd_asd")
    assert pq.read_schema(tmp_path / "q.parquet").remove_metadata().equals(QUERY_SCHEMA)
    assert table["case"].tolist() == POOL  # every pool case, nothing of val / test
    assert table["fallback"].eq("dkd").all() and table["model_id"].isna().all()
    picked = table[table["picked"]].sort_values("pick_order")
    assert picked["pick_order"].tolist() == [0, 1]
    # S is empty at the first pick: d = 1 for all, so the first pick is the highest knowledge gap
    assert picked["case"].iloc[0] == POOL[0] and picked["d"].iloc[0] == 1.0
    assert table["asd"].isna().all() and table["k"].notna().all()
    dkd = table[["k_rank", "d_rank"]].prod(axis=1)
    np.testing.assert_allclose(table["dkd"], dkd)
    prov = read_provenance(tmp_path / "q.parquet")
    assert prov["fallback"] == "dkd" and prov["round"] == 0 and prov["picked"] == picked["case"].tolist()
    # the fallback picks exactly what DKD picks
    plain = _run(task, tmp_path / "dkd.parquet", 0, model=False, labelled=False, strategy="dkd")
    assert plain.loc[plain["picked"], "case"].tolist() == table.loc[table["picked"], "case"].tolist()


def test_dkd_skips_the_twin_of_a_labelled_case(task: dict[str, Path], tmp_path: Path) -> None:
    table = _run(task, tmp_path / "q.parquet", 1, model=False, strategy="dkd")
    assert POOL[0] not in table["case"].tolist()  # labelled cases are no candidates
    picks = table[table["picked"]].sort_values("pick_order")["case"].tolist()
    # case_01 and case_02 are near-copies of the labelled case_00 despite their high knowledge gap
    assert not {POOL[1], POOL[2]} & set(picks)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_with_a_model_and_reruns_identically(
    strategy: str, task: dict[str, Path], tmp_path: Path
) -> None:
    options = {"passes": 3, "dropout": 0.3} if strategy == "mc_dropout" else {}
    table = _run(task, tmp_path / "a.parquet", 1, strategy=strategy, options=options)
    assert table["picked"].sum() == 2 and table["fallback"].isna().all()
    assert set(table["case"]) == set(POOL[1:])
    needs_model = STRATEGIES[strategy].needs_model
    assert table["model_id"].eq(model_id(task["model"])).all() == needs_model
    if needs_model:
        assert table["asd"].between(0, 1).all() and table["entropy"].between(0, 1).all()
        assert table["asd_flag"].notna().all()
    column = {
        "asd": "asd",
        "entropy": "entropy",
        "mc_dropout": "mc_entropy",
        "random": "random_key",
        "coreset": "coreset_distance",
        "dkd": "dkd",
    }.get(strategy)
    if column is not None:
        np.testing.assert_allclose(table["score"], table[column])
    if strategy == "dkd_asd":
        np.testing.assert_allclose(table["score"], 0.5 * table["dkd_rank"] + 0.5 * table["asd_rank"])
    _run(task, tmp_path / "b.parquet", 1, strategy=strategy, options=options)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_random_is_deterministic_per_seed(task: dict[str, Path], tmp_path: Path) -> None:
    def picks(seed: int, name: str) -> list[str]:
        t = _run(task, tmp_path / name, 1, model=False, strategy="random", seed=seed, budget=3)
        return t[t["picked"]].sort_values("pick_order")["case"].tolist()

    assert picks(0, "a.parquet") == picks(0, "b.parquet")
    assert len({tuple(picks(s, f"s{s}.parquet")) for s in range(4)}) > 1


def test_budget_larger_than_pool_picks_everything(task: dict[str, Path], tmp_path: Path) -> None:
    table = _run(task, tmp_path / "q.parquet", 1, model=False, strategy="coreset", budget=50)
    assert table["picked"].all() and sorted(table["pick_order"]) == list(range(len(POOL) - 1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": "nope"}, "unknown strategy"),
        ({"budget": 0}, "budget"),
        ({"strategy": "mc_dropout", "options": {"passes": 1}}, "passes"),
        ({"strategy": "dkd", "options": {"weight": 0.3}}, "unknown options"),
        ({"typo": 1}, "unknown query settings"),
    ],
)
def test_bad_settings_are_refused_before_writing(
    task: dict[str, Path], tmp_path: Path, change: dict, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        _run(task, tmp_path / "q.parquet", 1, **change)
    assert not (tmp_path / "q.parquet").exists()


def test_model_strategy_needs_the_model_after_round_zero(task: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="previous round's model"):
        _run(task, tmp_path / "q.parquet", 1, model=False, strategy="asd")
    with pytest.raises(InputError, match="not earlier than round 0"):
        _run(task, tmp_path / "q.parquet", 0, model=False, strategy="dkd")  # labels of round 0 at round 0
    assert not (tmp_path / "q.parquet").exists()


def test_cli_writes_and_refuses(task: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--data",
        str(task["data"]),
        "--task",
        TASK,
        "--ssl-scores",
        str(task["ssl"]),
        "--features",
        str(task["features"]),
        "--round",
        "0",
        "--out",
        str(tmp_path / "q.parquet"),
    ]
    coreset = {**SETTINGS, "strategy": "coreset", "options": OPTIONS["coreset"]}
    main([*args, "--settings", json.dumps({**coreset, "budget": 1})])
    assert pd.read_parquet(tmp_path / "q.parquet")["picked"].sum() == 1
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*args, "--settings", json.dumps({**coreset, "budget": -1})])
    assert exit_info.value.code == 2
    assert "settings.budget" in capsys.readouterr().err


def _picks(table: pd.DataFrame) -> list[str]:
    return table[table["picked"]].sort_values("pick_order")["case"].tolist()


def test_fg_random_round_zero_is_plain_random_with_the_same_seed(task: dict[str, Path], tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        fg = _run(
            task,
            tmp_path / f"fg{seed}.parquet",
            0,
            model=False,
            labelled=False,
            strategy="fg_random",
            seed=seed,
            budget=3,
        )
        plain = _run(
            task, tmp_path / f"r{seed}.parquet", 0, model=False, labelled=False, strategy="random", seed=seed, budget=3
        )
        assert fg["fallback"].eq("random").all() and fg["model_id"].isna().all()
        assert _picks(fg) == _picks(plain)
        np.testing.assert_allclose(fg["random_key"], plain["random_key"])
        assert fg["fg_weight"].isna().all()


def test_fg_random_with_the_round_model_weights_by_predicted_foreground(task: dict[str, Path], tmp_path: Path) -> None:
    table = _run(task, tmp_path / "q.parquet", 1, strategy="fg_random", seed=3, budget=3)
    assert table["fallback"].isna().all() and table["model_id"].notna().all()
    assert table["fg_weight"].sum() == pytest.approx(1.0) and table["fg_share"].sum() == pytest.approx(1.0)
    assert (table["fg_volume"] > 0).all()
    np.testing.assert_allclose(table["fg_weight"], (2 / 3) / len(table) + table["fg_share"] / 3)
    np.testing.assert_allclose(table["score"], np.log(table["random_key"]) / table["fg_weight"])
    # with no draw aimed at foreground it is plain random: same uniforms, same picks
    none = _run(task, tmp_path / "s0.parquet", 1, strategy="fg_random", seed=3, budget=3, options={"share": 0.0})
    plain = _run(task, tmp_path / "r.parquet", 1, model=False, strategy="random", seed=3, budget=3)
    assert _picks(none) == _picks(plain)
    with pytest.raises(InputError, match="share"):
        _run(task, tmp_path / "bad.parquet", 1, strategy="fg_random", options={"share": 2})


def test_fg_random_known_picks_from_known_foreground() -> None:
    from stages.query_round import FgRandomSettings, QueryContext, query

    n = 5
    feats = np.eye(n)
    volumes = np.zeros((n, 2))
    volumes[3] = [100.0, 5.0]  # the only case with predicted foreground
    scores = {"fg_volume": volumes}
    for seed in range(6):
        ctx = QueryContext(
            [f"c{i}" for i in range(n)], np.arange(n, dtype=float), feats, np.zeros((0, n)), scores, seed, 1
        )
        order, columns, fallback = query(ctx, "fg_random", FgRandomSettings(share=1.0), 1)
        assert order == [3] and fallback is None  # every draw aimed at foreground: always case 3
        np.testing.assert_allclose(columns["fg_weight"], [0, 0, 0, 1, 0])


def test_mc_dropout_bald_and_coreset_cosine_are_selectable(task: dict[str, Path], tmp_path: Path) -> None:
    opts = {"passes": 3, "dropout": 0.3}
    bald = _run(
        task, tmp_path / "bald.parquet", 1, strategy="mc_dropout", options={**opts, "measure": "mutual_information"}
    )
    np.testing.assert_allclose(bald["score"], bald["mc_mutual_info"])
    assert _picks(bald) == bald.sort_values(["mc_mutual_info", "d"], ascending=False)["case"].head(2).tolist()
    entropy = _run(task, tmp_path / "ent.parquet", 1, strategy="mc_dropout", options=opts)
    np.testing.assert_allclose(entropy["score"], entropy["mc_entropy"])
    cosine = _run(task, tmp_path / "cos.parquet", 1, model=False, strategy="coreset", options={"metric": "cosine"})
    euclid = _run(task, tmp_path / "l2.parquet", 1, model=False, strategy="coreset")
    # features are unit vectors or near it, labelled = case_00 (e0): the first pick is the case farthest away
    first = cosine[cosine["pick_order"] == 0].iloc[0]
    assert first["coreset_distance"] == pytest.approx(cosine["d"].max())  # cosine distance = DKD's d
    assert euclid["coreset_distance"].notna().all() and cosine["coreset_distance"].notna().all()


def test_dkd_knowledge_winsorised_or_raw(task: dict[str, Path], tmp_path: Path) -> None:
    # k = 3.0 > 2.75 > ... over the 7 pool cases; clipped at the 0.5 quantile the top four tie
    wins = _run(task, tmp_path / "w.parquet", 0, model=False, labelled=False, strategy="dkd", dkd_winsor_quantile=0.5)
    raw = _run(task, tmp_path / "r.parquet", 0, model=False, labelled=False, strategy="dkd", dkd_knowledge="rank")
    cap = float(np.quantile(wins["k"], 0.5))
    np.testing.assert_allclose(wins["k_used"], np.minimum(wins["k"], cap))
    np.testing.assert_allclose(raw["k_used"], raw["k"])
    assert _picks(raw)[0] == POOL[0]  # the raw rank opens with the largest loss
    assert _picks(wins)[0] == POOL[3]  # the tied top four: the one nearest the cap
    prov = read_provenance(tmp_path / "w.parquet")
    assert prov["dkd_knowledge"] == "winsorised" and prov["k_cap"] == pytest.approx(cap)
    with pytest.raises(InputError, match="dkd_knowledge"):
        _run(task, tmp_path / "x.parquet", 0, model=False, labelled=False, strategy="dkd", dkd_knowledge="max")
    with pytest.raises(InputError, match="dkd_winsor_quantile"):
        _run(task, tmp_path / "x.parquet", 0, model=False, labelled=False, strategy="dkd", dkd_winsor_quantile=0)


def test_a_registered_toy_strategy_runs_through_query_round(
    task: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A new strategy is a settings dataclass, a step function and one register() call: query_round
    dispatches to it, its options are checked by its dataclass, and its column joins the table."""
    from dataclasses import dataclass

    from stages.core.settings import setting
    from stages.core.strategies import MODEL, Column, Strategy, dkd_step, query_schema, register

    @dataclass(frozen=True)
    class ToySettings:
        flip: bool = setting(help="pick the smallest k first instead of the largest")

    def toy_step(ctx, cfg: ToySettings):
        base = dkd_step(ctx)

        def step(remaining, picked):
            terms = base(remaining, picked)
            sign = -1.0 if cfg.flip else 1.0
            terms["toy_k"] = ctx.k[remaining]
            terms["score"] = sign * ctx.k[remaining]
            return terms

        return step

    register(
        Strategy(
            "toy",
            ToySettings,
            toy_step,
            frozenset({MODEL}),
            (Column("toy_k", pa.float64(), "k as the toy saw it"), Column("asd", pa.float64(), "shared")),
        )
    )
    request.addfinalizer(lambda: STRATEGIES.pop("toy"))
    assert query_schema().names[-1] == "toy_k" and query_schema().names[:-1] == QUERY_SCHEMA.names
    table = _run(task, tmp_path / "toy.parquet", 1, strategy="toy", options={"flip": True})
    assert pq.read_schema(tmp_path / "toy.parquet").names == query_schema().names
    assert table["toy_k"].notna().all() and table["asd"].notna().all()  # model scores: it declared MODEL
    picks = table[table["picked"]].sort_values("pick_order")["case"].tolist()
    assert picks == table.sort_values("k")["case"].head(2).tolist()  # smallest knowledge gap first
    assert read_provenance(tmp_path / "toy.parquet")["options"] == {"flip": True}
    # round 0 without a model: the declared model input means the DKD fallback
    zero = _run(
        task, tmp_path / "toy0.parquet", 0, model=False, labelled=False, strategy="toy", options={"flip": False}
    )
    assert zero["fallback"].eq("dkd").all() and zero["toy_k"].isna().all()
    with pytest.raises(InputError, match=r"missing options \['flip'\]"):
        _run(task, tmp_path / "bad.parquet", 1, strategy="toy")
    with pytest.raises(ValueError, match="registered already"):
        register(Strategy("toy", ToySettings, toy_step))
    with pytest.raises(ValueError, match="is double elsewhere"):
        register(Strategy("toy2", ToySettings, toy_step, columns=(Column("toy_k", pa.int64(), "clash"),)))
