"""Person outcomes as the rows the state store records: outcomes, confirmed snapshot values,
people to forget, and the deletion audit."""

from __future__ import annotations

import json

import polars as pl

from crisp_pipeline.state.store import OUTCOME_SCHEMA, SNAPSHOT_KEYS, now

from .engine import PersonOutcome

DELETION_SCHEMA = {"run_id": pl.String, "identifier": pl.String, "people_id": pl.String,
                   "email": pl.String, "deleted_at": pl.Datetime("us", "UTC"),
                   "last_values": pl.String}


def outcome_frames(outcomes: list[PersonOutcome], run_id: str, fields: list[str]
                   ) -> tuple[pl.DataFrame, pl.DataFrame, list[str], pl.DataFrame]:
    at = now()
    recorded = pl.DataFrame(
        [{"run_id": run_id, "identifier": o.identifier, "people_id": o.people_id, "op": o.op,
          "status": o.status, "reason": o.reason, "message": o.message, "requests": o.requests,
          "at": at} for o in outcomes], schema=OUTCOME_SCHEMA)

    def email_of(o: PersonOutcome) -> str | None:
        if "email" in o.confirmed:
            return json.loads(o.confirmed["email"])
        return o.email if o.op == "create" else None

    confirmed = pl.DataFrame(
        [{"identifier": o.identifier, "people_id": o.people_id, "email": email_of(o),
          "confirmed_at": at, **{f: v for f, v in o.confirmed.items() if f in fields}}
         for o in outcomes
         if o.op in ("create", "update") and o.people_id and o.status != "gone"
         and (o.confirmed or o.op == "create")],
        schema={**SNAPSHOT_KEYS, **{f: pl.String for f in fields}})
    deleted = [o for o in outcomes if o.op == "delete" and o.status == "ok"]
    forgotten = [o.identifier for o in deleted] + [o.identifier for o in outcomes
                                                   if o.status == "gone"]
    deletions = pl.DataFrame(
        [{"run_id": run_id, "identifier": o.identifier, "people_id": o.people_id,
          "email": o.email, "deleted_at": at, "last_values": o.old_values} for o in deleted],
        schema=DELETION_SCHEMA)
    return recorded, confirmed, forgotten, deletions
