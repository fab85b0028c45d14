"""Tests for stages.select_pseudo: the confidence-and-distance rule, the pseudo-label folder, the none/all baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.core.active import cosine_distances, foreground_confidence, selective_keep
from stages.core.errors import InputError
from stages.core.inference import predict_probabilities
from stages.core.io import read_provenance, write_parquet
from stages.core.nets import FoundationNet, load_model, model_id, save_model
from stages.select_pseudo import PSEUDO_SCHEMA, run

TASK = "tiny"
POOL = [f"case_{i:02d}" for i in range(8)]
LABELLED = POOL[:2]
SETTINGS = {
    "mode": "selective",
    "q": 0.5,
    "patch_size": [16, 16, 16],
    "overlap": 0.25,
    "sw_batch_size": 2,
    "device": "cpu",
}


# ------------------------------------------------------------------------------------------------ rule


def test_selection_rule_on_a_hand_made_table() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.85])
    distance = np.array([0.1, 0.5, 0.2, 0.05, 0.9, 0.3])
    kept, reasons, c_thr, e_thr = selective_keep(confidence, distance, 0.5)
    assert c_thr == pytest.approx(0.825) and e_thr == pytest.approx(0.25)  # the medians
    assert kept.tolist() == [True, False, False, False, False, False]
    assert reasons == [
        "kept",
        "low confidence; far from labelled",
        "low confidence",
        "low confidence",
        "far from labelled",
        "far from labelled",
    ]


def test_selection_rule_keeps_ties_and_never_keeps_empty_predictions() -> None:
    confidence = np.array([0.5, 0.5, 0.5, 0.1])
    distance = np.full(4, 0.2)
    kept, reasons, c_thr, e_thr = selective_keep(confidence, distance, 0.5, never=np.array([True, False, False, False]))
    assert (c_thr, e_thr) == (0.5, 0.2)
    assert kept.tolist() == [False, True, True, False]
    assert reasons[0] == "empty prediction" and reasons[3] == "low confidence"
    everyone, *_ = selective_keep(np.array([0.1, 0.9, 0.5]), np.array([0.3, 0.1, 0.9]), 1.0)
    assert everyone.all()
    with pytest.raises(ValueError, match="q must be"):
        selective_keep(confidence, distance, 0.0)


# ------------------------------------------------------------------------------------------------ stage


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A label-free task folder, M0 features, a labelled set of two cases, a model with the task head."""
    root = tmp_path_factory.mktemp("pseudo")
    data = root / "data"
    (data / "cases").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = POOL + ["case_99"]
    for i, case in enumerate(cases):
        shape = (13 + i % 2, 11, 9 + i % 3)
        np.save(data / "cases" / f"{case}.npy", (rng.normal(size=(1, *shape)) * (1 + i)).astype(np.float32))
    splits = ["train"] * len(POOL) + ["test"]
    write_parquet(pd.DataFrame({"case": cases, "split": splits}), data / "manifest.parquet", {"stage": "test"})
    feats = rng.normal(size=(len(cases), 6)).astype(np.float32)
    table = pa.table(
        {
            "case": cases,
            "split": splits,
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), 6),
            "model_id": ["m0"] * len(cases),
        }
    )
    write_parquet(table, root / "features.parquet", {"stage": "test"})
    write_parquet(pd.DataFrame({"case": LABELLED, "round": [0, 0]}), root / "labelled.parquet", {"stage": "test"})
    net = FoundationNet("basicunet", arch_kwargs={"features": [4, 4, 8, 8, 16, 4]}, heads={TASK: 3}, seed=0)
    save_model(net, root / "model", {"stage": "test"})
    with torch.no_grad():  # a head that sees only background
        net.seg_heads[TASK].weight.zero_()
        net.seg_heads[TASK].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    save_model(net, root / "blind", {"stage": "test"})
    return {
        "data": data,
        "features": root / "features.parquet",
        "labelled": root / "labelled.parquet",
        "model": root / "model",
        "blind": root / "blind",
        "feats": feats,
    }  # type: ignore[dict-item]


def _run(task: dict, out: Path, model: str = "model", **settings) -> pd.DataFrame:
    run(task[model], TASK, task["data"], task["labelled"], task["features"], out, {**SETTINGS, **settings})
    return pd.read_parquet(out / "pseudo.parquet")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "cases").iterdir())


def test_selective_mode_keeps_by_the_rule_and_writes_only_kept_cases(task: dict, tmp_path: Path) -> None:
    table = _run(task, tmp_path / "a")
    unlabelled = POOL[2:]
    assert table["case"].tolist() == unlabelled  # not the labelled ones, not the test split
    feats = task["feats"]
    np.testing.assert_allclose(table["distance"], cosine_distances(feats[2:8], feats[:2]).min(axis=1), rtol=1e-6)
    model = load_model(task["model"]).eval()
    labels = {}
    for case, c in zip(unlabelled, table["confidence"]):
        image = np.load(task["data"] / "cases" / f"{case}.npy")
        probs = predict_probabilities(model, TASK, image, (16, 16, 16), 0.25, 2)
        expected, _, labels[case] = foreground_confidence(probs)
        assert c == pytest.approx(expected, rel=1e-6)
    kept, reasons, c_thr, _ = selective_keep(table["confidence"].to_numpy(), table["distance"].to_numpy(), 0.5)
    assert table["kept"].tolist() == kept.tolist() and table["reason"].tolist() == reasons
    assert table["confidence_threshold"].iloc[0] == pytest.approx(c_thr)
    assert 0 < kept.sum() < len(unlabelled)
    chosen = table.loc[table["kept"], "case"].tolist()
    assert _files(tmp_path / "a") == sorted([f"{c}.npy" for c in chosen] + [f"{c}_seg.npy" for c in chosen])
    for case in chosen:
        np.testing.assert_array_equal(np.load(tmp_path / "a" / "cases" / f"{case}_seg.npy"), labels[case])
    assert table["model_id"].eq(model_id(task["model"])).all()
    assert read_provenance(tmp_path / "a" / "pseudo.parquet")["kept"] == chosen
    _run(task, tmp_path / "b")
    for name in ["pseudo.parquet", *(f"cases/{c}_seg.npy" for c in chosen)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_all_and_none_baselines(task: dict, tmp_path: Path) -> None:
    everything = _run(task, tmp_path / "all", mode="all")
    assert everything["kept"].all() and everything["reason"].eq("mode all").all()
    assert len(_files(tmp_path / "all")) == 2 * len(POOL[2:])
    nothing = _run(task, tmp_path / "none", mode="none", patch_size=None)
    assert not nothing["kept"].any() and nothing["confidence"].isna().all() and nothing["model_id"].isna().all()
    assert _files(tmp_path / "none") == []
    assert pq.read_schema(tmp_path / "none" / "pseudo.parquet").remove_metadata().equals(PSEUDO_SCHEMA)


def test_empty_predictions_are_never_pseudo_labels(task: dict, tmp_path: Path) -> None:
    for mode in ("selective", "all"):
        table = _run(task, tmp_path / mode, model="blind", mode=mode)
        assert table["empty_prediction"].all() and not table["kept"].any()
        assert table["confidence"].eq(0.0).all() and table["reason"].eq("empty prediction").all()
        assert _files(tmp_path / mode) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": 0}, "settings.q"),
        ({"mode": "most"}, "settings.mode"),
        ({"patch_size": None}, "patch_size"),
        ({"typo": 1}, "unknown select_pseudo settings"),
    ],
)
def test_bad_settings_are_refused_before_writing(task: dict, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        _run(task, tmp_path / "out", **change)
    assert not (tmp_path / "out").exists()


def test_labelled_set_must_be_non_empty_and_in_the_pool(task: dict, tmp_path: Path) -> None:
    for cases, message in (([], "empty"), (["case_99"], "not in the task's train split")):
        write_parquet(pd.DataFrame({"case": pd.Series(cases, dtype=str)}), tmp_path / "l.parquet", {"stage": "test"})
        with pytest.raises(InputError, match=message):
            run(task["model"], TASK, task["data"], tmp_path / "l.parquet", task["features"], tmp_path / "out", SETTINGS)
    assert not (tmp_path / "out").exists()
