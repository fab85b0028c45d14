"""The seeded train/val/test split of a dataset's cases, shared by preprocessing and config checks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["split_counts", "split_cases"]


def split_counts(n: int, val: float, test: float) -> tuple[int, int, int]:
    """How many of ``n`` cases go to train, val and test.

    ``round(test * n)`` cases go to test and ``round(val * n)`` to val (rounding half up); val, then
    test, shrink so that at least one training case remains.

    Args:
        n: the number of cases.
        val: fraction of validation cases.
        test: fraction of test cases.

    Returns:
        ``(n_train, n_val, n_test)``.
    """
    n_test = int(math.floor(test * n + 0.5))
    n_val = int(math.floor(val * n + 0.5))
    excess = max(0, n_test + n_val - (n - 1))
    shrink_val = min(n_val, excess)
    n_val -= shrink_val
    n_test -= min(n_test, excess - shrink_val)
    return n - n_val - n_test, n_val, n_test


def split_cases(case_ids: Sequence[str], seed: int, val: float, test: float) -> dict[str, str]:
    """Assign each case to ``train`` / ``val`` / ``test``, reproducibly from the seed.

    The sorted ids are shuffled with ``numpy.random.Generator(PCG64(seed))``; the first ``n_test``
    go to test, the next ``n_val`` to val, the rest to train (counts from :func:`split_counts`).

    Args:
        case_ids: the case ids.
        seed: the split seed.
        val: fraction of validation cases.
        test: fraction of test cases.
    """
    ids = sorted(case_ids)
    _, n_val, n_test = split_counts(len(ids), val, test)
    order = np.random.default_rng(seed).permutation(len(ids))
    split: dict[str, str] = {}
    for rank, index in enumerate(order):
        split[ids[int(index)]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split
