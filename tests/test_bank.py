"""The bank pass (transforms/bank.py): which uids become the reference bank.

The bank must be the ``bank_size`` first-seen uids with the smallest salted hash among
those that embed, whatever fails to decode among the candidates (the surplus
``bank_oversample`` stands in for them), and never a later copy of a duplicate uid; the
main pass takes the bank rows' embeddings from it instead of the model.

    .venv/bin/python -m pytest -q tests/test_bank.py
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig
from capgap.pipeline import curate
from capgap.pipeline.curate import CurateConfig, with_model_side
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms.accounting import counter_values
from capgap.transforms.bank import BankCandidates, EmbedBank, candidate_count, uid_hash
from capgap.transforms.captions import CaptionConfig
from capgap.transforms.decode import DecodeConfig, decode_image
from capgap.transforms.dedup import FirstRefs
from capgap.transforms.readers import ReadConfig, ReadRecords, discover
from capgap.transforms.readers.record import is_derived
from capgap.transforms.score import ScoreConfig

N_ROWS = 20


@pytest.fixture(scope="module")
def bank_input(tmp_path_factory):
    """20 rows; the smallest-hash uid has a broken image, the next one a later duplicate."""
    root = tmp_path_factory.mktemp("bank")
    split = SplitConfig(n=N_ROWS, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.0)
    rows = [dict(make_row(i, "web", split, 0, 32, 0.05), uid=f"u{i:02d}") for i in range(N_ROWS)]
    salt = ScoreConfig().bank_salt
    order = sorted((r["uid"] for r in rows), key=lambda u: (uid_hash(u, salt), u))
    by_uid = {r["uid"]: r for r in rows}
    by_uid[order[0]]["image"] = b"not an image"  # its only copy: it can never be in the bank
    # A later copy of order[1] with another (valid) image: it must not enter the bank too.
    later_copy = dict(by_uid[order[1]], image=by_uid[order[-1]]["image"])
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "a.parquet")
    pq.write_table(pa.Table.from_pylist([later_copy], schema=SCHEMA), root / "b.parquet")
    return str(root / "*.parquet"), order


def assert_bank(pattern: str, score: ScoreConfig, expected: list[str]) -> None:
    plan = discover(ReadConfig(), pattern)
    model = ClipModelConfig(min_batch_size=2, max_batch_size=4)
    with TestPipeline() as p:
        first_refs = p | ReadRecords(plan, index_only=True) | FirstRefs()
        bank = first_refs | EmbedBank(plan, DecodeConfig(), CaptionConfig(), model, score)
        assert_that(bank | beam.Map(lambda b: b["uids"]), equal_to([expected]))


def test_bank_skips_candidates_that_fail_and_later_copies(bank_input):
    pattern, order = bank_input
    score = ScoreConfig(bank_size=6, bank_oversample=1.5)
    assert candidate_count(score) == 9
    # order[0] fails to decode, a spare takes its place; order[1]'s later copy is not taken.
    assert_bank(pattern, score, order[1:7])


def test_without_spares_a_failed_candidate_shrinks_the_bank(bank_input):
    pattern, order = bank_input
    assert_bank(pattern, ScoreConfig(bank_size=6, bank_oversample=1.0), order[1:6])


def test_oversample_below_one_is_refused():
    with pytest.raises(ValueError, match="bank_oversample"):
        ScoreConfig(bank_oversample=0.9)


def _reference_first_refs(pairs):
    """(uid, (count, first ref)) by brute force: a real uid's record before a derived one's,
    then the smallest (source, index)."""
    out = {}
    for uid, ref in pairs:
        flagged = (is_derived(uid, ref), ref)
        count, best = out.get(uid, (0, flagged))
        out[uid] = (count + 1, min(best, flagged))
    return sorted((uid, (count, flagged[1])) for uid, (count, flagged) in out.items())


@pytest.mark.parametrize("buckets", [1, 3, 64])
def test_first_refs_count_each_uid_whatever_the_buckets(buckets):
    pairs = [(f"u{i % 37}", (f"s{i % 3}", i)) for i in range(150)]
    pairs += [("s1#4", ("s1", 4)), ("s1#4", ("s0", 9))]  # derived at s1#4 vs a real "s1#4"
    blocks = [pairs[i : i + 40] for i in range(0, len(pairs), 40)]
    with TestPipeline() as p:
        out = p | beam.Create(blocks) | FirstRefs(buckets) | beam.FlatMap(list)
        assert_that(out, equal_to(_reference_first_refs(pairs)))
    assert _reference_first_refs(pairs)[-1] == ("u9", (4, ("s0", 9)))
    assert dict(_reference_first_refs(pairs))["s1#4"] == (2, ("s0", 9))


def test_bank_candidates_are_the_smallest_salted_hashes():
    score = ScoreConfig(bank_size=4, bank_oversample=1.5)  # 6 candidates
    first_refs = [(f"u{i}", (1, ("s", i))) for i in range(40)]
    order = sorted(first_refs, key=lambda kv: (uid_hash(kv[0], score.bank_salt), kv[0]))
    with TestPipeline() as p:
        blocks = [first_refs[:15], first_refs[15:]]
        picked = p | beam.Create(blocks, reshuffle=False) | BankCandidates(score)
        assert_that(picked, equal_to([{uid: ref for uid, (_, ref) in order[:6]}]))


def test_the_main_pass_takes_the_bank_passs_embeddings(bank_input, tmp_path):
    """Every row's embeddings are the model's (a bank row's misplaced or stale embedding would
    be off by the spread of the embeddings), and the rows the bank pass embedded (the bank's
    and its spares) skip the model."""
    pattern, order = bank_input
    model = ClipModelConfig(min_batch_size=2, max_batch_size=4)
    cfg = CurateConfig(
        input=pattern,
        output=str(tmp_path / "out"),
        model=model,
        score=ScoreConfig(bank_size=6, bank_oversample=1.5),
    )
    embedder = ClipEmbedder(model)

    def model_embeddings(rows):
        for uid, row in rows:
            pixels = decode_image(row["image"], with_model_side(cfg).decode).pixels
            img, txt, _ = embedder.embed([pixels], [row["caption"]])
            assert np.abs(img[0] - row["image_embedding"]).max() < 1e-5, uid
            assert np.abs(txt[0] - row["text_embedding"]).max() < 1e-5, uid
        assert {uid for uid, _ in rows} == set(order[1:])  # order[0] fails to decode

    p = TestPipeline()
    outputs = curate.build(p, cfg)
    assert_that(outputs["embedded"], model_embeddings)
    result = p.run()
    result.wait_until_finish()
    # 9 candidates, one undecodable: a bank of 6 and 2 spares
    assert counter_values(result)["embeddings_from_bank"] == 8
    # the main pass's model embedded the other 11 rows (19 unique uids, one undecodable)
    query = MetricsFilter().with_namespace(model.metrics_namespace).with_name("embedded_by_model")
    (embedded,) = result.metrics().query(query)["counters"]
    assert embedded.committed == 11


def test_the_index_read_emits_a_block_of_rows_an_element(bank_input):
    pattern, _ = bank_input
    plan = discover(ReadConfig(), pattern)
    with TestPipeline() as p:
        blocks = p | ReadRecords(plan, index_only=True)
        assert_that(blocks | beam.Map(len), equal_to([N_ROWS, 1]))  # a.parquet, b.parquet
