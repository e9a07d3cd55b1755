"""Reading a segment from Postgres (through ADBC, as `warehouse: postgres` does) against
reading the same rows from DuckDB, both into Polars.

    python bench/source_read.py                  # 1,000,000 people x 20 attributes
    python bench/source_read.py --people 100000

Setup: the end-to-end benchmark's segment, written into a DuckDB file and into a throwaway
Postgres server (`crisp_pipeline_tests/postgres_server.py`: the machine's PostgreSQL
binaries, or CRISP_PIPELINE_TEST_POSTGRES_URL). Measured, interleaved, median of `--trials`
(at least 5): `select * from customers` into Polars, by `DuckDBSource` and by `AdbcSource`.
The two frames must be equal. Last line:
`source_read: postgres A.AAs, duckdb B.BBs (C.Cx) for N rows`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from datasets import bench_arguments
from end_to_end import make_segment


def main() -> None:
    import adbc_driver_postgresql.dbapi as pg

    from crisp_pipeline.activation import SegmentQuery
    from crisp_pipeline.state.store import connect_file
    from crisp_pipeline.adbc import AdbcSource
    from crisp_pipeline.warehouse import DuckDBSource
    from crisp_pipeline_tests.postgres_server import throwaway_server

    args = bench_arguments(__doc__)
    segment = make_segment(args.people, args.attributes)
    with tempfile.TemporaryDirectory() as folder, throwaway_server() as server, \
            server.database() as url:
        db_path = f"{folder}/source.duckdb"
        with duckdb.connect(db_path) as connection:
            connection.register("rows", segment.to_arrow())
            connection.execute("create table customers as select * from rows")
        with pg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
            cursor.adbc_ingest("customers", segment.to_arrow(), mode="create")
        os.environ["BENCH_SOURCE_URL"] = url
        from_duckdb = DuckDBSource(connect_file(db_path), SegmentQuery(table="customers"), "b")
        from_postgres = AdbcSource("adbc_driver_postgresql", SegmentQuery(
            table="customers", warehouse="postgres", uri_env="BENCH_SOURCE_URL"), "b")
        times: dict[str, list[float]] = {"postgres": [], "duckdb": []}
        frames: dict[str, pl.DataFrame] = {}
        for trial in range(args.trials):
            order = ["postgres", "duckdb"] if trial % 2 == 0 else ["duckdb", "postgres"]
            for name in order:
                source = from_postgres if name == "postgres" else from_duckdb
                started = time.perf_counter()
                frames[name] = source.read()
                times[name].append(time.perf_counter() - started)
        a, b = frames["postgres"].sort("email"), frames["duckdb"].sort("email")
        assert a.schema == b.schema, (a.schema, b.schema)
        assert a.equals(b), "Postgres and DuckDB gave different rows"
    pg_seconds, duck_seconds = (statistics.median(times[n]) for n in ("postgres", "duckdb"))
    for name in ("postgres", "duckdb"):
        rounds = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:<9} {statistics.median(times[name]):6.2f} s  (trials: {rounds})")
    print(f"source_read: postgres {pg_seconds:.2f}s, duckdb {duck_seconds:.2f}s "
          f"({pg_seconds / duck_seconds:.1f}x) for {args.people:,} rows")


if __name__ == "__main__":
    main()
