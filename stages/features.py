"""Pooled encoder features of every case of a task under M0 (one row per case), for DKD, core-set and pseudo-label distances."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.inference import resolve_device
from stages.core.io import make_provenance, read_parquet, write_parquet
from stages.core.log import stage_log
from stages.core.nets import load_model, model_id
from stages.core.settings import add_settings_argument, from_mapping, setting
from stages.core.ssl import pooled_case_feature

__all__ = ["FeatureSettings", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class FeatureSettings:
    """The settings of a feature extraction job."""

    patch_size: list[int] = setting(
        help="the window the features are pooled over (the SSL patch)", schema="foundation.ssl.patch_size"
    )
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")


def run(model_dir: Path, data: Path, out: Path, settings: Mapping[str, Any]) -> None:
    """Write ``out`` (Parquet): case, split, feature (fixed-size list of float32), model_id.

    Args:
        model_dir: the foundation model folder.
        data: a preprocessed task folder.
        out: the Parquet file to write.
        settings: see :class:`FeatureSettings` (for volumes larger than the patch see
            :func:`stages.core.ssl.pooled_case_feature`).
    """
    conf = from_mapping(FeatureSettings, settings, "features")
    settings = dict(settings)
    device = resolve_device(conf.device)
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the task first")
    manifest = read_parquet(manifest_path)
    model = load_model(model_dir).to(device).eval()
    feats = [
        pooled_case_feature(model, np.load(data / "cases" / f"{c}.npy", mmap_mode="r"), conf.patch_size, device=device)
        for c in tqdm(manifest["case"], desc="features", mininterval=2)
    ]
    dim = int(feats[0].shape[0]) if feats else 0
    mid = model_id(model_dir)
    table = pa.table(
        {
            "case": pa.array(manifest["case"].tolist(), pa.string()),
            "split": pa.array(manifest["split"].tolist(), pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(feats).astype(np.float32) if feats else np.zeros(0, np.float32)), dim
            ),
            "model_id": pa.array([mid] * len(feats), pa.string()),
        }
    )
    prov = make_provenance("features", settings, inputs=[model_dir / "model.safetensors", manifest_path], model_id=mid)
    write_parquet(table, out, prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.features", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="foundation model folder")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed task folder")
    parser.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    add_settings_argument(parser, FeatureSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.model, args.data, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
