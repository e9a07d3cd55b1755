"""The change set: one Polars join of the segment and the snapshot, one row per person with work.

`op` is one of:
- `create`: in the segment, not managed yet (upsert, mirror) — every non-null field is sent;
- `update`: managed and at least one field differs — only the differing fields are sent;
- `delete`: managed, gone from the source, mode mirror — never a person whose row is still in
  the source but was rejected (a failed row must not become a deletion);
- `skip`: nothing will be sent, and `reason` says why (`not_in_crisp` in update_only mode, or
  the rejection reason of a bad row, with `message` naming the row and the field).

`changed` lists the fields to write; `old_values` / `new_values` are JSON objects of those
fields (JSON text values, see `encode`). A field whose snapshot value is unknown (SQL NULL:
the field was added to the configuration later) and whose new value is null is not written:
clearing a value we never set is not our business.
"""

from __future__ import annotations

import polars as pl

from crisp_pipeline.activation import ActivationConfig, Mode

from .encode import JSON_NULL, encode_expr
from .normalize import EMAIL, IDENTIFIER, ROW

OPS = ("create", "update", "delete", "skip")


def _json_object(fields: list[str], prefix: str, include: dict[str, pl.Expr]) -> pl.Expr:
    """`{"field": <json>, ...}` of the fields whose `include` mask is true."""
    parts = [pl.when(include[field]).then(
        pl.format('"{}":{}', pl.lit(field), pl.col(prefix + field).fill_null(JSON_NULL)))
        for field in fields]
    if not parts:
        return pl.lit("{}")
    body = pl.concat_str(parts, separator=",", ignore_nulls=True).fill_null("")
    return pl.concat_str([pl.lit("{"), body, pl.lit("}")])


def compute_change_set(segment: pl.DataFrame, present: pl.DataFrame, rejected: pl.DataFrame,
                       snapshot: pl.DataFrame, config: ActivationConfig) -> pl.DataFrame:
    fields = list(config.managed_columns)
    new = segment.lazy().select(
        IDENTIFIER, pl.col(EMAIL).alias("new_email"),
        *[pl.col(f).alias("new:" + f) for f in fields], pl.lit(True).alias("in_segment"))
    old = snapshot.lazy().select(
        IDENTIFIER, "people_id", pl.col("email").alias("old_email"),
        *[pl.col(f).alias("old:" + f) for f in fields], pl.lit(True).alias("in_snapshot"))
    if not config.keyed_by_email:
        # under an external id, a changed email is written like a field (never on create)
        new = new.with_columns(encode_expr(pl.col("new_email")).alias("new:email"))
        old = old.with_columns(encode_expr(pl.col("old_email")).alias("old:email"))
    joined = new.join(old, on=IDENTIFIER, how="full", coalesce=True).with_columns(
        pl.col("in_segment").fill_null(False), pl.col("in_snapshot").fill_null(False),
        pl.col(IDENTIFIER).is_in(present.get_column(IDENTIFIER).implode()).alias("in_source"))

    differs = {f: (pl.col("new:" + f).ne_missing(pl.col("old:" + f))
                   & ~(pl.col("old:" + f).is_null() & (pl.col("new:" + f) == JSON_NULL)))
               for f in fields}
    to_create = {f: pl.col("new:" + f) != JSON_NULL for f in fields}
    if not config.keyed_by_email:
        differs["email"] = (pl.col("old_email").is_not_null()
                            & pl.col("new:email").ne_missing(pl.col("old:email")))
    compared = list(differs)
    changed_updates = pl.concat_list([pl.when(differs[f]).then(pl.lit(f)) for f in compared]
                                     ).list.drop_nulls() if compared else pl.lit([], pl.List(pl.String))
    changed_creates = pl.concat_list([pl.when(to_create[f]).then(pl.lit(f)) for f in fields]
                                     ).list.drop_nulls() if fields else pl.lit([], pl.List(pl.String))
    known, listed = pl.col("in_snapshot"), pl.col("in_segment")
    unknown_op = pl.lit("skip" if config.mode == Mode.UPDATE_ONLY else "create")
    gone_op = pl.lit("delete" if config.mode == Mode.MIRROR else None, pl.String)

    work = joined.with_columns(
        pl.when(listed & ~known).then(unknown_op)
        .when(listed & known & (changed_updates.list.len() > 0)).then(pl.lit("update"))
        .when(~listed & known & ~pl.col("in_source")).then(gone_op)
        .otherwise(None).alias("op"),
    ).filter(pl.col("op").is_not_null()).with_columns(
        pl.when(pl.col("op") == "skip").then(pl.lit("not_in_crisp")).alias("reason"),
        pl.when(pl.col("op") == "skip")
        .then(pl.lit("not in Crisp, and update_only never creates people")).alias("message"),
        pl.when(pl.col("op") == "create").then(changed_creates)
        .when(pl.col("op") == "update").then(changed_updates)
        .otherwise(pl.lit([], pl.List(pl.String))).alias("changed"),
        pl.when(pl.col("op") == "update").then(_json_object(compared, "old:", differs))
        .when(pl.col("op") == "delete")
        .then(_json_object(fields, "old:", {f: pl.lit(True) for f in fields}))
        .alias("old_values"),
        pl.when(pl.col("op") == "create").then(_json_object(fields, "new:", to_create))
        .when(pl.col("op") == "update").then(_json_object(compared, "new:", differs))
        .when(pl.col("op") == "skip").then(_json_object(fields, "new:", to_create))
        .alias("new_values"),
        pl.coalesce("new_email", "old_email").alias(EMAIL),
    ).select(IDENTIFIER, EMAIL, "people_id", "op", "reason", "message", "changed",
             "old_values", "new_values")

    bad_rows = rejected.lazy().group_by(ROW).agg(
        pl.col(IDENTIFIER).first(),
        pl.col("reason").unique(maintain_order=True).str.join(",").alias("reason"),
        pl.format("row {}: {} ({})", pl.col(ROW), pl.col("message"), pl.col("field"))
        .str.join("; ").alias("message"),
    ).select(IDENTIFIER, pl.lit(None, pl.String).alias(EMAIL),
             pl.lit(None, pl.String).alias("people_id"), pl.lit("skip").alias("op"), "reason",
             "message", pl.lit([], pl.List(pl.String)).alias("changed"),
             pl.lit(None, pl.String).alias("old_values"),
             pl.lit(None, pl.String).alias("new_values"))

    order = pl.col("op").replace_strict({op: i for i, op in enumerate(OPS)}, return_dtype=pl.Int8)
    return pl.concat([work, bad_rows]).sort(order, IDENTIFIER, nulls_last=True).collect()


def counts_by_op(change_set: pl.DataFrame) -> dict[str, int]:
    counts = dict(change_set.group_by("op").len().iter_rows())
    return {op: int(counts.get(op, 0)) for op in OPS}
