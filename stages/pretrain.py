"""Pre-train the foundation model M0 by self-supervision (masked inpainting + rotation) on an unlabelled pool.

Writes the model folder M0: ``model.safetensors`` (backbone + SSL heads), ``model.json``,
``feature_stats.safetensors`` (mean and covariance of pooled encoder features over the pool, for the
Mahalanobis fallback) and ``pretrain_log.parquet``. Resumable through the shared trainer.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.errors import InputError, run_cli
from stages.core.inference import resolve_device
from stages.core.io import config_hash, make_provenance, read_parquet, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.nets import FoundationNet, save_model
from stages.core.settings import add_settings_argument, from_mapping, setting
from stages.core.ssl import make_views, ssl_loss, write_feature_stats
from stages.core.trainer import Trainer, TrainSettings

__all__ = ["PretrainHyper", "PretrainSettings", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class PretrainHyper:
    """How M0 is optimised (``foundation.pretrain``)."""

    steps: int = setting(help="optimiser steps", schema="foundation.pretrain.steps")
    batch_size: int = setting(help="crops per step", schema="foundation.pretrain.batch_size")
    lr: float = setting(help="AdamW learning rate", schema="foundation.pretrain.lr")
    weight_decay: float = setting(help="AdamW weight decay", schema="foundation.pretrain.weight_decay")
    checkpoint_every: int = setting(
        help="steps between resumable checkpoints", schema="foundation.pretrain.checkpoint_every"
    )


@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    """The settings of M0's pre-training: the ``foundation`` network and SSL keys, ``seed`` and ``device``."""

    arch: str = setting(help="backbone (stages.core.nets)", schema="foundation.arch")
    in_channels: int = setting(help="input channels", schema="foundation.in_channels")
    arch_kwargs: dict[str, Any] | None = setting(help="backbone keyword arguments", schema="foundation.arch_kwargs")
    ssl: dict[str, Any] = setting(
        help="SSL heads and views (patch_size, mask_ratio, mask_patch, loss weights, ...)", schema="foundation.ssl"
    )
    pretrain: PretrainHyper = setting(help="optimisation", schema="foundation.pretrain")
    seed: int = setting(help="seeds the initialisation, the crops and the views", schema="seed")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")


def run(pool: Path, out: Path, work: Path, settings: Mapping[str, Any]) -> None:
    """Pre-train M0 on the preprocessed pool folder ``pool`` and write the model folder ``out``.

    Args:
        pool: preprocessed unlabelled pool (``manifest.parquet``, ``cases/``).
        out: model folder to write.
        work: folder for resumable state (not a declared output).
        settings: see :class:`PretrainSettings`.
    """
    conf = from_mapping(PretrainSettings, settings, "pretrain")
    settings = dict(settings)
    device = resolve_device(conf.device)
    manifest_path = pool / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the pre-training pool first")
    manifest = read_parquet(manifest_path)
    cases = manifest["case"].tolist()
    if not cases:
        raise InputError(manifest_path, "the pre-training pool is empty")
    seed = conf.seed
    ssl = conf.ssl
    hp = conf.pretrain
    model = FoundationNet(conf.arch, conf.in_channels, conf.arch_kwargs, ssl=ssl, seed=seed)
    model.to(device)
    volumes = {c: np.load(pool / "cases" / f"{c}.npy", mmap_mode="r") for c in cases}
    weights = {"inpaint": ssl["inpaint_weight"], "rotation": ssl["rotation_weight"]}

    def step_fn(net: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(cases), (hp.batch_size,), generator=generator).tolist()
        views = [
            make_views(
                torch.from_numpy(np.array(volumes[cases[i]])),
                1,
                ssl["patch_size"],
                ssl["mask_ratio"],
                ssl["mask_patch"],
                generator,
            )
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
        TrainSettings(
            steps=hp.steps,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            checkpoint_every=hp.checkpoint_every,
            device=str(device),
            seed=seed,
        ),
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
    add_settings_argument(parser, PretrainSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.pool, args.out, args.work, args.settings)


if __name__ == "__main__":
    run_cli(main)
