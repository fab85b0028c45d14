"""Tests for stages.core.losses: hand-computed KL and MSE distillation, T² scaling, masks, gradients, retention."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss

from stages.core.errors import InputError
from stages.core.losses import (
    KD_LOSSES,
    kd_loss,
    kl_distillation,
    mse_distillation,
    retention_loss,
    segmentation_loss,
    teacher_foreground_mask,
)

SHAPES = [(2, 3, 5, 6, 7), (1, 2, 3, 4, 5)]


def _logits(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", sorted(KD_LOSSES))
def test_identical_logits_give_zero(shape, kind):
    logits = _logits(shape, 0)
    assert kd_loss(logits, logits.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_hand_computation_two_classes_two_voxels():
    # logits (B=1, C=2, 2 voxels); KL(p_t || p_s) per voxel with p = softmax(z / T), mean over voxels, * T^2
    temperature = 2.0
    teacher = torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])  # channel-major: voxel 0 (3, 0), voxel 1 (0, 0)
    student = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])  # voxel 0: (0, 0), voxel 1: (1, -1)
    expected_per_voxel = []
    for v in range(2):
        p_t = _softmax([teacher[0, c, v].item() / temperature for c in range(2)])
        p_s = _softmax([student[0, c, v].item() / temperature for c in range(2)])
        expected_per_voxel.append(sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)))
    # voxel 0 explicitly: p_t = (a/(1+a), 1/(1+a)) with a = e^(3/2), p_s = (1/2, 1/2)
    a = math.exp(1.5)
    voxel0 = a / (1 + a) * math.log(2 * a / (1 + a)) + 1 / (1 + a) * math.log(2 / (1 + a))
    assert expected_per_voxel[0] == pytest.approx(voxel0)
    expected = temperature**2 * sum(expected_per_voxel) / 2
    assert kd_loss(student, teacher, kind="kl", temperature=temperature).item() == pytest.approx(expected, rel=1e-6)
    # KL is not symmetric: swapping the roles changes the value
    assert kd_loss(teacher, student, kind="kl", temperature=temperature).item() != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_is_scaled_by_temperature_squared(temperature):
    student, teacher = _logits((1, 3, 4, 5, 3), 1), _logits((1, 3, 4, 5, 3), 2)
    unscaled = (
        torch.nn.functional.kl_div(
            torch.log_softmax(student / temperature, 1),
            torch.softmax(teacher / temperature, 1),
            reduction="none",
        )
        .sum(1)
        .mean()
    )
    assert kl_distillation(student, teacher, temperature=temperature).item() == pytest.approx(
        temperature**2 * unscaled.item(), rel=1e-5
    )


def test_kl_times_t_squared_tends_to_logit_matching_at_high_temperature():
    # Hinton et al. 2015 §2.1: for large T, KL(p_t||p_s) ≈ (1 / (2 C T²)) Σ_c (Δz_c − mean Δz)², so only the
    # T²-scaled loss has a finite, T-independent limit
    num_classes = 4
    student = _logits((2, num_classes, 3, 4, 5), 3).double()
    teacher = _logits((2, num_classes, 3, 4, 5), 4).double()
    delta = student - teacher
    centred = delta - delta.mean(dim=1, keepdim=True)
    limit = ((centred**2).sum(dim=1) / (2 * num_classes)).mean().item()
    # the next term of the expansion is O(|Δz| / T) relative to the limit
    assert kl_distillation(student, teacher, temperature=1000.0).item() == pytest.approx(limit, rel=1e-2)
    assert kl_distillation(student, teacher, temperature=4000.0).item() == pytest.approx(limit, rel=3e-3)


def test_half_precision_logits_are_computed_in_float32():
    student, teacher = _logits((1, 3, 2, 3, 4), 15), _logits((1, 3, 2, 3, 4), 16)
    for kind in sorted(KD_LOSSES):
        half = kd_loss(student.half(), teacher.half(), kind=kind)
        assert half.dtype == torch.float32
        expected = kd_loss(student.half().float(), teacher.half().float(), kind=kind)
        assert half.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_mse_mask_selects_voxels(shape):
    student, teacher = _logits(shape, 5), _logits(shape, 6)
    mask = torch.zeros((shape[0], *shape[2:]), dtype=torch.bool)
    mask[:, 1:3, :2] = True
    # outside the mask the student may be arbitrarily wrong without changing the loss
    wild = student.clone()
    wild[~mask.unsqueeze(1).expand_as(wild)] = 1e3
    expected = ((student - teacher) ** 2).permute(1, 0, 2, 3, 4)[:, mask].mean().item()
    assert mse_distillation(student, teacher, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    assert mse_distillation(wild, teacher, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    # (B, 1, *spatial) masks and float masks mean the same
    assert kd_loss(student, teacher, kind="mse", mask=mask[:, None]).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(student, teacher, kind="mse", mask=mask.float()).item() == pytest.approx(expected, rel=1e-5)
    # no mask = all voxels; empty mask = 0
    full = ((student - teacher) ** 2).mean().item()
    assert kd_loss(student, teacher, kind="mse").item() == pytest.approx(full, rel=1e-5)
    assert kd_loss(student, teacher, kind="mse", mask=torch.ones_like(mask)).item() == pytest.approx(full, rel=1e-5)
    assert kd_loss(student, teacher, kind="mse", mask=torch.zeros_like(mask)).item() == 0.0


def test_mse_known_value_and_kl_mask():
    student = torch.zeros((1, 2, 2))
    teacher = torch.tensor([[[1.0, 3.0], [-1.0, 1.0]]])  # voxel 0 differs by (1, -1), voxel 1 by (3, 1)
    assert kd_loss(student, teacher, kind="mse").item() == pytest.approx((1 + 1 + 9 + 1) / 4)
    only_first = torch.tensor([[True, False]])
    assert kd_loss(student, teacher, kind="mse", mask=only_first).item() == pytest.approx(1.0)
    per_voxel_kl = kd_loss(student[..., :1], teacher[..., :1], kind="kl").item()
    assert kd_loss(student, teacher, kind="kl", mask=only_first).item() == pytest.approx(per_voxel_kl, rel=1e-6)


@pytest.mark.parametrize("kind", sorted(KD_LOSSES))
def test_gradient_reaches_only_the_student(kind):
    student = _logits((1, 3, 3, 4, 5), 7).requires_grad_(True)
    teacher = _logits((1, 3, 3, 4, 5), 8).requires_grad_(True)
    loss = kd_loss(student, teacher, kind=kind, mask=teacher_foreground_mask(teacher))
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_empty_mask_keeps_the_graph():
    student = _logits((1, 2, 3, 3, 3), 9).requires_grad_(True)
    loss = kd_loss(student, _logits((1, 2, 3, 3, 3), 10), kind="kl", mask=torch.zeros((1, 3, 3, 3), dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_teacher_foreground_mask():
    teacher = torch.zeros((1, 3, 2, 1, 1))
    teacher[0, 0, 0] = 5.0  # voxel 0: background wins
    teacher[0, 2, 1] = 5.0  # voxel 1: class 2 wins
    assert teacher_foreground_mask(teacher).tolist() == [[[[False]], [[True]]]]


@pytest.mark.parametrize("shape", [(2, 8, 5, 6, 7), (1, 4, 3, 4, 5)])
def test_retention_loss_zero_for_equal_and_known_offset(shape):
    features = _logits(shape, 11)
    assert retention_loss(features, features.clone()).item() == 0.0
    assert retention_loss(features + 0.5, features).item() == pytest.approx(0.25, rel=1e-6)
    # several encoder levels: mean of the per-level MSEs
    levels_student = [features + 1.0, torch.zeros(2, 3) + 3.0]
    levels_frozen = [features, torch.zeros(2, 3)]
    assert retention_loss(levels_student, levels_frozen).item() == pytest.approx((1.0 + 9.0) / 2, rel=1e-6)


def test_retention_gradient_reaches_only_the_student():
    student = _logits((1, 4, 3, 3, 3), 12).requires_grad_(True)
    frozen = _logits((1, 4, 3, 3, 3), 13).requires_grad_(True)
    retention_loss(student, frozen).backward()
    assert frozen.grad is None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 2, 7, 6, 5)])
def test_segmentation_loss_prefers_the_correct_prediction(shape):
    loss_fn = segmentation_loss()
    assert isinstance(loss_fn, DiceCELoss)
    batch, num_classes, *spatial = shape
    labels = torch.randint(0, num_classes, (batch, 1, *spatial), generator=torch.Generator().manual_seed(14))
    correct = 10.0 * torch.nn.functional.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()
    wrong = torch.roll(correct, shifts=1, dims=1)  # every voxel scores a wrong class highest
    good, bad = loss_fn(correct, labels).item(), loss_fn(wrong, labels).item()
    assert good < 0.01 < bad
    assert good < loss_fn(torch.zeros(shape), labels).item() < bad


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "kwargs", "error"),
    [
        ((1, 2, 3, 4, 5), (1, 2, 3, 4, 6), {}, ValueError),
        ((1, 2), (1, 2), {}, ValueError),
        ((1, 2, 3, 4, 5), (1, 2, 3, 4, 5), {"temperature": 0.0}, ValueError),
        ((1, 2, 3, 4, 5), (1, 2, 3, 4, 5), {"mask": torch.ones(1, 3, 4)}, ValueError),
        ((1, 2, 3, 4, 5), (1, 2, 3, 4, 5), {"kind": "cosine"}, InputError),
    ],
)
def test_bad_arguments(student_shape, teacher_shape, kwargs, error):
    with pytest.raises(error):
        kd_loss(torch.zeros(student_shape), torch.zeros(teacher_shape), **kwargs)


def test_retention_bad_arguments():
    with pytest.raises(ValueError, match="level 0"):
        retention_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="number of feature levels"):
        retention_loss([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)])


def test_kd_weights_foreground_share_and_dilation():
    from stages.core.losses import kd_weights

    teacher = torch.zeros((2, 2, 9, 9, 9))
    teacher[:, 0] = 1.0  # background everywhere ...
    teacher[0, 1, 4, 4, 4] = 5.0  # ... but one foreground voxel in patch 0; patch 1 has none
    w = kd_weights(teacher, dilation=1, background_share=0.25)
    assert w.shape == (2, 9, 9, 9)
    assert torch.allclose(w.sum(dim=(1, 2, 3)), torch.ones(2))
    fg = torch.zeros((9, 9, 9), dtype=torch.bool)
    fg[3:6, 3:6, 3:6] = True  # the dilated foreground: a 3x3x3 cube
    assert w[0][fg].sum().item() == pytest.approx(0.75) and torch.allclose(w[0][fg], w[0][fg][0])
    assert w[0][~fg].sum().item() == pytest.approx(0.25)
    assert torch.allclose(w[1], torch.full((9, 9, 9), 1 / 729))  # no foreground: uniform
    # undilated: the single voxel carries 75 %
    assert kd_weights(teacher, dilation=0, background_share=0.25)[0, 4, 4, 4].item() == pytest.approx(0.75)
    # as a KD mask: a disagreement on the foreground counts far more than in a plain voxel mean
    student = teacher.clone()
    student[0, 1, 4, 4, 4] = 0.0
    plain = kd_loss(student, teacher, kind="kl")
    weighted = kd_loss(student, teacher, kind="kl", mask=w)
    assert weighted.item() > 10 * plain.item() > 0  # (0.75 / 27) / 2 against 1 / 1458: 20x
    with pytest.raises(ValueError, match="background_share"):
        kd_weights(teacher, background_share=1.5)


def test_scaled_retention_is_scale_free_and_zero_at_equal():
    from stages.core.losses import scaled_retention_loss

    f = [_logits((2, 4, 5, 5, 5), 21), 1e-3 * _logits((2, 8, 3, 3, 3), 22)]
    total, levels = scaled_retention_loss([x.clone() for x in f], f)
    assert total.item() == 0.0 and len(levels) == 2
    # moving each level by 0.5 of its own per-channel RMS gives 0.25 on each, whatever the raw scale
    sigma = [x.pow(2).mean(dim=(0, 2, 3, 4), keepdim=True).sqrt() for x in f]
    moved = [x + 0.5 * s for x, s in zip(f, sigma)]
    total, levels = scaled_retention_loss(moved, f)
    assert [v.item() for v in levels] == pytest.approx([0.25, 0.25], rel=1e-5)
    # the unscaled MSE of the small level is ~1e-7: the size of the pipeline's old retention term
    assert retention_loss(moved[1], f[1]).item() < 1e-6
    student = f[0].clone().requires_grad_(True)
    scaled_retention_loss([student], [f[0] + 1.0])[0].backward()
    assert student.grad.abs().sum() > 0


def test_term_gradient_norms():
    from stages.core.losses import term_gradient_norms

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    v = torch.nn.Parameter(torch.tensor([3.0]))
    terms = {"a": (w**2).sum(), "b": 3 * v.sum(), "c": torch.tensor(1.0)}
    norms = term_gradient_norms(terms, [w, v])
    assert norms["a"] == pytest.approx((4 + 16) ** 0.5) and norms["b"] == pytest.approx(3.0) and norms["c"] == 0.0
    assert w.grad is None  # .grad untouched
