"""Applying a change set to Crisp with the fewest requests, recording what Crisp confirmed.

Work is cut into *units*, each one request (or one short sequence) on behalf of one person or,
for `PATCH batch/data`, of many people who need the very same data change:
- delete: `DELETE people/profile/{id}`;
- profile: `PATCH people/profile/{id}` with the changed profile fields (and email);
- create: `POST people/profile` (on `people_exists`: find the person and patch instead);
- data: the people-data merge, batched when two or more people share it, single otherwise;
- release: no request; the person is no longer managed (mirror), recorded like the others.
Releases go first. The delete phase runs inside `delete_gate`, which holds the website's lock
and names the people another activation took on since the change set was planned: they are
released instead of deleted.
Phases run in the activation's `order` (default: deletes, updates, creates); a create's data
unit runs once its person exists.

A unit's outcome, per person in it: `ok`; `rejected` (Crisp refused it: reason and message
kept, retried on a later run); `deferred` (Crisp kept limiting or failing, the budget ran
out, or the failure circuit opened: nothing is lost, the work is part of the next change set);
`gone` (the person was deleted in Crisp behind our back: forgotten, so the next run re-creates
or skips them). What a unit confirmed enters the snapshot even when another unit of the same
person failed.

Outcomes are handed over after every chunk of units (`on_batch`), which the caller commits in
one transaction; a `StopRun` (credentials, website) commits what finished and ends the run.
A `Recorder` prepares a batch (turns it into frames, no state store) apart from committing
it: the last batch of a phase prepares while the one before it commits (often waiting for the
state file's checkpoint), and the commits keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from crisp_pipeline.changes import fields as crisp_fields
from crisp_pipeline.changes.encode import JSON_NULL, decode_sent, encode_value
from crisp_pipeline.crisp import BudgetExhausted, CrispClient, RetryLater, RowRejected, StopRun
from crisp_pipeline.crisp import contract
from crisp_pipeline.crisp.contract import Reason
from crisp_pipeline.crisp.pacing import counting_requests
from crisp_pipeline.state.store import StateUnavailable
from crisp_pipeline.names import PHASES, STATUSES

from .profiles import held_values, profile_body

log = logging.getLogger(__name__)

# the change set's columns `SyncEngine.apply` reads (a row may leave out all but the first two)
ROW_COLUMNS = ("identifier", "op", "email", "people_id", "new_values", "data_values",
               "old_values", "reason")
# a person's status is the worst of their units'; `pending` until a unit of theirs is tried
STATUS_RANK = {"pending": -1, **{status: rank for rank, status in enumerate(STATUSES)}}


@dataclass(slots=True)
class StepOutcome:
    """What one unit did for one person (one row of the `outcomes` table)."""

    identifier: str
    op: str
    step: str
    people_id: str | None
    status: str
    reason: str | None
    message: str | None
    unit: int
    requests: int


@dataclass
class Person:
    identifier: str
    op: str
    email: str | None
    people_id: str | None
    values: dict[str, Any]
    data: dict[str, Any] | None
    old_values: str | None
    reason: str | None = None  # why the change set planned this (releases)
    status: str = "pending"
    open_units: int = 0  # units made for this person and not tried yet
    confirmed: dict[str, str] = field(default_factory=dict)  # field -> JSON text
    origin: str | None = None  # a create: `created`, or `adopted` when Crisp already had them
    # Crisp holds exactly what we sent and nothing else (a person we just created): as good as
    # a read of every field. Other writes verify nothing: a write shows neither the fields it
    # did not touch, nor (`PATCH batch/data`, 202 for people Crisp does not hold) that the
    # person still exists
    verified: bool = False

    def settle(self, status: str) -> None:
        if STATUS_RANK[status] > STATUS_RANK[self.status]:
            self.status = status

    def as_recorded(self) -> Person:
        """A copy to record while units still in flight change this person (what it holds
        besides `confirmed` is never changed in place). Made without `__init__`: half the
        time of `Person(**...)`, and a tenth of `dataclasses.replace`, which a
        10,000-person batch feels."""
        copy = object.__new__(Person)
        copy.__dict__.update(self.__dict__)
        copy.confirmed = dict(self.confirmed)
        return copy


@dataclass
class Unit:
    step: str
    people: list[Person]
    send: Callable[[], Awaitable[None]]
    confirms: Callable[[], None]

    def __post_init__(self) -> None:
        for person in self.people:
            person.open_units += 1


@dataclass
class SyncSummary:
    people: Counter = field(default_factory=Counter)  # (op, status) -> people
    units: Counter = field(default_factory=Counter)  # step -> units sent
    stopped: StopRun | None = None
    budget_exhausted: bool = False
    circuit_open: bool = False
    past_deadline: bool = False
    state_unavailable: str | None = None  # the state store could not record: sending stopped
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(n for (_, s), n in self.people.items() if s == status)


@dataclass
class Batch:
    """What `on_batch` receives: step outcomes, and the people whose confirmed values changed."""

    steps: list[StepOutcome]
    people: list[Person]


class Recorder:
    """Records batches in two parts: `prepare` (no state store: may run while the previous
    batch commits) and `commit(prepared)`, in order. A plain function is a recorder whose
    preparation is the batch itself."""

    def __init__(self, commit: Callable[[Any], None],
                 prepare: Callable[[Batch], Any] = lambda batch: batch) -> None:
        self.prepare, self.commit = prepare, commit


class SyncEngine:
    def __init__(self, client: CrispClient, fields: list[str], *,
                 order: tuple[str, ...] = PHASES, batch_size: int = contract.MAX_BATCH_PROFILES,
                 chunk: int = 200, max_consecutive_failures: int = 25,
                 progress: Callable[[int, int, float], None] | None = None,
                 planned_at_ms: float | None = None,
                 is_managed: Callable[[str], bool] = lambda people_id: False,
                 delete_gate: Callable[[list[str]], AbstractContextManager[set[str]]]
                 | None = None, deadline: float | None = None,
                 record_attempts: int = 5) -> None:
        self.client = client
        self.fields = fields
        self.order = order
        self.batch_size = min(batch_size, contract.MAX_BATCH_PROFILES)
        self.chunk = chunk
        self.max_consecutive_failures = max_consecutive_failures
        self.progress = progress
        self._reported = -1  # the `done` figure last given to `progress`
        self.planned_at_ms = planned_at_ms
        self.is_managed = is_managed  # whether a people_id is managed here (a state lookup)
        self.delete_gate = delete_gate or (lambda people_ids: contextlib.nullcontext(set()))
        self.deadline = deadline  # time.monotonic() past which no unit starts
        self.record_attempts = record_attempts
        self._unrecorded: list[Batch] = []
        self._summary = SyncSummary()
        self._unit_ids = 0
        self._failures_in_a_row = 0
        self._done = 0
        self._total = 0
        self._started = 0.0

    # ---------------------------------------------------------------- the run

    async def apply(self, rows: list[dict[str, Any]],
                    on_batch: Recorder | Callable[[Batch], None],
                    summary: SyncSummary | None = None) -> SyncSummary:
        if not isinstance(on_batch, Recorder):
            on_batch = Recorder(on_batch)
        if summary is not None:
            self._summary = summary
        self._started = time.monotonic()
        decoded: dict[str, Any] = {}  # people sharing a change share its (read-only) values

        def decode(text: str | None, empty: Any) -> Any:
            if not text:
                return empty
            if text not in decoded:
                decoded[text] = decode_sent(text)
            return decoded[text]
        people = [Person(r["identifier"], r["op"], r.get("email"), r.get("people_id"),
                         decode(r.get("new_values"), {}), decode(r.get("data_values"), None),
                         r.get("old_values"), r.get("reason")) for r in rows]
        self._total = len(people)
        try:
            # units are made as workers take them (`_run`): the first requests go out while
            # the rest are still being made
            await self._run((self._release(p) for p in people if p.op == "release"), on_batch)
            for phase in self.order:
                mine = [p for p in people if p.op == phase]
                if phase == "delete" and mine and not self._halted:
                    gate = self.delete_gate([p.people_id for p in mine])
                    # the gate waits for a lock in the state store: off the event loop
                    taken_on = await asyncio.to_thread(gate.__enter__)
                    try:
                        for person in mine:
                            if person.people_id in taken_on:
                                person.op, person.reason = "release", "held_by_other_activation"
                        await self._run([self._release(p) if p.op == "release"
                                         else self._delete(p) for p in mine], on_batch)
                    finally:
                        await asyncio.to_thread(gate.__exit__, None, None, None)
                elif phase == "delete":
                    await self._run((self._delete(p) for p in mine), on_batch)
                elif phase == "update":
                    await self._run(itertools.chain(
                        (self._profile(p) for p in mine if self._profile_values(p)),
                        self._data_units([p for p in mine if p.data])), on_batch)
                elif phase == "create":
                    await self._run((self._create(p) for p in mine), on_batch)
                    created = [p for p in mine if p.people_id and p.status == "ok" and p.data]
                    await self._run(self._data_units(created), on_batch)
        except StopRun as stop:
            self._summary.stopped = stop
        except Exception:
            # whatever went wrong (a later batch that could not be recorded), the batches
            # Crisp confirmed that waited for a busy state store are still recorded
            with contextlib.suppress(Exception):
                await self._record_the_unrecorded(on_batch)
            raise
        await self._record_the_unrecorded(on_batch)
        for person in people:  # never tried (the run stopped first): deferred, not done
            if person.open_units or person.status == "pending":
                person.settle("deferred")
        self._summary.people.update((p.op, p.status) for p in people)
        self._summary.seconds = time.monotonic() - self._started
        return self._summary

    @property
    def _halted(self) -> bool:
        s = self._summary
        if self.deadline is not None and time.monotonic() >= self.deadline:
            s.past_deadline = True
        return (s.stopped is not None or s.budget_exhausted or s.circuit_open
                or s.past_deadline or s.state_unavailable is not None)

    def _halt_reason(self) -> str:
        s = self._summary
        return ("stopped" if s.stopped else "budget_exhausted" if s.budget_exhausted
                else "circuit_open" if s.circuit_open else "deadline" if s.past_deadline
                else "state_unavailable")

    async def _hand_over(self, prepared: Any, on_batch: Recorder) -> None:
        """Commit a prepared batch in a worker thread (the state store is blocking I/O).
        When the store cannot be reached (another process holds the file past the wait),
        sending stops and the batch is kept to be recorded before the run ends."""
        if self._unrecorded:
            self._unrecorded.append(prepared)
            return
        try:
            await asyncio.to_thread(on_batch.commit, prepared)
        except StateUnavailable as error:
            self._summary.state_unavailable = str(error)
            self._unrecorded.append(prepared)

    async def _record_the_unrecorded(self, on_batch: Recorder) -> None:
        """What Crisp confirmed is recorded, however long the state store stays busy: a few
        more waits, then the error (the snapshot then claims nothing unconfirmed, and the
        next run finds the people by email instead of creating them twice)."""
        failures = 0
        while self._unrecorded:
            try:
                await asyncio.to_thread(on_batch.commit, self._unrecorded[0])
                self._unrecorded.pop(0)
            except StateUnavailable:
                failures += 1
                if failures >= self.record_attempts:
                    raise

    async def _run(self, units: Iterable[Unit], on_batch: Recorder) -> None:
        """Send `units` from `max_in_flight` workers, each starting its next unit as soon as
        its last one is answered (no hand-over through a semaphore and a new task: that
        costs each request a turn of the event loop, about 2% of a run's sending at 50 ms
        of latency), and record finished units in the background once they hold `chunk`
        people (a batch of 500 people is recorded as it finishes), while the next units are
        in flight, one recording at a time; the last one prepares while the one before it
        commits (`Recorder`). A unit starts only when a worker is free, so that a stop, an
        empty budget or an open circuit is seen by every unit not yet started."""
        finished: list[tuple[Unit, list[StepOutcome]]] = []
        finished_people = 0
        recording: asyncio.Task | None = None
        waiting = iter(units)  # shared: each unit goes to the first free worker
        errors: list[Exception] = []  # a worker's error (a recording's) stops them all
        closing = False  # no worker starts another unit

        def record_finished() -> None:
            """A recording of what finished, committed after the one before it."""
            nonlocal finished_people, recording
            taken = finished[:]
            finished.clear()
            finished_people = 0
            recording = asyncio.create_task(self._record(taken, on_batch, after=recording))

        async def worker() -> None:
            nonlocal finished_people
            while not (errors or closing):  # (checked before each unit is made and sent)
                unit = next(waiting, None)
                if unit is None:
                    return
                finished.append((unit, await self._attempt(unit)))
                finished_people += len(unit.people)
                while finished_people >= self.chunk and not errors:
                    if recording is None or recording.done():
                        if recording is not None:
                            recording.result()  # (done: surfaces its error, if any)
                        record_finished()
                    elif len(finished) >= 2 * self.chunk:
                        # sending never runs more than two chunks of units ahead of
                        # recording: what Crisp confirmed is committed soon, and a state
                        # store that cannot record stops the run sending
                        await asyncio.wait([recording])
                        continue
                    break

        async def guarded() -> None:
            try:
                await worker()
            except Exception as error:  # noqa: BLE001 - raised below, once the rest ended
                errors.append(error)  # (an interrupt or a cancellation is not held back)

        workers = [asyncio.create_task(guarded()) for _ in range(self.client.max_in_flight)]
        try:
            await asyncio.wait(workers)
        finally:
            # whatever happened, every unit started is waited for and everything finished
            # is recorded before this returns or raises (the rest prepares while the
            # recording before it commits)
            closing = True
            await asyncio.wait(workers)
            if finished:
                record_finished()
            if recording is not None:
                await recording
        if errors:
            raise errors[0]
        if self._summary.stopped is not None:
            raise self._summary.stopped

    async def _record(self, finished: list[tuple[Unit, list[StepOutcome]]],
                      on_batch: Recorder, after: asyncio.Task | None = None) -> None:
        """Prepare the batch at once, commit it once the recording `after` has committed."""
        steps = [step for _, result in finished for step in result]
        # copies, taken on the event loop: units still in flight keep changing the people
        # while the batch is recorded in a worker thread
        touched = {id(p): p.as_recorded() for unit, _ in finished for p in unit.people}
        try:
            prepared = await asyncio.to_thread(on_batch.prepare,
                                               Batch(steps, list(touched.values())))
        finally:  # (never left committing behind an error of this one)
            if after is not None:
                await after  # (its error, if any, is this one's too: nothing after it commits)
        await self._hand_over(prepared, on_batch)
        self._done += sum(1 for unit, _ in finished if unit.step != "data")
        if self.progress and self._done != self._reported:  # (a data batch moves no one)
            self._reported = self._done
            await asyncio.to_thread(self.progress, min(self._done, self._total),
                                    self._total, time.monotonic() - self._started)

    async def _attempt(self, unit: Unit) -> list[StepOutcome]:
        self._unit_ids += 1
        unit_id = self._unit_ids
        status, reason, message = "ok", None, None
        sent: list[int] = []
        if self._halted:
            status, reason = "deferred", self._halt_reason()
            message = "not sent: the run stopped sending"
        else:
            try:
                with counting_requests() as sent:
                    await unit.send()
                unit.confirms()
                self._failures_in_a_row = 0
                self._summary.units[unit.step] += 1
            except StopRun as error:
                self._summary.stopped = error
                status, reason, message = "deferred", error.reason, str(error)
            except BudgetExhausted as error:
                if error.reason == "state_unavailable":
                    self._summary.state_unavailable = error.message
                else:
                    self._summary.budget_exhausted = True
                status, reason, message = "deferred", error.reason, error.message
            except RetryLater as error:
                status, reason, message = "deferred", error.reason, str(error)
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= self.max_consecutive_failures:
                    self._summary.circuit_open = True
            except RowRejected as error:
                gone = (error.reason == Reason.PEOPLE_NOT_FOUND
                        and unit.step in ("profile", "data"))
                status = "gone" if gone else "rejected"
                reason, message = error.reason, error.message or str(error)
                self._failures_in_a_row = 0
            except StateUnavailable as error:  # a lookup in the state store (people_exists)
                self._summary.state_unavailable = str(error)
                status, reason, message = "deferred", "state_unavailable", str(error)
            except Exception as error:  # noqa: BLE001 - one unit's bug never loses the others
                log.exception("unit %s of %s failed unexpectedly", unit.step,
                              [p.identifier for p in unit.people])
                status, reason = "deferred", "unexpected_error"
                message = f"{type(error).__name__}: {error}"
        requests = sent[0] if sent else 0
        steps = []
        for person in unit.people:
            person.open_units -= 1
            person.settle(status)
            steps.append(StepOutcome(person.identifier, person.op, unit.step, person.people_id,
                                     status, reason, message, unit_id, requests))
        return steps

    # ---------------------------------------------------------------- units

    def _confirm(self, people: list[Person], fields: list[str]) -> Callable[[], None]:
        def confirm() -> None:
            # people sharing a change share its (read-only) values: encoded once
            encoded: dict[int, dict[str, str]] = {}
            for person in people:
                texts = encoded.get(id(person.values))
                if texts is None:
                    texts = encoded[id(person.values)] = {
                        name: encode_value(person.values[name]) for name in fields
                        if name in person.values}
                person.confirmed.update(texts)
        return confirm

    @staticmethod
    def _release(person: Person) -> Unit:
        async def send() -> None:
            return None
        return Unit("release", [person], send, lambda: None)

    def _delete(self, person: Person) -> Unit:
        async def send() -> None:
            await self.client.remove_profile(person.people_id)
        return Unit("delete", [person], send, lambda: None)

    @staticmethod
    def _profile_values(person: Person) -> dict[str, Any]:
        return {k: v for k, v in person.values.items() if not crisp_fields.is_data_field(k)}

    def _profile(self, person: Person) -> Unit:
        values = self._profile_values(person)
        email = values.pop("email", None)
        body, sent = profile_body(values, email=email)
        if email is not None:
            sent.append("email")

        async def send() -> None:
            await self.client.update_profile(person.people_id, body)
        return Unit("profile", [person], send, self._confirm([person], sent))

    def _create(self, person: Person) -> Unit:
        body, sent = profile_body(self._profile_values(person), email=person.email,
                                  creating=True)
        fields = self.fields

        async def send() -> None:
            try:
                person.people_id = await self.client.create_profile(body)
                person.origin, person.verified = "created", True
                # a new person holds nothing but what we send: every unsent field is empty,
                # except the nickname Crisp requires, which may be a stand-in (left unknown)
                person.confirmed.update({f: JSON_NULL for f in fields
                                         if f not in person.values and f != "person.nickname"})
            except RowRejected as error:
                if error.reason != Reason.PEOPLE_EXISTS:
                    raise
                # created meanwhile, or our earlier create's answer was lost: adopt, never
                # duplicate
                existing = await self.client.get_profile(person.email)
                if existing is None:
                    raise
                if await asyncio.to_thread(self.is_managed, existing["people_id"]):
                    raise RowRejected(
                        error.method, error.path, error.status, Reason.PEOPLE_EXISTS,
                        "the email is a person's this activation already manages under "
                        "another identifier") from None
                person.people_id = existing["people_id"]
                person.origin = self._origin(existing.get("created_at"))
                # patch only the mapped fields Crisp holds otherwise: never the stand-in
                # nickname of the create body over a real person's name
                held = held_values(existing, None, list(self._profile_values(person)))
                differing = {k: v for k, v in self._profile_values(person).items()
                             if k != "email" and encode_value(v) != held.get(k)}
                patch, _ = profile_body(differing)
                if patch:
                    await self.client.update_profile(person.people_id, patch)
        return Unit("create", [person], send, self._confirm([person], sent))

    def _origin(self, created_at: Any) -> str:
        """Crisp created them after we planned to create them: our create (its answer lost);
        before: they were already there, adopted."""
        if (isinstance(created_at, int | float) and self.planned_at_ms is not None
                and created_at >= self.planned_at_ms):
            return "created"
        return "adopted"

    def _data_units(self, people: list[Person]) -> Iterator[Unit]:
        """One unit per distinct data change: batched when people share it. People share a
        change when they share its text in the change set (`apply` decodes each text once),
        as `changes.plan.request_plan` counts them."""
        groups: dict[int, list[Person]] = {}
        for person in people:
            groups.setdefault(id(person.data), []).append(person)
        for same_change in groups.values():
            data = same_change[0].data
            fields = [crisp_fields.data_field(key) for key in data]
            if len(same_change) == 1 or self.batch_size == 1:  # batch_size 1: no batching
                for person in same_change:
                    yield Unit("data", [person], self._single_data(person, data),
                               self._confirm([person], fields))
                continue
            for start in range(0, len(same_change), self.batch_size):
                batch = same_change[start:start + self.batch_size]
                yield Unit("batch_data", batch, self._batch_data(batch, data),
                           self._confirm(batch, fields))

    def _single_data(self, person: Person, data: dict[str, Any]) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            await self.client.update_data(person.people_id, data)
        return send

    def _batch_data(self, people: list[Person], data: dict[str, Any]
                    ) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            await self.client.batch_update_data([p.people_id for p in people], data)
        return send
