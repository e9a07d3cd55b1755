"""Trouble on demand: latency, server errors, rate-limit bursts, dropped connections, slow bodies.

A `FaultPlan` says what should go wrong and how often; `FaultInjector.decide` draws, for each
request, what goes wrong with it. Draws use a seeded generator so a failing test can be
replayed. Plans are set at start-up (`--latency-ms`, `--fault-rate`) or replaced at run time
through the admin route or `Emulator.set_faults`.
"""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ForcedAnswer:
    """Answer `status`/`reason` to requests matching method and path, `times` times (-1: always)."""

    status: int
    reason: str
    method: str | None = None
    path_contains: str | None = None
    times: int = -1
    location: str | None = None  # sent as a Location header (to test redirects)

    def matches(self, method: str, path: str) -> bool:
        return (self.times != 0 and (self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path))


@dataclass
class FaultPlan:
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0  # fraction of requests answered 500 or 503, not processed
    drop_rate: float = 0.0  # fraction whose connection drops: half before, half after processing
    slow_body_ms: float = 0.0  # time spent trickling out each response body
    rate_limit_burst: int = 0  # the next N requests are answered 429 (or 420)
    forced: list[ForcedAnswer] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FaultPlan:
        values = dict(values)
        forced = [ForcedAnswer(**item) for item in values.pop("forced", [])]
        return cls(**values, forced=forced)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FaultDecision:
    latency_s: float = 0.0
    error_status: int | None = None
    rate_limited: bool = False
    drop: str | None = None  # "before" or "after" processing
    slow_body_s: float = 0.0
    forced: ForcedAnswer | None = None

    @property
    def label(self) -> str | None:
        if self.forced:
            return f"forced_{self.forced.status}"
        if self.error_status:
            return f"error_{self.error_status}"
        if self.rate_limited:
            return "rate_limit_burst"
        if self.drop:
            return f"drop_{self.drop}"
        return None


class FaultInjector:
    def __init__(self, plan: FaultPlan | None = None, seed: int | None = None) -> None:
        self.plan = plan or FaultPlan()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def replace(self, plan: FaultPlan, seed: int | None = None) -> None:
        """Use `plan` from now on; a seed makes the following draws replayable."""
        with self._lock:
            self.plan = plan
            if seed is not None:
                self._rng.seed(seed)

    def decide(self, method: str, path: str) -> FaultDecision:
        with self._lock:
            plan, rng = self.plan, self._rng
            latency = plan.latency_ms + (rng.uniform(0, plan.latency_jitter_ms)
                                         if plan.latency_jitter_ms else 0.0)
            common = {"latency_s": latency / 1000, "slow_body_s": plan.slow_body_ms / 1000}
            for forced in plan.forced:
                if forced.matches(method, path):
                    if forced.times > 0:
                        forced.times -= 1
                    return FaultDecision(**common, forced=forced)
            if plan.rate_limit_burst > 0:
                plan.rate_limit_burst -= 1
                return FaultDecision(**common, rate_limited=True)
            if plan.error_rate and rng.random() < plan.error_rate:
                return FaultDecision(**common, error_status=rng.choice((500, 503)))
            if plan.drop_rate and rng.random() < plan.drop_rate:
                return FaultDecision(**common, drop=rng.choice(("before", "after")))
            return FaultDecision(**common)
