"""Benchmark of training-patch sampling: our memory-mapped PatchSampler against MONAI's datasets and RAM copy speed.

Data: ``--cases`` synthetic preprocessed cases in our layout (``cases/{case}.npy`` float32 (1, X, Y, Z),
``{case}_seg.npy`` uint8), written once: a noisy image with an ellipsoid organ (class 1, about 5 % of
the volume) holding a small lesion (class 2). Every sampler draws patches of ``--patch`` voxels,
``--batch`` per batch, a fraction ``--fg-ratio`` centred on foreground, no flips, and hands over what
the trainer takes: a float32 image batch (B, 1, *patch) and an int64 label batch (B, 1, *patch).

- ours: ``CaseStore`` (memory-mapped arrays, foreground index) + ``PatchSampler.sample``.
- MONAI ``CacheDataset``: ``LoadImaged -> EnsureChannelFirstd -> FgBgToIndicesd`` cached in RAM, then
  ``RandCropByPosNegLabeld(pos=fg_ratio, neg=1-fg_ratio, num_samples=--monai-samples)`` with the
  cached indices, batched by MONAI's ``DataLoader`` (``list_data_collate``, 0 workers, shuffled).
  Configured the fast way MONAI documents: precomputed fore/background indices and
  ``copy_cache=False`` (the crop does not modify the cached volume, so no deep copy per item).
- MONAI ``PersistentDataset``: the same transforms, the deterministic part cached on disk (torch
  pickles), so every item loads its whole volume again.
- the memory-copy bound: how fast a plain ``np.copyto`` moves bytes from RAM, chunk by chunk, from
  a 256 MiB source (far larger than the caches) into a buffer of one patch's size. The bound in
  patches/s is that rate over the bytes of one produced patch: what the sampler hands over, float32
  image + int64 label, 12 bytes a voxel. The fraction is our patches/s over the bound's. A stricter
  reading counts only the bytes the patch holds as stored (float32 + uint8, 5 bytes a voxel); it is
  printed too.

Setup (caching, indexing) is not timed. The samplers alternate (ours, Cache, Persistent, copy, then
reversed ...) after a warm-up, ``--reps`` times; medians are reported. One process, torch threads
``--torch-threads`` (default 1, MONAI's fastest on this shared 2-core machine).

    python bench/bench_patch_sampling.py [--cases 12] [--shape 128 128 96] [--patch 64 64 64] [--batch 2]
                                         [--fg-ratio 0.33] [--patches 240] [--monai-samples 1] [--reps 5]

Last line: ``patch sampling ratio X.XXx (target >= 2x): PASS|MISS`` (ours over the faster MONAI
dataset), preceded by the fraction of the memory-copy bound against its 30 % target.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from _common import interleaved, load_line, median, verdict

from stages.core.sampling import CaseStore, PatchSampler

__all__ = ["main", "write_cases"]

TARGET_MONAI = 2.0
TARGET_BOUND = 0.30
COPY_SOURCE_BYTES = 256 << 20


def write_cases(folder: Path, n: int, shape: Sequence[int], seed: int = 0) -> list[str]:
    """Write ``n`` synthetic preprocessed cases (our layout) under ``folder/cases``; return their ids.

    Args:
        folder: the dataset folder.
        n: number of cases.
        shape: spatial shape of every case.
        seed: seeds the noise and the organ placement.
    """
    rng = np.random.default_rng(seed)
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    ids = []
    for i in range(n):
        centre = [s * rng.uniform(0.35, 0.65) for s in shape]
        radii = [s * 0.22 for s in shape]
        rho = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
        label = np.zeros(shape, dtype=np.uint8)
        label[rho <= 1.0] = 1
        label[rho <= 0.04] = 2
        image = rng.normal(0.0, 1.0, size=(1, *shape)).astype(np.float32)
        image[0][label > 0] += 2.0
        case = f"case_{i:03d}"
        np.save(folder / "cases" / f"{case}.npy", image)
        np.save(folder / "cases" / f"{case}_seg.npy", label)
        ids.append(case)
    return ids


def _monai_datasets(
    folder: Path, ids: Sequence[str], patch: Sequence[int], fg_ratio: float, samples: int, cache_dir: Path
) -> tuple[Any, Any]:
    from monai.data import CacheDataset, PersistentDataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        FgBgToIndicesd,
        LoadImaged,
        RandCropByPosNegLabeld,
    )

    keys = ["image", "label"]
    transform = Compose(
        [
            LoadImaged(keys),
            EnsureChannelFirstd("image", channel_dim=0),
            EnsureChannelFirstd("label", channel_dim="no_channel"),
            FgBgToIndicesd("label"),
            RandCropByPosNegLabeld(
                keys,
                "label",
                spatial_size=list(patch),
                pos=fg_ratio,
                neg=1.0 - fg_ratio,
                num_samples=samples,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
                allow_smaller=True,
            ),
        ]
    ).set_random_state(seed=0)
    data = [{"image": str(folder / "cases" / f"{c}.npy"), "label": str(folder / "cases" / f"{c}_seg.npy")} for c in ids]
    cache = CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False)
    persistent = PersistentDataset(data, transform, cache_dir=cache_dir)
    return cache, persistent


def _monai_sampler(dataset: Any, batch: int, samples: int) -> Callable[[int], int]:
    """A function drawing ``n`` patches from ``dataset`` in batches, as a MONAI training loop does."""
    from monai.data import DataLoader, list_data_collate

    per_batch = max(1, batch // samples)  # volumes per batch: each yields `samples` patches
    loader = DataLoader(
        dataset,
        batch_size=per_batch,
        shuffle=True,
        num_workers=0,
        collate_fn=list_data_collate,
        generator=torch.Generator().manual_seed(0),
    )
    state: dict[str, Any] = {"it": iter(loader)}

    def draw(n: int) -> int:
        got = 0
        while got < n:
            try:
                batch_data = next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                continue
            image = batch_data["image"].as_tensor()
            label = batch_data["label"].as_tensor().long()
            got += int(image.shape[0])
            del image, label
        return got

    return draw


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, write the cases, time our sampler, MONAI's datasets and the copy bound."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 96])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fg-ratio", type=float, default=0.33)
    parser.add_argument("--patches", type=int, default=240, help="patches per repetition (ours, CacheDataset)")
    parser.add_argument("--persistent-patches", type=int, default=24, help="patches per repetition (PersistentDataset)")
    parser.add_argument("--monai-samples", type=int, default=1, help="RandCropByPosNegLabeld num_samples")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median reported), >= 3")
    args = parser.parse_args(argv)
    if args.reps < 3:
        parser.error("--reps must be >= 3")
    torch.set_num_threads(args.torch_threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_patch_sampling."))
    try:
        ids = write_cases(tmp / "data", args.cases, args.shape)
        t0 = time.perf_counter()
        store = CaseStore(tmp / "data", ids)
        setup_ours = time.perf_counter() - t0
        sampler = PatchSampler(store, args.patch, args.batch, fg_ratio=args.fg_ratio)
        generator = torch.Generator().manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            cache_ds, persistent_ds = _monai_datasets(
                tmp / "data", ids, args.patch, args.fg_ratio, args.monai_samples, tmp / "persistent"
            )
            setup_cache = time.perf_counter() - t0
            draw_cache = _monai_sampler(cache_ds, args.batch, args.monai_samples)
            draw_persistent = _monai_sampler(persistent_ds, args.batch, args.monai_samples)

            voxels = int(np.prod(args.patch))
            patch_bytes = voxels * (4 + 8)  # produced: float32 image + int64 label
            stored_bytes = voxels * (4 + 1)  # as stored: float32 image + uint8 label
            source = np.ones(COPY_SOURCE_BYTES, dtype=np.uint8)
            dest = np.empty(patch_bytes, dtype=np.uint8)
            offsets = list(range(0, COPY_SOURCE_BYTES - patch_bytes + 1, patch_bytes))
            state = {"i": 0}

            def ours() -> None:
                for _ in range(0, args.patches, args.batch):
                    batch = sampler.sample(generator)
                    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64

            def copy() -> None:
                for _ in range(args.patches):
                    start = offsets[state["i"] % len(offsets)]
                    np.copyto(dest, source[start : start + patch_bytes])
                    state["i"] += 1

            runs = {
                "ours": ours,
                "cache": lambda: draw_cache(args.patches),
                "persistent": lambda: draw_persistent(args.persistent_patches),
                "copy": copy,
            }
            for _name, fn in runs.items():  # warm-up: page cache, persistent cache files, allocator
                fn()
            load_before = load_line()
            times = interleaved(runs, args.reps)
        load_after = load_line()

        n = {"ours": args.patches, "cache": args.patches, "persistent": args.persistent_patches, "copy": args.patches}
        rate = {k: n[k] / median(v) for k, v in times.items()}
        print(f"{load_before} (before), {load_after.split(', ', 1)[1]} (after)")
        print(
            f"cases: {args.cases} x {args.shape}, patch {args.patch}, batch {args.batch}, fg ratio {args.fg_ratio}, "
            f"MONAI num_samples {args.monai_samples}, torch threads {torch.get_num_threads()}, reps {args.reps}"
        )
        print(
            f"setup (not timed): CaseStore {setup_ours:.2f} s, CacheDataset + PersistentDataset init "
            f"{setup_cache:.2f} s"
        )
        labels = {
            "ours": "ours (CaseStore + PatchSampler, memory-mapped)",
            "cache": "MONAI CacheDataset + RandCropByPosNegLabeld",
            "persistent": "MONAI PersistentDataset + RandCropByPosNegLabeld",
            "copy": f"memory-copy bound (np.copyto of {patch_bytes / 2**20:.2f} MiB, one produced patch)",
        }
        for key, label in labels.items():
            runs_txt = " ".join(f"{n[key] / t:.0f}" for t in times[key])
            mib_s = rate[key] * patch_bytes / 2**20
            print(f"{label}: {rate[key]:.1f} patches/s = {mib_s:.0f} MiB/s produced  [{runs_txt}]")
        best_monai = max(rate["cache"], rate["persistent"])
        copy_rate = rate["copy"] * patch_bytes  # bytes/s
        print(
            f"ours / CacheDataset: {rate['ours'] / rate['cache']:.2f}x, ours / PersistentDataset: "
            f"{rate['ours'] / rate['persistent']:.2f}x"
        )
        print(
            f"stricter bound (stored bytes, 5 B/voxel): ours {rate['ours'] * stored_bytes / 2**20:.0f} MiB/s = "
            f"{rate['ours'] * stored_bytes / copy_rate:.0%} of the copy rate {copy_rate / 2**20:.0f} MiB/s"
        )
        print(verdict("fraction of memory-copy bound (produced bytes)", rate["ours"] / rate["copy"], TARGET_BOUND))
        print(verdict("patch sampling (ours / faster MONAI dataset)", rate["ours"] / best_monai, TARGET_MONAI))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
