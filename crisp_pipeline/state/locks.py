"""One run per activation at a time, whatever launched it.

A Dagster tag limit only covers runs that go through the run queue; `dg launch`,
`dagster job execute`, `materialize()` and "Materialize all" bypass it. So the lock lives in
the state store itself: a row per activation naming the run that holds it. Every step of a
run takes it (the same run may take it again), so two runs never interleave their segment,
snapshot, change set and sync; the last step gives it back.

A holder that died without giving it back must not block the activation forever. The lock
is taken over when its holder is known to have ended: the Dagster instance says the run is
not in progress, or the process that last touched the lock no longer exists on this machine,
or (for a holder on another machine that the instance does not know) nothing has refreshed
the lock for `STALE_AFTER`. With a multi-process executor a taken-over run notices at its
next step, which finds the lock held by another run and stops.

The same table holds one lock per website (`website_lock_name`), taken while a mirror deletes
people and while an activation adopts people, so that no person is deleted under another
activation that is taking them on.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from .postgres import serialize
from .store import Connect, now

SCHEMA = "crisp_pipeline"
STALE_AFTER = timedelta(minutes=10)
# A run that takes its own lock again (each step does) writes only when it last wrote longer
# ago than this: the heartbeat stays far from stale, and a step spares a write transaction.
REFRESH_AFTER = timedelta(minutes=1)
POLL_SECONDS = 0.5
# When this process last wrote each (activation, run_id)'s heartbeat (`time.monotonic()`):
# see `heartbeat`
_BEATEN: dict[tuple[str, str], float] = {}


class ActivationLocked(RuntimeError):
    """Another run holds the activation; this run sent nothing."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    acquired_at: datetime
    heartbeat_at: datetime


def _table(connection) -> str:
    catalog = connection.execute("select current_database()").fetchone()[0]
    table = f'"{catalog}"."{SCHEMA}"."activation_locks"'
    connection.execute(f'create schema if not exists "{SCHEMA}"')
    connection.execute(f"create table if not exists {table} (activation varchar primary key, "
                       "run_id varchar not null, host varchar, pid bigint, "
                       "acquired_at timestamptz, heartbeat_at timestamptz)")
    return table


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_ended(holder: Holder, run_active: Callable[[str], bool | None]) -> bool:
    """Whether the run holding the lock is known to have ended (see module docstring).

    On this machine the process that last touched the lock decides first: gone means ended,
    even when the Dagster instance still says the run is in progress (a killed worker with no
    run monitoring stays "started" forever). A run whose process is alive has ended when the
    instance says so."""
    if holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return True
    active = run_active(holder.run_id)
    if active is not None:
        return not active
    if holder.host == socket.gethostname():
        return False
    return now() - holder.heartbeat_at > STALE_AFTER


def _held_here_lately(connection, table: str, activation: str, run_id: str) -> bool:
    """Whether this process holds the lock for `run_id` and refreshed it within
    `REFRESH_AFTER` (read alone: nobody else can take it from a live holder meanwhile)."""
    row = connection.execute(f"select run_id, host, pid, acquired_at, heartbeat_at from "
                             f"{table} where activation = ?", [activation]).fetchone()
    if row is None:
        return False
    holder = Holder(*row)
    return (holder.run_id == run_id and holder.host == socket.gethostname()
            and holder.pid == os.getpid() and now() - holder.heartbeat_at < REFRESH_AFTER)


def _try_take(connect: Connect, activation: str, run_id: str,
              run_active: Callable[[str], bool | None]) -> Holder | None:
    """Take (or refresh) the lock for `run_id`; returns the other live holder when held."""
    with connect() as connection:
        table = _table(connection)
        if _held_here_lately(connection, table, activation, run_id):
            return None
        connection.execute("begin")
        try:
            serialize(connection, f"lock:{activation}")  # read, then write: one at a time
            row = connection.execute(f"select run_id, host, pid, acquired_at, heartbeat_at "
                                     f"from {table} where activation = ?",
                                     [activation]).fetchone()
            holder = Holder(*row) if row else None
            if holder and holder.run_id != run_id and not holder_ended(holder, run_active):
                connection.execute("rollback")
                return holder
            stamp = now()
            acquired = holder.acquired_at if holder and holder.run_id == run_id else stamp
            connection.execute(
                f"insert into {table} values (?, ?, ?, ?, ?, ?) on conflict (activation) do "
                "update set run_id = excluded.run_id, host = excluded.host, pid = excluded.pid, "
                "acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at",
                [activation, run_id, socket.gethostname(), os.getpid(), acquired, stamp])
        except BaseException:
            connection.execute("rollback")
            raise
        connection.execute("commit")
    _BEATEN.pop((activation, run_id), None)  # a row written anew: its next heartbeat is too
    return None


def acquire(connect: Connect, activation: str, run_id: str, *, wait_seconds: float,
            run_active: Callable[[str], bool | None] = lambda run_id: None) -> None:
    """Hold the activation for `run_id`, waiting up to `wait_seconds` for another run to end.
    `run_active(run_id)` says whether a run is in progress (None: unknown to the caller)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        holder = _try_take(connect, activation, run_id, run_active)
        if holder is None:
            return
        if time.monotonic() >= deadline:
            what = (f"website {activation.removeprefix('website:')!r} (a mirror deleting or an "
                    "activation adopting people on it)" if activation.startswith("website:")
                    else f"activation {activation!r}")
            raise ActivationLocked(
                f"{what} is locked by run {holder.run_id} (since "
                f"{holder.acquired_at:%Y-%m-%d %H:%M:%S %Z}, on {holder.host}); this run waited "
                f"{wait_seconds:g} s and sent nothing. One run per activation at a time: let "
                "that run finish, or raise `lock_wait_seconds` in the run config.")
        time.sleep(POLL_SECONDS)


def release(connect: Connect, activation: str, run_id: str) -> None:
    """Give the lock back, if `run_id` still holds it."""
    with connect() as connection:
        table = _table(connection)
        connection.execute(f"delete from {table} where activation = ? and run_id = ?",
                           [activation, run_id])
    _BEATEN.pop((activation, run_id), None)


def heartbeat(connect: Connect, activation: str, run_id: str) -> None:
    """Show that the holder is alive (long syncs call this after every batch). Written once
    per `REFRESH_AFTER` at most: a takeover needs `STALE_AFTER` of silence, and each write
    was a transaction of 3-16 ms for every 200 people a sync recorded."""
    moment = time.monotonic()
    if moment - _BEATEN.get((activation, run_id), -math.inf) < REFRESH_AFTER.total_seconds():
        return
    with connect() as connection:
        table = _table(connection)
        connection.execute(f"update {table} set heartbeat_at = ? where activation = ? and "
                           "run_id = ?", [now(), activation, run_id])
    _BEATEN[(activation, run_id)] = moment


@contextlib.contextmanager
def holding(connect: Connect, name: str, run_id: str, *, wait_seconds: float,
            run_active: Callable[[str], bool | None] = lambda run_id: None) -> Iterator[None]:
    """Hold lock `name` for the block (e.g. a website's, while a mirror deletes or an
    activation adopts people on it)."""
    acquire(connect, name, run_id, wait_seconds=wait_seconds, run_active=run_active)
    try:
        yield
    finally:
        release(connect, name, run_id)


def website_lock_name(website_id: str) -> str:
    """The lock that serialises deleting and adopting people on one website."""
    return f"website:{website_id}"
