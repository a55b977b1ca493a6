"""The cache's sinks: new entries as Parquet part files, then the commit record that names them.

:class:`WriteEntries` writes one space's new entries with Beam's Parquet sink (temp folder,
renamed when finalised) under ``PREFIX/<kind>/<space>/<build_id>/``; :class:`CommitCache`
runs once after every such sink finalised and writes ``PREFIX/commits/<build_id>.json``
(a temp name, then a rename) listing them. Readers (:func:`capgap.transforms.cache.read_commits`)
take only files a commit record names, so a build killed before its commit leaves nothing
that a later build reads. See :mod:`capgap.transforms.cache` for the layout.

    written = {"embed": entries | WriteEntries(prefix, space, build_id)}
    summary = written | CommitCache(prefix, build_id, {"embed": space}, record, stage_counts)
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from capgap.transforms.cache import (
    HIT,
    MISS,
    SCHEMAS,
    Space,
    commit_folder,
    relative,
)
from capgap.transforms.write import RowsToArrowFn, write_json


class WriteEntries(beam.PTransform):
    """Entry dicts of ``space`` -> Parquet part files under ``<space folder>/<build_id>/``
    (Beam's sink: temp folder, renamed when finalised); returns the file names."""

    def __init__(self, prefix: str, space: Space, build_id: str) -> None:
        super().__init__()
        self.prefix, self.space, self.build_id = prefix, space, build_id

    def expand(self, entries):
        schema = SCHEMAS[self.space.kind]
        folder = posixpath.join(self.space.folder(self.prefix), self.build_id)
        return (
            entries
            | "ToArrow" >> beam.ParDo(RowsToArrowFn(schema))
            | "Write"
            >> beam.io.WriteToParquetBatched(
                posixpath.join(folder, "part"),
                schema=schema,
                file_name_suffix=".parquet",
                codec="snappy",
            )
        )


def count_stages(branches: dict[str, Any]):
    """{"<stage>.<hit|miss>": PCollection} -> one {stage: {hit: n, miss: n}} dict."""

    def merge(pairs: list[tuple[str, int]]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, n in sorted(pairs):
            stage, what = name.rsplit(".", 1)
            out.setdefault(stage, {HIT: 0, MISS: 0})[what] = n
        return out

    counted = [
        pcoll
        | f"Count{name}" >> beam.combiners.Count.Globally()
        | f"Name{name}" >> beam.Map(lambda n, name=name: (name, n))
        for name, pcoll in sorted(branches.items())
    ]
    return (
        counted
        | "AllStages" >> beam.Flatten()
        | "StagesToList" >> beam.combiners.ToList()
        | "AsStages" >> beam.Map(merge)
    )


class CommitFn(beam.DoFn):
    """Runs once, after every entry sink finalised: writes ``commits/<build_id>.json``
    (through a temp name and a rename) and yields what the manifest records of the cache."""

    def __init__(
        self, prefix: str, build_id: str, spaces: dict[str, Space], record: dict[str, Any]
    ) -> None:
        self.prefix, self.build_id, self.spaces, self.record = prefix, build_id, spaces, record

    def process(self, _unused, written, stages) -> Iterator[dict[str, Any]]:
        by_space: dict[str, list[str]] = {name: [] for name in self.spaces}
        for name, path in written:
            by_space[name].append(relative(path, self.prefix))
        spaces = {}
        for name, space in self.spaces.items():
            spaces[f"{space.kind}/{space.fingerprint}"] = {
                "stage": name,
                "settings": space.settings,
                "files": sorted(by_space[name]),
                "computed": stages.get(name, {}).get(MISS, 0),
            }
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {
            "build_id": self.build_id,
            "finished_at": finished,
            "spaces": spaces,
            "stages": stages,
            **self.record,
        }
        path = posixpath.join(commit_folder(self.prefix), f"{self.build_id}.json")
        write_json(path, record)
        yield {
            "prefix": self.prefix,
            "commit": relative(path, self.prefix),
            "stages": stages,
            "spaces": {
                name: {"fingerprint": s.fingerprint, "settings": s.settings}
                for name, s in self.spaces.items()
            },
        }


class CommitCache(beam.PTransform):
    """{space name: written file names} -> the cache summary dict (one element), after the
    commit record is written."""

    def __init__(
        self,
        prefix: str,
        build_id: str,
        spaces: dict[str, Space],
        record: dict[str, Any],
        stages,
    ) -> None:
        super().__init__()
        self.prefix, self.build_id, self.spaces = prefix, build_id, spaces
        self.record, self.stages = record, stages

    def expand(self, written: dict[str, Any]):
        named = [
            files | f"Name{name}" >> beam.Map(lambda f, name=name: (name, f))
            for name, files in sorted(written.items())
        ]
        files = named | "AllFiles" >> beam.Flatten()
        return (
            files.pipeline
            | "CommitTrigger" >> beam.Create([None])
            | "Commit"
            >> beam.ParDo(
                CommitFn(self.prefix, self.build_id, self.spaces, self.record),
                written=beam.pvalue.AsList(files),
                stages=beam.pvalue.AsSingleton(self.stages),
            )
        )
