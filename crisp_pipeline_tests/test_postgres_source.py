"""Segments read from a real Postgres server through ADBC, synced through Dagster into the
emulator: values arrive as the DuckDB path sends them, a bad query or column stops the run
before any request and names the source, and the connection URI never shows."""

from __future__ import annotations

import datetime as dt
import socket
from decimal import Decimal
from urllib.parse import urlsplit

import adbc_driver_postgresql.dbapi as pg
import dagster as dg
import polars as pl
import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.adbc import AdbcSource
from crisp_pipeline.component import build_activation_defs, default_resources
from crisp_pipeline.warehouse import SegmentSourceError

from .harness import Pipeline, crisp_env

ROWS = [
    {"email": "Ada@Example.com ", "name": "Ada", "plan": "pro", "mrr": Decimal("12.50"),
     "seats": 3, "active": True, "signup": dt.date(2024, 5, 1)},
    {"email": "bob@example.com", "name": "Bob", "plan": None, "mrr": Decimal("0.10"),
     "seats": 9007199254740991, "active": False, "signup": None},
    {"email": "not-an-email", "name": "Bad", "plan": "free", "mrr": Decimal("1.00"),
     "seats": 1, "active": True, "signup": dt.date(2024, 1, 2)},
]
CREATE = ("create table customers (email text, name text, plan text, mrr numeric(10,2), "
          "seats bigint, active boolean, signup date)")


def password_of(url: str) -> str:
    return urlsplit(url).password or ""


def execute(url: str, *statements: str) -> None:
    with pg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def load(url: str, rows: list[dict]) -> None:
    execute(url, "drop table if exists customers", CREATE)
    with pg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        for row in rows:
            cursor.execute("insert into customers values ($1, $2, $3, $4::numeric, $5, $6, $7)",
                           [row["email"], row["name"], row["plan"], str(row["mrr"]),
                            row["seats"], row["active"], row["signup"]])


def config(name: str = "pg", **segment: object) -> ActivationConfig:
    chosen = {"table": "customers", "warehouse": "postgres", "uri_env": "TEST_WAREHOUSE_URL",
              **segment}
    return ActivationConfig(
        name=name, segment={k: v for k, v in chosen.items() if v is not None},
        fields={"person.nickname": "name"}, attributes=["plan", "mrr", "seats", "active",
                                                        "signup"])


@pytest.fixture
def warehouse(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_WAREHOUSE_URL", postgres_url)
    load(postgres_url, ROWS)
    return postgres_url


def test_a_postgres_segment_syncs_like_the_same_rows_in_duckdb(warehouse, emulator, tmp_path,
                                                               monkeypatch):
    crisp_env(monkeypatch, emulator)
    from_postgres = Pipeline(emulator, str(tmp_path / "pg.duckdb"), config())
    from_postgres.run()
    held = from_postgres.crisp()
    assert set(held) == {"ada@example.com", "bob@example.com"}
    assert from_postgres.store.read("rejected").get_column("field").to_list() == ["email"]

    # the same rows in DuckDB, another activation: the very same segment is staged
    duck = ActivationConfig(name="duck", segment={"table": "customers"},
                            fields={"person.nickname": "name"},
                            attributes=["plan", "mrr", "seats", "active", "signup"])
    from_duckdb = Pipeline(emulator, str(tmp_path / "duck.duckdb"), duck)
    from_duckdb.load(pl.DataFrame(ROWS, schema={
        "email": pl.String, "name": pl.String, "plan": pl.String, "mrr": pl.Decimal(10, 2),
        "seats": pl.Int64, "active": pl.Boolean, "signup": pl.Date}), table="customers")
    from_duckdb.run()
    assert from_duckdb.writes_of_last_run() == 0  # Crisp already holds exactly these values
    columns = ["identifier", "email", *from_postgres.fields]
    staged = [p.store.read("segment").select(columns).sort("identifier")
              for p in (from_postgres, from_duckdb)]
    assert staged[0].equals(staged[1]), (staged[0], staged[1])
    assert held["ada@example.com"]["data"]["mrr"] == 12.5
    assert held["bob@example.com"]["data"]["seats"] == 9007199254740991

    # nothing changed in Postgres: nothing sent; one value changed: one write
    from_postgres.run()
    assert from_postgres.writes_of_last_run() == 0
    execute(warehouse, "update customers set plan = 'team' where email = 'bob@example.com'")
    from_postgres.run()
    assert from_postgres.writes_of_last_run() == 1
    assert from_postgres.crisp()["bob@example.com"]["data"]["plan"] == "team"


def failure_and_metadata(pipeline: Pipeline, result: dg.ExecuteInProcessResult) -> str:
    texts = [pipeline.failure_text(result)]
    for event in result.all_events:
        texts.append(str(event.event_specific_data))
    return "\n".join(texts)


@pytest.mark.parametrize(("segment", "expected"), [
    ({"table": "no_such_table"}, "no_such_table"),
    ({"table": None, "sql": "select email, name, plan, mrr, seats, active, signup, "
      "interval '1 day' as period from customers"}, None),
])
def test_a_bad_query_stops_the_run_before_any_request_and_names_the_source(
        warehouse, emulator, tmp_path, monkeypatch, segment, expected):
    crisp_env(monkeypatch, emulator)
    activation = config(**segment)
    if "sql" in segment:  # a column Crisp cannot hold, mapped as an attribute
        activation = activation.model_copy(update={"attributes": [*activation.attributes,
                                                                  "period"]})
        activation = ActivationConfig.model_validate(activation.model_dump())
    pipeline = Pipeline(emulator, str(tmp_path / "s.duckdb"), activation)
    result = pipeline.run(expect_success=False)
    text = failure_and_metadata(pipeline, result)
    assert pipeline.writes_of_last_run() == 0 and not pipeline.crisp()
    assert password_of(warehouse) not in text and warehouse not in text
    if expected:
        assert "postgres" in pipeline.failure_text(result)
        assert expected in pipeline.failure_text(result)
    else:
        assert "'period'" in pipeline.failure_text(result)


def test_a_missing_uri_variable_is_named(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.delenv("TEST_WAREHOUSE_URL", raising=False)
    pipeline = Pipeline(emulator, str(tmp_path / "s.duckdb"), config())
    result = pipeline.run(expect_success=False)
    assert "TEST_WAREHOUSE_URL" in pipeline.failure_text(result)
    assert pipeline.writes_of_last_run() == 0


def test_a_slow_query_is_cancelled_after_its_timeout(warehouse, monkeypatch):
    source = AdbcSource("adbc_driver_postgresql", config(
        table=None, sql="select pg_sleep(30), * from customers",
        timeout_seconds=0.5).segment, "pg")
    started = dt.datetime.now()
    with pytest.raises(SegmentSourceError, match="timed out after 0.5 s"):
        source.read()
    assert (dt.datetime.now() - started).total_seconds() < 10


def test_the_watermark_query_runs_in_postgres(warehouse):
    source = AdbcSource("adbc_driver_postgresql", config(
        watermark_sql="select max(signup) from customers").segment, "pg")
    assert source.watermark() == "2024-05-01"
    execute(warehouse, "insert into customers (email, signup) values ('c@x.io', '2025-01-01')")
    assert source.watermark() == "2025-01-01"


def lineage(activation: ActivationConfig) -> dg.AssetKey:
    defs = dg.Definitions.merge(build_activation_defs(activation),
                                dg.Definitions(resources=default_resources("/tmp/unused")))
    graph = defs.resolve_asset_graph()
    (parent,) = graph.get(dg.AssetKey([activation.name, "segment"])).parent_keys
    assert graph.get(parent).is_external
    return parent


def test_the_source_is_upstream_of_the_segment_in_the_asset_graph():
    assert lineage(config()) == dg.AssetKey(["postgres", "customers"])
    assert lineage(config(table="public.customers")) == dg.AssetKey(["postgres", "customers"])
    assert lineage(config(table="crm.customers")) == dg.AssetKey(["postgres", "crm",
                                                                  "customers"])
    assert lineage(config(upstream=["analytics", "dbt_customers"])) == \
        dg.AssetKey(["analytics", "dbt_customers"])
    duck = ActivationConfig(name="d", segment={"sql": "select 1"}, attributes=[])
    assert lineage(duck) == dg.AssetKey(["duckdb", "d_query"])
    # two activations on one table share its node
    both = dg.Definitions.merge(build_activation_defs(config("a")),
                                build_activation_defs(config("b")),
                                dg.Definitions(resources=default_resources("/tmp/unused")))
    graph = both.resolve_asset_graph()
    assert graph.get(dg.AssetKey(["postgres", "customers"])).child_keys == {
        dg.AssetKey(["a", "segment"]), dg.AssetKey(["b", "segment"])}


@pytest.mark.parametrize(("segment", "message"), [
    ({"uri_env": "postgresql://u:p@h/db"}, "not the URI"),
    ({"warehouse": "duckdb", "uri_env": "X"}, "pipeline's own file"),
    ({"warehouse": "adbc", "uri_env": "X"}, "adbc_driver"),
    ({"upstream": []}, "asset key"),
])
def test_a_source_configuration_that_cannot_work_is_refused(segment, message):
    with pytest.raises(ValueError, match=message):
        config(**segment)


def test_numbers_no_decimal_holds_are_rejected_by_row_never_cleared_in_crisp(
        postgres_url, emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("TEST_WAREHOUSE_URL", postgres_url)
    execute(postgres_url,
            "create table money_rows (email text, mrr numeric, big numeric(50,10), "
            "price numeric(10,2), spare money, unused interval)",
            "insert into money_rows values ('a@x.io', 5, 1.5, 12.50, 1, '1 day'), "
            "('b@x.io', 7, 1234567890123456789012345678901.5, 3.10, 2, '2 days'), "
            "('c@x.io', 1, 0, 0, 0, '0 days')")
    activation = ActivationConfig(
        name="nums", segment={"table": "money_rows", "warehouse": "postgres",
                              "uri_env": "TEST_WAREHOUSE_URL"},
        attributes=["mrr", "big", "price"])
    pipeline = Pipeline(emulator, str(tmp_path / "n.duckdb"), activation)
    pipeline.run()  # `spare` (money) and `unused` (interval) are not read: no harm
    held = pipeline.crisp()
    assert held["a@x.io"]["data"] == {"mrr": 5, "big": 1.5, "price": 12.5}
    assert held["b@x.io"]["data"]["big"] == pytest.approx(1.2345678901234568e30)
    execute(postgres_url, "update money_rows set mrr = 'NaN' where email = 'a@x.io'",
            "update money_rows set price = 'NaN', mrr = '-Infinity' where email = 'b@x.io'")
    pipeline.run()
    held = pipeline.crisp()
    # the rows are refused, by row and field; what Crisp holds stays
    assert held["a@x.io"]["data"]["mrr"] == 5 and held["b@x.io"]["data"]["mrr"] == 7
    rejected = pipeline.store.read("rejected")
    assert set(zip(rejected.get_column("identifier"), rejected.get_column("field"),
                   strict=True)) >= {("a@x.io", "data.mrr"), ("b@x.io", "data.mrr")}
    # empty and all-null unconstrained numbers read fine
    execute(postgres_url, "update money_rows set mrr = null")
    pipeline.run()


@pytest.mark.parametrize(("sql", "named"), [
    ("select email, spare as mrr from money_rows", "money"),
    ("select email, unused as mrr from money_rows", "interval"),
    ("select email, email as mrr, 1 as mrr from money_rows", "more than once"),
])
def test_a_column_the_segment_cannot_take_is_named(postgres_url, monkeypatch, sql, named):
    monkeypatch.setenv("TEST_WAREHOUSE_URL", postgres_url)
    execute(postgres_url, "create table money_rows (email text, spare money, unused interval)",
            "insert into money_rows values ('a@x.io', 1, '1 day')")
    source = AdbcSource("adbc_driver_postgresql", config(table=None, sql=sql).segment, "pg",
                        needed=["email", "mrr"])
    with pytest.raises(SegmentSourceError, match=named) as raised:
        source.read()
    assert "'mrr'" in str(raised.value) and postgres_url not in str(raised.value)


def test_a_server_that_never_answers_is_given_up_after_the_timeout(monkeypatch):
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        monkeypatch.setenv("TEST_WAREHOUSE_URL", f"postgresql://u:pw-1234@127.0.0.1:{port}/d")
        source = AdbcSource("adbc_driver_postgresql", config(timeout_seconds=1).segment, "pg")
        started = dt.datetime.now()
        with pytest.raises(SegmentSourceError, match="timed out after 1 s"):
            source.read()
        assert (dt.datetime.now() - started).total_seconds() < 4


def test_the_same_adbc_path_reads_another_driver(emulator, tmp_path, monkeypatch):
    """DuckDB's own ADBC driver (shipped with duckdb): a warehouse file apart from the
    pipeline's state, read by the code path Postgres uses."""
    import duckdb

    crisp_env(monkeypatch, emulator)
    warehouse_file = str(tmp_path / "warehouse.duckdb")
    with duckdb.connect(warehouse_file) as connection:
        connection.execute("create table customers as select 'w@x.io' as email, 'Wu' as name, "
                           "'pro' as plan, 12.50::decimal(10,2) as mrr")
    monkeypatch.setenv("TEST_WAREHOUSE_URL", warehouse_file)
    activation = ActivationConfig(
        name="other", segment={"table": "customers", "warehouse": "adbc",
                               "adbc_driver": "adbc_driver_duckdb",
                               "uri_env": "TEST_WAREHOUSE_URL"},
        fields={"person.nickname": "name"}, attributes=["plan", "mrr"])
    pipeline = Pipeline(emulator, str(tmp_path / "state.duckdb"), activation)
    pipeline.run()
    assert pipeline.crisp()["w@x.io"]["data"] == {"plan": "pro", "mrr": 12.5}
    pipeline.run()
    assert pipeline.writes_of_last_run() == 0
