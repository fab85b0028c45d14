"""Benchmark of preprocessing memory: peak RSS of one 512 x 512 x 300 CT-like case, as a multiple of its float32 size.

A synthetic CT-like volume is written as an MSD dataset of one labelled case: int16 Hounsfield units
(air -1000 around an elliptic body of soft tissue with noise, a liver-like organ and a lesion, so the
non-zero crop keeps the whole grid as it does for real CT), spacing 0.8 x 0.8 x 2.5 mm, stored LPS as
DICOM-derived CT is, gzip NIfTI. Then ``python -m stages.preprocess`` runs on it in a fresh child
process: validation, the CT statistics pass, reorientation, crop, resampling (cubic spline), CT
normalisation, the label, the writes and the manifest.

Measure: the child's peak resident set minus the peak of a child that only imports the same module
(Python, numpy, scipy, nibabel, pyarrow, the stages package: memory every step pays before it touches
data), divided by 512 * 512 * 300 * 4 bytes (S). The peak is the child's own ``VmHWM`` from
``/proc/self/status``, read as it exits: ``getrusage``'s ``ru_maxrss`` is no use on Linux, because at
exec a child inherits its parent's high-water mark (an import-only child read 671 MiB next to this
parent after it had built the volume, 88 MiB measured in itself). Two settings are
run: the dataset's median spacing (the pipeline's default ``target_spacing: null``; for a set of one
spacing nothing is resampled) and ``--target-spacing`` (default 1.0 x 1.0 x 2.0 mm: every axis is
resampled with a cubic spline; the output has about 0.8 times the input's voxels). Each child runs
``--reps`` times, interleaved with the baseline child (median; RSS hardly varies, time does).

The resampled run also prints the floor that ``scipy.ndimage.zoom`` itself sets for byte-identical
cubic resampling: it holds its float32 input, a 12-voxel edge-padded copy of it, the float64 spline
coefficients of that copy and the output at once. The last line is the verdict for the pipeline's
default (median spacing); the line before it, the verdict for the resampled run.

    python bench/bench_memory.py [--shape 512 512 300] [--target-spacing 1 1 2] [--reps 3] [--keep DIR]

Last line: ``preprocess peak RSS / float32 size ratio X.XXx (target <= 3x): PASS|MISS`` (median spacing).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nibabel as nib
import numpy as np
from _common import REPO, child_peak_rss, load_line, median, verdict

__all__ = ["main", "write_ct_case"]

TARGET = 3.0
SPACING = (0.8, 0.8, 2.5)
# the baseline child imports the step's module and nothing else, so the difference is what the data needs
BASELINE_MODULE = "stages.preprocess"


def write_ct_case(folder: Path, shape: Sequence[int], seed: int = 0) -> Path:
    """Write a one-case CT-like MSD dataset (int16 HU, LPS, 0.8 x 0.8 x 2.5 mm) into ``folder``.

    Args:
        folder: the dataset folder to create.
        shape: voxels along the stored axes (L->R flipped, P->A flipped, S).
        seed: noise seed.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape)
    x = (np.arange(nx, dtype=np.float32) - nx / 2) / (nx / 2)
    y = (np.arange(ny, dtype=np.float32) - ny / 2) / (ny / 2)
    z = (np.arange(nz, dtype=np.float32) - nz / 2) / (nz / 2)
    body2d = (x[:, None] / 0.85) ** 2 + (y[None, :] / 0.65) ** 2 <= 1.0
    xc, yc, zc = x[:, None, None] + 0.3, y[None, :, None], z[None, None, :]
    organ = (xc / 0.35) ** 2 + (yc / 0.3) ** 2 + (zc / 0.5) ** 2 <= 1
    lesion = (xc / 0.06) ** 2 + (yc / 0.06) ** 2 + (zc / 0.1) ** 2 <= 1
    image = np.full((nx, ny, nz), -1000, dtype=np.int16)
    image[body2d] = 40
    image[organ] = 65
    image[lesion] = 125
    # noise slab by slab, so that writing the phantom never needs a float copy of the volume
    for k in range(nz):
        image[:, :, k] += rng.normal(0.0, 12.0, size=(nx, ny)).astype(np.int16)
    label = np.zeros((nx, ny, nz), dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS storage
    affine[:3, 3] = [nx * SPACING[0] / 2, ny * SPACING[1] / 2, -nz * SPACING[2] / 2]
    for sub, data in (("imagesTr", image), ("labelsTr", label)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(data.dtype)
        img.header.set_xyzt_units("mm")
        with gzip.open(folder / sub / "ct_000.nii.gz", "wb", compresslevel=1) as fh:
            fh.write(img.to_bytes())
    meta = {
        "name": "SyntheticCT",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/ct_000.nii.gz", "label": "./labelsTr/ct_000.nii.gz"}],
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, write the CT-like case, measure the peak RSS of preprocessing it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--target-spacing", type=float, nargs=3, default=[1.0, 1.0, 2.0], help="mm")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each child (median), >= 1")
    parser.add_argument("--keep", type=Path, default=None, help="write the data and outputs here and keep them")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="bench_memory."))
    try:
        dataset = write_ct_case(tmp / "dataset", args.shape)
        float32_bytes = int(np.prod(args.shape)) * 4
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
        resampled = f"target {args.target_spacing} mm (resampled)"
        default = "median spacing (pipeline default: not resampled)"
        configs = {default: {}, resampled: {"target_spacing": list(args.target_spacing)}}
        rows: dict[str, tuple[float, float]] = {}
        baseline_peaks = []
        print(load_line())
        for name, settings in configs.items():
            args_ = ["--dataset", str(dataset), "--out", str(tmp / "out"), "--settings", json.dumps(settings)]
            peaks, seconds = [], []
            for _ in range(args.reps):
                shutil.rmtree(tmp / "out", ignore_errors=True)
                rc, peak, wall = child_peak_rss("stages.preprocess", args_, env=env)
                if rc != 0:
                    sys.exit(f"bench_memory: preprocess failed (exit {rc}) with settings {settings}")
                peaks.append(peak)
                seconds.append(wall)
                _, peak, _ = child_peak_rss(BASELINE_MODULE, import_only=True, env=env)  # interleaved
                baseline_peaks.append(peak)
            rows[name] = (median(peaks), median(seconds))
        baseline = median(baseline_peaks)
        print(
            f"volume: {args.shape} int16 CT-like, spacing {list(SPACING)} mm (LPS), float32 size "
            f"{float32_bytes / 2**20:.0f} MiB; reps: {args.reps}"
        )
        print(f"baseline (child that only imports {BASELINE_MODULE}): peak RSS {baseline / 2**20:.0f} MiB")
        multiples = {}
        for name, (peak, wall) in rows.items():
            multiples[name] = (peak - baseline) / float32_bytes
            print(
                f"{name}: peak RSS {peak / 2**20:.0f} MiB, minus baseline {(peak - baseline) / 2**20:.0f} MiB "
                f"= {multiples[name]:.2f}x float32 size; median wall {wall:.1f} s"
            )
        # the CT's air is -1000, so the non-zero crop is the whole grid; stored LPS keeps the axis order
        out_shape = [
            max(1, int(np.floor(n * s / t + 0.5))) for n, s, t in zip(args.shape, SPACING, args.target_spacing)
        ]
        padded = int(np.prod([n + 24 for n in args.shape]))
        floor = (float32_bytes + padded * 4 + padded * 8 + int(np.prod(out_shape)) * 4) / float32_bytes
        print(
            f"scipy.ndimage.zoom's own floor when resampling to {out_shape}: input {1:.2f}x + padded copy "
            f"{padded * 4 / float32_bytes:.2f}x + float64 coefficients {padded * 8 / float32_bytes:.2f}x + output "
            f"{np.prod(out_shape) * 4 / float32_bytes:.2f}x = {floor:.2f}x"
        )
        print(load_line())
        print(verdict("resampled: peak RSS / float32 size", multiples[resampled], TARGET, higher_is_better=False))
        print(verdict("preprocess peak RSS / float32 size", multiples[default], TARGET, higher_is_better=False))
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
