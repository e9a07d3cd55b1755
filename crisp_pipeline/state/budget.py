"""The daily request budget of a Crisp token, kept in the state store across runs.

Every activation that uses the same token (identifier) spends from the same counter for the
current UTC day, so that together they never spend past `CRISP_DAILY_QUOTA`. Requests are
reserved from the database in blocks and the unused part of a block is given back when the
client closes: a crashed run can over-count (by less than a block) but never under-count, so
the budget errs on the side of not being refused by Crisp.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from datetime import UTC, datetime

from .store import Connect, StateUnavailable, dialect

SCHEMA = "crisp_pipeline"


def _table(connection) -> str:
    """Fully qualified: a file named crisp_pipeline.duckdb makes a catalog of the same name."""
    catalog = connection.execute("select current_database()").fetchone()[0]
    return f'"{catalog}"."{SCHEMA}"."request_budget"'


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def _ensure(connection) -> str:
    table = _table(connection)
    connection.execute(f'create schema if not exists "{SCHEMA}"')
    connection.execute(f"create table if not exists {table} (token varchar, day date, "
                       "spent bigint not null, last_granted bigint, primary key (token, day))")
    if dialect(connection) == "duckdb":  # a file from before the update returned the grant
        connection.execute(f"alter table {table} add column if not exists last_granted bigint")
    return table


def spent_today(connect: Connect, token: str) -> int:
    with connect() as connection:
        table = _ensure(connection)
        row = connection.execute(f"select spent from {table} where token = ? and "
                                 "day = ?::date", [token, _today()]).fetchone()
    return int(row[0]) if row else 0


def _add(connect: Connect, token: str, requests: int, quota: int) -> int:
    """Reserve up to `requests` of today's budget (a negative number gives back); returns how
    many were granted. One `update ... returning`: the grant is computed from the row as the
    update finds it, so two processes reserving at once (Postgres runs them side by side)
    never both spend the same remainder."""
    granted = ("greatest(least(?, ? - spent), 0)" if requests > 0 else "greatest(?, -spent)")
    params = [requests, quota] if requests > 0 else [requests]
    with connect() as connection:
        table = _ensure(connection)
        connection.execute(f"insert into {table} (token, day, spent) values (?, ?::date, 0) "
                           "on conflict (token, day) do nothing", [token, _today()])
        row = connection.execute(
            f"update {table} set last_granted = {granted}, spent = spent + {granted} "
            "where token = ? and day = ?::date returning last_granted",
            [*params, *params, token, _today()]).fetchone()
    return int(row[0])


class StoredBudget:
    """A `RequestBudget` backed by the state store (see module docstring)."""

    def __init__(self, connect: Connect, token: str, quota: int, block: int = 50) -> None:
        self._connect = connect
        self.token = token
        self.quota = quota
        self.block = block
        self._reserved = 0  # granted by the store, not yet spent
        self._day = _today()
        self._lock = threading.Lock()
        self.unavailable: str | None = None  # why the store could not be reached, if so
        self.last_remaining: int | None = None  # what was left when a spend was refused

    def try_spend(self, requests: int = 1) -> bool:
        """Pay from what this process reserved; reserve another block from the store when
        short. A store that cannot be reached (another process holds the file past the wait)
        pays nothing: unpaid requests are never sent."""
        with self._lock:
            if self._day_changed():
                self._day, self._reserved = _today(), 0
            if self._reserved < requests:
                try:
                    self._reserved += _add(self._connect, self.token,
                                           max(self.block, requests - self._reserved),
                                           self.quota)
                except StateUnavailable as error:
                    self.unavailable = str(error)
                    return False
            if self._reserved < requests:
                self.last_remaining = self._reserved
                return False
            self._reserved -= requests
            return True

    async def try_spend_async(self, requests: int = 1) -> bool:
        """`try_spend` for the event loop: from the reserved block without I/O, and from the
        store in a worker thread."""
        # never wait for the lock on the event loop: a worker may hold it across a wait for
        # the state file
        if self._lock.acquire(blocking=False):
            try:
                if self._reserved >= requests and not self._day_changed():
                    self._reserved -= requests
                    return True
            finally:
                self._lock.release()
        return await asyncio.to_thread(self.try_spend, requests)

    def _day_changed(self) -> bool:
        return _today() != self._day

    @property
    def remaining(self) -> int:
        return max(self.quota - spent_today(self._connect, self.token), 0) + self._reserved

    def close(self) -> None:
        """Give back what was reserved and not spent (kept, and so over-counted, when the
        store cannot be reached: the budget errs on the side of not being refused by Crisp)."""
        with self._lock:
            if self._reserved and self._day == _today():
                with contextlib.suppress(StateUnavailable):
                    _add(self._connect, self.token, -self._reserved, self.quota)
            self._reserved = 0


def remaining_today(connect: Connect, token: str, quota: int | None) -> int | None:
    if quota is None:
        return None
    return max(quota - spent_today(connect, token), 0)
