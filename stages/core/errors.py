"""One error type for bad input and one entry-point wrapper that turns it into a clear, non-zero exit."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["InputError", "run_cli"]


class InputError(Exception):
    """Bad input the user must fix: the message names the file (or config key) and the problem."""

    def __init__(self, where: object, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


def _configure_logging() -> None:
    """INFO and up to stderr, each line stamped with the UTC time in ISO 8601 (``2026-11-30T15:04:05Z``)."""
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])  # a no-op where logging is set up already


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call a stage's ``main`` and exit 2 with a one-line message on :class:`InputError`.

    Stages write through :mod:`stages.core.io` (temporary name, then rename), so a refusal
    leaves no partial output behind.
    """
    _configure_logging()
    try:
        main(argv)
    except InputError as err:
        print(f"segadapt: error: {err}", file=sys.stderr)
        sys.exit(2)
