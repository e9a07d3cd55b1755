"""The bookkeeping of what may differ (`compare_pending`): after any sequence of the writes a
run makes (segment staged in part or in full, values confirmed, people forgotten, re-keyed,
fields marked unconfirmed, another website), the diff's identifiers and `has_arrivals` equal
what comparing the two tables value by value says. The oracle reads both tables in full and
compares their values in Python: it shares no code with the bookkeeping."""

from __future__ import annotations

import itertools
import logging
import threading
from datetime import timedelta
from unittest import mock

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.changes.normalize import normalization_key, normalize_segment
from crisp_pipeline.state import store as store_module
from crisp_pipeline.state.postgres import connect_postgres
from crisp_pipeline.state.store import StateStore, connect_file, now

IDS = [f"p{i}@x.io" for i in range(8)]
CONFIG = ActivationConfig(name="d", segment={"table": "t"}, mode="mirror",
                          fields={"person.nickname": "name"}, attributes=["plan"])
FIELDS = list(CONFIG.managed_columns)
NAMES = ["a", "b", None]
NEW_PEOPLE = itertools.count()

row = st.tuples(st.sampled_from([*IDS, "P1@X.IO ", ""]), st.sampled_from(NAMES),
               st.sampled_from(NAMES))
source_rows = st.lists(row, max_size=10)
operations = st.lists(st.one_of(
    # one source row changed, added (at -1) or gone (None): staged in part, as a run does
    st.tuples(st.just("edit"), st.integers(-1, 9), st.none() | row),
    st.tuples(st.just("source"), source_rows, st.booleans()),  # all of it, in part or full
    st.tuples(st.just("sync"), st.lists(st.sampled_from(IDS), max_size=5, unique=True),
              st.booleans()),
    st.tuples(st.just("sync"), st.none(), st.booleans()),  # everyone the segment holds
    st.tuples(st.just("forget"), st.integers(0, 7)),  # the n-th managed person
    st.tuples(st.just("rekey"), st.integers(0, 7), st.integers(0, 7)),  # to an unmanaged id
    st.tuples(st.just("unconfirm")),
    st.tuples(st.just("website"), st.sampled_from(["w", "w2"])),
    st.tuples(st.just("later")),  # a day later: the next diff compares everything
    st.tuples(st.just("diff")), st.tuples(st.just("diff")),
), min_size=1, max_size=14)


def stage(store: StateStore, rows: list[tuple], replace: bool, run: int) -> None:
    """The segment step's own writes (`sync.prepare.stage_segment`), from raw rows."""
    raw = pl.DataFrame(rows, schema={"email": pl.String, "name": pl.String, "plan": pl.String},
                       orient="row")
    key = normalization_key(raw.schema, CONFIG)
    known = None if replace else store.segment_fingerprints(key)
    normalized = normalize_segment(raw, CONFIG, known=known)
    store.write_segment(normalized.accepted, normalized.rejected, normalized.unidentified,
                        f"r{run}", kept=normalized.kept, key=key, leaving=normalized.leaving)


def sync(store: StateStore, identifiers: list[str] | None, tweak: bool) -> None:
    """Confirm these people (None: everyone the segment holds) as the segment holds them
    (a sync), or with another plan."""
    segment = {row["identifier"]: row for row in store.read_segment()[0].iter_rows(named=True)}
    if identifiers is None:
        identifiers = sorted(segment)
    people = dict(store.read_snapshot(FIELDS).select("identifier", "people_id").iter_rows())
    rows = []
    for identifier in identifiers:
        held = segment.get(identifier, {"person.nickname": '"x"', "data.plan": "null"})
        people_id = people.get(identifier) or f"id-{store.website_id}-{next(NEW_PEOPLE)}"
        rows.append({"identifier": identifier, "people_id": people_id,
                     "email": identifier, "confirmed_at": now(),
                     "person.nickname": held["person.nickname"],
                     "data.plan": '"z"' if tweak else held["data.plan"]})
    if rows:
        store.confirm(pl.DataFrame(rows).cast({"confirmed_at": pl.Datetime("us", "UTC")}),
                      FIELDS)


def expected_differences(store: StateStore) -> tuple[set[str], bool]:
    """(identifiers whose rows differ or that one side lacks, whether the segment names
    someone not managed), from the values themselves."""
    columns = ["identifier", "email", *FIELDS]
    segment, _ = store.read_segment()
    if segment.is_empty():
        segment = pl.DataFrame(schema={c: pl.String for c in columns})
    seg = {row[0]: row for row in segment.select(columns).iter_rows()}
    snap = {row[0]: row for row in store.read_snapshot(FIELDS).select(columns).iter_rows()}
    differing = {i for i in seg.keys() | snap.keys() if seg.get(i) != snap.get(i)}
    return differing, bool(seg.keys() - snap.keys())


def check(store: StateStore) -> None:
    differing, arrivals = expected_differences(store)
    assert store.has_arrivals() == arrivals
    store.refresh_row_hashes(FIELDS)
    segment_rows, snapshot_rows = store.differing_rows(FIELDS)
    found = set(segment_rows.get_column("identifier")) if not segment_rows.is_empty() else set()
    found |= set(snapshot_rows.get_column("identifier"))
    assert found == differing


class _Clock:
    def __init__(self) -> None:
        self.ahead = timedelta()

    def __call__(self):
        return now() + self.ahead


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def play(connect, first: list[tuple], ops: list[tuple]) -> None:
    """With a share that never gives up on tiny segments (the incremental path is what is
    tested), and no warning of a difference the bookkeeping missed (there is none to find:
    nothing is edited by hand)."""
    clock, warnings = _Clock(), _Warnings()
    store_module.log.addHandler(warnings)
    try:
        with mock.patch.object(store_module, "PENDING_SHARE", 100.0), \
                mock.patch.object(store_module, "now", clock):
            _play(connect, first, ops, clock)
    finally:
        store_module.log.removeHandler(warnings)
    assert not [m for m in warnings.messages if "without being noted" in m], warnings.messages


def _play(connect, first: list[tuple], ops: list[tuple], clock: _Clock) -> None:
    """From a settled state (the segment synced, compared in full), `ops` in turn."""
    stores = {w: StateStore(connect, "crisp_d", w) for w in ("w", "w2")}
    store = stores["w"]
    stage(store, first, True, 0)
    sync(store, None, False)
    check(store)
    source = list(first)
    for run, op in enumerate(ops, start=1):
        kind = op[0]
        managed = sorted(store.read_snapshot(FIELDS).get_column("identifier"))
        if kind == "edit":
            if op[1] == -1 or not source:
                source.append(op[2] or (IDS[0], "a", "a"))
            elif op[2] is None:
                source.pop(op[1] % len(source))
            else:
                source[op[1] % len(source)] = op[2]
            stage(store, source, False, run)
        elif kind == "source":
            source = list(op[1])
            stage(store, source, op[2], run)
        elif kind == "sync":
            sync(store, op[1], op[2])
        elif kind == "forget" and managed:
            store.record_reconcile(pl.DataFrame(), [managed[op[1] % len(managed)]],
                                   pl.DataFrame(), FIELDS)
        elif kind == "rekey" and managed and set(IDS) - set(managed):
            unmanaged = sorted(set(IDS) - set(managed))
            store.rekey(pl.DataFrame({"old_identifier": [managed[op[1] % len(managed)]],
                                      "new_identifier": [unmanaged[op[2] % len(unmanaged)]]}))
        elif kind == "unconfirm":
            store.mark_unconfirmed(["data.plan"])
        elif kind == "website":
            store = stores[op[1]]
        elif kind == "later":
            clock.ahead += timedelta(hours=store_module.FULL_COMPARE_EVERY_HOURS, minutes=1)
        elif kind == "diff":
            check(store)
    check(store)  # (and once more: the second diff of a state is an incremental one)
    check(store)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(row, min_size=4, max_size=10), operations)
def test_the_pending_identifiers_hold_every_difference(tmp_path_factory, first, ops):
    play(connect_file(str(tmp_path_factory.mktemp("p") / "s.duckdb")), first, ops)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(row, min_size=4, max_size=10), operations)
def test_the_pending_identifiers_hold_every_difference_on_postgres(postgres_server, first,
                                                                    ops):
    with postgres_server.database() as url:
        play(connect_postgres(url), first, ops)


def test_a_hand_edit_is_compared_again_within_a_day_and_said(tmp_path, caplog, monkeypatch):
    """The bookkeeping cannot see a table edited by hand: the daily full comparison finds
    the difference, puts it in the change set and warns."""
    import duckdb

    path = str(tmp_path / "s.duckdb")
    store = StateStore(connect_file(path), "crisp_d", "w")
    stage(store, [(i, "a", "b") for i in IDS], replace=True, run=1)
    sync(store, IDS, tweak=False)
    check(store)
    with duckdb.connect(path) as connection:
        connection.execute("""update crisp_d.snapshot set "data.plan" = '"edited"', """
                           f"row_hash = null where identifier = '{IDS[0]}'")
    store.refresh_row_hashes(FIELDS)
    with duckdb.connect(path) as connection:  # and the row hash too, as a hand edit would not
        connection.execute("update crisp_d.snapshot set row_hash = (select row_hash from "
                           f"crisp_d.snapshot where identifier = '{IDS[1]}') where "
                           f"identifier = '{IDS[0]}'")
        connection.execute("delete from crisp_d.compare_pending")
    segment_rows, _ = store.differing_rows(FIELDS)
    assert segment_rows.is_empty()  # trusted: not compared
    later = now() + timedelta(hours=store_module.FULL_COMPARE_EVERY_HOURS, minutes=1)
    monkeypatch.setattr(store_module, "now", lambda: later)
    with caplog.at_level("WARNING"):
        segment_rows, _ = store.differing_rows(FIELDS)
    assert segment_rows.get_column("identifier").to_list() == [IDS[0]]
    assert "without being noted" in caplog.text


def test_too_many_pending_identifiers_compare_everything(tmp_path):
    """Past PENDING_SHARE of the segment pending, a full comparison runs (dated anew)."""
    path = str(tmp_path / "s.duckdb")
    store = StateStore(connect_file(path), "crisp_d", "w")
    stage(store, [(i, "a", "b") for i in IDS], replace=True, run=1)
    sync(store, IDS, tweak=False)
    check(store)

    def full_at():
        return store.read("compare_scope").get_column("full_at").to_list()
    first = full_at()
    stage(store, [(i, "a", "c" if i == IDS[2] else "b") for i in IDS], replace=False, run=2)
    check(store)  # 1 of 8 pending: compared alone
    assert full_at() == first
    stage(store, [(i, "a", "d" if i in IDS[:3] else "b") for i in IDS], replace=False, run=3)
    check(store)  # 3 of 8 (and IDS[2], still differing): past 30%
    assert full_at() != first


def test_a_write_committed_during_a_diff_on_postgres_stays_pending(postgres_server):
    """Two writers on one activation (a run whose lock was taken over): a segment write that
    commits while a diff runs is noted once the diff has kept what it found, not lost with
    what the diff clears."""
    with postgres_server.database() as url:
        connect = connect_postgres(url)
        diffing, other = (StateStore(connect, "crisp_d", "w") for _ in range(2))
        rows = [(i, "a", "b") for i in IDS]
        stage(diffing, rows, True, 1)
        sync(diffing, None, False)
        check(diffing)
        stage(diffing, [(IDS[0], "a", "c"), *rows[1:]], False, 2)
        keep_pending = StateStore._keep_pending
        writer = threading.Thread(target=stage, args=(
            other, [(IDS[0], "a", "c"), (IDS[1], "a", "changed"), *rows[2:]], False, 3))

        def keep_while_another_writes(self, connection, compared_everything):
            if self is diffing and not writer.is_alive() and writer.ident is None:
                writer.start()
                writer.join(timeout=3)  # (done by now unless it waits for this diff)
            return keep_pending(self, connection, compared_everything)
        with mock.patch.object(StateStore, "_keep_pending", keep_while_another_writes):
            diffing.refresh_row_hashes(FIELDS)
            diffing.differing_rows(FIELDS)
        writer.join()
        check(diffing)
