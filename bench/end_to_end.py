"""End to end: what a user feels. A whole activation run (every asset and check, through
Dagster, in process) on a large segment that Crisp already holds, against the floor measured
in the same process: reading the segment query into Polars.

    python bench/end_to_end.py                     # 1,000,000 people x 20 attributes
    python bench/end_to_end.py --people 10000000   # 10M (Crisp then holds only the people
                                                   # the trials change: see `seed_state`)

Setup, as cheaply as it honestly can: the segment is written into a DuckDB table; the
emulator (its own process, no quota, no rate limit) starts from a state file holding every
person with the segment's values; the activation's snapshot is written from the segment as the
pipeline normalises it, with the emulator's people_ids. A first run then checks that the state
is truly synced (it must send 0 requests).

Measured, interleaved, median of `--trials` (at least 5):
- floor: `select ... from customers` into Polars;
- no-change run: the whole job, 0 requests expected;
- 1% change run: 1% of the people move to a new plan (one attribute, the same new value for
  all: what a real plan change looks like), which the run sends in `PATCH batch/data`.
Then: per-asset times, peak RSS of this process during the runs, and the DuckDB file's growth
over 10 runs. Last line:
`end_to_end: no-change A.Ax floor, 1% change B.Bx floor, peak C.C GiB, state growth D.Dx`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
from datasets import bench_arguments

GIB = 1024 ** 3
WEBSITE, TOKEN_ID, TOKEN_KEY = "bench", "bench-id", "bench-key"
STEPS = ("segment", "segment_segment_usable", "crisp_snapshot", "change_set", "crisp_sync",
         "crisp_sync_no_failed_writes")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def make_segment(people: int, attributes: int) -> pl.DataFrame:
    """Customers with a realistic mix of attribute types: strings, integers, floats, booleans,
    dates."""
    rng = np.random.default_rng(7)
    columns: dict[str, object] = {"email": [f"c{i:08d}@example.com" for i in range(people)],
                                  "full_name": [f"Customer {i}" for i in range(people)]}
    kinds = ["plan", "int", "float", "bool", "text"]
    for index in range(attributes):
        kind = kinds[index % len(kinds)]
        name = f"attr_{index:02d}"
        if kind == "plan":
            columns[name] = rng.choice(["free", "starter", "pro", "team"], people)
        elif kind == "int":
            columns[name] = rng.integers(0, 100_000, people)
        elif kind == "float":
            columns[name] = np.round(rng.random(people) * 1000, 2)
        elif kind == "bool":
            columns[name] = rng.random(people) < 0.5
        else:
            columns[name] = [f"t{v}" for v in rng.integers(0, 1000, people)]
    return pl.DataFrame(columns)


def config_for(attributes: int):
    from crisp_pipeline.activation import ActivationConfig

    return ActivationConfig(
        name="e2e", segment={"sql": "select * from customers"}, mode="upsert",
        fields={"person.nickname": "full_name"},
        attributes=[f"attr_{i:02d}" for i in range(attributes)],
        reconcile={"max_requests": 0})  # the runs measure the sync, not re-reading Crisp


def seed_in_child(db_path: str, state_file: Path, people: int, attributes: int,
                  only_changing: int | None) -> None:
    seed_state(db_path, state_file, make_segment(people, attributes), config_for(attributes),
               only_changing)


def seed_state(db_path: str, state_file: Path, segment: pl.DataFrame, config,
               only_changing: int | None = None) -> None:
    """Crisp and the snapshot as a first sync would leave them. With `only_changing`, Crisp
    holds only the people the first `only_changing` trials change (`change_one_percent`):
    the runs send requests for no one else, and ten million people would not fit in the
    emulator's memory."""
    from crisp_pipeline.changes.normalize import normalize_segment
    from crisp_pipeline.state.store import StateStore, connect_file, now

    with duckdb.connect(db_path) as connection:
        connection.register("frame", segment.to_arrow())
        connection.execute("create or replace table customers as select * from frame")
    normalized = normalize_segment(segment, config)
    accepted = normalized.accepted
    fields = list(config.managed_columns)
    people_ids = [f"p-{i:08d}" for i in range(accepted.height)]
    created = int(time.time() * 1000) - 86_400_000
    data_fields = [f for f in fields if f.startswith("data.")]
    held = accepted.with_columns(pl.Series("people_id", people_ids))
    if only_changing is not None:
        with duckdb.connect(db_path) as connection:
            changing = connection.execute(
                f"select email from customers where hash(email) % 100 < {only_changing}").pl()
        held = held.join(changing.select(pl.col("email").str.to_lowercase()), on="email",
                         how="semi")
    decoded = held.select(*[pl.col(f) for f in fields]).rows()
    people = []
    for people_id, email, values in zip(held.get_column("people_id"), held.get_column("email"),
                                        decoded, strict=True):
        by_field = dict(zip(fields, (json.loads(v) for v in values), strict=True))
        people.append({
            "people_id": people_id, "email": email,
            "person": {"nickname": by_field["person.nickname"]}, "company": {},
            "segments": [], "notepad": "", "active": {"now": False, "last": None},
            "created_at": created, "updated_at": created,
            "data": {f[5:]: by_field[f] for f in data_fields if by_field[f] is not None}})
    state_file.write_text(json.dumps({"websites": {WEBSITE: people}, "rng": None}))
    store = StateStore(connect_file(db_path), config.state_schema, WEBSITE)
    snapshot = accepted.select("identifier", "email", *fields).with_columns(
        pl.Series("people_id", people_ids), pl.lit(now()).alias("confirmed_at"),
        pl.lit("created").alias("origin"), pl.lit(now()).alias("verified_at"))
    for start in range(0, snapshot.height, 1_000_000):  # bounded memory at 10M
        store.confirm(snapshot.slice(start, 1_000_000), fields)


def start_emulator(port: int, state_file: Path, extra: list[str] = (), website: str = WEBSITE,
                   tier: str = "user") -> subprocess.Popen:
    """The emulator in its own process, starting from `state_file` (never written back)."""
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "crisp_pipeline.cli", "emulator", "--port", str(port),
         "--website-id", website, "--token", f"{TOKEN_ID}:{TOKEN_KEY}", "--tier", tier,
         "--rate-limit", "0", "--load", str(state_file), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return process
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError("the emulator exited")
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the emulator did not start")


class Runner:
    def __init__(self, db_path: str, config, max_in_flight: int | None = None) -> None:
        import dagster as dg

        from crisp_pipeline.component import (
            CrispResource,
            build_activation_defs,
            default_resources,
        )

        self.db_path = db_path
        self.instance = dg.DagsterInstance.ephemeral()
        resources = default_resources(db_path)
        if max_in_flight is not None:
            resources["crisp"] = CrispResource(max_in_flight=max_in_flight)
        defs = dg.Definitions.merge(build_activation_defs(config),
                                    dg.Definitions(resources=resources))
        self.job = defs.resolve_job_def(f"{config.name}_job")
        self.name = config.name

    def run(self) -> tuple[float, dict[str, float], int]:
        """(seconds, seconds per step, requests sent)."""
        started = time.perf_counter()
        result = self.job.execute_in_process(instance=self.instance, raise_on_error=True,
                                             run_config={"loggers": {"console": {"config": {
                                                 "log_level": "WARNING"}}}})
        seconds = time.perf_counter() - started
        per_step: dict[str, float] = {}
        begun: dict[str, float] = {}
        for record in self.instance.all_logs(result.run_id):
            event = record.dagster_event
            if event is None:
                continue
            key = (event.step_key or "").removeprefix(f"{self.name}__")
            if event.event_type_value == "STEP_START":
                begun[key] = record.timestamp
            elif event.event_type_value == "STEP_SUCCESS" and key in begun:
                per_step[key] = record.timestamp - begun[key]
        sync = result.asset_materializations_for_node(f"{self.name}__crisp_sync")
        sent = sync[0].metadata["requests_sent"].value if sync else -1
        return seconds, per_step, int(sent)


def floor(db_path: str) -> float:
    started = time.perf_counter()
    with duckdb.connect(db_path) as connection:
        frame = connection.sql("select * from customers").pl()
    seconds = time.perf_counter() - started
    del frame
    return seconds


def change_one_percent(db_path: str, trial: int) -> None:
    with duckdb.connect(db_path) as connection:
        connection.execute(f"update customers set attr_00 = 'plan-{trial}' where "
                           f"hash(email) % 100 = {trial % 100}")


def main() -> None:
    args = bench_arguments(__doc__)
    with tempfile.TemporaryDirectory() as folder:
        db_path, state_file = f"{folder}/e2e.duckdb", Path(folder) / "crisp.json"
        os.environ["DAGSTER_HOME"] = folder
        config = config_for(args.attributes)
        print(f"{args.people:,} people x {args.attributes} attributes: setting up ...",
              flush=True)
        only_changing = args.trials if args.people > 2_000_000 else None
        if only_changing:
            print(f"  Crisp holds the {only_changing}% of people the trials change", flush=True)
        # seeded in a child process: the runs' peak memory is measured in a process that
        # never held the seeding's frames (a user's run worker never does either)
        seeding = multiprocessing.get_context("spawn").Process(
            target=seed_in_child, args=(db_path, state_file, args.people, args.attributes,
                                        only_changing))
        seeding.start()
        seeding.join()
        assert seeding.exitcode == 0, f"seeding failed ({seeding.exitcode})"
        port = free_port()
        emulator = start_emulator(port, state_file)
        try:
            for name, value in {"CRISP_API_URL": f"http://127.0.0.1:{port}/v1/",
                                "CRISP_WEBSITE_ID": WEBSITE, "CRISP_TOKEN_IDENTIFIER": TOKEN_ID,
                                "CRISP_TOKEN_KEY": TOKEN_KEY, "CRISP_TIER": "user",
                                "CRISP_PIPELINE_DB": db_path}.items():
                os.environ[name] = value
            runner = Runner(db_path, config)
            _, _, sent = runner.run()
            assert sent == 0, f"the seeded state is not in sync: the first run sent {sent}"
            size_after_first = os.path.getsize(db_path)
            print(f"  measuring: {args.trials} trials, floor and runs interleaved", flush=True)
            runs = 1
            floors, still, changed = [], [], []
            still_steps, changed_steps = [], []
            reset_peak()
            for trial in range(args.trials):
                floors.append(floor(db_path))
                seconds, steps, sent = runner.run()
                assert sent == 0, f"a run with no change sent {sent} requests"
                still.append(seconds)
                still_steps.append(steps)
                change_one_percent(db_path, trial)
                seconds, steps, sent = runner.run()
                # one batch request per 500 people of the 1% (the same new plan for all)
                assert 0 < sent <= args.people // 100 // 500 + 10, \
                    f"a 1% plan change sent {sent} requests"
                changed.append(seconds)
                changed_steps.append(steps)
                runs += 2
            peak = peak_rss()
            while runs < 10:
                runner.run()
                runs += 1
            growth = os.path.getsize(db_path) / size_after_first
        finally:
            emulator.send_signal(signal.SIGINT)
            emulator.wait(timeout=60)
    base = statistics.median(floors)
    print(f"\nfloor (segment query into Polars): {base:.3f} s")
    print(f"{'step':<30} {'no change':>10} {'1% change':>10}")
    for step in STEPS:
        a = statistics.median(s.get(step, 0.0) for s in still_steps)
        b = statistics.median(s.get(step, 0.0) for s in changed_steps)
        print(f"{step:<30} {a:>9.3f}s {b:>9.3f}s")
    a, b = statistics.median(still), statistics.median(changed)
    print(f"{'whole run':<30} {a:>9.3f}s {b:>9.3f}s")
    print(f"state file: {size_after_first / 2**20:.0f} MiB after run 1, "
          f"{size_after_first * growth / 2**20:.0f} MiB after run {runs}")
    print(f"end_to_end: no-change {a / base:.1f}x floor, 1% change {b / base:.1f}x floor, "
          f"peak {peak / GIB:.1f} GiB, state growth {growth:.1f}x")


if __name__ == "__main__":
    main()
