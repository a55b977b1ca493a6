"""Scheduled builds: the cache plan and the lineage that ``capgap curate`` records.

``capgap curate --cache PREFIX`` (or ``--cache auto``: ``<output>-cache`` next to the
output) reuses per-record model work across builds through the content-addressed cache of
:mod:`capgap.transforms.cache`. This module decides, before the pipeline runs, which cache
spaces the build uses and which committed part files it reads (:func:`plan_cache`), adds the
commit step to the graph (:func:`commit_cache`), and compares the input with the previous
build's (``--previous OUT``, else the cache's latest commit record for the same output):
new / unchanged / changed / removed shards, by (relative path, size, mtime)
(:func:`lineage`).

    cache = plan_cache(cfg, build_id, model_cfg, stage_cfg)
    manifest["lineage"] = lineage(build_id, plan, cfg.previous, cache, cfg.output)
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from capgap.models.recaption_handler import gate_clip
from capgap.transforms.bank import EmbedOutsideBank
from capgap.transforms.cache import (
    CachedEmbed,
    Space,
    captioner_space,
    committed_files,
    embed_space,
    gate_space,
    read_commits,
)
from capgap.transforms.cache_write import CommitCache, WriteEntries, count_stages
from capgap.transforms.embed import EmbedPairs
from capgap.transforms.readers import InputPlan
from capgap.transforms.readers.discover import relative_name
from capgap.transforms.recaption import RecaptionCache
from capgap.transforms.schema import MANIFEST

AUTO = "auto"


def cache_prefix(cache: str, output: str) -> str:
    """``auto`` -> ``<output>-cache`` (a sibling of the output prefix), else ``cache``."""
    return output.rstrip("/") + "-cache" if cache == AUTO else cache.rstrip("/")


@dataclass
class CachePlan:
    """The cache a build reads and writes: its prefix, this build's id, the commit records
    found at planning time and the spaces of each stage (``embed``, ``caption``, ``gate``)."""

    prefix: str
    build_id: str
    commits: list[dict[str, Any]]
    decode: Any  # DecodeConfig: a miss decodes its pixels again
    spaces: dict[str, Space] = field(default_factory=dict)

    def files(self, stage: str) -> list[str]:
        return committed_files(self.commits, self.spaces[stage], self.prefix)

    def embed(self, model: Any, stage: str, write: bool = True, bank: Any = None) -> CachedEmbed:
        """The cache stage of ``model``'s embeddings; ``bank``: the bank pass's PCollection,
        whose rows' embeddings the misses take from it instead of the model."""
        embed = None
        if bank is not None:
            embed = EmbedOutsideBank(EmbedPairs(model, new_rows=True), bank)
        return CachedEmbed(
            model,
            self.decode,
            self.spaces["embed"],
            self.files("embed"),
            stage,
            write=write,
            embed=embed,
        )

    @staticmethod
    def bank_model(model: Any) -> Any:
        """The bank pass's model config: its RunInference counters apart (as EmbedBank's)."""
        return dataclasses.replace(model, metrics_namespace=f"{model.metrics_namespace}_bank")

    def recaption(self) -> RecaptionCache | None:
        if "caption" not in self.spaces:
            return None
        gate = self.spaces.get("gate")
        return RecaptionCache(
            self.spaces["caption"],
            self.files("caption"),
            gate,
            self.files("gate") if gate is not None else [],
        )


def plan_cache(cfg: Any, build_id: str, model: Any, stage: Any | None) -> CachePlan:
    """For a CurateConfig ``cfg`` with ``cache`` set: spaces for the CLIP ``model`` (and the
    captioner and gate when the recaption ``stage`` runs) and the commit records found."""
    prefix = cache_prefix(cfg.cache, cfg.output)
    spaces = {"embed": embed_space(model, cfg.decode)}
    if stage is not None:
        spaces["caption"] = captioner_space(stage.captioner)
        if stage.gate.enabled:
            spaces["gate"] = gate_space(gate_clip(stage.gate.clip_run, stage.gate.device, model))
    return CachePlan(prefix, build_id, read_commits(prefix), cfg.decode, spaces)


def commit_cache(
    p: beam.Pipeline, plan: CachePlan, stages_used: list[Any], output: str, inputs: InputPlan
):
    """Write each stage's new entries and then the commit record; returns a one-element
    PCollection: what the manifest records of the cache. ``stages_used``: the cached
    transforms, applied (their ``cache_outputs``: ``entries`` by space, ``stages``: hit /
    miss PCollections); None entries are skipped."""
    entries: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    for transform in stages_used:
        if transform is not None:
            entries.update(transform.cache_outputs["entries"])
            stages.update(transform.cache_outputs["stages"])
    record = {
        "output": output,
        "input_pattern": inputs.pattern,
        "input_shards": input_shards(inputs),
    }
    counts = stages | "CacheCounts" >> _CountStages()
    written = {
        name: pcoll
        | f"CacheWrite{name.title()}" >> WriteEntries(plan.prefix, plan.spaces[name], plan.build_id)
        for name, pcoll in sorted(entries.items())
    }
    spaces = {name: plan.spaces[name] for name in written}
    return written | "CacheCommit" >> CommitCache(
        plan.prefix, plan.build_id, spaces, record, counts
    )


class _CountStages(beam.PTransform):
    def expand(self, branches):
        return count_stages(branches)


# --- lineage ---------------------------------------------------------------------------------


def input_shards(plan: InputPlan) -> dict[str, dict[str, Any]]:
    """{relative path: {size, mtime}} of the build's input shards."""
    return {
        relative_name(path, plan.base_dir): {"size": size, "mtime": mtime}
        for path, size, mtime in plan.files
    }


def _read_json(path: str) -> dict[str, Any]:
    with FileSystems.open(path) as fh:
        return json.loads(fh.read().decode("utf-8"))


def previous_build(
    previous: str | None, cache: CachePlan | None, output: str, input_pattern: str
) -> tuple[dict[str, Any] | None, str | None]:
    """(the previous build's record with ``build_id`` and ``input_shards``, where it came
    from): ``--previous OUT``'s manifest, else the cache's latest commit record for
    ``output``, else for ``input_pattern``."""
    if previous:
        path = posixpath.join(previous, MANIFEST)
        if not FileSystems.exists(path):
            raise FileNotFoundError(f"--previous {previous}: no {MANIFEST} (not a finished build)")
        manifest = _read_json(path)
        return {
            "build_id": manifest.get("build_id"),
            "input_shards": manifest.get("input", {}).get("shards"),
        }, f"previous:{previous}"
    if cache is not None:
        # The latest build into the same output, else over the same input pattern (a
        # scheduled build often writes each run to a new dated prefix).
        for same in (
            lambda c: c.get("output") == output,
            lambda c: c.get("input_pattern") == input_pattern,
        ):
            mine = [c for c in cache.commits if same(c)]
            if mine:
                return mine[-1], f"cache:{mine[-1]['_path']}"
    return None, None


def input_changes(current: dict[str, dict], before: dict[str, dict] | None) -> dict[str, Any]:
    """new / unchanged / changed / removed shard names between two ``input_shards``."""
    if before is None:
        return {"known": False, "new": sorted(current)}
    changed = [n for n in current if n in before and before[n] != current[n]]
    return {
        "known": True,
        "new": sorted(n for n in current if n not in before),
        "changed": sorted(changed),
        "removed": sorted(n for n in before if n not in current),
        "unchanged": len([n for n in current if n in before and before[n] == current[n]]),
    }


def lineage(
    build_id: str,
    plan: InputPlan,
    previous: str | None,
    cache: CachePlan | None,
    output: str,
) -> dict[str, Any]:
    """The manifest's ``lineage``: this build's id, the previous build's and the input's
    changes since it."""
    shards = input_shards(plan)
    record, source = previous_build(previous, cache, output, plan.pattern)
    before = (record or {}).get("input_shards")
    return {
        "build_id": build_id,
        "previous_build_id": (record or {}).get("build_id"),
        "previous_source": source,
        "inputs": input_changes(shards, before),
    }
