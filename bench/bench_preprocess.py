"""Benchmark of the preprocess step: cases per second against the equivalent MONAI dictionary-transform chain.

Candidate: ``stages.preprocess.run`` as the pipeline runs it, on the whole dataset folder: validation
of every file (full gzip check, label values, SHA-256 of every file), reorientation to RAS, crop to the
non-zero box, resampling (image cubic spline, label nearest), per-case z-score, atomic ``.npy`` writes
(temporary file, fsync, rename) and the manifest.

Baseline: the MONAI chain ``LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd(target,
mode=(3, "nearest")) -> NormalizeIntensityd(nonzero=True) -> CropForegroundd(select_fn=x != 0)`` on the
same image/label pairs, in the same process. Same cores: torch is limited to ``--torch-threads`` 1,
the chain's fastest setting on a shared 2-core machine (with 2 threads its OpenMP workers spin-wait
and it ran 3-7x slower). It saves image (float32) and label (uint8) with ``np.save`` (default);
``--monai-save nifti`` uses ``SaveImaged`` (gzip NIfTI) and ``--monai-save atomic`` our own atomic,
fsync'd ``stages.core.io.save_npy``, to compare like with like on durability. No validation or
hashing on that side. Both get the same target spacing (the per-axis median of the cases unless
``--target-spacing``) and per-case z-score normalisation over the non-zero voxels (our
``normalisation: mr``). The chain's order is the issue's: it resamples before cropping.

A third line, not in the ratio, times our transform loop alone (``preprocess_case`` + ``np.save``,
no validation / hashing / fsync / manifest) to show what validation and the atomic writes cost.

The runs alternate (ours, MONAI, ours-core, then reversed ...) after one warm-up of each; the median
of ``--reps`` repetitions is reported. Default data: the MSD Hippocampus set in ``../shared/data``;
``--synthetic N`` benchmarks N CT-like phantoms from ``stages.synth`` instead (int16, P-I-L
orientation, 0.8 x 0.8 x 2.0 mm).

    python bench/bench_preprocess.py [--data DIR] [--cases 0] [--reps 5] [--synthetic N --shape 96 96 64]
                                     [--target-spacing X Y Z] [--monai-save npy|nifti|atomic]

Last line: ``preprocess cases/s ratio X.XXx (target >= 1.5x): PASS|MISS`` (ours over MONAI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the step's progress bars would only add noise here

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nibabel as nib
import numpy as np
import torch
from _common import SHARED, interleaved, load_line, median, verdict

from stages.core.geometry import canonical_spacing, median_spacing, preprocess_case
from stages.core.io import save_npy
from stages.core.msd import read_dataset
from stages.preprocess import run as preprocess_run

__all__ = ["main"]

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
SAVERS = {"npy": "np.save", "nifti": "SaveImaged (.nii.gz)", "atomic": "stages.core.io.save_npy (atomic, fsync)"}
TARGET = 1.5


def _subset(src: Path, dst: Path, n: int) -> Path:
    """A dataset folder holding the first ``n`` cases of ``src`` (symbolic links, its own dataset.json)."""
    meta = json.loads((src / "dataset.json").read_text())
    entries = meta["training"][:n]
    for entry in entries:
        for key in ("image", "label"):
            rel = Path(entry[key])
            (dst / rel.parent).mkdir(parents=True, exist_ok=True)
            os.symlink((src / rel).resolve(), dst / rel)
    meta.update(training=entries, numTraining=len(entries), test=[], numTest=0)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def _synthetic(dst: Path, n: int, shape: Sequence[int]) -> Path:
    """``n`` CT-like phantoms (stages.synth's ``organ_lesion``) in MSD layout; returns that dataset folder."""
    from stages.synth import run as synth_run

    synth_run(dst, {"seed": 0, "shape": list(shape), "cases_per_task": n, "pool_cases": 1})
    return dst / "organ_lesion"


def _monai_chain(target: Sequence[float]) -> Any:
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            # explicit labels: the same RAS convention as nibabel, and no deprecation warning
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=list(target), mode=(3, "nearest")),
            NormalizeIntensityd("image", nonzero=True),
            # crop to the non-zero voxels as ours does (MONAI's default keeps only x > 0, which after
            # z-scoring would drop the below-mean half of the body)
            CropForegroundd(keys, source_key="image", select_fn=_nonzero, allow_smaller=True),
        ]
    )


def _nonzero(x: Any) -> Any:
    return x != 0


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save``'s argument order for our atomic, fsync'd writer."""
    save_npy(array, path)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, prepare the cases, time our preprocess step against the MONAI chain."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD dataset folder (with dataset.json)")
    parser.add_argument("--cases", type=int, default=0, help="use the first N cases (0: all)")
    parser.add_argument("--synthetic", type=int, default=0, help="benchmark N synthetic CT-like cases instead")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], help="synthetic field of view (mm)")
    parser.add_argument("--target-spacing", type=float, nargs=3, default=None, help="mm (default: median)")
    parser.add_argument("--monai-save", choices=["npy", "nifti", "atomic"], default="npy")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for the MONAI chain (1: its fastest here; 2 spin-waits on a busy 2-core machine)",
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median reported), >= 3")
    args = parser.parse_args(argv)
    if args.reps < 3:
        parser.error("--reps must be >= 3")
    torch.set_num_threads(args.torch_threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess."))
    try:
        if args.synthetic:
            dataset = _synthetic(tmp / "synth", args.synthetic, args.shape)
        else:
            if not (args.data / "dataset.json").is_file():
                sys.exit(
                    f"bench_preprocess: {args.data} has no dataset.json: put the MSD Hippocampus set in "
                    f"{DEFAULT_DATA} (see {SHARED}), give --data DIR, or use --synthetic N"
                )
            dataset = _subset(args.data, tmp / "subset", args.cases) if args.cases else args.data
        ds = read_dataset(dataset)
        pairs = [{"image": str(c.image), "label": str(c.label)} for c in ds.cases]
        spacings = [canonical_spacing(nib.load(p["image"]).affine) for p in pairs]
        target = list(args.target_spacing) if args.target_spacing else median_spacing(spacings)
        settings = {"normalisation": "mr", "target_spacing": [float(v) for v in target]}
        chain = _monai_chain(target)
        if args.monai_save == "nifti":
            from monai.transforms import SaveImaged

            save = SaveImaged(
                ["image", "label"],
                output_dir=str(tmp / "monai"),
                separate_folder=False,
                resample=False,
                output_dtype=np.float32,
                print_log=False,
            )
        outs = {"ours": tmp / "ours", "monai": tmp / "monai", "ours_core": tmp / "core"}

        def ours() -> None:
            preprocess_run(dataset, outs["ours"], settings)

        def monai() -> None:
            for pair in pairs:
                data = chain(pair)
                if args.monai_save == "nifti":
                    save(data)
                    continue
                stem = Path(pair["image"]).name.removesuffix(".nii.gz")
                write = _save_atomic if args.monai_save == "atomic" else np.save
                write(outs["monai"] / f"{stem}.npy", data["image"].numpy().astype(np.float32, copy=False))
                write(outs["monai"] / f"{stem}_seg.npy", data["label"].numpy()[0].astype(np.uint8))

        def ours_core() -> None:
            for pair in pairs:
                img = nib.load(pair["image"])
                image = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32, copy=False), img.affine)
                label = np.asanyarray(nib.load(pair["label"]).dataobj)
                array, seg, _ = preprocess_case(image, label, target, "mr")
                stem = Path(pair["image"]).name.removesuffix(".nii.gz")
                np.save(outs["ours_core"] / f"{stem}.npy", array)
                np.save(outs["ours_core"] / f"{stem}_seg.npy", seg)

        def fresh(name: str) -> None:
            shutil.rmtree(outs[name], ignore_errors=True)
            outs[name].mkdir(parents=True)

        runs = {"ours": ours, "monai": monai, "ours_core": ours_core}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation chatter, once per transform
            interleaved(runs, 1, setup=fresh)  # warm-up: imports, page cache, allocator
            load_before = load_line()
            times = interleaved(runs, args.reps, setup=fresh)
        load_after = load_line()

        same = 0
        for pair in pairs:
            stem = Path(pair["image"]).name.removesuffix(".nii.gz")
            if args.monai_save != "nifti":
                a = np.load(outs["ours"] / "cases" / f"{stem}.npy", mmap_mode="r")
                b = np.load(outs["monai"] / f"{stem}.npy", mmap_mode="r")
                same += a.shape == b.shape
        n = len(pairs)
        med = {k: median(v) for k, v in times.items()}
        print(f"{load_before} (before), {load_after.split(', ', 1)[1]} (after)")
        print(
            f"data: {dataset} ({'synthetic' if args.synthetic else 'real'}), cases: {n}, "
            f"target spacing: {[round(v, 4) for v in target]} mm, torch threads: {torch.get_num_threads()}, "
            f"reps: {args.reps}, MONAI saves with {SAVERS[args.monai_save]}"
        )
        if args.monai_save != "nifti":
            print(f"same preprocessed shape as MONAI's: {same}/{n} cases")
        for key, label in (
            ("ours", "ours (stages.preprocess.run: validate + hash + preprocess + fsync'd writes + manifest)"),
            ("monai", "MONAI dictionary-transform chain + save"),
            ("ours_core", "ours, transform loop only (preprocess_case + np.save)"),
        ):
            runs_txt = " ".join(f"{t:.2f}" for t in times[key])
            print(f"{label}: median {med[key]:.3f} s = {n / med[key]:.1f} cases/s  [{runs_txt}]")
        print(f"core loop vs MONAI: {med['monai'] / med['ours_core']:.2f}x")
        print(verdict("preprocess cases/s", med["monai"] / med["ours"], TARGET))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
