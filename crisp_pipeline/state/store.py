"""The state store: what each activation knows, in one schema per activation, in a DuckDB file
(the default) or a Postgres database (`connect_state`, `state.postgres`).

Tables of schema `crisp_<activation>`:
- `segment`, `rejected`: the latest normalised segment, and its rejected rows with row, field,
  reason and message (their identifiers matter: a rejected person has not left the segment);
- `snapshot`: what Crisp holds for each person we manage, as last *confirmed* (by a 2xx answer
  to our write, or by reading the person when adopting them): people_id, email, and the JSON
  text of every managed field (SQL NULL: never confirmed);
- `change_set` (latest) and `change_set_history` (every run, keyed by run_id);
- `outcomes`: one row per person per request unit (`step`: create, profile, data, batch_data,
  delete) per run, with Crisp's reason and message on failure; people of one `batch/data`
  request share its `unit` number;
- `deletions`: who was deleted, when, by which run, with their last known values;
- `runs`: one row per sync run with its counts and request figures;
- `compare_pending`, `compare_scope`: the identifiers whose segment and snapshot rows may
  differ, and the website and time of the last full comparison (see "what may differ").

Only confirmed writes enter the snapshot, in one transaction per batch of outcomes, so a crash
mid-sync leaves the snapshot claiming nothing Crisp does not hold; the unconfirmed work is
simply part of the next change set. This module does not import Dagster: it takes a function
that opens a connection. Its SQL is the dialect DuckDB and Postgres share; the few
statements that differ ask `dialect`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import polars as pl
from tenacity import retry, retry_if_exception, wait_random_exponential

# a DuckDB connection, or a `state.postgres.PostgresConnection` speaking the part of its API
# this module uses
StateConnection = Any
Connect = Callable[[], AbstractContextManager[StateConnection]]

SNAPSHOT_KEYS = {"identifier": pl.String, "people_id": pl.String, "email": pl.String,
                 "confirmed_at": pl.Datetime("us", "UTC"), "origin": pl.String,
                 "verified_at": pl.Datetime("us", "UTC")}
# `verified_at`: when Crisp last *showed* us the person and every managed field (a read by
# adoption or reconcile, or our create of them); other writes confirm the values they sent but
# verify nothing (`PATCH batch/data` is accepted even for people Crisp no longer holds).
# Reconcile re-reads the oldest first.
# `origin`: `created` (this activation created the person in Crisp) or `adopted` (they were
# in Crisp before it found them). A text that is not JSON, so it never equals a confirmed value:
# the field was added to the configuration and must be written, a null as a clear.
UNCONFIRMED = "?"
# The segment's generation column: the number of the segment write that stored the row (all
# rows, when a write replaced the table), so that a run reads back the rows it wrote alone.
STAGED_IN = "staged_in"
CHANGE_SET_SCHEMA = {
    "run_id": pl.String, "identifier": pl.String, "email": pl.String, "people_id": pl.String,
    "op": pl.String, "reason": pl.String, "message": pl.String, "changed": pl.List(pl.String),
    "old_values": pl.String, "new_values": pl.String, "data_values": pl.String,
}
RUN_SCHEMA = {
    "run_id": pl.String, "change_set_run_id": pl.String, "activation": pl.String,
    "website_id": pl.String, "mode": pl.String, "dry_run": pl.Boolean,
    "override_guards": pl.Boolean,
    "finished_at": pl.Datetime("us", "UTC"), "planned_create": pl.Int64,
    "planned_update": pl.Int64, "planned_delete": pl.Int64, "planned_release": pl.Int64,
    "people_ok": pl.Int64, "people_rejected": pl.Int64, "people_deferred": pl.Int64,
    "requests_sent": pl.Int64, "write_requests": pl.Int64, "deferred_because": pl.String,
    "stopped": pl.String, "unidentified_rows": pl.Int64, "held_departures": pl.Int64,
}
OUTCOME_SCHEMA = {
    "run_id": pl.String, "identifier": pl.String, "people_id": pl.String, "op": pl.String,
    "step": pl.String, "status": pl.String, "reason": pl.String, "message": pl.String,
    "unit": pl.Int64, "requests": pl.Int64, "at": pl.Datetime("us", "UTC"),
}
DELETION_SCHEMA = {"run_id": pl.String, "website_id": pl.String, "identifier": pl.String,
                   "people_id": pl.String, "email": pl.String, "action": pl.String,
                   "reason": pl.String, "deleted_at": pl.Datetime("us", "UTC"),
                   "last_values": pl.String}
ABSENCE_SCHEMA = {"website_id": pl.String, "identifier": pl.String,
                  "first_absent_at": pl.Datetime("us", "UTC"), "runs": pl.Int64}


ROW_HASH_SEED = 17
# How long the diff trusts its bookkeeping of what may differ (`compare_pending`) before it
# compares every row again; see "what may differ" below.
FULL_COMPARE_EVERY_HOURS = 24
# More identifiers pending than this share of the segment: comparing everything costs less.
PENDING_SHARE = 0.3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingScope:
    """The bookkeeping of what may differ, for this website (see "what may differ")."""

    usable: bool  # the pending identifiers may stand for every difference now
    stale: bool  # the last full comparison is older than FULL_COMPARE_EVERY_HOURS


class StateUnavailable(RuntimeError):
    """The DuckDB file cannot be opened (not a DuckDB file, a folder, no permission...)."""


def _is_lock_conflict(error: BaseException) -> bool:
    return isinstance(error, duckdb.IOException) and "lock" in str(error).lower()


def lock_wait_seconds() -> float:
    """How long to wait for another process's hold on the DuckDB file
    (CRISP_PIPELINE_DB_WAIT_SECONDS, default 60)."""
    return float(os.environ.get("CRISP_PIPELINE_DB_WAIT_SECONDS") or 60)


def hold_seconds() -> float:
    """The longest this process keeps the DuckDB file open at a stretch while a run works
    (CRISP_PIPELINE_DB_HOLD_SECONDS, default 10; 0 opens it for each use only): see
    `file_kept_open`."""
    return float(os.environ.get("CRISP_PIPELINE_DB_HOLD_SECONDS") or 10)


def _waited_enough(retry_state) -> bool:
    """Stop before a sleep would end past `lock_wait_seconds()`: the backoff grows to 2 s,
    and a check of the time already waited alone let a wait run up to 2 s past the limit."""
    return retry_state.seconds_since_start + retry_state.upcoming_sleep > lock_wait_seconds()


# A file modified this recently that DuckDB finds invalid may be one another process is
# creating (several processes starting on a fresh state file): waited for as a lock is.
BEING_CREATED_SECONDS = 5.0


class _FileBeingCreated(Exception):
    """DuckDB found no valid header in a file modified in the last BEING_CREATED_SECONDS."""


def _is_worth_waiting_for(error: BaseException) -> bool:
    return _is_lock_conflict(error) or isinstance(error, _FileBeingCreated)


@retry(retry=retry_if_exception(_is_worth_waiting_for),
       wait=wait_random_exponential(0.05, max=2), stop=_waited_enough, reraise=True)
def _connect_waiting_for_lock(path: str, config: dict) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(path, config=config)
    except duckdb.IOException as error:
        with contextlib.suppress(OSError):
            if ("not a valid duckdb database file" in str(error).lower()
                    and time.time() - os.stat(path).st_mtime < BEING_CREATED_SECONDS):
                raise _FileBeingCreated(str(error)) from error
        raise


def open_duckdb(path: str, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Open the file read-write. Another process holding it (DuckDB allows one writer) or
    still creating it is waited for, up to `lock_wait_seconds`; anything else fails at once,
    naming the file."""
    try:
        return _connect_waiting_for_lock(path, dict(config or {}))
    except (duckdb.Error, _FileBeingCreated) as error:
        raise StateUnavailable(
            f"the DuckDB file {path!r} (CRISP_PIPELINE_DB) cannot be opened: {error}") from None


# One connection to a file at a time per process: DuckDB refuses to open a file that another
# thread of the process is opening ("already attached"), and the sync records, pays its budget
# and looks people up from worker threads. Re-entrant: a thread may nest uses.
_FILE_LOCKS: dict[str, threading.RLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: str) -> threading.RLock:
    key = os.path.realpath(path)
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(key, threading.RLock())


def connect_file(path: str, config: dict | None = None) -> Connect:
    """A `Connect` for a DuckDB file: a connection per use, always closed, one at a time in
    this process."""
    @contextlib.contextmanager
    def connect() -> Iterator[duckdb.DuckDBPyConnection]:
        with _file_lock(path):
            hold = _HOLDS.get(os.path.realpath(path))
            if hold is not None:
                hold.refresh()
            connection = open_duckdb(path, config)
            try:
                yield connection
            finally:
                connection.close()
    connect.kept_open = lambda: file_kept_open(path, config)
    connect.checkpoint_if_held = lambda: _checkpoint_if_held(path)
    return connect


def _checkpoint_if_held(path: str) -> None:
    """Checkpoint the file now if this process holds it (`file_kept_open`); nothing when it
    does not (each use's close then checkpoints, and another process may hold the file:
    no wait for it). A checkpoint that fails (a full disk) leaves DuckDB's database unusable
    in this process: the file is let go, so that the next use opens it again from its
    write-ahead log, which still holds every commit, and the error is raised."""
    with _file_lock(path):
        hold = _HOLDS.get(os.path.realpath(path))
        if hold is None or hold.connection is None:
            return
        try:
            hold.connection.execute("checkpoint")
        except duckdb.Error:
            with contextlib.suppress(duckdb.Error):  # (the error to raise is the first)
                hold.release()
            raise


STATE_URL_ENV = "CRISP_PIPELINE_STATE_URL"


def connect_state(path: str, config: dict | None = None) -> Connect:
    """Where the state lives: the Postgres database of CRISP_PIPELINE_STATE_URL when it is
    set (runs on many machines, e.g. one pod per run), else the DuckDB file `path`."""
    url = os.environ.get(STATE_URL_ENV, "").strip()
    if url:
        from .postgres import connect_postgres
        return connect_postgres(url)
    return connect_file(path, config)


def dialect(connection) -> str:
    """`duckdb`, or `postgres` for a `state.postgres.PostgresConnection`."""
    return getattr(connection, "dialect", "duckdb")


def sql_type(dtype: pl.DataType, dialect_name: str) -> str:
    """The column type a frame's column is stored as (to add it to an existing table)."""
    if dtype == pl.UInt64:
        return "bigint" if dialect_name == "postgres" else "ubigint"
    if dtype.is_integer():
        return "bigint"
    if dtype.is_float():
        return "double precision"
    if dtype == pl.Boolean:
        return "boolean"
    if isinstance(dtype, pl.Datetime):
        return "timestamptz" if dtype.time_zone else "timestamp"
    if dtype == pl.Date:
        return "date"
    if isinstance(dtype, pl.List):
        return sql_type(dtype.inner, dialect_name) + "[]"
    return "varchar"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def now() -> datetime:
    return datetime.now(UTC)


class _Catalog:
    """Which of the file's tables exist and their columns, as `StateStore` found them.

    Looking them up in `information_schema` costs 1-2 ms a time, and a run looks about a
    hundred times. Valid while the file stays open in this process: DuckDB lets one process
    open a file for writing, so only this process changes its tables meanwhile, and
    `StateStore` forgets what it knew after each of its own schema changes (`_ddl`)."""

    def __init__(self) -> None:
        self.schemas: set[str] = set()
        self.tables: dict[tuple[str, str], list[str] | None] = {}  # None: does not exist

    def forget(self) -> None:
        self.schemas.clear()
        self.tables.clear()


def _catalog_of(path: str | None) -> _Catalog:
    """The catalog of a file kept open (shared by every session while it is), else a fresh
    one for a single session."""
    hold = _HOLDS.get(os.path.realpath(path)) if path else None
    if hold is not None and hold.connection is not None:
        return hold.catalog
    return _Catalog()


class _Hold:
    """A connection that keeps a DuckDB file open in this process (see `file_kept_open`)."""

    # Held at most `hold_seconds()` at a stretch, then let go for PAUSE_SECONDS: another
    # process waiting for the file (it retries for `lock_wait_seconds`) gets its turn. Let go
    # too when unused for IDLE_SECONDS (a long network wait).
    PAUSE_SECONDS, IDLE_SECONDS = 2.0, 1.0

    def __init__(self, path: str, config: dict | None) -> None:
        self.path, self.config = path, config
        self.max_seconds = hold_seconds()
        self.connection: duckdb.DuckDBPyConnection | None = None
        self.depth = 0
        self.opened_at = self.used_at = self.paused_until = 0.0
        self.watcher: threading.Thread | None = None
        # what `StateStore` learnt of the file's tables while it was held (see `_Catalog`)
        self.catalog = _Catalog()

    def refresh(self) -> None:
        """Before a use (under the file's lock): open, or let go after a long stretch."""
        moment = time.monotonic()
        if self.connection is not None and moment - self.opened_at > self.max_seconds:
            self.release(pause=True)
        elif self.connection is None and self.depth and moment >= self.paused_until:
            self.connection = open_duckdb(self.path, self.config)
            _checkpoint_when_let_go(self.connection)
            self.catalog = _Catalog()
            self.opened_at = moment
        self.used_at = moment

    def release(self, pause: bool = False) -> None:
        if self.connection is not None:
            # DuckDB checkpoints when its last connection to the file closes (if a user's
            # own connection is still open, at its close: the WAL keeps the writes meanwhile);
            # dropped first, so that a close that fails leaves no unusable connection held
            connection, self.connection = self.connection, None
            self.catalog = _Catalog()
            connection.close()
        if pause:
            self.paused_until = time.monotonic() + self.PAUSE_SECONDS

    def watch(self) -> None:
        """Let go of the file while it is unused or held too long, even with no use to
        notice it (a block waiting on the network)."""
        lock = _file_lock(self.path)
        while self.depth:
            time.sleep(self.IDLE_SECONDS / 2)
            if not lock.acquire(blocking=False):
                continue  # in use right now
            try:
                moment = time.monotonic()
                if self.connection is not None and (
                        moment - self.used_at > self.IDLE_SECONDS
                        or moment - self.opened_at > self.max_seconds):
                    self.release(pause=moment - self.opened_at > self.max_seconds)
            finally:
                lock.release()


_HOLDS: dict[str, _Hold] = {}

# While the file is held, a commit does not checkpoint (below 1 GB of log): DuckDB would at
# any commit it expects to write more than 16 MiB (a sync's 10,000 confirmations in a 1M
# snapshot), and again at the next. The writes are checkpointed when the file is let go
# (`_Hold`: after a second unused, at the latest after `hold_seconds()`). The WAL keeps each
# commit durable meanwhile; DuckDB replays it after a crash.
HELD_CHECKPOINT_THRESHOLD = "1GB"


def _checkpoint_when_let_go(connection: duckdb.DuckDBPyConnection) -> None:
    """A setting of the database instance, which lasts while the file is held (a connection
    opened for a single use gets DuckDB's default: being the last, it checkpoints when
    closed)."""
    connection.execute(f"set global checkpoint_threshold = '{HELD_CHECKPOINT_THRESHOLD}'")


@contextlib.contextmanager
def file_kept_open(path: str, config: dict | None = None) -> Iterator[None]:
    """Keep the DuckDB file open in this process for the block. DuckDB shares one database
    instance among a process's connections to a file while any is open: each use of the
    block then costs well under a millisecond instead of opening the file (about 12 ms for
    a 1M-person state), its queries share a warm cache instead of reading the file again
    (loading the snapshot's key index alone takes about 0.2 s), and writes are checkpointed
    when the file is let go, instead of after every use or large commit
    (`HELD_CHECKPOINT_THRESHOLD`). The file is let go after
    `hold_seconds()` at a stretch, or `_Hold.IDLE_SECONDS` unused, so that another
    process waiting for it is not starved. Blocks nest."""
    if hold_seconds() <= 0:
        yield
        return
    key = os.path.realpath(path)
    with _file_lock(path):
        hold = _HOLDS.get(key)
        if hold is None:
            hold = _HOLDS[key] = _Hold(path, config)
        hold.depth += 1
        try:
            hold.refresh()
        except BaseException:
            hold.depth -= 1
            raise
        if hold.watcher is None or not hold.watcher.is_alive():
            hold.watcher = threading.Thread(target=hold.watch, daemon=True,
                                            name=f"duckdb-hold {os.path.basename(key)}")
            hold.watcher.start()
    try:
        yield
    finally:
        with _file_lock(path):
            hold.depth -= 1
            if not hold.depth:
                hold.release()
                _HOLDS.pop(key, None)


class StateStore:
    """One activation's state. `website_id` is the Crisp website the activation writes to:
    the snapshot is kept per website, so that a changed website never inherits the people
    (and the beliefs) of another one."""

    def __init__(self, connect: Connect, schema: str, website_id: str | None = None) -> None:
        self._connect = connect
        self.schema = schema
        self.website_id = website_id
        self._catalog = ""
        self._dialect = "duckdb"
        self._duckdb_file: tuple[str, str] | None = None  # (catalog, path) of a DuckDB file
        self._known = _Catalog()

    def kept_open(self) -> AbstractContextManager[None]:
        """The state kept open for a block without network waits, when the connection
        supports it (`file_kept_open`)."""
        opener = getattr(self._connect, "kept_open", None)
        return opener() if opener else contextlib.nullcontext()

    def table(self, name: str, schema: str | None = None) -> str:
        # fully qualified: a file named like the schema would make an ambiguous catalog
        return f"{quote(self._catalog)}.{quote(schema or self.schema)}.{quote(name)}"

    @contextlib.contextmanager
    def _session(self, writing: bool = True) -> Iterator[StateConnection]:
        with self._connect() as connection:
            self._dialect = dialect(connection)
            if self._dialect == "postgres":  # (no cache: other sessions may change tables)
                self._catalog, path = connection.execute(
                    "select current_database(), null").fetchone()
            else:  # (asked once: a store's `connect` opens one file, and asking took 1 ms
                # of each of the hundred or so sessions of a run)
                if self._duckdb_file is None:
                    self._duckdb_file = connection.execute(
                        "select database_name, path from duckdb_databases() where "
                        "database_name = current_database()").fetchone()
                self._catalog, path = self._duckdb_file
            self._known = _catalog_of(path)
            if writing and self.schema not in self._known.schemas:
                connection.execute(f"create schema if not exists {quote(self.schema)}")
                self._known.schemas.add(self.schema)
            yield connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[StateConnection]:
        with self._session() as connection:
            connection.execute("begin")
            try:
                yield connection
            except BaseException:
                connection.execute("rollback")
                self._known.forget()  # it may have seen tables the rollback undid
                raise
            connection.execute("commit")

    def _columns_or_none(self, connection: StateConnection,
                         name: str) -> list[str] | None:
        """A table's columns in order, None when it does not exist (remembered: `_Catalog`)."""
        key = (self.schema, name)
        if key not in self._known.tables:
            catalog = ("select column_name from information_schema.columns where "
                       "table_catalog = ? and table_schema = ? and table_name = ? order by "
                       "ordinal_position" if self._dialect == "postgres" else
                       "select column_name from duckdb_columns() where database_name = ? and "
                       "schema_name = ? and table_name = ? order by column_index")
            columns = [row[0] for row in connection.execute(
                catalog, [self._catalog, self.schema, name]).fetchall()]
            self._known.tables[key] = columns or None
        return self._known.tables[key]

    def _exists(self, connection: StateConnection, name: str) -> bool:
        return self._columns_or_none(connection, name) is not None

    def _columns(self, connection: StateConnection, name: str) -> list[str]:
        return list(self._columns_or_none(connection, name) or [])

    def _ddl(self, connection: StateConnection, table: str | None, statement: str,
             params: list | None = None) -> None:
        """A statement that creates, alters or drops `table` (None: tables not named): what
        the catalog knew of it is forgotten."""
        try:
            connection.execute(statement, params)
        finally:
            if table is None:
                self._known.forget()
            else:
                self._known.tables.pop((self.schema, table), None)

    def _create_once(self, connection: StateConnection, name: str,
                     columns: str) -> None:
        """Create table `name` with `columns` (SQL) unless the catalog knows it exists."""
        if not self._exists(connection, name):
            self._ddl(connection, name,
                      f"create table if not exists {self.table(name)} ({columns})")

    def _replace(self, connection: StateConnection, name: str,
                 frame: pl.DataFrame) -> None:
        connection.register("frame_to_store", frame.to_arrow())
        if self._dialect == "postgres":
            self._ddl(connection, name, f"drop table if exists {self.table(name)}")
            self._ddl(connection, name, f"create table {self.table(name)} as "
                      "select * from frame_to_store")
        else:
            self._ddl(connection, name, f"create or replace table {self.table(name)} as "
                      "select * from frame_to_store")
        connection.unregister("frame_to_store")

    def _temp_table(self, connection, name: str, select: str, params: list) -> None:
        """A temporary table of this session made from a query (replacing one so named)."""
        if self._dialect == "postgres":
            connection.execute(f"drop table if exists pg_temp.{quote(name)}")
            connection.execute(f"create temp table {quote(name)} as {select}", params)
        else:
            connection.execute(f"create or replace temp table {quote(name)} as {select}",
                               params)

    def _append(self, connection: StateConnection, name: str,
                frame: pl.DataFrame) -> None:
        """Append by column name; columns a table made by an earlier version lacks are added
        (a state file outlives the code that wrote it)."""
        connection.register("frame_to_store", frame.to_arrow())
        if self._exists(connection, name):
            have = set(self._columns(connection, name))
            for column, dtype in frame.schema.items():
                if column not in have:
                    self._ddl(connection, name, f"alter table {self.table(name)} add column "
                              f"{quote(column)} {sql_type(dtype, self._dialect)}")
            listed = ", ".join(quote(c) for c in frame.columns)
            connection.execute(f"insert into {self.table(name)} ({listed}) "
                               f"select {listed} from frame_to_store")
        else:
            self._ddl(connection, name,
                      f"create table {self.table(name)} as select * from frame_to_store")
        connection.unregister("frame_to_store")

    def _read(self, connection: StateConnection, name: str,
              schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
        if not self._exists(connection, name):
            return pl.DataFrame(schema=schema or {})
        return connection.execute(f"select * from {self.table(name)}").pl()

    def _website(self) -> str:
        if not self.website_id:
            raise ValueError("this state store was opened without a website (CRISP_WEBSITE_ID)")
        return self.website_id

    # ---------------------------------------------------------------- stages

    def _mark_stage(self, connection: StateConnection, stage: str,
                    run_id: str) -> None:
        table = self.table("stages")
        self._create_once(connection, "stages",
                          "stage varchar primary key, run_id varchar not null, done_at timestamptz")
        connection.execute(f"insert into {table} values (?, ?, ?) on conflict (stage) do "
                           "update set run_id = excluded.run_id, done_at = excluded.done_at",
                           [stage, run_id, now()])

    def mark_stage(self, stage: str, run_id: str) -> None:
        with self._transaction() as connection:
            self._mark_stage(connection, stage, run_id)

    def stage_run(self, stage: str) -> str | None:
        """The run that last did `stage` (segment, snapshot, change_set): a step uses what
        an earlier step of its own run left, never another run's."""
        return self._stage_row(stage)[0]

    def stage_done_at(self, stage: str) -> datetime | None:
        """When `stage` was last done (the change set's guards are judged as of then)."""
        return self._stage_row(stage)[1]

    def _stage_row(self, stage: str) -> tuple[str | None, datetime | None]:
        with self._session(writing=False) as connection:
            if not self._exists(connection, "stages"):
                return None, None
            row = connection.execute(f"select run_id, done_at from {self.table('stages')} "
                                     "where stage = ?", [stage]).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def segment_fingerprints(self, key: str) -> pl.DataFrame | None:
        """(id_hash, raw_hash) of the staged segment's rows when they were fingerprinted
        under `key` (`changes.normalize.normalization_key`); None otherwise. Two integer
        columns: the identifiers themselves stay in the file."""
        with self._session(writing=False) as connection:
            if not (self._exists(connection, "segment") and
                    self._exists(connection, "segment_key")):
                return None
            stored = connection.execute(
                f"select key from {self.table('segment_key')}").fetchone()
            if stored is None or stored[0] != key or not {"raw_hash", "id_hash", STAGED_IN} <= set(
                    self._columns(connection, "segment")):
                return None  # (an older version may have rewritten the segment since)
            return connection.execute(
                f"select id_hash, raw_hash from {self.table('segment')}").pl()

    def write_segment(self, accepted: pl.DataFrame, rejected: pl.DataFrame,
                      unidentified: pl.DataFrame, run_id: str, kept: pl.DataFrame | None = None,
                      key: str | None = None, leaving: pl.DataFrame | None = None
                      ) -> dict[str, int]:
        """Keep this run's segment. With `kept` (id_hash, raw_hash of the stored rows that did
        not change, `changes.normalize`), only the rest (`leaving`, the same columns, when
        the caller knows it) is deleted and `accepted` (the rows that changed) inserted;
        without it `accepted` is the whole segment and replaces the table. (A stored row is
        found by its pair of hashes: `changes.normalize._known_rows` uses them only when no
        two stored rows that a source row names share a raw hash.) `key` is the
        normalisation key the fingerprints were taken under. Each stored row carries `row_hash`, the hash of its
        identifier, email and fields, hashed as the snapshot hashes its rows. Returns the rows
        written and deleted."""
        fields = [c for c in accepted.columns if c not in ("row_number", "raw_hash", "id_hash")]
        row_hashes = accepted.select(fields).hash_rows(seed=ROW_HASH_SEED).alias("row_hash")
        with self._transaction() as connection:
            table = self.table("segment")  # (the catalog is known once a session is open)
            if self._dialect == "postgres":
                from .postgres import check_name_lengths
                check_name_lengths(fields, "field")
            generation = 1  # (a replaced table holds one write)
            if kept is not None:
                generation = (self._segment_generation(connection) or 0) + 1
            hashed = accepted.with_columns(row_hashes,
                                           pl.lit(generation, dtype=pl.Int64).alias(STAGED_IN))
            if kept is None:
                deleted = (connection.execute(f"select count(*) from {table}").fetchone()[0]
                           if self._exists(connection, "segment") else 0)
                self._replace(connection, "segment", hashed)
                self._compare_everything_next(connection)  # (every row may have changed)
                written = {"written": hashed.height, "deleted": int(deleted)}
            else:
                gone = pl.Series("identifier", [], pl.String)
                going = None
                if leaving is None:  # `kept` is a subset of the stored rows
                    connection.register("kept", kept.to_arrow())
                    going = (f"from {table} s where not exists (select 1 from kept k where "
                             "k.id_hash = s.id_hash and k.raw_hash = s.raw_hash)")
                elif len(leaving):
                    connection.register("leaving", leaving.to_arrow())
                    going = (f"from {table} s where exists (select 1 from leaving l where "
                             "l.id_hash = s.id_hash and l.raw_hash = s.raw_hash)")
                if going is not None:
                    # (read first: DuckDB's `delete ... returning` is 60 times slower here)
                    gone = connection.execute(f"select identifier {going}").pl().get_column(
                        "identifier")
                    connection.execute(f"delete {going}")
                    connection.unregister("kept" if leaving is None else "leaving")
                if not hashed.is_empty():
                    connection.register("arriving", hashed.to_arrow())
                    listed = ", ".join(quote(c) for c in hashed.columns)
                    connection.execute(f"insert into {table} ({listed}) select {listed} "
                                       "from arriving")
                    connection.unregister("arriving")
                self._pend(connection, pl.concat([gone.cast(pl.String),
                                                  hashed.get_column("identifier")]))
                written = {"written": hashed.height, "deleted": gone.len()}
            key_table = self.table("segment_key")
            self._create_once(connection, "segment_key", "key varchar")
            connection.execute(f"delete from {key_table}")
            if key is not None:
                connection.execute(f"insert into {key_table} values (?)", [key])
            self._replace(connection, "rejected",
                          rejected.with_columns(pl.lit(run_id).alias("run_id")))
            self._replace(connection, "unidentified", unidentified)
            self._mark_stage(connection, "segment", run_id)
        return written

    def segment_counts(self) -> tuple[int, int, dict[str, int]]:
        """(accepted rows, rejected rows, rejections by reason) of the staged segment, counted
        in SQL (a check never loads the segment)."""
        with self._session(writing=False) as connection:
            accepted = (connection.execute(f"select count(*) from {self.table('segment')}")
                        .fetchone()[0] if self._exists(connection, "segment") else 0)
            if not self._exists(connection, "rejected"):
                return int(accepted), 0, {}
            rows = connection.execute(f"select count(distinct row_number) from "
                                      f"{self.table('rejected')}").fetchone()[0]
            reasons = dict(connection.execute(f"select reason, count(*) from "
                                              f"{self.table('rejected')} group by 1").fetchall())
        return int(accepted), int(rows), {k: int(v) for k, v in reasons.items()}

    def read_segment(self, rejected_only: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(accepted, rejected) as the last `segment` materialization left them (accepted
        empty with `rejected_only`)."""
        with self._session(writing=False) as connection:
            accepted = pl.DataFrame() if rejected_only else self._read(connection, "segment")
            return accepted, self._read(connection, "rejected")

    # ---------------------------------------------------------------- snapshot

    def _ensure_snapshot(self, connection: StateConnection,
                         fields: list[str]) -> None:
        """The snapshot table, with identity enforced by the database: per website, one row
        per identifier and one identifier per Crisp person."""
        snapshot = self.table("snapshot")
        if self._dialect == "postgres":
            from .postgres import check_name_lengths
            check_name_lengths(fields, "field")
        if self._exists(connection, "snapshot") and \
                "website_id" not in self._columns(connection, "snapshot"):
            self._migrate_snapshot(connection)
        if self._exists(connection, "snapshot") and not (
                {"verified_at", "row_hash", *fields} - set(self._columns(connection, "snapshot"))):
            return  # most uses: nothing to add
        # the columns of SNAPSHOT_KEYS (one definition), per website, identity enforced
        columns = ", ".join(
            f"{name} {sql_type(dtype, self._dialect)}"
            + (" not null" if name in ("identifier", "people_id") else "")
            for name, dtype in SNAPSHOT_KEYS.items())
        self._ddl(
            connection, "snapshot",
            f"create table if not exists {snapshot} (website_id varchar not null, {columns}, "
            "primary key (website_id, identifier), unique (website_id, people_id))")
        have = set(self._columns(connection, "snapshot"))
        if "verified_at" not in have:  # a snapshot from before reconcile
            self._ddl(connection, "snapshot",
                      f"alter table {snapshot} add column verified_at timestamptz")
        if "row_hash" not in have:  # see `refresh_row_hashes`
            self._ddl(connection, "snapshot", f"alter table {snapshot} add column row_hash "
                      f"{sql_type(pl.UInt64, self._dialect)}")
        for field in fields:
            if field not in have:
                self._ddl(connection, "snapshot",
                          f"alter table {snapshot} add column {quote(field)} varchar")

    def _migrate_snapshot(self, connection: StateConnection) -> None:
        """A snapshot written before it was kept per website: it belonged to the website the
        activation uses now. People it held twice (two identifiers, one Crisp person) are
        kept once. People whose create the old `outcomes` record count as created; the others
        as adopted (never deleted unless the mirror allows deleting adopted people)."""
        old = self.table("snapshot_before_websites")
        self._ddl(connection, None, f"alter table {self.table('snapshot')} rename to "
                  "snapshot_before_websites")
        fields = [c for c in self._columns(connection, "snapshot_before_websites")
                  if c not in ("identifier", "people_id", "email", "confirmed_at")]
        self._ensure_snapshot(connection, fields)
        listed = ", ".join(quote(c) for c in ["identifier", "people_id", "email",
                                              "confirmed_at", *fields])
        created = "false"
        if self._exists(connection, "outcomes"):
            created = (f"identifier in (select identifier from {self.table('outcomes')} "
                       "where step = 'create' and status = 'ok')")
        connection.execute(
            f"insert into {self.table('snapshot')} (website_id, origin, {listed}) "
            f"select ?, case when {created} then 'created' else 'adopted' end, {listed} "
            f"from {old} where people_id is not null "
            "qualify row_number() over (partition by people_id order by identifier) = 1",
            [self._website()])
        self._ddl(connection, "snapshot_before_websites", f"drop table {old}")
        self._compare_everything_next(connection)

    def _snapshot_rows(self, connection: StateConnection, fields: list[str],
                       where: str = "true", params: list | None = None,
                       order: str = "", extra: tuple[str, ...] = ()) -> pl.DataFrame:
        """This website's snapshot rows matching `where`: the keys, `fields` and `extra`
        columns, typed."""
        self._ensure_snapshot(connection, fields)
        columns = ", ".join(quote(c) for c in [*SNAPSHOT_KEYS, *fields, *extra])
        frame = connection.execute(
            f"select {columns} from {self.table('snapshot')} where website_id = ? and "
            f"({where}) {order}", [self._website(), *(params or [])]).pl()
        return frame.cast({**SNAPSHOT_KEYS, **{field: pl.String for field in fields}})

    def _few_snapshot_rows(self, where: str) -> tuple[str, list]:
        """(clause, parameters) selecting this website's snapshot rows matching `where`, for
        a read of a few rows scattered over the table: on DuckDB they are found by row id
        first, and their other columns are then decompressed for those rows alone (1M
        people, 10,000 rows: 0.08 s instead of 0.18 s)."""
        if self._dialect != "duckdb":
            return where, []
        return (f"rowid in (select rowid from {self.table('snapshot')} where website_id = ? "
                f"and ({where}))", [self._website()])

    def read_snapshot(self, fields: list[str]) -> pl.DataFrame:
        """Managed people of this website with the JSON text of every field in `fields`
        (NULL: unknown, UNCONFIRMED: to be written)."""
        with self._session() as connection:
            return self._snapshot_rows(connection, fields)

    def _confirm(self, connection: StateConnection, confirmed: pl.DataFrame,
                 fields: list[str]) -> None:
        """Upsert confirmed values; a NULL cell in `confirmed` keeps what was known.

        Three statements rather than one `insert ... on conflict do update`: DuckDB updates
        an indexed column (`people_id` is unique) by deleting and inserting the row, index
        entries included, which makes a 10,000-person confirmation in a 1M snapshot take
        seconds. So a people_id is set only where it changed, the other columns are updated
        in place (only those with a value to set), and new people are inserted."""
        if confirmed.is_empty():
            return
        self._ensure_snapshot(connection, fields)
        columns = [c for c in [*SNAPSHOT_KEYS, *fields] if c in confirmed.columns]
        # one row per person (callers give one; a second would make the statements disagree)
        confirmed = confirmed.select(columns).unique("identifier", keep="last",
                                                     maintain_order=True)
        snapshot = self.table("snapshot")
        connection.register("confirmed_rows", confirmed.to_arrow())
        website = [self._website()]
        matched = "from confirmed_rows r where s.website_id = ? and s.identifier = r.identifier"
        settable = [c for c in columns if c not in ("identifier", "origin", "people_id")
                    and confirmed.get_column(c).null_count() < confirmed.height]
        updates = ", ".join([f"{quote(c)} = coalesce(r.{quote(c)}, s.{quote(c)})"
                             for c in settable] + ["row_hash = null"])  # hashed again
        # Most confirmations are of people already held under the same people_id: the
        # in-place update alone, if it finds every one of them, is all there is to do (each
        # statement joins the whole snapshot, and the sync confirms batch after batch).
        same_person = (" and (r.people_id is null or r.people_id = s.people_id)"
                       if "people_id" in columns else "")
        found = connection.execute(f"update {snapshot} s set {updates} {matched}{same_person}",
                                   website).fetchone()[0]
        if found == confirmed.height:
            connection.unregister("confirmed_rows")
            return
        if "people_id" in columns:
            connection.execute(
                f"update {snapshot} s set people_id = r.people_id {matched} and r.people_id "
                "is not null and r.people_id is distinct from s.people_id", website)
        connection.execute(f"update {snapshot} s set {updates} {matched}", website)
        listed = ", ".join(quote(c) for c in columns)
        connection.execute(
            f"insert into {snapshot} (website_id, {listed}) select ?, {listed} from "
            f"confirmed_rows r where not exists (select 1 from {snapshot} s where "
            "s.website_id = ? and s.identifier = r.identifier)", website * 2)
        connection.unregister("confirmed_rows")

    def confirm(self, confirmed: pl.DataFrame, fields: list[str]) -> None:
        with self._transaction() as connection:
            self._confirm(connection, confirmed, fields)

    def _forget(self, connection: StateConnection, identifiers: list[str]) -> None:
        if not identifiers or not self._exists(connection, "snapshot"):
            return
        connection.register("forgotten", pl.DataFrame(
            {"identifier": identifiers}, schema={"identifier": pl.String}).to_arrow())
        connection.execute(f"delete from {self.table('snapshot')} where website_id = ? and "
                           "identifier in (select identifier from forgotten)",
                           [self._website()])
        connection.unregister("forgotten")
        self._pend(connection, pl.Series("identifier", identifiers, pl.String))

    def rekey(self, moves: pl.DataFrame) -> int:
        """Give managed people new identifiers (`old_identifier` -> `new_identifier`, and the
        `email` Crisp confirmed when given), keeping their people_id and everything confirmed:
        an identifier that changed is still the same person, who must be neither deleted nor
        created again."""
        if moves.is_empty():
            return 0
        if "email" not in moves.columns:
            moves = moves.with_columns(pl.lit(None, pl.String).alias("email"))
        with self._transaction() as connection:
            self._ensure_snapshot(connection, [])
            connection.register("moves", moves.select("old_identifier", "new_identifier",
                                                      "email").to_arrow())
            connection.execute(
                f"update {self.table('snapshot')} as s set identifier = m.new_identifier, "
                "row_hash = null, "
                "email = coalesce(m.email, s.email) from moves as m where s.website_id = ? "
                "and s.identifier = m.old_identifier", [self._website()])
            connection.unregister("moves")
            # (the new identifiers are hashed again, `refresh_row_hashes`; the old ones
            # name no managed person any more)
            self._pend(connection, moves.get_column("old_identifier").cast(pl.String))
        return moves.height

    def mark_unconfirmed(self, fields: list[str]) -> None:
        """Fields the configuration gained: every managed person's value is written once
        from the source (a null clearing what Crisp holds), on every website's snapshot."""
        if not fields:
            return
        with self._transaction() as connection:
            self._ensure_snapshot(connection, fields)
            sets = ", ".join([f"{quote(field)} = '{UNCONFIRMED}'" for field in fields]
                             + ["row_hash = null"])
            connection.execute(f"update {self.table('snapshot')} set {sets}")
            self._compare_everything_next(connection)

    def holders_elsewhere(self, people_ids: list[str]) -> set[str]:
        """The people among `people_ids` that another activation's snapshot holds on this
        website: a mirror must release them, never delete them. A snapshot from before
        snapshots were kept per website holds its people on every website."""
        if not people_ids:
            return set()
        held: set[str] = set()
        with self._session(writing=False) as connection:
            # Postgres's information_schema shows only the tables this role may read: another
            # team's snapshot must be seen (and its reading fail loudly), never skipped
            catalog = ("select n.nspname, bool_or(a.attname = 'website_id') from pg_class c "
                       "join pg_namespace n on n.oid = c.relnamespace join pg_attribute a on "
                       "a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped where "
                       "c.relname = 'snapshot' and c.relkind in ('r', 'p') and "
                       "n.nspname <> ? group by 1" if self._dialect == "postgres" else
                       "select t.table_schema, bool_or(c.column_name = 'website_id') from "
                       "information_schema.tables t join information_schema.columns c on "
                       "c.table_schema = t.table_schema and c.table_name = t.table_name where "
                       "t.table_name = 'snapshot' and t.table_schema <> ? group by 1")
            schemas = connection.execute(catalog, [self.schema]).fetchall()
            if not schemas:
                return held
            connection.register("candidates", pl.DataFrame(
                {"people_id": people_ids}, schema={"people_id": pl.String}).to_arrow())
            for schema, per_website in schemas:
                where, params = "people_id in (select people_id from candidates)", []
                if per_website:
                    where, params = where + " and website_id = ?", [self._website()]
                held.update(row[0] for row in connection.execute(
                    f"select people_id from {self.table('snapshot', schema)} where {where}",
                    params).fetchall())
            connection.unregister("candidates")
        return held

    # ---------------------------------------------------------------- configuration

    def stored_configuration(self) -> dict | None:
        """The configuration the state was last kept for, preferably by a run that was not a
        dry run (None: never recorded), so that a dry run never hides a change from the real
        run."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "configuration"):
                return None
            order = ("dry_run, recorded_at desc"
                     if "dry_run" in self._columns(connection, "configuration")
                     else "recorded_at desc")  # a table from before dry runs were told apart
            row = connection.execute(f"select configuration from {self.table('configuration')} "
                                     f"order by {order} limit 1").fetchone()
        return json.loads(row[0]) if row else None

    def configuration_changes(self, run_id: str) -> list[str]:
        """The configuration changes run `run_id` found (for the change set's metadata)."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "configuration"):
                return []
            rows = connection.execute(f"select changes from {self.table('configuration')} "
                                      "where run_id = ?", [run_id]).fetchall()
        return [change for row in rows for change in (row[0] or [])]

    def record_configuration(self, configuration: dict, changes: list[str], run_id: str,
                             dry_run: bool) -> None:
        with self._transaction() as connection:
            self._append(connection, "configuration", pl.DataFrame([{
                "run_id": run_id, "recorded_at": now(), "dry_run": dry_run,
                "configuration": json.dumps(configuration, sort_keys=True),
                "changes": changes}], schema={
                "run_id": pl.String, "recorded_at": pl.Datetime("us", "UTC"),
                "dry_run": pl.Boolean, "configuration": pl.String,
                "changes": pl.List(pl.String)}))

    # ---------------------------------------------------------------- departures

    def read_absences(self) -> pl.DataFrame:
        with self._session(writing=False) as connection:
            if not self._exists(connection, "absences"):
                return pl.DataFrame(schema=ABSENCE_SCHEMA)
            return connection.execute(f"select * from {self.table('absences')} where "
                                      "website_id = ?", [self._website()]).pl().cast(
                                          ABSENCE_SCHEMA)

    def clear_absences(self) -> None:
        """Forget every absence (a new website or mode: no grace-period streak carries over)."""
        with self._transaction() as connection:
            if self._exists(connection, "absences"):
                connection.execute(f"delete from {self.table('absences')}")

    def plan_absences(self, absences: pl.DataFrame, run_id: str) -> None:
        """Who is absent as of this run's change set; they become the absences only when this
        run's sync applies it (`confirm_absences`), so that previews and refused runs never
        count towards a grace period."""
        with self._transaction() as connection:
            self._replace(connection, "absences_planned",
                          absences.cast(ABSENCE_SCHEMA).with_columns(
                              pl.lit(run_id).alias("run_id")))

    def confirm_absences(self, run_id: str) -> None:
        """This website's absent people, as this run's change set planned them."""
        with self._transaction() as connection:
            if not self._exists(connection, "absences_planned"):
                return
            if self._exists(connection, "absences"):
                connection.execute(f"delete from {self.table('absences')} where website_id = ?",
                                   [self._website()])
            planned = connection.execute(
                f"select {', '.join(quote(c) for c in ABSENCE_SCHEMA)} from "
                f"{self.table('absences_planned')} where run_id = ?", [run_id]
            ).pl().cast(ABSENCE_SCHEMA)
            self._append(connection, "absences", planned)

    def unidentified_baseline(self) -> pl.DataFrame | None:
        """The fingerprints of the rows naming nobody at the last mirror sync of this website
        that held no departure (None: none yet): rows beyond those are new ambiguity."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "unidentified_baseline"):
                return None
            table = self.table("unidentified_baseline")
            if not connection.execute(f"select count(*) from {table} where website_id = ? and "
                                      "fingerprint is null", [self._website()]).fetchone()[0]:
                return None
            return connection.execute(f"select fingerprint from {table} where website_id = ? "
                                      "and fingerprint is not null", [self._website()]).pl()

    def accept_unidentified(self) -> None:
        """This run's rows naming nobody become the baseline (a mirror sync that held
        nothing); a row with a null fingerprint marks that the website has one."""
        with self._transaction() as connection:
            table = self.table("unidentified_baseline")
            self._create_once(connection, "unidentified_baseline",
                              "website_id varchar, fingerprint varchar")
            connection.execute(f"delete from {table} where website_id = ?", [self._website()])
            connection.execute(f"insert into {table} values (?, null)", [self._website()])
            if self._exists(connection, "unidentified"):
                connection.execute(f"insert into {table} select ?, fingerprint from "
                                   f"{self.table('unidentified')}", [self._website()])

    def deleted_since(self, since: datetime) -> int:
        """People this activation deleted from this website since `since` (rolling guard)."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "deletions"):
                return 0
            columns = self._columns(connection, "deletions")
            where, params = ["deleted_at >= ?"], [since]
            if "action" in columns:  # tables from before releases hold deletions only
                where.append("coalesce(action, 'deleted') = 'deleted'")
            if "website_id" in columns:
                where.append("website_id = ?")
                params.append(self._website())
            return int(connection.execute(
                f"select count(*) from {self.table('deletions')} where {' and '.join(where)}",
                params).fetchone()[0])

    # ---------------------------------------------------------------- change sets

    def write_change_set(self, change_set: pl.DataFrame, run_id: str) -> None:
        frame = change_set.with_columns(pl.lit(run_id).alias("run_id"),
                                        pl.lit(now()).alias("computed_at"))
        with self._transaction() as connection:
            self._replace(connection, "change_set", frame)
            self._append(connection, "change_set_history", frame)
            self._mark_stage(connection, "change_set", run_id)

    def planned_creates(self) -> pl.DataFrame:
        """identifier, computed_at of the creates the latest change set planned."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "change_set") or \
                    "computed_at" not in self._columns(connection, "change_set"):
                return pl.DataFrame(schema={"identifier": pl.String,
                                            "computed_at": pl.Datetime("us", "UTC")})
            return connection.execute(f"select identifier, computed_at from "
                                      f"{self.table('change_set')} where op = 'create'").pl()

    def read_change_set(self) -> pl.DataFrame:
        with self._session(writing=False) as connection:
            return self._read(connection, "change_set", CHANGE_SET_SCHEMA)

    # ---------------------------------------------------------------- sync outcomes

    def record_batch(self, outcomes: pl.DataFrame, confirmed: pl.DataFrame,
                     forgotten: list[str], deletions: pl.DataFrame, fields: list[str]) -> None:
        """One transaction per batch: outcomes, confirmed values, people no longer managed
        (deleted, released, or gone from Crisp), and the deletion audit."""
        with self._transaction() as connection:
            if not outcomes.is_empty():
                self._append(connection, "outcomes", outcomes)
            self._confirm(connection, confirmed, fields)
            self._forget(connection, forgotten)
            if not deletions.is_empty():
                self._append(connection, "deletions", deletions)

    def checkpoint(self) -> None:
        """Write what DuckDB's log holds into the file now (nothing to do on Postgres). A
        held file is checkpointed when it is let go (`HELD_CHECKPOINT_THRESHOLD`), which is
        at the end of the run's last step; the sync calls this in a worker thread as it
        starts sending, so that the run's earlier writes (the segment, the change set) are
        checkpointed while its requests wait on Crisp. DuckDB lets other transactions run
        meanwhile; this process's uses of the file wait for it (`connect_file`). Only a file
        this process holds is checkpointed (`_checkpoint_if_held`)."""
        checkpoint = getattr(self._connect, "checkpoint_if_held", None)
        if checkpoint is not None:
            checkpoint()

    def record_run(self, run: dict[str, object]) -> None:
        with self._session() as connection:
            self._append(connection, "runs", pl.DataFrame([run], schema=RUN_SCHEMA))

    # what each history table is dated by; `deletions` (the audit of who mirror deleted) is
    # kept for good
    HISTORY = {"change_set_history": "computed_at", "outcomes": "at", "runs": "finished_at",
               "drift": "found_at"}

    def prune_history(self, older_than: datetime) -> dict[str, int]:
        """Delete history rows dated before `older_than`; returns the rows deleted per table.
        The latest run is always kept (`applied_run_ids` needs it)."""
        pruned: dict[str, int] = {}
        with self._transaction() as connection:
            for name, column in self.HISTORY.items():
                if not self._exists(connection, name) or \
                        column not in self._columns(connection, name):
                    continue
                keep_latest = (f" and run_id not in (select run_id from {self.table(name)} "
                               f"order by {quote(column)} desc limit 1)"
                               if "run_id" in self._columns(connection, name) else "")
                deleted = connection.execute(
                    f"delete from {self.table(name)} where {quote(column)} < ?{keep_latest}",
                    [older_than]).fetchone()
                pruned[name] = int(deleted[0]) if deleted else 0
        return pruned

    def failed_outcomes(self, run_id: str) -> dict[str, int]:
        """Run `run_id`'s refused or deferred writes, by reason (counted in SQL: the
        `outcomes` table of a large activation is never loaded for a check)."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "outcomes"):
                return {}
            rows = connection.execute(
                f"select coalesce(reason, status), count(*) from {self.table('outcomes')} "
                "where run_id = ? and status in ('rejected', 'deferred') group by 1",
                [run_id]).fetchall()
        return {reason: int(n) for reason, n in rows}

    def applied_run_ids(self) -> set[str]:
        with self._session(writing=False) as connection:
            if not self._exists(connection, "runs"):
                return set()
            rows = connection.execute(
                f"select change_set_run_id from {self.table('runs')} "
                "where not dry_run and stopped is null").fetchall()
            return {row[0] for row in rows}

    def count(self, name: str, what: str = "count(*)", where: str = "true") -> int:
        """An aggregate over one of this activation's tables, 0 when the table does not
        exist yet (so that guards and metadata never load a whole table to count it). The
        snapshot is counted for this website only."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, name):
                return 0
            params: list[object] = []
            if name == "snapshot" and "website_id" in self._columns(connection, name):
                where, params = f"({where}) and website_id = ?", [self._website()]
            return int(connection.execute(
                f"select {what} from {self.table(name)} where {where}", params).fetchone()[0]
                or 0)

    # ---------------------------------------------------------------- reconcile

    def reconcile_queue(self, fields: list[str], verified_before: datetime | None = None
                        ) -> pl.DataFrame:
        """This website's managed people not verified since `verified_before` (None: all),
        oldest-verified first (never verified: first)."""
        with self._session() as connection:
            return self._snapshot_rows(
                connection, fields,
                "verified_at is null or ?::timestamptz is null or verified_at < ?",
                [verified_before, verified_before],
                "order by verified_at nulls first, confirmed_at nulls first, identifier")

    def record_reconcile(self, refreshed: pl.DataFrame, gone: list[str], drift: pl.DataFrame,
                         fields: list[str]) -> None:
        """One transaction: what Crisp showed (values, emails, verified_at), the people it no
        longer holds (forgotten: the next change set re-creates or skips them), and the audit
        of every difference found (table `drift`)."""
        with self._transaction() as connection:
            self._confirm(connection, refreshed, fields)
            self._forget(connection, gone)
            if not drift.is_empty():
                self._append(connection, "drift", drift)

    # ---------------------------------------------------------------- row hashes
    # A row's hash covers its identifier, email and every managed field, hashed as the segment
    # hashes its rows (`write_segment`): equal hashes, equal values. The snapshot's
    # is NULL after any write to the row and computed again before the next diff, so that the
    # diff loads the values of the rows that differ only.

    def _hash_version(self, connection: StateConnection, fields: list[str]) -> None:
        """A row hash depends on Polars' version and on the fields hashed, in their order (a
        field added, removed or moved in the configuration): when either changes, every
        stored hash is forgotten and computed again."""
        table = self.table("row_hash_version")
        version = json.dumps([pl.__version__, ROW_HASH_SEED, fields])
        self._create_once(connection, "row_hash_version", "version varchar")
        row = connection.execute(f"select version from {table}").fetchone()
        if row is None or row[0] != version:
            connection.execute(f"update {self.table('snapshot')} set row_hash = null")
            self._compare_everything_next(connection)
            connection.execute(f"delete from {table}")
            connection.execute(f"insert into {table} values (?)", [version])

    def refresh_row_hashes(self, fields: list[str]) -> int:
        """Hash the snapshot rows whose hash is unknown; returns how many."""
        with self._transaction() as connection:
            self._ensure_snapshot(connection, fields)
            self._hash_version(connection, fields)
            columns = ", ".join(quote(c) for c in ["identifier", "email", *fields])
            few, params = self._few_snapshot_rows("row_hash is null")
            rows = connection.execute(
                f"select {columns} from {self.table('snapshot')} where website_id = ? and "
                f"{few}", [self._website(), *params]).pl()
            if rows.is_empty():
                return 0
            hashed = rows.select("identifier", rows.cast(pl.String).hash_rows(seed=ROW_HASH_SEED)
                                 .alias("row_hash"))
            connection.register("hashed", hashed.to_arrow())
            connection.execute(f"update {self.table('snapshot')} as k set row_hash = h.row_hash "
                               "from hashed h where k.website_id = ? and "
                               "k.identifier = h.identifier", [self._website()])
            connection.unregister("hashed")
            # every write to a snapshot row forgets its hash: these are the rows written
            # since the last diff
            self._pend(connection, hashed.get_column("identifier"))
        return rows.height

    def differing_rows(self, fields: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(segment rows, snapshot rows) of the identifiers whose row hashes differ (or that
        only one side holds): everything the diff needs beyond the rows that are equal. Only
        the identifiers pending are compared, unless the bookkeeping is not to be trusted
        now (see "what may differ"); those that differ stay pending."""
        with self._transaction() as connection:
            self._ensure_snapshot(connection, fields)
            if not self._exists(connection, "segment"):
                return pl.DataFrame(), self._snapshot_rows(connection, fields)
            if self._dialect == "postgres" and self._exists(connection, "compare_pending"):
                # a write committing meanwhile (a run whose lock was taken over) notes its
                # identifiers once this diff has kept what it found, never before
                connection.execute(f"lock table {self.table('compare_pending')} in exclusive "
                                   "mode")
            scope = self._pending_scope(connection)
            wanted = ""
            if scope is not None and scope.usable:
                # (each side filtered by the pending identifiers first: a 1M-row table is
                # then scanned, never built into a hash table; 0.05 s instead of 0.15 s)
                wanted = f"identifier in {self._pending_identifiers()}"
            segment = f"(select identifier, row_hash from {self.table('segment')} " + (
                f"where {wanted})" if wanted else ")")
            snapshot = (f"(select identifier, row_hash from {self.table('snapshot')} where "
                        f"website_id = ?{f' and {wanted}' if wanted else ''})")
            self._temp_table(
                connection, "differing", "select coalesce(s.identifier, k.identifier) as "
                f"identifier from {segment} s full outer join {snapshot} k on s.identifier = "
                "k.identifier where s.row_hash is distinct from k.row_hash", [self._website()])
            if scope is not None and scope.stale:  # (the daily check: said, never silent)
                self._warn_of_unpended(connection)
            segment_rows = self._differing_segment_rows(connection)
            snapshot_rows = self._snapshot_rows(
                connection, fields,
                *self._few_snapshot_rows("identifier in (select identifier from differing)"),
                extra=("row_hash",))
            self._keep_pending(connection, compared_everything=not wanted)
            connection.execute("drop table differing")
        return segment_rows, snapshot_rows

    def _segment_generation(self, connection: StateConnection) -> int | None:
        """The generation of the latest segment write (None: no segment, or one written by
        a version without generations)."""
        if STAGED_IN not in self._columns(connection, "segment"):
            return None
        return connection.execute(
            f"select max({STAGED_IN}) from {self.table('segment')}").fetchone()[0]

    def _differing_segment_rows(self, connection: StateConnection) -> pl.DataFrame:
        """The segment rows of the identifiers in the temporary table `differing`. Most are
        the rows this run's segment step wrote (a row that did not change in the source is
        usually confirmed as it is). When no row of an earlier write has such an identifier
        (counted from two narrow columns), they are read from the latest generation's row
        groups alone, which DuckDB finds by their min/max statistics: in a 1M segment with
        1% changed, 0.11 s to read every row group's columns, a few ms these. Otherwise
        (a write Crisp refused, a person changed in Crisp since), and on Postgres, which has
        no such statistics, the whole table is read."""
        table = self.table("segment")
        wanted = "identifier in (select identifier from differing)"
        generation = (self._segment_generation(connection) if self._dialect == "duckdb"
                      else None)
        if generation is not None and generation > 1:  # (1: one write holds every row)
            older = connection.execute(
                f"select count(*) from {table} where {STAGED_IN} is distinct from ? and "
                f"{wanted}", [generation]).fetchone()[0]
            if older == 0:
                return connection.execute(f"select * from {table} where {STAGED_IN} = ? "
                                          f"and {wanted}", [generation]).pl().drop(STAGED_IN)
        rows = connection.execute(f"select * from {table} where {wanted}").pl()
        return rows.drop(STAGED_IN, strict=False)

    def managed_emails_among(self, emails: pl.Series) -> pl.Series:
        """Of `emails` (lower case), those a person managed on this website holds (lower
        case): a lookup in SQL, where loading every managed email would cost a million
        strings a run."""
        if emails.is_empty():
            return pl.Series("email", [], pl.String)
        with self._session() as connection:
            self._ensure_snapshot(connection, [])
            connection.register("wanted", emails.unique().to_frame("email").to_arrow())
            found = connection.execute(
                f"select distinct lower(email) as email from {self.table('snapshot')} where "
                "website_id = ? and email is not null and lower(email) in (select email from "
                "wanted)", [self._website()]).pl()
            connection.unregister("wanted")
        return found.get_column("email").cast(pl.String)

    # ---------------------------------------------------------------- what may differ
    # The diff and `has_arrivals` compare only the identifiers in `compare_pending`, which
    # holds, for the website of `compare_scope`, every identifier whose segment and snapshot
    # rows may differ: an identifier not pending has both rows with equal row hashes, or
    # neither. Every write that may break this pends what it touched, in its own transaction:
    # the segment rows written and deleted (`write_segment`), the snapshot rows hashed again
    # (`refresh_row_hashes`: a write to a snapshot row forgets its hash, so these are every
    # row written since the last diff), deleted (`_forget`) or re-keyed away (`rekey`). The
    # diff keeps pending exactly the identifiers that differ (the work a run may not finish).
    # Everything is compared instead (and the scope set again) when there is no scope yet
    # (a state from an earlier version), when the segment was replaced in full, the fields
    # or the row hashes changed, the website changed, too many identifiers are pending, or
    # the last full comparison is older than FULL_COMPARE_EVERY_HOURS: a row added or
    # deleted by hand is noticed within a day, and that daily comparison warns of any
    # difference the bookkeeping did not hold (a bug, or such an edit). Every writer holds
    # the activation's lock; on Postgres the diff also locks `compare_pending`, so that a
    # write committing meanwhile (a lock taken over) is not cleared with what it compared.

    def _pending_scope(self, connection: StateConnection) -> PendingScope | None:
        """None when the bookkeeping of this website cannot be trusted at all (nothing to
        compare a full comparison with); otherwise whether it can be used now."""
        if not (self._exists(connection, "compare_scope")
                and self._exists(connection, "compare_pending")):
            return None
        row = connection.execute(f"select full_at from {self.table('compare_scope')} where "
                                 "website_id = ?", [self._website()]).fetchone()
        if row is None:
            return None
        pending = connection.execute(  # (an identifier may be noted twice)
            f"select count(distinct identifier) from {self.table('compare_pending')}"
        ).fetchone()[0]
        segment = (connection.execute(f"select count(*) from {self.table('segment')}")
                   .fetchone()[0] if self._exists(connection, "segment") else 0)
        stale = row[0] is None or now() - row[0] >= timedelta(hours=FULL_COMPARE_EVERY_HOURS)
        return PendingScope(usable=not stale and pending <= PENDING_SHARE * segment,
                            stale=stale)

    def _pending_identifiers(self) -> str:
        """The pending identifiers, as a subquery (an identifier may be noted twice)."""
        return f"(select distinct identifier from {self.table('compare_pending')})"

    def _pend(self, connection: StateConnection, identifiers: pl.Series) -> None:
        """Note identifiers whose rows may now differ (nothing to note before the first
        diff has set the bookkeeping up)."""
        if identifiers.is_empty() or not self._exists(connection, "compare_pending"):
            return
        connection.register("pended", identifiers.drop_nulls().unique()
                            .to_frame("identifier").to_arrow())
        connection.execute(f"insert into {self.table('compare_pending')} (identifier) "
                           "select identifier from pended")
        connection.unregister("pended")

    def _compare_everything_next(self, connection: StateConnection) -> None:
        """Every row may have changed (a segment replaced, fields added or hashed anew):
        the next diff compares everything."""
        if self._exists(connection, "compare_scope"):
            connection.execute(f"delete from {self.table('compare_scope')}")

    def _keep_pending(self, connection: StateConnection, compared_everything: bool) -> None:
        """After a diff: what differs stays pending, nothing else; a full comparison dates
        the scope."""
        self._create_once(connection, "compare_pending", "identifier varchar")
        self._create_once(connection, "compare_scope", "website_id varchar, full_at timestamptz")
        pending = self.table("compare_pending")
        connection.execute(f"delete from {pending}")
        connection.execute(f"insert into {pending} (identifier) select distinct identifier "
                           "from differing")
        if compared_everything:
            connection.execute(f"delete from {self.table('compare_scope')}")
            connection.execute(f"insert into {self.table('compare_scope')} values (?, ?)",
                               [self._website(), now()])

    def _warn_of_unpended(self, connection: StateConnection) -> None:
        """The daily full comparison: any difference not pending is one the bookkeeping
        missed (a row added or deleted by hand, or a bug): said, never silent."""
        missed = connection.execute(  # (`not exists`: Postgres plans `not in` row by row)
            f"select count(*) from differing d where not exists (select 1 from "
            f"{self.table('compare_pending')} p where p.identifier = d.identifier)"
        ).fetchone()[0]
        if missed:
            log.warning("%s: a full comparison found %d people whose segment and snapshot "
                        "rows differ without being noted as such (a state table edited by "
                        "hand?); they are in this change set", self.schema, missed)

    # ---------------------------------------------------------------- segment against snapshot
    # (in SQL, inside the state file: a step that needs only the few rows that differ never
    # loads the whole segment or the whole snapshot into Python)

    def _unmanaged(self) -> str:
        """The clause keeping the segment rows `s` whose identifier no one manages on this
        website (one parameter: the website). DuckDB's anti join is about twice as fast as
        the correlated `not exists` both databases know (measured on 1M rows)."""
        if self._dialect == "postgres":
            return (f"where not exists (select 1 from {self.table('snapshot')} k where "
                    "k.website_id = ? and k.identifier = s.identifier)")
        return (f"anti join (select identifier from {self.table('snapshot')} where "
                "website_id = ?) k on k.identifier = s.identifier")

    def has_arrivals(self) -> bool:
        """Whether an accepted segment row names someone not managed on this website (the
        one question most runs ask of the source's identifiers: only the identifiers are
        read)."""
        with self._session() as connection:
            self._ensure_snapshot(connection, [])
            if not self._exists(connection, "segment"):
                return False
            scope = self._pending_scope(connection)
            if scope is not None and scope.usable:
                # an arrival differs from the snapshot, so it is pending: only those are
                # looked up (0.05 s instead of 0.09 s at 1M)
                pending = self._pending_identifiers()
                return bool(connection.execute(
                    f"with s as (select identifier from {self.table('segment')} where "
                    f"identifier in {pending}), k as (select identifier from "
                    f"{self.table('snapshot')} where website_id = ? and identifier in "
                    f"{pending}) select exists (select 1 from s where not exists (select 1 "
                    "from k where k.identifier = s.identifier))", [self._website()]
                ).fetchone()[0])
            return bool(connection.execute(
                f"select exists (select 1 from {self.table('segment')} s "
                f"{self._unmanaged()})", [self._website()]).fetchone()[0])

    def arrivals(self, fields: list[str], *, unclaimed_emails: bool = False) -> pl.DataFrame:
        """Accepted segment rows whose identifier is not managed on this website (identifier,
        email and `fields`); with `unclaimed_emails`, only those whose email no managed person
        holds either."""
        with self._session() as connection:
            self._ensure_snapshot(connection, [])
            if not self._exists(connection, "segment"):
                return pl.DataFrame(schema={"identifier": pl.String, "email": pl.String,
                                            **{f: pl.String for f in fields}})
            columns = ", ".join(f"s.{quote(c)}" for c in ["identifier", "email", *fields])
            snapshot = self.table("snapshot")
            arriving = connection.execute(
                f"select {columns} from {self.table('segment')} s {self._unmanaged()}",
                [self._website()]).pl()
            if not unclaimed_emails or arriving.is_empty():
                return arriving  # (most runs: no need to lower-case every managed email)
            connection.register("arriving", arriving.to_arrow())
            unclaimed = connection.execute(
                f"select * from arriving where lower(email) not in (select lower(email) from "
                f"{snapshot} where website_id = ? and email is not null)",
                [self._website()]).pl()
            connection.unregister("arriving")
            return unclaimed.cast(arriving.schema)

    def unnamed_managed(self) -> pl.DataFrame:
        """Managed people (identifier, people_id, email) whose identifier no row of the staged
        segment names, accepted or rejected."""
        with self._session() as connection:
            self._ensure_snapshot(connection, [])
            # (`not exists`: Postgres plans `not in` over a large list row by row)
            unnamed = "".join(f" and not exists (select 1 from {self.table(t)} n where "
                              "n.identifier = k.identifier)"
                              for t in ("segment", "rejected") if self._exists(connection, t))
            return connection.execute(
                f"select identifier, people_id, email from {self.table('snapshot')} k where "
                f"website_id = ?{unnamed}", [self._website()]).pl()

    def holders(self, people_ids: list[str]) -> dict[str, str]:
        """people_id -> identifier, for those of `people_ids` managed on this website."""
        if not people_ids:
            return {}
        with self._session() as connection:
            self._ensure_snapshot(connection, [])
            connection.register("wanted", pl.DataFrame(
                {"people_id": people_ids}, schema={"people_id": pl.String}).to_arrow())
            rows = connection.execute(
                f"select people_id, identifier from {self.table('snapshot')} where "
                "website_id = ? and people_id in (select people_id from wanted)",
                [self._website()]).fetchall()
            connection.unregister("wanted")
        return dict(rows)

    def read(self, name: str) -> pl.DataFrame:
        """Any table of this activation (for the CLI, the demo and tests)."""
        with self._session(writing=False) as connection:
            return self._read(connection, name)
