"""Benchmark of the SSL-loss scorer: R views run batched versus one view per forward pass.

Both ways score the same cases with the same model and the very same views (the views depend only on
(seed, case id)); only the chunk size differs. Prints the median time of each over the repetitions and,
as its last line, ``ratio batched/loop speed-up: X.XX``.

    python bench/bench_ssl_scoring.py [--cases 3] [--R 32] [--batch 16] [--patch 32] [--reps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.nets import FoundationNet
from stages.core.ssl import score_case

__all__ = ["main"]


def _time(fn: object, reps: int, device: torch.device) -> tuple[float, list[tuple[float, float]]]:
    times, result = [], []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, build the demo BasicUNet and synthetic cases, time both scorers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--R", type=int, default=32, help="stochastic passes per case")
    parser.add_argument("--batch", type=int, default=16, help="views per forward pass when batched")
    parser.add_argument("--patch", type=int, default=32, help="cubic SSL patch side")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median reported), >= 3")
    parser.add_argument("--arch", default="basicunet", choices=["basicunet", "swinunetr"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.reps < 3:
        parser.error("--reps must be >= 3")
    device = torch.device(args.device)
    patch = [args.patch] * 3
    model = FoundationNet(args.arch, ssl={"patch_size": patch, "mask_ratio": 0.5, "mask_patch": 8}, seed=0)
    model.to(device).eval()
    rng = np.random.default_rng(0)
    cases = [
        (f"case{i}", torch.from_numpy(rng.normal(size=(1, 48, 44, 40)).astype(np.float32))) for i in range(args.cases)
    ]
    kw = dict(R=args.R, patch_size=patch, mask_ratio=0.5, mask_patch=8, seed=0)

    def run(batch: int) -> list[tuple[float, float]]:
        return [score_case(model, vol, case_id=cid, batch=batch, **kw) for cid, vol in cases]

    run(args.batch)  # warm-up (allocator, lazy imports)
    t_batched, res_batched = _time(lambda: run(args.batch), args.reps, device)
    t_loop, res_loop = _time(lambda: run(1), args.reps, device)
    diff = max(abs(a[0] - b[0]) for a, b in zip(res_batched, res_loop))
    print(
        f"device: {device}, threads: {torch.get_num_threads()}, arch: {args.arch}, cases: {args.cases}, "
        f"R: {args.R}, patch: {args.patch}^3, reps: {args.reps}"
    )
    print(f"batched (chunks of {args.batch}): median {t_batched:.3f} s")
    print(f"loop (one view per pass):   median {t_loop:.3f} s")
    print(f"max |mean score difference|: {diff:.2e}")
    print(f"ratio batched/loop speed-up: {t_loop / t_batched:.2f}")


if __name__ == "__main__":
    main()
