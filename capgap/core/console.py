"""What capgap's commands print: quiet the third-party noise a user cannot act on.

- Beam logs "apitools not found, and bigquery client libraries are not available" on the
  root logger each time it is imported without the ``gcp`` extra; capgap uses no BigQuery,
  so the line is dropped (every other record passes).
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

_NOISE_PREFIXES: tuple[str, ...] = ("apitools not found, and bigquery client libraries",)


class DropThirdPartyNoise(logging.Filter):
    """Drops the log records listed in ``_NOISE_PREFIXES``; passes every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE_PREFIXES)


def quiet_third_party_output() -> None:
    """Install the filter on the root logger (once) and turn HF bars off when not on a TTY."""
    root = logging.getLogger()
    if not any(isinstance(f, DropThirdPartyNoise) for f in root.filters):
        root.addFilter(DropThirdPartyNoise())
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
