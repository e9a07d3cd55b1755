"""The request plan of a change set: how many calls it costs, before any is sent.

Crisp has no bulk create, so each create is one `POST people/profile`; each update with
changed profile fields is one `PATCH people/profile`; each delete is one call. People data
are grouped: people who need the very same data change (same keys, same new values) share a
`PATCH batch/data` per `batch_size` people; a data change nobody shares is one
`PATCH people/data`. This mirrors exactly what the sync engine sends, so the plan's total is
what a run spends when Crisp answers every request the first time.
"""

from __future__ import annotations

import math

import polars as pl

from crisp_pipeline.crisp import contract

from . import fields as crisp_fields


def request_plan(change_set: pl.DataFrame, *, batch_size: int = contract.MAX_BATCH_PROFILES,
                 daily_quota: int | None = None,
                 budget_left: int | None = None) -> dict[str, int | float | None]:
    is_profile = ~pl.element().str.starts_with(crisp_fields.DATA_PREFIX)
    work = change_set.filter(pl.col("op").is_in(["create", "update", "delete"]))
    ops = dict(work.group_by("op").len().iter_rows()) if work.height else {}
    profile_patches = work.filter(
        (pl.col("op") == "update") & pl.col("changed").list.eval(is_profile).list.any()).height
    # creates and updates are grouped apart: a create's data go out after its POST
    groups = (work.filter(pl.col("data_values").is_not_null())
              .group_by("op", "data_values").len().get_column("len"))
    shared = groups.filter(groups > 1) if batch_size > 1 else groups.clear()
    singles = groups.filter(groups == 1) if batch_size > 1 else groups
    plan: dict[str, int | float | None] = {
        "POST people/profile": int(ops.get("create", 0)),
        "PATCH people/profile": profile_patches,
        "PATCH people/data": int(singles.sum()),
        "PATCH batch/data": int(sum(math.ceil(n / batch_size) for n in shared.to_list())),
        "DELETE people/profile": int(ops.get("delete", 0)),
    }
    total = sum(plan.values())
    people_with_data = int(groups.sum()) if groups.len() else 0
    plan["requests"] = total
    plan["requests_without_batching"] = total - plan["PATCH batch/data"] + int(shared.sum())
    plan["people_with_data_changes"] = people_with_data
    plan["daily_quota"] = daily_quota
    plan["budget_left_today"] = budget_left
    if daily_quota:
        left = daily_quota if budget_left is None else budget_left
        # runs today cover what is left of today's budget; each later day a full quota
        later = max(total - left, 0)
        plan["days_to_finish"] = 0 if total == 0 else 1 + math.ceil(later / daily_quota)
    else:
        plan["days_to_finish"] = 0 if total == 0 else 1
    return plan
