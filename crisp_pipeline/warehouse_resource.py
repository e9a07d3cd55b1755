"""Segments read through a warehouse resource the user's Dagster project already has
(`warehouse: resource`, `resource_key: snowflake`): its connection settings and credentials
stay where the user keeps them.

Two shapes of resource are read, as Dagster's integrations define them:
- `get_connection()`, a context manager giving a DB-API connection: dagster-snowflake's
  `SnowflakeResource` (Snowflake's connector: `fetch_arrow_all`), dagster-duckdb's
  `DuckDBResource` and dagster-adbc's `ADBCResource` (`fetch_arrow_table`); any other DB-API
  cursor is read row by row;
- `get_client()`, a context manager giving a BigQuery client: dagster-gcp's
  `BigQueryResource` (`client.query(sql).to_arrow()`).

The Arrow result goes to Polars as an ADBC one does (`adbc.arrow_to_polars`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import polars as pl

from crisp_pipeline.activation import SegmentQuery
from crisp_pipeline.adbc import UnreadableColumn, arrow_to_polars
from crisp_pipeline.warehouse import QuerySource, SegmentSourceError


def _from_cursor(cursor: Any) -> pa.Table:
    if hasattr(cursor, "to_arrow_table"):  # DuckDB (fetch_arrow_table: deprecated there)
        return cursor.to_arrow_table()
    if hasattr(cursor, "fetch_arrow_table"):  # ADBC
        return cursor.fetch_arrow_table()
    if hasattr(cursor, "fetch_arrow_all"):  # Snowflake's connector: None for no rows, unless
        try:                                # (since 3.?) asked for an empty table
            table = cursor.fetch_arrow_all(force_return_table=True)
        except TypeError:
            table = cursor.fetch_arrow_all()
        if table is not None:
            return table
        rows: list = []
    else:
        rows = cursor.fetchall()
    names = [column[0] for column in cursor.description or []]
    if not rows:
        return pa.table({name: pa.array([], pa.string()) for name in names})
    columns = []
    for name, values in zip(names, zip(*rows, strict=True), strict=True):
        try:
            columns.append(pa.array(list(values)))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kinds = sorted({type(v).__name__ for v in values if v is not None})
            raise UnreadableColumn(f"column {name!r} mixes values of types {kinds}: cast it "
                                   "to one type in the query") from None
    return pa.Table.from_arrays(columns, names=names)  # (a name returned twice stays twice)


def _match_case(table: pa.Table, needed: set[str] | None) -> pa.Table:
    """Snowflake answers unquoted names in upper case (`EMAIL` for `email`): a column the
    activation reads that is missing under its own name takes the one name that differs from
    it only in case."""
    if not needed:
        return table
    names = table.column_names
    renamed = list(names)
    for wanted in needed - set(names):
        matches = [i for i, name in enumerate(names) if name.lower() == wanted.lower()]
        if len(matches) == 1:
            renamed[matches[0]] = wanted
    return table.rename_columns(renamed) if renamed != names else table


def _query(resource: Any, sql: str) -> pa.Table:
    get_connection = getattr(resource, "get_connection", None)
    if get_connection is not None:
        with get_connection() as connection:
            cursor = connection.cursor()
            try:
                cursor.execute(sql)
                return _from_cursor(cursor)
            finally:
                close = getattr(cursor, "close", None)
                if close is not None:
                    close()
    get_client = getattr(resource, "get_client", None)
    if get_client is not None:
        with get_client() as client:
            return client.query(sql).to_arrow()
    raise TypeError(f"{type(resource).__name__} has neither get_connection() nor get_client()")


class ResourceSource(QuerySource):
    """A segment read through the Dagster resource bound to `query.resource_key`."""

    def __init__(self, resource: Any, query: SegmentQuery, activation: str,
                 needed: list[str] | None = None) -> None:
        super().__init__(query, activation, needed)
        self.resource = resource

    def _run(self, sql: str, what: str, needed: set[str] | None) -> pl.DataFrame:
        label = f"resource {self.query.resource_key!r} ({type(self.resource).__name__})"
        try:
            table = _match_case(_query(self.resource, sql), needed)
        except UnreadableColumn as error:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the {what} through {label} returned what "
                f"the segment cannot take: {error}") from None
        except Exception as error:  # noqa: BLE001 - each warehouse raises its own errors
            raise SegmentSourceError(
                f"activation {self.activation!r}: the {what} through {label} failed: "
                f"{type(error).__name__}: {error}") from None
        try:
            return arrow_to_polars(table, needed)
        except UnreadableColumn as error:
            raise SegmentSourceError(
                f"activation {self.activation!r}: the {what} through {label} returned what "
                f"the segment cannot take: {error}") from None
