"""The staged segment is written as a delta (only rows whose values changed), and always ends
equal to the latest normalised segment, whatever the sequence of segments."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from crisp_pipeline.state.store import StateStore, connect_file

EMPTY = pl.DataFrame(schema={"row_number": pl.Int64, "identifier": pl.String,
                             "email": pl.String, "field": pl.String, "reason": pl.String,
                             "message": pl.String})
UNIDENTIFIED = pl.DataFrame(schema={"row_number": pl.Int64, "fingerprint": pl.String})


def segment(people: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame({"row_number": list(range(1, len(people) + 1)),
                         "identifier": list(people), "email": list(people),
                         "data.plan": list(people.values())},
                        schema={"row_number": pl.Int64, "identifier": pl.String,
                                "email": pl.String, "data.plan": pl.String})


def stored(store: StateStore) -> set[tuple]:
    accepted, _ = store.read_segment()
    return set(accepted.select("identifier", "email", "data.plan").iter_rows())


def test_an_unchanged_segment_writes_nothing_and_a_change_writes_only_its_rows(tmp_path):
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_w", "w")
    people = {f"p{i}@x.io": '"a"' for i in range(100)}
    assert store.write_segment(segment(people), EMPTY, UNIDENTIFIED, "r1")["written"] == 100
    assert store.write_segment(segment(people), EMPTY, UNIDENTIFIED, "r2") == {
        "written": 0, "deleted": 0}
    people["p3@x.io"] = '"b"'
    del people["p4@x.io"]
    people["new@x.io"] = '"a"'
    assert store.write_segment(segment(people), EMPTY, UNIDENTIFIED, "r3") == {
        "written": 2, "deleted": 2}
    assert stored(store) == {(k, k, v) for k, v in people.items()}


plans = st.dictionaries(st.sampled_from([f"p{i}@x.io" for i in range(30)]),
                        st.sampled_from(['"a"', '"b"', '"c"', "null"]), max_size=30)


@settings(max_examples=25, deadline=None)
@given(st.lists(plans, min_size=1, max_size=6))
def test_whatever_the_sequence_the_stored_segment_is_the_latest(tmp_path_factory, sequence):
    path = tmp_path_factory.mktemp("seq") / "s.duckdb"
    store = StateStore(connect_file(str(path)), "crisp_w", "w")
    for index, people in enumerate(sequence):
        store.write_segment(segment(people), EMPTY, UNIDENTIFIED, f"r{index}")
        assert stored(store) == {(k, k, v) for k, v in people.items()}
