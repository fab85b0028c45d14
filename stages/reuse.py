"""Reuse a trained model as another run's step: copy its folder's files, and say so in ``reused_from.json``.

The first step of a sequential chain whose first step is plain full fine-tuning of M0 on the first task
(sequential FT; EWC, which has no Fisher yet; LwF, which has no earlier head yet) is the same job as
parallel FT's first step: the same recipe's computation from the same M0 with the same settings and
seed. With the config's ``reuse_first_steps`` the workflow trains it once and this stage copies
``model.safetensors``, ``model.json`` and ``train_log.parquet`` byte for byte into the chain's step
folder. ``reused_from.json`` records the source folder, each file's SHA-256 and why, so an auditor sees
that the step was not trained separately (the copied ``model.json`` keeps the training job's own
provenance).

    python -m stages.reuse --source results/runs/parallel_ft/anterior --out results/runs/sequential_ft/anterior \\
        --why "..."
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from stages.core.errors import InputError, run_cli
from stages.core.io import atomic_path, make_provenance, save_json, sha256_file
from stages.core.log import stage_log
from stages.core.methods import MODEL_FILES

#: The files a reused step consists of, in the order they are written (see MODEL_FILES).
FILES = MODEL_FILES
RECORD = "reused_from.json"


def run(source: Path, out: Path, why: str) -> Path:
    """Copy ``source``'s model files into ``out`` and write ``out/reused_from.json``.

    Raises:
        InputError: a file of ``source`` is missing (nothing is written then).
    """
    source, out = Path(source), Path(out)
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise InputError(source, f"not a trained model folder: missing {missing}")
    if source.resolve() == out.resolve():
        raise InputError(out, "source and destination are the same folder")
    hashes = {name: sha256_file(source / name) for name in FILES}
    for name in FILES:
        with atomic_path(out / name) as tmp:
            shutil.copyfile(source / name, tmp)
    record = {
        "source": str(source),
        "why": why,
        "files": hashes,
        "provenance": make_provenance("reuse", {"why": why}, inputs=[source / n for n in FILES]),
    }
    save_json(record, out / RECORD)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.reuse", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the trained model folder to reuse")
    parser.add_argument("--out", type=Path, required=True, help="the step folder to fill")
    parser.add_argument("--why", required=True, help="why the two steps are the same job (recorded)")
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.source, args.out, args.why)


if __name__ == "__main__":
    run_cli(main)
