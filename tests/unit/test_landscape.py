"""Loss landscape: the origin is the model's own loss, filter normalisation, determinism, resume after a kill."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from stages import landscape
from stages.core.errors import InputError
from stages.core.io import make_provenance, read_provenance, save_npy, write_parquet
from stages.core.losses import segmentation_loss
from stages.core.nets import FoundationNet, load_model, save_model

TASK = "t"
SHAPES = {"c_000": (13, 12, 11), "c_001": (19, 18, 17), "c_002": (14, 15, 13)}
SETTINGS = {
    "seed": 3,
    "dims": [1, 2],
    "points": 3,
    "range": [-1.0, 1.0],
    "cases": 2,
    "patch_size": [16, 16, 16],
    "batch_size": 1,
    "device": "cpu",
    "dpi": 40,
}
OUTPUTS = (landscape.TABLE, landscape.CURVE_FIGURE, landscape.SURFACE_FIGURE)


def write_task(folder: Path, splits: dict[str, str]) -> None:
    """A preprocessed task by hand: odd-shaped images, a two-class blob per case, a manifest."""
    rng = np.random.default_rng(0)
    rows = []
    for case, shape in SHAPES.items():
        image = rng.normal(0.0, 1.0, (1, *shape)).astype(np.float32)
        label = np.zeros(shape, dtype=np.uint8)
        x, y, z = (s // 3 for s in shape)
        label[x : 2 * x, y : 2 * y + 1, z : 2 * z] = 1
        label[x : x + 2, y : y + 2, z : z + 2] = 2
        image[0][label > 0] += 2.0
        save_npy(image, folder / "cases" / f"{case}.npy")
        save_npy(label, folder / "cases" / f"{case}_seg.npy")
        rows.append({"case": case, "split": splits[case], "label_path": f"labelsTr/{case}.nii.gz", "num_classes": 3})
    write_parquet(pd.DataFrame(rows), folder / "manifest.parquet", make_provenance("preprocess", {}))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("landscape")
    # the validation cases in reverse id order, to show that they are taken sorted
    write_task(root / "data", {"c_002": "val", "c_001": "train", "c_000": "val"})
    write_task(root / "noval", {"c_000": "train", "c_001": "train", "c_002": "test"})
    model = FoundationNet(
        "basicunet", 1, {"features": [4, 4, 8, 8, 16, 4]}, ssl={"patch_size": [16, 16, 16]}, heads={TASK: 3}, seed=0
    )
    save_model(model, root / "model", make_provenance("train", {}))
    return {"root": root, "model": root / "model", "data": root / "data", "noval": root / "noval"}


@pytest.fixture(scope="module")
def reference(world: dict[str, Path]) -> Path:
    """One uninterrupted run; the other tests compare their bytes with it."""
    out = world["root"] / "ref"
    landscape.run(world["model"], world["data"], TASK, out, world["root"] / "ref_work", SETTINGS, "m", "s")
    return out


def own_loss(model_dir: Path, data: Path, cases: list[str]) -> float:
    """The model's Dice + CE on one 16^3 patch per case around the foreground centroid, written out afresh."""
    model = load_model(model_dir).eval()
    loss_fn = segmentation_loss()
    losses = []
    for case in cases:
        image = np.load(data / "cases" / f"{case}.npy")
        label = np.load(data / "cases" / f"{case}_seg.npy")
        centre = np.rint(ndimage.center_of_mass(label > 0)).astype(int)
        img = np.zeros((1, 16, 16, 16), np.float32)
        lab = np.zeros((16, 16, 16), np.int64)
        lo = [min(max(c - 8, 0), max(0, s - 16)) for c, s in zip(centre, label.shape)]
        hi = [min(a + 16, s) for a, s in zip(lo, label.shape)]
        img[:, : hi[0] - lo[0], : hi[1] - lo[1], : hi[2] - lo[2]] = image[
            :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]
        ]
        lab[: hi[0] - lo[0], : hi[1] - lo[1], : hi[2] - lo[2]] = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        with torch.no_grad():
            logits = model.segment(torch.from_numpy(img)[None], TASK)
            losses.append(float(loss_fn(logits, torch.from_numpy(lab)[None, None])))
    return float(np.mean(losses))


def test_origin_is_the_models_own_validation_loss(world: dict[str, Path], reference: Path) -> None:
    table = pd.read_parquet(reference / landscape.TABLE)
    assert len(table) == 3 + 9 and list(table.columns) == ["kind", "i", "j", "alpha", "beta", "loss"]
    origin = table[(table["alpha"] == 0.0) & (table["beta"] == 0.0)]
    assert set(origin["kind"]) == {"1d", "2d"}
    prov = read_provenance(reference / landscape.TABLE)
    assert prov["cases"] == ["c_000", "c_002"] and prov["split"] == "val" and prov["seed"] == 3
    expected = own_loss(world["model"], world["data"], ["c_000", "c_002"])
    assert origin["loss"].tolist() == pytest.approx([expected] * 2, rel=1e-6)
    assert prov["origin_loss"] == origin["loss"].iloc[0]
    # the curve is the beta = 0 row of the surface; moving the weights changes the loss
    one = table[table["kind"] == "1d"].sort_values("i")["loss"].to_numpy()
    row = table[(table["kind"] == "2d") & (table["beta"] == 0.0)].sort_values("i")["loss"].to_numpy()
    np.testing.assert_array_equal(one, row)
    assert np.ptp(table["loss"]) > 1e-4
    # the model folder is untouched
    assert (
        load_model(world["model"])
        .state_dict()["backbone.conv_0.conv_0.conv.weight"]
        .equal(
            FoundationNet(
                "basicunet",
                1,
                {"features": [4, 4, 8, 8, 16, 4]},
                ssl={"patch_size": [16, 16, 16]},
                heads={TASK: 3},
                seed=0,
            ).state_dict()["backbone.conv_0.conv_0.conv.weight"]
        )
    )


def test_filter_normalised_directions_match_each_filters_norm(world: dict[str, Path]) -> None:
    model = load_model(world["model"])
    params = landscape.landscape_parameters(model, TASK)
    assert not any(n.startswith("ssl_heads.") for n in params) and f"seg_heads.{TASK}.weight" in params
    d1, d2 = landscape.random_directions(params, seed=5)
    again, _ = landscape.random_directions(params, seed=5)
    other, _ = landscape.random_directions(params, seed=6)
    for name, w in params.items():
        assert d1[name].shape == w.shape
        assert torch.equal(d1[name], again[name])
        if w.ndim < 2:
            assert not d1[name].any() and not d2[name].any()  # biases and norm parameters stay put
            continue
        w_norms = torch.linalg.vector_norm(w.detach().reshape(w.shape[0], -1), dim=1)
        for d in (d1[name], d2[name]):
            d_norms = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
            torch.testing.assert_close(d_norms, w_norms, rtol=1e-5, atol=1e-8)
        assert not torch.equal(d1[name], d2[name]) and not torch.equal(d1[name], other[name])


def test_same_seed_same_bytes_and_cli(world: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    landscape.main(
        [
            "--model",
            str(world["model"]),
            "--data",
            str(world["data"]),
            "--task",
            TASK,
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            "--method",
            "m",
            "--step",
            "s",
            "--settings",
            json.dumps(SETTINGS),
        ]
    )
    for name in OUTPUTS:
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name
    assert read_provenance(reference / landscape.SURFACE_FIGURE)["task"] == TASK


def test_interrupted_run_resumes_to_identical_output(
    world: dict[str, Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = landscape.patch_loss
    calls = {"n": 0}

    def crashing(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    def terminated(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the point finishes, is saved, then the job exits
        return real(*args, **kwargs)

    out, work = tmp_path / "out", tmp_path / "work"
    monkeypatch.setattr(landscape, "patch_loss", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        landscape.run(world["model"], world["data"], TASK, out, work, SETTINGS, "m", "s")
    (state,) = work.glob(f"*/{landscape.STATE_NAME}")
    assert len(json.loads(state.read_text())["losses"]) == 3 and not out.exists()

    calls["n"] = 0
    monkeypatch.setattr(landscape, "patch_loss", terminated)
    with pytest.raises(SystemExit) as stopped:
        landscape.run(world["model"], world["data"], TASK, out, work, SETTINGS, "m", "s")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(json.loads(state.read_text())["losses"]) == 5 and not out.exists()

    def counting(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        return real(*args, **kwargs)

    calls["n"] = 0
    monkeypatch.setattr(landscape, "patch_loss", counting)
    landscape.run(world["model"], world["data"], TASK, out, work, SETTINGS, "m", "s")
    assert calls["n"] == 4  # only the 4 missing points were computed
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    # partial results of another job are refused, not mixed in
    state.write_text(json.dumps({"job_hash": "other", "losses": {}}))
    with pytest.raises(InputError, match="delete .* to start over"):
        landscape.run(world["model"], world["data"], TASK, out, work, SETTINGS, "m", "s")


def test_falls_back_to_training_cases_and_one_dimension(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stages.landscape"):
        written = landscape.run(
            world["model"],
            world["noval"],
            TASK,
            tmp_path / "out",
            tmp_path / "work",
            {**SETTINGS, "dims": [1], "cases": 1},
        )
    assert "no labelled validation case" in caplog.text
    assert [p.name for p in written] == [landscape.TABLE, landscape.CURVE_FIGURE]
    prov = read_provenance(tmp_path / "out" / landscape.TABLE)
    assert prov["cases"] == ["c_000"] and prov["split"] == "train"
    assert len(pd.read_parquet(tmp_path / "out" / landscape.TABLE)) == 3


def test_bad_inputs_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    with pytest.raises(InputError, match=r"nowhere/model\.json: model description not found"):
        landscape.run(tmp_path / "nowhere", world["data"], TASK, out, work, SETTINGS)
    with pytest.raises(InputError, match="has no segmentation head 'u'"):
        landscape.run(world["model"], world["data"], "u", out, work, SETTINGS)
    with pytest.raises(InputError, match=r"manifest\.parquet: missing"):
        landscape.run(world["model"], tmp_path, TASK, out, work, SETTINGS)
    for bad, message in (
        ({"grid": 3}, "unknown keys"),
        ({"dims": [3]}, "dims"),
        ({"range": [1, -1]}, "range"),
        ({"points": 1}, "points"),
    ):
        with pytest.raises(InputError, match=message):
            landscape.run(world["model"], world["data"], TASK, out, work, {**SETTINGS, **bad})
    assert not out.exists() and not work.exists()
