"""The K&G RFT retention stage on MSD Hippocampus (anterior), at the CPU profile's scale: LoRA sweep.

Prepares (once, under ``--root``) the anterior task (label 1, split val 0.1 / test 0.2 as in
examples/hippocampus.yaml), an M0 pre-trained 150 SSL steps on the 260 images with the CPU profile's
BasicUNet (8, 8, 16, 32, 64, 8), the teacher (60 steps full FT, lr 3e-3, batch 2, 32³) and a random
buffer of 10 % of the training cases; then runs the retention stage for each ``--variant`` and prints
validation Dice (the selection criterion), test Dice (reported, never used to choose), and the mean
size of every loss term and of its gradient norm.

    OMP_NUM_THREADS=1 python bench/bench_retention.py --root /tmp/hippo --variant r4_svd r8_svd r16_svd

Needs ../shared/data/hippocampus.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hippocampus"
TRAIN = {
    "patch_size": [32, 32, 32],
    "batch_size": 2,
    "steps": 60,
    "lr": 0.003,
    "weight_decay": 1e-5,
    "fg_ratio": 0.5,
    "checkpoint_every": 60,
    "val_every": 0,
    "amp": False,
    "seed": 0,
    "device": "cpu",
    "overlap": 0.25,
    "warmup_steps": 0,
}
MEDSEQFT = {
    "kd_kind": "kl",
    "kd_temperature": 2.0,
    "kd_weight": 1.0,
    "kd_mask": "foreground",
    "retention_weight": 0.5,
    "buffer_batch_size": 2,
    "grad_log_every": 10,
    "lwf_weight": 0.5,
    "kd_dilation": 2,
    "kd_background_share": 0.2,
    "retention_levels": "all",
    "retention_scale": "channel",
}
#: the schema's LoRA defaults, under each variant's ``lora``
LORA = {
    "rank": 8,
    "alpha": 8,
    "dropout": 0.0,
    "targets": None,
    "enabled": True,
    "lr": None,
    "init": "zero",
    "train_norms": False,
    "train_biases": False,
}

#: name -> settings over MEDSEQFT (lora merged over the defaults)
VARIANTS: dict[str, dict] = {
    "old": {
        "lora": {"rank": 4, "alpha": 4, "lr": 0.003, "init": "zero"},
        "kd_mask": "none",
        "retention_levels": "deepest",
        "retention_scale": "none",
    },
    "r4_zero": {"lora": {"rank": 4, "alpha": 4, "init": "zero"}},
    "r8_zero": {"lora": {"rank": 8, "alpha": 8, "init": "zero"}},
    "r16_zero": {"lora": {"rank": 16, "alpha": 16, "init": "zero"}},
    "r4_svd": {"lora": {"rank": 4, "alpha": 4, "init": "teacher_svd"}},
    "r8_svd": {"lora": {"rank": 8, "alpha": 8, "init": "teacher_svd"}},
    "r16_svd": {"lora": {"rank": 16, "alpha": 16, "init": "teacher_svd"}},
    "r4_svd_lr1": {"lora": {"rank": 4, "alpha": 4, "init": "teacher_svd", "lr": 0.003}},
    "r8_svd_lr1": {"lora": {"rank": 8, "alpha": 8, "init": "teacher_svd", "lr": 0.003}},
    "r16_svd_lr1": {"lora": {"rank": 16, "alpha": 16, "init": "teacher_svd", "lr": 0.003}},
    "r8_svd_norms": {"lora": {"rank": 8, "alpha": 8, "init": "teacher_svd", "train_norms": True, "train_biases": True}},
    "r8_svd_nomask": {"lora": {"rank": 8, "alpha": 8, "init": "teacher_svd"}, "kd_mask": "none"},
    "r4_zero_kdnone": {"lora": {"rank": 4, "alpha": 4, "init": "zero"}, "kd_mask": "none"},
    "r8_zero_kdnone": {"lora": {"rank": 8, "alpha": 8, "init": "zero"}, "kd_mask": "none"},
    "r16_zero_kdnone": {"lora": {"rank": 16, "alpha": 16, "init": "zero"}, "kd_mask": "none"},
}


def prepare(root: Path) -> None:
    from stages import preprocess, pretrain
    from stages.core.io import make_provenance, read_parquet, write_parquet
    from stages.train import run as train

    data = root / "data" / "anterior"
    if not (data / "manifest.parquet").is_file():
        preprocess.run(
            DATA,
            data,
            {
                "labelled": True,
                "labels": [1],
                "seed": 0,
                "split": {"val": 0.1, "test": 0.2},
                "target_spacing": [1.0, 1.0, 1.0],
                "normalisation": "mr",
            },
        )
    if not (root / "pool" / "manifest.parquet").is_file():
        preprocess.run(
            DATA,
            root / "pool",
            {"labelled": False, "seed": 0, "target_spacing": [1.0, 1.0, 1.0], "normalisation": "mr"},
        )
    if not (root / "m0" / "model.safetensors").is_file():
        pretrain.run(
            root / "pool",
            root / "m0",
            root / "work" / "m0",
            {
                "arch": "basicunet",
                "in_channels": 1,
                "arch_kwargs": {"features": [8, 8, 16, 32, 64, 8]},
                "ssl": {
                    "patch_size": [32, 32, 32],
                    "mask_ratio": 0.5,
                    "mask_patch": 8,
                    "inpaint_weight": 1.0,
                    "rotation_weight": 1.0,
                },
                "pretrain": {"steps": 150, "batch_size": 4, "lr": 0.002, "weight_decay": 1e-5, "checkpoint_every": 50},
                "seed": 0,
                "device": "cpu",
            },
        )
    if not (root / "teacher" / "model.safetensors").is_file():
        train("finetune", root / "m0", [data], ["anterior"], root / "teacher", root / "work" / "teacher", TRAIN)
    if not (root / "buffer.parquet").is_file():
        manifest = read_parquet(data / "manifest.parquet")
        cases = manifest.loc[manifest["split"] == "train", "case"].tolist()
        chosen = set(np.random.default_rng(0).choice(cases, size=max(2, len(cases) // 10), replace=False))
        table = pd.DataFrame({"task": "anterior", "case": cases, "selected": [c in chosen for c in cases]})
        write_parquet(table, root / "buffer.parquet", make_provenance("select_buffer", {}))


def dice(model: torch.nn.Module, data: Path, split: str) -> float:
    from stages.core.io import read_parquet
    from stages.train import _dice_validator

    manifest = read_parquet(data / "manifest.parquet")
    cases = manifest.loc[manifest["split"] == split, "case"].tolist()
    return _dice_validator(model, "anterior", data, cases, TRAIN, torch.device("cpu"))(model)


def run_variant(root: Path, name: str, steps: int) -> dict:
    from stages.core.lora import load_adapter, merge_lora
    from stages.core.nets import load_model
    from stages.train import run as train

    settings = {**TRAIN, **MEDSEQFT, **VARIANTS[name], "steps": steps, "checkpoint_every": steps}
    settings["lora"] = {**LORA, **VARIANTS[name].get("lora", {})}
    out = root / "runs" / f"{name}_{steps}"
    data = root / "data" / "anterior"
    started = time.perf_counter()
    if not (out / "train_log.parquet").is_file():
        train(
            "retention",
            root / "m0",
            [data],
            ["anterior"],
            out,
            root / "work" / out.name,
            settings,
            teacher=root / "teacher",
            buffers=[(root / "buffer.parquet", data)],
        )
    seconds = time.perf_counter() - started
    base = load_model(root / "m0")
    base.add_head("anterior", 2)
    model = merge_lora(load_adapter(base, out)).eval()
    log = pd.read_parquet(out / "train_log.parquet")
    terms = [c for c in log.columns if c in ("seg", "kd", "retention", "lwf") or c.startswith(("grad_", "retention_l"))]
    half = log.iloc[len(log) // 2 :]
    with torch.no_grad():
        row = {
            "variant": name,
            "steps": steps,
            "val_dice": dice(model, data, "val"),
            "test_dice": dice(model, data, "test"),
            "train_s": round(seconds, 1),
        }
    row.update({f"{c}@1": float(log[c].dropna().iloc[0]) for c in terms if log[c].notna().any()})
    row.update({f"{c}@2nd_half": float(half[c].mean()) for c in terms})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--variant", nargs="+", default=["r4_svd", "r8_svd", "r16_svd"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--teacher-dice", action="store_true", help="also score the teacher and M0's start")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepare(args.root)
    if args.teacher_dice:
        from stages.core.nets import load_model

        teacher = load_model(args.root / "teacher").eval()
        with torch.no_grad():
            print(
                json.dumps(
                    {
                        "variant": "teacher",
                        "val_dice": dice(teacher, args.root / "data" / "anterior", "val"),
                        "test_dice": dice(teacher, args.root / "data" / "anterior", "test"),
                    }
                ),
                flush=True,
            )
    for name in args.variant:
        print(json.dumps(run_variant(args.root, name, args.steps)), flush=True)


if __name__ == "__main__":
    main()
