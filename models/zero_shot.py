"""Zero-shot classifiers for the synthetic world's object and each attribute.

A class is described by prompt templates: ``{}`` takes the class value, and a
named field -- ``{object}`` or an attribute such as ``{colour}`` -- expands over
that label's whole vocabulary (``"a {} {object}"`` -> "a red circle", "a red
square", ...), so that a prompt can follow the captions' own grammar. Prompts keep the world's
article "a" even before a vowel, as its captions do. The classifier weight of a
class is the CLIP recipe (Radford et al. 2021; CLIP_benchmark's
zero_shot_classifier): L2-normalise every prompt embedding, average them (first
over a template's object expansions, then over templates), renormalise. The
prediction is the class of highest cosine with the image embedding.

    weights = build_classifiers(model, tokenizer, templates=default_templates())
    accs = zero_shot_accuracies(img_emb, {"object": labels, ...}, weights)
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from capgap.core import world
from capgap.models.metrics import ArrayLike, l2_normalize


def default_templates() -> dict[str, list[str]]:
    """Prompt templates per task: a generic prompt plus one in the captions' grammar."""
    return {
        "object": ["a {}", "a photo of a {}"],
        "colour": ["a {} object", "a {} {object}"],
        "size": ["a {} object", "a {} {object}"],
        "position": ["an object at the {}", "a {object} at the {}"],
        "background": ["an object on a {} background", "a {object} on a {} background"],
        "texture": ["a {} object", "a {} {object}"],
    }


def task_classes() -> dict[str, tuple[str, ...]]:
    """Class names per zero-shot task: ``object`` and each attribute of the world."""
    return {"object": world.OBJECTS, **world.ATTRIBUTES}


def expand_template(template: str, value: str) -> list[str]:
    """The prompts of one template for one class value.

    ``{}`` is the value; each named field (``{object}``, ``{colour}``, ``{size}``,
    ``{position}``, ``{background}``, ``{texture}``) expands over that label's whole
    vocabulary, several fields as their cartesian product, in a fixed order.
    """
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    vocab = task_classes()
    unknown = [n for n in names if n not in vocab]
    if unknown:
        raise ValueError(f"template {template!r}: unknown field {{{unknown[0]}}}")
    fields = list(dict.fromkeys(names))
    combos = itertools.product(*(vocab[n] for n in fields))
    return [template.format(value, **dict(zip(fields, combo, strict=True))) for combo in combos]


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """L2-normalised ``model.encode_text`` embeddings of ``texts``, float32 numpy (N, D)."""
    if device is None:
        device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(model.encode_text(tokens).float().cpu())
    return l2_normalize(torch.cat(chunks).numpy()).astype(np.float32)


def classifier_weights(
    encode: Callable[[Sequence[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """(C, D) unit class weights from text embedding function ``encode`` (see module doc)."""
    if not templates:
        raise ValueError("need at least one prompt template")
    prompts, owners = [], []  # owners: (class index, template index) of each prompt
    for c, value in enumerate(classnames):
        for t, template in enumerate(templates):
            for prompt in expand_template(template, value):
                prompts.append(prompt)
                owners.append((c, t))
    emb = l2_normalize(encode(prompts))
    owners_arr = np.asarray(owners)
    weights = np.zeros((len(classnames), emb.shape[1]))
    for c in range(len(classnames)):
        per_template = []
        for t in range(len(templates)):
            rows = emb[(owners_arr[:, 0] == c) & (owners_arr[:, 1] == t)]
            per_template.append(l2_normalize(rows.mean(axis=0, keepdims=True))[0])
        weights[c] = np.mean(per_template, axis=0)
    return l2_normalize(weights)


def build_classifiers(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    templates: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Classifier weights for every task in ``templates`` (default: :func:`default_templates`)."""
    templates = default_templates() if templates is None else templates
    classes = task_classes()
    unknown = sorted(set(templates) - set(classes))
    if unknown:
        raise ValueError(f"no zero-shot task {unknown[0]!r}; tasks: {sorted(classes)}")

    def encode(texts: Sequence[str]) -> np.ndarray:
        return encode_texts(model, tokenizer, texts, batch_size=batch_size)

    return {task: classifier_weights(encode, classes[task], tpl) for task, tpl in templates.items()}


def label_indices(task: str, labels: Sequence[str]) -> np.ndarray:
    """Class indices of ground-truth label strings; unknown labels raise."""
    index = {name: i for i, name in enumerate(task_classes()[task])}
    try:
        return np.asarray([index[label] for label in labels], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"label {err.args[0]!r} is not a {task} of the world") from err


def zero_shot_accuracies(
    img: ArrayLike, labels: Mapping[str, Sequence[str]], weights: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Top-1 accuracy per task with labels, flat: ``zs_acc_<task>`` and ``zs_acc_attr_mean``.

    ``zs_acc_attr_mean`` averages the attribute tasks (every task but ``object``).
    """
    x = l2_normalize(img)
    out: dict[str, float] = {}
    for task, w in weights.items():
        if task not in labels:
            continue
        pred = np.argmax(x @ l2_normalize(w).T, axis=1)
        out[f"zs_acc_{task}"] = float((pred == label_indices(task, labels[task])).mean())
    attrs = [v for k, v in out.items() if k != "zs_acc_object"]
    if attrs:
        out["zs_acc_attr_mean"] = float(np.mean(attrs))
    return out
