"""The emulator's limits, as CONTRACT.md §5 describes Crisp's: a daily quota per token and a
per-second rate, plus the request log that tests read.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(int((tomorrow - now).total_seconds()), 1)


class DailyQuota:
    """Requests per token per UTC day; `spend` is False once the day's quota is used."""

    def __init__(self) -> None:
        self._day = ""
        self._spent: dict[str, int] = {}
        self._lock = threading.Lock()

    def spend(self, token: str, quota: int | None) -> bool:
        with self._lock:
            today = datetime.now(UTC).strftime("%Y-%m-%d")
            if today != self._day:
                self._day, self._spent = today, {}
            spent = self._spent.get(token, 0)
            if quota is not None and spent >= quota:
                return False
            self._spent[token] = spent + 1
            return True

    def spent(self, token: str) -> int:
        with self._lock:
            return self._spent.get(token, 0)

    def set_spent(self, token: str, spent: int) -> None:
        with self._lock:
            self._day = datetime.now(UTC).strftime("%Y-%m-%d")
            self._spent[token] = spent

    def reset(self) -> None:
        with self._lock:
            self._spent = {}


class RateLimiter:
    """A token bucket per token identifier: `rate` requests per second, bursts of `burst`."""

    def __init__(self, rate: float | None, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = float(burst or (rate or 0))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, token: str) -> bool:
        if not self.rate:
            return True
        with self._lock:
            now = time.monotonic()
            level, last = self._buckets.get(token, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1.0:
                self._buckets[token] = (level, now)
                return False
            self._buckets[token] = (level - 1.0, now)
            return True

    def reset(self) -> None:
        with self._lock:
            self._buckets = {}


@dataclass(frozen=True)
class LoggedRequest:
    at: float
    method: str
    path: str
    query: str
    status: int
    ms: float
    token: str | None
    tier: str | None
    fault: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "method": self.method, "path": self.path, "query": self.query,
                "status": self.status, "ms": round(self.ms, 2), "token": self.token,
                "tier": self.tier, "fault": self.fault}


class RequestLog:
    """The last `capacity` requests, in arrival order (token identifiers only, never keys)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._entries: deque[LoggedRequest] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
