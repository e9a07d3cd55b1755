"""Applying a run's change set to Crisp, without Dagster, and recording the run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import polars as pl

from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.changes.departures import HELD
from crisp_pipeline.changes.guards import GuardVerdict
from crisp_pipeline.crisp import CrispSettings
from crisp_pipeline.crisp.pacing import RequestStats
from crisp_pipeline.names import WORK_OPS
from crisp_pipeline.state.store import Connect, StateStore, StateUnavailable, now

from .client import ClientOptions, open_client
from .engine import ROW_COLUMNS, Batch, Recorder, SyncEngine, SyncSummary
from .recording import Frames, outcome_frames

log = logging.getLogger(__name__)


class GuardRefusal(RuntimeError):
    """Mirror's guards failed; nothing was sent."""


class StaleChangeSet(RuntimeError):
    """The stored change set was computed by another run; a sync applies only its own."""


@dataclass
class SyncReport:
    change_set_run_id: str | None
    dry_run: bool
    planned: dict[str, int]
    summary: SyncSummary = field(default_factory=SyncSummary)
    stats: RequestStats = field(default_factory=RequestStats)
    pruned: dict[str, int] = field(default_factory=dict)  # history rows past retention
    requests: list[dict[str, Any]] | None = None  # a dry run's exact requests (`only`)

    @property
    def deferred_reason(self) -> str | None:
        s = self.summary
        if s.budget_exhausted:
            return "the daily request budget ran out; the rest goes out on the next run"
        if s.circuit_open:
            return "Crisp kept failing; the run stopped sending and defers the rest"
        if s.past_deadline:
            return "the run's deadline passed; the rest goes out on the next run"
        if s.state_unavailable:
            return ("the state store could not be reached (another process held it); the run "
                    f"stopped sending and defers the rest: {s.state_unavailable}")
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
            "history_rows_pruned": self.pruned,
            "requests_planned": self.requests,
        }


def _checkpoint_while_sending(store: StateStore, client) -> asyncio.Future:
    """Checkpoint the run's earlier writes (`StateStore.checkpoint`) in a worker thread, once
    the budget's first block is reserved: the requests then go out while it runs, and only
    the sync's own writes are left for the end of the step (1M people, 1% changed: 0.13 s of
    the 0.26 s checkpoint, in `bench/end_to_end.py`). Handed to the worker at once, so that
    the block is reserved while the engine prepares its first units (a request made before
    it arrives waits for it in the budget). Recording waits for the checkpoint like any
    other use of the file. Nothing is checkpointed when the budget could not reach the state
    store (another process holds it: no second wait for it). A failed checkpoint does not
    stop the sync: the commits are in DuckDB's log, and the file is opened again from it
    (`state.store._checkpoint_if_held`)."""
    reserve = getattr(client.budget, "reserve_block", None)

    def checkpoint() -> None:
        if reserve is not None and not reserve():
            return
        try:
            store.checkpoint()
        except Exception as error:  # noqa: BLE001 - see above
            log.warning("could not checkpoint the state file while sending (%s: %s); its "
                        "commits are kept in DuckDB's log", type(error).__name__, error)
    return asyncio.get_running_loop().run_in_executor(None, checkpoint)


def apply_change_set(store: StateStore, config: ActivationConfig, run_id: str,
                     settings_factory: Callable[[], CrispSettings], options: ClientOptions,
                     connect: Connect, *, dry_run: bool, verdict: GuardVerdict,
                     override_guards: bool, progress=None,
                     heartbeat: Callable[[], None] = lambda: None,
                     website_lock: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
                     only: frozenset[str] | None = None) -> SyncReport:
    """Send this run's change set to Crisp and record what Crisp confirmed.

    Raises `StaleChangeSet` when the stored change set is another run's, `GuardRefusal` when
    mirror's guards fail and the run does not override them, and `StopRun` (after committing
    the finished work) when Crisp refuses the credentials. With `only` (identifiers), only
    those people's changes are applied (the rest wait for the next run), and a dry run
    writes down the exact requests it would send (`report.requests`).
    """
    change_set = store.read_change_set()
    computed_by = store.stage_run("change_set")
    if computed_by != run_id:
        raise StaleChangeSet(f"the stored change set was computed by run {computed_by}, not "
                             f"by this run ({run_id}); a sync applies only its own run's")
    if not verdict.passed and not override_guards:
        raise GuardRefusal(verdict.refusal())
    work = change_set.filter(pl.col("op").is_in([*WORK_OPS, "release"]))
    if only is not None:
        wanted = [o.strip().lower() if config.keyed_by_email else o.strip() for o in only]
        work = work.filter(pl.col("identifier").is_in(wanted))
    planned = {op: work.filter(pl.col("op") == op).height for op in (*WORK_OPS, "release")}
    report = SyncReport(computed_by, dry_run, planned)
    if computed_by in store.applied_run_ids():
        log.info("change set of run %s was already applied; nothing to send", computed_by)
        work = work.clear()
    fields = list(config.managed_columns)

    def is_managed(people_id: str) -> bool:
        return bool(store.holders([people_id]))

    if dry_run and only is not None and not work.is_empty():
        from .preview import planned_requests
        report.requests = planned_requests(
            work.to_dicts(), config, settings_factory(),
            work.get_column("computed_at")[0].timestamp() * 1000,
            is_managed=is_managed, held_elsewhere=store.holders_elsewhere)
    if not dry_run and not work.is_empty():
        computed_at = work.get_column("computed_at")[0]

        def frames(batch: Batch) -> Frames:
            return outcome_frames(batch, run_id, fields, store.website_id or "")

        def commit(prepared: Frames) -> None:
            store.record_batch(*prepared, fields=fields)
            try:  # recorded: a missed heartbeat must not have the batch recorded twice
                heartbeat()
            except StateUnavailable:
                log.warning("could not refresh the activation lock's heartbeat; goes on")
        record = Recorder(commit, prepare=frames)

        @contextlib.contextmanager
        def delete_gate(people_ids: list[str]) -> Iterator[set[str]]:
            # no activation adopts a person on this website while we delete; one that took
            # a person on since the change set was planned keeps them (released here)
            with website_lock():
                yield store.holders_elsewhere(people_ids)

        async def send() -> SyncSummary:
            async with open_client(settings_factory(), options, connect) as client:
                checkpointing = _checkpoint_while_sending(store, client)
                try:
                    engine = SyncEngine(client, fields, order=config.order,
                                        batch_size=config.batch_size, progress=progress,
                                        planned_at_ms=computed_at.timestamp() * 1000,
                                        is_managed=is_managed,
                                        delete_gate=delete_gate,
                                        deadline=options.deadline)
                    return await engine.apply(work.select(ROW_COLUMNS).to_dicts(), record)
                finally:
                    report.stats = client.stats
                    await checkpointing
        report.summary = asyncio.run(send())
    held = change_set.filter(pl.col("reason") == HELD).height
    store.record_run({
        "run_id": run_id, "change_set_run_id": computed_by, "activation": config.name,
        "website_id": store.website_id, "mode": config.mode.value, "dry_run": dry_run,
        "override_guards": override_guards,
        "finished_at": now(), **{f"planned_{op}": n for op, n in planned.items()},
        "people_ok": report.summary.count("ok"),
        "people_rejected": report.summary.count("rejected"),
        "people_deferred": report.summary.count("deferred"),
        "requests_sent": report.stats.sent, "write_requests": report.stats.writes(),
        "deferred_because": report.deferred_reason,
        "stopped": str(report.summary.stopped) if report.summary.stopped else None,
        "unidentified_rows": store.count("unidentified"),
        "held_departures": held,
    })
    if config.history_days:
        report.pruned = store.prune_history(now() - timedelta(days=config.history_days))
    if not dry_run and only is None:  # (a sync of some people says nothing of the others)
        store.confirm_absences(run_id)
        if config.mode == Mode.MIRROR and report.summary.stopped is None and not held:
            store.accept_unidentified()
    if report.summary.stopped is not None:
        raise report.summary.stopped
    return report
