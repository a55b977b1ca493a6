"""Robustness of cross-modal predictions, and the post-hoc mean shift (Chowers et al. 2026).

Chowers, Naparstek, Barzelay & Weiss, "Is the Modality Gap a Bug or a Feature?
A Robustness Perspective" (CVPR 2026, arXiv:2603.29080): when contrastive
training separates the modalities by a global gap vector orthogonal to the
embeddings, closing the gap after training leaves clean accuracy unchanged but
makes predictions flip less often when the embeddings are perturbed.

A prediction is the arg-max cosine of a query embedding over a gallery
(zero-shot: image -> class prompts; retrieval: image -> captions or caption ->
images). The *flip rate* under a perturbation is the fraction of queries whose
prediction differs from the clean one. Perturbations:

- Gaussian: e + n, n ~ N(0, (sigma^2 / D) I), then L2-renormalised; so sigma is
  the expected norm of the noise vector whatever the embedding dimension D.
  Seeded; before / after the mean shift use the same noise draws.
- Quantisation: uniform per-dimension with 2^bits levels between the minimum
  and maximum of that dimension over a reference set of the same modality,
  de-quantised and L2-renormalised (int8: bits=8, int4: bits=4).

The mean shift (:class:`MeanShift`), with Delta = mean image - mean caption of a
fit set and g = Delta / ||Delta||:
  1. ``project`` mode: remove the gap component from both modalities,
     e <- (e - (e . g) g), L2-renormalised (Chowers et al.'s step of taking the
     gap vector out of the embeddings' span; for a gap orthogonal to the
     embeddings it keeps every cosine ranking exactly, and the renormalisation
     is what enlarges the margins relative to a fixed perturbation);
  2. move the chosen modality to the other's mean: add the fit-set mean
     difference left after step 1 (the full -Delta in ``translate`` mode, which
     skips step 1);
  3. L2-renormalise.

    from capgap.models import robustness
    shift = robustness.MeanShift.fit(img, txt)
    out = robustness.robustness_metrics(tasks, refs, sigmas=(0.1, 0.3), bits=(8, 4))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from capgap.models.metrics import ArrayLike, l2_normalize

Modality = Literal["image", "text"]


# --- perturbations ----------------------------------------------------------------------------


def gaussian_perturb(emb: ArrayLike, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``emb`` (L2-normalised) plus N(0, sigma^2 / D) noise per coordinate, renormalised."""
    e = l2_normalize(emb)
    if sigma < 0:
        raise ValueError("sigma must be >= 0")
    noise = rng.standard_normal(e.shape) * (sigma / np.sqrt(e.shape[1]))
    return l2_normalize(e + noise)


def fit_quantizer(reference: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (min, max) of L2-normalised ``reference`` embeddings: the quantiser range."""
    ref = l2_normalize(reference)
    return ref.min(axis=0), ref.max(axis=0)


def quantize(emb: ArrayLike, bits: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Uniform per-dimension quantisation to 2^bits levels on [lo, hi], de-quantised, renormalised.

    Values outside the range are clipped to it. A dimension with lo == hi maps to lo.
    """
    if bits < 1:
        raise ValueError("bits must be >= 1")
    e = l2_normalize(emb)
    levels = 2**bits - 1
    span = np.where(hi > lo, hi - lo, 1.0)
    codes = np.clip(np.rint((e - lo) / span * levels), 0, levels)
    return l2_normalize(lo + codes / levels * np.where(hi > lo, hi - lo, 0.0))


# --- predictions ------------------------------------------------------------------------------


def predict(queries: ArrayLike, gallery: ArrayLike) -> np.ndarray:
    """Index of the gallery row of highest cosine, per query row (ties: the lowest index).

    So ``*_clean_acc`` of retrieval can sit slightly below R@1 of
    :func:`capgap.models.metrics.retrieval_recall`, which counts a tie with the
    positive (e.g. two identical captions) as a hit.
    """
    return np.argmax(l2_normalize(queries) @ l2_normalize(gallery).T, axis=1)


def flip_rate(clean: ArrayLike, perturbed: ArrayLike) -> float:
    """Fraction of predictions that differ between the clean and the perturbed run."""
    a, b = np.asarray(clean), np.asarray(perturbed)
    if a.shape != b.shape:
        raise ValueError(f"prediction shapes differ: {a.shape} vs {b.shape}")
    return float((a != b).mean())


# --- the post-hoc mean shift ------------------------------------------------------------------


@dataclass(frozen=True)
class MeanShift:
    """Post-hoc gap removal (Chowers et al. 2026), fitted on paired embeddings.

    ``direction`` is the unit gap direction g (image mean - caption mean);
    ``offset`` is what the moved modality is translated by (added) after the
    gap component is removed; ``project`` says whether the component along g
    is removed from both modalities (module docstring).
    """

    direction: np.ndarray
    offset: np.ndarray
    moved: Modality
    project: bool

    @classmethod
    def fit(
        cls,
        img: ArrayLike,
        txt: ArrayLike,
        moved: Modality = "image",
        mode: Literal["project", "translate"] = "project",
    ) -> MeanShift:
        if moved not in ("image", "text"):
            raise ValueError(f"moved must be 'image' or 'text', got {moved!r}")
        if mode not in ("project", "translate"):
            raise ValueError(f"mode must be 'project' or 'translate', got {mode!r}")
        x, y = l2_normalize(img), l2_normalize(txt)
        delta = x.mean(axis=0) - y.mean(axis=0)
        norm = float(np.linalg.norm(delta))
        direction = delta / norm if norm > 0 else np.zeros_like(delta)
        project = mode == "project"
        if project:
            x, y = l2_normalize(_remove(x, direction)), l2_normalize(_remove(y, direction))
        mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
        offset = (mu_y - mu_x) if moved == "image" else (mu_x - mu_y)
        return cls(direction=direction, offset=offset, moved=moved, project=project)

    def apply(self, emb: ArrayLike, modality: Modality) -> np.ndarray:
        """Shifted, renormalised embeddings of ``modality`` ("image" or "text")."""
        e = l2_normalize(emb)
        if self.project:
            e = l2_normalize(_remove(e, self.direction))
        if modality == self.moved:
            e = e + self.offset
        return l2_normalize(e)

    @property
    def gap_norm_removed(self) -> float:
        return float(np.linalg.norm(self.offset))


def _remove(e: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return e - (e @ direction)[:, None] * direction[None, :]


# --- robustness of a set of prediction tasks --------------------------------------------------


@dataclass
class Task:
    """One arg-max prediction task: queries of one modality against a gallery of the other.

    ``targets`` (correct gallery index per query) gives the clean accuracy; may be None.
    """

    name: str
    queries: np.ndarray
    gallery: np.ndarray
    query_modality: Modality
    targets: np.ndarray | None = None

    @property
    def gallery_modality(self) -> Modality:
        return "text" if self.query_modality == "image" else "image"


def _perturbed_predictions(
    task: Task,
    refs: Mapping[Modality, np.ndarray],
    kind: str,
    level: float,
    rng: np.random.Generator | None,
    perturb: Literal["query", "both"],
) -> np.ndarray:
    q, g = task.queries, task.gallery
    if kind == "noise":
        assert rng is not None
        q = gaussian_perturb(q, level, rng)
        if perturb == "both":
            g = gaussian_perturb(g, level, rng)
    else:
        lo, hi = fit_quantizer(refs[task.query_modality])
        q = quantize(q, int(level), lo, hi)
        if perturb == "both":
            lo, hi = fit_quantizer(refs[task.gallery_modality])
            g = quantize(g, int(level), lo, hi)
    return predict(q, g)


def task_robustness(
    task: Task,
    refs: Mapping[Modality, np.ndarray],
    sigmas: Sequence[float] = (0.1, 0.2, 0.3, 0.5),
    bits: Sequence[int] = (8, 4),
    n_trials: int = 3,
    seed: int = 0,
    perturb: Literal["query", "both"] = "query",
    prefix: str | None = None,
) -> dict[str, float]:
    """Clean accuracy and flip rates of one task, flat.

    Keys (``p`` = ``prefix`` or the task name): ``{p}_clean_acc`` (when targets
    are given), ``{p}_flip_noise{sigma}`` (mean over ``n_trials`` seeded noise
    draws), ``{p}_acc_noise{sigma}``, ``{p}_flip_int{bits}``. ``refs`` holds one
    reference set per modality for the quantiser ranges. The noise stream is
    derived from (seed, task name, sigma index, trial), so the same task
    evaluated before and after a mean shift sees identical noise.
    """
    p = prefix or task.name
    clean = predict(task.queries, task.gallery)
    out: dict[str, float] = {}
    if task.targets is not None:
        out[f"{p}_clean_acc"] = float((clean == task.targets).mean())
    name_key = int.from_bytes(task.name.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    for i, sigma in enumerate(sigmas):
        flips, accs = [], []
        for trial in range(n_trials):
            rng = np.random.default_rng([seed, name_key, i, trial])
            pred = _perturbed_predictions(task, refs, "noise", sigma, rng, perturb)
            flips.append(flip_rate(clean, pred))
            if task.targets is not None:
                accs.append(float((pred == task.targets).mean()))
        out[f"{p}_flip_noise{sigma:g}"] = float(np.mean(flips))
        if accs:
            out[f"{p}_acc_noise{sigma:g}"] = float(np.mean(accs))
    for b in bits:
        pred = _perturbed_predictions(task, refs, "quant", b, None, perturb)
        out[f"{p}_flip_int{b}"] = flip_rate(clean, pred)
    return out


def robustness_metrics(
    tasks: Sequence[Task],
    img: ArrayLike,
    txt: ArrayLike,
    sigmas: Sequence[float] = (0.1, 0.2, 0.3, 0.5),
    bits: Sequence[int] = (8, 4),
    n_trials: int = 3,
    seed: int = 0,
    perturb: Literal["query", "both"] = "query",
    moved: Modality = "image",
    mode: Literal["project", "translate"] = "project",
    fit: tuple[ArrayLike, ArrayLike] | None = None,
    shift_prefix: str = "shift_",
    unshifted: bool = True,
) -> dict[str, float]:
    """Flip rates of every task before and after the mean shift, flat.

    The shift is fitted on ``fit`` = (image, caption) embeddings of held-out pairs when
    given (Chowers et al. fit it on data from the training distribution, not on the pairs
    it is evaluated on), else on the evaluated pairs ``img`` / ``txt`` themselves; those
    also serve as quantiser references. It is applied to each task's queries and gallery
    by modality. Keys: those of :func:`task_robustness` for each task (unless
    ``unshifted`` is False), the same prefixed ``shift_prefix`` after the shift (e.g.
    ``shift_zs_object_clean_acc``), and ``<shift_prefix>l2m`` (L2M of ``img`` / ``txt``
    after the shift).
    """
    from capgap.models.metrics import l2m

    x, y = l2_normalize(img), l2_normalize(txt)
    fit_x, fit_y = (x, y) if fit is None else (l2_normalize(fit[0]), l2_normalize(fit[1]))
    shift = MeanShift.fit(fit_x, fit_y, moved=moved, mode=mode)
    refs = {"image": x, "text": y}
    shifted_refs = {"image": shift.apply(x, "image"), "text": shift.apply(y, "text")}
    out: dict[str, float] = {f"{shift_prefix}l2m": l2m(shifted_refs["image"], shifted_refs["text"])}
    kwargs = dict(sigmas=sigmas, bits=bits, n_trials=n_trials, seed=seed, perturb=perturb)
    for task in tasks:
        if unshifted:
            out.update(task_robustness(task, refs, **kwargs))
        shifted = Task(
            name=task.name,
            queries=shift.apply(task.queries, task.query_modality),
            gallery=shift.apply(task.gallery, task.gallery_modality),
            query_modality=task.query_modality,
            targets=task.targets,
        )
        prefix = f"{shift_prefix}{task.name}"
        out.update(task_robustness(shifted, shifted_refs, prefix=prefix, **kwargs))
    return out
