"""Segments read through a warehouse resource of the user's own Dagster project
(`warehouse: resource`): a real DuckDBResource on a warehouse file apart from the pipeline's
(the `get_connection()` + Arrow path that SnowflakeResource and ADBCResource share), and a
user's resource giving a plain DB-API connection (sqlite3: read row by row)."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.component import build_activation_defs, default_resources

from .harness import Pipeline, crisp_env

ROWS = [("ada@x.io", "Ada", "pro", 3), ("bob@x.io", "Bob", None, 9007199254740991)]


def activation(key: str = "analytics", **segment: object) -> ActivationConfig:
    return ActivationConfig(
        name="via_resource", fields={"person.nickname": "name"}, attributes=["plan", "seats"],
        segment={"warehouse": "resource", "resource_key": key, "table": "customers",
                 **segment})


@pytest.fixture
def warehouse_file(tmp_path) -> str:
    path = str(tmp_path / "analytics.duckdb")
    with duckdb.connect(path) as connection:
        connection.execute("create table customers (email varchar, name varchar, "
                           "plan varchar, seats bigint)")
        connection.executemany("insert into customers values (?, ?, ?, ?)", ROWS)
    return path


def crisp_people(pipeline: Pipeline) -> dict:
    return {email: (p["person"].get("nickname"), p["data"].get("plan"), p["data"].get("seats"))
            for email, p in pipeline.crisp().items()}


def test_a_segment_read_through_the_users_duckdb_resource_syncs_and_shows_its_lineage(
        emulator, tmp_path, monkeypatch, warehouse_file):
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "state.duckdb"), activation(),
                        resources={"analytics": DuckDBResource(database=warehouse_file)})
    pipeline.run()
    assert crisp_people(pipeline) == {"ada@x.io": ("Ada", "pro", 3),
                                      "bob@x.io": ("Bob", None, 9007199254740991)}
    pipeline.run()
    assert pipeline.writes_of_last_run() == 0
    graph = pipeline.defs.resolve_asset_graph()
    segment = graph.get(dg.AssetKey(["via_resource", "segment"]))
    assert dg.AssetKey(["analytics", "customers"]) in segment.parent_keys
    assert "analytics" in segment.kinds


class SqliteWarehouse(dg.ConfigurableResource):
    """A user's own resource: a DB-API connection with no Arrow (read row by row)."""

    path: str

    @contextmanager
    def get_connection(self):
        connection = sqlite3.connect(self.path)
        try:
            yield connection
        finally:
            connection.close()


def test_a_users_plain_dbapi_resource_is_read_row_by_row(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    path = str(tmp_path / "w.sqlite")
    with sqlite3.connect(path) as connection:
        connection.execute("create table customers (email text, name text, plan text, "
                           "seats integer)")
        connection.executemany("insert into customers values (?, ?, ?, ?)", ROWS)
    pipeline = Pipeline(emulator, str(tmp_path / "state.duckdb"), activation("lite"),
                        resources={"lite": SqliteWarehouse(path=path)})
    pipeline.run()
    assert crisp_people(pipeline) == {"ada@x.io": ("Ada", "pro", 3),
                                      "bob@x.io": ("Bob", None, 9007199254740991)}


def test_a_failing_query_through_the_resource_stops_the_run_naming_it(
        emulator, tmp_path, monkeypatch, warehouse_file):
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "state.duckdb"),
                        activation(table=None, sql="select * from no_such_table"),
                        resources={"analytics": DuckDBResource(database=warehouse_file)})
    result = pipeline.run(expect_success=False)
    message = pipeline.failure_text(result)
    assert "resource 'analytics' (DuckDBResource)" in message and "no_such_table" in message
    assert pipeline.requests_of_last_run() == []


def test_an_unbound_resource_key_fails_when_the_definitions_load(tmp_path):
    definitions = dg.Definitions.merge(
        build_activation_defs(activation("nowhere")),
        dg.Definitions(resources=default_resources(str(tmp_path / "s.duckdb"))))
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="nowhere"):
        definitions.resolve_job_def("via_resource_job")


@pytest.mark.parametrize("segment, message", [
    ({"warehouse": "resource", "table": "t"}, "needs `resource_key`"),
    ({"warehouse": "resource", "resource_key": "crisp_db", "table": "t"}, "pipeline's own"),
    ({"warehouse": "resource", "resource_key": "a", "uri_env": "X", "table": "t"}, "uri_env"),
    ({"warehouse": "resource", "resource_key": "a", "timeout_seconds": 5, "table": "t"},
     "set the timeout there"),
    ({"resource_key": "a", "table": "t"}, "is for `warehouse: resource`"),
])
def test_resource_settings_are_checked(segment, message):
    with pytest.raises(ValueError, match=message):
        ActivationConfig(name="x", segment=segment)


class UpperCaseWarehouse(dg.ConfigurableResource):
    """Answers as Snowflake does for unquoted names: in upper case."""

    path: str

    @contextmanager
    def get_connection(self):
        connection = duckdb.connect(self.path)
        try:
            connection.execute("create or replace view shout as select email as EMAIL, "
                               "name as NAME, plan as PLAN, seats as SEATS from customers")
            yield connection
        finally:
            connection.close()


def test_upper_case_column_names_match_the_activations_columns(
        emulator, tmp_path, monkeypatch, warehouse_file):
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "state.duckdb"), activation("up", table="shout"),
                        resources={"up": UpperCaseWarehouse(path=warehouse_file)})
    pipeline.run()
    assert crisp_people(pipeline) == {"ada@x.io": ("Ada", "pro", 3),
                                      "bob@x.io": ("Bob", None, 9007199254740991)}


def test_a_column_of_mixed_types_is_named(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    path = str(tmp_path / "w.sqlite")
    with sqlite3.connect(path) as connection:
        connection.execute("create table customers (email text, name text, plan, seats integer)")
        connection.executemany("insert into customers values (?, ?, ?, ?)",
                               [("ada@x.io", "Ada", "pro", 1), ("bob@x.io", "Bob", 7, 2)])
    pipeline = Pipeline(emulator, str(tmp_path / "state.duckdb"), activation("lite"),
                        resources={"lite": SqliteWarehouse(path=path)})
    result = pipeline.run(expect_success=False)
    assert "column 'plan' mixes values of types ['int', 'str']" in pipeline.failure_text(result)
    assert pipeline.requests_of_last_run() == []
