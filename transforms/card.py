"""The Hugging Face dataset card (``README.md``) at the root of a ``capgap curate`` output.

Its YAML header declares one ``datasets`` config per output folder, so the output folder
is a Hugging Face dataset as it lies (local or pushed to the Hub)::

    datasets.load_dataset(OUT)                 # config "curated" (the default), split train
    datasets.load_dataset(OUT, "rejected")     # the same columns, decision "drop"
    datasets.load_dataset(OUT, "errors")       # errors/: a reference and a reason per row

The body says what the build kept and how to read it with other tools. Written by
``WriteManifestFn`` (``transforms/write.py``) just before ``manifest.json``.

    python -m capgap.transforms.card OUT/manifest.json   # print the card of a finished build
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

from capgap.transforms.schema import CURATED, ERRORS, MANIFEST, REJECTED, WEBDATASET


def card_configs() -> list[dict[str, Any]]:
    """The ``configs:`` entries: one per output folder, ``curated`` the default."""
    out = []
    for name in (CURATED, REJECTED, ERRORS):
        entry: dict[str, Any] = {"config_name": name}
        if name == CURATED:
            entry["default"] = True
        entry["data_files"] = [{"split": "train", "path": f"{name}/*.parquet"}]
        out.append(entry)
    return out


def _header(manifest: dict[str, Any]) -> str:
    meta: dict[str, Any] = {
        "configs": card_configs(),
        "task_categories": ["zero-shot-image-classification", "image-to-text"],
        "tags": ["capgap", "image-text-pairs", "clip"],
        "size_categories": [_size_category(manifest["counts"].get(CURATED, 0))],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    for limit, label in ((1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "10M<n<100M" if n < 100_000_000 else "100M<n<1B"


def dataset_card(manifest: dict[str, Any]) -> str:
    """The card's text for a build whose manifest is ``manifest`` (written or about to be)."""
    counts = manifest["counts"]
    config = manifest.get("config", {})
    model = manifest.get("models", {}).get("clip", {})
    wds = manifest["outputs"].get(WEBDATASET)
    lines = [
        _header(manifest),
        "# capgap curate output",
        "",
        f"Image-text pairs curated by `capgap curate` from `{manifest['input']['pattern']}` "
        f"({manifest.get('finished_at', '')}), scored with CLIP model "
        f"`{model.get('id', '?')}`.",
        "",
        "| config | folder | rows |",
        "|---|---|---|",
        f"| `{CURATED}` (default) | `{CURATED}/` | {counts.get(CURATED, 0)} |",
        f"| `{REJECTED}` | `{REJECTED}/` | {counts.get(REJECTED, 0)} |",
        f"| `{ERRORS}` | `{ERRORS}/` | {counts.get(ERRORS, 0)} |",
        "",
        f"{counts.get('rows_in', 0)} input rows; each is in exactly one of the three. "
        f"`{CURATED}` and `{REJECTED}` share one schema: `image` (an `Image()` feature: "
        "`struct<bytes, path>`, the bytes in the format `image_format` names), `caption` "
        "(the recaptioned text where `caption_source` says so), `original_caption`, the "
        "scores `clip_score`, `certainty`, `imbalance`, the `decision` and its `reason`, "
        "the recaption columns (null where the row was not recaptioned), then the input's "
        f"own columns. `{ERRORS}` rows name the input record, the stage and the reason. "
        f"`{MANIFEST}` holds the full configuration, counts per reason and package versions.",
        "",
        "## Loading",
        "",
        "```python",
        "import datasets",
        "ds = datasets.load_dataset(OUT, split='train')             # curated",
        "rejected = datasets.load_dataset(OUT, 'rejected', split='train')",
        "",
        "import pyarrow.dataset as pds                              # one folder at a time:",
        f"table = pds.dataset(f'{{OUT}}/{CURATED}').to_table()        # the root also holds",
        f"both = pds.dataset([pds.dataset(f'{{OUT}}/{CURATED}'),       # errors/ (another",
        f"                    pds.dataset(f'{{OUT}}/{REJECTED}')]).to_table()  # schema) + files",
        "",
        "import polars as pl",
        f"df = pl.read_parquet([f'{{OUT}}/{CURATED}/*.parquet', f'{{OUT}}/{REJECTED}/*.parquet'])",
        "images = df['image'].struct.field('bytes')",
        "```",
    ]
    if wds:
        n = len(wds["shards"])
        lines += [
            "",
            f"The curated rows are also WebDataset tar shards: `{WEBDATASET}/shard-"
            f"{{00000..{n - 1:05d}}}.tar` ({wds['total_samples']} samples). Each sample: the "
            "image (`.jpg` / `.png` / `.webp`, as stored), `.txt` (the caption) and `.json` "
            "(uid, scores, original caption, ...). Sample keys are the uid made safe for "
            "WebDataset (`.`, `/`, `%` and other unsafe characters %-escaped); the real uid "
            "is in the `.json`.",
            "",
            "```python",
            "import webdataset as wds",
            f"urls = f'{{OUT}}/{WEBDATASET}/shard-{{{{00000..{n - 1:05d}}}}}.tar'",
            "pairs = wds.WebDataset(urls).decode('pil').to_tuple('jpg;png;webp', 'txt')",
            "```",
        ]
    thresholds = manifest.get("thresholds")
    if thresholds or config.get("decide"):
        lines += ["", "## Decision rules", "", "```json"]
        lines.append(json.dumps({"decide": config.get("decide"), "thresholds": thresholds}))
        lines.append("```")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m capgap.transforms.card OUT/manifest.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        print(dataset_card(json.load(fh)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
