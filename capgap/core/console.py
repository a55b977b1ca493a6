"""What capgap's commands print: quiet the third-party noise a user cannot act on.

- Beam logs "apitools not found, and bigquery client libraries are not available" on the
  root logger each time it is imported without the ``gcp`` extra; capgap uses no BigQuery,
  so the line is dropped (every other record passes).
- transformers warns "We strongly recommend passing in an `attention_mask`" when a caption
  that finished early is padded inside ``generate`` (the decoder sees its own padding);
  the captioner, not the user, calls ``generate``, and the output is right, so it is
  dropped too.
- transformers checks a SigLIP text config's token ids against the default vocabulary
  before the checkpoint's own size is set, and warns that the (valid) bos / eos ids are out
  of range; SigLIP pools the last position and uses neither, so those two are dropped.
- Hugging Face's "Loading weights" / "Writing model shards" bars are turned off when stderr
  is not a terminal (logs of scheduled builds, CI), through ``HF_HUB_DISABLE_PROGRESS_BARS``,
  which transformers reads when it is first imported; a value the user set wins.

``capgap`` (``pipeline/cli.py``) calls :func:`quiet_third_party_output` before it imports a
command, and ``pipeline/jobs.py`` in each process it spawns.
"""

from __future__ import annotations

import logging
import os
import sys

# logger name -> the starts of the messages dropped from it
_NOISE: dict[str, tuple[str, ...]] = {
    "": ("apitools not found, and bigquery client libraries",),
    "transformers.modeling_utils": ("We strongly recommend passing in an `attention_mask`",),
    "transformers.configuration_utils": (
        "Model config: bos_token_id must be `None` or an integer within the vocabulary",
        "Model config: eos_token_id must be `None` or an integer within the vocabulary",
    ),
}


class DropThirdPartyNoise(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_third_party_output() -> None:
    """Install the filters (once; a filter acts on records logged to its own logger, so each
    sits on the logger that emits the noise) and turn HF bars off when not on a TTY."""
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropThirdPartyNoise) for f in logger.filters):
            logger.addFilter(DropThirdPartyNoise(prefixes))
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
