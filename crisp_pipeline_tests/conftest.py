"""Shared fixtures: one emulator per test session, served over real sockets on a free port,
reset before each test that uses it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from crisp_pipeline.crisp import CrispClient, CrispSettings, RetryPolicy, Secret
from crisp_pipeline.emulator import EmulatorConfig, RunningEmulator, TokenSpec, start_in_thread

WEBSITE = "website-main"
OTHER_WEBSITE = "website-other"
PLUGIN = TokenSpec("plugin-id", "plugin-key-7f3a9c-SECRET", "plugin")
WEBSITE_TOKEN = TokenSpec("website-id", "website-key-SECRET", "website")
USER = TokenSpec("user-id", "user-key-SECRET", "user")
ADMIN_KEY = "admin-key-for-tests"

# Fast retries so that fault tests do not sleep for seconds.
FAST_RETRY = RetryPolicy(max_attempts=8, initial_wait=0.01, max_wait=0.1, max_total_wait=10)


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[RunningEmulator]:
    config = EmulatorConfig(website_ids=[WEBSITE, OTHER_WEBSITE],
                            tokens=[PLUGIN, WEBSITE_TOKEN, USER], seed=7,
                            admin_key=ADMIN_KEY, rate_limit_per_second=None)
    with start_in_thread(config) as running:
        yield running


@pytest.fixture
def emulator(emulator_server: RunningEmulator) -> RunningEmulator:
    """The session's emulator, emptied: no people, no faults, no log, fresh quotas."""
    emulator_server.emulator.reset()
    emulator_server.emulator.rate.rate = None
    emulator_server.emulator.config.retry_after_header = False
    emulator_server.emulator.config.rate_limit_status = 429
    return emulator_server


def settings_for(running: RunningEmulator, token: TokenSpec = PLUGIN,
                 website_id: str = WEBSITE, **overrides: object) -> CrispSettings:
    values = dict(website_id=website_id, token_identifier=token.identifier,
                  token_key=Secret(token.key), base_url=running.base_url, tier=token.tier)
    values.update(overrides)
    return CrispSettings(**values)


@pytest.fixture
def settings(emulator: RunningEmulator) -> CrispSettings:
    return settings_for(emulator)


def run(coroutine):
    return asyncio.run(coroutine)


def client_for(settings: CrispSettings, **options: object) -> CrispClient:
    options.setdefault("retry", FAST_RETRY)
    return CrispClient(settings, **options)


@pytest.fixture
def http(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    """A raw HTTP client on the emulator's website routes, as the plugin token."""
    with httpx.Client(base_url=f"{emulator.base_url}website/{WEBSITE}/",
                      auth=(PLUGIN.identifier, PLUGIN.key),
                      headers={"X-Crisp-Tier": "plugin"}) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_server():
    """A real Postgres server for the session (see `postgres_server`); a machine without
    one fails these tests, never skips them."""
    from .postgres_server import throwaway_server

    with throwaway_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """The URL of a fresh database on the session's Postgres server."""
    with postgres_server.database() as url:
        yield url


# For a test of a module whose tests run on both backends that proves nothing about the state
# (value handling, batching...): DuckDB only, to keep CI under 15 minutes.
duckdb_state_only = pytest.mark.parametrize("state_backend", ["duckdb"], indirect=True)


@pytest.fixture(params=["duckdb", "postgres"])
def state_backend(request, monkeypatch) -> Iterator[str]:
    """Run the test once with the state in the DuckDB file and once in a fresh Postgres
    database (CRISP_PIPELINE_STATE_URL), as a cluster would keep it."""
    from crisp_pipeline.state.store import STATE_URL_ENV

    if request.param == "duckdb":
        monkeypatch.delenv(STATE_URL_ENV, raising=False)
        yield "duckdb"
        return
    with request.getfixturevalue("postgres_server").database() as url:
        monkeypatch.setenv(STATE_URL_ENV, url)
        yield "postgres"
