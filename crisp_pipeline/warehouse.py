"""Where segments come from. One small interface, so that another warehouse is one class.

A `SegmentSource` reads the segment's rows as a Polars frame and, when asked, a cheap
watermark whose change means the rows may have changed (for the source sensor).
`DuckDBSource` is the embedded default; `crisp_pipeline.adbc.AdbcSource` reads from Postgres
or any database with an ADBC driver; `crisp_pipeline.warehouse_resource.ResourceSource`
through a warehouse resource of the user's Dagster project.
"""

from __future__ import annotations

from typing import Protocol

import duckdb
import polars as pl

from crisp_pipeline.activation import SegmentQuery
from crisp_pipeline.state.store import Connect


class SegmentSourceError(RuntimeError):
    """The warehouse could not give the segment (bad SQL, missing table, unreachable file)."""


class SegmentSource(Protocol):
    def read(self) -> pl.DataFrame: ...

    def watermark(self) -> str | None: ...


class QuerySource:
    """What every SQL source shares: the segment's query (`sql`, or every column of
    `table`), read with the columns the activation reads (`needed`), and the watermark: the
    first value its query returns, as text (None: no watermark query, or no value)."""

    def __init__(self, query: SegmentQuery, activation: str,
                 needed: list[str] | None = None) -> None:
        self.query = query
        self.activation = activation
        self.needed = set(needed) if needed is not None else None

    @property
    def sql(self) -> str:
        return self.query.sql or f"select * from {self.query.table}"

    def _run(self, sql: str, what: str, needed: set[str] | None) -> pl.DataFrame:
        raise NotImplementedError

    def read(self) -> pl.DataFrame:
        return self._run(self.sql, "segment query", self.needed)

    def watermark(self) -> str | None:
        if not self.query.watermark_sql:
            return None
        frame = self._run(self.query.watermark_sql, "watermark query", None)
        if frame.is_empty() or frame.width == 0:
            return None
        value = frame.row(0)[0]
        return None if value is None else str(value)


class DuckDBSource(QuerySource):
    def __init__(self, connect: Connect, query: SegmentQuery, activation: str) -> None:
        super().__init__(query, activation)
        self._connect = connect

    def _run(self, sql: str, what: str, needed: set[str] | None = None) -> pl.DataFrame:
        try:
            with self._connect() as connection:
                return connection.sql(sql).pl()
        except duckdb.Error as error:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the {what} failed in DuckDB: "
                f"{type(error).__name__}: {error}") from None


def segment_source(query: SegmentQuery, activation: str, duckdb_connect: Connect,
                   needed: list[str] | None = None, resource: object | None = None
                   ) -> SegmentSource:
    """The activation's `SegmentSource`: DuckDB through the pipeline's own file, ADBC
    (`crisp_pipeline.adbc`), or the user's Dagster `resource` (`warehouse_resource`).
    `needed`: the columns the activation reads."""
    if query.warehouse == "duckdb":
        return DuckDBSource(duckdb_connect, query, activation)
    if query.warehouse == "resource":
        from crisp_pipeline.warehouse_resource import ResourceSource

        return ResourceSource(resource, query, activation, needed)
    from crisp_pipeline.adbc import AdbcSource  # (it imports this module's error)

    return AdbcSource(query.adbc_driver or ADBC_DRIVERS[query.warehouse], query, activation,
                      needed)


ADBC_DRIVERS = {"postgres": "adbc_driver_postgresql"}
