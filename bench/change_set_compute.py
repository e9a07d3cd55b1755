"""Change-set compute: the pipeline's diff against two equally complete baselines, on the same
data, outputs checked equal.

    python bench/change_set_compute.py                        # 1,000,000 people x 20 attributes
    python bench/change_set_compute.py --people 10000000 --repeats 5

Data: N people x K attributes in the pipeline's JSON-text form, as the state holds them: the
staged segment and the snapshot, each row with its stored `row_hash` (computed by the state
store when the row is written, so outside the timing). 5% of the people changed (one
attribute each), 2% are new, 2% gone; mirror mode, so the gone are deletions.

Contenders, each producing the whole change set (identifier, email, people_id, op, changed
fields, old and new values and the people-data payload to send, as JSON objects):
- pipeline: what the `change_set` asset does: the identifiers whose row hashes differ, then
  `changes.diff.plan_changes` on those rows only;
- row_hash: a plain Polars diff over the same stored row hashes, written for this benchmark
  (classify by hash, compare the differing rows field by field);
- duckdb: the same in DuckDB SQL over the same Arrow tables (hash filter, `list_filter` for
  the changed fields, `json_object` text built in SQL).

Each contender lives in its own process (so its peak memory is its own) and they are timed in
turns, round after round (interleaved, so machine load moves them alike); median of
`--repeats` (at least 5). Every contender's output is checked equal to the pipeline's, as
sets of rows of every column above, values parsed from their JSON.
Targets: the pipeline at least as fast as row_hash and faster than duckdb.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from datasets import bench_arguments

GIB = 1024 ** 3
ROW_HASH_SEED = 17  # as crisp_pipeline.state.store hashes rows


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM")


def stored_frames(people: int, attributes: int):
    """(segment, snapshot, fields) with the row hashes the state store keeps."""
    import polars as pl
    from datasets import make_frames

    segment, snapshot = make_frames(people, attributes)
    fields = [c for c in segment.columns if c.startswith("data.")]
    hashed = ["identifier", "email", *fields]
    segment = segment.with_columns(
        segment.select(hashed).hash_rows(seed=ROW_HASH_SEED).alias("row_hash"))
    snapshot = snapshot.with_columns(
        snapshot.select(hashed).hash_rows(seed=ROW_HASH_SEED).alias("row_hash"),
        pl.lit("created").alias("origin"))
    return segment, snapshot, fields


def pipeline_diff(segment, snapshot, fields):
    import polars as pl
    from datasets import config_for

    from crisp_pipeline.changes.diff import plan_changes

    rejected = pl.DataFrame(schema={"row_number": pl.Int64, "identifier": pl.String,
                                    "email": pl.String, "field": pl.String,
                                    "reason": pl.String, "message": pl.String})
    config = config_for(len(fields)).model_copy(update={"mode": "mirror"})

    def run():
        # the state store's `differing_rows`, over the same stored hashes
        differing = (segment.select("identifier", "row_hash")
                     .join(snapshot.select("identifier", "row_hash"), on="identifier",
                           how="full", coalesce=True)
                     .filter(pl.col("row_hash").ne_missing(pl.col("row_hash_right")))
                     .get_column("identifier").implode())
        new = segment.filter(pl.col("identifier").is_in(differing))
        old = snapshot.filter(pl.col("identifier").is_in(differing))
        planned = plan_changes(new, rejected, old, config,
                               managed_emails=snapshot.get_column("email"))
        return planned.change_set.select(*OUTPUT)
    return run


def row_hash_diff(segment, snapshot, fields):
    import polars as pl

    def obj(prefix: str, mask, key=lambda f: f) -> pl.Expr:
        parts = [pl.when(mask(f)).then(pl.format('"{}":{}', pl.lit(key(f)), pl.col(prefix + f)))
                 for f in fields]
        body = pl.concat_str(parts, separator=",", ignore_nulls=True).fill_null("")
        return pl.concat_str([pl.lit("{"), body, pl.lit("}")])

    def run():
        keys = (segment.select("identifier", pl.col("row_hash").alias("h_new"))
                .join(snapshot.select("identifier", pl.col("row_hash").alias("h_old")),
                      on="identifier", how="full", coalesce=True)
                .filter(pl.col("h_new").ne_missing(pl.col("h_old"))))
        both = (keys.join(segment.select("identifier", pl.col("email").alias("n_email"),
                                         *[pl.col(f).alias("n:" + f) for f in fields]),
                          on="identifier", how="left")
                .join(snapshot.select("identifier", "people_id",
                                      pl.col("email").alias("o_email"),
                                      *[pl.col(f).alias("o:" + f) for f in fields]),
                      on="identifier", how="left"))
        differs = {f: pl.col("n:" + f).ne_missing(pl.col("o:" + f)) for f in fields}
        every = lambda f: pl.lit(True)
        op = (pl.when(pl.col("h_old").is_null()).then(pl.lit("create"))
              .when(pl.col("h_new").is_null()).then(pl.lit("delete"))
              .otherwise(pl.lit("update")))
        changed = pl.concat_list([pl.when(differs[f]).then(pl.lit(f)) for f in fields]
                                 ).list.drop_nulls()
        key = lambda f: f.removeprefix("data.")
        return both.select(
            "identifier", pl.coalesce("n_email", "o_email").alias("email"), "people_id",
            op.alias("op"),
            pl.when(op == "delete").then(pl.lit([], pl.List(pl.String))).otherwise(changed)
            .alias("changed"),
            pl.when(op == "create").then(None).when(op == "delete")
            .then(obj("o:", every)).otherwise(obj("o:", differs.get)).alias("old_values"),
            pl.when(op == "delete").then(None).when(op == "create")
            .then(obj("n:", every)).otherwise(obj("n:", differs.get)).alias("new_values"),
            pl.when(op == "delete").then(None).when(op == "create")
            .then(obj("n:", every, key)).otherwise(obj("n:", differs.get, key))
            .alias("data_values"))
    return run


def duckdb_diff(segment, snapshot, fields):
    import duckdb

    connection = duckdb.connect()
    connection.register("seg", segment.to_arrow())
    connection.register("snap", snapshot.to_arrow())

    def q(name: str) -> str:
        return '"' + name + '"'

    differs = {f: f"n.{q(f)} is distinct from o.{q(f)}" for f in fields}
    changed = ", ".join(f"case when {differs[f]} then '{f}' end" for f in fields)

    def obj(side: str, every: bool, data_keys: bool = False) -> str:
        def key(f: str) -> str:
            return f.removeprefix("data.") if data_keys else f
        parts = ", ".join(
            f"case when {'true' if every else differs[f]} then '\"{key(f)}\":' || "
            f"{side}.{q(f)} end" for f in fields)
        return f"'{{' || concat_ws(',', {parts}) || '}}'"

    sql = f"""
        select coalesce(n.identifier, o.identifier) as identifier,
          coalesce(n.email, o.email) as email, o.people_id,
          case when o.identifier is null then 'create'
               when n.identifier is null then 'delete' else 'update' end as op,
          case when n.identifier is null then []::varchar[]
               else list_filter([{changed}], x -> x is not null) end as changed,
          case when o.identifier is null then null when n.identifier is null
               then {obj("o", True)} else {obj("o", False)} end as old_values,
          case when n.identifier is null then null when o.identifier is null
               then {obj("n", True)} else {obj("n", False)} end as new_values,
          case when n.identifier is null then null when o.identifier is null
               then {obj("n", True, True)} else {obj("n", False, True)} end as data_values
        from seg n full outer join snap o on n.identifier = o.identifier
        where n.row_hash is distinct from o.row_hash
    """

    def run():
        return connection.sql(sql).pl()
    return run


CONTENDERS = {"pipeline": pipeline_diff, "row_hash": row_hash_diff, "duckdb": duckdb_diff}


OUTPUT = ("identifier", "email", "people_id", "op", "changed", "old_values", "new_values",
          "data_values")


def canonical(frame) -> set[tuple]:
    """The change set as comparable data: values parsed from their JSON text."""
    def parsed(text):
        return None if text is None else tuple(sorted(json.loads(text).items()))
    return {(row["identifier"], row["email"], row["people_id"], row["op"],
             tuple(sorted(row["changed"] or [])), parsed(row["old_values"]),
             parsed(row["new_values"]), parsed(row["data_values"]))
            for row in frame.select(OUTPUT).iter_rows(named=True)}


def serve(name: str, people: int, attributes: int, pipe) -> None:
    """A contender's process: build the data, then time one run per request."""
    segment, snapshot, fields = stored_frames(people, attributes)
    run = CONTENDERS[name](segment, snapshot, fields)
    pipe.send(canonical(run()))  # the warm-up run's output, for the equality check
    while pipe.recv() == "run":
        _reset_peak()
        started = time.perf_counter()
        run()
        pipe.send((time.perf_counter() - started, _peak()))
    pipe.close()


def receive(pipe, process):
    """The contender's next message; its death ends the benchmark instead of a hang."""
    while not pipe.poll(5):
        if not process.is_alive():
            raise SystemExit(f"a contender's process died (exit {process.exitcode})")
    return pipe.recv()


def main() -> None:
    args = bench_arguments(__doc__, "repeats", at_least=5)
    print(f"change set of {args.people:,} people x {args.attributes} attributes "
          f"(5% changed, 2% new, 2% gone), {os.cpu_count()} CPUs, median of {args.repeats}, "
          "interleaved", flush=True)
    context = multiprocessing.get_context("spawn")
    pipes, processes, outputs = {}, [], {}
    for name in CONTENDERS:  # one at a time: building the data is memory-hungry
        mine, theirs = context.Pipe()
        process = context.Process(target=serve, args=(name, args.people, args.attributes,
                                                      theirs))
        process.start()
        processes.append(process)
        pipes[name] = mine
        outputs[name] = receive(mine, process)
    reference = outputs["pipeline"]
    for name, output in outputs.items():
        if output != reference:
            raise SystemExit(f"{name}'s change set differs from the pipeline's: "
                             f"{len(output - reference)} rows only in {name}, "
                             f"{len(reference - output)} only in the pipeline's")
    print(f"  outputs equal: {len(reference):,} rows each", flush=True)
    times = {name: [] for name in CONTENDERS}
    peaks = {name: 0 for name in CONTENDERS}
    for _ in range(args.repeats):
        for (name, pipe), process in zip(pipes.items(), processes, strict=True):
            pipe.send("run")
            seconds, peak = receive(pipe, process)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    for pipe in pipes.values():
        pipe.send("stop")
    for process in processes:
        process.join()
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in CONTENDERS:
        print(f"  {name:<9} {median[name]:8.3f} s  (best {min(times[name]):.3f} s)  "
              f"peak {peaks[name] / GIB:5.2f} GiB")
    ours = median["pipeline"]
    for name in ("row_hash", "duckdb"):
        print(f"  pipeline / {name}: {ours / median[name]:.2f} (below 1: pipeline faster)")
    print(f"change_set_compute: pipeline {ours:.3f} s, {median['row_hash'] / ours:.2f}x "
          f"row_hash, {median['duckdb'] / ours:.2f}x duckdb; targets >= 1.0x row_hash "
          f"({'met' if ours <= median['row_hash'] else 'MISSED'}), > 1.0x duckdb "
          f"({'met' if ours < median['duckdb'] else 'MISSED'})")


if __name__ == "__main__":
    main()
