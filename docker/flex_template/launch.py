"""Dataflow Flex Template entry point: ``capgap curate`` that submits the job and returns.

The launcher image (docker/flex_template/Dockerfile) runs this file with the template's
parameters as ``--name=value`` flags plus the Dataflow options (``--runner``, ``--project``,
``--region``, ``--temp_location``, ``--sdk_container_image``, ``--setup_file``, ...).

It parses and checks the options exactly as ``capgap curate`` does (``curate.parse``, then
``curate.planned_pipeline``) and submits the graph, but does not wait as ``curate.main``
does: a Flex Template launcher only submits, and the job writes its manifest when it
finishes.
Exit codes follow ``capgap curate``: 0 submitted, 2 a bad option / input / output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def launch(argv: Sequence[str]) -> int:
    from capgap.core.config import ConfigError
    from capgap.pipeline import curate

    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return curate.main(["--help"])
    logging.getLogger().setLevel(logging.INFO)  # the launcher's log shows the submission
    try:
        cfg, options = curate.parse(argv)
        pipeline = curate.planned_pipeline(cfg, options)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"capgap curate (flex template): {err}", file=sys.stderr)
        return 2
    pipeline.run()  # submit only: no wait_until_finish in a Flex Template launch
    return 0


if __name__ == "__main__":
    raise SystemExit(launch(sys.argv[1:]))
