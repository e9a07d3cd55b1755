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
- `create schema/table if not exists` are skipped when the schema or table exists (a role
  without the CREATE privilege, its schemas made by a DBA, still works), and otherwise run one
  at a time (an advisory lock): Postgres lets two sessions race on them and one fails with a
  duplicate key;
- text cannot hold a NUL character in Postgres: one in a registered frame (only rejected
  rows' texts can hold one: normalisation rejects it in identifiers and emails) becomes U+FFFD;
- names are at most 63 bytes (Postgres cuts longer ones): `check_name_lengths`.

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

MAX_NAME_BYTES = 63  # Postgres's NAMEDATALEN - 1

_DML = re.compile(r"^\s*(insert|update|delete)\b", re.IGNORECASE)
_RETURNING = re.compile(r"\breturning\b", re.IGNORECASE)
_RACY_DDL = re.compile(r"^\s*create\s+(schema|table)\s+if\s+not\s+exists\s+"
                       r"((?:\"(?:[^\"]|\"\")*\"|[\w.])+)", re.IGNORECASE)
_TRANSACTION = re.compile(r"^\s*(begin|commit|rollback)\s*$", re.IGNORECASE)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")


def _unquoted(sql: str) -> str:
    """The SQL with its quoted texts and names emptied (a name may hold any word)."""
    return _QUOTED.sub("''", sql)


def check_name_lengths(names: list[str], what: str) -> None:
    """Postgres silently cuts names longer than 63 bytes: two fields would become one column,
    and a lookup by the full name would never find it. Refused, naming the field."""
    for name in names:
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(
                f"{what} {name!r} is {len(name.encode())} bytes long; with the state in "
                f"Postgres ({URL_ENV}) a name is at most {MAX_NAME_BYTES} bytes: use a "
                "shorter key (`attributes: [{column: ..., key: ...}]`)")


def numbered_placeholders(sql: str) -> str:
    """`?` placeholders as `$1`, `$2`...; a `?` inside '...' or "..." is text, not a
    placeholder. SQL already numbered is left alone. (Comments and dollar-quoted strings are
    not understood: the store writes neither.)"""
    if re.search(r"\$\d", _unquoted(sql)):
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
        elif dtype == pl.String:
            casts[name] = pl.col(name).str.replace_all("\x00", "\ufffd", literal=True)
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
        self._result: pa.Table | None = None
        self._rows: list[tuple] | None = None
        self.in_transaction = False

    def execute(self, sql: str, params: list | tuple | None = None) -> PostgresConnection:
        if _TRANSACTION.match(sql):
            self.in_transaction = sql.strip().lower() == "begin"
        elif (ddl := _RACY_DDL.match(sql)) is not None:
            return self._ddl_in_turn(sql, params, ddl.group(1).lower(), ddl.group(2))
        statement = numbered_placeholders(sql)
        bare = _unquoted(statement)
        counting = bool(_DML.match(bare)) and not _RETURNING.search(bare)
        if counting:  # as DuckDB: a write answers how many rows it touched
            statement = (f"with changed as ({statement} returning 1) "
                         "select count(*) from changed")
        self._rows = None
        self._cursor.execute(statement, list(params) if params else None)
        # Read the whole result now: ADBC streams it, and a result left unread keeps the
        # statement (and its implicit transaction, with the row locks of an UPDATE) open
        # on the server, so that the next user of this pooled connection, or another
        # session waiting on those rows, hangs.
        self._result = (self._cursor.fetch_arrow_table()
                        if self._cursor.description is not None else None)
        return self

    def _exists(self, kind: str, name: str) -> bool:
        if kind == "schema":
            self._cursor.execute("select count(*) from pg_namespace where nspname = $1",
                                 [name.strip('"').replace('""', '"')])
        else:
            self._cursor.execute("select to_regclass($1) is not null", [name])
        return bool(self._cursor.fetchall()[0][0])

    def _ddl_in_turn(self, sql: str, params, kind: str, name: str) -> PostgresConnection:
        self._result, self._rows = None, None
        if self._exists(kind, name):
            return self
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
        return self

    def _all(self) -> list[tuple]:
        if self._rows is None:
            result = self._result
            self._rows = ([] if result is None else
                          list(zip(*(column.to_pylist() for column in result.columns),
                                   strict=True)) if result.num_columns else [])
        return self._rows

    def fetchone(self) -> tuple | None:
        rows = self._all()
        return rows.pop(0) if rows else None

    def fetchall(self) -> list[tuple]:
        rows, self._rows = self._all(), []
        return rows

    def pl(self) -> pl.DataFrame:
        if self._result is None:
            return pl.DataFrame()
        frame = pl.from_arrow(self._result)
        self._result = None
        return _from_postgres(frame)

    def register(self, name: str, data: pa.Table | pl.DataFrame) -> None:
        frame = data if isinstance(data, pl.DataFrame) else pl.from_arrow(data)
        self._cursor.adbc_ingest(name, _for_postgres(frame).to_arrow(), mode="replace",
                                 temporary=True)

    def unregister(self, name: str) -> None:
        self._cursor.execute(f'drop table if exists pg_temp."{name}"')

    def alive(self) -> bool:
        """Whether the server still answers on this connection (a restart, a failover or an
        idle timeout ends sessions behind the pool's back)."""
        try:
            self._cursor.execute("select 1")
            self._cursor.fetchall()
            self._result, self._rows = None, None
        except Exception:  # noqa: BLE001 (any failure: not usable)
            return False
        return True

    def close(self) -> None:
        self._cursor.close()
        self._raw.close()


# connections a forked child inherited from its parent: never used, never closed
_INHERITED: list[PostgresConnection] = []


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
        """An idle connection that still answers, else a new one."""
        while True:
            with self.lock:
                if self.pid != os.getpid():
                    # a forked child: the parent's sockets are not ours, and closing them
                    # (even by garbage collection) would end the parent's sessions
                    _INHERITED.extend(self.idle)
                    self.idle, self.pid = [], os.getpid()
                connection = self.idle.pop() if self.idle else None
            if connection is None:
                return open_postgres(self.url)
            if connection.alive():
                return connection
            with contextlib.suppress(Exception):
                connection.close()

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
        try:
            yield connection
        except BaseException as error:
            if not connection.alive():  # the session is gone: drop it, say so
                with contextlib.suppress(Exception):
                    connection.close()
                if isinstance(error, Exception) and not isinstance(error, StateUnavailable):
                    raise StateUnavailable(
                        f"the Postgres state ({URL_ENV}) was lost mid-use: "
                        f"{redact(str(error), url)}") from None
                raise
            with contextlib.suppress(Exception):  # (outside a transaction: a warning only)
                connection.execute("rollback")
            connection.in_transaction = False
            pool.give_back(connection)
            raise
        pool.give_back(connection)
    return connect
