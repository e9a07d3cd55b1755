"""Sending throughput of the real `crisp_sync` step, against a plain httpx loop with the same
concurrency and Crisp's official Python client in 16 threads: the same people-data writes,
against the emulator serving in its own process with 50 ms of latency per request.

    python bench/send_throughput.py                       # 2,000 writes a round, 1M snapshot
    python bench/send_throughput.py --writes 500 --snapshot 10000 --rounds 5

Setup: one emulator, three websites holding the same `--writes` people (one website per
contender, so that each does the whole work on its own people). The pipeline's activation
manages `--snapshot` people (default 1,000,000: its state is as large as a real one's); the
first `--writes` of them are the ones in Crisp.

Each round, every contender sets a new, distinct `score` on each of the `--writes` people
(distinct values: no batching, one `PATCH people/data/{id}` per person, the request every
contender sends):
- pipeline: the segment changes in DuckDB; the activation job runs through Dagster, in
  process; timed: its `crisp_sync` step (from the step's start to its end: the change set
  read, every request, recording and the budget, as a user's run does them);
- httpx: an asyncio loop over one `httpx.AsyncClient`, a semaphore of `--in-flight`, nothing
  recorded;
- official: `crisp-api`'s `update_people_data` in a pool of 16 threads, nothing recorded.
Contenders take turns within each round (the order rotates), median of `--rounds` (at least
5). After each round the three websites must hold the same data for every person.
Targets: pipeline >= 0.9x httpx, and above the official client. Last line:
`send_throughput: pipeline A.AAx httpx, B.BBx official (C writes/s)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from end_to_end import Runner, free_port, start_emulator

SITES = {"pipeline": "bench-pipeline", "httpx": "bench-httpx", "official": "bench-official"}
TOKEN_ID, TOKEN_KEY, ADMIN = "bench-id", "bench-key", "bench-admin"


def config_for():
    from crisp_pipeline.activation import ActivationConfig

    return ActivationConfig(name="send", segment={"sql": "select * from customers"},
                            mode="upsert", attributes=["score"],
                            reconcile={"max_requests": 0})


def seed(db_path: str, state_file: Path, people: int, writes: int, config) -> list[str]:
    """The segment (people x score), the activation's snapshot of all of them, and Crisp's
    three websites with the first `writes` of them. Returns their people_ids."""
    import duckdb
    import polars as pl

    from crisp_pipeline.changes.normalize import normalize_segment
    from crisp_pipeline.state.store import StateStore, connect_file, now

    segment = pl.DataFrame({"email": [f"s{i:08d}@bench.io" for i in range(people)],
                            "score": list(range(people))})
    with duckdb.connect(db_path) as connection:
        connection.register("frame", segment.to_arrow())
        connection.execute("create or replace table customers as select * from frame")
    accepted = normalize_segment(segment, config).accepted
    people_ids = [f"p-{i:08d}" for i in range(people)]
    store = StateStore(connect_file(db_path), config.state_schema, SITES["pipeline"])
    store.confirm(accepted.select("identifier", "email", "data.score").with_columns(
        pl.Series("people_id", people_ids), pl.lit(now()).alias("confirmed_at"),
        pl.lit("created").alias("origin"), pl.lit(now()).alias("verified_at")),
        list(config.managed_columns))
    created = int(time.time() * 1000) - 86_400_000
    crisp = [{"people_id": people_ids[i], "email": f"s{i:08d}@bench.io",
              "person": {"nickname": "S"}, "company": {}, "segments": [], "notepad": "",
              "active": {"now": False, "last": None}, "created_at": created,
              "updated_at": created, "data": {"score": i}} for i in range(writes)]
    state_file.write_text(json.dumps({"websites": {site: crisp for site in SITES.values()},
                                      "rng": None}))
    return people_ids[:writes]


def new_scores(writes: int, round_number: int) -> list[int]:
    return [i + (round_number + 1) * 10_000_000 for i in range(writes)]


def pipeline_round(runner: Runner, db_path: str, writes: int, round_number: int) -> float:
    import duckdb

    with duckdb.connect(db_path) as connection:  # the scores `new_scores` gives
        connection.execute(f"update customers set score = score % 10000000 + "
                           f"{(round_number + 1) * 10_000_000} where email < "
                           f"'s{writes:08d}@bench.io'")
    _, steps, sent = runner.run()
    assert sent == writes, f"the pipeline sent {sent} requests for {writes} writes"
    return steps["crisp_sync"]


async def httpx_round(base: str, people_ids: list[str], scores: list[int],
                      in_flight: int) -> float:
    limit = asyncio.Semaphore(in_flight)
    headers = {"X-Crisp-Tier": "plugin"}
    async with httpx.AsyncClient(auth=(TOKEN_ID, TOKEN_KEY), headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=in_flight)) as client:
        async def write(people_id: str, score: int) -> None:
            async with limit:
                response = await client.patch(
                    f"{base}website/{SITES['httpx']}/people/data/{people_id}",
                    json={"data": {"score": score}})
                response.raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(write(p, s) for p, s in zip(people_ids, scores, strict=True)))
        return time.perf_counter() - started


def official_round(port: int, people_ids: list[str], scores: list[int]) -> float:
    from crisp_api import Crisp

    def client() -> Crisp:
        crisp = Crisp()
        crisp.set_rest_host(f"http://127.0.0.1:{port}")
        crisp.authenticate(TOKEN_ID, TOKEN_KEY)
        crisp.set_tier("plugin")
        return crisp
    clients = [client() for _ in range(16)]

    def write(index: int) -> None:
        clients[index % 16].website.update_people_data(
            SITES["official"], people_ids[index], {"data": {"score": scores[index]}})
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(len(people_ids))))
    return time.perf_counter() - started


def crisp_data(port: int, site: str) -> dict[str, dict]:
    people = httpx.get(f"http://127.0.0.1:{port}/_emulator/people/{site}",
                       headers={"X-Emulator-Admin": ADMIN}, timeout=60).json()
    return {person["email"]: person.get("data", {}) for person in people}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--snapshot", type=int, default=1_000_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds: at least 5")
    with tempfile.TemporaryDirectory() as folder:
        db_path, state_file = f"{folder}/send.duckdb", Path(folder) / "crisp.json"
        os.environ["DAGSTER_HOME"] = folder
        config = config_for()
        print(f"{args.writes:,} writes a round, snapshot of {args.snapshot:,}: setting up ...",
              flush=True)
        people_ids = seed(db_path, state_file, args.snapshot, args.writes, config)
        port = free_port()
        emulator = start_emulator(port, state_file, extra=[
            "--website-id", SITES["httpx"], "--website-id", SITES["official"],
            "--admin-key", ADMIN, "--latency-ms", str(args.latency_ms),
            "--daily-quota", "100000000"], website=SITES["pipeline"], tier="plugin")
        base = f"http://127.0.0.1:{port}/v1/"
        try:
            for name, value in {"CRISP_API_URL": base, "CRISP_WEBSITE_ID": SITES["pipeline"],
                                "CRISP_TOKEN_IDENTIFIER": TOKEN_ID,
                                "CRISP_TOKEN_KEY": TOKEN_KEY, "CRISP_TIER": "plugin",
                                "CRISP_PIPELINE_DB": db_path,
                                "CRISP_DAILY_QUOTA": "100000000"}.items():
                os.environ[name] = value
            runner = Runner(db_path, config, max_in_flight=args.in_flight)
            _, _, sent = runner.run()
            assert sent == 0, f"the seeded state is not in sync: the first run sent {sent}"
            seconds = {name: [] for name in SITES}
            for round_number in range(args.rounds):
                scores = new_scores(args.writes, round_number)
                turns = list(SITES)[round_number % 3:] + list(SITES)[:round_number % 3]
                for name in turns:
                    if name == "pipeline":
                        seconds[name].append(pipeline_round(runner, db_path, args.writes,
                                                            round_number))
                    elif name == "httpx":
                        seconds[name].append(asyncio.run(httpx_round(
                            base, people_ids, scores, args.in_flight)))
                    else:
                        seconds[name].append(official_round(port, people_ids, scores))
                held = {name: crisp_data(port, site) for name, site in SITES.items()}
                expected = {f"s{i:08d}@bench.io": {"score": score}
                            for i, score in enumerate(scores)}
                for name, data in held.items():
                    assert data == expected, f"round {round_number}: {name}'s Crisp differs"
        finally:
            emulator.send_signal(signal.SIGINT)
            emulator.wait(timeout=60)
    rate = {name: args.writes / statistics.median(values) for name, values in seconds.items()}
    print(f"\n{args.writes:,} PATCH people/data a round, {args.latency_ms:.0f} ms latency, "
          f"{args.in_flight} in flight (official: 16 threads), median of {args.rounds}; "
          "final Crisp states equal after every round")
    for name in SITES:
        print(f"  {name:<9} {statistics.median(seconds[name]):7.2f} s  {rate[name]:8.1f} writes/s"
              f"  (rounds: {', '.join(f'{s:.2f}' for s in seconds[name])})")
    print(f"send_throughput: pipeline {rate['pipeline'] / rate['httpx']:.2f}x httpx, "
          f"{rate['pipeline'] / rate['official']:.2f}x official "
          f"({rate['pipeline']:.0f} writes/s); targets >= 0.90x httpx "
          f"({'met' if rate['pipeline'] >= 0.9 * rate['httpx'] else 'MISSED'}), > 1x official "
          f"({'met' if rate['pipeline'] > rate['official'] else 'MISSED'})")


if __name__ == "__main__":
    main()
