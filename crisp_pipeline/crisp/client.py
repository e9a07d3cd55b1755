"""An asyncio client for the Crisp people API (REST v1), built on httpx.

It knows the routes of CONTRACT.md §3.1, §3.2 and §3.5, reads the `{error, reason, data}`
envelope, and turns every failure into one of the classes of `errors` so that callers act on
meaning, not on status codes. It also owns the manners towards Crisp: a bounded number of
requests in flight, a client-side rate, a daily budget paid before each attempt, and retries
with exponential backoff and full jitter that honour `Retry-After` when Crisp sends one.

Nothing here knows Dagster or Polars. The same code talks to api.crisp.chat and to the local
emulator; only `CrispSettings.base_url` differs. Redirects are never followed, so the
credentials only ever go to the configured host.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from . import contract
from .config import CrispSettings
from .errors import BudgetExhausted, CrispError, RetryLater, RowRejected, StopRun, classify
from .pacing import RequestBudget, RequestStats, UnlimitedBudget

log = logging.getLogger(__name__)

USER_AGENT = "crisp-pipeline/0.1"


@dataclass(frozen=True)
class RetryPolicy:
    """How long to insist on one request before giving it back as `RetryLater`."""

    max_attempts: int = 6
    initial_wait: float = 0.25  # seconds; the full-jitter window doubles from here
    max_wait: float = 8.0  # cap of one wait
    max_total_wait: float = 60.0  # give up on the request after this long
    max_retry_after: float = 60.0  # a longer Retry-After (quota spent) defers at once


class _WaitRetryAfterOrJitter(wait_base):
    """Wait what Crisp asked for, else exponential backoff with full jitter."""

    def __init__(self, policy: RetryPolicy, time_left: Callable[[], float | None]) -> None:
        self._jitter = wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait)
        self._time_left = time_left

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, RetryLater) and error.retry_after is not None:
            wait = error.retry_after
        else:
            wait = self._jitter(retry_state)
        left = self._time_left()  # never sleep past the run's deadline
        return wait if left is None else max(0.0, min(wait, left))


def _path_id(people_id_or_email: str) -> str:
    """A profile id or email, made safe for a path: `+` must not arrive as a space."""
    return quote(people_id_or_email, safe="@")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS settings httpx would make for each client (certifi's CAs, or SSL_CERT_FILE /
    SSL_CERT_DIR), made once per process: loading the CAs took 22 ms per client, and a run
    opens a client per step that talks to Crisp."""
    return httpx.create_ssl_context()


class CrispClient:
    """Typed calls to one Crisp website's people. Use as `async with CrispClient(...) as c:`."""

    def __init__(
        self,
        settings: CrispSettings,
        *,
        max_in_flight: int = 8,
        requests_per_second: float | None = None,
        budget: RequestBudget | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        request_deadline: float = 30.0,
        deadline: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`timeout` bounds each wait for a byte; `request_deadline` bounds a whole attempt
        (a server trickling bytes never holds a request longer); `deadline` is an instant of
        `time.monotonic()` past which nothing is sent and no retry is waited for (the run's
        deadline: the rest is deferred)."""
        self.settings = settings
        self.request_deadline = request_deadline
        self.deadline = deadline
        self.retry = retry or RetryPolicy()
        self.budget: RequestBudget = budget or UnlimitedBudget()
        self.stats = RequestStats()
        self.max_in_flight = max_in_flight
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._limiter = (AsyncLimiter(requests_per_second, 1.0)
                         if requests_per_second else None)
        self._http = httpx.AsyncClient(
            base_url=f"{settings.base_url}website/{quote(settings.website_id, safe='')}/",
            auth=httpx.BasicAuth(settings.token_identifier, settings.token_key.reveal()),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json",
                     "X-Crisp-Tier": settings.tier},
            timeout=timeout,
            follow_redirects=False,
            verify=_tls_context(),
            transport=transport,
            limits=httpx.Limits(max_connections=max_in_flight,
                                max_keepalive_connections=max_in_flight),
        )

    def __repr__(self) -> str:
        return (f"CrispClient(base_url={self.settings.base_url!r}, "
                f"website_id={self.settings.website_id!r}, tier={self.settings.tier!r})")

    async def __aenter__(self) -> CrispClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        close_budget = getattr(self.budget, "close", None)
        if close_budget is not None:  # give back requests reserved and not spent
            await asyncio.to_thread(close_budget)

    # ---------------------------------------------------------------- profiles (§3.1)

    async def people_count(self) -> int:
        data = await self._call("GET", "people/stats", route="GET people/stats")
        return int(data.get("total", 0))

    async def list_profiles(
        self,
        page: int = 1,
        *,
        per_page: int = contract.PER_PAGE_MAX,
        search_filter: list[Mapping[str, Any]] | None = None,
        search_operator: str | None = None,
        search_text: str | None = None,
        sort_field: str | None = None,
        sort_order: str | None = None,
    ) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"per_page": per_page}
        if search_filter:
            params["search_filter"] = json.dumps(list(search_filter), separators=(",", ":"))
        for name, value in (("search_operator", search_operator), ("search_text", search_text),
                            ("sort_field", sort_field), ("sort_order", sort_order)):
            if value:
                params[name] = value
        data = await self._call("GET", f"people/profiles/{page}", params=params,
                                route="GET people/profiles/{page}")
        return list(data or [])

    async def iter_profiles(self, **query: Any) -> AsyncIterator[dict[str, Any]]:
        """Every matching profile, page after page until Crisp answers an empty page."""
        page = 1
        while True:
            profiles = await self.list_profiles(page, **query)
            if not profiles:
                return
            for profile in profiles:
                yield profile
            page += 1

    async def create_profile(self, profile: Mapping[str, Any]) -> str:
        """Add a profile (email and person.nickname expected) and return its people_id."""
        data = await self._call("POST", "people/profile", body=profile,
                                route="POST people/profile")
        return str(data["people_id"])

    async def profile_exists(self, people_id_or_email: str) -> bool:
        try:
            await self._call("HEAD", f"people/profile/{_path_id(people_id_or_email)}",
                             route="HEAD people/profile/{id}")
        except RowRejected as error:
            if error.status == 404:
                return False
            raise
        return True

    async def get_profile(self, people_id_or_email: str) -> dict[str, Any] | None:
        """The profile, or None when Crisp has no such person."""
        try:
            return await self._call("GET", f"people/profile/{_path_id(people_id_or_email)}",
                                    route="GET people/profile/{id}")
        except RowRejected as error:
            if error.reason == contract.Reason.PEOPLE_NOT_FOUND:
                return None
            raise

    async def save_profile(self, people_id_or_email: str, profile: Mapping[str, Any]) -> None:
        """PUT: overwrite every profile field with `profile`."""
        await self._call("PUT", f"people/profile/{_path_id(people_id_or_email)}", body=profile,
                         route="PUT people/profile/{id}")

    async def update_profile(self, people_id_or_email: str, profile: Mapping[str, Any]) -> None:
        """PATCH: change only the given fields."""
        await self._call("PATCH", f"people/profile/{_path_id(people_id_or_email)}", body=profile,
                         route="PATCH people/profile/{id}")

    async def remove_profile(self, people_id_or_email: str) -> bool:
        """Delete a profile; False when it was already gone (deleting is idempotent)."""
        try:
            await self._call("DELETE", f"people/profile/{_path_id(people_id_or_email)}",
                             route="DELETE people/profile/{id}")
        except RowRejected as error:
            if error.reason == contract.Reason.PEOPLE_NOT_FOUND:
                return False
            raise
        return True

    # ---------------------------------------------------------------- people data (§3.2)

    async def get_data(self, people_id_or_email: str) -> dict[str, Any]:
        data = await self._call("GET", f"people/data/{_path_id(people_id_or_email)}",
                                route="GET people/data/{id}")
        return dict((data or {}).get("data") or {})

    async def save_data(self, people_id_or_email: str, values: Mapping[str, Any]) -> None:
        """PUT: replace the person's whole data object with `values`."""
        await self._call("PUT", f"people/data/{_path_id(people_id_or_email)}",
                         body={"data": dict(values)}, route="PUT people/data/{id}")

    async def update_data(self, people_id_or_email: str, values: Mapping[str, Any]) -> None:
        """PATCH: merge `values` into the person's data; `CLEAR_DATA_VALUE` removes a key."""
        await self._call("PATCH", f"people/data/{_path_id(people_id_or_email)}",
                         body={"data": dict(values)}, route="PATCH people/data/{id}")

    # ---------------------------------------------------------------- batch (§3.5)

    async def batch_update_data(self, people_ids: Iterable[str],
                                values: Mapping[str, Any]) -> None:
        """Merge the same `values` into many people's data in one request."""
        await self._call("PATCH", "batch/data", route="PATCH batch/data",
                         body={"people": {"profiles": list(people_ids)}, "data": dict(values)})

    async def batch_update_segments(self, people_ids: Iterable[str],
                                    segments: Iterable[str]) -> None:
        await self._call("PATCH", "batch/segments", route="PATCH batch/segments",
                         body={"people": {"profiles": list(people_ids)},
                               "segments": list(segments)})

    async def batch_remove(self, people_ids: Iterable[str]) -> None:
        """Delete many profiles at once (a `user`-tier route)."""
        await self._call("PATCH", "batch/remove", route="PATCH batch/remove",
                         body={"people": {"profiles": list(people_ids)}})

    async def list_segments(self, page: int = 1) -> list[dict[str, Any]]:
        data = await self._call("GET", f"people/suggest/segments/{page}",
                                route="GET people/suggest/segments/{page}")
        return list(data or [])

    async def list_data_keys(self, page: int = 1) -> list[dict[str, Any]]:
        data = await self._call("GET", f"people/suggest/data/{page}",
                                route="GET people/suggest/data/{page}")
        return list(data or [])

    # ---------------------------------------------------------------- transport

    async def _call(self, method: str, path: str, *, route: str,
                    body: Mapping[str, Any] | None = None,
                    params: Mapping[str, Any] | None = None) -> Any:
        """Send one logical request, retrying what may succeed later; return `data`.

        The first attempt goes out directly; tenacity takes over only once it failed (it
        decides on that failure as on any other). Entering a retry loop for every request
        cost about 30 µs of the event loop's time, which the 16 requests in flight share."""
        started = time.monotonic()
        try:
            return await self._attempt(method, path, route, body, params)
        except RetryLater as error:
            failed: RetryLater | None = error
        policy = self.retry
        retrying = AsyncRetrying(
            retry=self._should_retry,
            wait=_WaitRetryAfterOrJitter(policy, self._time_left),
            stop=(stop_after_attempt(policy.max_attempts) | self._past_deadline
                  | (lambda _: time.monotonic() - started >= policy.max_total_wait)),
            before_sleep=self._note_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if failed is not None:  # the first attempt, made above
                    error, failed = failed, None
                    raise error
                return await self._attempt(method, path, route, body, params)
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _past_deadline(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def _pay(self, method: str, path: str) -> None:
        """Pay one request from the budget, off the event loop when the budget is kept in a
        database (a slow or locked state file must never stall the requests in flight)."""
        pay = getattr(self.budget, "try_spend_async", None)
        paid = await pay(1) if pay is not None else self.budget.try_spend(1)
        if not paid:
            remaining = getattr(self.budget, "last_remaining", None)
            if pay is None:
                remaining = self.budget.remaining
            raise BudgetExhausted(method, path, remaining,
                                  getattr(self.budget, "unavailable", None))

    def _should_retry(self, retry_state: RetryCallState) -> bool:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if not isinstance(error, RetryLater) or isinstance(error, BudgetExhausted):
            return False
        return error.retry_after is None or error.retry_after <= self.retry.max_retry_after

    def _note_retry(self, retry_state: RetryCallState) -> None:
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        self.stats.retries += 1
        self.stats.retry_wait_seconds += wait
        log.info("retrying after %.2fs: %s", wait, retry_state.outcome.exception())

    async def _attempt(self, method: str, path: str, route: str,
                       body: Mapping[str, Any] | None,
                       params: Mapping[str, Any] | None) -> Any:
        async with self._in_flight:
            if self._limiter is not None:
                await self._limiter.acquire()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise RetryLater(method, path, None, "deadline",
                                 "the run's deadline has passed; not sent")
            await self._pay(method, path)
            started = time.monotonic()
            allowed = self.request_deadline
            if self.deadline is not None:
                allowed = max(0.0, min(allowed, self.deadline - started))
            try:
                async with asyncio.timeout(allowed):
                    response = await self._http.request(
                        method, path, params=params,
                        json=dict(body) if body is not None else None)
                    if method != "HEAD":
                        await response.aread()
            except TimeoutError:
                # the whole attempt took too long (a trickling answer): Crisp may or may not
                # have applied it, exactly as with a dropped connection
                self.stats.transport_errors += 1
                self.stats.record(route, "deadline")
                raise RetryLater(method, path, None, "deadline",
                                 f"no complete answer within {allowed:.0f}s") from None
            except httpx.TimeoutException as error:
                self.stats.transport_errors += 1
                self.stats.record(route, "timeout")
                raise RetryLater(method, path, None, "timeout", type(error).__name__) from None
            except httpx.TransportError as error:
                self.stats.transport_errors += 1
                self.stats.record(route, "connection_error")
                raise RetryLater(method, path, None, "connection_error",
                                 type(error).__name__) from None
        self.stats.record(route, response.status_code)
        log.debug("%s %s -> %s in %.0f ms", method, route, response.status_code,
                  (time.monotonic() - started) * 1000)
        return self._read_envelope(method, path, response)

    @staticmethod
    def _read_envelope(method: str, path: str, response: httpx.Response) -> Any:
        status = response.status_code
        if 300 <= status < 400:
            raise StopRun(method, path, status, "redirect",
                          f"Crisp answered a redirect to {response.headers.get('location')!r}; "
                          "it is not followed, so that credentials only go to CRISP_API_URL")
        if method == "HEAD":
            if status < 300:
                return None
            reason = {401: contract.Reason.UNAUTHORIZED, 403: contract.Reason.NOT_ALLOWED,
                      404: contract.Reason.NOT_FOUND}.get(status, f"http_{status}")
            raise classify(method, path, status, reason, None, _retry_after(response))
        try:
            envelope = response.json()
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict):
            reason = "invalid_response" if status < 400 else f"http_{status}"
            if status < 400:
                raise RetryLater(method, path, status, reason, "the body is not a Crisp envelope")
            raise classify(method, path, status, reason, None, _retry_after(response))
        if status >= 300 or envelope.get("error") is True:
            data = envelope.get("data")
            message = data.get("message") if isinstance(data, dict) else None
            raise classify(method, path, status, str(envelope.get("reason") or f"http_{status}"),
                           message, _retry_after(response))
        return envelope.get("data")


__all__ = ["CrispClient", "CrispError", "RetryPolicy"]
