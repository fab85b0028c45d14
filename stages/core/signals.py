"""Stop a long loop cleanly on SIGTERM / SIGINT: the loop finishes its unit of work, saves, and exits.

Slurm sends SIGTERM at a job's time limit (and Snakemake's own interruption does the same); the
trainer and the loss-landscape step both answer it by finishing the current step or grid point,
saving their state, and exiting with 128 + the signal number, so a rerun resumes where they stopped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["StopSignal"]

log = logging.getLogger(__name__)


class StopSignal:
    """Records the first SIGTERM / SIGINT while :meth:`installed`; a second Ctrl-C stops at once.

    Args:
        what: how the loop names itself in the log (``"retention:tubular"``, ``"landscape"``).
        unit: what it finishes before stopping (``"step"``, ``"grid point"``).
        logger: where the warning goes (the caller's logger).
    """

    def __init__(self, what: str, unit: str = "step", logger: logging.Logger = log) -> None:
        self.what, self.unit, self.log = what, unit, logger
        self.signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = signum
        self.log.warning("%s: got %s, stopping after the current %s", self.what, signal.Signals(signum).name, self.unit)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the block (only possible in the main thread), then restore them."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
