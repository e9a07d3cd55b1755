"""The diff over only the rows whose stored hashes differ plans exactly what the diff over
everything plans: the state store's row hashes are a filter, never a change of meaning."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.changes.diff import plan_changes
from crisp_pipeline.changes.normalize import identifier_hash
from crisp_pipeline.state.store import UNCONFIRMED, StateStore, connect_file, now

IDS = [f"p{i}@x.io" for i in range(12)]
VALUES = ['"a"', '"b"', "null", "1", "1.0"]
EMPTY_REJECTED = pl.DataFrame(schema={"row_number": pl.Int64, "identifier": pl.String,
                                      "email": pl.String, "field": pl.String,
                                      "reason": pl.String, "message": pl.String})

segments = st.dictionaries(st.sampled_from(IDS), st.tuples(st.sampled_from(VALUES),
                                                           st.sampled_from(VALUES)))
snapshots = st.dictionaries(
    st.sampled_from(IDS),
    st.tuples(st.sampled_from([*VALUES, None, UNCONFIRMED]),
              st.sampled_from([*VALUES, None, UNCONFIRMED]),
              # another person's email, in other case: a new row whose email a managed
              # person holds must be found among the rows that did not change
              st.sampled_from([None, "other@x.io", "P3@X.io"])))


def normalized(rows: dict) -> pl.DataFrame:
    """Rows as the segment step stages them, with their hashes (the raw hash stands for a
    source row's: the row's values)."""
    frame = pl.DataFrame(
        [{"row_number": n, "identifier": i, "email": i, "person.nickname": a, "data.plan": b}
         for n, (i, (a, b)) in enumerate(sorted(rows.items()), start=1)],
        schema={"row_number": pl.Int64, "identifier": pl.String, "email": pl.String,
                "person.nickname": pl.String, "data.plan": pl.String})
    return frame.with_columns(
        frame.select("identifier", "person.nickname", "data.plan").hash_rows(seed=1)
        .alias("raw_hash"), identifier_hash("identifier").alias("id_hash"))


def hashes(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select("id_hash", "raw_hash")


def canonical(change_set: pl.DataFrame) -> list[tuple]:
    return sorted(change_set.select("identifier", "op", "reason", "changed", "old_values",
                                    "new_values", "data_values").iter_rows(),
                  key=lambda row: str(row))


NO_UNIDENTIFIED = pl.DataFrame(schema={"row_number": pl.Int64, "fingerprint": pl.String})


def write_in_two_generations(store: StateStore, earlier: dict, segment: dict) -> None:
    """The segment as a run leaves it after an earlier run's: the rows that did not change
    kept from the earlier write, the others deleted and written again (a later
    generation)."""
    first = normalized(earlier)
    store.write_segment(first, EMPTY_REJECTED, NO_UNIDENTIFIED, "r1")
    kept = [i for i in segment if earlier.get(i) == segment[i]]
    is_kept = pl.col("identifier").is_in(kept)
    store.write_segment(
        normalized({i: v for i, v in segment.items() if i not in kept}), EMPTY_REJECTED,
        NO_UNIDENTIFIED, "r2", kept=hashes(first.filter(is_kept)),
        leaving=hashes(first.filter(~is_kept)))


@settings(max_examples=40, deadline=None)
@given(segments, snapshots, st.sampled_from(["upsert", "mirror", "update_only"]),
       st.integers(0, 10**6), st.none() | segments)
def test_the_subset_diff_equals_the_full_diff(tmp_path_factory, segment, snapshot, mode, n,
                                              earlier):
    """`earlier`: the segment was written incrementally over an earlier one, as the segment
    step does when the source changed a little; the differing rows are then read from the
    latest write's rows when all of them are there, from every row when not."""
    config = ActivationConfig(name="d", segment={"table": "t"}, mode=mode,
                              fields={"person.nickname": "name"}, attributes=["plan"])
    fields = list(config.managed_columns)
    store = StateStore(connect_file(str(tmp_path_factory.mktemp("d") / "s.duckdb")),
                       "crisp_d", "w")
    accepted = normalized(segment)
    if earlier is None:
        store.write_segment(accepted, EMPTY_REJECTED, NO_UNIDENTIFIED, "r")
    else:
        write_in_two_generations(store, earlier, segment)
        assert set(store.read_segment()[0].select("identifier", *fields).iter_rows()) == \
            set(accepted.select("identifier", *fields).iter_rows())
    rows = [{"identifier": i, "people_id": f"id-{i}", "email": email or i,
             "confirmed_at": now(), "person.nickname": a, "data.plan": b}
            for i, (a, b, email) in snapshot.items()]
    if rows:
        store.confirm(pl.DataFrame(rows).cast({"confirmed_at": pl.Datetime("us", "UTC")}),
                      fields)
    store.refresh_row_hashes(fields)
    # a later write to a row the segment agrees with must make it differ again: the stored
    # hash of a written row is forgotten
    agreeing = [r for r in rows if r["identifier"] in segment
                and (r["person.nickname"], r["data.plan"]) == segment[r["identifier"]]
                and r["email"] == r["identifier"]]
    if agreeing and n % 2:
        store.confirm(pl.DataFrame([{**agreeing[0], "data.plan": '"z"'}]).cast(
            {"confirmed_at": pl.Datetime("us", "UTC")}), fields)
    if n % 3 == 0:
        store.refresh_row_hashes(fields)
    full = plan_changes(accepted, EMPTY_REJECTED, store.read_snapshot(fields), config)
    segment_rows, snapshot_rows = store.differing_rows(fields)
    subset = plan_changes(segment_rows, EMPTY_REJECTED, snapshot_rows, config,
                          managed_emails=store.managed_emails_among)
    assert canonical(subset.change_set) == canonical(full.change_set)
    unchanged = set(accepted.get_column("identifier")) - set(
        segment_rows.get_column("identifier"))
    # rows left out hold the very same values in the segment and the snapshot
    snap = {r["identifier"]: r for r in store.read_snapshot(fields).iter_rows(named=True)}
    for row in accepted.filter(pl.col("identifier").is_in(list(unchanged))).iter_rows(
            named=True):
        assert all(row[f] == snap[row["identifier"]][f] for f in [*fields, "email"])


def test_every_write_to_a_snapshot_row_makes_it_differ_again(tmp_path):
    """Confirming values, re-keying and marking fields unconfirmed each forget the row's
    stored hash: the next diff loads the row."""
    fields = ["person.nickname", "data.plan"]
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_d", "w")
    segment = {i: ('"a"', '"b"') for i in IDS[:4]}
    store.write_segment(normalized(segment), EMPTY_REJECTED,
                        pl.DataFrame(schema={"row_number": pl.Int64, "fingerprint": pl.String}),
                        "r")
    store.confirm(pl.DataFrame([{"identifier": i, "people_id": f"id-{i}", "email": i,
                                 "confirmed_at": now(), "person.nickname": '"a"',
                                 "data.plan": '"b"'} for i in IDS[:4]]).cast(
        {"confirmed_at": pl.Datetime("us", "UTC")}), fields)

    def differing() -> set[str]:
        store.refresh_row_hashes(fields)
        return set(store.differing_rows(fields)[0].get_column("identifier"))
    assert differing() == set()
    store.confirm(pl.DataFrame([{"identifier": IDS[0], "people_id": f"id-{IDS[0]}",
                                 "data.plan": '"z"'}]), fields)
    assert differing() == {IDS[0]}
    store.rekey(pl.DataFrame({"old_identifier": [IDS[1]], "new_identifier": ["moved@x.io"],
                              "email": ["moved@x.io"]}))
    assert differing() == {IDS[0], IDS[1]}  # segment row IDS[1] no longer managed as such
    store.mark_unconfirmed(["data.plan"])
    assert differing() == set(IDS[:4])


def test_fields_reordered_or_removed_in_the_configuration_rehash_every_row(tmp_path):
    """A row hash depends on the fields and their order: swapped values under reordered
    fields would otherwise hash the same and go unnoticed."""
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_d", "w")
    before, after = ["data.plan", "data.tier"], ["data.tier", "data.plan"]
    store.confirm(pl.DataFrame([{"identifier": "p@x.io", "people_id": "id-p",
                                 "email": "p@x.io", "confirmed_at": now(),
                                 "data.plan": '"a"', "data.tier": '"b"'}]).cast(
        {"confirmed_at": pl.Datetime("us", "UTC")}), before)
    store.refresh_row_hashes(before)
    # the source swaps the two values while the configuration lists the fields the other way
    swapped = pl.DataFrame([{"row_number": 1, "identifier": "p@x.io", "email": "p@x.io",
                             "data.tier": '"a"', "data.plan": '"b"'}])
    store.write_segment(swapped, EMPTY_REJECTED,
                        pl.DataFrame(schema={"row_number": pl.Int64, "fingerprint": pl.String}),
                        "r")
    assert store.refresh_row_hashes(after) == 1
    assert store.differing_rows(after)[0].get_column("identifier").to_list() == ["p@x.io"]


def test_rows_of_an_earlier_write_are_read_whenever_their_identifier_differs(tmp_path):
    """The latest write's rows alone are read only when no earlier row has an identifier
    among those that differ, however the counts fall: here x (earlier write, differs) and
    two copies of y (latest write, one equal to the snapshot) would balance a count of
    differing rows, and reading the latest write alone would leave x out, which in mirror
    means deleting someone who is in the source."""
    fields = ["person.nickname", "data.plan"]
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_d", "w")
    x, y = IDS[0], IDS[1]
    first = normalized({x: ('"a"', '"b"'), y: ('"a"', '"b"')})
    store.write_segment(first, EMPTY_REJECTED, NO_UNIDENTIFIED, "r1")
    copies = pl.concat([normalized({y: ('"a"', '"b"')}), normalized({y: ('"c"', '"d"')})])
    store.write_segment(copies, EMPTY_REJECTED, NO_UNIDENTIFIED, "r2",
                        kept=hashes(first.filter(pl.col("identifier") == x)),
                        leaving=hashes(first.filter(pl.col("identifier") == y)))
    store.confirm(pl.DataFrame([{"identifier": i, "people_id": f"id-{i}", "email": i,
                                 "confirmed_at": now(), "person.nickname": '"z"' if i == x
                                 else '"a"', "data.plan": '"b"'} for i in (x, y)]).cast(
        {"confirmed_at": pl.Datetime("us", "UTC")}), fields)
    store.refresh_row_hashes(fields)
    segment_rows, _ = store.differing_rows(fields)
    assert sorted(segment_rows.get_column("identifier")) == [x, y, y]
    config = ActivationConfig(name="d", segment={"table": "t"}, mode="mirror",
                              fields={"person.nickname": "name"}, attributes=["plan"])
    planned = plan_changes(segment_rows, EMPTY_REJECTED, store.read_snapshot(fields), config)
    assert "delete" not in planned.change_set.get_column("op").to_list()
