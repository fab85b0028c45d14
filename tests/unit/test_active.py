"""Tests for stages.core.active: ASD, DKD greedy diversity, core-set k-centre, MC dropout, ranks, folder swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core.active import (
    asd_score,
    build_folder,
    coreset_step,
    cosine_distances,
    dkd_terms,
    foreground_weights,
    greedy_select,
    lexicographic_tiebreak,
    link_file,
    mc_dropout_scores,
    mean_entropy,
    min_distance,
    normalised_entropy,
    otsu_threshold,
    scaled_rank,
    weighted_random_keys,
    winsorise,
)
from stages.core.inference import mc_dropout_probabilities
from stages.core.nets import FoundationNet

SHAPE = (9, 10, 11)


def _two_class(p_fg: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p_fg, p_fg]).astype(np.float32)


def _block() -> np.ndarray:
    inside = np.zeros(SHAPE, bool)
    inside[2:6, 3:7, 4:9] = True
    return inside


# ------------------------------------------------------------------------------------------------- ASD


def test_asd_ignores_background_only_uncertainty() -> None:
    inside = _block()
    # A: a confident organ, and every background voxel maximally torn (p_fg = 0.4)
    background_unsure = _two_class(np.where(inside, 0.99, 0.4))
    # B: confident background, an unsure organ (p_fg = 0.7)
    organ_unsure = _two_class(np.where(inside, 0.7, 0.001))
    asd_a, flag_a, tau_a = asd_score(background_unsure)
    asd_b, flag_b, tau_b = asd_score(organ_unsure)
    assert not flag_a and not flag_b
    assert 0.4 <= tau_a < 0.99 and 0.001 <= tau_b < 0.7  # Otsu splits the two populations
    assert asd_a == pytest.approx(float(normalised_entropy(background_unsure)[inside].mean()), abs=1e-6)
    assert asd_a < 0.1  # only the confident organ counts
    assert asd_b > 0.85  # H(0.3, 0.7) / log 2 = 0.881
    # whole-volume entropy orders them the other way: background noise dominates it
    assert mean_entropy(background_unsure) > mean_entropy(organ_unsure)


def test_asd_multiclass_uses_one_minus_background() -> None:
    inside = _block()
    probs = np.zeros((3, *SHAPE), np.float32)
    probs[0] = np.where(inside, 0.1, 0.98)
    probs[1] = np.where(inside, 0.45, 0.01)
    probs[2] = np.where(inside, 0.45, 0.01)
    asd, flag, _ = asd_score(probs)
    assert not flag
    expected = -(0.1 * np.log(0.1) + 2 * 0.45 * np.log(0.45)) / np.log(3)
    assert asd == pytest.approx(expected, rel=1e-5)


def test_asd_empty_foreground_is_one_and_flagged() -> None:
    flat = _two_class(np.full(SHAPE, 0.2))
    assert asd_score(flat)[:2] == (1.0, True)


def test_entropy_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        normalised_entropy(np.ones((1, *SHAPE), np.float32))


# ------------------------------------------------------------------------------------------ ranks, DKD


def test_scaled_rank_ties_and_single_value() -> None:
    np.testing.assert_allclose(scaled_rank(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(scaled_rank(np.array([5.0, 5.0, 1.0])), [0.75, 0.75, 0.0])
    np.testing.assert_allclose(scaled_rank(np.array([7.0])), [1.0])
    assert scaled_rank(np.array([])).size == 0


def test_cosine_distance_basics() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    d = cosine_distances(a, np.array([[3.0, 0.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(d[:2], [[0.0, 2.0], [1.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(d[2], [1.0, 1.0])  # a zero feature is at distance 1 from anything
    np.testing.assert_allclose(min_distance(a, np.zeros((0, 2))), [1.0, 1.0, 1.0])  # empty S: d = 1


def _dkd_pick(k: np.ndarray, feats: np.ndarray, labelled: np.ndarray, budget: int) -> list[int]:
    step = lambda rem, picked: dkd_terms(  # noqa: E731
        k[rem], feats[rem], np.concatenate([labelled, feats[picked]]) if picked.size else labelled
    )
    return greedy_select(len(k), budget, step).order


def test_dkd_never_picks_a_near_duplicate_of_a_labelled_case() -> None:
    rng = np.random.default_rng(0)
    e = np.eye(6)
    labelled = np.stack([e[0], e[1]])
    # candidate 0 is the most unfamiliar but a near-copy of a labelled case; 1 and 2 are distinct
    feats = np.stack([e[0] + 1e-3 * rng.normal(size=6), e[2], e[3] + 0.2 * e[4]])
    k = np.array([9.0, 5.0, 1.0])
    for budget in (1, 2):
        picks = _dkd_pick(k, feats, labelled, budget)
        assert 0 not in picks
        assert picks[0] == 1


def test_dkd_greedy_recomputes_diversity_after_each_pick() -> None:
    e = np.eye(5)
    labelled = np.stack([e[0]])
    # 0 and 1 are near-twins with the highest knowledge gap; 2 is distinct but more familiar
    feats = np.stack([e[1], e[1] + 1e-3 * e[4], e[2], e[3] + e[2]])
    k = np.array([10.0, 9.5, 3.0, 1.0])
    picks = _dkd_pick(k, feats, labelled, 2)
    assert picks[0] == 0
    assert picks[1] == 2  # the twin of the first pick now has d ~ 0


def test_greedy_ties_go_to_the_lowest_index_and_every_candidate_gets_values() -> None:
    result = greedy_select(4, 2, lambda rem, picked: {"score": np.ones(len(rem)), "x": rem.astype(float)})
    assert result.order == [0, 1]
    np.testing.assert_allclose(result.columns["x"], [0, 1, 2, 3])
    assert greedy_select(3, 5, lambda rem, picked: {"score": -rem.astype(float)}).order == [0, 1, 2]


def test_winsorise_and_lexicographic_tiebreak_known_values() -> None:
    clipped, cap = winsorise(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), 0.75)
    assert cap == 4.0 and clipped.tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]
    same, top = winsorise(np.array([3.0, 1.0]), 1.0)
    assert same.tolist() == [3.0, 1.0] and top == 3.0
    with pytest.raises(ValueError, match="quantile"):
        winsorise(np.ones(3), 0.0)
    # first key decides; ties in it go to the larger second key
    t = lexicographic_tiebreak(np.array([1.0, 2.0, 2.0, 0.5]), np.array([9.0, 1.0, 3.0, 50.0]))
    assert np.argsort(-t, kind="stable").tolist() == [2, 1, 0, 3]


def test_winsorised_dkd_does_not_open_with_the_outlier() -> None:
    e = np.eye(6)
    feats = np.stack([e[0], e[1], e[2], e[3], e[4], e[5]])
    # case 0 is a corrupt scan (loss 50); 1 and 2 are unfamiliar but plausible
    k_raw = np.array([50.0, 4.0, 3.9, 1.0, 0.9, 0.8])
    assert _dkd_pick(k_raw, feats, np.zeros((0, 6)), 1) == [0]  # the raw rank opens with the outlier
    k, cap = winsorise(k_raw, 0.7)  # numpy linear quantile: 3.9 + 0.5 * (4.0 - 3.9) = 3.95
    assert cap == pytest.approx(3.95) and (k == cap).sum() == 2

    def step(rem: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        ref = feats[picked] if picked.size else np.zeros((0, 6))
        return dkd_terms(k[rem], feats[rem], ref, k_raw[rem])

    # 0 and 1 share the top rank with d = 1 for all: the tie goes to the smaller raw loss, case 1
    assert greedy_select(6, 2, step).order == [1, 0]


# ------------------------------------------------------------------------------ foreground-aware random


def test_foreground_weights_known_values() -> None:
    volumes = np.array([[10.0, 0.0], [30.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    w, f = foreground_weights(volumes, 1.0 / 3.0)
    # class 1: shares 0.25, 0.75, 0, 0; class 2 (small): 0, 0.5, 0.5, 0 -> f is their mean
    np.testing.assert_allclose(f, [0.125, 0.625, 0.25, 0.0])
    np.testing.assert_allclose(w, (2.0 / 3.0) / 4 + f / 3.0)
    assert w.sum() == pytest.approx(1.0)
    uniform_w, uniform_f = foreground_weights(np.zeros((3, 2)), 0.5)  # nothing predicted anywhere
    np.testing.assert_allclose(uniform_w, 1 / 3) and np.testing.assert_allclose(uniform_f, 1 / 3)
    only_class_one = foreground_weights(np.array([[1.0, 0.0], [3.0, 0.0]]), 1.0)[1]
    np.testing.assert_allclose(only_class_one, [0.25, 0.75])  # an absent class does not dilute f
    with pytest.raises(ValueError, match="share"):
        foreground_weights(volumes, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        foreground_weights(-volumes, 0.5)


def test_weighted_random_keys_draw_in_proportion_to_the_weights() -> None:
    u = np.array([0.9, 0.2, 0.5, 0.7])
    assert np.argsort(-weighted_random_keys(u, np.full(4, 0.25))).tolist() == [0, 3, 2, 1]  # = random's order
    assert np.argmax(weighted_random_keys(u, np.array([0.0, 0.0, 1.0, 0.0]))) == 2  # zero weights come last
    assert np.all(np.isfinite(weighted_random_keys(np.array([0.0, 1.0]), np.array([0.0, 1.0]))))
    draws = np.random.default_rng(0).random((20000, 4))
    firsts = np.argmax(weighted_random_keys(draws, np.array([0.7, 0.1, 0.1, 0.1])), axis=1)
    share = np.bincount(firsts, minlength=4) / len(firsts)
    np.testing.assert_allclose(share, [0.7, 0.1, 0.1, 0.1], atol=0.01)


# ------------------------------------------------------------------------------------------- core-set


def test_coreset_cosine_ignores_scale_where_euclidean_does_not() -> None:
    labelled = np.array([[1.0, 0.01]])
    # 0: same direction as the labelled case but 10x longer; 1: orthogonal but close in L2
    points = np.array([[10.0, 0.0], [0.0, 1.0]])
    assert greedy_select(2, 1, coreset_step(points, labelled, "euclidean")).order == [0]
    cosine = greedy_select(2, 1, coreset_step(points, labelled, "cosine"))
    assert cosine.order == [1]
    assert cosine.columns["coreset_distance"][1] == pytest.approx(1.0 - 0.01 / np.hypot(1.0, 0.01))


def test_coreset_k_centre_greedy_on_a_line() -> None:
    points = np.array([[1.0], [2.0], [10.0], [11.0], [5.0]])
    labelled = np.array([[0.0]])
    result = greedy_select(len(points), 3, coreset_step(points, labelled, "euclidean"))
    # farthest from {0}: 11; then from {0, 11}: 5 (dist 5); then from {0, 11, 5}: 2 (dist 2, ties 10 -> 1)
    assert result.order == [3, 4, 1]
    np.testing.assert_allclose(result.columns["coreset_distance"][[3, 4, 1]], [11.0, 5.0, 2.0])
    np.testing.assert_allclose(result.columns["coreset_distance"][[0, 2]], [1.0, 1.0])  # after the last pick


def test_coreset_starts_from_the_one_centre_without_labels() -> None:
    points = np.array([[0.0], [1.0], [2.0], [10.0]])
    result = greedy_select(len(points), 2, coreset_step(points, np.zeros((0, 1)), "euclidean"))
    # largest distance to the others: 10, 9, 8, 10 -> the 1-centre is 2; then the farthest from it: 10
    assert result.order == [2, 3]


# ---------------------------------------------------------------------------------------- MC dropout


@pytest.fixture(scope="module")
def tiny_net() -> FoundationNet:
    return FoundationNet("basicunet", arch_kwargs={"features": [4, 4, 8, 8, 16, 4]}, heads={"t": 3}, seed=0).eval()


def test_mc_dropout_is_seeded_and_stochastic(tiny_net: FoundationNet) -> None:
    image = np.random.default_rng(1).normal(size=(1, 19, 17, 21)).astype(np.float32)

    def draw(seed: int) -> np.ndarray:
        return mc_dropout_probabilities(tiny_net, "t", image, (16, 16, 16), 4, 0.3, torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, 3, 19, 17, 21)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.allclose(a[0], a[1])  # passes differ
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    scores = mc_dropout_scores(a)
    assert scores["mc_mutual_info"] > 0 and scores["mc_entropy"] > 0
    assert tiny_net.training is False
    with pytest.raises(ValueError, match="2 passes"):
        mc_dropout_probabilities(tiny_net, "t", image, (16, 16, 16), 1, 0.3, torch.Generator())


def test_mc_scores_follow_monai_label_and_bald() -> None:
    p = _two_class(np.full((3, 4, 5), 0.25))
    same = np.stack([p, p, p])
    scores = mc_dropout_scores(same)
    assert scores["mc_mutual_info"] == pytest.approx(0.0, abs=1e-7)  # no disagreement, no epistemic part
    assert scores["mc_entropy"] == pytest.approx(-0.25 * np.log(0.25), rel=1e-6)  # foreground channel only
    split = np.stack([_two_class(np.full((3, 4, 5), 0.0)), _two_class(np.full((3, 4, 5), 1.0))])
    assert mc_dropout_scores(split)["mc_mutual_info"] == pytest.approx(1.0, abs=1e-6)  # total disagreement


# --------------------------------------------------------------------------------------------- folders


def test_build_folder_swaps_in_whole_and_keeps_old_on_failure(tmp_path: Path) -> None:
    source = tmp_path / "image.npy"
    np.save(source, np.arange(3))
    out = tmp_path / "labelled"
    build_folder(out, lambda f: (f / "stale.txt").write_text("old"))

    def fails(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_folder(out, fails)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    build_folder(out, lambda f: link_file(source, f / "cases" / "a.npy"))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["cases", "cases/a.npy"]
    assert (out / "cases" / "a.npy").is_symlink()
    np.testing.assert_array_equal(np.load(out / "cases" / "a.npy"), np.arange(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_otsu_threshold_matches_scikit_image() -> None:
    # reference values from skimage.filters.threshold_otsu (scikit-image 0.26.0) on the same seeded arrays
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.1, 1000)]).clip(0, 1)
    skewed = rng.random((8, 9, 10)) ** 3
    assert otsu_threshold(bimodal) == pytest.approx(0.4461586725521986, abs=1e-12)
    assert otsu_threshold(skewed) == pytest.approx(0.3898761292656101, abs=1e-12)
    assert otsu_threshold(np.full((3, 3), 0.25)) == 0.25


def test_otsu_threshold_maximises_between_class_variance() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(1.0, 0.3, 500), rng.normal(4.0, 0.5, 200)])
    tau = otsu_threshold(values, nbins=64)
    edges = np.linspace(values.min(), values.max(), 65)
    centres = (edges[:-1] + edges[1:]) / 2
    hist = np.histogram(values, bins=64, range=(values.min(), values.max()))[0]

    def between(t: float) -> float:  # on the binned values, as Otsu's method defines it
        below = centres <= t
        w1, w2 = hist[below].sum(), hist[~below].sum()
        m1 = (hist[below] * centres[below]).sum() / w1
        m2 = (hist[~below] * centres[~below]).sum() / w2
        return w1 * w2 * (m1 - m2) ** 2

    assert max(between(c) for c in centres[:-1]) == pytest.approx(between(tau))
    assert 1.5 < tau < 3.5
