"""The exact requests a sync would send for some people: the real engine and the real client
run against a transport that answers as Crisp answers a success, and writes down each
request (method, path, JSON body) instead of sending it.

Used by a dry run limited to a few people (`crisp-pipeline try`, run option `only`), so that
a user sees what Crisp will be sent before it is. Nothing is recorded and no budget is
spent; the token never appears (headers are not written down)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.crisp import CrispClient, CrispSettings
from crisp_pipeline.crisp import contract

from .engine import SyncEngine

NEW_PERSON = "(the new person's people_id)"


def _answer(request: httpx.Request) -> httpx.Response:
    if request.method == "POST" and request.url.path.endswith("/people/profile"):
        answer, data = contract.OK_CREATED, {"people_id": NEW_PERSON}
    elif request.method == "DELETE":
        answer, data = contract.OK_DELETED, {}
    elif "/batch/" in request.url.path:
        answer, data = contract.OK_ACCEPTED, {}
    else:
        answer, data = contract.OK_UPDATED, {}
    return httpx.Response(answer.status, json={"error": False, "reason": answer.reason,
                                               "data": data})


def planned_requests(rows: list[dict[str, Any]], config: ActivationConfig,
                     settings: CrispSettings, planned_at_ms: float, *,
                     is_managed: Callable[[str], bool],
                     held_elsewhere: Callable[[list[str]], set[str]]) -> list[dict[str, Any]]:
    """The requests the sync would send for `rows` (change-set rows), in order. The state's
    answers are the sync's own (`is_managed`, `held_elsewhere`): a person another activation
    holds is released, not deleted, in the preview as in the sync."""
    written: list[dict[str, Any]] = []

    def note(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        written.append({"method": request.method, "path": request.url.path, "body": body})
        return _answer(request)

    @contextlib.contextmanager
    def delete_gate(people_ids: list[str]) -> Iterator[set[str]]:
        yield held_elsewhere(people_ids)  # (no lock: nothing is deleted)

    async def run() -> None:
        async with CrispClient(settings, max_in_flight=1,
                               transport=httpx.MockTransport(note)) as client:
            engine = SyncEngine(client, list(config.managed_columns), order=config.order,
                                batch_size=config.batch_size, planned_at_ms=planned_at_ms,
                                is_managed=is_managed, delete_gate=delete_gate)
            await engine.apply(rows, lambda batch: None)
    asyncio.run(run())
    return written
