"""A readable frame around every stage's log: what it reads, with which settings, what it writes; how long it took.

Each stage's ``main()`` wraps its work in :func:`stage_log`::

    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(...)

so the rule's log file starts with one timestamped line naming the inputs, the settings and the outputs
and ends with one line saying ``done`` and the duration (or ``failed`` and why). The lines go through
:mod:`logging` (configured by :func:`stages.core.errors.run_cli`: UTC ISO-8601 timestamps on stderr,
which the rules send to their log).

Which argument is what is read from the parsed command line: ``--settings`` and every argument that is
not a path are settings; path arguments are inputs, except those named in ``outputs`` (by default
``--out`` and ``--work``, the outputs of every stage here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["OUTPUT_ARGS", "describe_args", "format_duration", "stage_log"]

#: argument names (argparse ``dest``) that name what a stage writes
OUTPUT_ARGS = ("out", "work")

log = logging.getLogger("segadapt")


def _is_path(value: Any) -> bool:
    if isinstance(value, os.PathLike):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(_is_path(v) for v in value)
    return False


def _show_path(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = [_show_path(v) for v in value]
        return ":".join(inner) if isinstance(value, tuple) else " ".join(inner)
    return os.fspath(value)


def _show_setting(value: Any) -> str:
    if isinstance(value, str):
        try:  # a JSON settings string (preprocess, synth) is shown as the object it holds
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def describe_args(args: argparse.Namespace, outputs: Iterable[str] = OUTPUT_ARGS) -> dict[str, list[str]]:
    """``{"inputs": [...], "settings": [...], "outputs": [...]}`` as ``--name=value`` texts, in argument order.

    Args:
        args: the parsed command line.
        outputs: the ``dest`` names of the arguments that are outputs.
    """
    wanted = set(outputs)
    parts: dict[str, list[str]] = {"inputs": [], "settings": [], "outputs": []}
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if name in wanted:
            parts["outputs"].append(f"{flag}={_show_path(value)}")
        elif _is_path(value):
            parts["inputs"].append(f"{flag}={_show_path(value)}")
        else:
            parts["settings"].append(f"{flag}={_show_setting(value)}")
    return parts


def format_duration(seconds: float) -> str:
    """``12.3 s``, or with hours, minutes and seconds beside it from a minute on: ``754.0 s (0:12:34)``."""
    text = f"{seconds:.1f} s"
    if seconds >= 60:
        whole = int(round(seconds))
        text += f" ({whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d})"
    return text


def _stage_name(parser: argparse.ArgumentParser | str) -> str:
    prog = parser if isinstance(parser, str) else parser.prog
    return prog.split()[-1]  # "python -m stages.train" -> "stages.train"


@contextlib.contextmanager
def stage_log(
    parser: argparse.ArgumentParser | str,
    args: argparse.Namespace,
    outputs: Iterable[str] = OUTPUT_ARGS,
) -> Iterator[None]:
    """Log the stage's start line (inputs, settings, outputs) and, on leaving, its duration and ``done``.

    Args:
        parser: the stage's argument parser (its ``prog`` names the stage) or the stage's name.
        args: the parsed command line.
        outputs: ``dest`` names of the arguments the stage writes (default :data:`OUTPUT_ARGS`).

    A failure is logged as ``failed after ...`` with the error's type and re-raised unchanged; a
    ``SystemExit`` with status 0 or None counts as done.
    """
    stage = _stage_name(parser)
    parts = describe_args(args, outputs)
    log.info(
        "%s start | inputs: %s | settings: %s | outputs: %s",
        stage,
        " ".join(parts["inputs"]) or "-",
        " ".join(parts["settings"]) or "-",
        " ".join(parts["outputs"]) or "-",
    )
    began = time.perf_counter()
    try:
        yield
    except SystemExit as stop:
        took = format_duration(time.perf_counter() - began)
        if stop.code in (None, 0):
            log.info("%s done in %s", stage, took)
        else:
            log.info("%s failed after %s (exit status %s)", stage, took, stop.code)
        raise
    except BaseException as err:
        log.info("%s failed after %s (%s)", stage, format_duration(time.perf_counter() - began), type(err).__name__)
        raise
    log.info("%s done in %s", stage, format_duration(time.perf_counter() - began))
