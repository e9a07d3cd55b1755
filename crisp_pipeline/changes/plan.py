"""The request plan of a change set: how many calls it costs, before any is sent.

Crisp has no bulk create, so a create is `POST people/profile` plus, when it carries people
data, one data merge; an update is one profile patch when profile fields changed plus one
data merge when people data changed; a delete is one call.
"""

from __future__ import annotations

import math

import polars as pl

from . import fields as crisp_fields


def request_plan(change_set: pl.DataFrame, daily_quota: int | None = None,
                 budget_left: int | None = None) -> dict[str, int | float | None]:
    is_data = pl.element().str.starts_with(crisp_fields.DATA_PREFIX)
    counted = change_set.select(
        ((pl.col("op") == "create").sum()).alias("POST people/profile"),
        ((pl.col("op") == "update") & pl.col("changed").list.eval(~is_data).list.any()
         ).sum().alias("PATCH people/profile"),
        (pl.col("op").is_in(["create", "update"]) & pl.col("changed").list.eval(is_data).list.any()
         ).sum().alias("PATCH people/data"),
        ((pl.col("op") == "delete").sum()).alias("DELETE people/profile"),
    ).row(0, named=True) if not change_set.is_empty() else {
        "POST people/profile": 0, "PATCH people/profile": 0, "PATCH people/data": 0,
        "DELETE people/profile": 0}
    plan: dict[str, int | float | None] = {route: int(n) for route, n in counted.items()}
    total = sum(plan.values())
    plan["requests"] = total
    plan["daily_quota"] = daily_quota
    plan["budget_left_today"] = budget_left
    plan["days_to_finish"] = (math.ceil(total / daily_quota) if daily_quota and total else 0)
    return plan
