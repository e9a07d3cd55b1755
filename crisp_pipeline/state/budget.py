"""The daily request budget of a Crisp token, kept in the state store across runs.

Every activation that uses the same token (identifier) spends from the same counter for the
current UTC day, so that together they never spend past `CRISP_DAILY_QUOTA`. Requests are
reserved from the database in blocks and the unused part of a block is given back when the
client closes: a crashed run can over-count (by less than two blocks: the next block is
reserved when half of one is spent, so that a request never waits for the database) but
never under-count, so the budget errs on the side of not being refused by Crisp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import UTC, datetime

from .store import Connect, StateUnavailable, dialect

SCHEMA = "crisp_pipeline"
log = logging.getLogger(__name__)


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


def _add(connect: Connect, token: str, requests: int, quota: int, day: str | None = None,
         *, ensured: bool = False) -> int:
    """Reserve up to `requests` of `day`'s budget (today's by default; a negative number gives
    back); returns how many were granted. One `update ... returning`: the grant is computed
    from the row as the update finds it, so two processes reserving at once (Postgres runs
    them side by side) never both spend the same remainder. A reservation is given back to
    the day it was taken from, whatever the clock says by then. `ensured`: the caller already
    made sure the table exists in this file (its statements were 3.5 of a reservation's
    4.7 ms, and a sync reserves a block of 50 each time 25 are spent); the day's row is added
    when missing."""
    day = day or _today()
    granted = ("greatest(least(?, ? - spent), 0)" if requests > 0 else "greatest(?, -spent)")
    params = [requests, quota] if requests > 0 else [requests]
    with connect() as connection:
        table = _table(connection) if ensured else _ensure(connection)
        update = (f"update {table} set last_granted = {granted}, spent = spent + {granted} "
                  "where token = ? and day = ?::date returning last_granted")
        row = connection.execute(update, [*params, *params, token, day]).fetchone()
        if row is None:  # the day's first reservation
            connection.execute(f"insert into {table} (token, day, spent) values (?, ?::date, "
                               "0) on conflict (token, day) do nothing", [token, day])
            row = connection.execute(update, [*params, *params, token, day]).fetchone()
    return int(row[0])


class StoredBudget:
    """A `RequestBudget` backed by the state store (see module docstring)."""

    def __init__(self, connect: Connect, token: str, quota: int, block: int = 50) -> None:
        self._connect = connect
        self.token = token
        self.quota = quota
        self.block = block
        self._reserved = 0  # granted by the store for `_day`, not yet spent
        self._day = _today()
        self._lock = threading.Lock()
        self._refilled = threading.Condition(self._lock)  # a refill in a worker ended
        self._refilling = False  # (under the lock) a worker is reserving the next block
        self._short = False  # the store granted less than asked: the quota is near its end
        self._closed = False
        self.unavailable: str | None = None  # why the store could not be reached, if so
        self.last_remaining: int | None = None  # what was left when a spend was refused
        self._ensured = False  # a reservation found (or made) the table: no need to again

    def _grant(self, requests: int, day: str) -> int:
        granted = _add(self._connect, self.token, requests, self.quota, day,
                       ensured=self._ensured)
        self._ensured = True
        return granted

    def try_spend(self, requests: int = 1) -> bool:
        """Pay from what this process reserved; reserve another block from the store when
        short. A store that cannot be reached (another process holds the file past the wait)
        pays nothing: unpaid requests are never sent."""
        with self._lock:
            while self._refilling:  # the next block may be on its way: never refuse before
                self._refilled.wait()
            if self._day_changed():  # what is left of yesterday's block goes back to it
                if self._reserved:
                    with contextlib.suppress(StateUnavailable):
                        self._grant(-self._reserved, self._day)
                self._day, self._reserved, self._short = _today(), 0, False
            if self._reserved < requests:
                # after `close` (a request cancelled late), only what it needs: nothing would
                # give the rest of a block back
                asked = (requests - self._reserved if self._closed
                         else max(self.block, requests - self._reserved))
                try:
                    self._reserve(asked)
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
                    self._refill_soon()
                    return True
            finally:
                self._lock.release()
        return await asyncio.to_thread(self.try_spend, requests)

    def _refill_soon(self) -> None:
        """(On the event loop, holding the lock.) Once half the block is spent, reserve the
        next one in a worker thread: at 16 requests in flight, waiting for the database
        every 50 requests cost the sync about 4% of its sending rate (measured by
        `bench/send_throughput.py`: 264 writes/s, 276 without the waits)."""
        if self._refilling or self._short or self._closed or self._reserved * 2 >= self.block:
            return
        self._refilling = True
        try:
            asyncio.get_running_loop().run_in_executor(None, self._refill, self._day)
        except RuntimeError:  # (the loop's executor is shutting down: no refill)
            self._refilling = False

    def _refill(self, day: str) -> None:
        """(In a worker.) The database is asked without holding the lock, so that spending
        from the reserve goes on meanwhile; a grant that arrives after `close` or past
        midnight is given back to the day it was taken from."""
        granted = 0
        try:
            granted = self._grant(self.block, day)
        except Exception as error:  # noqa: BLE001 - a spend that needs the store says why
            log.debug("reserving the next block failed: %s", error)
        with self._lock:
            kept = not (self._closed or self._day != day)
            if kept:
                self._reserved += granted
                self._short = granted < self.block
            self._refilling = False
            self._refilled.notify_all()
        if granted and not kept:
            try:
                self._grant(-granted, day)
            except Exception as error:  # noqa: BLE001 - kept, so over-counted: the safe side
                log.warning("could not give back %d reserved requests: %s", granted, error)

    def reserve_block(self) -> bool:
        """Reserve a block now unless one is reserved; False when the store could not be
        reached. A sync does this before it starts a long use of the state file
        (`StateStore.checkpoint`), so that its first requests are paid without waiting for
        the file. A failure is left to the first spend to meet and report, as it does
        without this."""
        with self._lock:
            while self._refilling:
                self._refilled.wait()
            if self._closed or self._day_changed() or self._reserved >= self.block:
                return True
            try:
                self._reserve(self.block - self._reserved)
            except Exception as error:  # noqa: BLE001 - see above
                log.debug("reserving the first block failed: %s", error)
                return False
            return True

    def _reserve(self, asked: int) -> None:
        """(Holding the lock.) Ask the store for `asked` more of `_day`'s budget and keep
        what it grants."""
        granted = self._grant(asked, self._day)
        self._reserved += granted
        self._short = granted < asked

    def _day_changed(self) -> bool:
        return _today() != self._day

    @property
    def remaining(self) -> int:
        return max(self.quota - spent_today(self._connect, self.token), 0) + self._reserved

    def close(self) -> None:
        """Give back what was reserved and not spent, to the day it was reserved for (kept,
        and so over-counted, when the store cannot be reached: the budget errs on the side of
        not being refused by Crisp)."""
        with self._lock:
            self._closed = True  # (a block being reserved meanwhile is given back by its worker)
            if self._reserved:
                with contextlib.suppress(StateUnavailable):
                    self._grant(-self._reserved, self._day)
            self._reserved = 0


def remaining_today(connect: Connect, token: str, quota: int | None) -> int | None:
    if quota is None:
        return None
    return max(quota - spent_today(connect, token), 0)
