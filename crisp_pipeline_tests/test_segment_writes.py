"""Staging a segment normalises and writes only the rows that changed (`raw_hash`), and the
staged segment always ends equal to normalising the latest source from scratch: the same
accepted rows and values, the same rejections, whatever came before (duplicates appearing and
going, blanks, bad emails, a configuration or column type that changed)."""

from __future__ import annotations

from unittest import mock

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.changes import normalize
from crisp_pipeline.changes.normalize import normalize_segment
from crisp_pipeline.state.store import StateStore, connect_file
from crisp_pipeline.sync.prepare import stage_segment

BY_EMAIL = ActivationConfig(name="w", segment={"sql": "select 1"}, mode="upsert",
                            fields={"person.nickname": "name"}, attributes=["plan", "score"])
BY_ID = ActivationConfig(name="w", segment={"sql": "select 1"}, mode="upsert",
                         identifier={"external_id": "uid", "email": "email"},
                         fields={"person.nickname": "name"}, attributes=["plan", "score"])
RENAMED = ActivationConfig(name="w", segment={"sql": "select 1"}, mode="upsert",
                           fields={"person.nickname": "plan"}, attributes=["name", "score"])


class Source:
    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame

    def read(self) -> pl.DataFrame:
        return self.frame


def staged(store: StateStore, config: ActivationConfig) -> tuple[set, list]:
    accepted, rejected = store.read_segment()
    columns = ["identifier", "email", *config.managed_columns]
    return (set(accepted.select(columns).iter_rows()),
            rejected.drop("run_id").sort("row_number", "field", "reason").rows())


def from_scratch(raw: pl.DataFrame, config: ActivationConfig) -> tuple[set, list]:
    normalized = normalize_segment(raw, config)
    columns = ["identifier", "email", *config.managed_columns]
    return (set(normalized.accepted.select(columns).iter_rows()),
            normalized.rejected.sort("row_number", "field", "reason").rows())


def frame(rows: list[tuple], score_type: pl.DataType = pl.Float64) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"uid": pl.String, "email": pl.String, "name": pl.String,
                                      "plan": pl.String, "score": score_type}, orient="row")


def test_an_unchanged_segment_writes_nothing_and_a_change_writes_only_its_rows(tmp_path):
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    rows = [(f"u{i}", f"p{i}@x.io", f"P{i}", "free", float(i)) for i in range(100)]
    first = stage_segment(store, BY_EMAIL, Source(frame(rows)), "r1")
    assert first.complete and first.accepted.height == 100
    again = stage_segment(store, BY_EMAIL, Source(frame(rows)), "r2")
    assert not again.complete and again.accepted.is_empty() and again.kept.height == 100
    rows[3] = ("u3", "p3@x.io", "P3", "pro", 3.0)
    del rows[4]
    rows.append(("u100", "new@x.io", "New", "free", 1.5))
    changed = stage_segment(store, BY_EMAIL, Source(frame(rows)), "r3")
    assert changed.accepted["identifier"].sort().to_list() == ["new@x.io", "p3@x.io"]
    assert staged(store, BY_EMAIL) == from_scratch(frame(rows), BY_EMAIL)


def test_a_copy_of_an_unchanged_row_rejects_both_and_its_removal_accepts_it_again(tmp_path):
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    rows = [("u1", "a@x.io", "A", "free", 1.0), ("u2", "b@x.io", "B", "free", 2.0)]
    stage_segment(store, BY_EMAIL, Source(frame(rows)), "r1")
    stage_segment(store, BY_EMAIL, Source(frame([*rows, rows[0]])), "r2")
    assert staged(store, BY_EMAIL) == from_scratch(frame([*rows, rows[0]]), BY_EMAIL)
    assert {r[0] for r in staged(store, BY_EMAIL)[0]} == {"b@x.io"}
    stage_segment(store, BY_EMAIL, Source(frame(rows)), "r3")
    assert {r[0] for r in staged(store, BY_EMAIL)[0]} == {"a@x.io", "b@x.io"}


def test_a_changed_mapping_or_column_type_normalises_everything_again(tmp_path):
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    rows = [(f"u{i}", f"p{i}@x.io", f"P{i}", "free", i) for i in range(20)]
    stage_segment(store, BY_EMAIL, Source(frame(rows, pl.Int64)), "r1")
    # the same values, now floats: 1 and 1.0 are one number in Crisp, but the text differs
    as_floats = frame(rows, pl.Float64)
    result = stage_segment(store, BY_EMAIL, Source(as_floats), "r2")
    assert result.complete
    assert staged(store, BY_EMAIL) == from_scratch(as_floats, BY_EMAIL)
    renamed = stage_segment(store, RENAMED, Source(as_floats), "r3")
    assert renamed.complete
    assert staged(store, RENAMED) == from_scratch(as_floats, RENAMED)


people = st.sampled_from([f"u{i}" for i in range(12)])
emails = st.sampled_from([f"p{i}@x.io" for i in range(10)] + ["", "  P1@X.IO ", "bad", None])
row = st.tuples(people, emails, st.sampled_from(["A", "B", "", None]),
                st.sampled_from(["free", "pro", None]),
                st.sampled_from([0.0, 1.5, 1e-7, float("nan"), None]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(row, max_size=14), min_size=1, max_size=6),
       st.sampled_from([BY_EMAIL, BY_ID]), st.sampled_from([0.3, 1.0]))
def test_whatever_the_sequence_the_staged_segment_is_the_latest_normalised(
        tmp_path_factory, sequence, config, share):
    """With share 1.0 the unchanged rows are kept however much changed, so that small random
    segments exercise the incremental path."""
    store = StateStore(connect_file(str(tmp_path_factory.mktemp("seq") / "s.duckdb")),
                       "crisp_w", "w")
    with mock.patch.object(normalize, "RENORMALIZE_SHARE", share):
        for index, rows in enumerate(sequence):
            raw = frame(rows)
            stage_segment(store, config, Source(raw), f"r{index}")
            assert staged(store, config) == from_scratch(raw, config)


def test_minus_zero_is_zero_whether_normalised_anew_or_not(tmp_path):
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    rows = [("u1", "a@x.io", "A", "free", 0.0), ("u2", "b@x.io", "B", "free", 2.0)]
    stage_segment(store, BY_EMAIL, Source(frame(rows)), "r1")
    rows[0] = ("u1", "a@x.io", "A", "free", -0.0)
    stage_segment(store, BY_EMAIL, Source(frame(rows)), "r2")
    assert staged(store, BY_EMAIL) == from_scratch(frame(rows), BY_EMAIL)


def test_a_segment_rewritten_by_an_older_version_is_normalised_anew(tmp_path):
    """The previous release rewrites `segment` without `raw_hash` and leaves `segment_key`."""
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    rows = [(f"u{i}", f"p{i}@x.io", f"P{i}", "free", float(i)) for i in range(10)]
    stage_segment(store, BY_EMAIL, Source(frame(rows)), "r1")
    with store._transaction() as connection:
        connection.execute(f"create or replace table {store.table('segment')} as select * "
                           f"exclude (raw_hash) from {store.table('segment')}")
    result = stage_segment(store, BY_EMAIL, Source(frame(rows)), "r2")
    assert result.complete
    assert staged(store, BY_EMAIL) == from_scratch(frame(rows), BY_EMAIL)


def test_a_row_is_known_only_under_its_own_identifier_and_never_by_a_shared_hash():
    """Rows are matched to stored ones on the raw hash, then the identifiers compared by
    their hashes; a raw hash two stored rows share (a 64-bit collision, forced here) makes
    the stored hashes unusable: everything is normalised again, which is always exact."""
    keys = pl.DataFrame({normalize._IDENTIFIER: ["a", "b", "c", None],
                         normalize._RAW_HASH: [1, 2, 3, 1]},
                        schema={normalize._IDENTIFIER: pl.String, normalize._RAW_HASH: pl.UInt64}
                        ).with_columns(normalize.identifier_hash(normalize._IDENTIFIER)
                                       .alias(normalize._ID_HASH))

    def stored(pairs):
        return pl.DataFrame(pairs, schema={"identifier": pl.String, "raw_hash": pl.UInt64},
                            orient="row").select(
            normalize.identifier_hash("identifier").alias("id_hash"), "raw_hash")
    assert normalize._known_rows(keys, stored([("x", 2), ("a", 1)])).to_list() == \
        [1, -1, -1, -1]
    assert normalize._known_rows(keys, stored([("a", 1), ("b", 2), ("z", 2)])) is None
    rows = [(f"u{i}", f"p{i}@x.io", f"P{i}", "free", float(i)) for i in range(5)]
    known = normalize_segment(frame(rows), BY_EMAIL).accepted.select("id_hash", "raw_hash")
    shared = pl.concat([known, known.tail(1)])  # (a stored row twice)
    rows[0] = ("u0", "p0@x.io", "P0", "pro", 0.0)
    assert normalize_segment(frame(rows), BY_EMAIL, known=shared).complete
    again = normalize_segment(frame(rows), BY_EMAIL, known=known)
    assert not again.complete and again.accepted.get_column("identifier").to_list() == [
        "p0@x.io"] and again.leaving.rows() == known.head(1).rows()

def test_a_stored_row_without_its_hashes_has_everything_normalised_again(tmp_path):
    """(A table edited by hand.) Such a row can be neither matched nor deleted by its
    hashes: the person who left would stay staged, and mirror would never delete them."""
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    rows = [(f"u{i}", f"p{i}@x.io", f"P{i}", "free", float(i)) for i in range(10)]
    stage_segment(store, BY_EMAIL, Source(frame(rows)), "r1")
    with store._transaction() as connection:
        connection.execute(f"update {store.table('segment')} set raw_hash = null "
                           "where identifier = 'p3@x.io'")
    del rows[3]
    result = stage_segment(store, BY_EMAIL, Source(frame(rows)), "r2")
    assert result.complete
    assert staged(store, BY_EMAIL) == from_scratch(frame(rows), BY_EMAIL)


def test_a_source_column_named_like_a_bookkeeping_column_keeps_its_values(tmp_path):
    """The row fingerprint is kept as `raw_hash`; a source column of that name is the
    user's, and its values are what Crisp gets (they were the fingerprint's)."""
    config = ActivationConfig(name="w", segment={"sql": "select 1"}, mode="upsert",
                              fields={"person.nickname": "raw_hash"}, attributes=["plan"])
    names = [f"N{i}" for i in range(10)]
    raw = pl.DataFrame({"email": [f"p{i}@x.io" for i in range(10)], "raw_hash": names,
                        "plan": ["free"] * 10})
    normalized = normalize_segment(raw, config)
    assert normalized.accepted.get_column("person.nickname").to_list() == [
        f'"{name}"' for name in names]
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    stage_segment(store, config, Source(raw), "r1")
    changed = raw.with_columns(pl.Series("raw_hash", ["Bo", *names[1:]]))
    again = stage_segment(store, config, Source(changed), "r2")
    assert again.accepted.get_column("person.nickname").to_list() == ['"Bo"']
    assert staged(store, config) == from_scratch(changed, config)
