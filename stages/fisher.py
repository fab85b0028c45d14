"""Estimate online EWC's diagonal Fisher of one step's model on its task's training data, accumulated.

After task t of the ``ewc`` chain: ``F_t = gamma * F_{t-1} + F(M_t; task t)``, where F(M_t; task t) is the
mean over ``fisher_batches`` x ``batch_size`` training patches of the squared gradient of the Dice + CE
loss w.r.t. each backbone parameter (the empirical Fisher; Kirkpatrick et al., PNAS 2017; online form:
Schwarz et al., ICML 2018). The next step's training (``stages.train --recipe ewc --fisher``) pulls each
parameter towards M_t with that weight. The Fisher is its own artifact, so it can be audited:
``fisher.safetensors`` (one tensor per backbone parameter, provenance in its header) and ``fisher.json``
(provenance plus per-tensor sums and the total, to read without torch).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.core.errors import InputError, run_cli
from stages.core.inference import resolve_device
from stages.core.io import load_safetensors, make_provenance, read_parquet, save_json, save_safetensors
from stages.core.log import stage_log
from stages.core.losses import segmentation_loss
from stages.core.nets import load_model, model_id, seed_from
from stages.core.regularisers import accumulate_fisher, diagonal_fisher
from stages.core.sampling import CaseStore, PatchSampler
from stages.core.settings import add_settings_argument, add_threads_argument, apply_threads, from_mapping, setting

__all__ = ["FisherSettings", "main", "run"]


@dataclass(frozen=True, kw_only=True)
class FisherSettings:
    """The Fisher estimate's settings: ``ewc`` (gamma, fisher_batches) and the training patches."""

    gamma: float = setting(help="decay of the accumulated Fisher (1 = plain sum over tasks)", schema="ewc.gamma")
    fisher_batches: int = setting(help="batches of training patches the estimate averages", schema="ewc.fisher_batches")
    patch_size: list[int] = setting(help="training patch (voxels)", schema="train.patch_size")
    batch_size: int = setting(help="patches per batch", schema="train.batch_size")
    fg_ratio: float = setting(help="share of patches centred on a foreground voxel", schema="train.fg_ratio")
    seed: int = setting(help="seeds the patch draws", schema="seed")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")


def run(
    model_dir: Path, data: Path, task: str, out: Path, settings: dict[str, Any], previous: Path | None = None
) -> None:
    """Write ``out/fisher.safetensors`` and ``out/fisher.json`` for the model in ``model_dir``.

    Args:
        model_dir: the step's model folder M_t (it has ``task``'s head).
        data: the task's preprocessed folder (its ``train`` split is used).
        task: the task (head) name.
        out: the Fisher folder.
        settings: ``gamma``, ``fisher_batches``, ``patch_size``, ``batch_size``, ``fg_ratio``, ``seed``,
            ``device``.
        previous: the previous step's Fisher folder (F_{t-1}); None at the chain's first step.
    """
    from_mapping(FisherSettings, settings, "fisher")
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: run the preprocess step for this task first")
    manifest = read_parquet(manifest_path)
    cases = manifest.loc[manifest["split"] == "train", "case"].tolist()
    if not cases:
        raise InputError(manifest_path, "has no training cases")
    device = resolve_device(settings["device"])
    model = load_model(model_dir).to(device)
    if task not in model.seg_heads:
        raise InputError(model_dir / "model.json", f"has no head {task!r} (heads: {sorted(model.seg_heads)})")
    model.eval()  # the Fisher of the model as it predicts (no dropout); the normalisations use their own statistics
    sampler = PatchSampler(
        CaseStore(data / "cases", cases, with_labels=True),
        patch_size=settings["patch_size"],
        batch_size=1,
        fg_ratio=settings["fg_ratio"],
    )
    generator = torch.Generator().manual_seed(seed_from(settings["seed"], "fisher", task))
    loss_fn = segmentation_loss()
    n = int(settings["fisher_batches"]) * int(settings["batch_size"])

    def loss_of_patch(_: int) -> torch.Tensor:
        batch = sampler.sample(generator)
        return loss_fn(model.segment(batch["image"].to(device), task), batch["label"].to(device))

    new = diagonal_fisher(model.backbone.named_parameters(), loss_of_patch, n)
    old = None
    inputs = [model_dir / "model.safetensors", manifest_path]
    if previous is not None:
        previous_file = previous / "fisher.safetensors"
        if not previous_file.is_file():
            raise InputError(previous_file, "missing: the previous step's Fisher")
        old = load_safetensors(previous_file)
        inputs.append(previous_file)
    fisher = accumulate_fisher(new, old, float(settings["gamma"]))
    prov = make_provenance(
        "fisher", settings, inputs=inputs, seed=int(settings["seed"]), model=model_id(model_dir), task=task, patches=n
    )
    save_safetensors(fisher, out / "fisher.safetensors", prov)
    sums = {name: float(f.sum()) for name, f in sorted(fisher.items())}
    save_json(
        {
            "total": float(sum(sums.values())),
            "parameters": int(sum(f.numel() for f in fisher.values())),
            "mean": float(sum(sums.values()) / max(1, sum(f.numel() for f in fisher.values()))),
            "new_total": float(sum(float(f.sum()) for f in new.values())),
            "sums": sums,
            "provenance": prov,
        },
        out / "fisher.json",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.fisher", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the step's model folder (M_t)")
    parser.add_argument("--data", type=Path, required=True, help="the task's preprocessed folder")
    parser.add_argument("--task", required=True, help="task (head) name")
    parser.add_argument("--previous", type=Path, default=None, help="the previous step's Fisher folder")
    parser.add_argument("--out", type=Path, required=True, help="Fisher folder to write")
    add_settings_argument(parser, FisherSettings, required=True)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    with stage_log(parser, args):
        run(args.model, args.data, args.task, args.out, args.settings, args.previous)


if __name__ == "__main__":
    run_cli(main)
