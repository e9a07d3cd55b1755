"""The steps before a sync, without Dagster: read and normalise the segment, bring the state in
line with the configuration and the source (configuration changes, re-keyed people, adoption),
and plan the change set. The Dagster assets call these one per asset; `crisp_sync` calls them
all when it must recompute a change set of its own (a re-execution from failure)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import timedelta

import polars as pl

from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.changes.departures import DepartureContext, new_unidentified_rows
from crisp_pipeline.changes.diff import PlannedChanges, plan_changes
from crisp_pipeline.changes.encode import same_value
from crisp_pipeline.changes.guards import GuardVerdict, evaluate_guards
from crisp_pipeline.changes.normalize import (NormalizedSegment, normalization_key,
                                              normalize_segment)
from crisp_pipeline.crisp import CrispSettings
from crisp_pipeline.crisp.pacing import RequestStats
from crisp_pipeline.state.store import ABSENCE_SCHEMA, Connect, StateStore, now
from crisp_pipeline.warehouse import SegmentSource

from .adopt import adopt_by_email
from .client import ClientOptions, open_client


def stage_segment(store: StateStore, config: ActivationConfig, source: SegmentSource,
                  run_id: str) -> NormalizedSegment:
    """Read the source, normalise the rows that changed since the staged segment (all of
    them when it was staged under another normalisation key), and keep it as this run's
    segment."""
    raw = source.read()
    key = normalization_key(raw.schema, config)
    with store.kept_open():
        normalized = normalize_segment(raw, config, known=store.segment_fingerprints(key))
        store.write_segment(normalized.accepted, normalized.rejected, normalized.unidentified,
                            run_id, kept=normalized.kept, key=key,
                            leaving=normalized.leaving)
    return normalized


# ---------------------------------------------------------------- configuration changes


def apply_configuration_changes(store: StateStore, config: ActivationConfig, run_id: str,
                                dry_run: bool) -> list[str]:
    """Compare the configuration with the one the state was kept for, turn every difference
    into explicit work, record the new one, and say what changed (for metadata and logs).
    A dry run does the same work in the state (it is not a write to Crisp), but the next real
    run still compares with the last real one and reports the changes again."""
    current = config.identity(store.website_id)
    stored = store.stored_configuration()
    if stored is None:
        store.record_configuration(current, [], run_id, dry_run)
        return []
    changes = []
    managed = store.count("snapshot")
    if stored.get("website_id") != current["website_id"]:
        changes.append(f"website changed from {stored.get('website_id')!r} to "
                       f"{current['website_id']!r}: the snapshot of {stored.get('website_id')!r} "
                       "is kept for it and never used here; the people of "
                       f"{current['website_id']!r} are found by email or created")
    if stored.get("identifier") != current["identifier"]:
        changes.append(f"identifier changed from {stored.get('identifier')} to "
                       f"{current['identifier']}: managed people are re-keyed through their "
                       "people_id (matched by email); nobody is deleted or created again")
    before, after = stored.get("fields", {}), current["fields"]
    added = [f for f in after if f not in before]
    removed = [f for f in before if f not in after]
    if added:
        store.mark_unconfirmed(added)
        changes.append(f"field(s) added: {', '.join(added)}: written once for every managed "
                       f"person ({managed} on this website) from the source, a null clearing "
                       "what Crisp holds; identical data changes share batch requests")
    if removed:
        changes.append(f"field(s) removed: {', '.join(removed)}: no longer managed; Crisp keeps "
                       "what it holds, nothing is cleared or sent")
    if stored.get("mode") != current["mode"]:
        changes.append(f"mode changed from {stored.get('mode')} to {current['mode']}: takes "
                       "effect in this run, under the guards")
    if stored.get("mode") != current["mode"] or stored.get("website_id") != current["website_id"]:
        store.clear_absences()  # a grace period counts runs in a row of this very setup
    if changes:
        store.record_configuration(current, changes, run_id, dry_run)
    return changes


def rekey_moved_people(store: StateStore) -> int:
    """A new identifier whose email is a managed person's, whose own identifier is no longer
    in the source, is that person under a new identifier (the identifier configuration or
    the person's external id changed): re-key them, never delete and re-create them.
    (Both sides come from SQL: only the people who differ are loaded.)"""
    unnamed_people = store.unnamed_managed()
    if unnamed_people.is_empty():
        return 0
    arrivals = store.arrivals([])
    moves = (unnamed_people.select(pl.col("identifier").alias("old_identifier"),
                                   pl.col("email").str.to_lowercase().alias("email_key"))
             .join(arrivals.select(pl.col("identifier").alias("new_identifier"),
                                   pl.col("email").str.to_lowercase().alias("email_key")),
                   on="email_key", how="inner")
             .unique("old_identifier", keep="none").unique("new_identifier", keep="none"))
    return store.rekey(moves)


# ---------------------------------------------------------------- adoption


@dataclass
class AdoptionReport:
    looked_up: int = 0
    adopted: int = 0
    rekeyed: int = 0  # found in Crisp as a person managed here under an identifier now gone
    unanswered: int = 0
    conflicts: int = 0  # found in Crisp as a person managed here under an identifier in use
    method: str = "none"
    stats: RequestStats = field(default_factory=RequestStats)


def adopt_new_people(store: StateStore, config: ActivationConfig,
                     settings_factory: Callable[[], CrispSettings],
                     options: ClientOptions, connect: Connect,
                     website_lock: Callable[[], AbstractContextManager[None]]) -> AdoptionReport:
    """Look up, by email, the segment's people the snapshot does not know yet.

    A person found is *created* (by us) when our last change set planned to create them and
    Crisp created them after that; otherwise *adopted* (they were in Crisp before us). A
    person found who is managed here already, under an identifier no longer in the source,
    is the same person under a new identifier (their email changed in Crisp and in the source
    alike): re-keyed, never deleted and created again. Lookups and confirmations hold the
    website's lock, so that no mirror deletes a person while another activation adopts them.
    """
    fields = list(config.managed_columns)
    new = store.arrivals(fields, unclaimed_emails=True)
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
    with website_lock():
        result = asyncio.run(look_up())
        holder_of = store.holders([a.people_id for a in result.adopted])
        unnamed = set(store.unnamed_managed().get_column("identifier").to_list()) \
            if holder_of else set()
        adopted = [a for a in result.adopted if a.people_id not in holder_of]
        moved = [a for a in result.adopted
                 if a.people_id in holder_of and holder_of[a.people_id] in unnamed]
        report.conflicts = len(result.adopted) - len(adopted) - len(moved)
        report.adopted, report.unanswered, report.method = (len(adopted), result.unanswered,
                                                            result.method)
        if moved:
            report.rekeyed = store.rekey(pl.DataFrame(
                [{"old_identifier": holder_of[a.people_id], "new_identifier": a.identifier,
                  "email": a.email} for a in moved],
                schema={"old_identifier": pl.String, "new_identifier": pl.String,
                        "email": pl.String}))
        if adopted:
            planned = _planned_creates(store)
            source_texts = {row["identifier"]: row for row in
                            new.select("identifier", *fields).iter_rows(named=True)}
            adopted = [replace(a, held=_in_source_spelling(a.held, source_texts[a.identifier]))
                       for a in adopted]
            confirmed = pl.DataFrame(
                [{"identifier": a.identifier, "people_id": a.people_id, "email": a.email,
                  "confirmed_at": now(), "verified_at": now(),
                  "origin": _origin(a.created_at_ms, planned.get(a.identifier)), **a.held}
                 for a in adopted],
                schema={"identifier": pl.String, "people_id": pl.String, "email": pl.String,
                        "confirmed_at": pl.Datetime("us", "UTC"), "origin": pl.String,
                        "verified_at": pl.Datetime("us", "UTC"),
                        **{f: pl.String for f in fields}})
            store.confirm(confirmed, fields)
    return report


def _in_source_spelling(held: dict[str, str], source: dict[str, str | None]) -> dict[str, str]:
    """What Crisp holds, spelled as the source spells it where the two are one value for
    Crisp (`1` and `1.0`): adopting a person must not plan a write for a spelling."""
    return {name: source[name] if same_value(source.get(name), text) else text
            for name, text in held.items()}


def _planned_creates(store: StateStore) -> dict[str, float]:
    """identifier -> when our latest change set planned to create them (epoch ms)."""
    creates = store.planned_creates()
    return dict(creates.select("identifier", pl.col("computed_at").dt.epoch("ms")).iter_rows())


def _origin(created_at_ms: float | None, planned_at_ms: float | None) -> str:
    if created_at_ms is not None and planned_at_ms is not None and created_at_ms >= planned_at_ms:
        return "created"
    return "adopted"


# ---------------------------------------------------------------- the change set


@dataclass(frozen=True)
class Plan:
    planned: PlannedChanges
    verdict: GuardVerdict


def plan_change_set(store: StateStore, config: ActivationConfig, run_id: str, *,
                    override_guards: bool) -> Plan:
    """Diff the segment and the snapshot, decide mirror's departures, keep the change set."""
    fields = list(config.managed_columns)
    # only the rows whose values differ are loaded (stored row hashes, see the state store)
    store.refresh_row_hashes(fields)
    accepted, snapshot = store.differing_rows(fields)
    _, rejected = store.read_segment(rejected_only=True)
    context = None
    if config.mode == Mode.MIRROR:
        # managed people the source does not name: a superset of the departed
        departed_ids = store.unnamed_managed().get_column("people_id").to_list()
        context = DepartureContext(
            website_id=store.website_id or "",
            new_unidentified_rows=new_unidentified_rows(store.read("unidentified"),
                                                        store.unidentified_baseline()),
            absences=store.read_absences(),
            held_elsewhere=frozenset(store.holders_elsewhere(departed_ids)),
            override_guards=override_guards, now=now())
    planned = plan_changes(accepted, rejected, snapshot, config, context,
                           managed_emails=store.managed_emails_among)
    store.write_change_set(planned.change_set, run_id)
    # who is absent now (nobody, outside mirror); kept once this run's sync applies it
    store.plan_absences(planned.absences if planned.absences is not None
                        else pl.DataFrame(schema=ABSENCE_SCHEMA), run_id)
    return Plan(planned, current_verdict(store, config))


def current_verdict(store: StateStore, config: ActivationConfig) -> GuardVerdict:
    """Mirror's guards for the stored change set, from counts in the state store (no table
    is loaded). The rolling window ends when the change set was computed, not now: the
    change set's check and the sync that obeys it give one verdict, however long apart
    (a deletion leaving the window in between must not turn a refusal into a pass). Only
    mirror deletes and has guards: the other modes pass with nothing counted (the counts
    cost the change set and the sync 8 ms each at 1M people, and only mirror shows them)."""
    if config.mode != Mode.MIRROR:
        return GuardVerdict(True, 0, 0, 0)
    source_rows = (store.count("segment")
                   + store.count("rejected", what="count(distinct row_number)"))
    window = config.guards.window_hours
    as_of = store.stage_done_at("change_set") or now()
    deleted = store.deleted_since(as_of - timedelta(hours=window)) if window else 0
    return evaluate_guards(config, store.count("change_set", where="op = 'delete'"),
                           store.count("snapshot"), source_rows, deleted)
