"""Modality-gap and embedding-geometry metrics, computed on embeddings.

Every function takes image embeddings ``x`` (N, D) and/or caption embeddings
``y`` (N, D) -- numpy arrays or torch tensors, row i of ``x`` paired with row i
of ``y`` -- and returns a float or a flat dict, in the style of CLIP_benchmark.
Inputs are L2-normalised inside each function (the definitions assume unit
vectors), and all arithmetic is float64. The exact definitions follow
/work/shared/SCIENCE.md and the papers cited at each function:

- Schrodi et al., "Two Effects, One Trigger: On the Modality Gap, Object Bias,
  and Information Imbalance in Contrastive Vision-Language Models", ICLR 2025
  (official code: github.com/lmb-freiburg/two-effects-one-trigger,
  analysis/gap_precompute.py and analysis/gap_ablate_dims.py);
- Liang et al., "Mind the Gap", NeurIPS 2022 (gap vector, cone effect);
- Wang & Isola, ICML 2020 (uniformity, alignment);
- Fahim et al., "It's Not a Modality Gap" (linear separability, centroid distance).

    from capgap.models import metrics
    out = metrics.gap_metrics(img_emb, txt_emb, seed=0)   # {"l2m": ..., "rmg": ..., ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ArrayLike = Any  # np.ndarray | torch.Tensor | nested lists


# --- helpers ----------------------------------------------------------------------------------


def as_array(a: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of ``a`` (accepts torch tensors on any device)."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D (N, D) array of embeddings, got shape {arr.shape}")
    return arr


def l2_normalize(a: ArrayLike, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``a`` scaled to unit L2 norm (float64)."""
    arr = as_array(a)
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), eps)


def _paired(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xn, yn = l2_normalize(x), l2_normalize(y)
    if xn.shape != yn.shape:
        raise ValueError(f"paired embeddings need equal shapes, got {xn.shape} and {yn.shape}")
    if len(xn) < 2:
        raise ValueError("need at least 2 pairs")
    return xn, yn


def _offdiag_mean(sim: np.ndarray) -> float:
    """Mean of a square matrix over its off-diagonal entries."""
    n = sim.shape[0]
    return float((sim.sum() - np.trace(sim)) / (n * n - n))


# --- gap metrics ------------------------------------------------------------------------------


def l2m(x: ArrayLike, y: ArrayLike) -> float:
    """L2M = || mean_i x_i - mean_j y_j ||_2 (Schrodi et al. 2025; Liang et al.'s ||Delta||).

    The same number is Fahim et al.'s "centroid distance". Needs no pairing.
    """
    xn, yn = l2_normalize(x), l2_normalize(y)
    return float(np.linalg.norm(xn.mean(axis=0) - yn.mean(axis=0)))


def l2i(x: ArrayLike, y: ArrayLike) -> float:
    """L2I = mean over matched pairs of || x_i - y_i ||_2 (Schrodi et al. 2025)."""
    xn, yn = _paired(x, y)
    return float(np.linalg.norm(xn - yn, axis=1).mean())


def rmg(x: ArrayLike, y: ArrayLike) -> float:
    """Relative modality gap, the official formula of Schrodi et al. (ICLR 2025).

    With d(a, b) = (1 - cos(a, b)) / 2 (cosine mapped to [0, 1] and flipped):
      num       = 1 - (mean_i cos(x_i, y_i) + 1) / 2, replaced by 1e-3 if num <= 0;
      intra_img = mean of d over all off-diagonal image pairs (i != j);
      intra_txt = the same over caption pairs;
      RMG       = num / (num + (intra_img + intra_txt) / 2).
    (A third-party variant drops the "/ 2" terms; that is not the official formula.)
    """
    xn, yn = _paired(x, y)
    num = 1.0 - (float(np.sum(xn * yn, axis=1).mean()) + 1.0) / 2.0
    if num <= 0.0:
        num = 1e-3
    intra_img = 1.0 - (_offdiag_mean(xn @ xn.T) + 1.0) / 2.0
    intra_txt = 1.0 - (_offdiag_mean(yn @ yn.T) + 1.0) / 2.0
    return float(num / (num + (intra_img + intra_txt) / 2.0))


def pair_split(n: int, train_fraction: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of pair indices 0..n-1 into (train, test), both sorted.

    ``int(train_fraction * n)`` pairs (at least 1, at most n - 1) go to train and
    the rest to test, from one ``np.random.default_rng(seed)`` permutation.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if n < 2:
        raise ValueError("need at least 2 pairs to split")
    n_train = min(max(int(train_fraction * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def linear_separability(
    x: ArrayLike, y: ArrayLike, seed: int = 0, train_fraction: float = 0.8
) -> float:
    """Linear separability of the two modalities (Fahim et al., split by pair).

    Definition: split the N PAIRS with :func:`pair_split` (seeded; ``train_fraction``
    = 80% train, image i and caption i always on the same side), fit a logistic
    regression (scikit-learn, L2 penalty, lbfgs) to label image (0) vs caption (1)
    on the 2 * n_train training embeddings, and return its accuracy on the
    2 * n_test embeddings of the held-out pairs.

    This is the protocol of Fahim et al.'s official code (``get_linear_seperability``:
    one permutation of pair indices, 80/20). 0.5 means the modalities are
    indistinguishable, 1.0 fully separable. Splitting the 2N embeddings
    independently instead leaves most test points' partners in the training set
    and reads below 0.5 when there is no gap (issue 16).
    """
    from sklearn.linear_model import LogisticRegression

    xn, yn = _paired(x, y)
    train, test = pair_split(len(xn), train_fraction=train_fraction, seed=seed)

    def stack(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats = np.concatenate([xn[idx], yn[idx]], axis=0)
        labels = np.concatenate([np.zeros(len(idx), dtype=int), np.ones(len(idx), dtype=int)])
        return feats, labels

    x_tr, y_tr = stack(train)
    x_te, y_te = stack(test)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(x_tr, y_tr)
    return float(clf.score(x_te, y_te))


# --- geometry ---------------------------------------------------------------------------------


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def uniformity(a: ArrayLike, t: float = 2.0) -> float:
    """Uniformity (Wang & Isola 2020), t = 2: log mean_{i<j} exp(-t ||a_i - a_j||^2).

    Lower (more negative) = more uniformly spread on the sphere. Computed with a
    log-sum-exp over the strict upper triangle, so it does not underflow.
    """
    an = l2_normalize(a)
    n = len(an)
    if n < 2:
        raise ValueError("uniformity needs at least 2 embeddings")
    iu = np.triu_indices(n, k=1)
    logits = -t * _pairwise_sq_dists(an, an)[iu]
    peak = logits.max()
    return float(peak + np.log(np.exp(logits - peak).sum()) - np.log(len(logits)))


def alignment(x: ArrayLike, y: ArrayLike, alpha: float = 2.0) -> float:
    """Alignment (Wang & Isola 2020), alpha = 2: mean_i ||x_i - y_i||_2^alpha."""
    xn, yn = _paired(x, y)
    return float((np.linalg.norm(xn - yn, axis=1) ** alpha).mean())


def cone(a: ArrayLike) -> float:
    """Cone effect (Liang et al. 2022): mean cosine over all pairs i != j of one modality.

    Convention: the diagonal (each embedding with itself, cosine 1) is left out on purpose;
    a mean over the full matrix would add (1 - cone) / N.
    """
    an = l2_normalize(a)
    if len(an) < 2:
        raise ValueError("cone needs at least 2 embeddings")
    return _offdiag_mean(an @ an.T)


# --- retrieval --------------------------------------------------------------------------------


def _ranks_of_positive(scores: np.ndarray) -> np.ndarray:
    """Row i's positive is column i; its rank = #columns scoring strictly higher.

    Ties with the positive (e.g. two identical captions) do not count against it.
    """
    positive = np.diag(scores)[:, None]
    return (scores > positive).sum(axis=1)


def retrieval_recall(
    x: ArrayLike, y: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k of paired retrieval, both directions (CLIP_benchmark convention).

    Image->text: for image i, the fraction of queries whose own caption i is
    among the k captions of highest cosine; text->image likewise. Values in [0, 1].
    Keys: ``i2t_r@k`` and ``t2i_r@k``. Convention: a tie with the positive counts as a
    hit (rank = #candidates scoring strictly higher), on purpose: synthetic captions
    repeat word for word, and identical captions must not count against each other.
    """
    xn, yn = _paired(x, y)
    sim = xn @ yn.T
    rank_i2t = _ranks_of_positive(sim)
    rank_t2i = _ranks_of_positive(sim.T)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((rank_i2t < k).mean())
        out[f"t2i_r@{k}"] = float((rank_t2i < k).mean())
    return out


# --- few dimensions carry the gap -------------------------------------------------------------


def gap_dimensions(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Dimensions ranked by |mean_img - mean_txt| (descending), and those differences.

    Returns (order, abs_diff): ``order[0]`` is the dimension carrying the most gap.
    """
    xn, yn = l2_normalize(x), l2_normalize(y)
    abs_diff = np.abs(xn.mean(axis=0) - yn.mean(axis=0))
    order = np.argsort(-abs_diff, kind="stable")
    return order, abs_diff


def ablate_gap_dimensions(
    x: ArrayLike, y: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8)
) -> dict[str, float]:
    """Drop the top-k gap dimensions, renormalise, recompute the gap and R@1 (Schrodi et al.).

    As in the official analysis/gap_ablate_dims.py: rank dimensions by
    |mean_img - mean_txt|, remove the top k from both modalities, L2-normalise
    the rest, and recompute the gap (RMG, upstream's default, and L2M) and retrieval.
    Also reports the share of the squared gap ||Delta||^2 that the top-k dimensions
    carry. Keys per k: ``gap_top{k}_share``, ``ablate{k}_l2m``, ``ablate{k}_rmg``,
    ``ablate{k}_i2t_r@1``, ``ablate{k}_t2i_r@1``.
    """
    xn, yn = _paired(x, y)
    order, abs_diff = gap_dimensions(xn, yn)
    total = float((abs_diff**2).sum())
    out: dict[str, float] = {}
    dim = xn.shape[1]
    for k in ks:
        if not 0 < k < dim:
            raise ValueError(f"k={k} must be in 1..{dim - 1}")
        keep = np.sort(order[k:])
        xa, ya = l2_normalize(xn[:, keep]), l2_normalize(yn[:, keep])
        r1 = retrieval_recall(xa, ya, ks=(1,))
        out[f"gap_top{k}_share"] = float((abs_diff[order[:k]] ** 2).sum() / total) if total else 0.0
        out[f"ablate{k}_l2m"] = l2m(xa, ya)
        out[f"ablate{k}_rmg"] = rmg(xa, ya)
        out[f"ablate{k}_i2t_r@1"] = r1["i2t_r@1"]
        out[f"ablate{k}_t2i_r@1"] = r1["t2i_r@1"]
    return out


# --- object bias ------------------------------------------------------------------------------


def intra_inter_similarity(a: ArrayLike, labels: Sequence[Any]) -> tuple[float, float]:
    """(S_intra, S_inter): mean cosine over unordered pairs i < j sharing / not sharing a label."""
    an = l2_normalize(a)
    lab = np.asarray(labels)
    if len(lab) != len(an):
        raise ValueError(f"{len(lab)} labels for {len(an)} embeddings")
    iu = np.triu_indices(len(an), k=1)
    sims = (an @ an.T)[iu]
    same = lab[iu[0]] == lab[iu[1]]
    if not same.any() or same.all():
        raise ValueError("need at least one pair sharing and one pair not sharing a label")
    return float(sims[same].mean()), float(sims[~same].mean())


def moad(
    a: ArrayLike, object_labels: Sequence[Any], attribute_labels: Mapping[str, Sequence[Any]]
) -> dict[str, float]:
    """MOAD, object bias (Schrodi et al. 2025), on one modality's embeddings.

    MOAD = (S_intra_obj - S_inter_obj) - (S_intra_attr - S_inter_attr), where S is
    the mean cosine over pairs of embeddings that share (intra) / do not share
    (inter) the label. With several attributes the attribute term is the mean of
    the per-attribute terms. > 0: the space is organised by object more than by
    attribute. Keys: ``moad``, ``obj_margin`` and ``attr_margin_<name>`` per attribute.

    Convention: S is averaged over all unordered pairs i < j of the N embeddings (every
    class pair once), on purpose; the official code averages the upper triangle of a
    rectangular class-by-class block, which weighs classes by their size differently.
    """
    if not attribute_labels:
        raise ValueError("MOAD needs at least one attribute")
    intra, inter = intra_inter_similarity(a, object_labels)
    out = {"obj_margin": intra - inter}
    margins = []
    for name, labels in attribute_labels.items():
        a_intra, a_inter = intra_inter_similarity(a, labels)
        out[f"attr_margin_{name}"] = a_intra - a_inter
        margins.append(a_intra - a_inter)
    out["moad"] = out["obj_margin"] - float(np.mean(margins))
    return out


# --- everything that needs only paired embeddings --------------------------------------------


def gap_metrics(
    x: ArrayLike,
    y: ArrayLike,
    seed: int = 0,
    recall_ks: Sequence[int] = (1, 5, 10),
    ablate_ks: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, float]:
    """All gap, geometry, retrieval and gap-dimension metrics of paired embeddings, flat.

    Keys: l2m, l2i, rmg, linear_separability, uniformity_img, uniformity_txt,
    alignment, cone_img, cone_txt, i2t_r@k / t2i_r@k, and the keys of
    :func:`ablate_gap_dimensions` (only for k < embedding dim).
    """
    xn, yn = _paired(x, y)
    out: dict[str, float] = {
        "l2m": l2m(xn, yn),
        "l2i": l2i(xn, yn),
        "rmg": rmg(xn, yn),
        "linear_separability": linear_separability(xn, yn, seed=seed),
        "uniformity_img": uniformity(xn),
        "uniformity_txt": uniformity(yn),
        "alignment": alignment(xn, yn),
        "cone_img": cone(xn),
        "cone_txt": cone(yn),
    }
    out.update(retrieval_recall(xn, yn, ks=recall_ks))
    out.update(ablate_gap_dimensions(xn, yn, ks=[k for k in ablate_ks if k < xn.shape[1]]))
    return out
