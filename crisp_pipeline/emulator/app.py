"""The emulator as an ASGI app: what happens to a request before and after its route handler.

In order: injected latency; HTTP Basic credentials against the configured tokens and their
`X-Crisp-Tier`; the website (`not_subscribed`); the route's tier; the per-second rate; the
daily quota; injected faults; the handler; then dropped connections and slow bodies. Every
answer carries the `{error, reason, data}` envelope with a matching status, HEAD answers carry
no body, and every request is logged (token identifier only, never its key).

`/_emulator/*` is the test harness's admin API (request log, faults, reset, state), enabled
only when an admin key is configured and sent in `X-Emulator-Admin`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import hmac
import inspect
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from crisp_pipeline.crisp import contract
from crisp_pipeline.crisp.contract import Answer

from .faults import FaultDecision, FaultInjector, FaultPlan
from .limits import DailyQuota, LoggedRequest, RateLimiter, RequestLog, seconds_to_utc_midnight
from .people_api import ROUTES, Call, Handler, RouteNotFound
from .store import PeopleExists, PeopleNotFound, PeopleStore
from .validation import InvalidData

log = logging.getLogger(__name__)
PREFIX = "/v1/website/{website_id}/"


@dataclass(frozen=True)
class TokenSpec:
    identifier: str
    key: str = field(repr=False)
    tier: str = "plugin"
    daily_quota: int | None = None  # None: the tier's default quota

    @classmethod
    def parse(cls, pair: str, tier: str = "plugin", daily_quota: int | None = None) -> TokenSpec:
        identifier, sep, key = pair.partition(":")
        if not sep or not identifier or not key:
            raise ValueError("a token is given as IDENTIFIER:KEY")
        if tier not in contract.TIERS:
            raise ValueError(f"tier must be one of {', '.join(contract.TIERS)}")
        return cls(identifier, key, tier, daily_quota)

    @property
    def quota(self) -> int | None:
        if self.daily_quota is not None:
            return self.daily_quota
        return contract.DEFAULT_DAILY_QUOTA[self.tier]


@dataclass
class EmulatorConfig:
    website_ids: list[str]
    tokens: list[TokenSpec]
    rate_limit_per_second: float | None = 500.0  # None: no per-second limit
    rate_limit_burst: int | None = None
    rate_limit_status: int = 429  # or 420
    retry_after_header: bool = False  # real Crisp sends none (§5); tests may turn it on
    seed: int | None = None
    state_file: Path | None = None
    # People to start from (a file `state_file` wrote), never written back: large benchmarks
    # seed the emulator without paying to save a million people after every write.
    initial_state: Path | None = None
    admin_key: str | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)


def javascript_number(text: str) -> int | float:
    """A JSON number as Crisp (JavaScript) keeps it: a double, written back without a fraction
    when it is integral (`1.0` -> `1`), an integer beyond 2**53 rounded
    (`contract.JSON_NUMBERS_ARE_DOUBLES`)."""
    number = float(text)
    if contract.JSON_NUMBERS_ARE_DOUBLES and number.is_integer() and abs(number) < 1e21:
        return int(number)
    return number if contract.JSON_NUMBERS_ARE_DOUBLES else json.loads(text)


def envelope(answer: Answer, data: Any = None, message: str | None = None,
             headers: dict[str, str] | None = None, head: bool = False) -> Response:
    if head:
        return Response(status_code=answer.status, headers=headers)
    error = answer.status >= 300
    body = {"error": error, "reason": answer.reason,
            "data": {"message": message} if error and message else (data if data is not None else {})}
    return JSONResponse(body, status_code=answer.status, headers=headers)


class DroppedResponse(Response):
    """Starts an answer, then closes the connection before its body: the client sees a drop."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"64"), (b"content-type", b"application/json")]})


class SlowResponse(Response):
    """Sends the body of `inner` in ten pieces spread over `seconds`."""

    def __init__(self, inner: Response, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        super().__init__(status_code=inner.status_code)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.inner.body
        await send({"type": "http.response.start", "status": self.inner.status_code,
                    "headers": self.inner.raw_headers})
        pieces = 10
        step = max(len(body) // pieces, 1)
        chunks = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
        for index, chunk in enumerate(chunks):
            await asyncio.sleep(self.seconds / len(chunks))
            await send({"type": "http.response.body", "body": chunk,
                        "more_body": index < len(chunks) - 1})


class Emulator:
    """The emulated Crisp: its people, tokens, limits, faults and log, and the ASGI app."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.store = PeopleStore(config.website_ids, seed=config.seed)
        self.faults = FaultInjector(config.faults, seed=config.seed)
        self.quota = DailyQuota()
        self.rate = RateLimiter(config.rate_limit_per_second, config.rate_limit_burst)
        self.log = RequestLog()
        self._tokens = {token.identifier: token for token in config.tokens}
        self._dirty = False
        if config.state_file and Path(config.state_file).exists():
            self.store.load(json.loads(Path(config.state_file).read_text()))
        elif config.initial_state:
            self.store.load(json.loads(Path(config.initial_state).read_text()))
        self.app = Starlette(
            routes=self._people_routes() + self._admin_routes(),
            exception_handlers={HTTPException: self._http_exception},
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # ---------------------------------------------------------------- harness API

    def people(self, website_id: str | None = None) -> list[dict[str, Any]]:
        return self.store.people(website_id or self.config.website_ids[0])

    def requests(self) -> list[LoggedRequest]:
        return self.log.entries()

    def set_faults(self, plan: FaultPlan, seed: int | None = None) -> None:
        self.faults.replace(plan, seed)

    def reset(self) -> None:
        self.store.reset()
        self.quota.reset()
        self.rate.reset()
        self.log.clear()
        self.faults.replace(FaultPlan())
        self._dirty = True

    def save_state(self) -> None:
        if not self.config.state_file:
            return
        path = Path(self.config.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(self.store.dump()))
        os.replace(temporary, path)
        self._dirty = False

    # ---------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        flusher = asyncio.create_task(self._flush_periodically()) if self.config.state_file else None
        try:
            yield
        finally:
            if flusher:
                flusher.cancel()
            self.save_state()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._dirty:
                self.save_state()

    # ---------------------------------------------------------------- routing

    def _people_routes(self) -> list[Route]:
        routes = []
        for path, methods in ROUTES:
            endpoint = self._endpoint(methods)
            routes.append(Route(PREFIX + path, endpoint, methods=list(methods)))
        return routes

    def _endpoint(self, methods: dict[str, tuple[str, Handler]]) -> Callable:
        async def endpoint(request: Request) -> Response:
            name, handler = methods[request.method]
            return await self._serve(request, name, handler)
        return endpoint

    async def _http_exception(self, request: Request, error: HTTPException) -> Response:
        answer = contract.METHOD_NOT_ALLOWED if error.status_code == 405 else contract.NOT_FOUND
        response = envelope(answer, message=error.detail, head=request.method == "HEAD")
        self._record(request, response.status_code, time.monotonic(), None, None)
        return response

    # ---------------------------------------------------------------- one request

    def _authenticate(self, request: Request) -> tuple[TokenSpec | None, str]:
        tier = request.headers.get("x-crisp-tier") or contract.TIER_WHEN_HEADER_MISSING
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None, tier
        try:
            identifier, _, key = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, tier
        token = self._tokens.get(identifier)
        if token is None or not hmac.compare_digest(token.key, key) or token.tier != tier:
            return None, tier
        return token, tier

    def _gate(self, request: Request, name: str, token: TokenSpec | None,
              tier: str) -> Response | None:
        """The refusals that come before the handler, in Crisp's order."""
        head = request.method == "HEAD"
        if token is None:
            return envelope(contract.UNAUTHORIZED, message="bad or missing credentials", head=head)
        if not self.store.has_website(request.path_params["website_id"]):
            return envelope(contract.NOT_SUBSCRIBED, message="the plugin is not installed on "
                            "this website", head=head)
        if name in contract.USER_TIER_ONLY_ROUTES and tier != "user":
            return envelope(contract.RESTRICTED_ROUTE_TIER,
                            message=f"this route needs the user tier, not {tier}", head=head)
        retry_headers = {"Retry-After": "1"} if self.config.retry_after_header else None
        if not self.rate.allow(token.identifier):
            answer = Answer(self.config.rate_limit_status, contract.Reason.RATE_LIMITED)
            return envelope(answer, message="too many requests", headers=retry_headers, head=head)
        if not self.quota.spend(token.identifier, token.quota):
            headers = ({"Retry-After": str(seconds_to_utc_midnight())}
                       if self.config.retry_after_header else None)
            return envelope(contract.QUOTA_EXHAUSTED, message="daily quota exhausted",
                            headers=headers, head=head)
        return None

    def _injected(self, request: Request, decision: FaultDecision) -> Response | None:
        head = request.method == "HEAD"
        if decision.forced:
            location = {"Location": decision.forced.location} if decision.forced.location else None
            return envelope(Answer(decision.forced.status, decision.forced.reason),
                            message="injected fault", headers=location, head=head)
        if decision.rate_limited:
            answer = Answer(self.config.rate_limit_status, contract.Reason.RATE_LIMITED)
            headers = {"Retry-After": "1"} if self.config.retry_after_header else None
            return envelope(answer, message="injected rate limit", headers=headers, head=head)
        if decision.error_status:
            return envelope(Answer(decision.error_status, contract.Reason.SERVER_ERROR),
                            message="injected server error", head=head)
        if decision.drop == "before":
            return DroppedResponse()
        return None

    async def _serve(self, request: Request, name: str, handler: Handler) -> Response:
        started = time.monotonic()
        decision = self.faults.decide(request.method, request.url.path)
        if decision.latency_s:
            await asyncio.sleep(decision.latency_s)
        token, tier = self._authenticate(request)
        response = self._gate(request, name, token, tier) or self._injected(request, decision)
        if response is None:
            response = await self._handle(request, handler)
            if decision.drop == "after":
                response = DroppedResponse()
            elif decision.slow_body_s:
                response = SlowResponse(response, decision.slow_body_s)
        status = 0 if isinstance(response, DroppedResponse) else response.status_code
        self._record(request, status, started, token, decision.label)
        return response

    async def _handle(self, request: Request, handler: Handler) -> Response:
        head = request.method == "HEAD"
        body: Any = None
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            raw = await request.body()
            if raw.strip():
                try:
                    body = json.loads(raw, parse_int=javascript_number,
                                      parse_float=javascript_number)
                except json.JSONDecodeError:
                    return envelope(contract.INVALID_DATA, message="the body is not valid JSON")
            elif request.method != "DELETE":
                return envelope(contract.INVALID_DATA, message="the body is empty")
        params = dict(request.path_params)
        website_id = params.pop("website_id")
        call = Call(self.store, website_id, params, dict(request.query_params), body)
        try:
            result = handler(call)
            answer, data = await result if inspect.isawaitable(result) else result
        except InvalidData as error:
            return envelope(contract.INVALID_DATA, message=str(error), head=head)
        except PeopleNotFound as error:
            return envelope(contract.PEOPLE_NOT_FOUND, message=f"no people profile {error}",
                            head=head)
        except RouteNotFound as error:
            return envelope(contract.NOT_FOUND, message=str(error), head=head)
        except PeopleExists as error:
            return envelope(contract.PEOPLE_EXISTS, message=f"{error} is already used by "
                            "another people profile", head=head)
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            self._dirty = True
        return envelope(answer, data, head=head)

    def _record(self, request: Request, status: int, started: float,
                token: TokenSpec | None, fault: str | None) -> None:
        self.log.add(LoggedRequest(
            at=time.time(), method=request.method, path=request.url.path,
            query=request.url.query, status=status, ms=(time.monotonic() - started) * 1000,
            token=token.identifier if token else None, tier=token.tier if token else None,
            fault=fault))

    # ---------------------------------------------------------------- admin API

    def _admin_routes(self) -> list[Route]:
        return [
            Route("/_emulator/requests", self._admin(self._admin_requests), methods=["GET", "DELETE"]),
            Route("/_emulator/faults", self._admin(self._admin_faults), methods=["GET", "PUT"]),
            Route("/_emulator/reset", self._admin(self._admin_reset), methods=["POST"]),
            Route("/_emulator/people/{website_id}", self._admin(self._admin_people),
                  methods=["GET"]),
            Route("/_emulator/quota/{identifier}", self._admin(self._admin_quota),
                  methods=["GET", "PUT"]),
        ]

    def _admin(self, handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            given = request.headers.get("x-emulator-admin", "")
            if not self.config.admin_key or not hmac.compare_digest(given, self.config.admin_key):
                return envelope(contract.NOT_FOUND, message="admin API disabled or wrong key")
            return JSONResponse(await handler(request))
        return endpoint

    async def _admin_requests(self, request: Request) -> Any:
        if request.method == "DELETE":
            self.log.clear()
            return {}
        return [entry.as_dict() for entry in self.log.entries()]

    async def _admin_faults(self, request: Request) -> Any:
        if request.method == "PUT":
            self.set_faults(FaultPlan.from_dict(await request.json()))
        return self.faults.plan.as_dict()

    async def _admin_reset(self, request: Request) -> Any:
        self.reset()
        return {}

    async def _admin_people(self, request: Request) -> Any:
        website_id = request.path_params["website_id"]
        return self.store.people(website_id) if self.store.has_website(website_id) else []

    async def _admin_quota(self, request: Request) -> Any:
        identifier = request.path_params["identifier"]
        if request.method == "PUT":
            self.quota.set_spent(identifier, int((await request.json())["spent"]))
        return {"spent": self.quota.spent(identifier)}
