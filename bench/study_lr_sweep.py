"""Learning-rate sweep of the study's full fine-tuning (and LoRA) on a finished study folder, chosen on validation.

How the study profile's ``train.lr`` was chosen (BENCHMARKS.md, session 6). For each learning rate it
trains one task from the study's M0 with the study's ``train`` settings through ``stages.train.run``
(``finetune``; with ``--lora``, the ``retention`` recipe with no teacher, no buffer: parallel LoRA, then
the merge stage), one thread, and prints the validation Dice curve, the best step and the best validation
Dice, which is what the choice reads. The test Dice of the selected model (``bench_supervised``'s
``test_dice``: whole volumes, argmax) is printed for the record only: never choose on it.

    python bench/study_lr_sweep.py --study DIR [--task anterior] [--lr 0.001 0.003] [--steps 400]
                                   [--lora] [--lora-lr 0.01 0.03] [--seed 0]

``DIR`` is a folder where ``snakemake --configfile examples/hippocampus_study.yaml`` has run (it reads
``results/foundation``, ``results/data/<task>`` and the settings recorded in the provenance of parallel
FT's ``model.json`` and parallel LoRA's ``adapter/run.json``). Each line: ``lr X (lora_lr Y): val best B at step S, test T, N s | val curve``.
Measured (study M0, seed 0, 400 steps, batch 8): full FT anterior val 0.829 (lr 1e-3) / 0.853 (3e-3),
posterior 0.835 at 3e-3; LoRA (head 3e-3) anterior val 0.839 at lora_lr 1e-2 and at 3e-2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from _common import load_line
from bench_supervised import _load, test_dice

from stages.core.io import read_json, read_parquet
from stages.core.nets import load_model

__all__ = ["main"]


def _one(study: Path, task: str, settings: dict, retention: dict | None, where: Path) -> tuple[float, int, dict, float]:
    from stages.merge import run as merge_run
    from stages.train import run as train_run

    data, m0 = study / "results" / "data" / task, study / "results" / "foundation"
    started = time.perf_counter()
    if retention is None:  # full FT; else parallel LoRA's retention-recipe settings
        train_run("finetune", m0, [data], [task], where / "model", where / "work", settings)
        log_dir = where / "model"
    else:
        train_run(
            "retention",
            m0,
            [data],
            [task],
            where / "adapter",
            where / "work",
            {**retention, "lr": settings["lr"]},
        )
        merge_run(m0, where / "adapter", where / "model")
        log_dir = where / "adapter"
    secs = time.perf_counter() - started
    log = read_parquet(log_dir / "train_log.parquet")
    val = log[np.isfinite(log["val_score"])]
    curve = {int(r.step): round(float(r.val_score), 3) for r in val.itertuples()}
    best = int(val.loc[val["val_score"].idxmax(), "step"])
    manifest = read_parquet(data / "manifest.parquet")
    cases = _load(data, manifest.loc[manifest["split"] == "test", "case"].tolist())
    model = load_model(where / "model").eval()
    test, _ = test_dice(lambda x: model.segment(x, task), cases, 2)
    return test, best, curve, secs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="a folder where the study profile has run")
    parser.add_argument("--task", default="anterior")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3], help="train.lr values")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lora", action="store_true", help="sweep parallel LoRA's lora.lr (head at each --lr)")
    parser.add_argument("--lora-lr", type=float, nargs="+", default=[1e-2, 3e-2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(load_line(), "| 1 thread", flush=True)
    runs_dir = args.study / "results" / "runs"
    # the settings the study's own jobs ran with (their provenance), the swept keys replaced
    base = {**read_json(runs_dir / "parallel_ft" / args.task / "model.json")["provenance"]["settings"]}
    base |= {"steps": args.steps, "seed": args.seed}
    lora_run = read_json(runs_dir / "parallel_lora" / args.task / "adapter" / "run.json")["provenance"]["settings"]
    runs = [(lr, None) for lr in args.lr] if not args.lora else [(lr, x) for lr in args.lr for x in args.lora_lr]
    for lr, lora_lr in runs:
        with tempfile.TemporaryDirectory(prefix="study_lr_sweep_") as tmp:
            retention = None if lora_lr is None else {**lora_run, **base, "lora": {**lora_run["lora"], "lr": lora_lr}}
            test, best, curve, secs = _one(args.study, args.task, {**base, "lr": lr}, retention, Path(tmp))
        tag = f"lr {lr:g}" + ("" if lora_lr is None else f" (lora_lr {lora_lr:g})")
        print(
            f"{tag}: val best {curve[best]:.3f} at step {best}, test {test:.4f}, {secs:.0f} s | {json.dumps(curve)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
