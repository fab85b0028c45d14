"""Selective semi-supervision for ASSFT: pseudo-label the unlabelled pool cases the fine-tuned model is sure of and that lie near the labelled set.

After fine-tuning on the labelled set L (ASSFT, Yang et al., arXiv 2509.10784; ``methods.md`` §2),
every unlabelled pool case x (the task's ``train`` split minus L) is predicted with the model:

- confidence ``c(x)`` = mean max-probability over the predicted foreground (arg-max not background;
  an empty prediction gives c = 0 and is never kept);
- distance ``e(x)`` = smallest cosine distance of x's pooled M0 feature to a labelled case's feature.

Modes: ``selective`` keeps x when ``c(x) >= quantile(c, 1 − q)`` and ``e(x) <= quantile(e, q)`` over
the unlabelled cases (q = 0.5; numpy's linear quantiles; ties with a threshold are kept); ``all``
keeps every case with a non-empty prediction; ``none`` keeps nothing (and predicts nothing).

Output folder (built in a temporary sibling and swapped in whole):

- ``{out}/cases/{case}.npy`` — the image (relative symlink or copy) and ``{out}/cases/{case}_seg.npy``
  — the pseudo-label (uint8 arg-max on the preprocessed grid), for kept cases only;
- ``{out}/pseudo.parquet`` — one row per unlabelled case: confidence, distance, empty_prediction,
  kept, reason, the two thresholds, q, mode, model_id and the pseudo-label's SHA-256.

Training reads pseudo-labelled cases from this folder alone, never from the task folder, which holds
every true label.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from stages.core.active import (
    IMAGE_LINK_MODES,
    build_folder,
    foreground_confidence,
    link_file,
    min_distance,
    read_case_column,
    read_features,
    selective_keep,
)
from stages.core.errors import InputError, run_cli
from stages.core.inference import predict_probabilities, resolve_device
from stages.core.io import make_provenance, save_npy, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.nets import load_model, model_id
from stages.core.settings import add_settings_argument, from_mapping, setting

__all__ = ["MODES", "PSEUDO_SCHEMA", "PseudoSettings", "run", "main"]

MODES = ("selective", "all", "none")


@dataclass(frozen=True, kw_only=True)
class PseudoSettings:
    """The settings of a pseudo-label selection job."""

    mode: str = setting(
        help="selective (ASSFT), all (every pseudo-label) or none (no semi-supervision)", schema="assft.semi"
    )
    q: float = setting(help="kept fraction of each criterion, in (0, 1]", schema="assft.q")
    patch_size: list[int] | None = setting(
        help="sliding-window size (the training patch); needed unless mode is none", schema="train.patch_size"
    )
    overlap: float = setting(help="sliding-window overlap", schema="inference.overlap")
    sw_batch_size: int = setting(help="windows per forward pass", schema="inference.sw_batch_size")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")
    image_link: str = setting("symlink", help="how images enter the pseudo-label folder: symlink (relative) or copy")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError("settings.mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        if not 0.0 < self.q <= 1.0:
            raise InputError("settings.q", f"must be a fraction in (0, 1], got {self.q!r}")
        if self.mode != "none" and self.patch_size is None:
            raise InputError(
                "settings.patch_size", "is needed to predict the unlabelled cases (the training patch size)"
            )
        if self.image_link not in IMAGE_LINK_MODES:
            raise InputError("settings.image_link", f"must be one of {list(IMAGE_LINK_MODES)}, got {self.image_link!r}")


PSEUDO_SCHEMA = pa.schema(
    [
        ("case", pa.string()),
        ("confidence", pa.float64()),
        ("distance", pa.float64()),
        ("empty_prediction", pa.bool_()),
        ("foreground_voxels", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("confidence_threshold", pa.float64()),
        ("distance_threshold", pa.float64()),
        ("q", pa.float64()),
        ("mode", pa.string()),
        ("model_id", pa.string()),
        ("pseudo_sha256", pa.string()),
    ]
)


def _f(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def run(
    model_dir: Path,
    task: str,
    data: Path,
    labelled: Path,
    features: Path,
    out: Path,
    settings: Mapping[str, Any],
) -> None:
    """Score the unlabelled pool, keep pseudo-labels by the selection rule, and write the folder ``out``.

    Args:
        model_dir: the model fine-tuned on the labelled set (with the task's head).
        task: the task name (the head).
        data: the task's preprocessed folder (images only are read).
        labelled: the round's ``labelled.parquet`` (from ``stages.annotate``).
        features: M0's pooled features of the task (``scores/{task}/features.parquet``).
        out: the pseudo-label folder to (re)create.
        settings: see :class:`PseudoSettings`.
    """
    model_dir, data, labelled, features, out = map(Path, (model_dir, data, labelled, features, out))
    cfg = from_mapping(PseudoSettings, settings, "select_pseudo", "settings", noun="select_pseudo settings")
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the task first")
    manifest = pd.read_parquet(manifest_path, columns=["case", "split"])
    pool = sorted(manifest.loc[manifest["split"] == "train", "case"].astype(str))
    labelled_cases = read_case_column(labelled, "labelled")
    if not labelled_cases:
        raise InputError(labelled, "the labelled set is empty: the distance e(x) needs labelled cases")
    outside = sorted(set(labelled_cases) - set(pool))
    if outside:
        raise InputError(labelled, f"labelled cases not in the task's train split: {outside[:10]}")
    cases = [c for c in pool if c not in set(labelled_cases)]
    distance = min_distance(read_features(features, cases), read_features(features, labelled_cases), "cosine")
    absent = [c for c in cases if not (data / "cases" / f"{c}.npy").is_file()]
    if absent:
        raise InputError(data / "cases", f"missing preprocessed images of {absent[:10]}")

    predict = cfg.mode != "none" and bool(cases)
    mid = model_id(model_dir) if cfg.mode != "none" else None
    model = None
    device = resolve_device(cfg.device)
    if predict:
        model = load_model(model_dir)
        if task not in model.seg_heads:
            heads = sorted(model.seg_heads)
            raise InputError(model_dir / "model.json", f"has no segmentation head {task!r} (heads: {heads})")
        model.to(device).eval()

    def build(folder: Path) -> None:
        n = len(cases)
        confidence = np.full(n, np.nan)
        empty = np.zeros(n, bool)
        fg_voxels: list[int | None] = [None] * n
        if predict:
            assert model is not None
            for i, case in enumerate(tqdm(cases, desc=f"pseudo-labels {task}", mininterval=2)):
                image = np.load(data / "cases" / f"{case}.npy")  # whole volume: inference reads all of it
                probs = predict_probabilities(
                    model, task, image, cfg.patch_size, cfg.overlap, cfg.sw_batch_size, device
                )
                confidence[i], empty[i], label = foreground_confidence(probs)
                fg_voxels[i] = int(np.count_nonzero(label))
                # written now, removed below if not kept: memory stays at one volume
                save_npy(label, folder / "cases" / f"{case}_seg.npy")
        if cfg.mode == "selective":
            kept, reasons, c_thr, e_thr = selective_keep(confidence, distance, float(cfg.q), never=empty)
        elif cfg.mode == "all":
            kept = ~empty
            reasons = ["empty prediction" if e else "mode all" for e in empty]
            c_thr = e_thr = float("nan")
        else:
            kept, reasons, c_thr, e_thr = np.zeros(n, bool), ["mode none"] * n, float("nan"), float("nan")
        digests: list[str | None] = []
        for i, case in enumerate(cases):
            seg_path = folder / "cases" / f"{case}_seg.npy"
            if kept[i]:
                link_file(data / "cases" / f"{case}.npy", folder / "cases" / f"{case}.npy", cfg.image_link)
                digests.append(sha256_file(seg_path))
            else:
                seg_path.unlink(missing_ok=True)
                digests.append(None)
        (folder / "cases").mkdir(exist_ok=True)
        table = pa.Table.from_pydict(
            {
                "case": cases,
                "confidence": [_f(v) for v in confidence],
                "distance": [float(v) for v in distance],
                "empty_prediction": [bool(v) if predict else None for v in empty],
                "foreground_voxels": fg_voxels,
                "kept": [bool(v) for v in kept],
                "reason": reasons,
                "confidence_threshold": [_f(c_thr)] * n,
                "distance_threshold": [_f(e_thr)] * n,
                "q": [float(cfg.q)] * n,
                "mode": [cfg.mode] * n,
                "model_id": [mid] * n,
                "pseudo_sha256": digests,
            },
            schema=PSEUDO_SCHEMA,
        )
        inputs = [manifest_path, labelled, features] + ([model_dir / "model.safetensors"] if mid else [])
        prov = make_provenance(
            "select_pseudo",
            dict(settings),
            inputs=inputs,
            task=task,
            mode=cfg.mode,
            q=float(cfg.q),
            model_id=mid,
            kept=[c for c, k in zip(cases, kept) if k],
            labelled=sorted(labelled_cases),
        )
        write_parquet(table, folder / "pseudo.parquet", prov)

    build_folder(out, build)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.select_pseudo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model fine-tuned on the labelled set")
    parser.add_argument("--task", required=True, help="task name (the model's segmentation head)")
    parser.add_argument("--data", type=Path, required=True, help="the task's preprocessed folder")
    parser.add_argument("--labelled", type=Path, required=True, help="the round's labelled.parquet")
    parser.add_argument("--features", type=Path, required=True, help="M0 pooled features (features.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="pseudo-label folder to write")
    add_settings_argument(parser, PseudoSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.model, args.task, args.data, args.labelled, args.features, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
