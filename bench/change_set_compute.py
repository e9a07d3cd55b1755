"""Change-set compute: the pipeline's Polars diff against a DuckDB SQL diff and a pandas
merge-and-compare, on the same data, each in its own process (so peak memory is its own).

    python bench/change_set_compute.py                       # 1,000,000 people x 20 attributes
    python bench/change_set_compute.py --people 10000000 --only polars

Data: N people x K attributes already in the pipeline's JSON-text form; 5% changed (one
attribute each), 2% new, 2% gone (mirror mode, so the gone are deletions). Timed: the diff
alone, from frames in memory to the change set (op, changed fields, old and new values).
Peak memory: the process's high-water RSS during the diff (inputs included), read from
/proc after resetting it just before the diff. Targets: 1M in <= 1.0 s and <= 3 GiB;
10M in <= 15 s within 24 GiB; faster than both baselines.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

GIB = 1024 ** 3


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _rss(kind: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind):
            return int(line.split()[1]) * 1024
    raise RuntimeError(kind)


def polars_diff(segment, snapshot, fields):
    import polars as pl

    from crisp_pipeline.changes.diff import compute_change_set
    from datasets import config_for

    rejected = pl.DataFrame(schema={"row_number": pl.Int64, "identifier": pl.String,
                                    "field": pl.String, "reason": pl.String,
                                    "message": pl.String})
    config = config_for(len(fields)).model_copy(update={"mode": "mirror"})

    def run():
        changes = compute_change_set(segment, rejected, snapshot, config)
        return dict(changes.group_by("op").len().iter_rows())
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

    def json_object(side: str) -> str:
        parts = ", ".join(
            f"case when {side}.identifier is not null and {differs[f]} "
            f"then '{q(f)}:' || coalesce({side}.{q(f)}, 'null') end" for f in fields)
        return f"'{{' || concat_ws(',', {parts}) || '}}'"

    sql = f"""
        select coalesce(n.identifier, o.identifier) as identifier, o.people_id,
          case when o.identifier is null then 'create'
               when n.identifier is null then 'delete' else 'update' end as op,
          list_filter([{changed}], x -> x is not null) as changed,
          {json_object("o")} as old_values, {json_object("n")} as new_values
        from seg n full outer join snap o on n.identifier = o.identifier
        where n.identifier is null or o.identifier is null or {" or ".join(differs.values())}
    """

    def run():
        changes = connection.sql(sql).fetch_arrow_table()
        counts = changes.column("op").value_counts().to_pylist()
        return {item["values"]: item["counts"] for item in counts}
    return run


def pandas_diff(segment, snapshot, fields):
    import numpy as np

    seg, snap = segment.to_pandas(), snapshot.to_pandas()

    def run():
        merged = seg.merge(snap, on="identifier", how="outer", suffixes=("_n", "_o"),
                           indicator=True)
        new = {f: merged[f + "_n"] for f in fields}
        old = {f: merged[f + "_o"] for f in fields}
        differs = {f: (new[f] != old[f]) & ~(new[f].isna() & old[f].isna()) for f in fields}
        work = (merged["_merge"] != "both") | np.logical_or.reduce(
            [d.to_numpy() for d in differs.values()])
        merged = merged[work]
        op = np.select([merged["_merge"] == "left_only", merged["_merge"] == "right_only"],
                       ["create", "delete"], "update")
        changed = ""
        new_values = ""
        for f in fields:
            mask = differs[f][work]
            changed = changed + np.where(mask, f + ",", "")
            new_values = new_values + np.where(mask, '"' + f + '":' + new[f][work].fillna("null")
                                               + ",", "")
        merged = merged.assign(op=op, changed=changed, new_values="{" + new_values + "}")
        return merged["op"].value_counts().to_dict()
    return run


CONTENDERS = {"polars": polars_diff, "duckdb": duckdb_diff, "pandas": pandas_diff}


def measure(name: str, people: int, attributes: int, repeats: int, queue) -> None:
    from datasets import make_frames

    segment, snapshot = make_frames(people, attributes)
    fields = [c for c in segment.columns if c.startswith("data.")]
    run = CONTENDERS[name](segment, snapshot, fields)
    run()  # warm-up (imports, first-call allocations)
    times, peaks, counts = [], [], None
    for _ in range(repeats):
        _reset_peak()
        started = time.perf_counter()
        counts = run()
        times.append(time.perf_counter() - started)
        peaks.append(_rss("VmHWM:"))
    queue.put({"name": name, "seconds": statistics.median(times), "best": min(times),
               "peak_gib": max(peaks) / GIB, "counts": counts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--attributes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=list(CONTENDERS), action="append")
    args = parser.parse_args()
    names = args.only or list(CONTENDERS)
    print(f"change set of {args.people:,} people x {args.attributes} attributes "
          f"(5% changed, 2% new, 2% gone), {os.cpu_count()} CPUs, median of {args.repeats}")
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in names:
        queue = context.Queue()
        process = context.Process(target=measure, args=(name, args.people, args.attributes,
                                                        args.repeats, queue))
        process.start()
        while True:
            try:
                results[name] = queue.get(timeout=5)
                break
            except Exception:  # noqa: BLE001 - queue.Empty: is the child still alive?
                if not process.is_alive():
                    raise SystemExit(f"{name}: the measuring process failed "
                                     f"(exit {process.exitcode})") from None
        process.join()
        r = results[name]
        print(f"  {name:<8} {r['seconds']:8.3f} s  (best {r['best']:.3f} s)  "
              f"peak {r['peak_gib']:5.2f} GiB  ops {dict(sorted(r['counts'].items()))}")
    if "polars" in results:
        base = results["polars"]["seconds"]
        for name, r in results.items():
            if name != "polars":
                print(f"  polars is {r['seconds'] / base:.1f}x faster than {name}")
        limit = 1.0 * args.people / 1_000_000 if args.people <= 1_000_000 else 15.0
        print(f"  target: <= {limit:.1f} s -> "
              f"{'met' if results['polars']['seconds'] <= limit else 'MISSED'}")


if __name__ == "__main__":
    main()
