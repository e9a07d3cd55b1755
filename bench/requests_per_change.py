"""Requests per change: what a sequence of realistic syncs costs in Crisp requests, through
the real pipeline (Dagster job, emulator over HTTP), with batching, without batching
(`batch_size: 1`), and for a naive script that writes every person on every run with Crisp's
official client (find by email, create if missing, save data) -- what many teams run today.

    python bench/requests_per_change.py              # 2,000 people
    python bench/requests_per_change.py --people 5000

Scenarios, in order: first sync (every person new, 5 plans), 20% move to another plan,
5% get an individual change, nothing changes, 2% arrive.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

import duckdb
import polars as pl

PLANS = ["free", "starter", "pro", "team", "enterprise"]
WEBSITES = ("batched", "one-by-one", "naive")
TOKEN = ("bench-id", "bench-key")


def scenarios(people: int, seed: int = 3) -> list[tuple[str, list[dict]]]:
    rng = random.Random(seed)
    rows = [{"email": f"u{i:05d}@bench.io", "name": f"User {i}", "plan": rng.choice(PLANS),
             "score": rng.randint(0, 100)} for i in range(people)]
    steps = [("first sync", [dict(r) for r in rows])]
    for row in rng.sample(rows, people // 5):
        row["plan"] = rng.choice(PLANS)
    steps.append(("20% change plan", [dict(r) for r in rows]))
    for row in rng.sample(rows, people // 20):
        row["score"] += 1
    steps.append(("5% individual change", [dict(r) for r in rows]))
    steps.append(("no change", [dict(r) for r in rows]))
    rows += [{"email": f"n{i:05d}@bench.io", "name": f"New {i}", "plan": "pro", "score": 0}
             for i in range(people // 50)]
    steps.append(("2% arrive", [dict(r) for r in rows]))
    return steps


def naive_sync(client, website: str, rows: list[dict]) -> None:
    from crisp_api.errors.route import RouteError

    for row in rows:
        try:
            people_id = client.website.get_people_profile(website, row["email"])["people_id"]
        except RouteError:
            people_id = client.website.add_new_people_profile(
                website, {"email": row["email"], "person": {"nickname": row["name"]}})["people_id"]
        client.website.save_people_data(website, people_id,
                                        {"data": {"plan": row["plan"], "score": row["score"]}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=2000)
    args = parser.parse_args()

    import dagster as dg
    from crisp_api import Crisp

    from crisp_pipeline.activation import ActivationConfig
    from crisp_pipeline.component import build_activation_defs, default_resources
    from crisp_pipeline.emulator import EmulatorConfig, TokenSpec, start_in_thread

    running = start_in_thread(EmulatorConfig(
        website_ids=list(WEBSITES), tokens=[TokenSpec(*TOKEN, "plugin", daily_quota=10**8)],
        rate_limit_per_second=None))
    os.environ.update(CRISP_API_URL=running.base_url, CRISP_TOKEN_IDENTIFIER=TOKEN[0],
                      CRISP_TOKEN_KEY=TOKEN[1], CRISP_TIER="plugin",
                      CRISP_DAILY_QUOTA=str(10**8), CRISP_WEBSITE_ID=WEBSITES[0])
    workdir = Path(tempfile.mkdtemp())
    db = str(workdir / "bench.duckdb")
    jobs = {}
    for website, batch_size in (("batched", 500), ("one-by-one", 1)):
        config = ActivationConfig(name=website.replace("-", "_"), segment={"table": "people"},
                                  website_id=website, fields={"person.nickname": "name"},
                                  attributes=["plan", "score"], batch_size=batch_size)
        definitions = dg.Definitions.merge(build_activation_defs(config),
                                           dg.Definitions(resources=default_resources(db)))
        jobs[website] = definitions.resolve_job_def(f"{config.name}_job")
    official = Crisp()
    official.set_rest_host(running.root_url)
    official.authenticate(*TOKEN)
    official.set_tier("plugin")
    instance = dg.DagsterInstance.ephemeral()
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

    def spent(website: str, since: int) -> int:
        return sum(1 for e in running.emulator.requests()[since:] if f"/{website}/" in e.path)

    print(f"requests per run, {args.people:,} people, against the emulator")
    print(f"  {'scenario':<22}{'changed':>9}{'batched':>10}{'one-by-one':>12}{'naive':>9}"
          f"{'per change':>12}")
    totals = dict.fromkeys(WEBSITES, 0)
    previous = {}
    for name, rows in scenarios(args.people):
        connection = duckdb.connect(db)
        connection.register("rows", pl.DataFrame(rows).to_arrow())
        connection.execute("create or replace table people as select * from rows")
        connection.close()
        counts = {}
        for website, job in jobs.items():
            mark = len(running.emulator.requests())
            assert job.execute_in_process(instance=instance, run_config=quiet).success
            counts[website] = spent(website, mark)
        mark = len(running.emulator.requests())
        naive_sync(official, "naive", rows)
        counts["naive"] = spent("naive", mark)
        changed = sum(1 for r in rows if previous.get(r["email"]) != r)
        previous = {r["email"]: r for r in rows}
        per_change = f"{counts['batched'] / changed:.2f}" if changed else "-"
        print(f"  {name:<22}{changed:>9}{counts['batched']:>10}{counts['one-by-one']:>12}"
              f"{counts['naive']:>9}{per_change:>12}")
        for website in WEBSITES:
            totals[website] += counts[website]
    states = {w: {p["email"]: p["data"] for p in running.emulator.people(w)} for w in WEBSITES}
    assert states["batched"] == states["one-by-one"] == states["naive"], "final states differ"
    print(f"  {'total':<22}{'':>9}{totals['batched']:>10}{totals['one-by-one']:>12}"
          f"{totals['naive']:>9}")
    print(f"  batching saves {1 - totals['batched'] / totals['one-by-one']:.0%} of one-by-one's "
          f"requests and {1 - totals['batched'] / totals['naive']:.0%} of the naive script's; "
          "all three end in the same Crisp state")
    running.stop()


if __name__ == "__main__":
    main()
