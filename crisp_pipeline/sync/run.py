"""The two steps of an activation that talk to Crisp, without Dagster: adopting people Crisp
already has into the snapshot, and applying the change set. The Dagster assets call these."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.changes.guards import GuardVerdict
from crisp_pipeline.crisp import CrispClient, CrispSettings
from crisp_pipeline.crisp.pacing import RequestStats
from crisp_pipeline.state.budget import StoredBudget
from crisp_pipeline.state.store import Connect, StateStore, now

from .adopt import adopt_by_email
from .engine import Batch, SyncEngine, SyncSummary
from .recording import outcome_frames

log = logging.getLogger(__name__)
WORK_OPS = ("create", "update", "delete")


class GuardRefusal(RuntimeError):
    """Mirror's guards failed; nothing was sent."""


@dataclass
class ClientOptions:
    max_in_flight: int = 16
    requests_per_second: float | None = None


def open_client(settings: CrispSettings, options: ClientOptions, connect: Connect) -> CrispClient:
    """A client paying every request from the token's stored daily budget."""
    budget = (StoredBudget(connect, settings.token_identifier, settings.daily_quota)
              if settings.daily_quota else None)
    return CrispClient(settings, max_in_flight=options.max_in_flight,
                       requests_per_second=options.requests_per_second, budget=budget)


@dataclass
class AdoptionReport:
    looked_up: int = 0
    adopted: int = 0
    unanswered: int = 0
    method: str = "none"
    stats: RequestStats = field(default_factory=RequestStats)


def adopt_new_people(store: StateStore, config: ActivationConfig, accepted: pl.DataFrame,
                     settings_factory: Callable[[], CrispSettings], options: ClientOptions,
                     connect: Connect) -> AdoptionReport:
    """Look up, by email, the segment's people the snapshot does not know yet."""
    fields = list(config.managed_columns)
    new = accepted.join(store.snapshot_identifiers(), on="identifier", how="anti")
    report = AdoptionReport(looked_up=new.height)
    if new.is_empty():
        return report

    async def look_up():
        async with open_client(settings_factory(), options, connect) as client:
            try:
                return await adopt_by_email(client, new.select("identifier", "email").rows(),
                                            fields)
            finally:
                report.stats = client.stats
    result = asyncio.run(look_up())
    report.adopted, report.unanswered, report.method = (len(result.adopted), result.unanswered,
                                                        result.method)
    if result.adopted:
        confirmed = pl.DataFrame(
            [{"identifier": a.identifier, "people_id": a.people_id, "email": a.email,
              "confirmed_at": now(), **a.held} for a in result.adopted],
            schema={"identifier": pl.String, "people_id": pl.String, "email": pl.String,
                    "confirmed_at": pl.Datetime("us", "UTC"), **{f: pl.String for f in fields}})
        store.confirm(confirmed, fields)
    return report


@dataclass
class SyncReport:
    change_set_run_id: str | None
    dry_run: bool
    planned: dict[str, int]
    summary: SyncSummary = field(default_factory=SyncSummary)
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def deferred_reason(self) -> str | None:
        s = self.summary
        if s.budget_exhausted:
            return "the daily request budget ran out; the rest goes out on the next run"
        if s.circuit_open:
            return "Crisp kept failing; the run stopped sending and defers the rest"
        return None

    def as_metadata(self) -> dict[str, Any]:
        outcomes = {f"{op}_{status}": n for (op, status), n in sorted(self.summary.people.items())}
        return {
            "dry_run": self.dry_run, "change_set_run_id": self.change_set_run_id or "",
            "people_ok": self.summary.count("ok"),
            "people_rejected": self.summary.count("rejected"),
            "people_deferred": self.summary.count("deferred"),
            "people_gone": self.summary.count("gone"),
            "deferred_because": self.deferred_reason or "",
            "requests_sent": self.stats.sent, "write_requests": self.stats.writes(),
            "retries": self.stats.retries,
            "retry_wait_seconds": round(self.stats.retry_wait_seconds, 3),
            "seconds": round(self.summary.seconds, 3),
            "requests_per_second": round(self.stats.sent / self.summary.seconds, 1)
            if self.summary.seconds else 0.0,
            "outcomes": outcomes, "units_sent": dict(self.summary.units),
            "requests_by_route": self.stats.as_dict()["by_route_status"],
        }


def apply_change_set(store: StateStore, config: ActivationConfig, run_id: str,
                     settings_factory: Callable[[], CrispSettings], options: ClientOptions,
                     connect: Connect, *, dry_run: bool, verdict: GuardVerdict,
                     override_guards: bool, progress=None) -> SyncReport:
    """Send the latest change set to Crisp and record what Crisp confirmed.

    Raises `GuardRefusal` when mirror's guards fail and the run does not override them, and
    `StopRun` (after committing the finished work) when Crisp refuses the credentials.
    """
    change_set = store.read_change_set()
    change_set_run_id = change_set.get_column("run_id")[0] if change_set.height else None
    work = change_set.filter(pl.col("op").is_in(WORK_OPS))
    planned = {op: work.filter(pl.col("op") == op).height for op in WORK_OPS}
    report = SyncReport(change_set_run_id, dry_run, planned)
    if not verdict.passed and not override_guards:
        raise GuardRefusal(verdict.describe())
    if change_set_run_id and change_set_run_id in store.applied_run_ids():
        log.info("change set of run %s was already applied; nothing to send", change_set_run_id)
        work = work.clear()
    if not dry_run and not work.is_empty():
        fields = list(config.managed_columns)

        def record(batch: Batch) -> None:
            store.record_batch(*outcome_frames(batch, run_id, fields), fields=fields)

        async def send() -> SyncSummary:
            async with open_client(settings_factory(), options, connect) as client:
                try:
                    engine = SyncEngine(client, fields, order=config.order,
                                        batch_size=config.batch_size, progress=progress)
                    return await engine.apply(work.to_dicts(), record)
                finally:
                    report.stats = client.stats
        report.summary = asyncio.run(send())
    store.record_run({
        "run_id": run_id, "change_set_run_id": change_set_run_id, "activation": config.name,
        "mode": config.mode.value, "dry_run": dry_run, "override_guards": override_guards,
        "finished_at": now(), **{f"planned_{op}": n for op, n in planned.items()},
        "people_ok": report.summary.count("ok"),
        "people_rejected": report.summary.count("rejected"),
        "people_deferred": report.summary.count("deferred"),
        "requests_sent": report.stats.sent, "write_requests": report.stats.writes(),
        "deferred_because": report.deferred_reason,
        "stopped": str(report.summary.stopped) if report.summary.stopped else None,
    })
    if report.summary.stopped is not None:
        raise report.summary.stopped
    return report
