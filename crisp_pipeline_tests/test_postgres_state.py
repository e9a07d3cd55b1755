"""The Postgres state's own hazards (found by a hostile review), against a real server: a
session the server ended, a fork, names that hold SQL words or exceed Postgres's 63 bytes,
least-privilege roles, a NUL in the source, and placeholders inside quoted text."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import adbc_driver_postgresql.dbapi as pg
import polars as pl
import pytest
from hypothesis import given, strategies as st

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.state import budget
from crisp_pipeline.state.postgres import connect_postgres, numbered_placeholders
from crisp_pipeline.state.store import SNAPSHOT_KEYS, StateStore, now

from .harness import Pipeline, crisp_env


def admin(url: str, *statements: str) -> None:
    with pg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def end_other_sessions(url: str) -> None:
    admin(url, "select pg_terminate_backend(pid) from pg_stat_activity where "
               "pid <> pg_backend_pid() and datname = current_database()")


def person(fields: dict[str, str], people_id: str = "p1") -> pl.DataFrame:
    return pl.DataFrame([{"identifier": "a@x.io", "people_id": people_id, "email": "a@x.io",
                          "confirmed_at": now(), "origin": "created", "verified_at": None,
                          **fields}], schema={**SNAPSHOT_KEYS, **{f: pl.String for f in fields}})


def test_a_session_the_server_ended_is_replaced_not_reused(postgres_url):
    connect = connect_postgres(postgres_url)
    assert budget._add(connect, "t", 10, 100) == 10
    end_other_sessions(postgres_url)  # a restart, a failover, an idle timeout
    assert budget._add(connect, "t", 10, 100) == 10
    assert budget.spent_today(connect, "t") == 20


def test_a_forked_child_leaves_the_parents_sessions_alone(postgres_url):
    connect = connect_postgres(postgres_url)
    budget._add(connect, "t", 1, 100)
    child = os.fork()
    if child == 0:
        try:
            budget._add(connect, "t", 1, 100)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    import gc
    gc.collect()
    assert budget._add(connect, "t", 1, 100) == 1  # the parent's session still answers
    assert budget.spent_today(connect, "t") == 3


@pytest.mark.parametrize("field", ["data.returning", "data.returning-customer",
                                   "data.what?", 'person.nickname'])
def test_names_holding_sql_words_or_question_marks_round_trip(postgres_url, field):
    store = StateStore(connect_postgres(postgres_url), "crisp_x", "w")
    store.confirm(person({field: '"one"'}), [field])
    store.confirm(person({field: '"two"'}), [field])  # the in-place update counts its rows
    assert store.read_snapshot([field]).get_column(field).to_list() == ['"two"']


def test_a_field_longer_than_postgres_names_is_refused_naming_it(postgres_url, monkeypatch):
    long = "data." + "k" * 59  # 64 bytes: a valid Crisp data key, too long a column name
    store = StateStore(connect_postgres(postgres_url), "crisp_x", "w")
    with pytest.raises(ValueError, match=f"field '{long}' is 64 bytes long"):
        store.confirm(person({long: '"v"'}), [long])
    monkeypatch.setenv("CRISP_PIPELINE_STATE_URL", postgres_url)
    from crisp_pipeline.component import build_activation_defs
    with pytest.raises(ValueError, match="64 bytes long"):
        build_activation_defs(ActivationConfig(name="l", segment={"table": "t"},
                                               attributes=[{"column": "c", "key": "k" * 59}]))


def test_a_role_without_create_rights_uses_schemas_made_for_it(postgres_url):
    """Least privilege: a DBA made the schemas; the pipeline's role may not create any."""
    parts = urlsplit(postgres_url)
    database = parts.path.lstrip("/")
    connect = connect_postgres(postgres_url)
    budget._add(connect, "t", 1, 100)  # the shared schema, made by the owner
    StateStore(connect, "crisp_x", "w").confirm(person({"person.nickname": '"A"'}),
                                                ["person.nickname"])
    admin(postgres_url, "create role crisp_runner login password 'runner-secret-1'",
          f"revoke create on database {database} from public",
          "grant usage on schema crisp_pipeline, crisp_x to crisp_runner",
          "grant select, insert, update, delete on all tables in schema crisp_pipeline, "
          "crisp_x to crisp_runner")
    runner = connect_postgres(f"postgresql://crisp_runner:runner-secret-1@{parts.hostname}:"
                              f"{parts.port}/{database}")
    assert budget._add(runner, "t", 5, 100) == 5
    store = StateStore(runner, "crisp_x", "w")
    store.confirm(person({"person.nickname": '"B"'}), ["person.nickname"])
    assert store.read_snapshot(["person.nickname"]).get_column("person.nickname").to_list() \
        == ['"B"']


def test_another_roles_snapshot_is_never_silently_skipped(postgres_url):
    """A mirror must release a person another activation holds; if it cannot read that
    activation's snapshot (another team's role), it must fail, not delete."""
    parts = urlsplit(postgres_url)
    owner = StateStore(connect_postgres(postgres_url), "crisp_team_a", "w")
    owner.confirm(person({"person.nickname": '"A"'}, people_id="shared"), ["person.nickname"])
    admin(postgres_url, "create role team_b login password 'team-b-secret-1'",
          "create schema crisp_team_b authorization team_b")
    team_b = StateStore(connect_postgres(
        f"postgresql://team_b:team-b-secret-1@{parts.hostname}:{parts.port}{parts.path}"),
        "crisp_team_b", "w")
    with pytest.raises(Exception, match="permission denied"):
        team_b.holders_elsewhere(["shared"])


def test_a_nul_in_the_source_rejects_that_row_only(postgres_url, emulator, tmp_path,
                                                   monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_PIPELINE_STATE_URL", postgres_url)
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="nul", segment={"table": "people"}, fields={"person.nickname": "name"}))
    pipeline.load([{"email": "ok@x.io", "name": "Ok"}, {"email": "bad\x00@x.io", "name": "B"},
                   {"email": "fine@x.io", "name": "Nul\x00Inside"}])
    pipeline.run()
    assert set(pipeline.crisp()) == {"ok@x.io", "fine@x.io"}
    rejected = pipeline.store.read("rejected")
    assert rejected.get_column("reason").to_list() == ["invalid_email"]


@given(st.lists(st.sampled_from(["?", "'?'", '"?"', "x", " ", "''", "'a''?'"]), max_size=12))
def test_only_placeholders_outside_quotes_are_numbered(pieces):
    sql = "".join(pieces)
    numbered = numbered_placeholders(sql)
    outside = sum(piece == "?" for piece in pieces)
    assert [f"${n}" in numbered for n in range(1, outside + 1)] == [True] * outside
    assert f"${outside + 1}" not in numbered


def test_a_write_whose_count_nobody_reads_leaves_no_transaction_open(postgres_url):
    """ADBC streams results: an UPDATE's row count left unread kept its implicit transaction
    (and the row's lock) open on a pooled connection, and the next writer of that row hung
    (the crash test's heartbeat did)."""
    from crisp_pipeline.state import locks

    connect = connect_postgres(postgres_url)
    locks.acquire(connect, "act", "run-1", wait_seconds=1)
    locks.heartbeat(connect, "act", "run-1")  # an UPDATE; nobody reads how many rows
    with pg.connect(postgres_url, autocommit=True) as other, other.cursor() as cursor:
        cursor.execute("set lock_timeout = '2s'")
        cursor.execute('update crisp_pipeline.activation_locks set heartbeat_at = now() '
                       "where activation = 'act'")
    locks.release(connect, "act", "run-1")
