"""Dataflow Flex Template entry point: ``capgap curate`` that submits the job and returns.

The launcher image (docker/flex_template/Dockerfile) runs this file with the template's
parameters as ``--name=value`` flags plus the Dataflow options (``--runner``, ``--project``,
``--region``, ``--temp_location``, ``--sdk_container_image``, ``--setup_file``, ...).

It parses and checks the options exactly as ``capgap curate`` does (``curate.parse``,
``curate.prepare_output``, ``curate.build``) but does not call ``curate.main``: that waits
for the job and then reads ``manifest.json``, which a Flex Template launch must not do (the
launcher only builds and submits the graph; the job writes the manifest when it finishes).
Exit codes follow ``capgap curate``: 0 submitted, 2 a bad option / input / output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def launch(argv: Sequence[str]) -> int:
    import apache_beam as beam

    from capgap.core.config import ConfigError
    from capgap.pipeline import curate

    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return curate.main(["--help"])
    logging.getLogger().setLevel(logging.INFO)  # the launcher's log shows the submission
    try:
        cfg, options = curate.parse(argv)
        curate.prepare_output(cfg)
        pipeline = beam.Pipeline(options=options)
        curate.build(pipeline, cfg)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"capgap curate (flex template): {err}", file=sys.stderr)
        return 2
    pipeline.run()  # submit only: no wait_until_finish in a Flex Template launch
    return 0


if __name__ == "__main__":
    raise SystemExit(launch(sys.argv[1:]))
