"""The `crisp-pipeline` command line."""

from __future__ import annotations

from pathlib import Path

import click

from crisp_pipeline.crisp import contract


@click.group()
@click.version_option(package_name="crisp-pipeline")
def main() -> None:
    """Keep a warehouse segment of people in sync with Crisp."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8780, show_default=True, type=int, help="Port (0: any free one).")
@click.option("--website-id", "website_ids", multiple=True, required=True,
              help="A website the token may use (repeatable).")
@click.option("--token", "tokens", multiple=True, required=True, metavar="ID:KEY",
              help="A token pair the emulator accepts (repeatable).")
@click.option("--tier", type=click.Choice(contract.TIERS), default="plugin", show_default=True,
              help="Tier of the tokens; requests must send it in X-Crisp-Tier.")
@click.option("--daily-quota", type=int, default=None,
              help="Requests per token per UTC day [default: 5000 plugin, 10000 website].")
@click.option("--rate-limit", type=float, default=500.0, show_default=True,
              help="Requests per second per token before 429 (0: no limit).")
@click.option("--rate-limit-status", type=click.Choice(["429", "420"]), default="429",
              show_default=True, help="Status answered when rate limited.")
@click.option("--retry-after/--no-retry-after", default=False, show_default=True,
              help="Send Retry-After on 429 (real Crisp does not).")
@click.option("--latency-ms", type=float, default=0.0, show_default=True,
              help="Latency added to every request.")
@click.option("--latency-jitter-ms", type=float, default=0.0, show_default=True,
              help="Random latency added on top, up to this much.")
@click.option("--fault-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of requests answered 500/503 without being processed.")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of requests whose connection drops.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="JSON file that keeps people across restarts.")
@click.option("--load", "initial_state", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="JSON file (as --state writes it) to start from; never written.")
@click.option("--seed", type=int, default=None, help="Seed for ids and fault draws.")
@click.option("--admin-key", default=None, envvar="CRISP_EMULATOR_ADMIN_KEY",
              help="Enables the /_emulator admin API for this key.")
def emulator(host: str, port: int, website_ids: tuple[str, ...], tokens: tuple[str, ...],
             tier: str, daily_quota: int | None, rate_limit: float, rate_limit_status: str,
             retry_after: bool, latency_ms: float, latency_jitter_ms: float, fault_rate: float,
             drop_rate: float, state_file: Path | None, initial_state: Path | None,
             seed: int | None, admin_key: str | None) -> None:
    """Serve the local Crisp people API emulator until interrupted."""
    from crisp_pipeline.emulator import EmulatorConfig, FaultPlan, TokenSpec, serve_forever

    try:
        specs = [TokenSpec.parse(pair, tier, daily_quota) for pair in tokens]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--token") from None
    config = EmulatorConfig(
        website_ids=list(website_ids), tokens=specs,
        rate_limit_per_second=rate_limit or None, rate_limit_status=int(rate_limit_status),
        retry_after_header=retry_after, seed=seed, state_file=state_file,
        initial_state=initial_state, admin_key=admin_key,
        faults=FaultPlan(latency_ms=latency_ms, latency_jitter_ms=latency_jitter_ms,
                         error_rate=fault_rate, drop_rate=drop_rate),
    )
    shown_port = port or "a free port"
    click.echo(f"Crisp emulator on http://{host}:{shown_port}/v1/ for website(s) "
               f"{', '.join(website_ids)}; token(s) {', '.join(s.identifier for s in specs)} "
               f"({tier} tier). Ctrl-C stops it.")
    serve_forever(config, host, port)


def _db_path(db: str | None) -> str:
    import os

    from crisp_pipeline.component import DEFAULT_DB

    return db or os.environ.get("CRISP_PIPELINE_DB") or DEFAULT_DB


@main.command()
@click.option("--db", default=None, help="DuckDB file [default: CRISP_PIPELINE_DB or "
              "data/crisp_pipeline.duckdb].")
@click.option("--people", default=3000, show_default=True, help="Customers in the sample.")
@click.option("--serve", is_flag=True, help="Keep the emulator serving afterwards (for dg dev).")
def demo(db: str | None, people: int, serve: bool) -> None:
    """Seed a sample warehouse, start the local Crisp emulator, run every activation twice
    (with a change to the source in between) and print what changed in Crisp."""
    from crisp_pipeline.demo import run_demo

    lines = run_demo(_db_path(db), count=people, serve=serve, echo=click.echo)
    if not all(line.success for line in lines):
        raise SystemExit(1)


@main.command(name="try")
@click.argument("activation")
@click.argument("identifier")
@click.option("--send", is_flag=True, help="Send the requests (default: show them only).")
@click.option("--module", default="crisp_pipeline.definitions", show_default=True,
              help="The Python module whose `defs` holds the activation (your project's).")
def try_one(activation: str, identifier: str, send: bool, module: str) -> None:
    """One person first: run ACTIVATION for the person IDENTIFIER only (their email, or
    their external id), show their change and the exact requests, and send them only with
    --send, recorded like any sync. Uses the CRISP_* variables, as a run does."""
    import importlib
    import json
    import os

    import dagster as dg

    loaded = importlib.import_module(module).defs
    definitions = loaded() if callable(loaded) else loaded
    try:
        job = definitions.resolve_job_def(f"{activation}_job")
    except Exception:  # noqa: BLE001 - dagster's error names every job; ours is shorter
        raise click.ClickException(f"no activation {activation!r} in {module}") from None
    instance = (dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME")
                else dg.DagsterInstance.ephemeral())
    result = job.execute_in_process(
        instance=instance, raise_on_error=False, tags={"crisp/try": identifier},
        run_config={"resources": {"crisp_run": {"config": {"only": [identifier],
                                                           "dry_run": not send}}},
                    "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
    if not result.success:
        failures = [e.step_failure_data.error.message.strip() if e.step_failure_data.error
                    else str(e.step_failure_data.user_failure_data)
                    for e in result.all_events if e.is_step_failure]
        raise click.ClickException("; ".join(failures) or "the run failed")
    from crisp_pipeline.orchestration.metadata import refusal_of

    refused = refusal_of(result, activation)
    if refused:
        raise click.ClickException(f"refused by mirror_guards: {refused}")
    crisp_db = definitions.resources.get("crisp_db") if definitions.resources else None
    row = _change_of(getattr(crisp_db, "database", None) or _db_path(None), activation,
                     identifier)
    if row is None:
        raise click.ClickException(f"{identifier!r} is not in the change set of {activation!r} "
                                   "(not in the segment, or nothing to do)")
    click.echo(json.dumps({"change": row}, indent=2, default=str))
    events = [e for e in result.all_events
              if e.event_type in (dg.DagsterEventType.ASSET_MATERIALIZATION,
                                  dg.DagsterEventType.ASSET_OBSERVATION)
              and e.asset_key and e.asset_key.path[-1] == "crisp_sync"]
    metadata = events[-1].event_specific_data.materialization.metadata if events and \
        events[-1].event_type == dg.DagsterEventType.ASSET_MATERIALIZATION else (
        events[-1].event_specific_data.asset_observation.metadata if events else {})
    if not send:
        planned = metadata.get("requests_planned")
        click.echo(json.dumps({"requests": planned.value if planned else []}, indent=2))
        click.echo("Nothing was sent. --send sends these and records the outcome.")
        return
    outcomes = {k: v.value for k, v in metadata.items()
                if k in ("people_ok", "people_rejected", "people_deferred", "requests_sent")}
    click.echo(json.dumps({"sent": outcomes, "run_id": result.run_id}, indent=2))


def _change_of(db: str, activation: str, identifier: str) -> dict | None:
    import polars as pl

    from crisp_pipeline.state.store import StateStore, connect_state

    store = StateStore(connect_state(db), f"crisp_{activation}")
    keyed_by_email = (store.stored_configuration() or {}).get("identifier") == "email"
    wanted = identifier.strip().lower() if keyed_by_email else identifier.strip()
    changes = store.read_change_set()
    mine = changes.filter(pl.col("identifier") == wanted)
    if mine.is_empty():
        return None
    row = mine.row(0, named=True)
    return {k: v for k, v in row.items() if k in ("identifier", "op", "changed", "old_values",
                                                    "new_values", "reason", "message")}


@main.command()
@click.argument("activation")
@click.option("--db", default=None,
              help="DuckDB file holding the state (ignored when CRISP_PIPELINE_STATE_URL is set).")
@click.option("--op", "ops", multiple=True,
              type=click.Choice(["create", "update", "delete", "release", "skip"]),
              help="Only these operations (repeatable).")
@click.option("--csv", "as_csv", is_flag=True, help="Every row as CSV, for a spreadsheet.")
@click.option("--limit", default=50, show_default=True, help="Rows shown (0: all).")
def changes(activation: str, db: str | None, ops: tuple[str, ...], as_csv: bool,
            limit: int) -> None:
    """The latest change set of ACTIVATION, row by row: identifier, op, changed fields with
    old and new values, and the reason of a skip (what the UI's preview samples)."""
    import polars as pl

    from crisp_pipeline.state.store import StateStore, connect_state

    frame = StateStore(connect_state(_db_path(db)), f"crisp_{activation}").read_change_set()
    if frame.is_empty():
        raise click.ClickException(f"no change set for {activation!r} yet: materialize its "
                                   "change_set asset first")
    if ops:
        frame = frame.filter(pl.col("op").is_in(list(ops)))
    frame = frame.select("identifier", "op", pl.col("changed").list.join(", "), "old_values",
                         "new_values", "reason", "message")
    if as_csv:
        click.echo(frame.write_csv(), nl=False)
        return
    shown = frame if limit <= 0 else frame.head(limit)
    with pl.Config(tbl_rows=-1, fmt_str_lengths=60, tbl_width_chars=160):
        click.echo(shown)
    if shown.height < frame.height:
        click.echo(f"{frame.height - shown.height} more row(s): --limit 0, or --csv")


@main.command()
@click.argument("activation")
@click.option("--db", default=None,
              help="DuckDB file holding the state (ignored when CRISP_PIPELINE_STATE_URL is set).")
@click.option("--batch-size", default=None, type=int,
              help="People per PATCH batch/data [default: the contract's maximum].")
def plan(activation: str, db: str | None, batch_size: int | None) -> None:
    """Show the latest change set of ACTIVATION and the requests it needs: by route, with and
    without batching, today's budget left for CRISP_TOKEN_IDENTIFIER, and days to finish."""
    import json
    import os

    from crisp_pipeline.changes.diff import counts_by_op
    from crisp_pipeline.changes.plan import request_plan
    from crisp_pipeline.crisp.config import daily_quota_from_env
    from crisp_pipeline.state.budget import remaining_today
    from crisp_pipeline.state.store import StateStore, connect_state
    from crisp_pipeline.sync.reconcile import full_reconcile_cost

    connect = connect_state(_db_path(db))
    store = StateStore(connect, f"crisp_{activation}")
    changes = store.read_change_set()
    if changes.is_empty() and not store.read("runs").height:
        raise click.ClickException(f"no change set for {activation!r} yet: materialize its "
                                   "change_set asset first")
    quota, token = daily_quota_from_env(), os.environ.get("CRISP_TOKEN_IDENTIFIER")
    options = {"batch_size": batch_size} if batch_size else {}
    figures = request_plan(changes, daily_quota=quota, **options,
                           budget_left=remaining_today(connect, token, quota) if token else None)
    stored = store.stored_configuration() or {}
    if stored.get("website_id"):
        figures["full_reconcile"] = full_reconcile_cost(
            StateStore(connect, f"crisp_{activation}", stored["website_id"]),
            list(stored.get("fields", {})))
    click.echo(json.dumps({"activation": activation, "people": counts_by_op(changes),
                           "plan": figures}, indent=2))


@main.command()
@click.argument("activation")
@click.option("--db", default=None,
              help="DuckDB file holding the state (ignored when CRISP_PIPELINE_STATE_URL is set).")
@click.option("--full", is_flag=True,
              help="Re-read every managed person, not only those due within the allowance.")
@click.option("--max-requests", default=500, show_default=True, type=int,
              help="Without --full: the most requests to spend (and at most a tenth of "
              "what the token has left today).")
def reconcile(activation: str, db: str | None, full: bool, max_requests: int) -> None:
    """Re-read ACTIVATION's people in Crisp now and correct its snapshot: people deleted in
    Crisp are forgotten (the next run re-creates or skips them), fields and emails edited in
    Crisp are noted (the next run writes the source's values back). Uses the configuration
    the last run kept and the CRISP_* variables; holds the activation's lock meanwhile."""
    import dataclasses
    import json
    import os
    import uuid

    from crisp_pipeline.activation import ReconcilePolicy
    from crisp_pipeline.crisp import CrispSettings, SettingsError, StopRun
    from crisp_pipeline.state import locks
    from crisp_pipeline.state.store import StateStore, connect_state
    from crisp_pipeline.sync.client import ClientOptions
    from crisp_pipeline.sync.reconcile import reconcile_snapshot

    connect = connect_state(_db_path(db))
    stored = StateStore(connect, f"crisp_{activation}").stored_configuration()
    if stored is None:
        raise click.ClickException(f"no state for {activation!r} yet: run it once first")
    try:
        settings = CrispSettings.from_env()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    if stored.get("website_id") and stored["website_id"] != os.environ.get("CRISP_WEBSITE_ID"):
        settings = dataclasses.replace(settings, website_id=stored["website_id"])
    store = StateStore(connect, f"crisp_{activation}", settings.website_id)
    run_id = f"cli-reconcile-{uuid.uuid4()}"
    try:
        locks.acquire(connect, activation, run_id, wait_seconds=0)
    except locks.ActivationLocked as error:
        raise click.ClickException(str(error)) from None
    try:
        report = reconcile_snapshot(store, list(stored["fields"]),
                                    ReconcilePolicy(verify_every_hours=0, max_requests=max_requests),
                                    run_id, lambda: settings, ClientOptions(), connect, full=full)
    except StopRun as error:
        raise click.ClickException(str(error)) from None
    finally:
        locks.release(connect, activation, run_id)
    click.echo(json.dumps({"activation": activation, **report.as_metadata()}, indent=2))


@main.command()
@click.option("--db", default=None,
              help="DuckDB file holding the state (ignored when CRISP_PIPELINE_STATE_URL is set).")
def status(db: str | None) -> None:
    """One line per activation: people managed, last sync and its figures."""
    import contextlib
    import os

    from crisp_pipeline.state.store import STATE_URL_ENV, connect_state, open_duckdb

    with contextlib.ExitStack() as stack:
        if os.environ.get(STATE_URL_ENV, "").strip():
            connection = stack.enter_context(connect_state(_db_path(db))())
        else:  # waits, as every step does, for a process holding the file (a run keeps it open)
            connection = open_duckdb(_db_path(db), {"access_mode": "READ_ONLY"})
            stack.callback(connection.close)
        schemas = [row[0] for row in connection.execute(
            "select distinct table_schema from information_schema.tables "
            "where table_schema like 'crisp\\_%' escape '\\' and table_name = 'snapshot' "
            "order by 1").fetchall()]
        for schema in schemas:
            managed = connection.execute(f'select count(*) from "{schema}".snapshot').fetchone()[0]
            last = connection.execute(
                f'select finished_at, dry_run, people_ok, people_rejected, people_deferred, '
                f'requests_sent from "{schema}".runs order by finished_at desc limit 1'
            ).fetchone() if connection.execute(
                "select count(*) from information_schema.tables where table_schema = ? "
                "and table_name = 'runs'", [schema]).fetchone()[0] else None
            where = f"last sync {last[0]:%Y-%m-%d %H:%M} UTC{' (dry run)' if last[1] else ''}: " \
                f"{last[2]} ok, {last[3]} rejected, {last[4]} deferred, {last[5]} requests" \
                if last else "never synced"
            click.echo(f"{schema.removeprefix('crisp_'):<24} {managed:>8} managed  {where}")


if __name__ == "__main__":
    main()
