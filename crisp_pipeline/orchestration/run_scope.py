"""What holds across an activation's run: one run per activation at a time (the lock in the
state store, `state.locks`), taken by every step and given back by the last, and the state
file kept open from the first step to the last."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.state import locks
from crisp_pipeline.state.store import StateStore

from .resources import CrispRunOptions, state_connector

IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
               dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING]

STEPS = ("segment", "crisp_snapshot", "change_set", "crisp_sync")


def _is_last_step(context: Any, config: ActivationConfig, step: str) -> bool:
    """Whether `step` is the last of the activation's steps this run executes (a run may
    select only some of them, or re-execute from a failed one)."""
    planned = context.run.step_keys_to_execute
    handle = getattr(context, "op_execution_context", context).node_handle
    own = str(handle)  # `<key prefix>__<name>__<step>`
    base = own[:-len(step)] if own.endswith(step) else f"{config.name}__"
    mine = [s for s in STEPS if planned is None or f"{base}{s}" in planned]
    return not mine or mine[-1] == step


@contextlib.contextmanager
def holding_activation(context: Any, db: DuckDBResource, config: ActivationConfig,
                        options: "CrispRunOptions", step: str) -> Iterator[None]:
    """Hold the activation's lock in the state store for this run (see `state.locks`); give
    it back when the step fails (the run goes no further) or when the run's last step ends."""
    connect, run_id = state_connector(db), context.run.run_id
    try:
        locks.acquire(connect, config.name, run_id, wait_seconds=options.lock_wait_seconds,
                      run_active=run_active(context))
    except locks.ActivationLocked as error:
        raise dg.Failure(description=str(error)) from None
    try:
        _keep_open_for_run(connect, run_id, config.name)
        _tag_dry_run(context, options.dry_run)
        with _collector_spares_the_process():
            yield
    except BaseException:
        _let_go(connect, config.name, run_id)
        raise
    if _is_last_step(context, config, step):
        _let_go(connect, config.name, run_id)


_FREEZING = threading.Lock()
_frozen_by_a_step = False


@contextlib.contextmanager
def _collector_spares_the_process() -> Iterator[None]:
    """Python's cycle collector leaves alone, for the step, the objects that existed before
    it (Dagster's and ours: about 270,000 in a run worker). A step that builds many objects
    (a sync turns its change set into one Python object per person) sets off full
    collections, and each walked them all: 0.15 s of a 1M-person run with 1% changed
    (`bench/end_to_end.py`). They are handed back to the collector when the step ends.
    Young garbage is collected first (cheap), so a cycle a previous step left (say, an
    exception's traceback) is not set aside with them; older garbage waits for the step's
    end. Not when something else froze objects already (the process, a user's code): then
    this does nothing, and it never thaws what it did not freeze before the step."""
    global _frozen_by_a_step
    with _FREEZING:
        mine = not _frozen_by_a_step and gc.get_freeze_count() == 0
        if mine:
            gc.collect(1)
            gc.freeze()
            _frozen_by_a_step = True
    try:
        yield
    finally:
        if mine:
            with _FREEZING:
                gc.unfreeze()
                _frozen_by_a_step = False


# The state file kept open from an activation's first step of a run to its last (steps run
# one after another in one process with the activation job's executor): see
# `state.store.file_kept_open`, which also lets it go while idle or after a long stretch, so
# that other processes get their turn.
_OPEN_FOR_RUN: dict[tuple[str, str], contextlib.ExitStack] = {}


def _keep_open_for_run(connect: Any, run_id: str, name: str) -> None:
    if (run_id, name) not in _OPEN_FOR_RUN:
        kept = contextlib.ExitStack()
        kept.enter_context(connect.kept_open())
        _OPEN_FOR_RUN[(run_id, name)] = kept


DRY_RUN_TAG = "crisp/dry_run"
REFUSED_TAG = "crisp/refused"  # guards refused the run's sync (value: the activations)


def _tag_dry_run(context: Any, dry_run: bool) -> None:
    """Show a dry run as one in the UI's run list: the launchpad's run config is where the
    choice is made, so the tag follows it (a run opened from a dry run's launchpad copies
    its tags, and is no dry run once `dry_run` is false)."""
    run = context.run
    wanted = "true" if dry_run else "false"
    if run.tags.get(DRY_RUN_TAG, "false") != wanted:
        context.instance.add_run_tags(run.run_id, {DRY_RUN_TAG: wanted})


def tag_refused(context: Any, name: str) -> None:
    """Name the activation among those whose sync the run's guards refused (one run of
    "Materialize all" may hold several activations)."""
    run_id = context.run.run_id
    record = context.instance.get_run_by_id(run_id)
    refused = {n for n in (record.tags if record else {}).get(REFUSED_TAG, "").split(",") if n}
    context.instance.add_run_tags(run_id, {REFUSED_TAG: ",".join(sorted(refused | {name}))})


def _let_go(connect: Any, name: str, run_id: str) -> None:
    """The run goes no further: its lock is given back and its file let go."""
    try:
        locks.release(connect, name, run_id)
    finally:
        kept = _OPEN_FOR_RUN.pop((run_id, name), None)
        if kept is not None:
            kept.close()


def run_active(context: Any):
    """Whether a run is in progress, as this Dagster instance knows it (None: unknown)."""
    def active(holder: str) -> bool | None:
        record = context.instance.get_run_by_id(holder.split("/")[0])
        return None if record is None else record.status in IN_PROGRESS
    return active


def website_lock(context: Any, db: DuckDBResource, store: StateStore,
                  config: ActivationConfig, options: "CrispRunOptions"):
    """The website's lock (see `state.locks`): a mirror's deletes and adoptions by any
    activation on the website never overlap, even within one run ("Materialize all" runs
    every activation in one run), so it is held by the run *and* the activation."""
    def hold():
        return locks.holding(state_connector(db), locks.website_lock_name(store.website_id or ""),
                             f"{context.run.run_id}/{config.name}",
                             wait_seconds=options.lock_wait_seconds,
                             run_active=run_active(context))
    return hold


def release_activation(context: Any, db: DuckDBResource, config: ActivationConfig) -> None:
    """A blocking check failed: the run stops here, so its lock is given back."""
    _let_go(state_connector(db), config.name, context.run.run_id)
