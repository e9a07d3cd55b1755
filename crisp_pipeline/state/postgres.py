"""The state store on Postgres (CRISP_PIPELINE_STATE_URL), through ADBC.

`StateStore`, the budget and the locks were written against DuckDB's Python API. Rather than
a second store, `PostgresConnection` speaks the small part of that API they use (`execute`
returning the connection, `fetchone`, `fetchall`, `pl`, `register`/`unregister` of an Arrow
table) over an ADBC connection, and the store's SQL is written in the dialect both databases
share. What differs is translated here, in one place:

- placeholders: `?` becomes `$1`, `$2`... (outside quoted text);
- a frame `register`ed is copied (Arrow, `COPY`) into a temporary table of the same name;
- an `insert`, `update` or `delete` answers its row count, as DuckDB's do;
- 64-bit hashes (`*_hash` columns) are unsigned in Polars and DuckDB and signed in Postgres:
  stored with the same bits, read back unsigned;
- `create schema/table if not exists` run one at a time (an advisory lock): Postgres lets two
  sessions race on them and one fails with a duplicate key.

ADBC rather than psycopg: frames go in and out as Arrow, with no per-row Python work, and the
driver is already the project's Postgres source (`adbc-driver-postgresql`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import threading
from collections.abc import Iterator

import polars as pl
import pyarrow as pa

from ..redact import redact
from .store import Connect, StateUnavailable

URL_ENV = "CRISP_PIPELINE_STATE_URL"
# pg_advisory_lock keys of this project (any two 64-bit numbers no other tool is likely to use)
DDL_LOCK = 0x637269737064646C  # "crispddl"
NAMED_LOCK_SPACE = 0x63726973  # "cris": with hashtext(name), see `serialize`

_DML = re.compile(r"^\s*(insert|update|delete)\b", re.IGNORECASE)
_RETURNING = re.compile(r"\breturning\b", re.IGNORECASE)
_RACY_DDL = re.compile(r"^\s*create\s+(schema|table)\s+if\s+not\s+exists\b", re.IGNORECASE)
_TRANSACTION = re.compile(r"^\s*(begin|commit|rollback)\s*$", re.IGNORECASE)


def numbered_placeholders(sql: str) -> str:
    """`?` placeholders as `$1`, `$2`...; a `?` inside '...' or "..." is text, not a
    placeholder. SQL already numbered is left alone."""
    if re.search(r"\$\d", sql):
        return sql
    out, number, quote_char = [], 0, ""
    for char in sql:
        if quote_char:
            if char == quote_char:
                quote_char = ""
        elif char in "'\"":
            quote_char = char
        elif char == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(char)
    return "".join(out)


def _for_postgres(frame: pl.DataFrame) -> pl.DataFrame:
    """Types Postgres lacks: unsigned integers (64-bit: same bits, signed), and all-null
    columns of no type (text)."""
    casts: dict[str, pl.Expr] = {}
    for name, dtype in frame.schema.items():
        if dtype == pl.UInt64:
            casts[name] = pl.col(name).reinterpret(signed=True)
        elif dtype in (pl.UInt8, pl.UInt16, pl.UInt32):
            casts[name] = pl.col(name).cast(pl.Int64)
        elif dtype == pl.Null:
            casts[name] = pl.col(name).cast(pl.String)
    return frame.with_columns(**casts) if casts else frame


def _from_postgres(frame: pl.DataFrame) -> pl.DataFrame:
    hashes = [n for n, t in frame.schema.items() if n.endswith("_hash") and t == pl.Int64]
    return frame.with_columns(pl.col(hashes).reinterpret(signed=False)) if hashes else frame


class PostgresConnection:
    """An ADBC Postgres connection presented as the part of a DuckDB connection the state
    store uses (see module docstring). Autocommit: `begin`/`commit`/`rollback` are plain
    statements, as the store issues them."""

    dialect = "postgres"

    def __init__(self, raw, url: str) -> None:
        self._raw = raw
        self._url = url
        self._cursor = raw.cursor()
        self._rows: list[tuple] | None = None
        self._has_result = False
        self.in_transaction = False

    def execute(self, sql: str, params: list | tuple | None = None) -> PostgresConnection:
        if _TRANSACTION.match(sql):
            self.in_transaction = sql.strip().lower() == "begin"
        elif _RACY_DDL.match(sql):
            return self._ddl_in_turn(sql, params)
        statement = numbered_placeholders(sql)
        counting = bool(_DML.match(statement)) and not _RETURNING.search(statement)
        if counting:  # as DuckDB: a write answers how many rows it touched
            statement = (f"with changed as ({statement} returning 1) "
                         "select count(*) from changed")
        self._rows = None
        self._cursor.execute(statement, list(params) if params else None)
        self._has_result = self._cursor.description is not None
        return self

    def _ddl_in_turn(self, sql: str, params) -> PostgresConnection:
        if self.in_transaction:
            self._cursor.execute(f"select pg_advisory_xact_lock({DDL_LOCK})")
            self._cursor.execute(sql, list(params) if params else None)
        else:
            self._cursor.execute("begin")
            try:
                self._cursor.execute(f"select pg_advisory_xact_lock({DDL_LOCK})")
                self._cursor.execute(sql, list(params) if params else None)
            except BaseException:
                self._cursor.execute("rollback")
                raise
            self._cursor.execute("commit")
        self._has_result, self._rows = False, None
        return self

    def _all(self) -> list[tuple]:
        if self._rows is None:
            self._rows = self._cursor.fetchall() if self._has_result else []
        return self._rows

    def fetchone(self) -> tuple | None:
        rows = self._all()
        return rows.pop(0) if rows else None

    def fetchall(self) -> list[tuple]:
        rows, self._rows = self._all(), []
        return rows

    def pl(self) -> pl.DataFrame:
        if not self._has_result:
            return pl.DataFrame()
        frame = pl.from_arrow(self._cursor.fetch_arrow_table())
        self._has_result = False
        return _from_postgres(frame)

    def register(self, name: str, data: pa.Table | pl.DataFrame) -> None:
        frame = data if isinstance(data, pl.DataFrame) else pl.from_arrow(data)
        self._cursor.adbc_ingest(name, _for_postgres(frame).to_arrow(), mode="replace",
                                 temporary=True)

    def unregister(self, name: str) -> None:
        self._cursor.execute(f'drop table if exists pg_temp."{name}"')

    def close(self) -> None:
        self._cursor.close()
        self._raw.close()


def serialize(connection, name: str) -> None:
    """Inside a transaction: wait for any other transaction serialising on `name` to end.
    DuckDB lets one process write a file at a time, so there it costs nothing; Postgres
    sessions run side by side, and a read-then-write (a lock's holder) must not interleave."""
    if getattr(connection, "dialect", "duckdb") == "postgres":
        connection.execute(f"select pg_advisory_xact_lock({NAMED_LOCK_SPACE}, hashtext(?))",
                           [name])


class _Pool:
    """Idle connections of this process to one URL (opening one costs ~45 ms: SCRAM), never
    shared by two threads at once, never inherited across a fork."""

    def __init__(self, url: str, keep: int = 4) -> None:
        self.url, self.keep = url, keep
        self.idle: list[PostgresConnection] = []
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def take(self) -> PostgresConnection:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: the parent's sockets are not ours
                self.idle, self.pid = [], os.getpid()
            if self.idle:
                return self.idle.pop()
        return open_postgres(self.url)

    def give_back(self, connection: PostgresConnection) -> None:
        with self.lock:
            if self.pid == os.getpid() and len(self.idle) < self.keep:
                self.idle.append(connection)
                return
        with contextlib.suppress(Exception):
            connection.close()


def open_postgres(url: str) -> PostgresConnection:
    """Connect, failing with `StateUnavailable` (the URL's password never shown)."""
    try:
        import adbc_driver_postgresql.dbapi as dbapi
    except ImportError:
        raise StateUnavailable(
            f"{URL_ENV} is set, and keeping the state in Postgres needs the ADBC driver: "
            "pip install 'crisp-pipeline[postgres]'") from None
    try:
        return PostgresConnection(dbapi.connect(url, autocommit=True), url)
    except Exception as error:  # noqa: BLE001 (the driver's errors have no common base here)
        raise StateUnavailable(f"the Postgres state ({URL_ENV}) cannot be reached: "
                               f"{redact(str(error), url)}") from None


_POOLS: dict[str, _Pool] = {}
_POOLS_GUARD = threading.Lock()


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        if pool.pid == os.getpid():
            for connection in pool.idle:
                with contextlib.suppress(Exception):
                    connection.close()
            pool.idle.clear()


def connect_postgres(url: str) -> Connect:
    """A `Connect` for the Postgres state: a pooled connection per use. A use that fails
    leaves no transaction open behind it; a connection that broke is dropped."""
    with _POOLS_GUARD:
        pool = _POOLS.setdefault(url, _Pool(url))

    @contextlib.contextmanager
    def connect() -> Iterator[PostgresConnection]:
        connection = pool.take()
        healthy = True
        try:
            yield connection
        except BaseException:
            try:
                if connection.in_transaction:
                    connection.execute("rollback")
            except Exception:  # noqa: BLE001 (a broken connection: drop it)
                healthy = False
            raise
        finally:
            if healthy:
                pool.give_back(connection)
            else:
                with contextlib.suppress(Exception):
                    connection.close()
    return connect
