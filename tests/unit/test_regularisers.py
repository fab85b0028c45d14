"""Online EWC's Fisher and penalty and the LwF term, against hand computation; the ewc and lwf recipes
and the Fisher stage end to end on two tiny tasks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_train_stage import train, world  # noqa: F401  (the module fixture)

from stages.core.errors import InputError
from stages.core.io import read_json, read_provenance
from stages.core.regularisers import accumulate_fisher, diagonal_fisher, ewc_penalty, lwf_loss


def test_diagonal_fisher_is_the_mean_of_per_patch_squared_gradients() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0])]
    # loss_i = (w . x_i)^2 / 2: gradient (w . x_i) x_i
    fisher = diagonal_fisher([("w", w)], lambda i: 0.5 * (w @ xs[i]) ** 2, 2)
    expected = ((w @ xs[0]) * xs[0]) ** 2 / 2 + ((w @ xs[1]) * xs[1]) ** 2 / 2
    torch.testing.assert_close(fisher["w"], expected.detach())
    with pytest.raises(InputError, match="ewc.fisher_batches"):
        diagonal_fisher([("w", w)], lambda i: w.sum(), 0)


def test_online_accumulation_decays_the_earlier_tasks() -> None:
    old, new = {"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([3.0])}
    acc = accumulate_fisher(new, old, 0.5)
    torch.testing.assert_close(acc["w"], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(acc["v"], torch.tensor([3.0]))
    assert accumulate_fisher(new, None, 0.5)["w"] is not new["w"]


def test_ewc_penalty_value_and_gradient() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    anchor, fisher = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([5.0, 2.0])}
    penalty = ewc_penalty([("w", w), ("head", torch.nn.Parameter(torch.ones(1)))], anchor, fisher)
    assert penalty.item() == pytest.approx(0.5 * 2.0 * 4.0)
    penalty.backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 2.0 * 2.0]))  # F (theta - theta*)
    with pytest.raises(InputError, match="--fisher"):
        ewc_penalty([("other", w)], anchor, fisher)


def test_lwf_is_zero_for_equal_outputs_and_positive_otherwise() -> None:
    logits = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert lwf_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert lwf_loss(logits, logits.flip(1), 2.0).item() > 0


def test_ewc_chain_fisher_then_penalty(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """Step 1 trains plainly; its Fisher is an artifact with provenance; step 2's penalty is exactly 0 at
    its first step (the model is theta*), then grows, with its gradient logged."""
    from stages import fisher

    ewc = {"ewc": {"lambda": 1000.0, "gamma": 1.0, "fisher_batches": 2}, "grad_log_every": 1}
    train(world, tmp_path / "step1", recipe="ewc", settings=ewc)
    settings = {
        "gamma": 1.0,
        "fisher_batches": 2,
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "fg_ratio": 0.5,
        "seed": 0,
        "device": "cpu",
    }
    fisher.run(tmp_path / "step1", world["data1"], "organ_lesion", tmp_path / "fisher1", settings)
    f1 = load_file(tmp_path / "fisher1" / "fisher.safetensors")
    assert all(not k.startswith("seg_heads") for k in f1) and sum(float(v.sum()) for v in f1.values()) > 0
    record = read_json(tmp_path / "fisher1" / "fisher.json")
    assert record["total"] == pytest.approx(sum(float(v.sum()) for v in f1.values()), rel=1e-5)
    assert read_provenance(tmp_path / "fisher1" / "fisher.safetensors")["stage"] == "fisher"
    fisher.run(tmp_path / "step1", world["data1"], "organ_lesion", tmp_path / "again", settings)
    assert (tmp_path / "again" / "fisher.safetensors").read_bytes() == (
        tmp_path / "fisher1" / "fisher.safetensors"
    ).read_bytes()
    with pytest.raises(InputError, match="unknown settings"):
        fisher.run(tmp_path / "step1", world["data1"], "organ_lesion", tmp_path / "bad", {**settings, "lr": 1})

    train(
        world,
        tmp_path / "step2",
        recipe="ewc",
        init=tmp_path / "step1",
        task="paired_organs",
        data=world["data2"],
        settings=ewc,
        fisher=tmp_path / "fisher1",
    )
    log = pd.read_parquet(tmp_path / "step2" / "train_log.parquet")
    assert log["ewc"].iloc[0] == 0.0 and (log["ewc"].iloc[2:] > 0).all()
    assert (log["grad_ewc"].iloc[2:] > 0).all() and (log["grad_seg"] > 0).all()
    assert read_provenance(tmp_path / "step2" / "model.safetensors")["inputs"].keys() >= {
        str(tmp_path / "fisher1" / "fisher.safetensors")
    }


def test_lwf_step_keeps_earlier_heads_close_and_trains_them(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    lwf = {"lwf": {"weight": 1.0, "temperature": 2.0}, "grad_log_every": 1}
    train(world, tmp_path / "step1", recipe="lwf", settings=lwf)
    assert "lwf" not in pd.read_parquet(tmp_path / "step1" / "train_log.parquet")
    train(
        world,
        tmp_path / "step2",
        recipe="lwf",
        init=tmp_path / "step1",
        task="paired_organs",
        data=world["data2"],
        settings=lwf,
    )
    log = pd.read_parquet(tmp_path / "step2" / "train_log.parquet")
    assert log["lwf"].iloc[0] == pytest.approx(0.0, abs=1e-7) and (log["lwf"].iloc[2:] > 0).all()
    assert (log["grad_lwf"].iloc[2:] > 0).all()
    s1, s2 = load_file(tmp_path / "step1" / "model.safetensors"), load_file(tmp_path / "step2" / "model.safetensors")
    assert not torch.equal(s1["seg_heads.organ_lesion.weight"], s2["seg_heads.organ_lesion.weight"])


def test_first_steps_of_ewc_and_lwf_are_plain_finetuning_bit_for_bit(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """The claim behind ``reuse_first_steps``: with no Fisher and no earlier head, EWC's and LwF's first
    step compute exactly what full FT does (gradient logging included), so parallel FT's model stands in."""
    train(world, tmp_path / "ft")
    ft = load_file(tmp_path / "ft" / "model.safetensors")
    for recipe, extra in (
        ("ewc", {"ewc": {"lambda": 1000.0, "gamma": 1.0, "fisher_batches": 2}}),
        ("lwf", {"lwf": {"weight": 1.0, "temperature": 2.0}}),
    ):
        train(world, tmp_path / recipe, recipe=recipe, settings={**extra, "grad_log_every": 1})
        other = load_file(tmp_path / recipe / "model.safetensors")
        assert other.keys() == ft.keys() and all(torch.equal(other[k], ft[k]) for k in ft), recipe


def test_reuse_copies_a_model_folder_and_records_where_from(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    from stages import reuse

    train(world, tmp_path / "ft")
    reuse.main(["--source", str(tmp_path / "ft"), "--out", str(tmp_path / "copy"), "--why", "the same job"])
    for name in reuse.FILES:
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "ft" / name).read_bytes()
    record = read_json(tmp_path / "copy" / reuse.RECORD)
    assert record["source"] == str(tmp_path / "ft") and record["why"] == "the same job"
    assert record["provenance"]["stage"] == "reuse" and set(record["files"]) == set(reuse.FILES)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.json").write_text("{}")
    with pytest.raises(InputError, match=r"missing \['train_log.parquet', 'model.safetensors'\]"):
        reuse.run(tmp_path / "half", tmp_path / "none", "x")
    assert not (tmp_path / "none").exists()
