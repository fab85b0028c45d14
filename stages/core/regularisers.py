"""The continual-learning regularisers of the sequential baselines: online EWC and LwF.

- **Online EWC** (Kirkpatrick et al., PNAS 2017; the online form of Schwarz et al., ICML 2018, "Progress
  & Compress"): after task t the diagonal empirical Fisher F of the model M_t on task t's training
  patches is estimated and accumulated, ``F_t = gamma * F_{t-1} + F(M_t)``; training task t + 1 adds
  ``lambda / 2 * sum_i F_t,i (theta_i - theta*_i)^2`` with theta* = M_t.
- **LwF** (Li & Hoiem, ECCV 2016): while training task t, the outputs of the earlier tasks' heads on
  the *new* task's patches are kept close to those of the previous model M_{t-1}, with a temperature-
  softened KL (the distillation loss of :mod:`stages.core.losses`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from stages.core.errors import InputError
from stages.core.losses import kd_loss

__all__ = ["diagonal_fisher", "accumulate_fisher", "ewc_penalty", "lwf_loss"]


def diagonal_fisher(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    loss_of_patch: Callable[[int], torch.Tensor],
    n_patches: int,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher: the mean over patches of each parameter's squared loss gradient.

    One patch per backward pass, so it is the mean of *per-sample* squared gradients (a batch's
    gradient squared would underestimate it by the batch size).

    Args:
        named_params: the parameters to estimate it for (name, tensor).
        loss_of_patch: the loss of patch ``i`` (a scalar with a graph to the parameters).
        n_patches: how many patches to average over.
    """
    params = [(n, p) for n, p in named_params]
    if n_patches < 1:
        raise InputError("ewc.fisher_batches", f"need at least one patch, got {n_patches}")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    tensors = [p for _, p in params]
    for i in range(n_patches):
        grads = torch.autograd.grad(loss_of_patch(i), tensors, allow_unused=True)
        for (name, _), g in zip(params, grads):
            if g is not None:
                fisher[name] += g.detach().float().pow(2)
    return {n: f / n_patches for n, f in fisher.items()}


def accumulate_fisher(
    new: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor] | None, gamma: float
) -> dict[str, torch.Tensor]:
    """Online EWC's running Fisher ``gamma * F_previous + F_new`` (a parameter absent before counts 0)."""
    if previous is None:
        return {n: f.clone() for n, f in new.items()}
    return {n: f + gamma * previous[n].to(f) if n in previous else f.clone() for n, f in new.items()}


def ewc_penalty(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """``1/2 * sum_i F_i (theta_i - theta*_i)^2`` over the parameters named in ``fisher`` (lambda applied by
    the caller). Parameters without a Fisher entry (a new task's head) are free."""
    total: torch.Tensor | None = None
    for name, p in named_params:
        if name not in fisher:
            continue
        term = (fisher[name] * (p.float() - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise InputError("--fisher", "names none of the trained model's parameters")
    return 0.5 * total


def lwf_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(old || new) of the temperature-softened class distributions, times T^2 (Hinton et al. 2015)."""
    return kd_loss(new_logits, old_logits, kind="kl", temperature=temperature)
