"""Our Crisp client against the emulator: typed calls, the error taxonomy under injected
faults, pacing, budget, and never leaking the token key."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from crisp_pipeline.crisp import (
    BudgetExhausted,
    CrispSettings,
    InMemoryBudget,
    RetryLater,
    RetryPolicy,
    RowRejected,
    Secret,
    SettingsError,
    StopRun,
)
from crisp_pipeline.crisp.contract import CLEAR_DATA_VALUE
from crisp_pipeline.emulator import EmulatorConfig, FaultPlan, ForcedAnswer, start_in_thread

from .conftest import PLUGIN, USER, WEBSITE, client_for, run, settings_for


def writes_logged(emulator) -> int:
    return sum(1 for entry in emulator.emulator.requests()
               if entry.method in {"POST", "PUT", "PATCH", "DELETE"})


async def create(client, email: str, nickname: str = "N") -> str:
    return await client.create_profile({"email": email, "person": {"nickname": nickname}})


# ---------------------------------------------------------------- the routes


def test_profile_and_data_round_trip(emulator, settings):
    async def scenario():
        async with client_for(settings) as client:
            people_id = await create(client, "Lin+test@X.io", "Lin")
            assert await client.profile_exists("lin+test@x.io")
            assert not await client.profile_exists("nobody@x.io")
            assert (await client.get_profile("lin+test@x.io"))["people_id"] == people_id
            assert await client.get_profile("nobody@x.io") is None
            await client.update_profile(people_id, {"person": {"phone": "1"}})
            await client.save_profile(people_id, {"email": "lin@x.io", "person": {"nickname": "L"}})
            await client.update_data("lin@x.io", {"plan": "pro", "mrr": 9.5, "vip": True})
            await client.update_data(people_id, {"vip": CLEAR_DATA_VALUE})
            assert await client.get_data(people_id) == {"plan": "pro", "mrr": 9.5}
            await client.save_data(people_id, {"only": 1})
            assert await client.get_data(people_id) == {"only": 1}
            assert await client.people_count() == 1
            assert await client.remove_profile(people_id) is True
            assert await client.remove_profile(people_id) is False  # already gone
    run(scenario())


def test_listing_batch_and_suggestions(emulator, settings):
    async def scenario():
        async with client_for(settings) as client:
            ids = [await create(client, f"p{i:03d}@x.io") for i in range(120)]
            listed = [p["people_id"] async for p in client.iter_profiles()]
            assert listed == ids  # three full pages and an empty one
            await client.batch_update_data(ids[:60], {"plan": "pro"})
            await client.batch_update_segments(ids[:2], ["vip"])
            found = await client.list_profiles(search_filter=[
                {"model": "people", "criterion": "data.plan", "operator": "eq",
                 "query": ["pro"]}])
            assert len(found) == 50
            assert await client.list_segments() == [{"segment": "vip", "count": 2}]
            assert await client.list_data_keys() == [{"key": "plan", "count": 60}]
        async with client_for(settings_for(emulator, USER)) as user:
            await user.batch_remove(ids[:100])
            assert await user.people_count() == 20
    run(scenario())


# ---------------------------------------------------------------- the error taxonomy


def test_a_429_storm_is_ridden_out_without_a_failed_write(emulator, settings):
    emulator.emulator.set_faults(FaultPlan(rate_limit_burst=25))

    async def scenario():
        async with client_for(settings, max_in_flight=4) as client:
            ids = await asyncio.gather(*(create(client, f"s{i}@x.io") for i in range(10)))
            return ids, client.stats
    ids, stats = run(scenario())
    assert len(set(ids)) == 10
    assert len(emulator.emulator.people(WEBSITE)) == 10
    assert stats.retries == 25 and stats.by_route_status[("POST people/profile", "429")] == 25


def test_420_and_5xx_and_dropped_connections_are_retried(emulator, settings):
    emulator.emulator.config.rate_limit_status = 420
    emulator.emulator.set_faults(FaultPlan(rate_limit_burst=3, error_rate=0.5), seed=11)

    async def scenario():
        async with client_for(settings) as client:
            ids = [await create(client, f"r{i}@x.io") for i in range(8)]
            emulator.emulator.set_faults(FaultPlan(drop_rate=0.4))
            for people_id in ids:  # data merges are idempotent, so a drop can be resent
                await client.update_data(people_id, {"plan": "pro"})
            return client.stats
    stats = run(scenario())
    assert stats.by_route_status[("POST people/profile", "420")] == 3
    assert any(status in {"500", "503"} for _, status in stats.by_route_status)
    assert stats.transport_errors > 0
    assert all(p["data"] == {"plan": "pro"} for p in emulator.emulator.people(WEBSITE))


def test_a_dropped_create_comes_back_as_people_exists(emulator, settings):
    """The create went through but its answer was lost: the retry meets `people_exists`,
    which the sync resolves by looking the person up (never by creating twice)."""
    emulator.emulator.set_faults(FaultPlan(), seed=3)

    async def scenario():
        async with client_for(settings) as client:
            while True:  # draw until the drop happens after processing
                emulator.emulator.set_faults(FaultPlan(drop_rate=1.0))
                try:
                    await client.create_profile({"email": "lost@x.io",
                                                 "person": {"nickname": "L"}})
                except RetryLater:
                    if emulator.emulator.people(WEBSITE):
                        break
            emulator.emulator.set_faults(FaultPlan())
            with pytest.raises(RowRejected) as exists:
                await create(client, "lost@x.io")
            return exists.value
    error = run(scenario())
    assert error.reason == "people_exists" and error.status == 409
    assert len(emulator.emulator.people(WEBSITE)) == 1


def test_timeouts_are_retry_later_after_bounded_retries(emulator, settings):
    emulator.emulator.set_faults(FaultPlan(latency_ms=300))
    policy = RetryPolicy(max_attempts=3, initial_wait=0.01, max_wait=0.02, max_total_wait=5)

    async def scenario():
        async with client_for(settings, timeout=0.05, retry=policy) as client:
            with pytest.raises(RetryLater) as later:
                await client.people_count()
            return later.value, client.stats
    error, stats = run(scenario())
    assert error.reason == "timeout" and stats.sent == 3 and stats.retries == 2


def test_a_trickling_answer_is_cut_at_the_request_deadline_not_only_when_idle(
        emulator, settings):
    """Bytes every 0.4 s never trip the idle timeout (1 s); the attempt's total deadline
    (0.5 s) does, over real sockets, and a run's deadline ends the retries."""
    emulator.emulator.set_faults(FaultPlan(slow_body_ms=4000))
    policy = RetryPolicy(max_attempts=10, initial_wait=0.01, max_wait=0.02, max_total_wait=60)

    async def scenario():
        started = time.monotonic()
        async with client_for(settings, timeout=1.0, request_deadline=0.5, retry=policy,
                              deadline=time.monotonic() + 2.0) as client:
            with pytest.raises(RetryLater) as later:
                await client.people_count()
            return later.value, client.stats, time.monotonic() - started
    error, stats, seconds = run(scenario())
    assert error.reason == "deadline" and seconds < 3.5
    assert 2 <= stats.sent <= 5  # cut at 0.5 s each, until the run's deadline at 2 s


def test_retry_after_is_honoured_and_a_long_one_defers_at_once(emulator, settings):
    emulator.emulator.config.retry_after_header = True
    emulator.emulator.set_faults(FaultPlan(rate_limit_burst=1))

    async def scenario():
        async with client_for(settings) as client:
            started = time.monotonic()
            await client.people_count()
            waited = time.monotonic() - started
            emulator.emulator.quota.set_spent(PLUGIN.identifier, 5000)  # quota spent
            with pytest.raises(RetryLater) as deferred:
                await client.people_count()
            return waited, deferred.value, client.stats
    waited, deferred, stats = run(scenario())
    assert waited >= 0.95  # Retry-After: 1, not the 10 ms of the fast test policy
    assert deferred.status == 429 and deferred.retry_after > 60
    assert stats.sent == 3  # the quota answer was not retried


def test_401_stops_at_once_and_names_the_variables(emulator):
    settings = settings_for(emulator, token_key=Secret("wrong-key"))

    async def scenario():
        async with client_for(settings) as client:
            with pytest.raises(StopRun) as stop:
                await create(client, "x@x.io")
            return stop.value
    error = run(scenario())
    assert error.status == 401 and "CRISP_TOKEN_KEY" in str(error)
    assert len(emulator.emulator.requests()) == 1


def test_403_and_not_subscribed_and_route_tier_stop_the_run(emulator, settings):
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(403, "not_allowed",
                                                                method="PATCH")]))

    async def scenario():
        async with client_for(settings) as client:
            people_id = await create(client, "y@x.io")
            with pytest.raises(StopRun) as forbidden:
                await client.update_data(people_id, {"a": 1})
            with pytest.raises(StopRun) as tier:
                await client.batch_remove([people_id])
        async with client_for(settings_for(emulator, website_id="elsewhere")) as client:
            with pytest.raises(StopRun) as website:
                await client.people_count()
        return forbidden.value, tier.value, website.value
    forbidden, tier, website = run(scenario())
    assert forbidden.status == 403
    assert tier.reason == "restricted_route_tier"
    assert website.reason == "not_subscribed" and "CRISP_WEBSITE_ID" in str(website)
    assert len(emulator.emulator.requests()) == 4  # one each, no retry


def test_invalid_data_is_a_rejected_row_with_crisps_message(emulator, settings):
    async def scenario():
        async with client_for(settings) as client:
            people_id = await create(client, "z@x.io")
            with pytest.raises(RowRejected) as rejected:
                await client.update_data(people_id, {"Plan Name": "pro"})
            return rejected.value
    error = run(scenario())
    assert (error.status, error.reason) == (400, "invalid_data")
    assert "data.Plan Name" in error.message and "data.Plan Name" in str(error)
    assert writes_logged(emulator) == 2  # the refusal was not retried


def test_redirects_are_not_followed_so_credentials_stay_home(emulator, settings):
    elsewhere = start_in_thread(EmulatorConfig([WEBSITE], [PLUGIN], rate_limit_per_second=None))
    try:
        target = f"{elsewhere.base_url}website/{WEBSITE}/people/stats"
        emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(307, "moved",
                                                                    location=target)]))

        async def scenario():
            async with client_for(settings) as client:
                with pytest.raises(StopRun) as stop:
                    await client.people_count()
                return stop.value
        error = run(scenario())
        assert error.status == 307 and "not followed" in str(error)
        assert elsewhere.emulator.requests() == []
    finally:
        elsewhere.stop()


# ---------------------------------------------------------------- pacing and budget


def test_the_daily_budget_is_paid_before_each_request(emulator, settings):
    budget = InMemoryBudget(quota=3)

    async def scenario():
        async with client_for(settings, budget=budget) as client:
            for index in range(3):
                await create(client, f"b{index}@x.io")
            with pytest.raises(BudgetExhausted):
                await create(client, "b3@x.io")
    run(scenario())
    assert len(emulator.emulator.requests()) == 3 and budget.remaining == 0


def test_retries_are_paid_from_the_budget_too(emulator, settings):
    emulator.emulator.set_faults(FaultPlan(rate_limit_burst=2))
    budget = InMemoryBudget(quota=10)

    async def scenario():
        async with client_for(settings, budget=budget) as client:
            await client.people_count()
    run(scenario())
    assert budget.spent == 3


def test_in_flight_requests_are_bounded_and_latency_overlaps(emulator, settings):
    emulator.emulator.set_faults(FaultPlan(latency_ms=100))

    async def timed(max_in_flight: int) -> float:
        async with client_for(settings, max_in_flight=max_in_flight) as client:
            started = time.monotonic()
            await asyncio.gather(*(client.people_count() for _ in range(16)))
            return time.monotonic() - started
    bounded, wide = run(timed(4)), run(timed(16))
    assert bounded >= 0.4  # 16 requests, 4 at a time, 100 ms each
    assert wide < 0.35  # all 16 overlap


def test_client_side_rate_paces_requests(emulator, settings):
    async def scenario():
        async with client_for(settings, requests_per_second=20, max_in_flight=16) as client:
            started = time.monotonic()
            await asyncio.gather(*(client.people_count() for _ in range(30)))
            return time.monotonic() - started
    assert run(scenario()) >= 0.45  # a burst of 20, then 10 more at 20/s


# ---------------------------------------------------------------- settings and secrets


def test_settings_come_from_the_environment():
    settings = CrispSettings.from_env({
        "CRISP_WEBSITE_ID": "w", "CRISP_TOKEN_IDENTIFIER": "i", "CRISP_TOKEN_KEY": "k",
        "CRISP_API_URL": "http://127.0.0.1:9/v1", "CRISP_TIER": "website"})
    assert (settings.base_url, settings.tier, settings.daily_quota) == (
        "http://127.0.0.1:9/v1/", "website", 10000)
    default = CrispSettings.from_env({"CRISP_WEBSITE_ID": "w", "CRISP_TOKEN_IDENTIFIER": "i",
                                      "CRISP_TOKEN_KEY": "k", "CRISP_DAILY_QUOTA": "250"})
    assert (default.base_url, default.tier, default.daily_quota) == (
        "https://api.crisp.chat/v1/", "plugin", 250)
    with pytest.raises(SettingsError, match="CRISP_TOKEN_KEY"):
        CrispSettings.from_env({"CRISP_WEBSITE_ID": "w", "CRISP_TOKEN_IDENTIFIER": "i"})
    with pytest.raises(SettingsError, match="CRISP_TIER"):
        CrispSettings.from_env({"CRISP_WEBSITE_ID": "w", "CRISP_TOKEN_IDENTIFIER": "i",
                                "CRISP_TOKEN_KEY": "k", "CRISP_TIER": "admin"})
    with pytest.raises(SettingsError, match="CRISP_DAILY_QUOTA"):
        CrispSettings.from_env({"CRISP_WEBSITE_ID": "w", "CRISP_TOKEN_IDENTIFIER": "i",
                                "CRISP_TOKEN_KEY": "k", "CRISP_DAILY_QUOTA": "lots"})


def test_the_token_key_never_leaks_into_logs_errors_or_reprs(emulator, caplog):
    key = PLUGIN.key
    caplog.set_level(logging.DEBUG)
    settings = settings_for(emulator)
    texts = [repr(settings), str(settings), repr(settings.token_key)]
    emulator.emulator.set_faults(FaultPlan(rate_limit_burst=2))

    async def scenario():
        async with client_for(settings) as client:
            texts.append(repr(client))
            await create(client, "leak@x.io")
            for failing in (client.update_data("leak@x.io", {"Bad": 1}),
                            client.batch_remove(["x"])):
                try:
                    await failing
                except Exception as error:  # noqa: BLE001 - every failure's text is checked
                    texts.extend([str(error), repr(error), repr(error.__dict__)])
        emulator.emulator.set_faults(FaultPlan(latency_ms=200))
        async with client_for(settings, timeout=0.01,
                              retry=RetryPolicy(max_attempts=2, initial_wait=0.01)) as client:
            try:
                await client.people_count()
            except RetryLater as error:
                texts.extend([str(error), repr(error)])
        async with client_for(settings_for(emulator, token_key=Secret(key + "x"))) as client:
            try:
                await client.people_count()
            except StopRun as error:
                texts.extend([str(error), repr(error)])
    run(scenario())
    texts.extend(record.getMessage() for record in caplog.records)
    texts.extend(str(record.args) for record in caplog.records)
    assert len(texts) > 10
    assert not [text for text in texts if key in text]


def test_clients_share_one_tls_context_that_verifies_certificates(settings):
    """Made once per process (22 ms a client otherwise), never at the cost of checking the
    server: every client verifies the certificate and the host name."""
    import ssl

    from crisp_pipeline.crisp.client import _tls_context

    first, second = client_for(settings), client_for(settings)
    try:
        contexts = {id(c._http._transport._pool._ssl_context) for c in (first, second)}
        assert contexts == {id(_tls_context())}
        assert _tls_context().verify_mode == ssl.CERT_REQUIRED
        assert _tls_context().check_hostname
    finally:
        run(first.aclose())
        run(second.aclose())
