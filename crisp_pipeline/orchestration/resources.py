"""The resources every activation uses (the DuckDB file, Crisp, the per-run options), and
what steps reach through them: the state, the warehouse, the Crisp settings."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from crisp_pipeline import alerts
from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.crisp import CrispSettings, SettingsError
from crisp_pipeline.crisp.config import daily_quota_from_env
from crisp_pipeline.state.budget import remaining_today
from crisp_pipeline.state.store import (STATE_URL_ENV, StateStore, StateUnavailable,
                                         connect_file, connect_state)
from crisp_pipeline.sync.client import ClientOptions
from crisp_pipeline.warehouse import SegmentSource, segment_source

DEFAULT_DB = "data/crisp_pipeline.duckdb"

class CrispResource(dg.ConfigurableResource):
    """How to reach Crisp. The website, token pair, tier and quota are read from the CRISP_*
    environment variables when a run starts, so the token never enters Dagster's config,
    event log or UI."""

    max_in_flight: int = Field(default=16, gt=0, description="Requests in flight at once.")
    requests_per_second: float | None = None
    request_deadline_seconds: float = Field(
        default=30.0, gt=0, description="The longest one request may take, answer included, "
        "however slowly it trickles in (then it is retried or deferred).")

    def settings(self, website_id: str | None = None) -> CrispSettings:
        settings = CrispSettings.from_env()
        return dataclasses.replace(settings, website_id=website_id) if website_id else settings

    def client_options(self, deadline: float | None = None) -> ClientOptions:
        return ClientOptions(self.max_in_flight, self.requests_per_second,
                             self.request_deadline_seconds, deadline)

    def budget_left(self, connect) -> int | None:
        """Today's requests left for the configured token (no secret needed)."""
        token = os.environ.get("CRISP_TOKEN_IDENTIFIER")
        quota = daily_quota_from_env()
        return remaining_today(connect, token, quota) if token else None


class CrispRunOptions(dg.ConfigurableResource):
    """Per-run choices, set in the launchpad under `resources.crisp_run.config`."""

    dry_run: bool = False
    override_guards: bool = False
    lock_wait_seconds: float = 120.0
    sync_deadline_minutes: float | None = Field(
        default=None, gt=0, description="How long the sync may send; past it, what was not "
        "sent is deferred to the next run (recorded as `deferred`, reason `deadline`).")
    only: list[str] = Field(
        default_factory=list, description="Apply only these people's changes this run (their "
        "identifiers; the rest of the change set waits for the next run). With dry_run, the "
        "exact requests are shown in the sync's metadata (`requests_planned`): "
        "`crisp-pipeline try NAME IDENTIFIER`.")
    full_reconcile: bool = Field(
        default=False, description="Re-read every managed person in Crisp this run (its cost "
        "is in the change set's `request_plan` as `full_reconcile`), instead of the share of "
        "the day's budget the activation's `reconcile` settings allow.")


def pipeline_db(path: str | None = None) -> DuckDBResource:
    """The DuckDB file holding the default warehouse and every activation's state."""
    database = path or os.environ.get("CRISP_PIPELINE_DB") or DEFAULT_DB
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    return DuckDBResource(database=database)


class CrispAlerts(dg.ConfigurableResource):
    """Where alerts go (`crisp_pipeline.alerts`): the webhook whose URL the environment
    variable `webhook_url_env` holds (a Slack incoming webhook works as it is). Nothing is
    sent while it is unset."""

    webhook_url_env: str = alerts.DEFAULT_URL_ENV
    max_failed_share: float = Field(
        default=0.01, ge=0, le=1, description="A sync whose refused and deferred writes are "
        "more than this share of the people it handled is reported as partly failed.")
    webserver_url: str | None = Field(
        default=None, description="The Dagster UI's address, for run links (default: "
        "DAGSTER_WEBSERVER_URL, else http://localhost:3000).")

    def link_base(self) -> str:
        return (self.webserver_url or os.environ.get("DAGSTER_WEBSERVER_URL")
                or "http://localhost:3000")

    def configured(self) -> bool:
        return bool(os.environ.get(self.webhook_url_env, "").strip())

    def send(self, alert: alerts.Alert) -> bool:
        return alerts.send(alert, self.webhook_url_env)


def default_resources(db_path: str | None = None) -> dict[str, Any]:
    return {"crisp_db": pipeline_db(db_path), "crisp": CrispResource(),
            "crisp_run": CrispRunOptions(), "crisp_alerts": CrispAlerts()}


class StateUnavailableFailure(dg.Failure, StateUnavailable):
    """The state file cannot be opened: a step failure for Dagster, and still a
    `StateUnavailable` for the code that can wait it out (the budget, the sync's recording)."""


def _duckdb_config(db: DuckDBResource) -> dict:
    # the settings DuckDBResource.get_connection() opens the file with: DuckDB refuses a
    # second connection with other settings while the file is kept open in this process
    return {"custom_user_agent": "dagster", **db.connection_config}


def warehouse_connector(db: DuckDBResource):
    """Connections to the resource's DuckDB file itself (the default warehouse), whatever
    holds the state."""
    return _failing_as_steps(connect_file(db.database, _duckdb_config(db)))


def state_connector(db: DuckDBResource):
    """Connections to the state: the Postgres database of CRISP_PIPELINE_STATE_URL, else the
    resource's DuckDB file, opened as `state.store.open_duckdb` does (waiting out another
    writer's lock, failing at once on anything else); always closed or given back."""
    return _failing_as_steps(connect_state(db.database, _duckdb_config(db)))


def _failing_as_steps(connect):
    """`connect`, its `StateUnavailable` raised as a step failure."""

    @contextlib.contextmanager
    def guarded() -> Iterator[Any]:
        try:
            with connect() as connection:
                yield connection
        except StateUnavailable as error:
            raise StateUnavailableFailure(description=str(error)) from None

    @contextlib.contextmanager
    def kept_open() -> Iterator[None]:
        kept = contextlib.ExitStack()
        try:
            if hasattr(connect, "kept_open"):
                kept.enter_context(connect.kept_open())
        except StateUnavailable as error:
            raise StateUnavailableFailure(description=str(error)) from None
        with kept:
            yield

    guarded.kept_open = kept_open
    if hasattr(connect, "checkpoint_if_held"):
        guarded.checkpoint_if_held = connect.checkpoint_if_held
    return guarded


def state_store(db: DuckDBResource, config: ActivationConfig) -> StateStore:
    return StateStore(state_connector(db), config.state_schema, config.resolved_website_id())


def settings_factory(crisp: CrispResource, config: ActivationConfig):
    def settings() -> CrispSettings:
        try:
            return crisp.settings(config.website_id)
        except SettingsError as error:
            raise dg.Failure(description=f"Crisp settings: {error}") from None
    return settings


# ---------------------------------------------------------------- the factory


def source_resource_keys(config: ActivationConfig) -> set[str]:
    """The user's warehouse resource a segment is read through, if any."""
    return {config.segment.resource_key} if config.segment.resource_key else set()


def source_of(config: ActivationConfig, resources: Any) -> SegmentSource:
    resource = (getattr(resources, config.segment.resource_key)
                if config.segment.resource_key else None)
    return segment_source(config.segment, config.name, warehouse_connector(resources.crisp_db),
                          needed=config.source_columns, resource=resource)


def pipeline_resources(context: Any) -> tuple[DuckDBResource, CrispResource, CrispRunOptions]:
    resources = context.resources
    return resources.crisp_db, resources.crisp, resources.crisp_run


def warehouse_kind(config: ActivationConfig) -> str:
    """The segment's kind tag: its warehouse (for a resource, what kind of resource)."""
    if config.segment.warehouse != "resource":
        return config.segment.warehouse
    return config.segment.resource_key or "warehouse"


def state_kind() -> str:
    return "postgres" if os.environ.get(STATE_URL_ENV, "").strip() else "duckdb"
