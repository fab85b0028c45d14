"""Shared helpers of the bench scripts: interleaved timing, medians, machine load, peak RSS and the verdict line.

Every speed figure in bench/ is a ratio measured in the same run against a baseline: the candidate and
the baseline run alternately (A B, B A, ...), so a load spike from the other users of the machine hits
both, and the median over the repetitions is reported.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "REPO",
    "SHARED",
    "child_peak_rss",
    "interleaved",
    "load_line",
    "median",
    "verdict",
]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if str(REPO) not in sys.path:  # the scripts run as `python bench/<name>.py` from anywhere
    sys.path.insert(0, str(REPO))


def median(values: Sequence[float]) -> float:
    """The median of the repetitions (robust to the one slow repetition a shared machine gives)."""
    return float(statistics.median(values))


def interleaved(
    runs: dict[str, Callable[[], object]],
    reps: int,
    setup: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, alternating their order every repetition (A B, B A, ...).

    Args:
        runs: name -> callable; each call is one timed repetition.
        reps: repetitions of each.
        setup: called with the name before each timed call, outside the timing (e.g. empty an output
            folder).

    Returns name -> list of wall-clock seconds.
    """
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            if setup is not None:
                setup(name)
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def load_line() -> str:
    """How busy the machine is: CPU count and the 1/5/15-minute load averages."""
    one, five, fifteen = os.getloadavg()
    return f"machine: {os.cpu_count()} CPUs, load average {one:.2f} {five:.2f} {fifteen:.2f}"


# Runs a module (or only imports) in the child and writes the child's own VmHWM (peak RSS of its
# address space since exec) to a file. getrusage's ru_maxrss cannot be used on Linux: at exec the
# child inherits the parent's high-water mark (a child that only imports measured 671 MiB beside a
# parent that had built the test volume, 88 MiB on its own).
_HWM_WRAPPER = """
import os, runpy, sys
def _hwm():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1
try:
    if sys.argv[1] == "--import":
        __import__(sys.argv[2])
    else:
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open(os.environ["BENCH_HWM_FILE"], "w") as fh:
        fh.write(str(_hwm()))
"""


def child_peak_rss(
    module: str, args: Sequence[str] = (), import_only: bool = False, env: dict[str, str] | None = None
) -> tuple[int, int, float]:
    """Run ``python -m module args`` (or only ``import module``) in a fresh child process.

    Args:
        module: the module to run as ``__main__`` (or to import).
        args: its command-line arguments.
        import_only: only import the module (the baseline of the memory bench).
        env: the child's environment (default: this process's).

    Returns the exit code, the child's peak resident set (VmHWM, bytes) and the wall seconds.
    """
    with tempfile.TemporaryDirectory(prefix="bench_hwm.") as tmp:
        hwm_file = Path(tmp) / "hwm"
        child_env = {**(env if env is not None else os.environ), "BENCH_HWM_FILE": str(hwm_file)}
        cmd = [sys.executable, "-c", _HWM_WRAPPER, *(["--import", module] if import_only else [module, *args])]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr.decode(errors="replace")[-4000:])
        peak = int(hwm_file.read_text()) if hwm_file.is_file() else -1
    return proc.returncode, peak, seconds


def verdict(name: str, ratio: float, target: float, higher_is_better: bool = True) -> str:
    """The last line every bench prints: ``<name> ratio X.XXx (target >= T.Tx): PASS|MISS``."""
    ok = ratio >= target if higher_is_better else ratio <= target
    sign = ">=" if higher_is_better else "<="
    return f"{name} ratio {ratio:.2f}x (target {sign} {target:g}x): {'PASS' if ok else 'MISS'}"
