"""Reconcile: re-read Crisp to correct the snapshot, which otherwise only knows what we wrote.

People change in Crisp behind our back: an operator deletes someone, edits a name, an email.
A reconcile re-reads the people we manage, oldest-verified first, within a budget
(`changes.reconcile` picks lookups or a listing), and then:
- a person Crisp no longer holds is *forgotten* (removed from the snapshot): the next change
  set re-creates them (upsert, mirror) or skips them as `not_in_crisp` (update_only). A person
  missing from a listing is looked up by id before being forgotten, because a listing read
  while people are deleted can skip someone who is still there;
- a field Crisp holds differently (by value: `1` and `1.0` are one number for Crisp) takes
  Crisp's value in the snapshot, so the change set writes the source's value back where they
  disagree; an edited email likewise;
- every person read in full gets `verified_at`; every difference is kept in table `drift`.

Reading never changes Crisp. The requests are paid from the token's daily budget like any
other; an exhausted budget or a failing Crisp ends the reconcile early with what it learned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import polars as pl

from crisp_pipeline.activation import ReconcilePolicy
from crisp_pipeline.changes import fields as crisp_fields
from crisp_pipeline.changes import reconcile as pricing
from crisp_pipeline.changes.encode import same_value
from crisp_pipeline.crisp import (BudgetExhausted, CrispClient, CrispSettings, RetryLater,
                                  RowRejected, contract)
from crisp_pipeline.crisp.pacing import CappedBudget, RequestStats
from crisp_pipeline.state.budget import remaining_today
from crisp_pipeline.state.store import SNAPSHOT_KEYS, UNCONFIRMED, Connect, StateStore, now

from .client import ClientOptions, open_client
from .profiles import held_values

DRIFT_SCHEMA = {"run_id": pl.String, "website_id": pl.String, "identifier": pl.String,
                "people_id": pl.String, "field": pl.String, "snapshot_value": pl.String,
                "crisp_value": pl.String, "found_at": pl.Datetime("us", "UTC")}
GONE = "(gone)"  # the `field` of a drift row saying Crisp no longer holds the person


@dataclass
class ReconcileReport:
    full: bool = False
    allowance: int | None = 0  # requests it could spend (None: as many as it takes)
    method: str = "none"
    planned_people: int = 0
    verified: int = 0
    gone: int = 0
    edited: int = 0  # people with at least one field Crisp holds differently
    drifted_fields: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    stopped: str | None = None  # why it ended early (budget, Crisp failing)
    stats: RequestStats = field(default_factory=RequestStats)

    def as_metadata(self) -> dict[str, Any]:
        return {"full": self.full, "allowance": -1 if self.allowance is None else self.allowance,
                "method": self.method, "planned_people": self.planned_people,
                "verified": self.verified, "gone": self.gone, "edited": self.edited,
                "drifted_fields": self.drifted_fields, "unanswered": self.unanswered,
                "stopped": self.stopped or "", "requests_sent": self.stats.sent}


@dataclass
class _Reads:
    """What Crisp answered, by people_id: a profile, None (Crisp has no such person), or
    absent (not asked, or not answered)."""

    profiles: dict[str, dict | None] = field(default_factory=dict)
    data: dict[str, dict | None] = field(default_factory=dict)
    stopped: str | None = None
    unanswered: int = 0


def compare(person: dict[str, Any], profile: dict[str, Any], data: dict[str, Any] | None,
            fields: list[str]) -> tuple[dict[str, str], list[tuple[str, str | None, str]]]:
    """(the snapshot cells to set, the differences) for one person the snapshot holds
    (`person`: a snapshot row) and what Crisp showed. A cell UNCONFIRMED stays so (it is
    written anyway); a cell never known (SQL NULL: the stand-in nickname of a create) stays
    unknown, since a value we never set is not ours to clear; a value equal for Crisp keeps
    our exact text (no write is planned for a spelling)."""
    held = held_values(profile, data, fields)
    cells: dict[str, str] = {}
    drift: list[tuple[str, str | None, str]] = []
    for name, crisp_text in held.items():
        ours = person.get(name)
        if ours is None or ours == UNCONFIRMED or same_value(ours, crisp_text):
            continue
        cells[name] = crisp_text
        drift.append((name, ours, crisp_text))
    email = str(profile.get("email") or "").lower() or None
    if email and email != (person.get("email") or "").lower():
        cells["email"] = email
        drift.append(("email", person.get("email"), email))
    return cells, drift


async def _list_website(client: CrispClient, wanted: set[str], reads: _Reads) -> None:
    page = 1
    while True:
        profiles = await client.list_profiles(page, per_page=pricing.PAGE)
        for profile in profiles:
            if profile.get("people_id") in wanted:
                reads.profiles[profile["people_id"]] = profile
        if len(profiles) < pricing.PAGE:
            return
        page += 1


async def _read_all(client: CrispClient, people_ids: list[str], read: Callable,
                    into: dict[str, dict | None], reads: _Reads) -> None:
    """Read each person (the client bounds the requests in flight); a 404 is None, a failure
    leaves them unread; a stop (budget, credentials) ends the reads."""
    async def one(people_id: str) -> None:
        if reads.stopped:
            return
        try:
            into[people_id] = await read(people_id)
        except RowRejected as error:
            # only Crisp's own "no such person" forgets someone; any other refusal (a route
            # Crisp does not know, a malformed id) proves nothing
            if error.reason == contract.Reason.PEOPLE_NOT_FOUND:
                into[people_id] = None
            else:
                reads.unanswered += 1
        except BudgetExhausted:
            reads.unanswered += 1
            reads.stopped = "the daily request budget ran out"
        except RetryLater:
            reads.unanswered += 1
    await asyncio.gather(*(one(p) for p in people_ids))  # the client bounds what is in flight


async def _reconcile_reads(client: CrispClient, queue: pl.DataFrame, allowance: int | None,
                           wants_data: bool, report: ReconcileReport,
                           consider_listing: bool) -> _Reads:
    reads = _Reads()
    managed = queue.height
    website_people = None
    if consider_listing and pricing.worth_counting(managed, allowance, wants_data):
        website_people = await client.people_count()
        if allowance is not None:
            allowance -= 1
    choice = pricing.choose(managed, allowance, wants_data, website_people)
    report.method, report.planned_people = choice.method, choice.verified
    if choice.method == "none":
        return reads
    ids = queue.get_column("people_id").to_list()
    chosen = ids[:choice.verified]
    if choice.method == "listing":
        try:
            await _list_website(client, set(ids), reads)
        except (RetryLater, RowRejected) as error:  # unfinished: proves nobody's absence
            reads.stopped = f"the listing could not be finished: {error}"
        else:
            # missing from the listing: looked up before being forgotten (a listing read
            # while people are deleted shifts pages and can skip someone still there)
            missing = [p for p in ids if p not in reads.profiles]
            spare = None if allowance is None else max(0, allowance - choice.requests)
            await _read_all(client, missing[:spare], client.get_profile, reads.profiles,
                            reads)
    else:
        await _read_all(client, chosen, client.get_profile, reads.profiles, reads)
    if wants_data:
        present = [p for p in chosen if reads.profiles.get(p) is not None]
        await _read_all(client, present, client.get_data, reads.data, reads)
    return reads


def reconcile_snapshot(store: StateStore, fields: list[str], policy: ReconcilePolicy,
                       run_id: str, settings_factory: Callable[[], CrispSettings],
                       options: ClientOptions, connect: Connect, *,
                       full: bool = False, consider_listing: bool = True) -> ReconcileReport:
    """Re-read Crisp for the managed `fields` within the `policy`'s allowance (or everyone,
    `full`) and correct the snapshot (see the module docstring). `consider_listing=False`
    reads people one by one whatever it costs (the baseline of `bench/reconcile_cost.py`)."""
    settings = settings_factory()
    allowance = None if full else pricing.allowance_for(
        policy.budget_share, policy.max_requests,
        remaining_today(connect, settings.token_identifier, settings.daily_quota))
    report = ReconcileReport(full=full, allowance=allowance)
    if allowance == 0:
        return report
    due = None if full else now() - timedelta(hours=policy.verify_every_hours)
    queue = store.reconcile_queue(fields, due)
    if queue.is_empty():
        return report
    wants_data = any(crisp_fields.is_data_field(f) for f in fields)

    async def read() -> _Reads:
        async with open_client(settings, options, connect) as client:
            if allowance is not None:  # a ceiling, retries included
                client.budget = CappedBudget(client.budget, allowance)
            try:
                return await _reconcile_reads(client, queue, allowance, wants_data, report,
                                              consider_listing)
            except (RetryLater, RowRejected) as error:
                # the count failed (Crisp refused or kept failing): nothing learned, and the
                # run goes on without a reconcile
                return _Reads(stopped=str(error))
            finally:
                report.stats = client.stats
    reads = asyncio.run(read())
    report.stopped, report.unanswered = reads.stopped, reads.unanswered
    _apply(store, queue, reads, fields, wants_data, run_id, report)
    return report


def _apply(store: StateStore, queue: pl.DataFrame, reads: _Reads, fields: list[str],
           wants_data: bool, run_id: str, report: ReconcileReport) -> None:
    at = now()
    gone = [p for p, profile in reads.profiles.items() if profile is None]
    gone += [p for p, data in reads.data.items() if data is None and p not in gone]
    refreshed, drift = [], []
    by_id = {row["people_id"]: row for row in queue.iter_rows(named=True)}
    for people_id in gone:
        person = by_id[people_id]
        drift.append({"identifier": person["identifier"], "people_id": people_id,
                      "field": GONE, "snapshot_value": None, "crisp_value": None})
    for people_id, profile in reads.profiles.items():
        if profile is None or people_id in gone:
            continue
        person = by_id[people_id]
        data = reads.data.get(people_id) if wants_data else None
        read_fully = not wants_data or people_id in reads.data
        cells, differences = compare(person, profile, data, fields)
        if read_fully:
            report.verified += 1
        if differences:
            report.edited += 1
        for name, ours, theirs in differences:
            report.drifted_fields[name] = report.drifted_fields.get(name, 0) + 1
            drift.append({"identifier": person["identifier"], "people_id": people_id,
                          "field": name, "snapshot_value": ours, "crisp_value": theirs})
        if cells or read_fully:
            refreshed.append({"identifier": person["identifier"], "people_id": people_id,
                              "verified_at": at if read_fully else None, **cells})
    report.gone = len(gone)
    gone_identifiers = [by_id[p]["identifier"] for p in gone]
    store.record_reconcile(
        pl.DataFrame(refreshed, schema={**SNAPSHOT_KEYS, **{f: pl.String for f in fields}}),
        gone_identifiers,
        pl.DataFrame([{"run_id": run_id, "website_id": store.website_id, "found_at": at, **d}
                      for d in drift], schema=DRIFT_SCHEMA), fields)


def full_reconcile_cost(store: StateStore, fields: list[str]) -> dict[str, object]:
    """What re-reading every managed person would cost now, shown in the plan before anyone
    asks for it: by lookups, and by a listing (at least one page per 50 managed people: the
    website may hold more people than we manage), plus the people-data reads."""
    managed = store.count("snapshot")
    wants_data = any(crisp_fields.is_data_field(f) for f in fields)
    data_reads = managed if wants_data else 0
    return {"managed": managed, "by_lookup": managed + data_reads,
            "by_listing_at_least": (pricing.listing_requests(managed) + 1 + data_reads
                                    if managed else 0)}
