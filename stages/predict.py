"""Predict one split of a preprocessed task with one model and head, in the original NIfTI geometry."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.errors import InputError, run_cli
from stages.core.inference import predict_cases, resolve_device
from stages.core.io import make_provenance, write_parquet
from stages.core.log import stage_log
from stages.core.nets import load_model, model_id

__all__ = ["run", "main"]


def run(model_dir: Path, head: str, data: Path, split: str, out: Path, settings: dict[str, Any]) -> None:
    """Predict every case of ``split`` and write ``out/{case}.nii.gz`` plus ``out/predictions.parquet``.

    Args:
        model_dir: model folder.
        head: the segmentation head (task name) to predict with.
        data: the task's preprocessed folder.
        split: which split of the manifest to predict.
        out: output folder.
        settings: ``patch_size``, ``overlap``, ``sw_batch_size``, ``device``.
    """
    device = resolve_device(settings.get("device", "cpu"))
    model = load_model(model_dir)
    if head not in model.seg_heads:
        raise InputError(model_dir / "model.json", f"has no segmentation head {head!r} (heads: {sorted(model.seg_heads)})")
    table = predict_cases(model.to(device), head, data, split, out, settings, device)
    prov = make_provenance(
        "predict", settings, inputs=[model_dir / "model.safetensors", data / "manifest.parquet"],
        model_id=model_id(model_dir), head=head, split=split,
    )
    write_parquet(table, out / "predictions.parquet", prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--head", required=True, help="segmentation head (task name)")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed task folder")
    parser.add_argument("--split", default="test", help="manifest split to predict")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON object of settings")
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.model, args.head, args.data, args.split, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
