"""ASSFT scoring math shared by the query, annotation and pseudo-label steps: DKD, ASD, entropies, core-set, greedy picks.

ASSFT (Yang, Marcus, Sotiras, arXiv 2509.10784) queries labels for the target cases that are both
*unfamiliar* to the foundation model and *diverse* (DKD, Diversified Knowledge Divergence) and, once a
target head exists, *hard to segment* (ASD, Anatomical Segmentation Difficulty); after fine-tuning it
keeps confident, near-to-labelled unlabelled cases as pseudo-labels. ``methods.md`` §2 fixes the
formulas this module implements; where the paper gives no detail the choice is marked "ours".

Conventions: candidates are always handled in ascending case-id order, so a tie in a score goes to the
smaller case id and nothing depends on table row order. A greedy score is "higher is picked first".

The folder helpers at the end build the ASSFT data folders (a labelled folder that holds only revealed
labels, a pseudo-label folder) in a temporary sibling and swap them in whole, so a folder never mixes
files of two runs (a stale label of an earlier query can never linger).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import entr

from stages.core.errors import InputError
from stages.core.io import atomic_path, build_folder

__all__ = [
    "IMAGE_LINK_MODES",
    "MONAI_LABEL_FLOOR",
    "GreedyResult",
    "StepScores",
    "asd_score",
    "build_folder",
    "cosine_distances",
    "coreset_step",
    "dkd_terms",
    "euclidean_distances",
    "foreground_confidence",
    "foreground_weights",
    "greedy_select",
    "link_file",
    "mc_dropout_scores",
    "mean_entropy",
    "lexicographic_tiebreak",
    "min_distance",
    "normalised_entropy",
    "read_case_column",
    "read_features",
    "scaled_rank",
    "selective_keep",
    "weighted_random_keys",
    "winsorise",
]

_EPS = 1e-12

#: MONAI Label's epistemic scoring replaces probabilities <= 0 by this before taking logs.
MONAI_LABEL_FLOOR = 5e-5

IMAGE_LINK_MODES = ("symlink", "copy")


# ------------------------------------------------------------------------------------------ ranks, distances


def scaled_rank(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1]: the smallest value 0, the largest 1, ties share their average rank.

    ``(rank - 1) / (n - 1)`` with 1-based average ranks (ours: ``methods.md`` only says "ranks scaled
    to [0, 1]"); a single value gets 1, so a lone candidate is never scored 0.

    Args:
        values: 1-D array of finite scores.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.ones(1)
    from scipy.stats import rankdata  # scipy.stats costs ~0.5 s at import; only the query step ranks

    return (rankdata(values, method="average") - 1.0) / (n - 1.0)


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise cosine distances ``1 - cos(a_i, b_j)``, shape (len(a), len(b)), in [0, 2].

    Args:
        a: (n, D) features.
        b: (m, D) features. A zero vector is treated as having norm 1e-12 (distance 1 to everything).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), _EPS)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), _EPS)
    return np.clip(1.0 - an @ bn.T, 0.0, 2.0)


def euclidean_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances, shape (len(a), len(b)) (core-set's metric, Sener & Savarese, ICLR 2018)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0))


def min_distance(a: np.ndarray, ref: np.ndarray, metric: str = "cosine", empty: float = 1.0) -> np.ndarray:
    """Distance of each row of ``a`` to its nearest row of ``ref``; ``empty`` for every row if ``ref`` is empty.

    Args:
        a: (n, D) features.
        ref: (m, D) reference features (the labelled or already picked cases).
        metric: ``cosine`` or ``euclidean``.
        empty: the value when there is no reference (DKD: d = 1 for all, ``methods.md`` §2).
    """
    if len(ref) == 0:
        return np.full(len(a), float(empty))
    dist = cosine_distances if metric == "cosine" else euclidean_distances
    return dist(a, ref).min(axis=1)


# -------------------------------------------------------------------------------------------- greedy picking

StepScores = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
"""``step(remaining, picked) -> {"score": ..., other columns ...}``: per-remaining-candidate arrays.

``remaining`` and ``picked`` are indices into the candidate list (``picked`` in pick order); every
returned array has ``len(remaining)`` entries. The candidate with the highest ``score`` is picked next;
among exact ties, the one with the highest optional ``tiebreak``, then the lowest index.
"""


@dataclass
class GreedyResult:
    """Outcome of :func:`greedy_select`.

    Args:
        order: candidate indices in pick order.
        columns: every column the step function returned, one value per candidate: for a picked
            candidate the value at the step it was picked, for the others the value after the last
            pick (so a reader can recompute every decision from the table).
    """

    order: list[int]
    columns: dict[str, np.ndarray]


def greedy_select(n: int, budget: int, step: StepScores) -> GreedyResult:
    """Pick ``min(budget, n)`` of ``n`` candidates one at a time, rescoring the rest after each pick.

    Exact ties in ``score`` go to the highest ``tiebreak`` if the step returns one, then to the lowest
    index (candidates are in ascending case-id order, so to the smaller case id). ``tiebreak`` is not
    recorded as a column.

    Args:
        n: number of candidates.
        budget: how many to pick.
        step: scores the remaining candidates given those picked so far (see :data:`StepScores`).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    remaining = np.arange(n)
    order: list[int] = []
    columns: dict[str, np.ndarray] = {}

    def record(values: dict[str, np.ndarray], rows: np.ndarray, where: np.ndarray) -> None:
        for key, column in values.items():
            if key == "tiebreak":
                continue
            column = np.asarray(column, dtype=np.float64)
            if column.shape != (len(remaining),):
                raise ValueError(f"step column {key!r} has shape {column.shape}, expected ({len(remaining)},)")
            if key not in columns:
                columns[key] = np.full(n, np.nan)
            columns[key][rows] = column[where]

    for _ in range(min(budget, n)):
        values = step(remaining, np.asarray(order, dtype=np.int64))
        score = np.asarray(values["score"], dtype=np.float64)
        if not np.all(np.isfinite(score)):
            raise ValueError("greedy scores must be finite")
        ties = np.flatnonzero(score == score.max())
        if ties.size > 1 and "tiebreak" in values:
            tiebreak = np.asarray(values["tiebreak"], dtype=np.float64)[ties]
            ties = ties[tiebreak == tiebreak.max()]
        j = int(ties[0])  # the smallest case id among those still tied
        record(values, remaining[j : j + 1], np.array([j]))
        order.append(int(remaining[j]))
        remaining = np.delete(remaining, j)
    if remaining.size:
        values = step(remaining, np.asarray(order, dtype=np.int64))
        record(values, remaining, np.arange(len(remaining)))
    return GreedyResult(order=order, columns=columns)


def winsorise(values: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """Clip ``values`` from above at their ``quantile`` (numpy's linear interpolation); returns (clipped, cap).

    DKD's knowledge gap is M0's SSL loss, whose largest values are often single corrupt or unusual
    scans; clipped at the 0.9 quantile, the top tenth of the candidates share the highest rank and the
    diversity term (then the tie-break) decides among them instead of the single largest loss (ours).
    ``quantile = 1`` leaves the values as they are.

    Args:
        values: 1-D finite scores.
        quantile: in (0, 1].
    """
    values = np.asarray(values, dtype=np.float64)
    if not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if values.size == 0:
        return values, float("nan")
    cap = float(np.quantile(values, quantile))
    return np.minimum(values, cap), cap


def lexicographic_tiebreak(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One float that orders candidates by ``first`` (higher wins), then by ``second`` (higher wins).

    Integer ranks combined as ``rank(first) * (n + 1) + rank(second)``, exact in float64 for any pool.
    """
    from scipy.stats import rankdata

    first = np.asarray(first, dtype=np.float64)
    n = first.size
    if n == 0:
        return np.zeros(0)
    return rankdata(first, method="min") * (n + 1.0) + rankdata(np.asarray(second, dtype=np.float64), method="min")


def dkd_terms(
    k: np.ndarray, features: np.ndarray, reference: np.ndarray, k_raw: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """DKD of the remaining candidates given the reference set S (``methods.md`` §2, formula ours).

    ``DKD(x | S) = rank(k(x)) * rank(d(x | S))`` with ranks scaled to [0, 1] over the remaining
    candidates; ``k`` is M0's SSL loss (high = knowledge the foundation model lacks) and ``d`` the
    smallest cosine distance of x's pooled feature to S (1 for every x when S is empty).

    Args:
        k: (n,) knowledge gap of the remaining candidates.
        features: (n, D) their pooled M0 features.
        reference: (m, D) features of S = labelled cases and cases picked so far.

    Returns ``k_rank``, ``d``, ``d_rank``, ``dkd``, ``score`` (= ``dkd``) and ``tiebreak`` (= ``d``).
    The product of ranks is 0 for the least unfamiliar and for the least diverse candidate alike, so
    exact ties are common; they go to the larger raw distance (ours), so a near-copy of S never wins a
    tie against a distinct case. With ``k_raw`` (the unclipped gap when ``k`` is winsorised, see
    :func:`winsorise`), ties left after the distance go to the *smaller* raw gap: among the cases that
    share the top rank the one nearest the cap, never the most extreme loss (ours).
    """
    d = min_distance(features, reference, "cosine", empty=1.0)
    k_rank, d_rank = scaled_rank(k), scaled_rank(d)
    dkd = k_rank * d_rank
    tiebreak = d if k_raw is None else lexicographic_tiebreak(d, -np.asarray(k_raw, dtype=np.float64))
    return {"k_rank": k_rank, "d": d, "d_rank": d_rank, "dkd": dkd, "score": dkd, "tiebreak": tiebreak}


def coreset_step(features: np.ndarray, labelled: np.ndarray, metric: str = "euclidean") -> StepScores:
    """k-centre greedy of core-set (Sener & Savarese, "Active Learning for Convolutional Neural Networks:
    A Core-Set Approach", ICLR 2018): pick the candidate farthest from its nearest labelled-or-picked case.

    With no labelled case and nothing picked yet, the first pick is the 1-centre of the candidates (the
    one whose largest distance to the others is smallest; ours, the paper starts from a labelled set),
    scored as minus that largest distance.

    Args:
        features: (n, D) pooled features of all candidates (ascending case id).
        labelled: (m, D) features of the labelled cases.
        metric: ``euclidean`` (the paper's) or ``cosine``.
    """
    dist = cosine_distances if metric == "cosine" else euclidean_distances
    among = dist(features, features)
    to_labelled = dist(features, labelled).min(axis=1) if len(labelled) else None

    def step(remaining: np.ndarray, picked: np.ndarray) -> dict[str, np.ndarray]:
        if to_labelled is None and picked.size == 0:
            radius = among[np.ix_(remaining, remaining)].max(axis=1)
            return {"coreset_distance": np.full(len(remaining), np.nan), "score": -radius}
        parts = [] if to_labelled is None else [to_labelled[remaining]]
        if picked.size:
            parts.append(among[np.ix_(remaining, picked)].min(axis=1))
        nearest = np.min(np.stack(parts), axis=0)
        return {"coreset_distance": nearest, "score": nearest}

    return step


# ---------------------------------------------------------------------------- foreground-aware random


def foreground_weights(volumes: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Sampling weights of nnActive's foreground-aware random, moved from patches to whole cases (ours).

    nnActive (Lüth et al., TMLR 2025; ``nnactive/strategies/randomlabel*.py``) draws each query patch
    either anywhere in a random image or centred on (the border of) labelled foreground; its
    "33 % foreground" variant aims one draw in three at foreground. A case-level query has no patch to
    centre, so here a draw is, with probability ``share``, a case drawn in proportion to its foreground
    and otherwise a uniform case: ``w_i = (1 - share) / n + share * f_i``. The foreground share ``f_i``
    averages over the foreground classes present the case's part of the pool's predicted volume of
    that class, ``f_i = mean_c v_ic / sum_j v_jc``, so a small class (a lesion) counts as much as a
    large organ. ``v_ic`` is the model's soft predicted volume (sum of p_c over voxels), since pool
    labels are unknown. Without any predicted foreground f is uniform.

    Args:
        volumes: (n, C_fg) predicted foreground volume per case and foreground class, >= 0.
        share: the fraction of draws aimed at foreground, in [0, 1].

    Returns ``(weights (n,), f (n,))``, each summing to 1.
    """
    v = np.asarray(volumes, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or (v.size and v.min() < 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"volumes must be a finite non-negative (n, classes) array, got shape {v.shape}")
    if not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    n = v.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros(0)
    totals = v.sum(axis=0)
    present = totals > 0
    f = (v[:, present] / totals[present]).mean(axis=1) if present.any() else np.full(n, 1.0 / n)
    return (1.0 - share) / n + share * f, f


def weighted_random_keys(uniforms: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Keys whose descending order is a weighted random draw without replacement (Efraimidis & Spirakis 2006).

    ``key_i = log(u_i) / w_i`` (the log of their ``u_i ** (1 / w_i)``): taking the largest keys one by
    one draws each next case with probability proportional to its weight among those left. With equal
    weights the order is that of ``u`` alone, so a foreground-aware draw with no foreground information
    picks what plain random picks with the same uniforms. Weights are floored at 1e-12 (a zero-weight
    case comes last, never an infinite key).

    Args:
        uniforms: (n,) in (0, 1).
        weights: (n,) >= 0.
    """
    u = np.clip(np.asarray(uniforms, dtype=np.float64), np.finfo(np.float64).tiny, 1.0)
    w = np.maximum(np.asarray(weights, dtype=np.float64), 1e-12)
    return np.log(u) / w


# ------------------------------------------------------------------------------------------ uncertainty


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Voxel-wise Shannon entropy of class probabilities divided by log C, in [0, 1].

    Args:
        probs: (C, X, Y, Z) probabilities (C >= 2) summing to 1 over the first axis.
    """
    probs = np.asarray(probs)
    c = probs.shape[0]
    if c < 2:
        raise ValueError(f"entropy needs at least 2 classes, got {c}")
    return (entr(probs).sum(axis=0, dtype=np.float64) / np.log(c)).astype(np.float32)


def mean_entropy(probs: np.ndarray) -> float:
    """Whole-volume mean normalised entropy (the ``entropy`` query baseline)."""
    return float(normalised_entropy(probs).mean(dtype=np.float64))


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold (Otsu, 1979) of ``values``: the bin centre that maximises the between-class variance.

    The same histogram rule as scikit-image's ``threshold_otsu`` (``nbins`` equal bins over
    [min, max], the threshold at a bin centre, values ``<=`` it in the lower class), written here so
    that ASD needs no image-processing package. Constant input returns its value.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(flat.min()), float(flat.max())
    if high == low:
        return low
    hist, edges = np.histogram(flat, bins=nbins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    weight1 = np.cumsum(hist)  # voxels at or below each centre
    weight2 = np.cumsum(hist[::-1])[::-1]  # voxels at or above each centre
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(hist * centres) / weight1
        mean2 = (np.cumsum((hist * centres)[::-1]) / weight2[::-1])[::-1]
    between = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(np.nanargmax(between))])


def asd_score(probs: np.ndarray) -> tuple[float, bool, float]:
    """ASD: mean normalised voxel entropy over the predicted foreground (ASSFT; ``methods.md`` §2).

    ``F(x) = {v : 1 - p_bg(v) > tau}`` with ``tau`` the Otsu threshold of the case's foreground
    probabilities ``1 - p_bg`` (:func:`otsu_threshold`; per case, ours). Background-only
    uncertainty thus does not count. An empty F (e.g. constant probabilities) gives ASD = 1, flagged:
    a case where the model finds nothing is treated as maximally difficult.

    Args:
        probs: (C, X, Y, Z) class probabilities, background first.

    Returns ``(asd, empty_foreground, tau)``.
    """
    probs = np.asarray(probs)
    foreground = 1.0 - probs[0].astype(np.float64)
    low, high = float(foreground.min()), float(foreground.max())
    tau = high if high - low <= 1e-12 else otsu_threshold(foreground)
    mask = foreground > tau
    if not mask.any():
        return 1.0, True, tau
    return float(normalised_entropy(probs)[mask].mean(dtype=np.float64)), False, tau


def mc_dropout_scores(samples: np.ndarray) -> dict[str, float]:
    """Epistemic uncertainty of T stochastic predictions (T, C, X, Y, Z).

    Returns:
        ``mc_entropy``: MONAI Label's ``epistemic_entropy`` (``monailabel/tasks/scoring/epistemic_v2.py``):
        the entropy terms ``-p log p`` of the MC-mean probability, summed over the foreground classes
        (background dropped, probabilities <= 0 floored at 5e-5), averaged over all voxels.
        ``mc_mutual_info``: BALD's mutual information (Houlsby et al., 2011), ``H(mean_t p_t) -
        mean_t H(p_t)`` over all classes, normalised by log C and averaged over all voxels.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 5 or samples.shape[0] < 2:
        raise ValueError(f"expected (T >= 2, C, X, Y, Z) samples, got shape {samples.shape}")
    mean = samples.mean(axis=0, dtype=np.float64)
    fg = np.where(mean[1:] <= 0, MONAI_LABEL_FLOOR, mean[1:])
    monai_label = float(entr(fg).sum(axis=0).mean())
    expected = float(np.mean([normalised_entropy(s).mean(dtype=np.float64) for s in samples]))
    total = float(normalised_entropy(mean).mean(dtype=np.float64))
    return {"mc_entropy": monai_label, "mc_mutual_info": max(0.0, total - expected)}


# ------------------------------------------------------------------------------------ pseudo-label rule


def foreground_confidence(probs: np.ndarray) -> tuple[float, bool, np.ndarray]:
    """Confidence of a prediction: mean max-probability over its predicted foreground (ASSFT, ``methods.md`` §2).

    The predicted foreground is the voxels whose arg-max class is not background; an empty one gives
    confidence 0 (ours: a case where the model finds nothing is never trusted as a pseudo-label).

    Args:
        probs: (C, X, Y, Z) class probabilities.

    Returns ``(confidence, empty_foreground, pseudo_label uint8 (X, Y, Z))``.
    """
    probs = np.asarray(probs)
    label = probs.argmax(axis=0).astype(np.uint8)
    foreground = label > 0
    if not foreground.any():
        return 0.0, True, label
    return float(probs.max(axis=0)[foreground].mean(dtype=np.float64)), False, label


def selective_keep(
    confidence: np.ndarray, distance: np.ndarray, q: float, never: np.ndarray | None = None
) -> tuple[np.ndarray, list[str], float, float]:
    """Keep the cases in the top ``q`` by confidence *and* the bottom ``q`` by distance to the labelled set.

    Thresholds (ours): ``c >= quantile(c, 1 - q)`` and ``e <= quantile(e, q)`` with numpy's default
    linear interpolation, over all unlabelled candidates; a case tied with a threshold is kept.

    Args:
        confidence: (n,) c(x), higher = surer.
        distance: (n,) e(x), smallest cosine distance to a labelled case.
        q: the kept fraction of each criterion, in (0, 1].
        never: (n,) bool, cases never kept whatever their scores (an empty prediction).

    Returns ``(kept bool (n,), reason per case, confidence threshold, distance threshold)``.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    n = confidence.size
    if n == 0:
        return np.zeros(0, bool), [], float("nan"), float("nan")
    never = np.zeros(n, bool) if never is None else np.asarray(never, bool)
    c_thr = float(np.quantile(confidence, 1.0 - q))
    e_thr = float(np.quantile(distance, q))
    confident = confidence >= c_thr
    near = distance <= e_thr
    kept = confident & near & ~never
    reasons = []
    for i in range(n):
        if never[i]:
            reasons.append("empty prediction")
        elif kept[i]:
            reasons.append("kept")
        else:
            why = ([] if confident[i] else ["low confidence"]) + ([] if near[i] else ["far from labelled"])
            reasons.append("; ".join(why))
    return kept, reasons, c_thr, e_thr


# ------------------------------------------------------------------------------------------- input tables


def read_case_column(path: Path, what: str) -> list[str]:
    """The ``case`` column of a Parquet table (a labelled set, a query), checked for duplicates."""
    import pandas as pd

    if not Path(path).is_file():
        raise InputError(path, f"missing {what} table")
    table = pd.read_parquet(path)
    if "case" not in table.columns:
        raise InputError(path, f"the {what} table has no 'case' column")
    cases = [str(c) for c in table["case"]]
    if len(set(cases)) != len(cases):
        raise InputError(path, f"the {what} table lists a case twice")
    return cases


def read_features(path: Path, cases: Iterable[str]) -> np.ndarray:
    """Pooled M0 features (``scores/{task}/features.parquet``) of ``cases``, in their order, as float64 (n, D).

    Raises InputError naming the file when a case has no row or a feature is not finite.
    """
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise InputError(path, "missing features table (run stages.features for the task)")
    table = pq.read_table(path, columns=["case", "feature"])
    names = table.column("case").to_pylist()
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size if hasattr(column.type, "list_size") else None
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
    if dim is None:
        dim = values.size // max(1, len(names))
    if values.size != len(names) * dim:
        raise InputError(path, "feature vectors do not all have the same length")
    matrix = values.reshape(len(names), dim) if names else np.zeros((0, 0))
    index = {c: i for i, c in enumerate(names)}
    wanted = list(cases)
    missing = [c for c in wanted if c not in index]
    if missing:
        raise InputError(path, f"no feature for {len(missing)} case(s): {missing[:10]}")
    out = matrix[[index[c] for c in wanted]] if wanted else np.zeros((0, dim))
    if not np.all(np.isfinite(out)):
        raise InputError(path, "features contain non-finite values")
    return out


# ------------------------------------------------------------------------------------------------ folders


def link_file(source: Path, target: Path, mode: str = "symlink") -> None:
    """Put ``source`` at ``target``: a relative symlink (no copy of large images) or an atomic copy.

    Both end with a rename onto ``target``, so it is complete or absent.

    Args:
        source: an existing file.
        target: where it should appear.
        mode: ``symlink`` or ``copy``.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise InputError(source, "missing file")
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return
    if mode != "symlink":
        raise ValueError(f"unknown link mode {mode!r}; known: {list(IMAGE_LINK_MODES)}")
    relative = os.path.relpath(source.resolve(), target.parent.resolve())
    tmp = target.with_name(f".{target.name}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(relative, tmp)
    os.replace(tmp, target)
