"""The DuckDB state store: what each activation knows, in one schema per activation.

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
- `runs`: one row per sync run with its counts and request figures.

Only confirmed writes enter the snapshot, in one transaction per batch of outcomes, so a crash
mid-sync leaves the snapshot claiming nothing Crisp does not hold; the unconfirmed work is
simply part of the next change set. This module does not import Dagster: it takes a function
that opens a DuckDB connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime

import duckdb
import polars as pl
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]

SNAPSHOT_KEYS = {"identifier": pl.String, "people_id": pl.String, "email": pl.String,
                 "confirmed_at": pl.Datetime("us", "UTC")}
CHANGE_SET_SCHEMA = {
    "run_id": pl.String, "identifier": pl.String, "email": pl.String, "people_id": pl.String,
    "op": pl.String, "reason": pl.String, "message": pl.String, "changed": pl.List(pl.String),
    "old_values": pl.String, "new_values": pl.String, "data_values": pl.String,
}
RUN_SCHEMA = {
    "run_id": pl.String, "change_set_run_id": pl.String, "activation": pl.String,
    "mode": pl.String, "dry_run": pl.Boolean, "override_guards": pl.Boolean,
    "finished_at": pl.Datetime("us", "UTC"), "planned_create": pl.Int64,
    "planned_update": pl.Int64, "planned_delete": pl.Int64, "people_ok": pl.Int64,
    "people_rejected": pl.Int64, "people_deferred": pl.Int64, "requests_sent": pl.Int64,
    "write_requests": pl.Int64, "deferred_because": pl.String, "stopped": pl.String,
}
OUTCOME_SCHEMA = {
    "run_id": pl.String, "identifier": pl.String, "people_id": pl.String, "op": pl.String,
    "step": pl.String, "status": pl.String, "reason": pl.String, "message": pl.String,
    "unit": pl.Int64, "requests": pl.Int64, "at": pl.Datetime("us", "UTC"),
}


class StateUnavailable(RuntimeError):
    """The DuckDB file cannot be opened (not a DuckDB file, a folder, no permission...)."""


def _is_lock_conflict(error: BaseException) -> bool:
    return isinstance(error, duckdb.IOException) and "lock" in str(error).lower()


@retry(retry=retry_if_exception(_is_lock_conflict), wait=wait_random_exponential(0.05, max=2),
       stop=stop_after_delay(60), reraise=True)
def _connect_waiting_for_lock(path: str, config: dict) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(path, config=config)


def open_duckdb(path: str, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Open the file read-write. Another process holding it (DuckDB allows one writer) is
    waited for, up to a minute; anything else fails at once, naming the file."""
    try:
        return _connect_waiting_for_lock(path, dict(config or {}))
    except duckdb.Error as error:
        raise StateUnavailable(
            f"the DuckDB file {path!r} (CRISP_PIPELINE_DB) cannot be opened: {error}") from None


def connect_file(path: str, config: dict | None = None) -> Connect:
    """A `Connect` for a DuckDB file: a connection per use, always closed."""
    @contextlib.contextmanager
    def connect() -> Iterator[duckdb.DuckDBPyConnection]:
        connection = open_duckdb(path, config)
        try:
            yield connection
        finally:
            connection.close()
    return connect


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def now() -> datetime:
    return datetime.now(UTC)


class StateStore:
    def __init__(self, connect: Connect, schema: str) -> None:
        self._connect = connect
        self.schema = schema
        self._catalog = ""

    def table(self, name: str) -> str:
        # fully qualified: a file named like the schema would make an ambiguous catalog
        return f"{quote(self._catalog)}.{quote(self.schema)}.{quote(name)}"

    @contextlib.contextmanager
    def _session(self, writing: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._connect() as connection:
            self._catalog = connection.execute("select current_database()").fetchone()[0]
            if writing:
                connection.execute(f"create schema if not exists {quote(self.schema)}")
            yield connection

    def _exists(self, connection: duckdb.DuckDBPyConnection, name: str) -> bool:
        return connection.execute(
            "select count(*) from information_schema.tables where table_schema = ? "
            "and table_name = ?", [self.schema, name]).fetchone()[0] > 0

    def _replace(self, connection: duckdb.DuckDBPyConnection, name: str,
                 frame: pl.DataFrame) -> None:
        connection.register("frame_to_store", frame.to_arrow())
        connection.execute(f"create or replace table {self.table(name)} as "
                           "select * from frame_to_store")
        connection.unregister("frame_to_store")

    def _append(self, connection: duckdb.DuckDBPyConnection, name: str,
                frame: pl.DataFrame) -> None:
        connection.register("frame_to_store", frame.to_arrow())
        if self._exists(connection, name):
            connection.execute(f"insert into {self.table(name)} by name "
                               "select * from frame_to_store")
        else:
            connection.execute(f"create table {self.table(name)} as select * from frame_to_store")
        connection.unregister("frame_to_store")

    def _read(self, connection: duckdb.DuckDBPyConnection, name: str,
              schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
        if not self._exists(connection, name):
            return pl.DataFrame(schema=schema or {})
        return connection.sql(f"select * from {self.table(name)}").pl()

    # ---------------------------------------------------------------- segment

    def write_segment(self, accepted: pl.DataFrame, rejected: pl.DataFrame, run_id: str) -> None:
        with self._session() as connection:
            connection.execute("begin")
            self._replace(connection, "segment", accepted)
            self._replace(connection, "rejected",
                          rejected.with_columns(pl.lit(run_id).alias("run_id")))
            connection.execute("commit")

    def read_segment(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(accepted, rejected) as the last `segment` materialization left them."""
        with self._session(writing=False) as connection:
            return self._read(connection, "segment"), self._read(connection, "rejected")

    # ---------------------------------------------------------------- snapshot

    def _ensure_snapshot(self, connection: duckdb.DuckDBPyConnection,
                         fields: list[str]) -> None:
        connection.execute(
            f"create table if not exists {self.table('snapshot')} (identifier varchar primary "
            "key, people_id varchar, email varchar, confirmed_at timestamptz)")
        for field in fields:
            connection.execute(f"alter table {self.table('snapshot')} add column if not exists "
                               f"{quote(field)} varchar")

    def read_snapshot(self, fields: list[str]) -> pl.DataFrame:
        """Managed people with the JSON text of every field in `fields` (NULL: unknown)."""
        with self._session() as connection:
            self._ensure_snapshot(connection, fields)
            columns = ", ".join(quote(c) for c in [*SNAPSHOT_KEYS, *fields])
            frame = connection.sql(f"select {columns} from {self.table('snapshot')}").pl()
        return frame.cast({**SNAPSHOT_KEYS, **{field: pl.String for field in fields}})

    def _confirm(self, connection: duckdb.DuckDBPyConnection, confirmed: pl.DataFrame,
                 fields: list[str]) -> None:
        """Upsert confirmed values; a NULL cell in `confirmed` keeps what was known."""
        if confirmed.is_empty():
            return
        self._ensure_snapshot(connection, fields)
        columns = [c for c in [*SNAPSHOT_KEYS, *fields] if c in confirmed.columns]
        connection.register("confirmed_rows", confirmed.select(columns).to_arrow())
        updates = ", ".join(f"{quote(c)} = coalesce(excluded.{quote(c)}, "
                            f"{self.table('snapshot')}.{quote(c)})"
                            for c in columns if c != "identifier")
        listed = ", ".join(quote(c) for c in columns)
        connection.execute(f"insert into {self.table('snapshot')} ({listed}) select {listed} "
                           f"from confirmed_rows on conflict (identifier) do update set {updates}")
        connection.unregister("confirmed_rows")

    def confirm(self, confirmed: pl.DataFrame, fields: list[str]) -> None:
        with self._session() as connection:
            connection.execute("begin")
            self._confirm(connection, confirmed, fields)
            connection.execute("commit")

    # ---------------------------------------------------------------- change sets

    def write_change_set(self, change_set: pl.DataFrame, run_id: str) -> None:
        frame = change_set.with_columns(pl.lit(run_id).alias("run_id"),
                                        pl.lit(now()).alias("computed_at"))
        with self._session() as connection:
            connection.execute("begin")
            self._replace(connection, "change_set", frame)
            self._append(connection, "change_set_history", frame)
            connection.execute("commit")

    def read_change_set(self) -> pl.DataFrame:
        with self._session(writing=False) as connection:
            return self._read(connection, "change_set", CHANGE_SET_SCHEMA)

    # ---------------------------------------------------------------- sync outcomes

    def record_batch(self, outcomes: pl.DataFrame, confirmed: pl.DataFrame,
                     forgotten: list[str], deletions: pl.DataFrame, fields: list[str]) -> None:
        """One transaction per batch: outcomes, confirmed values, people Crisp no longer has,
        and the deletion audit."""
        with self._session() as connection:
            connection.execute("begin")
            self._append(connection, "outcomes", outcomes)
            self._confirm(connection, confirmed, fields)
            if forgotten:
                self._ensure_snapshot(connection, fields)
                connection.register("forgotten", pl.DataFrame(
                    {"identifier": forgotten}, schema={"identifier": pl.String}).to_arrow())
                connection.execute(f"delete from {self.table('snapshot')} where identifier in "
                                   "(select identifier from forgotten)")
                connection.unregister("forgotten")
            if not deletions.is_empty():
                self._append(connection, "deletions", deletions)
            connection.execute("commit")

    def record_run(self, run: dict[str, object]) -> None:
        with self._session() as connection:
            self._append(connection, "runs", pl.DataFrame([run], schema=RUN_SCHEMA))

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
        exist yet (so that guards and metadata never load a whole table to count it)."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, name):
                return 0
            return int(connection.execute(
                f"select {what} from {self.table(name)} where {where}").fetchone()[0] or 0)

    def snapshot_identifiers(self) -> pl.DataFrame:
        """The identifiers of the managed people, without their values."""
        with self._session(writing=False) as connection:
            if not self._exists(connection, "snapshot"):
                return pl.DataFrame(schema={"identifier": pl.String})
            return connection.sql(f"select identifier from {self.table('snapshot')}").pl()

    def read(self, name: str) -> pl.DataFrame:
        """Any table of this activation (for the CLI, the demo and tests)."""
        with self._session(writing=False) as connection:
            return self._read(connection, name)
