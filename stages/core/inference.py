"""Sliding-window inference of one task head over a whole preprocessed volume (MONAI's inferer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

__all__ = ["mc_dropout_probabilities", "predict_cases", "predict_probabilities", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device for the config's ``device``; CUDA asked for but absent is a config error."""
    from stages.core.errors import InputError

    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("config: device", "`cuda` is set but no CUDA device is visible to this job")
    return torch.device(name)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    task: str,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Softmax class probabilities of ``model.segment(., task)`` over a whole volume.

    Args:
        model: a :class:`stages.core.nets.FoundationNet` (anything with ``segment(x, task)``).
        task: the segmentation head to use.
        image: preprocessed image, shape (C, X, Y, Z).
        patch_size: window size (the training patch).
        overlap: window overlap (methods.md: 0.5).
        sw_batch_size: windows per forward pass.
        device: where to run.

    Returns:
        float32 array (num_classes, X, Y, Z).
    """
    was_training = model.training
    model.eval()
    # "W": a read-only memmap (every stage opens the cases with mmap_mode="r") is copied once here; handed to
    # torch as is, torch warned "The given NumPy array is not writable" for every case
    x = torch.from_numpy(np.require(image, np.float32, ["C", "W"]))[None].to(device)
    logits = sliding_window_inference(
        x,
        roi_size=tuple(int(s) for s in patch_size),
        sw_batch_size=sw_batch_size,
        predictor=lambda patch: model.segment(patch, task),
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        cval=0.0,
    )
    model.train(was_training)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


def predict_cases(
    model: torch.nn.Module,
    head: str,
    data: Any,
    split: str,
    out: Any,
    settings: Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> Any:
    """Predict every case of ``split`` in the preprocessed folder ``data``; write ``out/{case}.nii.gz``.

    Predictions are mapped back to each case's original NIfTI geometry
    (:func:`stages.core.geometry.restore_prediction`). Returns a DataFrame (case, file, sha256).

    Args:
        model: network with ``segment(x, head)``.
        head: segmentation head (task name).
        data: preprocessed task folder (``manifest.parquet``, ``cases/``).
        split: manifest split to predict.
        out: output folder.
        settings: ``patch_size``, ``overlap``, ``sw_batch_size``.
        device: where to run.
    """
    from pathlib import Path

    import pandas as pd
    from tqdm import tqdm

    from stages.core.geometry import restore_prediction
    from stages.core.io import read_parquet, save_nifti, sha256_file

    data, out = Path(data), Path(out)
    manifest = read_parquet(data / "manifest.parquet")
    records = []
    for row in tqdm(manifest[manifest["split"] == split].to_dict("records"), desc=f"predict {head}", mininterval=2):
        image = np.load(data / "cases" / f"{row['case']}.npy", mmap_mode="r")
        probs = predict_probabilities(
            model, head, image, settings["patch_size"], settings["overlap"], settings["sw_batch_size"], device
        )
        path = out / f"{row['case']}.nii.gz"
        save_nifti(restore_prediction(probs, row), path)
        records.append({"case": row["case"], "file": path.name, "sha256": sha256_file(path)})
    return pd.DataFrame(records, columns=["case", "file", "sha256"])


@torch.no_grad()
def mc_dropout_probabilities(
    model: torch.nn.Module,
    task: str,
    image: np.ndarray,
    patch_size: Sequence[int],
    passes: int,
    dropout: float,
    generator: torch.Generator,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``passes`` Monte-Carlo dropout predictions of one volume (Gal & Ghahramani, ICML 2016).

    Our networks are trained without dropout, so (ours) dropout with rate ``dropout`` is applied to the
    decoder features at the input of the task's head, with inverted scaling so that the expected
    head input is unchanged. The backbone runs once per sliding window and only the head (a 1x1x1 conv, or a per-head unet's up layer) is
    repeated ``passes`` times. The masks are drawn on the CPU
    from ``generator``, so a seeded run is reproducible on any device.

    Args:
        model: a :class:`stages.core.nets.FoundationNet` (``decode_features`` and ``seg_heads``).
        task: the segmentation head.
        image: (C, X, Y, Z) preprocessed image.
        patch_size: sliding-window size.
        passes: T, the number of stochastic passes (>= 2).
        dropout: the dropout rate in (0, 1).
        generator: CPU generator for the dropout masks.
        overlap: window overlap.
        sw_batch_size: windows per forward pass.
        device: where to run.

    Returns float32 (T, C, X, Y, Z) softmax probabilities.
    """
    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes, got {passes}")
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {dropout}")
    head = model.seg_heads[task]
    keep = 1.0 - dropout

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        features = model.decode_features(patch)
        outputs = []
        for _ in range(passes):
            mask = (torch.rand(features.shape, generator=generator) < keep).to(features.device, features.dtype)
            outputs.append(model.head_logits(task, features * mask / keep, patch.shape[2:]))
        return torch.cat(outputs, dim=1)

    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None].to(device)  # a copy: memmaps are read-only
        logits = sliding_window_inference(
            x,
            roi_size=tuple(int(s) for s in patch_size),
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
        )
    finally:
        model.train(was_training)
    c = int(head.out_channels)
    logits = logits[0].float().reshape(passes, c, *logits.shape[2:])
    return torch.softmax(logits, dim=1).cpu().numpy()
