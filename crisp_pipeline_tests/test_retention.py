"""History tables keep `history_days` of rows; the audit of deletions and the latest run are
always kept."""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from crisp_pipeline.state.store import DELETION_SCHEMA, OUTCOME_SCHEMA, RUN_SCHEMA, StateStore
from crisp_pipeline.state.store import connect_file, now


def test_history_older_than_the_retention_is_pruned_and_the_rest_kept(tmp_path):
    store = StateStore(connect_file(str(tmp_path / "s.duckdb")), "crisp_r", "w")
    old, recent = now() - timedelta(days=120), now() - timedelta(days=10)
    for run_id, at in (("old", old), ("recent", recent)):
        store.record_run({**{k: None for k in RUN_SCHEMA}, "run_id": run_id,
                          "finished_at": at, "dry_run": False})
        store.record_batch(
            pl.DataFrame([{"run_id": run_id, "identifier": "a", "step": "profile",
                           "status": "ok", "unit": 1, "requests": 1, "at": at}],
                         schema=OUTCOME_SCHEMA),
            pl.DataFrame(), [],
            pl.DataFrame([{"run_id": run_id, "identifier": "a", "deleted_at": at}],
                         schema=DELETION_SCHEMA), [])
    pruned = store.prune_history(now() - timedelta(days=90))
    assert pruned == {"outcomes": 1, "runs": 1}
    assert store.read("runs").get_column("run_id").to_list() == ["recent"]
    assert store.read("outcomes").get_column("run_id").to_list() == ["recent"]
    assert store.read("deletions").height == 2  # the audit of deletions is never pruned
    # the latest run is kept whatever its age
    assert store.prune_history(now()) == {"outcomes": 0, "runs": 0}
    assert store.read("runs").get_column("run_id").to_list() == ["recent"]
