"""How many requests the client may send: a daily budget, and the figures of what it sent.

A Crisp plugin token has a few thousand requests a day, so every HTTP attempt (retries
included: Crisp counts them too) is paid from a `RequestBudget` before it leaves. The
in-memory budget here serves one process; the state store provides one that is shared by
every run using the same token.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol


class RequestBudget(Protocol):
    """Pays for requests; `try_spend` is False when today's budget cannot cover them."""

    def try_spend(self, requests: int = 1) -> bool: ...

    @property
    def remaining(self) -> int | None: ...


class UnlimitedBudget:
    def try_spend(self, requests: int = 1) -> bool:
        return True

    @property
    def remaining(self) -> None:
        return None


class InMemoryBudget:
    """A daily budget that lives as long as the object (tests, one-off scripts)."""

    def __init__(self, quota: int, spent: int = 0) -> None:
        self.quota = quota
        self.spent = spent
        self._lock = threading.Lock()

    def try_spend(self, requests: int = 1) -> bool:
        with self._lock:
            if self.spent + requests > self.quota:
                return False
            self.spent += requests
            return True

    @property
    def remaining(self) -> int:
        return max(self.quota - self.spent, 0)


class CappedBudget:
    """At most `cap` requests, retries included, paid from `inner` (a reconcile's allowance:
    what it may spend is a ceiling, not an estimate)."""

    def __init__(self, inner: RequestBudget, cap: int) -> None:
        self.inner = inner
        self.cap = cap
        self.spent = 0

    def try_spend(self, requests: int = 1) -> bool:
        if self.spent + requests > self.cap or not self.inner.try_spend(requests):
            return False
        self.spent += requests
        return True

    async def try_spend_async(self, requests: int = 1) -> bool:
        if self.spent + requests > self.cap:
            return False
        pay = getattr(self.inner, "try_spend_async", None)
        paid = await pay(requests) if pay is not None else self.inner.try_spend(requests)
        if paid:
            self.spent += requests
        return paid

    @property
    def remaining(self) -> int | None:
        inner = self.inner.remaining
        left = self.cap - self.spent
        return left if inner is None else min(left, inner)

    @property
    def last_remaining(self) -> int | None:
        return self.cap - self.spent

    @property
    def unavailable(self) -> str | None:
        return getattr(self.inner, "unavailable", None)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


# The requests sent by the current asyncio task, when it counts them (`counting_requests`):
# a client's figures are shared by every unit in flight, a unit's own count is not.
_TASK_REQUESTS: ContextVar[list[int] | None] = ContextVar("crisp_task_requests", default=None)


@contextlib.contextmanager
def counting_requests() -> Iterator[list[int]]:
    """Count the requests sent inside this block by this task (retries included)."""
    counter = [0]
    token = _TASK_REQUESTS.set(counter)
    try:
        yield counter
    finally:
        _TASK_REQUESTS.reset(token)


@dataclass
class RequestStats:
    """What a client sent: per route and status, retries, and time spent waiting to retry."""

    by_route_status: Counter = field(default_factory=Counter)
    retries: int = 0
    retry_wait_seconds: float = 0.0
    transport_errors: int = 0

    @property
    def sent(self) -> int:
        return sum(self.by_route_status.values())

    def record(self, route: str, status: int | str) -> None:
        self.by_route_status[(route, str(status))] += 1
        counter = _TASK_REQUESTS.get()
        if counter is not None:
            counter[0] += 1

    def writes(self) -> int:
        """Requests sent with a writing method (for 'a run with no change sends no write')."""
        return sum(n for (route, _), n in self.by_route_status.items()
                   if route.split(" ", 1)[0] in {"POST", "PUT", "PATCH", "DELETE"})

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "retries": self.retries,
            "retry_wait_seconds": round(self.retry_wait_seconds, 3),
            "transport_errors": self.transport_errors,
            "by_route_status": {f"{route} {status}": n
                                for (route, status), n in sorted(self.by_route_status.items())},
        }
