"""Segments read through ADBC: one code path for every database with an ADBC driver whose
`dbapi.connect` takes a URI (PostgreSQL, Snowflake, Flight SQL, SQLite...). The query's Arrow
result goes to Polars column by column, database types Polars cannot take as they are
converted first (`arrow_to_polars`).

The URI comes only from the environment variable the activation names; it, and any password
in it, never appear in an error (`redact`)."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Any

import polars as pl
import pyarrow as pa

from crisp_pipeline.activation import SegmentQuery
from crisp_pipeline.redact import redact
from crisp_pipeline.warehouse import QuerySource, SegmentSourceError

_OPAQUE = "arrow.opaque"  # ADBC's Postgres driver hands `numeric` over as text in this type
_POSTGRES_TYPE = b"POSTGRESQL:type"
# Polars decimals hold at most 38 digits
_MAX_DECIMAL_DIGITS = 38


class UnreadableColumn(ValueError):
    pass


def _storage(column: pa.ChunkedArray, kind: pa.BaseExtensionType) -> pa.ChunkedArray:
    return pa.chunked_array([chunk.storage for chunk in column.chunks],
                            type=kind.storage_type)


def _numeric(text: pl.Series, typmod: int) -> pl.Series:
    """Postgres `numeric` (text here) as a decimal of its declared precision and scale, or
    as a double when it declares none, declares more than a decimal holds, or holds a value
    no decimal can (NaN, Infinity): Crisp holds every number as a double anyway, and a double
    NaN or infinity is a row the segment check rejects, by row and field. Never a null for a
    value (a null would clear what Crisp holds)."""
    if typmod >= 4:
        precision, scale = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
        if 0 < precision <= _MAX_DECIMAL_DIGITS and scale <= precision:
            exact = text.str.to_decimal(scale=scale).cast(pl.Decimal(precision, scale),
                                                          strict=False)
            if exact.null_count() == text.null_count():
                return exact
    return text.cast(pl.Float64, strict=False).fill_null(
        text.str.replace("(?i)^-?infinity$", "inf").cast(pl.Float64, strict=False))


def arrow_to_polars(table: pa.Table, needed: set[str] | None = None) -> pl.DataFrame:
    """An ADBC result as a Polars frame. `numeric` as a decimal or a double (`_numeric`), JSON
    as its text; `money`, which the driver gives in cents, is refused. A column Polars cannot
    hold at all is dropped when the activation does not read it (`needed`), else named."""
    names = table.column_names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UnreadableColumn(f"the query returns column(s) {twice} more than once: name "
                               "each column once")
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        kind = field.type
        database_type = (field.metadata or {}).get(_POSTGRES_TYPE, b"").decode()
        wanted = needed is None or field.name in needed
        if database_type == "money":
            if wanted:
                raise UnreadableColumn(
                    f"column {field.name!r} is money, which arrives in cents: convert it in "
                    f"the query (`{field.name}::numeric`)")
            continue
        if isinstance(kind, pa.BaseExtensionType) and kind.extension_name == _OPAQUE \
                and getattr(kind, "type_name", "") == "numeric":
            typmod = int((field.metadata or {}).get(b"POSTGRESQL:typmod", b"-1"))
            columns.append(_numeric(pl.from_arrow(_storage(column, kind)), typmod)
                           .alias(field.name))
            continue
        if isinstance(kind, pa.BaseExtensionType) and kind.extension_name == "arrow.json":
            columns.append(pl.from_arrow(_storage(column, kind)).alias(field.name))
            continue
        try:
            columns.append(pl.from_arrow(column).alias(field.name))
        except Exception:  # noqa: BLE001 - a type Polars cannot hold at all
            if wanted:
                raise UnreadableColumn(
                    f"column {field.name!r} is {database_type or kind}, which cannot be read "
                    f"into Polars: convert it in the query (e.g. `{field.name}::text`)"
                ) from None
    return pl.DataFrame(columns)


class AdbcSource(QuerySource):
    """A segment read through an ADBC driver (`driver`: its Python module, e.g.
    `adbc_driver_postgresql`), at the URI held by the environment variable `uri_env`.
    `needed`: the columns the activation reads (others the query returns may be of any
    type)."""

    def __init__(self, driver: str, query: SegmentQuery, activation: str,
                 needed: list[str] | None = None) -> None:
        super().__init__(query, activation, needed)
        self.driver = driver

    @property
    def label(self) -> str:
        return f"{self.query.warehouse} (via {self.driver}, URI from ${self.query.uri_env})"

    def _uri(self) -> str:
        uri = os.environ.get(self.query.uri_env or "")
        if not uri:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the segment is read from "
                f"{self.query.warehouse}, whose connection URI the environment variable "
                f"{self.query.uri_env} must hold; it is not set")
        return uri

    def _fail(self, what: str, message: str) -> SegmentSourceError:
        return SegmentSourceError(f"activation {self.activation!r}: the {what} in "
                                  f"{self.label} {message}")

    @staticmethod
    def _fetch(dbapi: Any, uri: str, sql: str, running: dict[str, Any]) -> pa.Table:
        with dbapi.connect(uri) as connection, connection.cursor() as cursor:
            running["cursor"] = cursor
            cursor.execute(sql)
            return cursor.fetch_arrow_table()

    def _run(self, sql: str, what: str, needed: set[str] | None) -> pl.DataFrame:
        uri = self._uri()
        try:
            dbapi = importlib.import_module(f"{self.driver}.dbapi")
        except ImportError:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the ADBC driver {self.driver!r} is not "
                f"installed (`pip install {self.driver.replace('_', '-')}`; for Postgres: "
                "`pip install -e \".[postgres]\"`)") from None
        running: dict[str, Any] = {}
        timeout = self.query.timeout_seconds
        try:
            if timeout is None:
                table = self._fetch(dbapi, uri, sql, running)
            else:
                table = self._within(timeout, dbapi, uri, sql, running, what)
        except SegmentSourceError:
            raise
        except Exception as error:  # noqa: BLE001 - each driver raises its own errors
            raise self._fail(what, f"failed: {type(error).__name__}: "
                                   f"{redact(str(error), uri)}") from None
        try:
            return arrow_to_polars(table, needed)
        except UnreadableColumn as error:
            raise self._fail(what, f"returned what the segment cannot take: {error}") from None

    def _within(self, timeout: float, dbapi: Any, uri: str, sql: str,
                running: dict[str, Any], what: str) -> pa.Table:
        """Connect, run and fetch in a worker thread, given up on (the query cancelled)
        after `timeout` seconds: a server that never answers holds no run."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["table"] = self._fetch(dbapi, uri, sql, running)
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                outcome["error"] = error
        worker = threading.Thread(target=work, daemon=True, name=f"segment {self.activation}")
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            cursor = running.get("cursor")
            if cursor is not None:  # (still connecting: nothing to cancel, nothing to wait)
                with contextlib.suppress(Exception):  # a driver without cancel: left to end
                    cursor.adbc_cancel()
                worker.join(5)
            raise self._fail(what, f"timed out after {timeout:g} s and was given up")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["table"]
