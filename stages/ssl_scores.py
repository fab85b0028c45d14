"""Score every case of a task by M0's self-supervised loss averaged over R stochastic passes (MDS and DKD share it).

Without SSL heads (an imported checkpoint that lacks them) the score falls back to the Mahalanobis
distance of the pooled encoder feature to M0's pre-training feature statistics, and the table's
``scorer`` column says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.inference import resolve_device
from stages.core.io import load_safetensors, make_provenance, read_json, read_parquet, write_parquet
from stages.core.log import stage_log
from stages.core.nets import load_model, model_id
from stages.core.settings import add_settings_argument, from_mapping, setting
from stages.core.ssl import SCORE_COLUMNS, mahalanobis, pooled_case_feature, score_cases

__all__ = ["ScoreSettings", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class ScoreSettings:
    """The settings of an SSL scoring job (the ``scoring`` section and the foundation's SSL settings)."""

    passes: int = setting(help="R, stochastic passes averaged per case", schema="scoring.passes")
    batch: int = setting(help="passes run together in one batch", schema="scoring.batch")
    ssl: dict[str, Any] = setting(
        help="the foundation's SSL settings (patch_size, mask_ratio, mask_patch, ...)", schema="foundation.ssl"
    )
    seed: int = setting(help="seeds the passes' crops, masks and rotations", schema="seed")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")


COLUMNS = ["case", "split", *SCORE_COLUMNS[1:]]


class _Sized:
    """A lazy iterable with a length: the cases are still loaded one at a time, but the progress bar
    of :func:`score_cases` (``tqdm``, which asks ``len()``) shows ``k/n`` and a time left."""

    def __init__(self, items: Iterable[Any], n: int) -> None:
        self.items, self.n = items, n

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return self.n


def run(model_dir: Path, data: Path, out: Path, settings: Mapping[str, Any]) -> None:
    """Write ``out`` (Parquet): case, split, mean, std, sem, half_a, half_b, split_half_r, R, scorer.

    ``scorer`` is ``ssl`` or ``feature_fallback``. Reliability of the SSL score: ``sem`` is the standard
    error of a case's mean over its R passes, ``half_a``/``half_b`` the means of its even and odd
    passes, ``split_half_r`` the Spearman-Brown split-half reliability of the case ranks (the
    provenance also carries the raw Pearson and Spearman half-vs-half correlations). The feature
    fallback is deterministic: sem 0, halves NaN, split_half_r NaN.

    Args:
        model_dir: the foundation model folder (M0).
        data: a preprocessed task folder.
        out: the Parquet file to write.
        settings: see :class:`ScoreSettings`.
    """
    conf = from_mapping(ScoreSettings, settings, "ssl_scores")
    settings = dict(settings)
    device = resolve_device(conf.device)
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the task first")
    manifest = read_parquet(manifest_path)
    model = load_model(model_dir).to(device).eval()
    has_heads = bool(read_json(model_dir / "model.json").get("has_ssl_heads", True))
    ssl = conf.ssl
    volumes = ((c, np.load(data / "cases" / f"{c}.npy", mmap_mode="r")) for c in manifest["case"])
    if has_heads:
        scores = score_cases(
            model,
            _Sized(((c, torch.from_numpy(np.array(v))) for c, v in volumes), len(manifest)),
            R=conf.passes,
            patch_size=ssl["patch_size"],
            mask_ratio=ssl["mask_ratio"],
            mask_patch=ssl["mask_patch"],
            seed=conf.seed,
            batch=conf.batch,
        )
        inputs = [model_dir / "model.safetensors", manifest_path]
    else:
        stats_path = model_dir / "feature_stats.safetensors"
        if not stats_path.is_file():
            raise InputError(
                stats_path, "missing: a model without SSL heads needs its feature statistics for the fallback"
            )
        stats = load_safetensors(stats_path)
        feats = np.stack(
            [
                pooled_case_feature(model, v, ssl["patch_size"], device=device)
                for _, v in tqdm(list(volumes), desc="feature fallback", mininterval=2)
            ]
        )
        dist = mahalanobis(feats, stats["mean"].numpy(), stats["cov"].numpy())
        scores = pd.DataFrame(
            {
                "case": manifest["case"],
                "mean": dist,
                "std": 0.0,
                "sem": 0.0,
                "half_a": np.nan,
                "half_b": np.nan,
                "split_half_r": np.nan,
                "R": 1,
                "scorer": "feature_fallback",
            }
        )
        inputs = [model_dir / "model.safetensors", stats_path, manifest_path]
    reliability = {k: (None if not np.isfinite(v) else v) for k, v in scores.attrs.get("reliability", {}).items()}
    scores = scores.merge(manifest[["case", "split"]], on="case")[COLUMNS]
    prov = make_provenance(
        "ssl_scores",
        settings,
        inputs=inputs,
        seed=conf.seed,
        model_id=model_id(model_dir),
        scorer=str(scores["scorer"].iloc[0]) if len(scores) else None,
        split_half=reliability or None,
    )
    write_parquet(scores, out, prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.ssl_scores", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="foundation model folder")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed task folder")
    parser.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    add_settings_argument(parser, ScoreSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.model, args.data, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
