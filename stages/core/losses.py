"""The training losses: Dice + cross-entropy segmentation, knowledge distillation (KL or MSE) and feature retention.

MedSeqFT's retention stage (methods.md §1, K&G RFT) trains LoRA + the task head with
``L = L_seg + λ_k · L_KD(student, teacher) + λ_g · L_ret(student, frozen M_{t-1})``; every term is here.
The distillation loss is picked by name from the config through :data:`KD_LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from stages.core.errors import InputError

__all__ = [
    "KD_LOSSES",
    "KDLoss",
    "kd_loss",
    "kd_weights",
    "kl_distillation",
    "mse_distillation",
    "retention_loss",
    "scaled_retention_loss",
    "segmentation_loss",
    "teacher_foreground_mask",
    "term_gradient_norms",
]

KDLoss = Callable[..., torch.Tensor]
"""Signature of a distillation loss: ``(student_logits, teacher_logits, *, temperature, mask) -> scalar``."""


def segmentation_loss(
    *,
    include_background: bool = True,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    batch: bool = False,
) -> DiceCELoss:
    """MONAI ``DiceCELoss`` on raw logits (softmax inside) against integer labels (one-hot inside).

    The settings are those of MONAI's SwinUNETR/UNETR training recipes (BTCV), which methods.md §0
    follows: soft Dice with ``smooth_nr = smooth_dr = 1e-5`` plus cross-entropy, summed with weights 1.
    ``include_background=True`` (MONAI's default, as in those recipes): with a softmax the background
    channel is part of the prediction anyway, and keeping its Dice term stabilises patches that hold no
    foreground (a foreground-only Dice is ill-defined there, since its denominator is only the smoothing).

    Args:
        include_background: include channel 0 in the Dice term (cross-entropy always covers all classes).
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        batch: compute Dice over the whole batch instead of per sample (nnU-Net's "batch Dice").

    Returns:
        A module called as ``loss(logits, labels)`` with logits (B, C, *spatial) and labels
        (B, 1, *spatial) holding class indices 0..C-1.
    """
    return DiceCELoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        squared_pred=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=batch,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
    )


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Promote half precision (AMP) to float32 for the loss arithmetic; keep float64 as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, C, *spatial)"
        )
    if student_logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(student_logits.shape)}")


def _masked_voxel_mean(per_voxel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a (B, *spatial) map over the voxels in ``mask`` (bool, or float weights); 0 if none are."""
    if mask is None:
        return per_voxel.mean()
    if mask.ndim == per_voxel.ndim + 1 and mask.shape[1] == 1:
        mask = mask[:, 0]  # accept (B, 1, *spatial), the layout of label tensors
    if mask.shape != per_voxel.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must be (B, *spatial) or (B, 1, *spatial) "
            f"for per-voxel values of shape {tuple(per_voxel.shape)}"
        )
    weights = mask.to(per_voxel.dtype).detach()
    total = weights.sum()
    # an empty mask (a patch with no teacher foreground) gives 0/1 = 0 and keeps the graph, with no
    # host sync on the GPU
    return (per_voxel * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


def kl_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Voxel-wise KL(teacher ‖ student) of temperature-softened softmaxes, times T² (Hinton et al. 2015).

    ``T² · mean_v Σ_c p_t(c|v) · (log p_t(c|v) − log p_s(c|v))`` with ``p = softmax(z / T)`` over the
    class dimension. The T² factor keeps the gradient's size independent of T (Hinton, Vinyals & Dean,
    "Distilling the Knowledge in a Neural Network", arXiv 1503.02531, §2). The teacher is detached, so
    gradients reach only the student. Half-precision inputs are computed in float32 (safe under AMP).

    Args:
        student_logits: (B, C, *spatial) raw scores of the student.
        teacher_logits: same shape, raw scores of the teacher.
        temperature: softening temperature T > 0.
        mask: optional (B, *spatial) or (B, 1, *spatial) voxels to average over (bool or float weights);
            ``None`` averages over all voxels.
    """
    _check_logits(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(_at_least_float32(teacher_logits.detach()) / temperature, dim=1)
    per_voxel = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
    return temperature**2 * _masked_voxel_mean(per_voxel, mask)


def mse_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared difference of raw logits over the masked voxels and all classes (logit matching).

    Logit matching is the high-temperature limit of KL distillation for zero-mean logits (Hinton et al.
    2015, §2.1); the mask restricts it, e.g. to the teacher's predicted foreground
    (:func:`teacher_foreground_mask`). The teacher is detached, so gradients reach only the student.

    Args:
        student_logits: (B, C, *spatial) raw scores of the student.
        teacher_logits: same shape, raw scores of the teacher.
        temperature: unused; accepted so every entry of :data:`KD_LOSSES` has the same signature.
        mask: optional (B, *spatial) or (B, 1, *spatial) voxels to include (bool or float weights);
            ``None`` includes all voxels. An empty mask gives 0.
    """
    del temperature
    _check_logits(student_logits, teacher_logits)
    squared = (_at_least_float32(student_logits) - _at_least_float32(teacher_logits.detach())) ** 2
    return _masked_voxel_mean(squared.mean(dim=1), mask)


KD_LOSSES: dict[str, KDLoss] = {"kl": kl_distillation, "mse": mse_distillation}
"""Distillation losses by config name (methods.md §1: ``kl`` default, ``mse`` the alternative)."""


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "kl",
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation loss named ``kind`` in :data:`KD_LOSSES`.

    Args:
        student_logits: (B, C, *spatial) raw scores of the student.
        teacher_logits: same shape, raw scores of the teacher (detached inside).
        kind: ``"kl"`` (:func:`kl_distillation`) or ``"mse"`` (:func:`mse_distillation`).
        temperature: softening temperature for ``"kl"``.
        mask: optional voxels to include, (B, *spatial) or (B, 1, *spatial).

    Raises:
        InputError: ``kind`` is not a registered loss.
    """
    if kind not in KD_LOSSES:
        raise InputError("kd_kind", f"unknown distillation loss {kind!r}; choose one of {sorted(KD_LOSSES)}")
    return KD_LOSSES[kind](student_logits, teacher_logits, temperature=temperature, mask=mask)


def teacher_foreground_mask(teacher_logits: torch.Tensor) -> torch.Tensor:
    """(B, *spatial) bool mask of the voxels the teacher labels as any class other than background 0.

    Args:
        teacher_logits: (B, C, *spatial) raw scores of the teacher.
    """
    if teacher_logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(teacher_logits.shape)}")
    return teacher_logits.detach().argmax(dim=1) != 0


def retention_loss(
    student_features: torch.Tensor | Sequence[torch.Tensor],
    frozen_features: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """MSE between the student's encoder features and the frozen previous model's, on buffer cases.

    MedSeqFT's retention term (methods.md §1, K&G RFT): it pulls the LoRA student's representation of
    the buffered, pre-training-like cases towards that of the frozen M_{t-1}, keeping its general
    knowledge. The frozen features are detached, so gradients reach only the student.

    Args:
        student_features: one feature tensor, or one per encoder level (e.g. the skip connections).
        frozen_features: the frozen model's features, same structure and shapes.

    Returns:
        Mean-squared difference; with several levels, the mean of the per-level MSEs (so each level
        weighs the same regardless of its size).
    """
    student = [student_features] if isinstance(student_features, torch.Tensor) else list(student_features)
    frozen = [frozen_features] if isinstance(frozen_features, torch.Tensor) else list(frozen_features)
    if not student or len(student) != len(frozen):
        raise ValueError(f"need the same non-zero number of feature levels, got {len(student)} and {len(frozen)}")
    terms = []
    for level, (s, f) in enumerate(zip(student, frozen, strict=True)):
        if s.shape != f.shape:
            raise ValueError(f"feature level {level}: student {tuple(s.shape)} != frozen {tuple(f.shape)}")
        terms.append(F.mse_loss(_at_least_float32(s), _at_least_float32(f.detach())))
    return torch.stack(terms).mean()


def kd_weights(teacher_logits: torch.Tensor, dilation: int = 2, background_share: float = 0.2) -> torch.Tensor:
    """Per-voxel KD weights (B, *spatial): the teacher's dilated foreground, plus a share of background.

    In each patch the voxels within ``dilation`` voxels (a cube, max-pooling) of the teacher's predicted
    foreground share ``1 − background_share`` of the weight equally, the other voxels ``background_share``;
    a patch with no teacher foreground (or no background) spreads its weight uniformly. Each patch's
    weights sum to 1, so every patch counts the same in :func:`_masked_voxel_mean`. A plain voxel mean
    is dominated by background on small structures (hippocampus: ~1 % of a 32³ patch), where
    student and teacher already agree; this puts the distillation where they differ (ours, methods.md §1).

    Args:
        teacher_logits: (B, C, *spatial) raw scores of the teacher.
        dilation: foreground dilation radius in voxels (0 = none).
        background_share: fraction of each patch's weight on the background, in [0, 1].
    """
    if not 0.0 <= background_share <= 1.0:
        raise ValueError(f"background_share must be in [0, 1], got {background_share}")
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    fg = teacher_foreground_mask(teacher_logits).to(torch.float32)
    if dilation > 0:
        pool = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[teacher_logits.ndim]
        fg = pool(fg[:, None], kernel_size=2 * dilation + 1, stride=1, padding=dilation)[:, 0]
    dims = tuple(range(1, fg.ndim))
    n_fg = fg.sum(dim=dims, keepdim=True)
    n_bg = (1.0 - fg).sum(dim=dims, keepdim=True)
    mixed = (n_fg > 0) & (n_bg > 0)
    w_fg = torch.where(mixed, (1.0 - background_share) / n_fg.clamp_min(1.0), 1.0 / fg[0].numel())
    w_bg = torch.where(mixed, background_share / n_bg.clamp_min(1.0), 1.0 / fg[0].numel())
    return fg * w_fg + (1.0 - fg) * w_bg


def scaled_retention_loss(
    student_features: Sequence[torch.Tensor],
    frozen_features: Sequence[torch.Tensor],
    eps: float = 1e-6,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scale-free feature retention: per level, the MSE of ``(student − frozen) / ρ_c(frozen)``.

    ``ρ_c`` is the frozen features' root-mean-square of channel c over the batch and voxels (detached;
    floored at a tenth of the level's mean ρ, so a near-silent channel cannot dominate). Each level's
    term is then the squared change relative to that channel's own magnitude (1 ≈ the features moved by
    as much as they are large), whatever the level's raw scale, and levels are averaged with equal
    weight (ours, methods.md §1). The RMS rather than the standard deviation: the deepest map of a
    U-Net on small patches (BasicUNet on 32³: 2×2×2 voxels) is nearly constant per channel (hippocampus
    M0: σ ≈ 0.14 against an RMS of 0.8), and dividing by σ turned an ordinary change into a term of ~10³.

    Args:
        student_features: one (B, C_l, *spatial_l) tensor per level.
        frozen_features: the frozen model's, same shapes.
        eps: absolute floor of ρ_c.

    Returns:
        (mean over levels, the per-level terms).
    """
    student, frozen = list(student_features), list(frozen_features)
    if not student or len(student) != len(frozen):
        raise ValueError(f"need the same non-zero number of feature levels, got {len(student)} and {len(frozen)}")
    levels = []
    for level, (s, f) in enumerate(zip(student, frozen, strict=True)):
        if s.shape != f.shape:
            raise ValueError(f"feature level {level}: student {tuple(s.shape)} != frozen {tuple(f.shape)}")
        f = _at_least_float32(f.detach())
        dims = [d for d in range(f.ndim) if d != 1] if f.ndim > 1 else [0]
        rho = f.pow(2).mean(dim=dims, keepdim=True).sqrt()
        rho = torch.maximum(rho, (0.1 * rho.mean()).clamp_min(eps))
        levels.append((((_at_least_float32(s) - f) / rho) ** 2).mean())
    return torch.stack(levels).mean(), levels


def term_gradient_norms(terms: dict[str, torch.Tensor], params: Sequence[torch.nn.Parameter]) -> dict[str, float]:
    """L2 norm of each (weighted) loss term's gradient w.r.t. ``params``, without touching ``.grad``.

    One extra backward pass per term (``retain_graph``), so call it on logging steps only. A term
    whose graph does not reach ``params`` has norm 0.

    Args:
        terms: ``{name: scalar tensor with a graph}``.
        params: the trainable parameters.
    """
    out = {}
    for name, value in terms.items():
        if not value.requires_grad:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(value, list(params), retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        out[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return out
