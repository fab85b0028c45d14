"""Fold a trained LoRA adapter into its base model, W_t = W_{t-1} + (alpha / r) B A, giving the next model M_t.

The last step of MedSeqFT's K&G RFT for one task (Ye et al., arXiv 2509.06096): the merged model
carries the earlier tasks' heads unchanged and the new task's head trained with the adapter. The
merge is :func:`stages.core.lora.merge_adapter_folder`: PEFT's arithmetic on PEFT's files, bit-identical
to PEFT's ``merge_and_unload`` (unit-tested) without importing PEFT and Hugging Face ``transformers``
(most of a merge job's start-up).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.errors import InputError, run_cli
from stages.core.io import make_provenance, read_json
from stages.core.log import stage_log
from stages.core.lora import merge_adapter_folder
from stages.core.nets import load_model, model_id, save_model
from stages.core.settings import add_settings_argument

__all__ = ["run", "main"]


def run(base: Path, adapter: Path, out: Path, settings: dict[str, Any] | None = None) -> None:
    """Merge ``adapter`` (folder from the retention stage) into ``base`` and write the model folder ``out``."""
    run_json = adapter / "run.json"
    if not run_json.is_file():
        raise InputError(run_json, "missing: not an adapter folder written by the retention stage")
    info = read_json(run_json)
    model = load_model(base)
    task, num_classes = info["task"], int(info["num_classes"])
    if task in model.seg_heads:
        raise InputError(base / "model.json", f"already has a head {task!r}; the adapter adds that head")
    # the head's weights come from the adapter (PEFT modules_to_save); its initial values do not matter
    model.add_head(task, num_classes)
    merged = merge_adapter_folder(model, adapter)
    prov = make_provenance(
        "merge",
        settings or {},
        inputs=[base / "model.safetensors", adapter / "adapter_model.safetensors"],
        base_model=model_id(base),
        task=task,
    )
    save_model(merged, out, prov)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="model folder the adapter was trained on (M_{t-1})")
    parser.add_argument("--adapter", type=Path, required=True, help="adapter folder from the retention stage")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (M_t)")
    add_settings_argument(parser)  # recorded in the provenance only: merging has no settings of its own
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.base, args.adapter, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
