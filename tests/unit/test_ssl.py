"""Tests of stages.core.ssl: views, loss terms, the batched deterministic scorer, features, Mahalanobis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from stages.core.nets import FoundationNet
from stages.core.ssl import (
    ROTATION_AXES,
    feature_stats,
    mahalanobis,
    make_views,
    pass_statistics,
    pooled_case_feature,
    score_case,
    score_cases,
    split_half_reliability,
    ssl_loss,
)

TINY_UNET = {"features": [4, 4, 8, 8, 16, 4], "norm": ["group", {"num_groups": 2}]}


def _model(**ssl: object) -> FoundationNet:
    return FoundationNet("basicunet", arch_kwargs=TINY_UNET, ssl={"patch_size": [16, 16, 16], **ssl}, seed=0)


@pytest.mark.parametrize("vol_shape", [(1, 30, 21, 25), (2, 10, 20, 9)])
def test_view_shapes_mask_and_rotation(vol_shape: tuple[int, ...]) -> None:
    volume = torch.randn(vol_shape, generator=torch.Generator().manual_seed(1))
    patch = (16, 16, 12)
    views = make_views(volume, 12, patch, 0.25, 4, torch.Generator().manual_seed(0))
    n, c = 12, vol_shape[0]
    assert views["inputs"].shape == views["target"].shape == (n, c, *patch)
    assert views["mask"].shape == (n, 1, *patch) and views["mask"].dtype == torch.bool
    assert views["rotation"].shape == (n,) and views["rotation"].dtype == torch.long
    # 4x4x3 = 48 cells of side 4, a quarter of them masked: exactly 25 % of every view
    assert torch.allclose(views["mask"].float().flatten(1).mean(1), torch.full((n,), 0.25))
    mask = views["mask"].expand_as(views["inputs"])
    assert torch.all(views["inputs"][mask] == 0)
    assert torch.equal(views["inputs"][~mask], views["target"][~mask])
    # the target is the rotated crop of the zero-padded volume
    padded = torch.zeros(c, *(max(s, p) for s, p in zip(vol_shape[1:], patch)))
    padded[:, : vol_shape[1], : vol_shape[2], : vol_shape[3]] = volume
    for i in range(n):
        o = views["origin"][i].tolist()
        crop = padded[:, o[0] : o[0] + patch[0], o[1] : o[1] + patch[1], o[2] : o[2] + patch[2]]
        assert torch.equal(views["target"][i], torch.rot90(crop, int(views["rotation"][i]), dims=ROTATION_AXES))
    assert set(views["rotation"].tolist()) <= {0, 1, 2, 3}


def test_views_noise_fill_pairs_and_bad_arguments() -> None:
    volume = torch.ones(1, 20, 20, 20)
    views = make_views(volume, 6, 16, 0.5, 8, torch.Generator().manual_seed(0), mask_fill="noise", pairs=True)
    masked = views["inputs"][views["mask"]]
    assert masked.std() > 0.5  # noise, not the constant 1
    assert torch.equal(views["origin"][:3], views["origin"][3:])
    g = torch.Generator()
    with pytest.raises(ValueError, match="x and y"):
        make_views(volume, 2, (16, 8, 16), 0.3, 4, g)
    with pytest.raises(ValueError, match="mask_ratio"):
        make_views(volume, 2, 16, 1.5, 4, g)
    with pytest.raises(ValueError, match="even"):
        make_views(volume, 3, 16, 0.3, 4, g, pairs=True)
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        make_views(volume[0], 2, 16, 0.3, 4, g)


def test_views_deterministic() -> None:
    volume = torch.randn(1, 25, 24, 23)
    a = make_views(volume, 5, 16, 0.3, 4, torch.Generator().manual_seed(42))
    b = make_views(volume, 5, 16, 0.3, 4, torch.Generator().manual_seed(42))
    c = make_views(volume, 5, 16, 0.3, 4, torch.Generator().manual_seed(43))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mask"], c["mask"])


class _Oracle(nn.Module):
    """Stub with perfect heads: reconstruction = target + 1 off the mask, rotation logits one-hot."""

    def __init__(self, views: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.views = views
        self.dummy = nn.Parameter(torch.zeros(1))
        self.ssl_config = {"weights": {"inpaint": 1.0, "rotation": 1.0, "contrastive": 0.0}}

    def ssl_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rec = self.views["target"] + (~self.views["mask"]).float()
        return {"reconstruction": rec, "rotation": 50.0 * nn.functional.one_hot(self.views["rotation"], 4).float()}


def test_loss_terms_formula() -> None:
    views = make_views(torch.randn(1, 20, 20, 20), 4, 16, 0.3, 4, torch.Generator().manual_seed(0))
    terms = ssl_loss(_Oracle(views), views)  # errors off the mask do not count
    assert terms["inpaint"].shape == (4,) and torch.allclose(terms["inpaint"], torch.zeros(4))
    assert torch.all(terms["rotation"] < 1e-6)
    shifted = {**views, "target": views["target"] - 0.5}  # every masked voxel off by 0.5
    terms = ssl_loss(_Oracle(views), shifted, weights={"inpaint": 2.0, "rotation": 1.0})
    assert torch.allclose(terms["inpaint"], torch.full((4,), 0.5))
    assert torch.allclose(terms["loss"], 2 * terms["inpaint"] + terms["rotation"])
    mean = ssl_loss(_Oracle(views), shifted, reduction="mean")
    assert mean["loss"].ndim == 0 and torch.isclose(mean["inpaint"], torch.tensor(0.5))


def test_loss_on_model_and_contrastive() -> None:
    model = _model(contrastive=True)
    views = make_views(torch.randn(1, 20, 20, 20), 4, 16, 0.3, 4, torch.Generator().manual_seed(0), pairs=True)
    terms = ssl_loss(model, views)
    assert set(terms) == {"inpaint", "rotation", "contrastive", "loss"}
    assert all(t.shape == (4,) for t in terms.values())
    assert torch.allclose(terms["loss"], terms["inpaint"] + terms["rotation"] + terms["contrastive"])
    ssl_loss(model, views, reduction="mean")["loss"].backward()
    assert model.ssl_heads["contrastive"].weight.grad is not None


def test_score_deterministic_batched_and_order_free() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    vols = {c: rng.normal(size=(1, 20, 22, 18)).astype(np.float32) for c in ("a", "b", "c")}
    kw = dict(R=8, patch_size=16, mask_ratio=0.3, mask_patch=4, seed=7)
    first = score_case(model, vols["a"], case_id="a", batch=8, **kw)
    again = score_case(model, torch.from_numpy(vols["a"]), case_id="a", batch=8, **kw)
    one_by_one = score_case(model, vols["a"], case_id="a", batch=1, **kw)
    chunks = score_case(model, vols["a"], case_id="a", batch=3, **kw)
    assert first == again
    assert abs(first[0] - one_by_one[0]) < 1e-5 and abs(first[1] - one_by_one[1]) < 1e-5
    assert abs(first[0] - chunks[0]) < 1e-5
    assert first != score_case(model, vols["a"], case_id="a2", batch=8, **kw)  # the case id seeds the views
    assert model.training  # score_case restores the mode
    forward = score_cases(model, list(vols.items()), batch=4, **kw).set_index("case")
    backward = score_cases(model, list(reversed(vols.items())), batch=4, **kw).set_index("case")
    assert list(forward.columns) == ["mean", "std", "sem", "half_a", "half_b", "split_half_r", "R", "scorer"]
    assert set(forward["scorer"]) == {"ssl"} and set(forward["R"]) == {8}
    assert np.allclose(forward.loc["a", ["mean", "std"]].to_numpy(float), first, atol=1e-12)
    assert np.array_equal(
        forward.sort_index()[["mean", "std"]].to_numpy(), backward.sort_index()[["mean", "std"]].to_numpy()
    )


def _blob(seed: int, size: int = 24) -> torch.Tensor:
    v = gaussian_filter(np.random.default_rng(seed).normal(size=(size,) * 3), 3.0)
    return torch.from_numpy(((v - v.mean()) / v.std())[None].astype(np.float32))


def test_pretraining_distribution_scores_lower() -> None:
    """M0 pre-trained briefly on smooth blobs: a held-out blob scores below noise and a checkerboard."""
    model = _model()
    train = [_blob(s) for s in range(8)]
    held_out = _blob(100)
    noise = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 24, 24, 24)).astype(np.float32))
    checker = torch.from_numpy(((np.indices((24, 24, 24)) // 2).sum(0) % 2 * 2.0 - 1.0)[None].astype(np.float32))
    kw = dict(R=16, patch_size=16, mask_ratio=0.3, mask_patch=4, seed=0, batch=16)
    before = score_case(model, held_out, case_id="held_out", **kw)[0]
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(80):
        views = make_views(train[step % len(train)], 4, 16, 0.3, 4, g)
        loss = ssl_loss(model, views, reduction="mean")["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    blob_score = score_case(model, held_out, case_id="held_out", **kw)[0]
    assert blob_score < before
    assert blob_score < score_case(model, noise, case_id="noise", **kw)[0]
    assert blob_score < score_case(model, checker, case_id="checker", **kw)[0]


def test_pooled_case_feature_tiling() -> None:
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    window = torch.randn(1, 16, 16, 16, generator=g)
    other = torch.randn(1, 16, 16, 16, generator=g)
    feat = pooled_case_feature(model, window.numpy(), 16)
    assert feat.shape == (16,) and feat.dtype == np.float32
    with torch.no_grad():
        direct = model.pooled_features(window[None])[0].numpy()
        pair = model.pooled_features(torch.stack([window, other])).numpy()
    assert np.allclose(feat, direct, atol=1e-6)
    # two windows along x: their mean; a smaller volume is zero-padded to one window
    assert np.allclose(
        pooled_case_feature(model, torch.cat([window, other], dim=1), 16, batch=1), pair.mean(0), atol=1e-6
    )
    padded = torch.zeros(1, 16, 16, 16)
    padded[:, :10, :12, :9] = window[:, :10, :12, :9]
    assert np.allclose(pooled_case_feature(model, window[:, :10, :12, :9], 16), pooled_case_feature(model, padded, 16))
    # a 24-voxel axis: the half-padded second window weighs half as much
    long = torch.zeros(1, 32, 16, 16)
    long[:, :24] = torch.cat([window, other], dim=1)[:, :24]
    with torch.no_grad():
        f2 = model.pooled_features(long.view(1, 1, 2, 16, 16, 16).permute(2, 0, 1, 3, 4, 5)[:, 0]).double().numpy()
    assert np.allclose(pooled_case_feature(model, long[:, :24], 16), (f2[0] + 0.5 * f2[1]) / 1.5, atol=1e-6)


def test_pooled_case_feature_keeps_the_most_textured_windows() -> None:
    model = _model().eval()
    g = torch.Generator().manual_seed(1)
    # four windows along x: flat, busy, flat, busier; a bound of 2 keeps the busy ones (raster order)
    parts = [
        torch.zeros(1, 16, 16, 16),
        torch.randn(1, 16, 16, 16, generator=g),
        torch.full((1, 16, 16, 16), 0.5),
        2.0 * torch.randn(1, 16, 16, 16, generator=g),
    ]
    volume = torch.cat(parts, dim=1)
    with torch.no_grad():
        each = model.pooled_features(torch.stack(parts)).double().numpy()
    bounded = pooled_case_feature(model, volume, 16, max_windows=2)
    assert np.allclose(bounded, (each[1] + each[3]) / 2, atol=1e-6)
    assert np.allclose(pooled_case_feature(model, volume, 16, max_windows=None), each.mean(0), atol=1e-6)
    assert np.allclose(pooled_case_feature(model, volume, 16, max_windows=4), each.mean(0), atol=1e-6)


def test_feature_stats_and_mahalanobis() -> None:
    rng = np.random.default_rng(0)
    few = rng.normal(size=(10, 40))  # N < F: the sample covariance is singular
    stats = feature_stats(few)
    assert stats["cov"].shape == (40, 40) and np.allclose(stats["cov"], stats["cov"].T)
    assert np.linalg.eigvalsh(stats["cov"]).min() > 0
    assert 0 < float(stats["shrinkage"]) <= 1
    assert np.allclose(np.diag(stats["cov"]), few.var(0, ddof=1), rtol=1e-5)
    many = rng.normal(size=(4000, 5)) @ np.array(
        [[1.0, 0.8, 0, 0, 0], [0, 0.6, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 2, 0], [0, 0, 0, 0, 1]]
    )
    big = feature_stats(many)
    assert float(big["shrinkage"]) < 0.01
    assert np.allclose(big["cov"], np.cov(many.T), atol=0.05)
    # against the textbook formula, and an outlier lies farther out
    x = many[:3]
    inv = np.linalg.inv(big["cov"])
    ref = np.sqrt(np.einsum("ij,jk,ik->i", x - big["mean"], inv, x - big["mean"]))
    assert np.allclose(mahalanobis(x, big["mean"], big["cov"]), ref)
    assert mahalanobis(big["mean"] + 10, big["mean"], big["cov"])[0] > mahalanobis(x, big["mean"], big["cov"]).max()
    assert mahalanobis(big["mean"], big["mean"], big["cov"])[0] == 0
    constant = np.column_stack([rng.normal(size=6), np.ones(6)])  # a dead feature stays invertible
    assert np.isfinite(mahalanobis(constant, **{k: feature_stats(constant)[k] for k in ("mean", "cov")})).all()
    with pytest.raises(ValueError):
        feature_stats(few[:1])
    with pytest.raises(ValueError, match="shape"):
        mahalanobis(few[:, :3], stats["mean"], stats["cov"])


def test_views_mark_the_padding_and_the_inpaint_term_ignores_it() -> None:
    # 16 x 16 x 10 volume, 16^3 crop: the last 6 z-slices of every view are zero padding
    volume = torch.randn(1, 16, 16, 10, generator=torch.Generator().manual_seed(3))
    views = make_views(volume, 4, 16, 0.5, 4, torch.Generator().manual_seed(0))
    assert views["valid"].shape == views["mask"].shape and views["valid"].dtype == torch.bool
    assert torch.all(views["valid"][..., :10]) and not torch.any(views["valid"][..., 10:])
    assert torch.all(views["target"][~views["valid"].expand_as(views["target"])] == 0)
    # an oracle that is off by exactly 0.5 on every real voxel and exact on the padding
    shifted = {**views, "target": torch.where(views["valid"], views["target"] - 0.5, views["target"])}
    terms = ssl_loss(_Oracle(views), shifted)
    assert torch.allclose(terms["inpaint"], torch.full((4,), 0.5))  # not diluted to 0.5 * 10 / 16
    legacy = {k: v for k, v in shifted.items() if k != "valid"}  # what padded voxels did before
    diluted = ssl_loss(_Oracle(views), legacy)["inpaint"]
    hidden = views["mask"].flatten(1)
    real_share = (hidden & views["valid"].flatten(1)).sum(1) / hidden.sum(1)
    assert torch.allclose(diluted, 0.5 * real_share)
    assert torch.all(real_share < 0.8)


def test_padding_in_the_rotation_plane_is_rotated_with_the_crop() -> None:
    volume = torch.randn(1, 12, 16, 16)  # x shorter than the crop: padding on the far x side
    views = make_views(volume, 8, 16, 0.5, 4, torch.Generator().manual_seed(1))
    for i in range(8):
        k = int(views["rotation"][i])
        unrotated = torch.rot90(views["valid"][i], -k, dims=ROTATION_AXES)
        assert torch.all(unrotated[:, :12]) and not torch.any(unrotated[:, 12:])


def test_small_volume_scores_are_unchanged_where_nothing_is_padded() -> None:
    model = _model()
    vol = np.random.default_rng(0).normal(size=(1, 20, 20, 20)).astype(np.float32)
    kw = dict(R=4, patch_size=16, mask_ratio=0.3, mask_patch=4, seed=0, case_id="a")
    views = make_views(torch.from_numpy(vol), 4, 16, 0.3, 4, torch.Generator().manual_seed(0))
    assert torch.all(views["valid"])  # a volume at least the crop's size has no padding
    with torch.no_grad():
        model.eval()
        with_valid = ssl_loss(model, views)["loss"]
        without = ssl_loss(model, {k: v for k, v in views.items() if k != "valid"})["loss"]
    assert torch.equal(with_valid, without)
    assert score_case(model, vol, **kw) == score_case(model, vol, **kw)


def test_pass_statistics_known_values() -> None:
    stats = pass_statistics(np.array([1.0, 2.0, 3.0, 6.0]))
    assert stats["mean"] == 3.0 and stats["half_a"] == 2.0 and stats["half_b"] == 4.0
    assert stats["std"] == pytest.approx(np.sqrt(14 / 3))
    assert stats["sem"] == pytest.approx(np.sqrt(14 / 3) / 2)
    one = pass_statistics(np.array([2.5]))
    assert one["std"] == 0.0 and np.isnan(one["sem"]) and np.isnan(one["half_b"]) and one["half_a"] == 2.5


def test_split_half_reliability_known_values() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    perfect = split_half_reliability(a, 2 * a + 1)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["reliability"] == pytest.approx(1.0)
    b = np.array([2.0, 1.0, 4.0, 3.0])  # Pearson 0.6, Spearman 0.6
    half = split_half_reliability(a, b)
    assert half["pearson"] == pytest.approx(0.6) and half["spearman"] == pytest.approx(0.6)
    assert half["reliability"] == pytest.approx(2 * 0.6 / 1.6)
    # one outlier carries the Pearson r; the ranks of the rest disagree: reliability follows the ranks
    c, d = np.array([1.0, 2.0, 3.0, 4.0, 50.0]), np.array([4.0, 3.0, 2.0, 1.0, 50.0])
    skew = split_half_reliability(c, d)
    assert skew["pearson"] > 0.99 and skew["spearman"] == pytest.approx(0.0, abs=1e-12)
    assert skew["reliability"] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(split_half_reliability(a[:2], b[:2])["reliability"])  # too few cases
    assert np.isnan(split_half_reliability(a, np.ones(4))["pearson"])  # a constant half


def test_score_cases_reports_reliability() -> None:
    model = _model()
    rng = np.random.default_rng(1)
    vols = [(f"c{i}", rng.normal(scale=0.5 + i, size=(1, 18, 18, 12 + 2 * i)).astype(np.float32)) for i in range(4)]
    table = score_cases(model, vols, R=6, patch_size=16, mask_ratio=0.5, mask_patch=4, seed=0, batch=6)
    np.testing.assert_allclose(table["sem"], table["std"] / np.sqrt(6))
    np.testing.assert_allclose(table["mean"], (table["half_a"] + table["half_b"]) / 2)
    rel = split_half_reliability(table["half_a"].to_numpy(), table["half_b"].to_numpy())
    assert table["split_half_r"].nunique() == 1 and table["split_half_r"].iloc[0] == pytest.approx(rel["reliability"])
    assert table.attrs["reliability"] == rel
