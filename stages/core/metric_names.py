"""The one list of per-case metrics: what ``stages.evaluate`` writes and ``stages.aggregate`` summarises.

A module of its own, without the metric code, so that the aggregation (which only reads the
metrics' names) is not rerun when the code computing them changes (:mod:`stages.core.codehash`).
"""

from __future__ import annotations

__all__ = ["METRIC_NAMES"]

METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "nsd")
"""The metric columns of a :func:`stages.core.metrics.case_metrics` row, in report order."""
