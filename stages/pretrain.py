"""Pre-train the foundation model M0 by self-supervision (masked inpainting + rotation) on an unlabelled pool.

Writes the model folder M0: ``model.safetensors`` (backbone + SSL heads), ``model.json``,
``feature_stats.safetensors`` (mean and covariance of pooled encoder features over the pool, for the
Mahalanobis fallback) and ``pretrain_log.parquet``. Resumable through the shared trainer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.errors import InputError, run_cli
from stages.core.inference import resolve_device
from stages.core.io import config_hash, make_provenance, read_parquet, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.nets import FoundationNet, save_model
from stages.core.ssl import make_views, ssl_loss, write_feature_stats
from stages.core.trainer import Trainer, TrainSettings

__all__ = ["run", "main"]


def run(pool: Path, out: Path, work: Path, settings: dict[str, Any]) -> None:
    """Pre-train M0 on the preprocessed pool folder ``pool`` and write the model folder ``out``.

    Args:
        pool: preprocessed unlabelled pool (``manifest.parquet``, ``cases/``).
        out: model folder to write.
        work: folder for resumable state (not a declared output).
        settings: ``arch``, ``in_channels``, ``arch_kwargs``, ``ssl`` and ``pretrain`` (the
            ``foundation`` config section) plus ``seed`` and ``device``.
    """
    device = resolve_device(settings.get("device", "cpu"))
    manifest_path = pool / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the pre-training pool first")
    manifest = read_parquet(manifest_path)
    cases = manifest["case"].tolist()
    if not cases:
        raise InputError(manifest_path, "the pre-training pool is empty")
    seed = int(settings.get("seed", 0))
    ssl = settings["ssl"]
    hp = settings["pretrain"]
    model = FoundationNet(settings["arch"], settings["in_channels"], settings.get("arch_kwargs"), ssl=ssl, seed=seed)
    model.to(device)
    volumes = {c: np.load(pool / "cases" / f"{c}.npy", mmap_mode="r") for c in cases}
    weights = {"inpaint": ssl["inpaint_weight"], "rotation": ssl["rotation_weight"]}

    def step_fn(net: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(cases), (hp["batch_size"],), generator=generator).tolist()
        views = [
            make_views(torch.from_numpy(np.array(volumes[cases[i]])), 1, ssl["patch_size"], ssl["mask_ratio"],
                       ssl["mask_patch"], generator)
            for i in picks
        ]
        batch = {k: torch.cat([v[k] for v in views]).to(device) for k in views[0]}
        terms = ssl_loss(net, batch, weights=weights, reduction="mean")
        return {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}

    inputs = {str(manifest_path): sha256_file(manifest_path)}
    job_hash = config_hash({"settings": settings, "inputs": inputs})
    trainer = Trainer(
        model,
        list(model.parameters()),
        step_fn,
        TrainSettings(steps=hp["steps"], lr=hp["lr"], weight_decay=hp["weight_decay"],
                      checkpoint_every=hp["checkpoint_every"], device=str(device), seed=seed),
        work_dir=work / job_hash,
        config_hash=job_hash,
        name="pretrain",
    )
    result = trainer.fit()
    model.load_state_dict(result.final_state)
    prov = make_provenance("pretrain", settings, inputs=inputs, seed=seed)
    preprocessing = {
        "spacing": [float(s) for s in manifest["spacing"].iloc[0]],
        "pool_manifest_sha256": inputs[str(manifest_path)],
    }
    model.eval()
    write_feature_stats(model, volumes.values(), ssl["patch_size"], out / "feature_stats.safetensors", prov, device)
    model.cpu()
    save_model(model, out, prov, extra={"preprocessing": preprocessing})
    write_parquet(result.log, out / "pretrain_log.parquet", {**prov, "resumed_from": result.resumed_from})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, required=True, help="preprocessed pool folder")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--work", type=Path, required=True, help="folder for resumable state")
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON object of settings")
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.pool, args.out, args.work, args.settings)


if __name__ == "__main__":
    run_cli(main)
