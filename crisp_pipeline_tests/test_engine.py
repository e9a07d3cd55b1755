"""The sync engine alone, against `httpx.MockTransport` (no sockets, no Dagster): what each
person's status, confirmation and request count is when Crisp answers this or that."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from crisp_pipeline.crisp import CrispClient, CrispSettings, InMemoryBudget, RetryPolicy, Secret
from crisp_pipeline.state.store import StateUnavailable
from crisp_pipeline.sync.engine import Batch, SyncEngine

SETTINGS = CrispSettings(website_id="w", token_identifier="id", token_key=Secret("k"),
                         base_url="http://crisp.test/v1/")
QUICK = RetryPolicy(max_attempts=3, initial_wait=0.001, max_wait=0.01, max_total_wait=5)


def ok(status: int = 200, data: object = None) -> httpx.Response:
    return httpx.Response(status, json={"error": False, "reason": "ok", "data": data or {}})


def refused(status: int, reason: str) -> httpx.Response:
    return httpx.Response(status, json={"error": True, "reason": reason, "data": {}})


def update(identifier: str, **values: object) -> dict:
    data = {k[5:]: v for k, v in values.items() if k.startswith("data.")}
    return {"identifier": identifier, "op": "update", "email": f"{identifier}@x.io",
            "people_id": f"id-{identifier}", "new_values": json.dumps(values),
            "data_values": json.dumps(data) if data else None, "old_values": None}


def create(identifier: str, **values: object) -> dict:
    return {**update(identifier, **values), "op": "create", "people_id": None}


def apply(handler, rows, *, fields=("person.nickname", "data.plan"), budget=None,
          deadline=None, on_batch=None, request_deadline=30.0, max_in_flight=8,
          **engine_options):
    batches: list[Batch] = []

    async def go():
        client = CrispClient(SETTINGS, transport=httpx.MockTransport(handler), retry=QUICK,
                             budget=budget, request_deadline=request_deadline,
                             deadline=deadline, max_in_flight=max_in_flight)
        async with client:
            engine = SyncEngine(client, list(fields), deadline=deadline, **engine_options)
            summary = await engine.apply(rows, on_batch or batches.append)
            return summary, client.stats
    summary, stats = asyncio.run(go())
    return summary, stats, batches


def people_of(batches: list[Batch]) -> dict:
    return {p.identifier: p for b in batches for p in b.people}


def steps_of(batches: list[Batch]) -> list:
    return [s for b in batches for s in b.steps]


def test_writes_confirm_what_they_sent_and_only_a_create_verifies():
    def handler(request):
        if request.method == "POST":
            return ok(201, {"people_id": "id-new"})
        return ok(202) if request.url.path.endswith("batch/data") else ok()
    rows = [update("a", **{"data.plan": "pro"}), update("b", **{"data.plan": "pro"}),
            update("c", **{"person.nickname": "C"}), create("d", **{"person.nickname": "D"})]
    summary, stats, batches = apply(handler, rows)
    people = people_of(batches)
    assert {i: p.status for i, p in people.items()} == {"a": "ok", "b": "ok", "c": "ok",
                                                       "d": "ok"}
    assert people["a"].confirmed == {"data.plan": '"pro"'}
    # batch/data is accepted (202) for people Crisp no longer holds; a profile write shows
    # none of the fields it did not send: neither verifies; a create does
    assert [people[i].verified for i in "abcd"] == [False, False, False, True]
    assert stats.sent == 3


def test_a_long_retry_after_never_outlasts_the_run_deadline():
    def handler(request):
        return httpx.Response(429, headers={"Retry-After": "5"},
                              json={"error": True, "reason": "rate_limited", "data": {}})
    started = time.monotonic()
    summary, stats, batches = apply(handler, [update("a", **{"person.nickname": "A"})],
                                    deadline=started + 0.5)
    assert time.monotonic() - started < 1.5
    assert summary.count("deferred") == 1


def test_a_stop_mid_run_leaves_the_untried_deferred_never_ok():
    calls = []

    def handler(request):
        calls.append(request)
        return refused(403, "not_allowed") if len(calls) == 2 else ok()
    rows = [update(f"p{i}", **{"person.nickname": f"N{i}"}) for i in range(20)]
    summary, stats, batches = apply(handler, rows, chunk=1)
    statuses = [p.status for p in people_of(batches).values()]
    assert summary.stopped is not None
    assert summary.count("ok") == 1 and statuses.count("ok") == 1
    assert summary.count("deferred") == 19


def test_each_unit_counts_its_own_requests_retries_included():
    seen: dict[str, int] = {}

    def handler(request):
        seen[request.url.path] = seen.get(request.url.path, 0) + 1
        if request.url.path.endswith("id-a") and seen[request.url.path] < 3:
            return refused(503, "server_error")
        return ok()
    rows = [update(i, **{"person.nickname": i.upper()}) for i in "abcd"]
    summary, stats, batches = apply(handler, rows)
    requests = {s.identifier: s.requests for s in steps_of(batches)}
    assert requests == {"a": 3, "b": 1, "c": 1, "d": 1}
    assert sum(requests.values()) == stats.sent == 6


def test_a_budget_of_zero_sends_nothing():
    def handler(request):
        raise AssertionError("nothing may be sent")
    rows = [create(f"p{i}", **{"person.nickname": "N"}) for i in range(5)]
    summary, stats, batches = apply(handler, rows, budget=InMemoryBudget(0))
    assert stats.sent == 0 and summary.count("deferred") == 5 and summary.budget_exhausted


def test_past_the_run_deadline_nothing_more_is_sent():
    sent = []

    def handler(request):
        sent.append(request)
        return ok()
    rows = [update(f"p{i}", **{"person.nickname": "N"}) for i in range(5)]
    summary, stats, batches = apply(handler, rows, deadline=time.monotonic() - 1)
    assert sent == [] and summary.past_deadline and summary.count("deferred") == 5
    assert {s.reason for s in steps_of(batches)} == {"deadline"}


def test_a_trickling_answer_is_cut_at_the_request_deadline():
    async def handler(request):
        await asyncio.sleep(5)  # a server that never finishes its answer in time
        return ok()
    rows = [update(f"p{i}", **{"person.nickname": "N"}) for i in range(3)]
    started = time.monotonic()
    summary, stats, batches = apply(handler, rows, request_deadline=0.2)
    assert time.monotonic() - started < 3
    assert summary.count("deferred") == 3
    assert {s.reason for s in steps_of(batches)} == {"deadline"}


def test_a_busy_state_store_stops_sending_and_records_everything_confirmed_later():
    recorded: list[Batch] = []
    refusals = [3]  # the store is busy for the next three attempts to record

    def on_batch(batch: Batch) -> None:
        if refusals[0]:
            refusals[0] -= 1
            raise StateUnavailable("held by another process")
        recorded.append(batch)

    def handler(request):
        return ok()
    rows = [update(f"p{i}", **{"person.nickname": "N"}) for i in range(10)]
    summary, stats, _ = apply(handler, rows, on_batch=on_batch, chunk=2, max_in_flight=1)
    steps = steps_of(recorded)
    # sending stops once recording fails (sending runs at most two chunks ahead of it)
    assert 2 <= stats.sent <= 6
    sent_ok = {s.identifier for s in steps if s.status == "ok"}
    deferred = {s.identifier for s in steps if s.status == "deferred"}
    assert len(sent_ok) == stats.sent and sent_ok | deferred == {f"p{i}" for i in range(10)}
    assert not sent_ok & deferred and summary.state_unavailable


def test_a_store_busy_for_good_raises_after_the_last_wait():
    def on_batch(batch: Batch) -> None:
        raise StateUnavailable("held by another process")
    with pytest.raises(StateUnavailable):
        apply(lambda request: ok(), [update("a", **{"person.nickname": "N"})],
              on_batch=on_batch, record_attempts=2)


def test_a_create_meeting_an_existing_person_patches_only_mapped_fields_that_differ():
    bodies = []

    def handler(request):
        if request.method == "POST":
            return refused(409, "people_exists")
        if request.method == "GET":
            return ok(data={"people_id": "id-real", "email": "ada@x.io",
                            "person": {"nickname": "Ada Lovelace", "phone": "1"}})
        bodies.append((request.url.path, json.loads(request.content)))
        return ok()
    row = create("ada", **{"person.phone": "2"})
    row["email"] = "ada@x.io"
    summary, stats, batches = apply(handler, [row], fields=("person.nickname", "person.phone"))
    assert bodies == [("/v1/website/w/people/profile/id-real", {"person": {"phone": "2"}})]
    assert people_of(batches)["ada"].status == "ok"


def test_an_unexpected_error_in_one_unit_defers_it_and_loses_no_other_outcome():
    def handler(request):
        if request.url.path.endswith("id-b"):
            raise ValueError("a bug somewhere below the engine")
        return ok()
    rows = [update(i, **{"person.nickname": i.upper()}) for i in "abcde"]
    summary, stats, batches = apply(handler, rows, max_in_flight=2)
    statuses = {s.identifier: (s.status, s.reason) for s in steps_of(batches)}
    assert statuses["b"] == ("deferred", "unexpected_error")
    assert {i: statuses[i][0] for i in "acde"} == dict.fromkeys("acde", "ok")


def test_a_batch_that_cannot_be_prepared_never_costs_the_confirmed_ones_waiting_for_the_store():
    """A recorder prepares a batch apart from committing it. The store is busy for the
    first commit (the batch waits to be recorded), then a later batch cannot be prepared:
    the run fails, and the waiting batch is still recorded before it does."""
    from crisp_pipeline.sync.engine import Recorder

    commits: list[Batch] = []

    def prepare(batch: Batch) -> Batch:
        if any(step.identifier == "p5" for step in batch.steps):
            raise ValueError("cannot be turned into frames")
        return batch

    def commit(batch: Batch) -> None:
        commits.append(batch)
        if len(commits) == 1:
            raise StateUnavailable("busy")

    rows = [update(f"p{i}", **{"person.nickname": "N"}) for i in range(10)]
    with pytest.raises(ValueError, match="frames"):
        apply(lambda request: ok(), rows, on_batch=Recorder(commit, prepare=prepare),
              chunk=2, max_in_flight=1)
    recorded = [step.identifier for batch in commits[1:] for step in batch.steps]
    assert commits and set(recorded) >= {step.identifier for step in commits[0].steps}


def test_a_unit_that_cannot_be_made_stops_the_sending_and_what_went_out_is_recorded(
        monkeypatch):
    """Units are made as the senders take them. When one cannot be made, no sender takes
    another (none moves on to the next kind of unit); the units already taken finish and
    are recorded, and the run raises the error."""
    real, sent = SyncEngine._profile, []

    def broken(self, person):
        if person.identifier == "p3":
            raise ValueError("cannot make this unit")
        return real(self, person)
    monkeypatch.setattr(SyncEngine, "_profile", broken)

    def handler(request):
        sent.append(request.url.path)
        return ok()
    batches: list[Batch] = []
    rows = [update(f"p{i}", **{"person.nickname": "N", "data.plan": f"plan{i}"})
            for i in range(20)]
    with pytest.raises(ValueError, match="cannot make"):
        apply(handler, rows, on_batch=batches.append)
    assert sent == [f"/v1/website/w/people/profile/id-p{i}" for i in range(3)]
    assert sorted(people_of(batches)) == ["p0", "p1", "p2"]
