"""The train, merge and evaluate stages on small real data: recipes, LoRA merge equivalence, resume identity."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stages.core.errors import InputError
from stages.core.io import make_provenance, write_parquet
from stages.core.lora import load_adapter
from stages.core.nets import FoundationNet, load_model, save_model

SETTINGS = {
    "patch_size": [16, 16, 16],
    "batch_size": 2,
    "steps": 6,
    "lr": 0.002,
    "weight_decay": 1e-5,
    "fg_ratio": 0.5,
    "checkpoint_every": 2,
    "val_every": 0,
    "amp": False,
    "seed": 0,
    "device": "cpu",
    "overlap": 0.25,
    "warmup_steps": 0,
}
#: the retention recipe's settings these tests start from (each test sets what it is about)
RETENTION = {
    "lora": {
        "rank": 8,
        "alpha": 8,
        "dropout": 0.0,
        "targets": None,
        "enabled": True,
        "lr": None,
        "init": "zero",
        "train_norms": False,
        "train_biases": False,
    },
    "kd_kind": "kl",
    "kd_temperature": 2.0,
    "kd_weight": 0.0,
    "kd_mask": "foreground",
    "kd_dilation": 2,
    "kd_background_share": 0.2,
    "retention_weight": 0.0,
    "retention_levels": "all",
    "retention_scale": "channel",
    "lwf_weight": 0.5,
    "grad_log_every": 10,
    "buffer_batch_size": 2,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small preprocessed demo tasks, an M0 with SSL heads, and an MDS-like buffer for the first task."""
    from stages import preprocess, synth

    root = tmp_path_factory.mktemp("world")
    synth.run(root / "demo", {"seed": 0, "shape": [20, 20, 16], "cases_per_task": 4, "pool_cases": 1})
    pre = {
        "labelled": True,
        "labels": None,
        "seed": 0,
        "split": {"val": 0.0, "test": 0.25},
        "target_spacing": [1.5, 1.5, 1.5],
        "normalisation": "auto",
    }
    for task in ("organ_lesion", "paired_organs"):
        preprocess.run(root / "demo" / task, root / "data" / task, pre)
    m0 = FoundationNet("basicunet", 1, {"features": [4, 4, 8, 8, 16, 4]}, ssl={"patch_size": [16, 16, 16]}, seed=0)
    save_model(m0, root / "m0", make_provenance("pretrain", {}))
    manifest = pd.read_parquet(root / "data" / "organ_lesion" / "manifest.parquet")
    train = manifest.loc[manifest["split"] == "train", "case"].tolist()
    buffer = pd.DataFrame({"case": train, "selected": [True] * 2 + [False] * (len(train) - 2)})
    write_parquet(buffer, root / "buffer_organ_lesion.parquet", make_provenance("select_buffer", {}))
    return {
        "root": root,
        "m0": root / "m0",
        "data1": root / "data" / "organ_lesion",
        "data2": root / "data" / "paired_organs",
        "buffer1": root / "buffer_organ_lesion.parquet",
    }


def train(
    world: dict[str, Path],
    out: Path,
    recipe: str = "finetune",
    init: Path | None = None,
    task: str = "organ_lesion",
    data: Path | None = None,
    settings: dict | None = None,
    **kw,
) -> None:
    from stages.train import run

    settings = dict(settings or {})
    if recipe == "retention":
        settings = {**RETENTION, **settings, "lora": {**RETENTION["lora"], **settings.get("lora", {})}}
    run(
        recipe,
        init or world["m0"],
        [data or world["data1"]],
        [task],
        out,
        out.parent / f"{out.name}_work",
        {**SETTINGS, **settings},
        **kw,
    )


def test_finetune_adds_the_head_and_trains_the_backbone(world: dict[str, Path], tmp_path: Path) -> None:
    train(world, tmp_path / "ft")
    model = load_model(tmp_path / "ft")
    assert "organ_lesion" in model.seg_heads and model.seg_heads["organ_lesion"].out_channels == 3
    before, after = load_file(world["m0"] / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert not torch.equal(before["backbone.conv_0.conv_0.conv.weight"], after["backbone.conv_0.conv_0.conv.weight"])
    # the SSL heads are not trained by segmentation fine-tuning
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("ssl_heads."))
    log = pd.read_parquet(tmp_path / "ft" / "train_log.parquet")
    assert log["step"].tolist() == list(range(1, 7)) and np.isfinite(log["loss"]).all()


def test_retention_trains_only_lora_and_the_head_and_merges_equivalently(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from stages.merge import run as merge

    train(world, tmp_path / "teacher")
    settings = {
        "lora": {"rank": 4, "alpha": 4, "enabled": True},
        "kd_kind": "kl",
        "kd_temperature": 2.0,
        "kd_weight": 1.0,
        "retention_weight": 0.5,
        "buffer_batch_size": 1,
    }
    train(
        world,
        tmp_path / "adapter",
        recipe="retention",
        settings=settings,
        teacher=tmp_path / "teacher",
        buffers=[(world["buffer1"], world["data1"])],
    )
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "seg_heads.organ_lesion" in k for k in adapter)
    log = pd.read_parquet(tmp_path / "adapter" / "train_log.parquet")
    assert {"seg", "kd", "retention"} <= set(log.columns)
    assert (log["retention"] >= 0).all() and (log["kd"] >= 0).all()

    merge(world["m0"], tmp_path / "adapter", tmp_path / "merged")
    merged = load_model(tmp_path / "merged").eval()
    base = load_model(world["m0"])
    base.add_head("organ_lesion", 3)
    peft_model = load_adapter(base, tmp_path / "adapter").eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (merged.segment(x, "organ_lesion") - peft_model.segment(x, "organ_lesion")).abs().max().item()
    assert diff < 1e-5
    # the merged weights moved away from M0 only where LoRA was attached (3x3x3 convs), heads aside
    m0 = load_file(world["m0"] / "model.safetensors")
    out = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(m0[k], out[k]) for k in m0 if k.endswith(".bias") and k.startswith("backbone."))
    assert not torch.equal(m0["backbone.conv_0.conv_0.conv.weight"], out["backbone.conv_0.conv_0.conv.weight"])


def test_buffer_draws_leave_the_task_batches_unchanged(world: dict[str, Path], tmp_path: Path) -> None:
    """The buffer has its own random stream: with a negligible retention weight, the run with a buffer
    sees the very same task patches as the run without one (the buffer ablations differ by L_ret only)."""
    train(world, tmp_path / "teacher")
    settings = {"lora": {"rank": 4, "alpha": 4, "enabled": True}, "kd_weight": 1.0, "buffer_batch_size": 1}
    train(world, tmp_path / "none", recipe="retention", settings=settings, teacher=tmp_path / "teacher")
    train(
        world,
        tmp_path / "buffer",
        recipe="retention",
        settings={**settings, "retention_weight": 1e-12},
        teacher=tmp_path / "teacher",
        buffers=[(world["buffer1"], world["data1"])],
    )
    none = pd.read_parquet(tmp_path / "none" / "train_log.parquet")
    buffer = pd.read_parquet(tmp_path / "buffer" / "train_log.parquet")
    assert "retention" in buffer.columns and "retention" not in none.columns
    np.testing.assert_allclose(buffer["seg"], none["seg"], rtol=0, atol=1e-5)


def test_sequential_step_keeps_earlier_heads(world: dict[str, Path], tmp_path: Path) -> None:
    train(world, tmp_path / "step1")
    train(world, tmp_path / "step2", init=tmp_path / "step1", task="paired_organs", data=world["data2"])
    s1, s2 = load_file(tmp_path / "step1" / "model.safetensors"), load_file(tmp_path / "step2" / "model.safetensors")
    assert torch.equal(s1["seg_heads.organ_lesion.weight"], s2["seg_heads.organ_lesion.weight"])
    assert "seg_heads.paired_organs.weight" in s2


def test_multitask_trains_one_head_per_task(world: dict[str, Path], tmp_path: Path) -> None:
    from stages.train import run

    out = tmp_path / "mt"
    run(
        "multitask",
        world["m0"],
        [world["data1"], world["data2"]],
        ["organ_lesion", "paired_organs"],
        out,
        tmp_path / "mt_work",
        SETTINGS,
    )
    log = pd.read_parquet(out / "train_log.parquet")
    assert log["task_index"].tolist() == [0, 1, 0, 1, 0, 1]
    assert set(load_model(out).seg_heads) == {"organ_lesion", "paired_organs"}


def test_bad_arguments_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown recipe"):
        train(world, tmp_path / "x", recipe="magic")
    with pytest.raises(InputError, match="manifest.parquet"):
        train(world, tmp_path / "x", data=tmp_path / "nothing")


def _train_cmd(world: dict[str, Path], out: Path, steps: int) -> list[str]:
    import json

    settings = json.dumps({**SETTINGS, "steps": steps, "checkpoint_every": 1})
    return [
        sys.executable,
        "-m",
        "stages.train",
        "--recipe",
        "finetune",
        "--init",
        str(world["m0"]),
        "--data",
        str(world["data1"]),
        "--task",
        "organ_lesion",
        "--out",
        str(out),
        "--work",
        str(out.parent / "work"),
        "--settings",
        settings,
    ]


def test_killed_training_resumes_to_a_bit_identical_model(world: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM mid-training (as Slurm does at the time limit), rerun: same model file, byte for byte."""
    # enough steps that the kill lands mid-run even on a fast, idle machine (a step is ~0.05 s)
    steps = 40
    ref = tmp_path / "ref" / "out"
    subprocess.run(_train_cmd(world, ref, steps), check=True, capture_output=True)

    out = tmp_path / "killed" / "out"
    proc = subprocess.Popen(_train_cmd(world, out, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    checkpoints = lambda: list((out.parent / "work").glob("*/checkpoint_latest.pt"))  # noqa: E731
    while time.time() < deadline and not checkpoints():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143, proc.stdout.read() if proc.stdout else ""
    assert checkpoints() and not (out / "model.safetensors").exists()
    rerun = subprocess.run(_train_cmd(world, out, steps), check=True, capture_output=True, text=True)
    assert "resuming from step" in rerun.stderr
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def _with_val_split(world: dict[str, Path], where: Path) -> Path:
    """A copy of the first task's folder whose manifest puts one training case into the val split."""
    import shutil

    from stages.core.io import read_parquet

    data = where / "organ_lesion"
    shutil.copytree(world["data1"], data)
    manifest = read_parquet(data / "manifest.parquet")
    first = manifest.index[manifest["split"] == "train"][0]
    manifest.loc[first, "split"] = "val"
    write_parquet(manifest, data / "manifest.parquet", make_provenance("preprocess", {}))
    return data


def test_validation_selects_the_best_step_with_warmup(world: dict[str, Path], tmp_path: Path) -> None:
    from stages.core.io import read_provenance

    data = _with_val_split(world, tmp_path)
    out = tmp_path / "val"
    train(world, out, data=data, settings={"val_every": 2, "warmup_steps": 2})
    log = pd.read_parquet(out / "train_log.parquet")
    scored = log[np.isfinite(log["val_score"])]
    assert scored["step"].tolist() == [2, 4, 6] and ((scored["val_score"] >= 0) & (scored["val_score"] <= 1)).all()
    # linear warm-up over 2 steps, then the cosine decay from the peak
    assert log["lr"].tolist()[:3] == pytest.approx([0.001, 0.002, 0.002])
    best = int(scored.loc[scored["val_score"].idxmax(), "step"])
    assert read_provenance(out / "train_log.parquet")["best_step"] == best
    assert read_provenance(out / "model.safetensors")["best_step"] == best


def test_multitask_validates_the_mean_over_tasks(world: dict[str, Path], tmp_path: Path) -> None:
    from stages.train import run

    data = _with_val_split(world, tmp_path)
    out = tmp_path / "mt"
    run(
        "multitask",
        world["m0"],
        [data, world["data2"]],
        ["organ_lesion", "paired_organs"],
        out,
        tmp_path / "mt_work",
        {**SETTINGS, "val_every": 3},
    )
    log = pd.read_parquet(out / "train_log.parquet")
    assert log.loc[np.isfinite(log["val_score"]), "step"].tolist() == [3, 6]


def test_threads_flag_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import train as stage

    seen = []
    monkeypatch.setattr(stage, "run", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        stage.main(["--init", "m", "--data", "d", "--task", "t", "--out", "o", "--work", "w", "--threads", "2"])
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
    with pytest.raises(InputError, match="--threads"):
        stage.main(["--init", "m", "--data", "d", "--task", "t", "--out", "o", "--work", "w", "--threads", "0"])


def test_retention_terms_move_and_are_logged_with_their_gradients(world: dict[str, Path], tmp_path: Path) -> None:
    """The retention term is exactly 0 at step 1 (student = M_{t-1}), non-zero once the student has
    moved; every term's gradient norm is logged; LoRA trains at 10x the head's rate by default."""
    train(world, tmp_path / "teacher")
    settings = {
        "lora": {"rank": 4, "alpha": 4, "init": "zero"},
        "kd_weight": 1.0,
        "retention_weight": 0.5,
        "buffer_batch_size": 1,
        "grad_log_every": 1,
        "kd_mask": "foreground",
    }
    train(
        world,
        tmp_path / "zero",
        recipe="retention",
        settings=settings,
        teacher=tmp_path / "teacher",
        buffers=[(world["buffer1"], world["data1"])],
    )
    log = pd.read_parquet(tmp_path / "zero" / "train_log.parquet")
    assert {"grad_seg", "grad_kd", "grad_retention", "lr_full", "retention_l0"} <= set(log.columns)
    assert log["retention"].iloc[0] == 0.0 and log["grad_retention"].iloc[0] == 0.0
    assert (log["retention"].iloc[2:] > 1e-6).all() and (log["grad_retention"].iloc[2:] > 0).all()
    assert (log["grad_seg"] > 0).all() and (log["grad_kd"].iloc[1:] > 0).all()
    np.testing.assert_allclose(log["lr"], 10 * log["lr_full"])
    # teacher_svd: the student starts at the (rank-4 approximation of the) teacher, away from M_{t-1}
    svd = {**settings, "lora": {**settings["lora"], "init": "teacher_svd"}, "grad_log_every": 3}
    train(
        world,
        tmp_path / "svd",
        recipe="retention",
        settings=svd,
        teacher=tmp_path / "teacher",
        buffers=[(world["buffer1"], world["data1"])],
    )
    log = pd.read_parquet(tmp_path / "svd" / "train_log.parquet")
    assert log["retention"].iloc[0] > 1e-4 and log["grad_retention"].iloc[0] > 0
    assert log["grad_retention"].isna().tolist() == [False, True, True, False, True, True]


def test_output_level_retention_of_earlier_heads(world: dict[str, Path], tmp_path: Path) -> None:
    """Step 2: LwF between the student's and M_1's logits of head h_1 on B_1; trained norms and biases
    go into the adapter and the merge reproduces the adapted model."""
    from stages.merge import run as merge

    train(world, tmp_path / "step1")
    manifest = pd.read_parquet(world["data1"] / "manifest.parquet")
    cases = manifest.loc[manifest["split"] == "train", "case"].tolist()
    table = pd.DataFrame({"task": "organ_lesion", "case": cases, "selected": True})
    write_parquet(table, tmp_path / "organ_lesion.parquet", make_provenance("select_buffer", {}))
    train(world, tmp_path / "teacher2", init=tmp_path / "step1", task="paired_organs", data=world["data2"])
    settings = {
        "lora": {"rank": 2, "alpha": 4, "init": "teacher_svd", "train_norms": True, "train_biases": True},
        "kd_weight": 1.0,
        "retention_weight": 0.5,
        "lwf_weight": 1.0,
        "buffer_batch_size": 1,
        "grad_log_every": 2,
    }
    out = tmp_path / "adapter2"
    train(
        world,
        out,
        recipe="retention",
        init=tmp_path / "step1",
        task="paired_organs",
        data=world["data2"],
        settings=settings,
        teacher=tmp_path / "teacher2",
        buffers=[(tmp_path / "organ_lesion.parquet", world["data1"])],
    )
    log = pd.read_parquet(out / "train_log.parquet")
    assert (log["lwf"] > 0).all() and (log["grad_lwf"].dropna() > 0).all()
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(".adn.N." in k for k in adapter) and any(k.endswith("bias") and ".conv." in k for k in adapter)
    merge(tmp_path / "step1", out, tmp_path / "merged2")
    merged = load_model(tmp_path / "merged2").eval()
    base = load_model(tmp_path / "step1")
    base.add_head("paired_organs", merged.seg_heads["paired_organs"].out_channels)
    peft_model = load_adapter(base, out).eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for head in ("organ_lesion", "paired_organs"):
            diff = (merged.segment(x, head) - peft_model.segment(x, head)).abs().max().item()
            assert diff < 1e-5, head


def test_retention_levels_of_the_strided_unet_are_its_encoder_levels() -> None:
    """The default backbone's retention term sees every encoder level, not only the deepest map."""
    from stages.core.lora import add_lora
    from stages.core.nets import FoundationNet
    from stages.train import _FeatureTap, retention_levels

    channels, strides = [4, 8, 16, 32], [2, 2, 2]
    model = FoundationNet(
        "unet", arch_kwargs={"channels": channels, "strides": strides}, ssl={}, heads={"t": 2}, seed=0
    ).eval()
    names = retention_levels(model)
    assert names == ["backbone.model.0", "backbone.model.1.submodule.0", "backbone.model.1.submodule.1.submodule.0"]
    net = add_lora(model, rank=2, alpha=2)  # the names are found through PEFT's wrapper too
    tap = _FeatureTap(net, names)
    assert tap.names == names
    with torch.no_grad():
        model.forward_features(torch.zeros(1, 1, 16, 16, 16))
    shapes = [tuple(t.shape) for t in tap.collect()]
    assert shapes == [(1, 4, 8, 8, 8), (1, 8, 4, 4, 4), (1, 16, 2, 2, 2)]


def test_settings_contract_refuses_unknown_and_missing_keys_by_recipe(world: dict[str, Path], tmp_path: Path) -> None:
    """Each recipe reads its own dataclass: a typo or a key the pipeline forgot stops the job before training."""
    from stages.train import RECIPE_SETTINGS, RECIPES

    assert set(RECIPE_SETTINGS) == set(RECIPES)
    with pytest.raises(InputError, match=r"train \(finetune\): unknown settings \['learning_rate'\]"):
        train(world, tmp_path / "a", settings={"learning_rate": 0.1})
    bare = {k: v for k, v in SETTINGS.items() if k != "warmup_steps"}
    from stages.train import run

    with pytest.raises(InputError, match=r"train \(finetune\): missing settings \['warmup_steps'\]"):
        run("finetune", world["m0"], [world["data1"]], ["organ_lesion"], tmp_path / "b", tmp_path / "bw", bare)
    no_rank = {**SETTINGS, **RETENTION, "lora": {k: v for k, v in RETENTION["lora"].items() if k != "rank"}}
    with pytest.raises(InputError, match=r"train \(retention\): missing settings \['rank'\]") as err:
        run("retention", world["m0"], [world["data1"]], ["organ_lesion"], tmp_path / "c", tmp_path / "cw", no_rank)
    assert err.value.where == "--settings.lora"
    # the semi-supervised recipe needs its own key: finetune's settings are not enough
    with pytest.raises(InputError, match=r"missing settings \['pseudo_weight'\]"):
        train(world, tmp_path / "d", recipe="semisupervised", pseudo=tmp_path)
    assert not any((tmp_path / n).exists() for n in "abcd")
