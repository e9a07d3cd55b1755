"""`crisp-pipeline demo`: a realistic warehouse, the local Crisp emulator, every activation of
this repository run twice with a change to the source in between, and what happened in Crisp.

The warehouse is the `demo` schema of the pipeline's DuckDB file (CRISP_PIPELINE_DB): a few
thousand customers, some with bad data (missing, malformed and duplicate emails, a NaN, an
overlong name). Some of them are already in Crisp before the first run, as in a real account.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from crisp_pipeline.emulator import EmulatorConfig, RunningEmulator, TokenSpec, start_in_thread

DEMO_WEBSITES = ("demo", "demo-newsletter")
# The sample needs more than a plugin token's default 5,000 requests a day to be created in
# one go (Crisp has no bulk create); the demo token is given a larger quota, as Crisp grants
# on request.
DEMO_QUOTA = 50_000
DEMO_TOKEN = TokenSpec("demo-plugin", "demo-plugin-key", "plugin", daily_quota=DEMO_QUOTA)
PLANS = ("free", "trial", "starter", "pro", "team", "enterprise")
PLAN_MRR = {"free": 0, "trial": 0, "starter": 29, "pro": 99, "team": 499, "enterprise": 2500}
FIRST = ("Ada", "Alan", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances",
         "John", "Radia", "Tim", "Katherine", "Guido", "Hedy", "Edsger")
LAST = ("Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie",
        "Allen", "Backus", "Perlman", "Berners-Lee", "Johnson", "van Rossum", "Lamarr", "Dijkstra")
COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell", None)


def generate_customers(count: int = 3000, seed: int = 42) -> pl.DataFrame:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    rows = []
    for user_id in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        plan = rng.choices(PLANS, weights=(30, 10, 20, 25, 10, 5))[0]
        email = f"{first}.{last}.{user_id}@example.com".lower().replace(" ", "")
        rows.append({
            "user_id": user_id, "email": email, "full_name": f"{first} {last}",
            "phone": f"+33 6 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}"
            if rng.random() < 0.6 else None,
            "company": rng.choice(COMPANIES), "plan": plan,
            "mrr": float(PLAN_MRR[plan]) * rng.choice((1, 1, 1, 2)),
            "signup_at": start + timedelta(days=rng.randint(0, 600), seconds=rng.randint(0, 86399)),
            "newsletter": rng.random() < 0.4,
            "updated_at": start,
        })
    # the bad data every warehouse has
    for index in rng.sample(range(count), count // 60):
        rows[index]["email"] = None
    for index in rng.sample(range(count), count // 100):
        if rows[index]["email"]:
            rows[index]["email"] = rows[index]["email"].replace("@", " (at) ")
    for index in rng.sample(range(count), count // 100):  # the same person twice, other case
        twin = dict(rows[index], user_id=count + index + 1)
        if twin["email"]:
            twin["email"] = twin["email"].upper()
        rows.append(twin)
    rows[7]["mrr"] = float("nan")
    rows[8]["full_name"] = "X" * 300
    return pl.DataFrame(rows)


def change_customers(customers: pl.DataFrame, seed: int = 7) -> pl.DataFrame:
    """A day later: plans and revenue change, phones are removed, people leave and arrive."""
    rng = random.Random(seed)
    rows = customers.to_dicts()
    later = datetime(2024, 1, 2, tzinfo=UTC)
    for row in rng.sample(rows, len(rows) // 20):
        row["plan"] = rng.choice(PLANS)
        row["mrr"] = float(PLAN_MRR[row["plan"]])
        row["updated_at"] = later
    for row in rng.sample(rows, len(rows) // 50):
        row["phone"] = None
        row["updated_at"] = later
    for row in rng.sample(rows, len(rows) // 50):  # leave the newsletter
        row["newsletter"] = False
        row["updated_at"] = later
    gone = set(rng.sample(range(len(rows)), len(rows) // 100))  # leave entirely
    rows = [row for index, row in enumerate(rows) if index not in gone]
    first_new = max(row["user_id"] for row in rows) + 1
    for user_id in range(first_new, first_new + len(rows) // 50):  # new customers
        rows.append({"user_id": user_id, "email": f"new.customer.{user_id}@example.com",
                     "full_name": f"New Customer {user_id}", "phone": None, "company": "Acme",
                     "plan": "pro", "mrr": 99.0, "signup_at": later, "newsletter": True,
                     "updated_at": later})
    return pl.DataFrame(rows, schema=customers.schema)


def write_warehouse(db_path: str, customers: pl.DataFrame) -> None:
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    connection = duckdb.connect(db_path)
    try:
        connection.execute("create schema if not exists demo_warehouse")
        connection.register("customers_frame", customers.to_arrow())
        connection.execute("create or replace table demo_warehouse.customers as "
                           "select * from customers_frame")
    finally:
        connection.close()


def reset_state(db_path: str, activations: list[str]) -> None:
    """Forget earlier demo runs: the demo warehouse and the demo activations' state only."""
    if not Path(db_path).exists():
        return
    connection = duckdb.connect(db_path)
    try:
        for schema in ["demo_warehouse", *(f"crisp_{name}" for name in activations)]:
            connection.execute(f'drop schema if exists "{schema}" cascade')
    finally:
        connection.close()


def start_emulator(customers: pl.DataFrame, state_file: str | None = None,
                   port: int = 0) -> RunningEmulator:
    """The emulator, with one customer in ten already in Crisp (some with stale data)."""
    running = start_in_thread(EmulatorConfig(
        website_ids=list(DEMO_WEBSITES), tokens=[DEMO_TOKEN], seed=1,
        state_file=Path(state_file) if state_file else None), port=port)
    store = running.emulator.store
    if not store.count(DEMO_WEBSITES[0]):
        for row in customers.filter(pl.col("email").is_not_null()).gather_every(10).to_dicts():
            email = row["email"].lower()
            if "@" not in email or " " in email or store.has_email(DEMO_WEBSITES[0], email):
                continue
            people_id = store.create(DEMO_WEBSITES[0], {
                "email": email, "person": {"nickname": row["full_name"].split()[0]}})
            store.save_data(DEMO_WEBSITES[0], people_id, {"plan": "legacy", "source": "chatbox"})
    return running


def crisp_environment(running: RunningEmulator) -> dict[str, str]:
    return {"CRISP_API_URL": running.base_url, "CRISP_WEBSITE_ID": DEMO_WEBSITES[0],
            "CRISP_TOKEN_IDENTIFIER": DEMO_TOKEN.identifier, "CRISP_TOKEN_KEY": DEMO_TOKEN.key,
            "CRISP_TIER": DEMO_TOKEN.tier, "CRISP_DAILY_QUOTA": str(DEMO_QUOTA)}


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class RunLine:
    activation: str
    run: int
    success: bool
    created: int = 0
    updated: int = 0
    deleted: int = 0
    skipped: int = 0
    rejected_rows: int = 0
    failed_writes: int = 0
    requests: int = 0
    writes: int = 0
    seconds: float = 0.0
    note: str = ""


def _value(metadata: dict, key: str, default=0):
    entry = metadata.get(key)
    return entry.value if entry is not None else default


def run_activations(run: int, instance) -> list[RunLine]:
    from crisp_pipeline.definitions import defs
    from crisp_pipeline.orchestration.metadata import refusal_of

    definitions = defs()
    lines = []
    for job in sorted(definitions.resolve_all_job_defs(), key=lambda j: j.name):
        if not job.name.endswith("_job") or job.name.startswith("__"):
            continue
        name = job.name.removesuffix("_job")
        started = time.monotonic()
        result = job.execute_in_process(instance=instance, raise_on_error=False,
                                        run_config=QUIET)
        line = RunLine(name, run, result.success, seconds=time.monotonic() - started)

        def metadata(asset: str) -> dict:
            found = result.asset_materializations_for_node(f"{name}__{asset}")
            return found[0].metadata if found else {}
        segment, snapshot = metadata("segment"), metadata("crisp_snapshot")
        sync = metadata("crisp_sync")
        outcomes = (_value(sync, "outcomes", {}) or {})
        line.created = outcomes.get("create_ok", 0)
        line.updated = outcomes.get("update_ok", 0)
        line.deleted = outcomes.get("delete_ok", 0)
        line.skipped = _value(metadata("change_set"), "skips")
        line.rejected_rows = _value(segment, "rejected_rows")
        line.failed_writes = _value(sync, "people_rejected") + _value(sync, "people_deferred")
        line.requests = _value(snapshot, "requests_sent") + _value(sync, "requests_sent")
        line.writes = _value(sync, "write_requests")
        refused = refusal_of(result, name)
        if refused:
            line.note = f"REFUSED: {refused}"
        if not result.success:
            line.note = "FAILED: " + next(
                (str(e.step_failure_data.user_failure_data.description
                     if e.step_failure_data.user_failure_data else
                     e.step_failure_data.error.message)
                 for e in result.all_events if e.is_step_failure), "the run failed")
        lines.append(line)
    return lines


def format_lines(lines: list[RunLine]) -> str:
    header = (f"{'activation':<22}{'run':>4}{'created':>9}{'updated':>9}{'deleted':>9}"
              f"{'skipped':>9}{'rejected':>10}{'failed':>8}{'requests':>10}{'writes':>8}"
              f"{'secs':>7}")
    body = [f"{l.activation:<22}{l.run:>4}{l.created:>9}{l.updated:>9}{l.deleted:>9}"
            f"{l.skipped:>9}{l.rejected_rows:>10}{l.failed_writes:>8}{l.requests:>10}"
            f"{l.writes:>8}{l.seconds:>7.1f}" + (f"  {l.note}" if l.note else "")
            for l in lines]
    return "\n".join([header, *body])


def demo_home(db_path: str) -> str:
    """Where the demo records its runs, so that `dg dev` shows them afterwards: DAGSTER_HOME
    when set, else `dagster_home` beside the DuckDB file, with the project's instance
    settings (`dagster.yaml`: one run per activation) when run from the project."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path(db_path).resolve().parent /
                "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings, shipped = home / "dagster.yaml", Path.cwd() / "dagster.yaml"
    if not settings.exists() and shipped.is_file():
        shutil.copyfile(shipped, settings)
    return str(home)


def run_demo(db_path: str, count: int = 3000, serve: bool = False, echo=print) -> list[RunLine]:
    import dagster as dg

    from crisp_pipeline.definitions import defs

    os.environ["CRISP_PIPELINE_DB"] = db_path
    activations = [job.name.removesuffix("_job") for job in defs().resolve_all_job_defs()
                   if job.name.endswith("_job") and not job.name.startswith("__")]
    reset_state(db_path, activations)
    customers = generate_customers(count)
    write_warehouse(db_path, customers)
    running = start_emulator(customers)
    os.environ.update(crisp_environment(running))
    home = demo_home(db_path)
    instance = dg.DagsterInstance.from_config(home)
    echo(f"Warehouse: {db_path} (table demo_warehouse.customers, {customers.height} rows). "
         f"Crisp emulator: {running.base_url} ({running.emulator.store.count('demo')} people "
         "already in website 'demo').")
    try:
        first = run_activations(1, instance)
        echo("\nFirst run: every activation against the warehouse as it is.")
        echo(format_lines(first))
        write_warehouse(db_path, change_customers(customers))
        second = run_activations(2, instance)
        echo("\nA day later the warehouse changed (plans, phones, newsletter, arrivals, "
             "departures). Second run:")
        echo(format_lines(second))
        third = run_activations(3, instance)
        echo("\nThird run, nothing changed since: no write is sent.")
        echo(format_lines(third))
        echo(f"\nThe runs are in the Dagster instance at {home}: to see them in the UI,\n"
             f"  export DAGSTER_HOME={home} CRISP_PIPELINE_DB={db_path} && dg dev\n"
             "(add `--serve` to this command to keep the emulator up for new runs).")
        echo("\nChange sets, outcomes and snapshots are tables in the DuckDB file, e.g.\n"
             f"  python -c \"import duckdb; print(duckdb.connect('{db_path}').sql("
             "'select run_id, op, count(*) from crisp_paying_customers.change_set_history "
             "group by all order by all'))\"")
        if serve:
            echo("\nThe emulator keeps serving. In another shell:\n" + "\n".join(
                f"  export {k}={v}" for k, v in {**crisp_environment(running),
                                                 "CRISP_PIPELINE_DB": db_path}.items())
                 + "\n  dg dev\nCtrl-C stops the emulator.")
            while True:
                time.sleep(3600)
        return first + second + third
    finally:
        running.stop()
