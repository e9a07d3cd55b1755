"""Engine batches as the rows the state store records: step outcomes, confirmed snapshot
values, people no longer managed (deleted, released, gone from Crisp), and the audit of who
left and how."""

from __future__ import annotations

import polars as pl

from crisp_pipeline.state.store import DELETION_SCHEMA, OUTCOME_SCHEMA, SNAPSHOT_KEYS, now

from .engine import Batch

Frames = tuple[pl.DataFrame, pl.DataFrame, list[str], pl.DataFrame]


def outcome_frames(batch: Batch, run_id: str, fields: list[str], website_id: str) -> Frames:
    at = now()
    steps = batch.steps
    # built column by column: a frame from one dict per row costs several times more
    recorded = pl.DataFrame(
        {"run_id": [run_id] * len(steps), "identifier": [s.identifier for s in steps],
         "people_id": [s.people_id for s in steps], "op": [s.op for s in steps],
         "step": [s.step for s in steps], "status": [s.status for s in steps],
         "reason": [s.reason for s in steps], "message": [s.message for s in steps],
         "unit": [s.unit for s in steps], "requests": [s.requests for s in steps],
         "at": [at] * len(steps)},
        schema=OUTCOME_SCHEMA)
    left = {s.identifier: s.step for s in batch.steps
            if s.step in ("delete", "release") and s.status == "ok"}
    gone = {p.identifier for p in batch.people if p.status == "gone"}

    def email_of(person) -> str | None:
        if "email" in person.confirmed:
            return person.values.get("email")
        return person.email if person.op == "create" else None

    kept = [p for p in batch.people if p.op in ("create", "update") and p.people_id
            and p.identifier not in gone and p.confirmed]
    # a field no one confirmed is left out rather than sent as nulls, which the store would
    # read as "keeps what was known" anyway (most batches confirm one or two fields of 20)
    written = {name for p in kept for name in p.confirmed}
    confirmed_fields = [f for f in fields if f in written]
    confirmed = pl.DataFrame(
        {"identifier": [p.identifier for p in kept], "people_id": [p.people_id for p in kept],
         "email": [email_of(p) for p in kept], "confirmed_at": [at] * len(kept),
         "origin": [p.origin for p in kept],
         "verified_at": [at if p.verified else None for p in kept],
         **{f: [p.confirmed.get(f) for p in kept] for f in confirmed_fields}},
        schema={**SNAPSHOT_KEYS, **{f: pl.String for f in confirmed_fields}})
    deletions = pl.DataFrame(
        [{"run_id": run_id, "website_id": website_id, "identifier": p.identifier,
          "people_id": p.people_id, "email": p.email,
          "action": "deleted" if left[p.identifier] == "delete" else "released",
          "reason": p.reason, "deleted_at": at, "last_values": p.old_values}
         for p in batch.people if p.identifier in left],
        schema=DELETION_SCHEMA)
    return recorded, confirmed, sorted(set(left) | gone), deletions
