"""LoRA for the foundation network through PEFT: target choice, injection, adapter files, and the merge.

MedSeqFT's retention stage (``methods.md`` §1, step 2) freezes M_{t-1}, adds low-rank adapters
(Hu et al., ICLR 2022: ``W + (alpha / r) B A``) and trains them together with the task head with PEFT;
step 3 folds them into the weights. The training side is PEFT's; the merge of a saved adapter folder
(:func:`merge_adapter_folder`, what the merge stage runs) reads PEFT's files and folds them with PEFT's
own arithmetic without importing PEFT, which imports Hugging Face ``transformers`` (~5 s of a merge
job's ~7 s on a quiet CPU); a unit test holds it bit-identical to PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.errors import InputError
from stages.core.io import load_safetensors, read_json, save_json, save_safetensors
from stages.core.nets import FoundationNet

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "add_lora",
    "count_trainable",
    "load_adapter",
    "lora_targets",
    "merge_adapter_folder",
    "merge_lora",
    "lora_param_groups",
    "norm_modules",
    "save_adapter",
    "teacher_svd_init",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Swin blocks: attention qkv / output projection and the two MLP linears (methods.md §1).
_SWIN_TARGET = re.compile(r"^backbone\.swinViT\.layers\d\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear[12])$")


def lora_targets(model: FoundationNet, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[str]:
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
    train_norms: bool = False,
    train_biases: bool = False,
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
        train_norms: also train the affine parameters of every normalisation layer of the backbone
            (:func:`norm_modules`), as PEFT ``modules_to_save`` copies: saved with the adapter, folded
            back by the merge, and switched off with the adapter (ours, option).
        train_biases: also train every bias of the model (PEFT ``bias="all"``: trained in place, saved
            with the adapter; ``disable_adapter`` does not undo them, so compare with a separate frozen
            copy of the start model).

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
    to_save = [f"seg_heads.{task}" for task in heads] + (norm_modules(model) if train_norms else [])
    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=sorted(names),
        modules_to_save=to_save or None,
        bias="all" if train_biases else "none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if train_biases:
        # bias="all" unfreezes every bias; keep the SSL heads and the other tasks' heads fixed
        keep = tuple(f"seg_heads.{task}." for task in heads)
        for name, p in peft_model.named_parameters():
            inner = name.removeprefix("base_model.model.")
            if name.endswith("bias") and not inner.startswith("backbone.") and not inner.startswith(keep):
                p.requires_grad_(False)
    return peft_model


_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def norm_modules(model: FoundationNet) -> list[str]:
    """Full names of the backbone's normalisation layers that have affine parameters, sorted.

    Group, layer, instance and batch norms (instance norm only with ``affine=True``: MONAI's default has
    none, and then there is nothing to train).
    """
    names = []
    for name, module in model.named_modules():
        if not name.startswith("backbone.") or not isinstance(module, _NORMS):
            continue
        if any(p is not None for p in (getattr(module, "weight", None), getattr(module, "bias", None))):
            names.append(name)
    return sorted(names)


def lora_param_groups(peft_model: nn.Module, lr: float, lora_lr: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of a LoRA student: the LoRA factors at ``lora_lr``, the rest at ``lr``.

    The rest is what trains fully: the task head and, when switched on, norm affine parameters and
    biases. LoRA's B starts at zero and its update is scaled by alpha / r, so the factors need a larger
    rate than full fine-tuning (about 10x, measured; methods.md §1). Empty groups are left out.

    Args:
        peft_model: from :func:`add_lora`.
        lr: learning rate of the fully trained parameters (``train.lr``).
        lora_lr: learning rate of ``lora_A`` / ``lora_B``.
    """
    lora: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            (lora if ".lora_A." in name or ".lora_B." in name else rest).append(p)
    groups = [{"params": lora, "lr": float(lora_lr), "name": "lora"}, {"params": rest, "lr": float(lr), "name": "full"}]
    return [g for g in groups if g["params"]]


def _lora_layers(peft_model: nn.Module) -> dict[str, Any]:
    """``{base module name: PEFT LoRA layer}`` with the PEFT wrapper prefixes removed."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def teacher_svd_init(
    peft_model: nn.Module, start: nn.Module, teacher: nn.Module, adapter: str = "default"
) -> dict[str, float]:
    """Start every LoRA pair from the truncated SVD of the teacher's weight change on its layer.

    For a target with weight ``W`` (Linear ``(out, in)``; Conv3d ``(out, in, k, k, k)`` flattened to
    ``(out, in·k³)``, the layout of PEFT's Conv LoRA: ``A`` a conv with r output channels and ``W``'s
    kernel, ``B`` a 1x1x1 conv), ``Δ = W_teacher − W_start = U S Vᵀ`` and, with ``s = alpha / r``,
    ``B = U_r sqrt(S_r) / sqrt(s)``, ``A = sqrt(S_r) V_rᵀ / sqrt(s)``, so that ``W_start + s·BA`` is the
    best rank-r approximation of ``W_teacher`` (Eckart–Young; exactly ``W_teacher`` when r ≥ rank Δ).
    The paper's structure W_t = W_{t-1} + (alpha / r) B A is kept; only the starting point changes.
    When r exceeds ``min(out, in·k³)`` the extra rows of A keep PEFT's random values and the extra
    columns of B are zero (they add nothing, and can still learn).

    Args:
        peft_model: from :func:`add_lora` on a copy of ``start``.
        start: the start model M_{t-1} (unwrapped).
        teacher: the teacher T_t (same architecture).
        adapter: PEFT adapter name.

    Returns:
        ``{layer name: relative error ‖Δ − s·BA‖ / ‖Δ‖}`` (0 where Δ = 0).
    """
    start_mods, teacher_mods = dict(start.named_modules()), dict(teacher.named_modules())
    errors = {}
    with torch.no_grad():
        for name, layer in _lora_layers(peft_model).items():
            if name not in start_mods or name not in teacher_mods:
                raise ValueError(f"LoRA layer {name!r} is not in the start model and the teacher")
            w0, wt = start_mods[name].weight, teacher_mods[name].weight
            if w0.shape != wt.shape:
                raise ValueError(f"LoRA layer {name!r}: start {tuple(w0.shape)} != teacher {tuple(wt.shape)}")
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            scale = float(layer.scaling[adapter])
            delta = (wt.double() - w0.double()).reshape(w0.shape[0], -1)
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(a.shape[0], sv.numel())
            root = sv[:r].sqrt() / (scale**0.5)
            new_b = torch.zeros(b.shape[0], b.shape[1], dtype=torch.float64)
            new_b[:, :r] = u[:, :r] * root
            new_a = a.detach().reshape(a.shape[0], -1).double().clone()
            new_a[:r] = root[:, None] * vh[:r]
            a.copy_(new_a.reshape(a.shape).to(a.dtype))
            b.copy_(new_b.reshape(b.shape).to(b.dtype))
            approx = scale * (new_b @ new_a)
            norm = float(delta.norm())
            errors[name] = float((delta - approx).norm()) / norm if norm > 0 else 0.0
    return errors


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
    # with bias="all", PEFT lists a trained norm's bias under two names sharing one tensor; keep the
    # plain name (PEFT's loader maps it to the trained copy)
    seen: dict[int, str] = {}
    for key in sorted(state, key=lambda k: (".modules_to_save." in k, k)):
        ptr = state[key].data_ptr()
        if ptr in seen and state[key].numel() > 0:
            del state[key]
        else:
            seen[ptr] = key
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
    _read_adapter_config(base_model, folder)
    return PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)


def _read_adapter_config(base_model: FoundationNet, folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a :func:`save_adapter` folder, once both files are there and every target
    module is in ``base_model`` (else :class:`InputError` naming the file)."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise InputError(folder / name, "adapter file not found (expected a folder from save_adapter)")
    cfg: dict[str, Any] = read_json(folder / ADAPTER_CONFIG)
    known = dict(base_model.named_modules())
    targets = cfg.get("target_modules") or []
    missing = sorted(t for t in targets if t not in known) if isinstance(targets, list) else []
    if missing:
        raise InputError(folder / ADAPTER_CONFIG, f"target modules not in the base model: {missing}")
    return cfg


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


# adapter_config.json keys whose non-default values change what the merge must do: refused, never written
_MERGE_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "use_dora": False,
    "use_rslora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
}
_PREFIX = "base_model.model."


def merge_adapter_folder(base_model: FoundationNet, folder: Path) -> FoundationNet:
    """Fold a saved adapter folder into ``base_model`` in place, without importing PEFT; returns it.

    The same result as ``merge_lora(load_adapter(base_model, folder))``, bit for bit (unit-tested): each
    target's ``W += delta * (alpha / r)`` with PEFT 0.21's delta (``B @ A`` for ``nn.Linear``; for
    convolutions ``conv(A^T, B)^T``, or ``B @ A`` on a 1 x 1 kernel), and every other saved tensor (the
    ``modules_to_save`` heads and norms, ``bias="all"`` biases) copied over the base's. Adapter options
    this project never writes (DoRA, rsLoRA, LoRA biases, per-module rank or alpha) are refused.

    Args:
        base_model: the network the adapter was trained on, with the adapter's task head added.
        folder: folder written by :func:`save_adapter`.

    Raises:
        InputError: a missing file, an unsupported option, or a tensor the base model lacks or
            shapes differently (naming the file).
    """
    folder = Path(folder)
    cfg = _read_adapter_config(base_model, folder)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for key, default in _MERGE_DEFAULTS.items():
        value = cfg.get(key)
        if value != default and (key == "peft_type" or value):
            raise InputError(cfg_path, f"{key} = {value!r} is not supported by the merge (expected {default!r})")
    r = int(cfg["r"])
    if r < 1:
        raise InputError(cfg_path, f"LoRA rank r must be >= 1, got {r}")
    scaling = cfg["lora_alpha"] / r
    targets = cfg.get("target_modules") or []
    if not isinstance(targets, list):
        raise InputError(cfg_path, f"target_modules = {targets!r} is not supported by the merge (expected a list)")
    modules = dict(base_model.named_modules())
    state = load_safetensors(weights_path)
    params = dict(base_model.named_parameters())
    lora: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, tensor in state.items():
            if ".original_module." in key:
                continue  # bias="all" also saves the frozen original of a modules_to_save copy: the merge drops it
            name = key.removeprefix(_PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            for part in ("lora_A", "lora_B"):
                if name.endswith(f".{part}.weight"):
                    lora.setdefault(name.removesuffix(f".{part}.weight"), {})[part] = tensor
                    break
            else:
                if name not in params or params[name].shape != tensor.shape:
                    raise InputError(weights_path, f"tensor {key!r} {tuple(tensor.shape)} does not fit the base model")
                params[name].copy_(tensor)
        if sorted(lora) != sorted(targets) or any(len(pair) != 2 for pair in lora.values()):
            raise InputError(weights_path, f"LoRA pairs {sorted(lora)} do not match target_modules {sorted(targets)}")
        for target, pair in lora.items():
            layer, a, b = modules[target], pair["lora_A"], pair["lora_B"]
            weight = getattr(layer, "weight", None)
            if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or weight is None:
                raise InputError(cfg_path, f"target {target!r} is a {type(layer).__name__}: no LoRA merge for it")
            if isinstance(layer, nn.Linear):
                delta = (b @ a) * scaling
            elif weight.size()[2:4] == (1, 1):
                delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
            else:
                conv = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[weight.dim() - 2]
                delta = conv(a.transpose(0, 1), b).transpose(0, 1) * scaling
            if delta.shape != weight.shape:
                raise InputError(
                    weights_path, f"LoRA pair of {target!r} gives {tuple(delta.shape)}, weight {tuple(weight.shape)}"
                )
            weight.data += delta.to(weight.dtype)
    for p in base_model.parameters():
        p.requires_grad_(True)
    return base_model
