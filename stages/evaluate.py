"""Score predictions against the original labels, per case and class: Dice, HD95 (mm) and NSD, long format."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.geometry import apply_label_map
from stages.core.io import make_provenance, read_parquet, read_provenance, write_parquet
from stages.core.metrics import case_metrics

__all__ = ["run", "main"]

METRICS = ("dice", "hd95", "nsd")


def run(
    predictions: Path, data: Path, out: Path, method: str, step: str, task: str, settings: dict[str, Any]
) -> None:
    """Compare every prediction in ``predictions`` with its ground truth and write ``out`` (Parquet).

    Args:
        predictions: folder with ``predictions.parquet`` and ``{case}.nii.gz``.
        data: the task's preprocessed folder (its manifest points at the original labels).
        out: the metrics Parquet to write.
        method, step, task: what is being evaluated (method name, the model's training step, the task).
        settings: ``nsd_tolerance_mm``, ``seed``.
    """
    manifest = read_parquet(data / "manifest.parquet").set_index("case")
    label_setting = read_provenance(data / "manifest.parquet").get("settings", {}).get("labels")
    pred_table = read_parquet(predictions / "predictions.parquet")
    pred_prov = read_provenance(predictions / "predictions.parquet")
    rows = []
    for case in tqdm(pred_table["case"], desc=f"evaluate {method}/{step}/{task}", mininterval=2):
        info = manifest.loc[case]
        if info["label_path"] is None or pd.isna(info["label_path"]):
            raise InputError(data / "manifest.parquet", f"case {case} has no label to evaluate against")
        pred = np.asarray(nib.load(predictions / f"{case}.nii.gz").dataobj).astype(np.int64)
        gt_img = nib.load(info["label_path"])
        gt = apply_label_map(np.asarray(gt_img.dataobj), label_setting).astype(np.int64)
        if pred.shape != gt.shape:
            raise InputError(predictions / f"{case}.nii.gz", f"shape {pred.shape} differs from the label's {gt.shape}")
        per_class = case_metrics(
            pred, gt, int(info["num_classes"]), [float(s) for s in info["orig_spacing"]], settings["nsd_tolerance_mm"],
            where=predictions / f"{case}.nii.gz",
        )
        for entry in per_class:
            for metric in METRICS:
                rows.append(
                    {
                        "method": method,
                        "step": step,
                        "task": task,
                        "case": case,
                        "class": int(entry["class"]),
                        "metric": metric,
                        "value": float(entry[metric]),
                        "flag": entry["flag"],
                    }
                )
    prov = make_provenance(
        "evaluate", settings, inputs=[predictions / "predictions.parquet", data / "manifest.parquet"],
        seed=settings.get("seed"), method=method, step=step, task=task, model_id=pred_prov.get("model_id"),
    )
    df = pd.DataFrame(rows, columns=["method", "step", "task", "case", "class", "metric", "value", "flag"])
    df["seed"] = settings.get("seed")
    df["model_id"] = pred_prov.get("model_id")
    df["config_hash"] = prov["config_hash"]
    df["code_version"] = prov["code_version"]
    write_parquet(df, out, prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__)
    parser.add_argument("--predictions", type=Path, required=True, help="folder written by stages.predict")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed task folder")
    parser.add_argument("--out", type=Path, required=True, help="metrics Parquet to write")
    parser.add_argument("--method", required=True)
    parser.add_argument("--step", required=True, help="training step of the model (task it was trained on last)")
    parser.add_argument("--task", required=True, help="task evaluated")
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON object of settings")
    args = parser.parse_args(argv)
    run(args.predictions, args.data, args.out, args.method, args.step, args.task, args.settings)


if __name__ == "__main__":
    run_cli(main)
