"""Train a model with one recipe (full fine-tuning, K&G retention, LoRA, multi-task) and write it, resumably.

Every training job of the project goes through here and through the one shared trainer
(:mod:`stages.core.trainer`). Recipes (MedSeqFT, Ye et al., arXiv 2509.06096, and its baselines):

- ``finetune`` — full fine-tuning of ``--init`` with the task's head (new if absent) on one task with
  Dice + CE: the knowledge stage of K&G RFT (teacher T_t), parallel / sequential / transfer FT.
- ``retention`` — the retention stage of K&G RFT: ``--init`` (M_{t-1}) frozen + PEFT LoRA + the task
  head, trained with ``L_seg + λ_k·L_KD(student, T_t) + λ_g·L_ret(student, M_{t-1}; buffers)``;
  writes a PEFT adapter (``stages.merge`` folds it in). With ``lora: false`` every weight trains and
  a whole model is written (the no-LoRA ablation). Without a teacher and with λ_g = 0 this is the
  parallel-LoRA baseline.
- ``multitask`` — all ``--task``s at once from ``--init``, one head each, tasks taking turns per step.
- ``ewc`` — sequential full fine-tuning plus online EWC's Fisher-weighted pull to ``--init`` (M_{t-1}),
  the Fisher read from ``--fisher`` (``stages.fisher``; none at the first task: plain fine-tuning).
- ``lwf`` — sequential full fine-tuning plus LwF: KL between the earlier tasks' heads of the model and
  of the frozen ``--init`` on the new task's patches.
- ``semisupervised`` — ASSFT's selective semi-supervised fine-tuning: Dice + CE on the labelled set
  plus λ_u·(Dice + CE) on the kept pseudo-labelled cases (``--pseudo``).

The resumable state lives in ``--work`` (not a declared Snakemake output), in a sub-folder named by
the hash of this job's settings and inputs: an interrupted job resumes, a changed job starts fresh.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.errors import InputError, run_cli
from stages.core.inference import predict_probabilities, resolve_device
from stages.core.io import (
    config_hash,
    load_safetensors,
    make_provenance,
    read_parquet,
    save_json,
    sha256_file,
    write_parquet,
)
from stages.core.log import stage_log
from stages.core.lora import add_lora, count_trainable, lora_param_groups, lora_targets, save_adapter, teacher_svd_init
from stages.core.losses import (
    kd_loss,
    kd_weights,
    retention_loss,
    scaled_retention_loss,
    segmentation_loss,
    term_gradient_norms,
)
from stages.core.nets import FoundationNet, load_model, model_id, save_model, seed_from
from stages.core.regularisers import ewc_penalty, lwf_loss
from stages.core.sampling import CaseStore, PatchSampler
from stages.core.settings import add_settings_argument, add_threads_argument, apply_threads, from_mapping, setting
from stages.core.trainer import Trainer, TrainSettings

__all__ = [
    "RECIPES",
    "RECIPE_SETTINGS",
    "Job",
    "EwcSettings",
    "LoraSettings",
    "LwfSettings",
    "RetentionSettings",
    "SemiSettings",
    "TrainJobSettings",
    "run",
    "main",
]

log = logging.getLogger("stages.train")

StepFn = Callable[[torch.nn.Module, int, torch.Generator], dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------- settings contract


@dataclass(frozen=True, kw_only=True)
class TrainJobSettings:
    """The settings of every training job: the ``train`` config section (less ``threads``) and where it runs.

    No field has a default: the pipeline passes every one from the config, whose schema holds the defaults.
    """

    patch_size: list[int] = setting(
        help="training patch (voxels); also the validation window", schema="train.patch_size"
    )
    batch_size: int = setting(help="patches per step", schema="train.batch_size")
    steps: int = setting(help="optimiser updates", schema="train.steps")
    lr: float = setting(help="peak AdamW learning rate", schema="train.lr")
    weight_decay: float = setting(help="AdamW weight decay", schema="train.weight_decay")
    warmup_steps: int = setting(help="linear warm-up updates before the cosine decay", schema="train.warmup_steps")
    fg_ratio: float = setting(help="share of patches centred on a foreground voxel", schema="train.fg_ratio")
    checkpoint_every: int = setting(help="updates between resumable checkpoints", schema="train.checkpoint_every")
    val_every: int = setting(
        help="updates between validation Dice scores (0 = keep the final model)", schema="train.val_every"
    )
    amp: bool = setting(help="mixed precision on CUDA", schema="train.amp")
    overlap: float = setting(help="sliding-window overlap of the validation", schema="inference.overlap")
    seed: int = setting(help="seeds the head initialisation, the sampling and the buffer draws", schema="seed")
    device: str = setting(help="cpu, cuda or cuda:N", schema="device")


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """PEFT LoRA of the retention stage (``medseqft.lora`` plus ``enabled``, which the method decides)."""

    rank: int = setting(help="LoRA rank r", schema="medseqft.lora.rank")
    alpha: float = setting(help="LoRA alpha (update scaled by alpha / r)", schema="medseqft.lora.alpha")
    dropout: float = setting(help="LoRA dropout", schema="medseqft.lora.dropout")
    targets: list[str] | None = setting(
        help="regular expressions of module names to adapt; None = the defaults", schema="medseqft.lora.targets"
    )
    lr: float | None = setting(help="peak learning rate of the LoRA factors; None = 10 x lr", schema="medseqft.lora.lr")
    init: str = setting(help="zero or teacher_svd", schema="medseqft.lora.init")
    train_norms: bool = setting(
        help="also train the norm layers' affine parameters", schema="medseqft.lora.train_norms"
    )
    train_biases: bool = setting(help="also train every bias", schema="medseqft.lora.train_biases")
    enabled: bool = setting(help="LoRA on (false: every weight trains, the no-LoRA ablation)")

    def __post_init__(self) -> None:
        if self.init not in ("zero", "teacher_svd"):
            raise InputError("medseqft.lora.init", f"must be 'zero' or 'teacher_svd', got {self.init!r}")


@dataclass(frozen=True, kw_only=True)
class RetentionSettings(TrainJobSettings):
    """The retention recipe (K&G RFT's retention stage, parallel LoRA, the ablations): ``medseqft`` keys."""

    lora: LoraSettings = setting(help="PEFT LoRA settings")
    kd_kind: str = setting(help="kl or mse", schema="medseqft.kd_kind")
    kd_temperature: float = setting(help="softmax temperature of the KL distillation", schema="medseqft.kd_temperature")
    kd_weight: float = setting(help="lambda_k (0 without a teacher)", schema="medseqft.kd_weight")
    kd_mask: str = setting(help="none or foreground", schema="medseqft.kd_mask")
    kd_dilation: int = setting(help="dilation (voxels) of the teacher's foreground", schema="medseqft.kd_dilation")
    kd_background_share: float = setting(
        help="share of the KD weight on the background", schema="medseqft.kd_background_share"
    )
    retention_weight: float = setting(help="lambda_g (0 without buffers)", schema="medseqft.retention_weight")
    retention_levels: str = setting(help="all or deepest", schema="medseqft.retention_levels")
    retention_scale: str = setting(help="channel or none", schema="medseqft.retention_scale")
    lwf_weight: float = setting(
        help="lambda_o, output-level retention (0 without buffers)", schema="medseqft.lwf_weight"
    )
    grad_log_every: int = setting(
        help="steps between per-term gradient norms in the log (0 = never)", schema="medseqft.grad_log_every"
    )
    buffer_batch_size: int = setting(help="buffer patches per step", schema="medseqft.buffer_batch_size")

    def __post_init__(self) -> None:
        checks = [
            ("kd_kind", ("kl", "mse")),
            ("kd_mask", ("none", "foreground")),
            ("retention_levels", ("all", "deepest")),
            ("retention_scale", ("channel", "none")),
        ]
        for key, allowed in checks:
            if getattr(self, key) not in allowed:
                raise InputError(f"medseqft.{key}", f"must be one of {list(allowed)}, got {getattr(self, key)!r}")


@dataclass(frozen=True, kw_only=True)
class SemiSettings(TrainJobSettings):
    """ASSFT's selective semi-supervised fine-tuning."""

    pseudo_weight: float = setting(help="lambda_u, weight of the pseudo-label loss", schema="assft.pseudo_weight")
    pseudo_batch_size: int | None = setting(None, help="pseudo-labelled patches per step; None = batch_size")


def _check_section(section: str, value: Mapping[str, Any], keys: Sequence[str]) -> None:
    """A config section passed whole (``ewc``, ``lwf``): exactly its schema's keys, numbers."""
    if set(value) != set(keys):
        raise InputError(section, f"must hold exactly {sorted(keys)}, got {sorted(value)}")
    for key in keys:
        if isinstance(value[key], bool) or not isinstance(value[key], (int, float)):
            raise InputError(f"{section}.{key}", f"must be a number, got {value[key]!r}")


@dataclass(frozen=True, kw_only=True)
class EwcSettings(TrainJobSettings):
    """Sequential full FT with online EWC: the ``ewc`` section (``lambda`` is a Python keyword, so it stays a mapping)."""

    ewc: dict[str, Any] = setting(help="lambda (penalty weight), gamma (Fisher decay), fisher_batches", schema="ewc")
    grad_log_every: int = setting(
        help="steps between per-term gradient norms in the log (0 = never)", schema="medseqft.grad_log_every"
    )

    def __post_init__(self) -> None:
        _check_section("ewc", self.ewc, ("lambda", "gamma", "fisher_batches"))


@dataclass(frozen=True, kw_only=True)
class LwfSettings(TrainJobSettings):
    """Sequential full FT with Learning without Forgetting: the ``lwf`` section."""

    lwf: dict[str, Any] = setting(
        help="weight (lambda_o) and temperature of the KL to M_{t-1}'s old heads", schema="lwf"
    )
    grad_log_every: int = setting(
        help="steps between per-term gradient norms in the log (0 = never)", schema="medseqft.grad_log_every"
    )

    def __post_init__(self) -> None:
        _check_section("lwf", self.lwf, ("weight", "temperature"))


@dataclass
class Job:
    """Everything a recipe needs, loaded and checked once."""

    model: FoundationNet
    tasks: list[str]
    data: list[Path]
    manifests: list[Any]
    settings: Any
    """The recipe's settings dataclass (:data:`RECIPE_SETTINGS`)."""
    device: torch.device
    teacher: FoundationNet | None = None
    buffers: list[tuple[Path, list[str]]] = field(default_factory=list)
    pseudo: tuple[Path, list[str]] | None = None
    """(pseudo-label folder, kept case ids) for ``semisupervised``; labels read from that folder only."""
    buffer_tasks: list[str] = field(default_factory=list)
    """The task of each buffer (its ``task`` column), whose head h_j the output-level retention reads."""
    fisher: dict[str, torch.Tensor] | None = None
    """Online EWC's accumulated diagonal Fisher of M_{t-1}'s backbone (``ewc``; None at the first task)."""


@dataclass
class Plan:
    """What a recipe hands to the trainer and how the result is written."""

    net: torch.nn.Module
    params: list[Any]
    """Parameters to optimise, or AdamW parameter groups (dicts with ``params`` and ``lr``)."""
    step_fn: StepFn
    validate: Callable[[torch.nn.Module], float] | None
    save: Callable[[Path, dict[str, Any]], None]


def _load_manifest(data: Path) -> tuple[Any, int]:
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: run the preprocess step for this task first")
    manifest = read_parquet(manifest_path)
    if manifest["label_path"].isna().all():
        raise InputError(manifest_path, "has no labels: a training task needs a labelled dataset")
    return manifest, int(manifest["num_classes"].iloc[0])


def _cases(manifest: Any, split: str) -> list[str]:
    return manifest.loc[manifest["split"] == split, "case"].tolist()


def _sampler(
    data: Path, cases: list[str], s: TrainJobSettings, with_labels: bool = True, batch: int | None = None
) -> PatchSampler:
    if not cases:
        raise InputError(data / "manifest.parquet", "has no training cases")
    return PatchSampler(
        CaseStore(data / "cases", cases, with_labels=with_labels),
        patch_size=s.patch_size,
        batch_size=batch or s.batch_size,
        fg_ratio=s.fg_ratio if with_labels else 0.0,
    )


def _dice_validator(
    net: torch.nn.Module, task: str, data: Path, cases: Sequence[str], s: TrainJobSettings, device: torch.device
) -> Callable[[torch.nn.Module], float]:
    """Mean foreground Dice over the validation cases on the preprocessed grid: the best-checkpoint criterion."""
    from monai.metrics import compute_dice

    def validate(_: torch.nn.Module) -> float:
        scores = []
        for case in cases:
            image = np.load(data / "cases" / f"{case}.npy", mmap_mode="r")
            seg = torch.from_numpy(np.load(data / "cases" / f"{case}_seg.npy")).long()  # read in full: writable
            probs = predict_probabilities(net, task, image, s.patch_size, s.overlap, 4, device)
            k = probs.shape[0]
            pred = torch.from_numpy(probs.argmax(0)).long()
            onehot = [torch.nn.functional.one_hot(t, k).permute(3, 0, 1, 2)[None] for t in (pred, seg)]
            d = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=False)
            scores.append(float(torch.nan_to_num(d, nan=1.0).mean()))
        return float(np.mean(scores)) if scores else 0.0

    return validate


def _maybe_validator(net: torch.nn.Module, job: Job, i: int = 0) -> Callable[[torch.nn.Module], float] | None:
    val_cases = _cases(job.manifests[i], "val")
    if job.settings.val_every > 0 and val_cases:
        return _dice_validator(net, job.tasks[i], job.data[i], val_cases, job.settings, job.device)
    return None


def _head_params(model: FoundationNet, tasks: Sequence[str]) -> list[torch.nn.Parameter]:
    return [p for t in tasks for p in model.seg_heads[t].parameters()]


def _save_model(model: FoundationNet) -> Callable[[Path, dict[str, Any]], None]:
    def save(out: Path, prov: dict[str, Any]) -> None:
        save_model(model.cpu(), out, prov)

    return save


def recipe_finetune(job: Job) -> Plan:
    """Full fine-tuning of the backbone and the task head with Dice + CE (docs/methods.md §0, §1 step 1)."""
    model, task, s = job.model, job.tasks[0], job.settings
    sampler = _sampler(job.data[0], _cases(job.manifests[0], "train"), s)
    loss_fn = segmentation_loss()

    def step_fn(net: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = sampler.sample(generator)
        loss = loss_fn(net.segment(batch["image"].to(job.device), task), batch["label"].to(job.device))
        return {"loss": loss, "seg": loss.detach()}

    # other tasks' heads are left as they are (they get no gradient and no weight decay)
    params = list(model.backbone.parameters()) + _head_params(model, [task])
    return Plan(model, params, step_fn, _maybe_validator(model, job), _save_model(model))


def recipe_multitask(job: Job) -> Plan:
    """All tasks at once from one start, one head each; task k trains on steps ≡ k (mod n)."""
    model, s = job.model, job.settings
    samplers = [_sampler(d, _cases(m, "train"), s) for d, m in zip(job.data, job.manifests)]
    loss_fn = segmentation_loss()

    def step_fn(net: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        k = step % len(samplers)
        batch = samplers[k].sample(generator)
        loss = loss_fn(net.segment(batch["image"].to(job.device), job.tasks[k]), batch["label"].to(job.device))
        return {"loss": loss, "seg": loss.detach(), "task_index": torch.tensor(float(k))}

    params = list(model.backbone.parameters()) + _head_params(model, job.tasks)
    # validation: the mean over the tasks (that have a val split) of each task's mean Dice
    validators = [v for v in (_maybe_validator(model, job, i) for i in range(len(job.tasks))) if v is not None]
    validate = (lambda net: float(np.mean([v(net) for v in validators]))) if validators else None
    return Plan(model, params, step_fn, validate, _save_model(model))


#: Modules whose outputs are the encoder levels of the feature retention (besides the deepest map and
#: the decoder output, which :meth:`FoundationNet.forward_features` returns): the skip connections.
RETENTION_LEVELS: dict[str, list[str]] = {
    "basicunet": ["backbone.conv_0", "backbone.down_1", "backbone.down_2", "backbone.down_3"],
    "swinunetr": ["backbone.encoder1", "backbone.encoder2", "backbone.encoder3", "backbone.encoder4"],
}


def retention_levels(model: torch.nn.Module) -> list[str]:
    """The encoder levels whose outputs the retention term keeps close to M_{t-1}'s (above the deepest map).

    MONAI's strided UNet nests its levels (``model.0`` down-samples, ``model.1.submodule`` is the next
    level), so its level names depend on its depth: each level's down-sampling block, shallowest first.
    """
    if model.arch != "unet":
        return list(RETENTION_LEVELS.get(model.arch, []))
    from stages.core.nets import _is_unet_level

    names, block, prefix = [], model.backbone.model, "backbone.model"
    while _is_unet_level(block):
        names.append(f"{prefix}.0")
        block, prefix = block[1].submodule, f"{prefix}.1.submodule"
    return names


class _FeatureTap:
    """Forward hooks collecting the outputs of named modules of ``net`` (a PEFT wrapper or not), in order."""

    def __init__(self, net: torch.nn.Module, names: Sequence[str]) -> None:
        modules = {n.removeprefix("base_model.model."): m for n, m in net.named_modules()}
        self.names = [n for n in names if n in modules]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return hook

    def collect(self) -> list[torch.Tensor]:
        out = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return out


def recipe_retention(job: Job) -> Plan:
    """K&G RFT retention stage (docs/methods.md §1 step 2): LoRA on frozen M_{t-1}, KD to T_t, retention on buffers.

    ``L = L_seg + λ_k·L_KD(student, T_t) + λ_g·L_ret + λ_o·L_LwF`` where L_ret is the feature retention
    against the frozen M_{t-1} on a buffer patch (several encoder levels and the decoder output, each
    scaled by the frozen model's per-channel RMS; ``retention_levels: deepest`` and
    ``retention_scale: none`` give the original deepest-map MSE), and L_LwF the KL between the
    student's and M_{t-1}'s logits of the buffer's own task head h_j, for buffers of earlier tasks
    (Learning without Forgetting; Li & Hoiem, ECCV 2016). LoRA factors train at ``lora.lr`` (default
    10x ``lr``), the head (and norms / biases when switched on) at ``lr``; ``lora.init: teacher_svd``
    starts the pairs from the teacher's weight change. Every ``grad_log_every`` steps the log also
    holds ``grad_<term>``: the gradient norm of each weighted term w.r.t. the trainable parameters.
    """
    model, task = job.model, job.tasks[0]
    s: RetentionSettings = job.settings
    lora = s.lora
    kd_weight = float(s.kd_weight) if job.teacher is not None else 0.0
    ret_weight = float(s.retention_weight) if job.buffers else 0.0
    buffer_tasks = job.buffer_tasks or [""] * len(job.buffers)
    old_heads = [t if t in model.seg_heads and t != task else None for t in buffer_tasks]
    lwf_weight = float(s.lwf_weight) if any(old_heads) else 0.0
    use_lora = lora.enabled
    if job.teacher is not None:
        # ours: the student's new head starts from the teacher's, which already fits the task
        model.seg_heads[task].load_state_dict(job.teacher.seg_heads[task].state_dict())
        job.teacher.to(job.device).eval().requires_grad_(False)
    # the frozen M_{t-1} is a separate copy: trained biases (PEFT bias="all") change the wrapped model in
    # place, so the adapter switched off would not be M_{t-1} any more
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if (ret_weight > 0 or lwf_weight > 0) else None
    sampler = _sampler(job.data[0], _cases(job.manifests[0], "train"), s)
    buffer_samplers = [_sampler(d, cases, s, with_labels=False, batch=s.buffer_batch_size) for d, cases in job.buffers]
    loss_fn = segmentation_loss()
    lr = float(s.lr)
    lora_lr = float(lora.lr) if lora.lr is not None else 10.0 * lr
    params: list[Any]
    if use_lora:
        start = copy.deepcopy(model) if (lora.init == "teacher_svd" and job.teacher is not None) else None
        patterns = lora.targets
        net = add_lora(
            model,
            rank=lora.rank,
            alpha=lora.alpha,
            targets=lora_targets(model, include=patterns) if patterns else None,
            dropout=lora.dropout,
            train_heads=[task],
            seed=s.seed,
            train_norms=lora.train_norms,
            train_biases=lora.train_biases,
        )
        if start is not None:
            errors = teacher_svd_init(net, start, job.teacher)
            del start
            log.info(
                "LoRA pairs start from the rank-%d SVD of the teacher's change (relative error: median %.3f, "
                "max %.3f over %d layers)",
                lora.rank,
                float(np.median(list(errors.values()))),
                max(errors.values()),
                len(errors),
            )
            _copy_trained_extras(net, job.teacher)
        elif lora.init == "teacher_svd":
            log.info("lora.init teacher_svd without a teacher (parallel LoRA): LoRA starts at zero")
        params = lora_param_groups(net, lr=lr, lora_lr=lora_lr)
        flat = [p for g in params for p in g["params"]]
    else:
        net = model
        flat = list(model.backbone.parameters()) + _head_params(model, [task])
        params = flat
    net.to(job.device)
    if frozen is not None:
        frozen.to(job.device)
    trainable, total = (
        count_trainable(net) if use_lora else (sum(p.numel() for p in flat), sum(p.numel() for p in net.parameters()))
    )
    log.info(
        "retention stage: %d of %d parameters trainable (LoRA %s, LoRA lr %.2g, other lr %.2g)",
        trainable,
        total,
        "on" if use_lora else "off",
        lora_lr if use_lora else lr,
        lr,
    )
    levels = retention_levels(model) if s.retention_levels == "all" else []
    student_tap = _FeatureTap(net, levels)
    frozen_tap = _FeatureTap(frozen, levels) if frozen is not None else None
    grad_every = s.grad_log_every

    def features(m: torch.nn.Module, tap: _FeatureTap, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        tap.outputs = {}
        deepest, decoded = m.forward_features(x)
        extra = tap.collect()
        if s.retention_levels == "deepest":
            return [deepest], decoded
        return [*extra, deepest, decoded], decoded

    def step_fn(n: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = sampler.sample(generator)
        x = batch["image"].to(job.device)
        logits = n.segment(x, task)
        seg = loss_fn(logits, batch["label"].to(job.device))
        weighted = {"seg": seg}
        terms: dict[str, torch.Tensor] = {"seg": seg.detach()}
        if kd_weight > 0:
            with torch.no_grad():
                teacher_logits = job.teacher.segment(x, task)
            mask = (
                kd_weights(teacher_logits, s.kd_dilation, float(s.kd_background_share))
                if s.kd_mask == "foreground"
                else None
            )
            kd = kd_loss(logits, teacher_logits, kind=s.kd_kind, temperature=s.kd_temperature, mask=mask)
            weighted["kd"] = kd_weight * kd
            terms["kd"] = kd.detach()
        if ret_weight > 0 or lwf_weight > 0:
            assert frozen is not None and frozen_tap is not None
            # the buffer draws come from their own stream, derived from (seed, step) so that a resumed
            # run needs no extra state: the task's patches are then the same with or without a buffer,
            # and the buffer ablations differ from MedSeqFT by the retention terms alone
            buffer_generator = torch.Generator().manual_seed(seed_from(s.seed, "buffer", step))
            k = int(torch.randint(len(buffer_samplers), (1,), generator=buffer_generator))
            bx = buffer_samplers[k].sample(buffer_generator)["image"].to(job.device)
            student_levels, student_dec = features(n, student_tap, bx)
            with torch.no_grad():
                frozen_levels, frozen_dec = features(frozen, frozen_tap, bx)
            if ret_weight > 0:
                if s.retention_scale == "channel":
                    ret, per_level = scaled_retention_loss(student_levels, frozen_levels)
                else:
                    ret = retention_loss(student_levels, frozen_levels)
                    per_level = [retention_loss(a, b) for a, b in zip(student_levels, frozen_levels)]
                weighted["retention"] = ret_weight * ret
                terms["retention"] = ret.detach()
                for i, value in enumerate(per_level):
                    terms[f"retention_l{i}"] = value.detach()
            if lwf_weight > 0:
                head = old_heads[k]
                if head is not None:
                    size = bx.shape[2:]
                    lwf = kd_loss(
                        n.head_logits(head, student_dec, size),
                        frozen.head_logits(head, frozen_dec, size),
                        kind="kl",
                        temperature=s.kd_temperature,
                    )
                else:  # a buffer of the current task: M_{t-1} has no head for it
                    lwf = student_dec.sum() * 0.0
                weighted["lwf"] = lwf_weight * lwf
                terms["lwf"] = lwf.detach()
        if grad_every > 0 and step % grad_every == 0:
            for name, norm in term_gradient_norms(weighted, flat).items():
                terms[f"grad_{name}"] = torch.tensor(norm)
        loss = torch.stack(list(weighted.values())).sum()
        terms["loss"] = loss
        return terms

    def save(out: Path, prov: dict[str, Any]) -> None:
        if use_lora:
            save_adapter(net, out, prov)
            save_json(
                {
                    "task": task,
                    "num_classes": int(model.seg_heads[task].out_channels),
                    "trainable_parameters": trainable,
                    "total_parameters": total,
                    "provenance": prov,
                },
                out / "run.json",
            )
        else:
            save_model(model.cpu(), out, prov)

    return Plan(net, params, step_fn, _maybe_validator(net, job), save)


def _copy_trained_extras(net: torch.nn.Module, teacher: FoundationNet) -> None:
    """With ``teacher_svd``: trainable norms and biases of the student start at the teacher's values too."""
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.requires_grad or ".lora_" in name or ".seg_heads." in f".{name}":
                continue
            key = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            key = key.replace(".base_layer.", ".")
            if key in teacher_state and teacher_state[key].shape == p.shape:
                p.copy_(teacher_state[key].to(p.device, p.dtype))


def recipe_semisupervised(job: Job) -> Plan:
    """ASSFT selective semi-supervised fine-tuning (docs/methods.md §2): Dice + CE on the labelled set L plus
    ``λ_u · (Dice + CE)`` on the kept pseudo-labelled cases (Yang et al., arXiv 2509.10784; λ_u ours).

    ``--data`` is the round's labelled folder (stages.annotate) and ``--pseudo`` the pseudo-label folder
    (stages.select_pseudo): every label this recipe sees comes from one of the two, never from the task
    folder. Each step draws one labelled batch and, when pseudo-labels were kept, one pseudo batch
    (``pseudo_batch_size``, default ``batch_size``) from the same generator. With no kept case it is
    plain fine-tuning on L.
    """
    model, task = job.model, job.tasks[0]
    s: SemiSettings = job.settings
    sampler = _sampler(job.data[0], _cases(job.manifests[0], "train"), s)
    pseudo_weight = float(s.pseudo_weight)
    pseudo_sampler = None
    if job.pseudo is not None and job.pseudo[1] and pseudo_weight > 0:
        folder, kept = job.pseudo
        pseudo_sampler = _sampler(folder, kept, s, batch=s.pseudo_batch_size or s.batch_size)
    else:
        log.info("semisupervised: no pseudo-labelled case kept (or λ_u = 0): fine-tuning on the labelled set only")
    loss_fn = segmentation_loss()

    def step_fn(net: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = sampler.sample(generator)
        seg = loss_fn(net.segment(batch["image"].to(job.device), task), batch["label"].to(job.device))
        terms = {"seg": seg.detach()}
        loss = seg
        if pseudo_sampler is not None:
            extra = pseudo_sampler.sample(generator)
            pseudo = loss_fn(net.segment(extra["image"].to(job.device), task), extra["label"].to(job.device))
            loss = loss + pseudo_weight * pseudo
            terms["pseudo"] = pseudo.detach()
        terms["loss"] = loss
        return terms

    params = list(model.backbone.parameters()) + _head_params(model, [task])
    return Plan(model, params, step_fn, _maybe_validator(model, job), _save_model(model))


def _regularised_finetune(
    job: Job,
    extra_params: list[torch.nn.Parameter],
    regulariser: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    grad_every: int,
) -> Plan:
    """Full fine-tuning on one task plus weighted regulariser terms, each logged with its gradient norm."""
    model, task, s = job.model, job.tasks[0], job.settings
    sampler = _sampler(job.data[0], _cases(job.manifests[0], "train"), s)
    loss_fn = segmentation_loss()
    params = list(model.backbone.parameters()) + _head_params(model, [task]) + extra_params

    def step_fn(net: torch.nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = sampler.sample(generator)
        x = batch["image"].to(job.device)
        _, decoded = net.forward_features(x)  # one pass: the task's head and LwF's old heads share it
        seg = loss_fn(net.head_logits(task, decoded, x.shape[2:]), batch["label"].to(job.device))
        weighted = {"seg": seg, **regulariser(net, x, decoded)}
        terms = {"seg": seg.detach()}
        terms.update({name: value.detach() for name, value in weighted.items() if name != "seg"})
        if grad_every > 0 and step % grad_every == 0:
            for name, norm in term_gradient_norms(weighted, params).items():
                terms[f"grad_{name}"] = torch.tensor(norm)
        terms["loss"] = torch.stack(list(weighted.values())).sum()
        return terms

    return Plan(model, params, step_fn, _maybe_validator(model, job), _save_model(model))


def recipe_ewc(job: Job) -> Plan:
    """Sequential full FT with online EWC (Schwarz et al., ICML 2018): ``L_seg + lambda/2 sum F (theta - theta*)^2``.

    theta* is ``--init`` (M_{t-1}) and F the Fisher accumulated up to task t - 1 (:mod:`stages.fisher`);
    only backbone parameters carry it, so the new head is free. The log holds ``ewc`` (the weighted
    penalty) and, every ``grad_log_every`` steps, ``grad_seg`` and ``grad_ewc``.
    """
    s = job.settings
    weight = float(s.ewc["lambda"])
    fisher = {n: f.to(job.device) for n, f in (job.fisher or {}).items()}
    anchor = {n: p.detach().clone().float() for n, p in job.model.backbone.named_parameters() if n in fisher}
    if not fisher:
        log.info("ewc: no Fisher (first task): plain fine-tuning")

    def regulariser(net: torch.nn.Module, x: torch.Tensor, decoded: torch.Tensor) -> dict[str, torch.Tensor]:
        if not fisher or weight == 0:
            return {}
        return {"ewc": weight * ewc_penalty(net.backbone.named_parameters(), anchor, fisher)}

    return _regularised_finetune(job, [], regulariser, s.grad_log_every)


def recipe_lwf(job: Job) -> Plan:
    """Sequential full FT with Learning without Forgetting (Li & Hoiem, ECCV 2016).

    ``L_seg + lambda_o * sum_j KL_T(h_j(M_{t-1}(x)) || h_j(theta(x)))`` over the earlier tasks' heads j
    of ``--init`` on the *new* task's patches x (the mean over j); those heads train too, as in LwF.
    The log holds ``lwf`` (weighted) and, every ``grad_log_every`` steps, ``grad_seg`` and ``grad_lwf``.
    """
    model, task, s = job.model, job.tasks[0], job.settings
    weight, temperature = float(s.lwf["weight"]), float(s.lwf["temperature"])
    old_heads = [t for t in model.seg_heads if t != task]
    frozen = copy.deepcopy(model).to(job.device).eval().requires_grad_(False) if old_heads and weight > 0 else None
    if frozen is None:
        log.info("lwf: no earlier task head (first task): plain fine-tuning")

    def regulariser(net: torch.nn.Module, x: torch.Tensor, decoded: torch.Tensor) -> dict[str, torch.Tensor]:
        if frozen is None:
            return {}
        with torch.no_grad():
            _, old_decoded = frozen.forward_features(x)
        size = x.shape[2:]
        terms = [
            lwf_loss(net.head_logits(h, decoded, size), frozen.head_logits(h, old_decoded, size), temperature)
            for h in old_heads
        ]
        return {"lwf": weight * torch.stack(terms).mean()}

    extra = _head_params(model, old_heads) if frozen is not None else []
    return _regularised_finetune(job, extra, regulariser, s.grad_log_every)


RECIPES: dict[str, Callable[[Job], Plan]] = {
    "finetune": recipe_finetune,
    "ewc": recipe_ewc,
    "lwf": recipe_lwf,
    "retention": recipe_retention,
    "multitask": recipe_multitask,
    "semisupervised": recipe_semisupervised,
}

#: The settings contract of each recipe: its ``--settings`` must hold exactly these dataclass fields.
RECIPE_SETTINGS: dict[str, type[TrainJobSettings]] = {
    "finetune": TrainJobSettings,
    "retention": RetentionSettings,
    "multitask": TrainJobSettings,
    "semisupervised": SemiSettings,
    "ewc": EwcSettings,
    "lwf": LwfSettings,
}


def run(
    recipe: str,
    init: Path,
    data: Sequence[Path],
    tasks: Sequence[str],
    out: Path,
    work: Path,
    settings: Mapping[str, Any],
    teacher: Path | None = None,
    buffers: Sequence[tuple[Path, Path]] = (),
    pseudo: Path | None = None,
    fisher: Path | None = None,
) -> None:
    """Train ``init`` with ``recipe`` and write the result (model folder or adapter) and its log to ``out``.

    Args:
        recipe: a key of :data:`RECIPES`.
        init: model folder to start from (M0 or the previous step's model M_{t-1}).
        data: preprocessed task folders (one per task; several only for ``multitask``).
        tasks: task names, one per ``data`` (the segmentation heads' keys).
        out: output folder.
        work: folder for resumable state (not a declared output).
        settings: the recipe's settings (:data:`RECIPE_SETTINGS`): the ``train`` config section plus
            ``seed``, ``device``, ``overlap``; for ``retention`` the ``medseqft`` keys
            (:class:`RetentionSettings`), for ``semisupervised`` ``pseudo_weight``. Unknown and missing
            keys are refused.
        teacher: the teacher model folder T_t (``retention``).
        buffers: (buffer Parquet, preprocessed folder) pairs B_1..B_t (``retention``).
        pseudo: the pseudo-label folder of ``stages.select_pseudo`` (``semisupervised``).
        fisher: the Fisher folder of ``stages.fisher`` for M_{t-1} (``ewc``).
    """
    if recipe not in RECIPES:
        raise InputError("--recipe", f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    if len(data) != len(tasks) or not tasks:
        raise InputError("--task", f"give one task name per --data folder ({len(tasks)} names, {len(data)} folders)")
    if recipe != "multitask" and len(tasks) != 1:
        raise InputError("--task", f"recipe {recipe!r} trains one task, got {list(tasks)}")
    conf = from_mapping(RECIPE_SETTINGS[recipe], settings, f"train ({recipe})")
    device = resolve_device(conf.device)
    loaded = [_load_manifest(Path(d)) for d in data]
    model = load_model(init)
    seed = conf.seed
    heads = model.arch_config()["heads"]
    for task, (_, num_classes), d in zip(tasks, loaded, data):
        if task not in model.seg_heads:
            model.add_head(task, num_classes, generator=torch.Generator().manual_seed(seed))
        elif heads[task] != num_classes:
            raise InputError(init / "model.json", f"head {task!r} has {heads[task]} classes, {d} has {num_classes}")
    teacher_model = load_model(teacher) if teacher is not None else None
    buffer_cases, buffer_tasks = [], []
    for table, folder in buffers:
        chosen = read_parquet(table)
        buffer_cases.append((Path(folder), chosen.loc[chosen["selected"], "case"].tolist()))
        buffer_tasks.append(str(chosen["task"].iloc[0]) if "task" in chosen and len(chosen) else Path(table).stem)
    pseudo_job = None
    if pseudo is not None:
        table_path = Path(pseudo) / "pseudo.parquet"
        if not table_path.is_file():
            raise InputError(table_path, "missing: run stages.select_pseudo first")
        table = read_parquet(table_path)
        pseudo_job = (Path(pseudo), table.loc[table["kept"], "case"].astype(str).tolist())
    elif recipe == "semisupervised":
        raise InputError("--pseudo", "the semisupervised recipe needs the pseudo-label folder")
    fisher_tensors = None
    if fisher is not None:
        fisher_file = Path(fisher) / "fisher.safetensors"
        if not fisher_file.is_file():
            raise InputError(fisher_file, "missing: run stages.fisher on the previous step's model first")
        fisher_tensors = load_safetensors(fisher_file)
    model.to(device)
    job = Job(
        model,
        list(tasks),
        [Path(d) for d in data],
        [m for m, _ in loaded],
        conf,
        device,
        teacher_model,
        buffer_cases,
        pseudo_job,
        buffer_tasks,
        fisher_tensors,
    )

    input_files = [init / "model.safetensors"] + [Path(d) / "manifest.parquet" for d in data]
    input_files += [teacher / "model.safetensors"] if teacher is not None else []
    input_files += [Path(t) for t, _ in buffers]
    input_files += [Path(pseudo) / "pseudo.parquet"] if pseudo is not None else []
    input_files += [Path(fisher) / "fisher.safetensors"] if fisher is not None else []
    inputs = {str(p): sha256_file(p) for p in input_files}
    # the raw settings object, as before: the resumable state of a running job keeps its folder
    job_hash = config_hash({"recipe": recipe, "tasks": list(tasks), "settings": dict(settings), "inputs": inputs})
    plan = RECIPES[recipe](job)
    trainer = Trainer(
        plan.net,
        plan.params,
        plan.step_fn,
        TrainSettings(
            steps=conf.steps,
            lr=conf.lr,
            weight_decay=conf.weight_decay,
            warmup_steps=conf.warmup_steps,
            checkpoint_every=conf.checkpoint_every,
            val_every=conf.val_every,
            amp=conf.amp,
            device=str(device),
            seed=seed,
        ),
        work_dir=work / job_hash,
        config_hash=job_hash,
        validate_fn=plan.validate,
        name=f"{recipe}:{'+'.join(tasks)}",
    )
    result = trainer.fit()
    plan.net.load_state_dict(result.best_state)
    prov = make_provenance(
        "train",
        dict(settings),
        inputs=inputs,
        seed=seed,
        recipe=recipe,
        tasks=list(tasks),
        init_model=model_id(init),
        best_step=result.best_step,
    )
    plan.save(out, prov)
    # the log's wall-clock seconds and resume point differ between runs; the model file must not
    write_parquet(result.log, out / "train_log.parquet", {**prov, "resumed_from": result.resumed_from})


def _buffer_pair(text: str) -> tuple[Path, Path]:
    table, sep, folder = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected BUFFER_PARQUET:DATA_FOLDER, got {text!r}")
    return Path(table), Path(folder)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="finetune", help=f"one of {sorted(RECIPES)}")
    parser.add_argument("--init", type=Path, required=True, help="model folder to start from")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="preprocessed task folder(s)")
    parser.add_argument("--task", nargs="+", required=True, help="task name(s), one per --data")
    parser.add_argument("--teacher", type=Path, default=None, help="teacher model folder (retention)")
    parser.add_argument("--buffer", type=_buffer_pair, nargs="*", default=[], help="BUFFER_PARQUET:DATA_FOLDER pairs")
    parser.add_argument("--pseudo", type=Path, default=None, help="pseudo-label folder (semisupervised)")
    parser.add_argument("--fisher", type=Path, default=None, help="Fisher folder of M_{t-1} (ewc)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--work", type=Path, required=True, help="folder for resumable state")
    add_settings_argument(parser, TrainJobSettings)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    with stage_log(parser, args):
        run(
            args.recipe,
            args.init,
            args.data,
            args.task,
            args.out,
            args.work,
            args.settings,
            args.teacher,
            args.buffer,
            args.pseudo,
            args.fisher,
        )


if __name__ == "__main__":
    run_cli(main)
