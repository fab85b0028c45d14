"""Shared figure helpers: one colour per method, and byte-reproducible PNGs with a provenance sidecar.

PNGs are rendered with matplotlib's Agg canvas (pyplot is never imported, so the process's global
backend and figure registry stay untouched), at a fixed DPI and with no software/date metadata, so a
rerun gives the same bytes; each carries its lineage in a ``<name>.prov.json`` sidecar that
:func:`stages.core.io.read_provenance` reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stages.core.io import atomic_path, save_json

__all__ = ["FIGURE_STYLE", "method_colours", "save_figure"]

#: matplotlib style every figure is drawn in (``with matplotlib.style.context(FIGURE_STYLE)``), so a
#: user's matplotlibrc cannot change the pixels.
FIGURE_STYLE = "default"


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per method (sorted names, tab10 / tab20), the same in every figure.

    Args:
        methods: method names (duplicates allowed).
    """
    names = sorted(set(methods))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(names)}


def save_figure(fig: Figure, path: Path, dpi: int, provenance: Mapping[str, Any]) -> None:
    """Write a PNG atomically with no software/date metadata, and its provenance sidecar ``<name>.prov.json``.

    Args:
        fig: a :class:`matplotlib.figure.Figure` (not a pyplot figure); an Agg canvas is attached here.
        path: destination PNG.
        dpi: resolution.
        provenance: from :func:`stages.core.io.make_provenance`.
    """
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    save_json(dict(provenance), path.with_name(path.name + ".prov.json"))
