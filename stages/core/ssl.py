"""SSL views and losses of M0, the batched SSL-loss scorer, pooled features, and the Mahalanobis fallback.

The SSL objective follows SwinUNETR's self-supervised pre-training (Tang et al., "Self-Supervised
Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022): masked-volume inpainting
(L1 on the masked voxels) plus rotation prediction (cross-entropy over 4 rotations) [+ an optional
contrastive term]. MDS (MedSeqFT) and DKD (ASSFT) score a case by this loss averaged over R stochastic
views, ``s(x) = (1/R) sum_r L_SSL(M0; aug_r(x))`` (``methods.md`` §1); without SSL heads they use the
Mahalanobis distance of the pooled encoder feature to M0's feature statistics instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.core.nets import FoundationNet, seed_from

__all__ = [
    "ROTATION_AXES",
    "SCORE_COLUMNS",
    "case_generator",
    "case_view_losses",
    "feature_stats",
    "mahalanobis",
    "make_views",
    "pass_statistics",
    "pooled_case_feature",
    "score_case",
    "score_cases",
    "split_half_reliability",
    "ssl_loss",
]

#: The plane of the rotation pretext task: rot90 over the first two spatial axes of (C, X, Y, Z).
ROTATION_AXES = (-3, -2)


def _patch3(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    p = (int(patch_size),) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(int(s) for s in patch_size)
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
    return p


def _pad_to(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad (C, X, Y, Z) at the far end of each axis up to at least ``shape``."""
    pads: list[int] = []
    for size, want in zip(reversed(volume.shape[1:]), reversed(list(shape))):
        pads += [0, max(0, int(want) - int(size))]
    return F.pad(volume, pads) if any(pads) else volume


def make_views(
    volume: torch.Tensor | np.ndarray,
    n: int,
    patch_size: int | Sequence[int],
    mask_ratio: float,
    mask_patch: int,
    generator: torch.Generator,
    mask_fill: str = "zero",
    pairs: bool = False,
) -> dict[str, torch.Tensor]:
    """Build ``n`` random SSL views of one volume (Tang et al. 2022: crop, rotate, mask).

    Each view: a random crop of ``patch_size`` (the volume is zero-padded at the far end of an axis
    shorter than the patch), a rotation by k * 90 degrees in the plane :data:`ROTATION_AXES`, k uniform in
    0..3, and a mask of cubes of side ``mask_patch`` on the grid of the patch: ``round(mask_ratio * cells)``
    grid cells are chosen uniformly without replacement, so the masked fraction is ``mask_ratio`` up to
    the rounding of the cell count and the clipping of edge cells. Masked voxels are set to 0 (the
    mean intensity after z-score preprocessing) or, with ``mask_fill="noise"``, to standard normal noise.
    All randomness comes from ``generator``, drawn in a fixed order, so the views depend only on it.

    Args:
        volume: (C, X, Y, Z) float tensor or array.
        n: number of views.
        patch_size: crop size (X, Y, Z); X and Y must be equal (the rotation plane).
        mask_ratio: fraction of the patch to mask, in [0, 1].
        mask_patch: side of the masked cubes in voxels.
        generator: the only source of randomness (CPU generator).
        mask_fill: "zero" or "noise".
        pairs: views i and i + n/2 share their crop (own rotation and mask): the positive pairs of the
            contrastive term; ``n`` must be even.

    Returns:
        ``inputs`` (n, C, *P) masked and rotated; ``target`` (n, C, *P) rotated, unmasked; ``mask``
        (n, 1, *P) bool, True where hidden; ``valid`` (n, 1, *P) bool, True on real voxels (False on the
        zero padding, rotated with the crop); ``rotation`` (n,) long, k; ``origin`` (n, 3) long, crop corner.
    """
    if isinstance(volume, np.ndarray):
        volume = torch.as_tensor(np.require(volume, np.float32, ["W"]))
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {tuple(volume.shape)}")
    p = _patch3(patch_size)
    if p[0] != p[1]:
        raise ValueError(f"patch_size x and y must be equal (rotation plane), got {p}")
    if n < 1 or (pairs and n % 2):
        raise ValueError(f"n must be >= 1 (and even with pairs), got {n}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if mask_patch < 1:
        raise ValueError(f"mask_patch must be >= 1, got {mask_patch}")
    if mask_fill not in ("zero", "noise"):
        raise ValueError(f"mask_fill must be 'zero' or 'noise', got {mask_fill!r}")
    source = volume.detach().to("cpu", torch.float32)
    vol = _pad_to(source, p)
    real = _pad_to(torch.ones((1, *source.shape[1:]), dtype=torch.bool), p)
    spatial = vol.shape[1:]
    # Random draws in a fixed order: crop corners, rotations, mask cells, fill noise.
    n_crops = n // 2 if pairs else n
    origin = torch.stack(
        [torch.randint(0, spatial[a] - p[a] + 1, (n_crops,), generator=generator) for a in range(3)], dim=1
    )
    if pairs:
        origin = origin.repeat(2, 1)
    rotation = torch.randint(0, 4, (n,), generator=generator)
    cells = tuple(-(-s // mask_patch) for s in p)
    n_cells = cells[0] * cells[1] * cells[2]
    n_masked = int(round(mask_ratio * n_cells))
    order = torch.rand((n, n_cells), generator=generator).argsort(dim=1)
    cell_mask = torch.zeros((n, n_cells), dtype=torch.bool)
    cell_mask.scatter_(1, order[:, :n_masked], True)
    mask = cell_mask.view(n, 1, *cells)
    for axis in range(3):
        mask = mask.repeat_interleave(mask_patch, dim=2 + axis)
    mask = mask[:, :, : p[0], : p[1], : p[2]].contiguous()
    noise = torch.randn((n, vol.shape[0], *p), generator=generator) if mask_fill == "noise" else None

    def crop_and_rotate(t: torch.Tensor) -> torch.Tensor:
        crops = torch.stack([t[:, o[0] : o[0] + p[0], o[1] : o[1] + p[1], o[2] : o[2] + p[2]] for o in origin.tolist()])
        out = torch.empty_like(crops)
        for k in range(4):
            sel = rotation == k
            if sel.any():
                out[sel] = torch.rot90(crops[sel], k, dims=ROTATION_AXES)
        return out

    target = crop_and_rotate(vol)
    valid = crop_and_rotate(real)
    fill = noise if noise is not None else torch.zeros_like(target)
    inputs = torch.where(mask, fill, target)
    return {"inputs": inputs, "target": target, "mask": mask, "valid": valid, "rotation": rotation, "origin": origin}


def _nt_xent(z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Per-sample NT-Xent (SimCLR, Chen et al. 2020); sample i's positive is i + n/2 (mod n)."""
    n = z.shape[0]
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(sim, positive, reduction="none")


def ssl_loss(
    model: FoundationNet,
    views: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
    reduction: str = "none",
) -> dict[str, torch.Tensor]:
    """The SSL loss terms of ``views`` under ``model`` (Tang et al. 2022).

    ``inpaint``: mean absolute error over the masked *real* voxels (all channels) of each view: with a
    ``valid`` entry in ``views`` the zero padding of a volume smaller than the crop is left out of both
    the sum and the count (a padded slab is trivially "reconstructed" as 0 and would make a small
    volume look familiar); a view with no masked real voxel scores 0 on this term;
    ``rotation``: cross-entropy of the 4-way rotation logits; ``contrastive`` (only with a non-zero
    weight and a contrastive head): NT-Xent where view i and view i + n/2 are the positive pair (two
    augmentations of the same crop; pass such pairs for pre-training). A contrastive term depends on
    the other samples of the batch, so it is never part of a per-case score.
    ``loss`` = the weighted sum of the terms present.

    Args:
        model: the network with SSL heads.
        views: from :func:`make_views` (tensors are moved to the model's device).
        weights: term weights; None takes ``model.ssl_config["weights"]``.
        reduction: "none" (tensors of shape (n,)) or "mean" (scalars).
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    w = dict(model.ssl_config["weights"] if weights is None else weights)
    device = next(model.parameters()).device
    inputs = views["inputs"].to(device)
    out = model.ssl_forward(inputs)
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros(inputs.shape[0], device=device)
    if w.get("inpaint", 0.0) > 0:
        if "reconstruction" not in out:
            raise ValueError("inpainting weight > 0 but the model has no reconstruction head")
        hidden = views["mask"].to(device)
        if "valid" in views:
            hidden = hidden & views["valid"].to(device)
        mask = hidden.to(out["reconstruction"].dtype)
        err = (out["reconstruction"] - views["target"].to(device)).abs() * mask
        denom = (mask.flatten(1).sum(1) * inputs.shape[1]).clamp_min(1.0)
        terms["inpaint"] = err.flatten(1).sum(1) / denom
        total = total + w["inpaint"] * terms["inpaint"]
    if w.get("rotation", 0.0) > 0:
        if "rotation" not in out:
            raise ValueError("rotation weight > 0 but the model has no rotation head")
        terms["rotation"] = F.cross_entropy(out["rotation"], views["rotation"].to(device), reduction="none")
        total = total + w["rotation"] * terms["rotation"]
    if w.get("contrastive", 0.0) > 0 and "contrastive" in out:
        if inputs.shape[0] % 2:
            raise ValueError("the contrastive term needs an even number of views (pairs i, i + n/2)")
        terms["contrastive"] = _nt_xent(out["contrastive"])
        total = total + w["contrastive"] * terms["contrastive"]
    terms["loss"] = total
    if reduction == "mean":
        terms = {k: v.mean() for k, v in terms.items()}
    return terms


def case_generator(seed: int, case_id: str) -> torch.Generator:
    """A CPU generator seeded from (seed, case id) alone, so a case's views ignore the other cases."""
    return torch.Generator().manual_seed(seed_from("ssl_views", seed, case_id))


def _scoring_weights(model: FoundationNet) -> dict[str, float]:
    w = dict(model.ssl_config["weights"])
    w["contrastive"] = 0.0  # batch-dependent: not a per-case quantity
    return w


@torch.no_grad()
def case_view_losses(
    model: FoundationNet,
    volume: torch.Tensor | np.ndarray,
    R: int,
    patch_size: int | Sequence[int],
    mask_ratio: float,
    mask_patch: int,
    seed: int,
    case_id: str,
    batch: int = 8,
    mask_fill: str = "zero",
) -> np.ndarray:
    """The SSL loss of each of the ``R`` random views of one case, float64 (R,), in view order.

    The R views are built at once from :func:`case_generator` and run in chunks of ``batch`` in eval
    mode; the per-view losses do not depend on the chunking (eval mode, per-sample normalisation).
    Arguments as in :func:`score_case`.
    """
    if R < 1 or batch < 1:
        raise ValueError(f"R and batch must be >= 1, got R={R}, batch={batch}")
    vol = torch.as_tensor(np.require(volume, np.float32, ["W"])) if isinstance(volume, np.ndarray) else volume
    views = make_views(vol, R, patch_size, mask_ratio, mask_patch, case_generator(seed, case_id), mask_fill)
    return _view_losses(model, views, batch)


def score_case(
    model: FoundationNet,
    volume: torch.Tensor | np.ndarray,
    R: int,
    patch_size: int | Sequence[int],
    mask_ratio: float,
    mask_patch: int,
    seed: int,
    case_id: str,
    batch: int = 8,
    mask_fill: str = "zero",
) -> tuple[float, float]:
    """MDS / DKD knowledge score of one case: the SSL loss averaged over ``R`` random views.

    ``s(x) = (1/R) sum_r L_SSL(M0; aug_r(x))`` (MedSeqFT, ``methods.md`` §1) with the inpainting and
    rotation terms weighted as in ``model.ssl_config`` (the contrastive term is left out; the
    inpainting term counts only masked real voxels, never the zero padding of a volume smaller than
    the crop). The views come from :func:`case_view_losses`.

    Args:
        model: M0 with SSL heads.
        volume: (C, X, Y, Z) preprocessed image.
        R: number of stochastic passes.
        patch_size, mask_ratio, mask_patch, mask_fill: view settings (see :func:`make_views`).
        seed: the run's seed; with ``case_id`` it fixes the views.
        case_id: the case's name.
        batch: views per forward pass.

    Returns:
        (mean, std) of the per-view loss; std with Bessel's correction (0 for R = 1).
    """
    losses = case_view_losses(model, volume, R, patch_size, mask_ratio, mask_patch, seed, case_id, batch, mask_fill)
    std = float(losses.std(ddof=1)) if R > 1 else 0.0
    return float(losses.mean()), std


def _view_losses(model: FoundationNet, views: Mapping[str, torch.Tensor], batch: int) -> np.ndarray:
    was_training = model.training
    model.eval()
    weights = _scoring_weights(model)
    try:
        n = views["inputs"].shape[0]
        parts = []
        for start in range(0, n, batch):
            chunk = {k: v[start : start + batch] for k, v in views.items()}
            parts.append(ssl_loss(model, chunk, weights=weights)["loss"].double().cpu())
        return torch.cat(parts).numpy()
    finally:
        model.train(was_training)


def pass_statistics(losses: np.ndarray) -> dict[str, float]:
    """Summary of one case's per-view losses: ``mean``, ``std`` (ddof 1; 0 for R = 1), ``sem`` (std / sqrt(R);
    NaN for R = 1) and the two split-half means ``half_a`` (views 0, 2, 4, ...) and ``half_b`` (views
    1, 3, 5, ...; NaN for R = 1). The views are i.i.d., so the interleaved halves are two independent
    estimates of the same score; their agreement over cases is :func:`split_half_reliability`."""
    losses = np.asarray(losses, dtype=np.float64)
    r = losses.size
    std = float(losses.std(ddof=1)) if r > 1 else 0.0
    return {
        "mean": float(losses.mean()),
        "std": std,
        "sem": std / float(np.sqrt(r)) if r > 1 else float("nan"),
        "half_a": float(losses[0::2].mean()),
        "half_b": float(losses[1::2].mean()) if r > 1 else float("nan"),
    }


def split_half_reliability(half_a: np.ndarray, half_b: np.ndarray) -> dict[str, float]:
    """How reproducible the per-case scores are: the correlation over cases of the two half-pass means.

    ``pearson`` and ``spearman`` are the raw half-vs-half correlations; ``reliability`` is the
    Spearman-Brown prediction for the full R, ``2 r / (1 + r)``, from the *Spearman* r, because MDS and
    DKD use only the ranks (on real data a few high-loss cases make the Pearson r look far better than
    the order of the bulk is: MSD Hippocampus, R = 8, Pearson 0.85 vs Spearman 0.13). All NaN with
    fewer than 3 cases or a constant half.
    """
    a = np.asarray(half_a, dtype=np.float64)
    b = np.asarray(half_b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    nan = {"pearson": float("nan"), "spearman": float("nan"), "reliability": float("nan")}
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return nan
    from scipy.stats import rankdata

    pearson = float(np.corrcoef(a, b)[0, 1])
    spearman = float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])
    reliability = 2.0 * spearman / (1.0 + spearman) if spearman > -1.0 else float("nan")
    return {"pearson": pearson, "spearman": spearman, "reliability": reliability}


#: Columns of :func:`score_cases` (and, with ``split``, of ``ssl.parquet``).
SCORE_COLUMNS = ["case", "mean", "std", "sem", "half_a", "half_b", "split_half_r", "R", "scorer"]


def score_cases(
    model: FoundationNet,
    volumes: Iterable[tuple[str, torch.Tensor | np.ndarray]],
    R: int,
    patch_size: int | Sequence[int],
    mask_ratio: float,
    mask_patch: int,
    seed: int,
    batch: int = 8,
    mask_fill: str = "zero",
) -> Any:
    """Score each ``(case_id, volume)``: a DataFrame with :data:`SCORE_COLUMNS`, ``scorer="ssl"``.

    Per case (:func:`pass_statistics`): mean, std and standard error of the R view losses and the two
    split-half means; ``split_half_r`` is the Spearman-Brown split-half rank reliability over all the cases
    scored (:func:`split_half_reliability`), the same value on every row. The full
    :func:`split_half_reliability` is in ``DataFrame.attrs["reliability"]``.
    """
    import pandas as pd
    from tqdm import tqdm

    rows = []
    for case_id, volume in tqdm(volumes, desc="ssl scoring", unit="case"):
        losses = case_view_losses(model, volume, R, patch_size, mask_ratio, mask_patch, seed, case_id, batch, mask_fill)
        rows.append({"case": str(case_id), **pass_statistics(losses), "R": int(R), "scorer": "ssl"})
    table = pd.DataFrame(rows, columns=[c for c in SCORE_COLUMNS if c != "split_half_r"])
    reliability = split_half_reliability(table["half_a"].to_numpy(), table["half_b"].to_numpy())
    table.insert(SCORE_COLUMNS.index("split_half_r"), "split_half_r", reliability["reliability"])
    table.attrs["reliability"] = reliability
    return table


#: Default bound on the windows :func:`pooled_case_feature` pools per case (feature statistics, features).
FEATURE_WINDOWS = 16


@torch.no_grad()
def pooled_case_feature(
    model: FoundationNet,
    volume: torch.Tensor | np.ndarray,
    patch_size: int | Sequence[int],
    batch: int = 8,
    device: torch.device | str | None = None,
    max_windows: int | None = FEATURE_WINDOWS,
) -> np.ndarray:
    """One feature vector per case: pooled deepest encoder features over the whole volume, at bounded cost.

    Policy (ours): zero-pad the volume at the far end of each axis to a multiple of the patch, tile it
    with non-overlapping patch-size windows, take each window's global-average-pooled deepest features
    (:meth:`FoundationNet.pooled_features`, eval mode, ``batch`` windows at a time), and average the
    windows weighted by their fraction of real (unpadded) voxels, so padding-dominated edge windows
    count less. A volume with more than ``max_windows`` windows keeps only the ``max_windows`` windows
    with the largest intensity standard deviation (the ones that hold anatomy rather than background;
    ties by raster order), so the cost per case is bounded whatever the volume's size (a 190 x 140 x 88
    volume has 90 windows of 32^3). Deterministic: no randomness.

    Args:
        model: the network.
        volume: (C, X, Y, Z) preprocessed image.
        patch_size: window size (the network's training patch).
        batch: windows per forward pass.
        device: where the windows go (default: the model's device; the model is not moved).
        max_windows: at most this many windows per case (None: every window).

    Returns:
        float32 array of shape (feature_dim,).
    """
    p = _patch3(patch_size)
    vol = torch.as_tensor(np.require(volume, np.float32, ["W"])) if isinstance(volume, np.ndarray) else volume
    if vol.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {tuple(vol.shape)}")
    vol = vol.detach().to("cpu", torch.float32)
    real = torch.ones((1, *vol.shape[1:]))
    target = [-(-s // q) * q for s, q in zip(vol.shape[1:], p)]
    vol, real = _pad_to(vol, target), _pad_to(real, target)
    grid = [t // q for t, q in zip(target, p)]

    def tiles(t: torch.Tensor) -> torch.Tensor:
        c = t.shape[0]
        t = t.view(c, grid[0], p[0], grid[1], p[1], grid[2], p[2]).permute(1, 3, 5, 0, 2, 4, 6)
        return t.reshape(-1, c, *p)

    windows, weight = tiles(vol), tiles(real).flatten(1).mean(1).double()
    if max_windows is not None and len(windows) > max_windows:
        spread = windows.flatten(1).std(1)
        # stable descending sort: equal spreads keep raster order, so the choice is deterministic
        keep = torch.sort(torch.argsort(-spread, stable=True)[: int(max_windows)]).values
        windows, weight = windows[keep], weight[keep]
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        feats = torch.cat(
            [
                model.pooled_features(windows[i : i + batch].to(device)).double().cpu()
                for i in range(0, len(windows), batch)
            ]
        )
    finally:
        model.train(was_training)
    pooled = (feats * weight[:, None]).sum(0) / weight.sum()
    return pooled.numpy().astype(np.float32)


def feature_stats(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and shrinkage covariance of pooled features (N, F), for the Mahalanobis fallback.

    The covariance is shrunk toward its diagonal with the analytic intensity of Schäfer & Strimmer
    (2005, "target D": keep the variances, shrink the correlations toward 0):
    ``lambda = sum_{i!=j} Var(r_ij) / sum_{i!=j} r_ij^2`` clipped to [0, 1], which is large when N < F
    (a sample covariance that would be singular) and goes to 0 as N grows. A ridge of 1e-6 times the
    mean variance (plus 1e-12) keeps constant features invertible.

    Args:
        features: (N, F), N >= 2.

    Returns:
        ``mean`` (F,), ``cov`` (F, F), float64; ``shrinkage`` (0-d array, lambda).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got shape {x.shape}")
    n = x.shape[0]
    mean = x.mean(0)
    xc = x - mean
    sd = xc.std(0, ddof=1)
    safe = np.where(sd > 0, sd, 1.0)
    z = xc / safe  # standardised; constant features stay 0
    w_bar = z.T @ z / n
    corr = w_bar * n / (n - 1)
    # Var(r_ij) = n / (n - 1)^3 * sum_k (w_kij - w_bar_ij)^2, with sum_k w_kij^2 = (z^2)^T (z^2).
    var_r = n / (n - 1) ** 3 * ((z**2).T @ (z**2) - n * w_bar**2)
    off = ~np.eye(x.shape[1], dtype=bool)
    denom = float((corr[off] ** 2).sum())
    lam = float(np.clip(var_r[off].sum() / denom, 0.0, 1.0)) if denom > 0 else 1.0
    shrunk = corr * (1.0 - lam)
    np.fill_diagonal(shrunk, 1.0)
    cov = shrunk * np.outer(sd, sd)
    cov[np.diag_indices_from(cov)] = sd**2 + 1e-6 * float(np.mean(sd**2)) + 1e-12
    return {"mean": mean, "cov": cov, "shrinkage": np.asarray(lam)}


def mahalanobis(features: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Mahalanobis distance ``sqrt((x - mean)^T cov^-1 (x - mean))`` of each row of (N, F) features.

    Args:
        features: (N, F) or (F,).
        mean: (F,) from :func:`feature_stats`.
        cov: (F, F) symmetric positive definite, from :func:`feature_stats`.

    Returns:
        (N,) float64 distances.
    """
    from scipy.linalg import cho_factor, cho_solve

    x = np.atleast_2d(np.asarray(features, dtype=np.float64))
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.asarray(cov, dtype=np.float64)
    if x.shape[1] != mu.shape[0] or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"shape mismatch: features {x.shape}, mean {mu.shape}, cov {sigma.shape}")
    d = x - mu
    factor = cho_factor(sigma, lower=True)
    q = np.einsum("ij,ij->i", d, cho_solve(factor, d.T).T)
    return np.sqrt(np.clip(q, 0.0, None))


def write_feature_stats(
    model: FoundationNet,
    volumes: Iterable[torch.Tensor | np.ndarray],
    patch_size: int | Sequence[int],
    out: Path,
    provenance: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Pooled features of every pool volume → ``out`` (safetensors ``mean``, ``cov``, ``count``).

    The statistics the checkpoint carries for the Mahalanobis fallback of MDS and DKD (methods.md §0).
    """
    from tqdm import tqdm

    from stages.core.io import save_safetensors

    feats = np.stack(
        [
            pooled_case_feature(model, v, patch_size, device=device)
            for v in tqdm(list(volumes), desc="feature statistics", mininterval=2)
        ]
    )
    stats = feature_stats(feats)
    save_safetensors(
        {
            "mean": torch.as_tensor(stats["mean"]),
            "cov": torch.as_tensor(stats["cov"]),
            "count": torch.tensor([len(feats)]),
        },
        out,
        provenance,
    )
    return stats
