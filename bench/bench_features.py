"""Benchmark of the feature statistics of pre-training on real-size volumes: bounded pooling against all windows.

Candidate: ``stages.core.ssl.write_feature_stats`` as ``stages.pretrain`` calls it (pooled deepest
features of every pool volume, at most ``FEATURE_WINDOWS`` windows of the SSL patch per volume, then
mean and shrinkage covariance) on ``--volumes`` synthetic volumes of ``--shape`` (default 100 of 190 x
140 x 88, the size of the second MRI dataset of issue 15). Baseline: the same pooling over every
window (``max_windows=None``, the behaviour before), timed on ``--baseline-volumes`` volumes and
extrapolated linearly to ``--volumes`` (it is linear in the volume count).

Volumes: a smooth ellipsoidal "body" with per-case position, size and noise (seeded), z-scored inside
the body and zero outside, like ``normalisation: mr``; generated before the timing. The network is the
CPU default backbone (``--arch unet``, channels 16..128) or ``--arch basicunet`` with the issue's
features (16, 16, 32, 64, 128, 16), randomly initialised (speed does not depend on the weights).

    python bench/bench_features.py [--volumes 100] [--baseline-volumes 5] [--shape 190 140 88]
                                   [--patch 32] [--threads 2] [--arch unet|basicunet]

Measured (--measure 10 --baseline-volumes 2, unet, 2 threads, on the shared machine at load average
12-15 for its 2 cores, i.e. roughly 6-7x slower than quiet): bounded 4.8 s per volume (479 s for 100,
extrapolated), every window 33 s per volume (~3300 s for 100): 6.9x less work, the 16/90 window
ratio. Whether 100 volumes fit 60 s on a quiet machine (needs ~0.6 s per volume) is not measured yet.

Last line: ``feature statistics: N volumes in T s (target <= 60 s): PASS|MISS`` (extrapolated from the
measured volumes when ``--volumes`` is cut short with ``--measure``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from _common import load_line

from stages.core.nets import FoundationNet
from stages.core.ssl import FEATURE_WINDOWS, pooled_case_feature, write_feature_stats

__all__ = ["main", "phantom"]

ARCHS = {
    "unet": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
    "basicunet": {"features": [16, 16, 32, 64, 128, 16]},
}


def phantom(shape: Sequence[int], seed: int) -> np.ndarray:
    """(1, *shape) float32: a noisy ellipsoid body, z-scored inside, zero outside."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    centre = 0.1 * (torch.rand(3, generator=g) - 0.5)
    radii = 0.7 + 0.25 * torch.rand(3, generator=g)
    r = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
    body = r < 1
    coarse = torch.randn((1, 1, *(max(2, n // 16) for n in shape)), generator=g)
    texture = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]
    vol = texture + 0.3 * torch.randn(tuple(shape), generator=g) + 2.0 * (r < 0.3)
    vol = (vol - vol[body].mean()) / vol[body].std()
    return torch.where(body, vol, torch.zeros(())).numpy()[None].astype(np.float32)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=100, help="volumes the target is about")
    parser.add_argument("--measure", type=int, default=0, help="time only this many and extrapolate (0 = all)")
    parser.add_argument("--baseline-volumes", type=int, default=5, help="volumes for the all-windows baseline")
    parser.add_argument("--shape", type=int, nargs=3, default=[190, 140, 88])
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="unet")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    measured = args.measure or args.volumes
    print(
        load_line(),
        f"| torch threads {torch.get_num_threads()} | {args.arch} | windows <= {FEATURE_WINDOWS}",
        flush=True,
    )
    model = FoundationNet(args.arch, arch_kwargs=ARCHS[args.arch], ssl={"patch_size": [args.patch] * 3}, seed=0).eval()
    started = time.perf_counter()
    volumes = [phantom(args.shape, i) for i in range(max(measured, args.baseline_volumes))]
    print(f"generated {len(volumes)} volumes of {args.shape} in {time.perf_counter() - started:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_feature_stats(model, volumes[:measured], args.patch, Path(tmp) / "stats.safetensors")
        bounded = time.perf_counter() - started
    bounded_all = bounded * args.volumes / measured
    print(
        f"bounded ({FEATURE_WINDOWS} windows): {measured} volumes in {bounded:.1f} s "
        f"({bounded / measured:.3f} s per volume)",
        flush=True,
    )

    started = time.perf_counter()
    for v in volumes[: args.baseline_volumes]:
        pooled_case_feature(model, v, args.patch, max_windows=None)
    every = time.perf_counter() - started
    windows = int(np.prod([-(-n // args.patch) for n in args.shape]))
    print(
        f"every window ({windows}): {args.baseline_volumes} volumes in {every:.1f} s "
        f"({every / args.baseline_volumes:.3f} s per volume; {args.volumes} volumes ~ "
        f"{every * args.volumes / args.baseline_volumes:.0f} s)",
        flush=True,
    )
    note = "" if measured == args.volumes else f", extrapolated from {measured}"
    print(
        f"feature statistics: {args.volumes} volumes in {bounded_all:.1f} s{note} (target <= 60 s): "
        f"{'PASS' if bounded_all <= 60 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
