"""The Crisp client as the pipeline opens it: paying every request from the token's stored
daily budget."""

from __future__ import annotations

from dataclasses import dataclass

from crisp_pipeline.crisp import CrispClient, CrispSettings
from crisp_pipeline.state.budget import StoredBudget
from crisp_pipeline.state.store import Connect


@dataclass
class ClientOptions:
    max_in_flight: int = 16
    requests_per_second: float | None = None
    request_deadline_seconds: float = 30.0  # one attempt, however slowly the answer trickles
    deadline: float | None = None  # time.monotonic() past which nothing more is sent


def open_client(settings: CrispSettings, options: ClientOptions, connect: Connect) -> CrispClient:
    budget = (StoredBudget(connect, settings.token_identifier, settings.daily_quota)
              if settings.daily_quota is not None else None)
    return CrispClient(settings, max_in_flight=options.max_in_flight,
                       requests_per_second=options.requests_per_second, budget=budget,
                       request_deadline=options.request_deadline_seconds,
                       deadline=options.deadline)
