"""Where segments come from. One small interface, so that another warehouse is one class.

A `SegmentSource` reads the segment's rows as a Polars frame and, when asked, a cheap
watermark whose change means the rows may have changed (for the source sensor).
`DuckDBSource` is the embedded default. `AdbcSource` reads from any database with an ADBC
driver (Postgres, Snowflake, BigQuery...): one code path, the query's Arrow result handed to
Polars without a copy per row. Credentials come only from the environment variable the
activation names; they never appear in an error.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from typing import Any, Protocol

import duckdb
import polars as pl
import pyarrow as pa

from crisp_pipeline.activation import SegmentQuery
from crisp_pipeline.state.store import Connect


class SegmentSourceError(RuntimeError):
    """The warehouse could not give the segment (bad SQL, missing table, unreachable file)."""


class SegmentSource(Protocol):
    def read(self) -> pl.DataFrame: ...

    def watermark(self) -> str | None: ...


class DuckDBSource:
    def __init__(self, connect: Connect, query: SegmentQuery, activation: str) -> None:
        self._connect = connect
        self.query = query
        self.activation = activation

    @property
    def sql(self) -> str:
        return self.query.sql or f"select * from {self.query.table}"

    def _run(self, sql: str, what: str) -> duckdb.DuckDBPyRelation | pl.DataFrame:
        try:
            with self._connect() as connection:
                return connection.sql(sql).pl()
        except duckdb.Error as error:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the {what} failed in DuckDB: "
                f"{type(error).__name__}: {error}") from None

    def read(self) -> pl.DataFrame:
        return self._run(self.sql, "segment query")

    def watermark(self) -> str | None:
        if not self.query.watermark_sql:
            return None
        frame = self._run(self.query.watermark_sql, "watermark query")
        if frame.is_empty() or frame.width == 0:
            return None
        value = frame.row(0)[0]
        return None if value is None else str(value)


# ADBC's Postgres driver hands `numeric` over as text in an opaque extension type
_OPAQUE = "arrow.opaque"


class _UnreadableColumn(ValueError):
    pass


def _storage(column: pa.ChunkedArray, kind: pa.BaseExtensionType) -> pa.ChunkedArray:
    return pa.chunked_array([chunk.storage for chunk in column.chunks],
                            type=kind.storage_type)


def _arrow_to_polars(table: pa.Table) -> pl.DataFrame:
    """An ADBC result as Polars: exact numbers (`numeric`) as decimals of the scale the
    database declares (or the widest its values need), JSON as its text; any other
    database-specific type stays as it is, for the segment check to name."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        kind = field.type
        if isinstance(kind, pa.BaseExtensionType) and kind.extension_name == _OPAQUE \
                and getattr(kind, "type_name", "") == "numeric":
            text = pl.from_arrow(_storage(column, kind))
            typmod = int((field.metadata or {}).get(b"POSTGRESQL:typmod", b"-1"))
            scale = (typmod - 4) & 0xFFFF if typmod >= 4 else None
            columns.append(text.str.to_decimal(scale=scale) if scale is not None
                           else text.str.to_decimal(inference_length=max(len(text), 1)))
        elif isinstance(kind, pa.BaseExtensionType) and kind.extension_name == "arrow.json":
            columns.append(pl.from_arrow(_storage(column, kind)))
        else:
            try:
                columns.append(pl.from_arrow(column))
            except Exception:  # noqa: BLE001 - Polars cannot hold this type at all
                database_type = (field.metadata or {}).get(b"POSTGRESQL:type", b"").decode()
                raise _UnreadableColumn(
                    f"column {field.name!r} is {database_type or kind}, which cannot be read "
                    f"into Polars; leave it out of the query or convert it there (e.g. "
                    f"`{field.name}::text`)") from None
    return pl.DataFrame([c.alias(name) for c, name in zip(columns, table.column_names,
                                                         strict=True)])


class AdbcSource:
    """A segment read through an ADBC driver (`driver`: the Python module, e.g.
    `adbc_driver_postgresql`), at the URI held by the environment variable `uri_env`."""

    def __init__(self, driver: str, query: SegmentQuery, activation: str) -> None:
        self.driver = driver
        self.query = query
        self.activation = activation

    @property
    def sql(self) -> str:
        return self.query.sql or f"select * from {self.query.table}"

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

    def _scrub(self, message: str, uri: str) -> str:
        """An error message with the URI, and any password in it, blanked out."""
        password = re.match(r"^[a-z0-9+]+://[^:/@]*:([^@]*)@", uri)
        for secret in filter(None, [uri, password.group(1) if password else None]):
            message = message.replace(secret, "***")
        return message

    def _run(self, sql: str, what: str) -> pl.DataFrame:
        uri = self._uri()
        try:
            dbapi = importlib.import_module(f"{self.driver}.dbapi")
        except ImportError:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the ADBC driver {self.driver!r} is not "
                f"installed (`pip install {self.driver.replace('_', '-')}`; for Postgres: "
                "`pip install -e \".[postgres]\"`)") from None
        timed_out = threading.Event()
        try:
            with dbapi.connect(uri) as connection, connection.cursor() as cursor:
                timer = None
                if self.query.timeout_seconds:
                    def cancel() -> None:
                        timed_out.set()
                        cursor.adbc_cancel()
                    timer = threading.Timer(self.query.timeout_seconds, cancel)
                    timer.start()
                try:
                    cursor.execute(sql)
                    table = cursor.fetch_arrow_table()
                finally:
                    if timer is not None:
                        timer.cancel()
        except Exception as error:  # noqa: BLE001 - each driver raises its own errors
            if timed_out.is_set():
                raise SegmentSourceError(
                    f"activation {self.activation!r}: the {what} in {self.label} timed out "
                    f"after {self.query.timeout_seconds:g} s and was cancelled") from None
            raise SegmentSourceError(
                f"activation {self.activation!r}: the {what} failed in {self.label}: "
                f"{type(error).__name__}: {self._scrub(str(error), uri)}") from None
        try:
            return _arrow_to_polars(table)
        except _UnreadableColumn as error:
            raise SegmentSourceError(f"activation {self.activation!r}: the {what} in "
                                     f"{self.label} returned a {error}") from None

    def read(self) -> pl.DataFrame:
        return self._run(self.sql, "segment query")

    def watermark(self) -> str | None:
        if not self.query.watermark_sql:
            return None
        frame = self._run(self.query.watermark_sql, "watermark query")
        if frame.is_empty() or frame.width == 0:
            return None
        value = frame.row(0)[0]
        return None if value is None else str(value)


def segment_source(query: SegmentQuery, activation: str, duckdb_connect: Connect) -> Any:
    """The activation's `SegmentSource`: DuckDB through the pipeline's own file, or ADBC."""
    if query.warehouse == "duckdb":
        return DuckDBSource(duckdb_connect, query, activation)
    return AdbcSource(query.adbc_driver or ADBC_DRIVERS[query.warehouse], query, activation)


ADBC_DRIVERS = {"postgres": "adbc_driver_postgresql"}
