"""Evaluate one model on the test split of one or more tasks: predictions in original geometry, then Dice, HD95 (mm), NSD.

One job per trained model (method, step): every task whose head the model carries is predicted and
scored, so the sequential matrix R[i, j] (model of step i on task j) comes from one place.
Metrics follow methods.md §0, in long format (one row per case, class and metric).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.geometry import apply_label_map
from stages.core.inference import predict_cases, resolve_device
from stages.core.io import make_provenance, read_parquet, read_provenance, write_parquet
from stages.core.log import stage_log
from stages.core.metrics import METRIC_NAMES, case_metrics
from stages.core.nets import load_model, model_id
from stages.core.settings import add_settings_argument, from_mapping, setting

__all__ = ["METRICS", "EvaluateSettings", "score_predictions", "run", "main"]

METRICS = METRIC_NAMES  # the one list, stages.core.metric_names


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings:
    """The settings of an evaluation job (``inference`` and ``evaluate`` sections, the training patch)."""

    patch_size: list[int] = setting(help="sliding-window size (the training patch)", schema="train.patch_size")
    overlap: float = setting(help="sliding-window overlap", schema="inference.overlap")
    sw_batch_size: int = setting(help="windows per forward pass", schema="inference.sw_batch_size")
    nsd_tolerance_mm: float | list[float] = setting(
        help="NSD tolerance (mm), one or one per foreground class", schema="evaluate.nsd_tolerance_mm"
    )
    seed: int = setting(help="the training seed of the evaluated run (the metrics' seed column)", schema="seed")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")


COLUMNS = ["method", "step", "task", "case", "class", "metric", "value", "flag"]


def score_predictions(
    predictions: Path, cases: Sequence[str], data: Path, nsd_tolerance_mm: float
) -> list[dict[str, Any]]:
    """Metric rows (task-agnostic keys: case, class, metric, value, flag) for ``cases`` predicted in ``predictions``."""
    manifest = read_parquet(data / "manifest.parquet").set_index("case")
    label_setting = read_provenance(data / "manifest.parquet").get("settings", {}).get("labels")
    rows = []
    for case in tqdm(cases, desc=f"metrics {data.name}", mininterval=2):
        info = manifest.loc[case]
        if info["label_path"] is None or pd.isna(info["label_path"]):
            raise InputError(data / "manifest.parquet", f"case {case} has no label to evaluate against")
        pred_path = predictions / f"{case}.nii.gz"
        pred = np.asarray(nib.load(pred_path).dataobj).astype(np.int64)
        gt = apply_label_map(np.asarray(nib.load(info["label_path"]).dataobj), label_setting).astype(np.int64)
        if pred.shape != gt.shape:
            raise InputError(pred_path, f"shape {pred.shape} differs from the label's {gt.shape}")
        per_class = case_metrics(
            pred,
            gt,
            int(info["num_classes"]),
            [float(s) for s in info["orig_spacing"]],
            nsd_tolerance_mm,
            where=pred_path,
        )
        for entry in per_class:
            rows += [
                {
                    "case": case,
                    "class": int(entry["class"]),
                    "metric": m,
                    "value": float(entry[m]),
                    "flag": entry["flag"],
                }
                for m in METRICS
            ]
    return rows


def run(
    model_dir: Path,
    tasks: Sequence[str],
    data: Sequence[Path],
    out: Path,
    method: str,
    step: str,
    settings: Mapping[str, Any],
) -> None:
    """Predict and score ``tasks`` with ``model_dir``; write ``out/predictions/{task}/`` and ``out/metrics.parquet``.

    Args:
        model_dir: the model folder (it must carry a head for every task).
        tasks: task names, one per ``data`` folder.
        data: preprocessed task folders (their manifests point at the original labels).
        out: output folder.
        method, step: what is evaluated (method name, the training step that made the model).
        settings: see :class:`EvaluateSettings`.
    """
    if len(tasks) != len(data):
        raise InputError("--task", f"give one task per --data folder ({len(tasks)} tasks, {len(data)} folders)")
    conf = from_mapping(EvaluateSettings, settings, "evaluate")
    settings = dict(settings)
    device = resolve_device(conf.device)
    model = load_model(model_dir)
    absent = [t for t in tasks if t not in model.seg_heads]
    if absent:
        raise InputError(
            model_dir / "model.json", f"has no segmentation head for {absent} (heads: {sorted(model.seg_heads)})"
        )
    model.to(device)
    mid = model_id(model_dir)
    rows = []
    for task, folder in zip(tasks, data):
        pred_dir = out / "predictions" / task
        table = predict_cases(model, task, folder, "test", pred_dir, dataclasses.asdict(conf), device)
        pred_prov = make_provenance(
            "evaluate",
            settings,
            inputs=[model_dir / "model.safetensors", folder / "manifest.parquet"],
            model_id=mid,
            head=task,
            split="test",
        )
        write_parquet(table, pred_dir / "predictions.parquet", pred_prov)
        for row in score_predictions(pred_dir, table["case"].tolist(), folder, conf.nsd_tolerance_mm):
            rows.append({"method": method, "step": step, "task": task, **row})
    prov = make_provenance(
        "evaluate",
        settings,
        inputs=[model_dir / "model.safetensors"] + [d / "manifest.parquet" for d in data],
        seed=conf.seed,
        method=method,
        step=step,
        tasks=list(tasks),
        model_id=mid,
    )
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["seed"] = conf.seed
    df["model_id"] = mid
    df["config_hash"] = prov["config_hash"]
    df["code_version"] = prov["code_version"]
    write_parquet(df, out / "metrics.parquet", prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--task", nargs="+", required=True, help="tasks to evaluate (heads of the model)")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="preprocessed folder of each task")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--method", required=True)
    parser.add_argument("--step", required=True, help="training step that made the model")
    add_settings_argument(parser, EvaluateSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.model, args.task, args.data, args.out, args.method, args.step, args.settings)


if __name__ == "__main__":
    run_cli(main)
