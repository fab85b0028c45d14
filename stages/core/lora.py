"""LoRA for the foundation network through PEFT: target choice, injection, adapter files, and the merge.

MedSeqFT's retention stage (``methods.md`` §1, step 2) freezes M_{t-1}, adds low-rank adapters
(Hu et al., ICLR 2022: ``W + (alpha / r) B A``) and trains them together with the task head; step 3
folds them into the weights with PEFT's own ``merge_and_unload``. Nothing here re-implements LoRA.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.errors import InputError
from stages.core.io import read_json, save_json, save_safetensors
from stages.core.nets import FoundationNet

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "add_lora",
    "count_trainable",
    "load_adapter",
    "lora_targets",
    "merge_lora",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Swin blocks: attention qkv / output projection and the two MLP linears (methods.md §1).
_SWIN_TARGET = re.compile(r"^backbone\.swinViT\.layers\d\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear[12])$")


def lora_targets(
    model: FoundationNet, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[str]:
    """Full names of the modules that get LoRA adapters, sorted.

    Default rule: SwinUNETR, the ``nn.Linear`` layers ``attn.qkv``, ``attn.proj``, ``mlp.linear1``,
    ``mlp.linear2`` of every Swin block in ``backbone.swinViT``; BasicUNet, every ``nn.Conv3d`` of the
    backbone with a 3x3x3 kernel (1x1x1 ones are left out: PEFT 0.21 cannot merge LoRA on them; the
    heads are trained fully, never adapted); UNet, the same rule, which takes the convolutions of every
    residual unit and the strided down convolutions, but not the ``ConvTranspose3d`` up-samplers (PEFT
    has no LoRA for them): those stay frozen with the rest of M_{t-1}.

    Args:
        model: the network.
        include: regular expressions (``re.search`` on the module name); when given they replace the
            default rule, but only ``nn.Linear`` / ``nn.Conv3d`` modules inside ``backbone`` qualify.
        exclude: regular expressions removing names from the result.
    """
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in exclude]
    names: list[str] = []
    for name, module in model.named_modules():
        if not name.startswith("backbone."):
            continue
        if inc is not None:
            ok = isinstance(module, (nn.Linear, nn.Conv3d)) and any(p.search(name) for p in inc)
        elif model.arch == "swinunetr":
            ok = isinstance(module, nn.Linear) and _SWIN_TARGET.match(name) is not None
        else:
            ok = type(module) is nn.Conv3d and tuple(module.kernel_size) == (3, 3, 3)
        if ok and not any(p.search(name) for p in exc):
            names.append(name)
    return sorted(names)


def add_lora(
    model: FoundationNet,
    rank: int = 4,
    alpha: float = 4,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    train_heads: Sequence[str] | None = None,
    seed: int = 0,
) -> Any:
    """Wrap ``model`` in a PEFT LoRA model: adapters trainable, task heads trainable, the rest frozen.

    The chosen segmentation heads go to PEFT's ``modules_to_save`` (trained fully, saved with the
    adapter, folded back by the merge). The model is modified in place (PEFT's behaviour).

    Args:
        model: the network to adapt (its weights stay frozen).
        rank: LoRA rank r (default 4, ``methods.md`` §1).
        alpha: LoRA alpha; the update is scaled by alpha / r.
        targets: module names (default :func:`lora_targets`).
        dropout: LoRA dropout.
        train_heads: tasks whose ``seg_heads`` are trained; None means every head present, ``()`` none.
        seed: seeds PEFT's initialisation of the LoRA A matrices (it draws from torch's global
            generator, which is left as it was).

    Returns:
        the ``peft.PeftModel``; ``.segment``, ``.encode`` ... reach the wrapped network.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = list(targets) if targets is not None else lora_targets(model)
    if not names:
        raise ValueError("no LoRA target modules")
    known = dict(model.named_modules())
    missing = sorted(n for n in names if n not in known)
    if missing:
        raise ValueError(f"LoRA targets not in the model: {missing}")
    heads = list(model.seg_heads) if train_heads is None else list(train_heads)
    unknown = sorted(set(heads) - set(model.seg_heads))
    if unknown:
        raise ValueError(f"no segmentation heads {unknown}; heads: {sorted(model.seg_heads)}")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=sorted(names),
        modules_to_save=[f"seg_heads.{task}" for task in heads] or None,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, total number of parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _config_dict(peft_model: Any) -> dict[str, Any]:
    cfg = peft_model.peft_config["default"].to_dict()
    cfg["inference_mode"] = True  # as PEFT's save_pretrained writes it, whatever the live mode
    for key, value in list(cfg.items()):
        if isinstance(value, (set, frozenset)):
            cfg[key] = sorted(value)
    return cfg


def save_adapter(peft_model: Any, folder: Path, provenance: Mapping[str, Any] | None = None) -> None:
    """Write PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Written through :mod:`stages.core.io` (atomic); the provenance goes into the safetensors header,
    which PEFT's loader ignores.

    Args:
        peft_model: from :func:`add_lora` or :func:`load_adapter`.
        folder: destination folder.
        provenance: from :func:`stages.core.io.make_provenance`.
    """
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    state = get_peft_model_state_dict(peft_model)
    save_safetensors(state, folder / ADAPTER_WEIGHTS, provenance=provenance)
    save_json(_config_dict(peft_model), folder / ADAPTER_CONFIG)


def load_adapter(base_model: FoundationNet, folder: Path, is_trainable: bool = False) -> Any:
    """Attach a saved adapter to ``base_model`` (PEFT's ``PeftModel.from_pretrained``, local files only).

    Args:
        base_model: a network with the same architecture and heads the adapter was trained on.
        folder: folder written by :func:`save_adapter`.
        is_trainable: keep the adapter trainable (resume training) instead of inference mode.
    """
    from peft import PeftModel

    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise InputError(folder / name, "adapter file not found (expected a folder from save_adapter)")
    cfg = read_json(folder / ADAPTER_CONFIG)
    known = dict(base_model.named_modules())
    targets = cfg.get("target_modules") or []
    missing = sorted(t for t in targets if t not in known) if isinstance(targets, list) else []
    if missing:
        raise InputError(folder / ADAPTER_CONFIG, f"target modules not in the base model: {missing}")
    return PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)


def merge_lora(peft_model: Any) -> FoundationNet:
    """Fold the adapters into the weights, W <- W + (alpha / r) B A, with PEFT's ``merge_and_unload``.

    The trained ``modules_to_save`` copies of the heads replace the originals. Parameters come back
    with ``requires_grad=True`` so the merged model trains like any other.
    """
    merged = peft_model.merge_and_unload()
    if not isinstance(merged, FoundationNet):
        raise TypeError(f"merge gave {type(merged).__name__}, expected FoundationNet")
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
