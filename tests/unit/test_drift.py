"""Parameter drift against M0: zero for an unchanged model, the norm ratio of a known perturbation, blocks, files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages import drift
from stages.core.errors import InputError
from stages.core.io import make_provenance, read_provenance
from stages.core.nets import FoundationNet, save_model

FEATURES = [4, 4, 8, 8, 16, 4]
PNG = b"\x89PNG\r\n\x1a\n"


def tiny(heads: dict[str, int] | None = None) -> FoundationNet:
    return FoundationNet("basicunet", 1, {"features": FEATURES}, ssl={"patch_size": [16, 16, 16]}, heads=heads, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """M0; an unchanged copy with a new head; a sequential pair; a parallel model with one tensor perturbed."""
    root = tmp_path_factory.mktemp("drift")
    m0 = tiny()
    save_model(m0, root / "m0", make_provenance("pretrain", {}))
    same = copy.deepcopy(m0)
    same.add_head("a", 3)
    save_model(same, root / "same", make_provenance("train", {}))

    g = torch.Generator().manual_seed(7)
    target = "backbone.down_2.convs.conv_1.conv.weight"
    delta = 0.05 * torch.randn(tuple(m0.state_dict()[target].shape), generator=g)
    one = copy.deepcopy(m0)
    one.add_head("b", 2)
    with torch.no_grad():
        dict(one.named_parameters())[target].add_(delta)
    save_model(one, root / "one", make_provenance("train", {}))

    # sequential: step a scales the backbone by 1.5, step b scales it again by 2 (exact in floating point)
    seq_a = copy.deepcopy(m0)
    seq_a.add_head("a", 3)
    with torch.no_grad():
        for p in seq_a.backbone.parameters():
            p.mul_(1.5)
    save_model(seq_a, root / "seq_a", make_provenance("train", {}))
    seq_b = copy.deepcopy(seq_a)
    seq_b.add_head("b", 2)
    with torch.no_grad():
        for p in seq_b.backbone.parameters():
            p.mul_(2.0)
    save_model(seq_b, root / "seq_b", make_provenance("train", {}))
    return {"root": root, "m0": root / "m0", "target": target, "delta": delta, "w0": m0.state_dict()[target].clone()}


def specs(models: dict) -> list[drift.StepModel]:
    root = models["root"]
    return [
        drift.StepModel("seq", "a", root / "seq_a"),
        drift.StepModel("seq", "b", root / "seq_b"),
        drift.StepModel("par", "a", root / "same", root / "m0"),
        drift.StepModel("par", "b", root / "one"),
    ]


@pytest.fixture(scope="module")
def result(models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("drift_out")
    drift.run(models["m0"], specs(models), out, {"dpi": 40})
    return out


def test_unchanged_model_has_zero_drift(result: Path) -> None:
    layers = pd.read_parquet(result / drift.DRIFT_TABLE)
    same = layers[(layers["method"] == "par") & (layers["step"] == "a")]
    known = same[same["in_m0"]]
    assert len(known) == len(tiny().state_dict()) and (known["rel_to_m0"] == 0).all()
    assert (known["delta_m0"] == 0).all() and (known["rel_to_prev"] == 0).all()
    # the new head is reported, not dropped: NaN against M0
    head = same[same["layer"].str.startswith("seg_heads.a.")]
    assert len(head) == 2 and (~head["in_m0"]).all() and head["rel_to_m0"].isna().all()
    blocks = pd.read_parquet(result / drift.BLOCKS_TABLE)
    same_blocks = blocks[(blocks["method"] == "par") & (blocks["step"] == "a")].set_index("block")
    assert same_blocks.loc["total", "rel_to_m0"] == 0.0 and np.isnan(same_blocks.loc["heads.seg", "rel_to_m0"])


def test_known_perturbation_gives_its_norm_ratio(models: dict, result: Path) -> None:
    layers = pd.read_parquet(result / drift.DRIFT_TABLE)
    one = layers[(layers["method"] == "par") & (layers["step"] == "b")].set_index("layer")
    delta, w0 = models["delta"].double(), models["w0"].double()
    expected = float(delta.norm() / w0.norm())
    assert one.loc[models["target"], "rel_to_m0"] == pytest.approx(expected, rel=1e-5)
    others = one.drop(index=models["target"])
    assert (others.loc[others["in_m0"], "rel_to_m0"] == 0).all()
    # block and total: the same change over the norm of all the block's M0 weights
    block = drift.block_of(models["target"])
    assert block == "encoder.2"
    block_norm = float(np.sqrt((one[(one["block"] == block) & one["in_m0"]]["norm_m0"] ** 2).sum()))
    blocks = pd.read_parquet(result / drift.BLOCKS_TABLE)
    row = blocks[(blocks["method"] == "par") & (blocks["step"] == "b")].set_index("block")
    assert row.loc[block, "rel_to_m0"] == pytest.approx(float(delta.norm()) / block_norm, rel=1e-5)
    assert row.loc["encoder.1", "rel_to_m0"] == 0.0
    # parallel methods start from M0: the step's change equals the change against M0
    assert row.loc["total", "rel_to_prev"] == row.loc["total", "rel_to_m0"]


def test_sequential_steps_against_m0_and_the_previous_step(result: Path) -> None:
    blocks = pd.read_parquet(result / drift.BLOCKS_TABLE)
    seq = blocks[(blocks["method"] == "seq")].set_index(["step", "block"])
    # x1.5 then x2: against M0 0.5 and 2.0, against the previous step 0.5 and 1.0 (float32 rounding aside)
    assert seq.loc[("a", "backbone"), "rel_to_m0"] == pytest.approx(0.5, rel=1e-6)
    assert seq.loc[("b", "backbone"), "rel_to_m0"] == pytest.approx(2.0, rel=1e-6)
    assert seq.loc[("b", "backbone"), "rel_to_prev"] == pytest.approx(1.0, rel=1e-6)
    assert seq.loc[("a", "heads.ssl"), "rel_to_m0"] == 0.0
    assert list(blocks[(blocks["method"] == "seq") & (blocks["step"] == "a")]["start"].unique()) == ["m0"]
    assert list(blocks[(blocks["method"] == "seq") & (blocks["step"] == "b")]["start"].unique()) == ["seq:a"]
    # step b kept step a's head unchanged: present in the start model, absent from M0
    layers = pd.read_parquet(result / drift.DRIFT_TABLE).set_index(["method", "step", "layer"])
    head = layers.loc[("seq", "b", "seg_heads.a.weight")]
    assert head["in_start"] and not head["in_m0"] and head["rel_to_prev"] == 0.0 and np.isnan(head["rel_to_m0"])
    assert set(blocks[blocks["method"] == "seq"]["step_index"]) == {0, 1}


def test_blocks_cover_both_monai_backbones() -> None:
    names = list(tiny({"t": 2}).state_dict())
    blocks = {drift.block_of(n) for n in names}
    assert blocks == {
        "encoder.0",
        "encoder.1",
        "encoder.2",
        "encoder.3",
        "encoder.4",
        "decoder.4",
        "decoder.3",
        "decoder.2",
        "decoder.1",
        "heads.ssl",
        "heads.seg",
    }
    swin = FoundationNet(
        "swinunetr",
        1,
        {"feature_size": 12, "depths": [1, 1, 1, 1], "window_size": 4, "norm_name": ["group", {"num_groups": 4}]},
        heads={"t": 2},
        seed=0,
    )
    swin_blocks = {drift.block_of(n) for n, _ in swin.named_parameters()}
    assert swin_blocks == {f"encoder.{k}" for k in range(5)} | {f"skip.{k}" for k in (1, 2, 3, 4, 10)} | {
        f"decoder.{k}" for k in range(1, 6)
    } | {"heads.seg"}
    blocks = {}
    for top in ("per_head", "shared"):
        kwargs = {"channels": [4, 8, 8], "num_res_units": 1, "norm": ["group", {"num_groups": 2}], "top": top}
        unet = FoundationNet("unet", 1, kwargs, heads={"t": 2}, seed=0)
        blocks[top] = {drift.block_of(n) for n, _ in unet.named_parameters()}
    # two levels (down 0 and 1, up 0 and 1) and the bottom layer, encoder.2; a per-head unet's top up
    # layer (decoder.0) is each head's own, so it counts with the heads
    assert blocks["shared"] == {"encoder.0", "encoder.1", "encoder.2", "decoder.1", "decoder.0", "heads.seg"}
    assert blocks["per_head"] == blocks["shared"] - {"decoder.0"}
    ordered = sorted(swin_blocks | {"total", "backbone"}, key=drift.block_sort_key)
    assert ordered[:2] == ["encoder.0", "encoder.1"] and ordered[-2:] == ["backbone", "total"]
    assert ordered.index("decoder.5") < ordered.index("decoder.1") < ordered.index("heads.seg")


def test_outputs_are_deterministic_with_provenance(models: dict, result: Path, tmp_path: Path) -> None:
    names = [drift.DRIFT_TABLE, drift.BLOCKS_TABLE, drift.BLOCKS_FIGURE, drift.LAYERS_FIGURE, drift.TOTAL_FIGURE]
    args = [
        "--foundation",
        str(models["m0"]),
        "--out",
        str(tmp_path),
        "--settings",
        json.dumps({"dpi": 40}),
        "--model",
    ] + [f"{s.method}:{s.step}:{s.folder}" + (f":{s.start}" if s.start else "") for s in specs(models)]
    drift.main(args)
    for name in names:
        assert (tmp_path / name).read_bytes() == (result / name).read_bytes(), name
    assert (result / drift.BLOCKS_FIGURE).read_bytes().startswith(PNG)
    prov = read_provenance(result / drift.DRIFT_TABLE)
    assert prov["stage"] == "drift" and str(models["m0"] / "model.safetensors") in prov["inputs"]
    assert read_provenance(result / drift.TOTAL_FIGURE)["inputs"] == {
        str(result / drift.BLOCKS_TABLE): prov_hash(result / drift.BLOCKS_TABLE)
    }


def prov_hash(path: Path) -> str:
    from stages.core.io import sha256_file

    return sha256_file(path)


def test_relative_edge_cases() -> None:
    assert drift.relative(0.0, 0.0) == 0.0
    assert drift.relative(1.0, 0.0) == float("inf")
    assert np.isnan(drift.relative(float("nan"), 1.0))


def test_bad_inputs_are_refused_before_writing(models: dict, tmp_path: Path) -> None:
    missing = models["root"] / "nowhere"
    with pytest.raises(InputError, match=r"nowhere/model\.json: model description not found"):
        drift.run(models["m0"], [drift.StepModel("x", "a", missing)], tmp_path / "out", {})
    with pytest.raises(InputError, match="given twice"):
        drift.run(models["m0"], [drift.StepModel("x", "a", models["m0"])] * 2, tmp_path / "out", {})
    with pytest.raises(InputError, match="unknown keys"):
        drift.run(models["m0"], [drift.StepModel("x", "a", models["m0"])], tmp_path / "out", {"colour": 1})
    with pytest.raises(InputError, match="METHOD:STEP:FOLDER"):
        drift.parse_model("x:a")
    other = FoundationNet("basicunet", 1, {"features": [4, 4, 8, 8, 32, 4]}, seed=0)
    save_model(other, tmp_path / "other", make_provenance("train", {}))
    with pytest.raises(InputError, match="not the same architecture"):
        drift.run(models["m0"], [drift.StepModel("x", "a", tmp_path / "other")], tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
