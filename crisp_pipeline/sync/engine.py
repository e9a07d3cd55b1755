"""Applying a change set to Crisp, person by person, recording what Crisp confirmed.

Each person's work is a short sequence of requests (create then data; profile patch and/or
data patch; delete). Its outcome is one of:
- `ok`: every request was answered 2xx;
- `rejected`: Crisp refused a request (`invalid_data`, ...): recorded with Crisp's reason and
  message, and retried on a later run (the fields it did not confirm stay in the change set);
- `deferred`: Crisp kept limiting or failing (retries exhausted, budget spent): nothing is
  lost, the work is part of the next change set;
- `gone`: the person was deleted in Crisp behind our back: forgotten from the snapshot, so the
  next run re-creates them (upsert, mirror) or skips them (update_only).
What a person's requests confirmed enters the snapshot even when a later request failed.

Outcomes are handed over in batches (`on_batch`), which the caller commits in one transaction
each; a `StopRun` (bad credentials, wrong website) commits the finished people and ends the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crisp_pipeline.changes import fields as crisp_fields
from crisp_pipeline.changes.encode import JSON_NULL, encode_value
from crisp_pipeline.crisp import CrispClient, RetryLater, RowRejected, StopRun
from crisp_pipeline.crisp.contract import Reason

from .profiles import data_body, profile_body


@dataclass
class PersonOutcome:
    identifier: str
    op: str
    email: str | None
    people_id: str | None = None
    status: str = "ok"
    reason: str | None = None
    message: str | None = None
    requests: int = 0
    confirmed: dict[str, str] = field(default_factory=dict)  # field -> JSON text
    old_values: str | None = None


@dataclass
class SyncSummary:
    outcomes: Counter = field(default_factory=Counter)  # (op, status) -> people
    stopped: StopRun | None = None
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(n for (_, s), n in self.outcomes.items() if s == status)


class SyncEngine:
    def __init__(self, client: CrispClient, fields: list[str], *, batch_size: int = 200,
                 progress: Callable[[int, int, float], None] | None = None) -> None:
        self.client = client
        self.fields = fields
        self.batch_size = batch_size
        self.progress = progress

    async def apply(self, rows: list[dict[str, Any]],
                    on_batch: Callable[[list[PersonOutcome]], None]) -> SyncSummary:
        summary, started = SyncSummary(), time.monotonic()
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            results = await asyncio.gather(*(self._person(row) for row in batch),
                                           return_exceptions=True)
            outcomes = [r for r in results if isinstance(r, PersonOutcome)]
            failures = [r for r in results if isinstance(r, BaseException)]
            on_batch(outcomes)
            summary.outcomes.update((o.op, o.status) for o in outcomes)
            if self.progress:
                self.progress(start + len(batch), len(rows), time.monotonic() - started)
            stop = next((f for f in failures if isinstance(f, StopRun)), None)
            if stop is not None:
                summary.stopped = stop
                break
            if failures:
                raise failures[0]
        summary.seconds = time.monotonic() - started
        return summary

    async def _person(self, row: dict[str, Any]) -> PersonOutcome:
        outcome = PersonOutcome(row["identifier"], row["op"], row.get("email"),
                                people_id=row.get("people_id"), old_values=row.get("old_values"))
        values = json.loads(row["new_values"]) if row.get("new_values") else {}
        sent_before = self.client.stats.sent
        try:
            if row["op"] == "create":
                await self._create(outcome, values)
            elif row["op"] == "update":
                await self._update(outcome, values)
            elif row["op"] == "delete":
                await self.client.remove_profile(outcome.people_id)
        except RowRejected as error:
            if error.reason == Reason.PEOPLE_NOT_FOUND and row["op"] == "update":
                outcome.status, outcome.confirmed = "gone", {}
            else:
                outcome.status = "rejected"
            outcome.reason, outcome.message = error.reason, error.message or str(error)
        except RetryLater as error:
            outcome.status, outcome.reason, outcome.message = "deferred", error.reason, str(error)
        finally:
            outcome.requests = self.client.stats.sent - sent_before
        return outcome

    async def _create(self, outcome: PersonOutcome, values: dict[str, Any]) -> None:
        profile, sent = profile_body(values, email=outcome.email, creating=True)
        try:
            outcome.people_id = await self.client.create_profile(profile)
            # a new person holds nothing but what we send: every unsent field is known empty
            outcome.confirmed.update({f: JSON_NULL for f in self.fields if f not in values})
        except RowRejected as error:
            if error.reason != Reason.PEOPLE_EXISTS:
                raise
            # created meanwhile (or our earlier create's answer was lost): adopt, never duplicate
            existing = await self.client.get_profile(outcome.email)
            if existing is None:
                raise
            outcome.people_id = existing["people_id"]
            del profile["email"]
            if sent:
                await self.client.update_profile(outcome.people_id, profile)
        outcome.confirmed.update({f: encode_value(values[f]) for f in sent})
        data = data_body(values, creating=True)
        if data:
            await self.client.update_data(outcome.people_id, data)
            outcome.confirmed.update({f: encode_value(values[f]) for f in values
                                      if crisp_fields.is_data_field(f)})

    async def _update(self, outcome: PersonOutcome, values: dict[str, Any]) -> None:
        email = values.get("email")
        profile, sent = profile_body({k: v for k, v in values.items() if k != "email"},
                                     email=email)
        if sent or email is not None:
            await self.client.update_profile(outcome.people_id, profile)
            outcome.confirmed.update({f: encode_value(values[f]) for f in sent})
            if email is not None:
                outcome.confirmed["email"] = encode_value(email)
        data = data_body(values)
        if data:
            await self.client.update_data(outcome.people_id, data)
            outcome.confirmed.update({f: encode_value(values[f]) for f in values
                                      if crisp_fields.is_data_field(f)})
