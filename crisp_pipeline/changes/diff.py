"""The change set: one Polars join of the segment and the snapshot, one row per person with work.

`op` is one of:
- `create`: in the segment, not managed yet (upsert, mirror) — every non-null field is sent;
- `update`: managed and at least one field differs — only the differing fields are sent;
- `delete`: mode mirror, a managed person no row of the source reaches any more: not by
  identifier (accepted or rejected: a failed row must not become a deletion), nor by email on
  a row not itself managed under another identifier; decided by `departures` (which may
  also hold or release them);
- `release`: mirror stops managing a departed person and leaves them in Crisp (no request);
- `skip`: nothing will be sent, and `reason` says why (`not_in_crisp` in update_only mode,
  `email_taken` when a new row's email is a managed person's who is still in the source,
  `departure_held` / `grace_period` for departures mirror holds back, or the rejection
  reason of a bad row, with `message` naming the row and the field).

`changed` lists the fields to write; `old_values` / `new_values` are JSON objects of those
fields (JSON text values, see `encode`); `data_values` is the people-data merge body to send
(keys without `data.`, a cleared value as Crisp's clearing value), the key by which identical
data changes are batched. A field whose snapshot value is unknown (SQL NULL:
the field was added to the configuration later) and whose new value is null is not written:
clearing a value we never set is not our business. A field whose snapshot value is
UNCONFIRMED (added to the configuration since the last run) is written whatever it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.crisp import contract
from crisp_pipeline.state.store import ABSENCE_SCHEMA, CHANGE_SET_SCHEMA, UNCONFIRMED

from . import fields as crisp_fields
from .departures import HELD, DepartureContext, decide
from .encode import JSON_NULL, encode_expr, encode_value
from .normalize import EMAIL, IDENTIFIER, ROW
from crisp_pipeline.names import OPS

ROW_HASH = "row_hash"  # as the state store keeps it



@dataclass(frozen=True)
class PlannedChanges:
    change_set: pl.DataFrame
    absences: pl.DataFrame | None  # mirror: who is absent, to remember for the grace period
    held_departures: int  # mirror: departures held because someone may still be there


def _json_object(fields: list[str], prefix: str, include: dict[str, pl.Expr],
                 key=lambda field: field, null_as: str = JSON_NULL) -> pl.Expr:
    """`{"field": <json>, ...}` of the fields whose `include` mask is true."""
    def value(field: str) -> pl.Expr:
        text = pl.col(prefix + field).fill_null(JSON_NULL).replace(UNCONFIRMED, JSON_NULL)
        return text if null_as == JSON_NULL else text.replace(JSON_NULL, null_as)

    parts = [pl.when(include[field]).then(pl.format('"{}":{}', pl.lit(key(field)), value(field)))
             for field in fields]
    if not parts:
        return pl.lit("{}")
    body = pl.concat_str(parts, separator=",", ignore_nulls=True).fill_null("")
    return pl.concat_str([pl.lit("{"), body, pl.lit("}")])


def _names_where(fields: list[str], mask: dict[str, pl.Expr]) -> pl.Expr:
    """The list of field names whose mask is true. (Joined then split: field names hold no
    comma, and this is far faster than `concat_list` over literals.)"""
    if not fields:
        return pl.lit([], pl.List(pl.String))
    joined = pl.concat_str([pl.when(mask[f]).then(pl.lit(f)) for f in fields],
                           separator=",", ignore_nulls=True).fill_null("")
    return (pl.when(joined == "").then(pl.lit([], pl.List(pl.String)))
            .otherwise(joined.str.split(",")))


def _row_hash(columns: list[str]) -> pl.Expr:
    """One 64-bit fingerprint of a person's managed values (a seeded hash per column, summed).

    Only a filter: people whose fingerprints match are unchanged (a collision, about one in
    2**64 per person, would hide a change until the next one); people whose fingerprints
    differ are compared field by field.
    """
    if not columns:
        return pl.lit(0, pl.UInt64)
    return pl.sum_horizontal([pl.col(c).hash(seed) for seed, c in enumerate(columns, start=1)])


def compute_change_set(segment: pl.DataFrame, rejected: pl.DataFrame,
                       snapshot: pl.DataFrame, config: ActivationConfig,
                       departures: DepartureContext | None = None) -> pl.DataFrame:
    return plan_changes(segment, rejected, snapshot, config, departures).change_set


def plan_changes(segment: pl.DataFrame, rejected: pl.DataFrame, snapshot: pl.DataFrame,
                 config: ActivationConfig,
                 departures: DepartureContext | None = None,
                 managed_emails: pl.Series | Callable[[pl.Series], pl.Series] | None = None
                 ) -> PlannedChanges:
    """The change set; for a mirror, `departures` decides the fate of people who left (without
    it, every departure is a deletion: for benchmarks and tests of the diff alone).

    `segment` and `snapshot` may be only the rows whose values differ (the state store finds
    them by stored row hashes); then `managed_emails` must be every managed person's email,
    or a lookup that returns those of the (lower-case) emails it is given that a managed
    person holds, since a new row's email may be held by a managed person whose row did not
    change."""
    fields = list(config.managed_columns)
    fingerprinted = [*fields, EMAIL]
    # 1. who differs at all: a join of identifiers and fingerprints only; the row hashes the
    # state store keeps when both sides have them (one hash function, see the store), else
    # computed here (a false difference only costs a comparison of values below)
    stored = all(ROW_HASH in f.columns and f.get_column(ROW_HASH).null_count() == 0
                 for f in (segment, snapshot))
    new_hash = pl.col(ROW_HASH) if stored else _row_hash(fingerprinted)
    keys = (segment.lazy().select(IDENTIFIER, new_hash.alias("h_new"))
            .with_row_index("i_new")
            .join(snapshot.lazy().select(IDENTIFIER, new_hash.alias("h_old"))
                  .with_row_index("i_old"), on=IDENTIFIER, how="full", coalesce=True)
            .filter(pl.col("h_new").ne_missing(pl.col("h_old")))
            .select(IDENTIFIER, "i_new", "i_old")).collect()
    # 2. only their values, gathered by row position, side by side
    new_rows = keys.get_column("i_new").drop_nulls()
    old_rows = keys.get_column("i_old").drop_nulls()
    new = segment.select(pl.col(EMAIL).alias("new_email"),
                         *[pl.col(f).alias("new:" + f) for f in fields]
                         )[new_rows].with_columns(new_rows.alias("i_new"))
    old = snapshot.select("people_id", "origin", pl.col(EMAIL).alias("old_email"),
                          *[pl.col(f).alias("old:" + f) for f in fields]
                          )[old_rows].with_columns(old_rows.alias("i_old"))
    rejected_ids = rejected.get_column(IDENTIFIER).drop_nulls().implode()
    # a managed person is still reached by a source row carrying their email, even under
    # another identifier or in a rejected row: such a person has not left
    # (a row managed under its own identifier reaches that person only, so that an email
    # passed from a departed person to a managed one does not keep the departed forever)
    unmanaged = segment.filter(~pl.col(IDENTIFIER).is_in(
        snapshot.get_column(IDENTIFIER).implode())).get_column(EMAIL)
    source_emails = pl.concat([unmanaged, rejected.get_column(EMAIL)]
                              ).drop_nulls().str.to_lowercase().implode()
    # only the managed emails a row of someone not managed carries (the one case that asks,
    # below): a literal of every managed email would make the lazy plan below carry (and
    # copy) a million-element list, and a lookup costs a scan of every managed email
    arriving = keys.filter(pl.col("i_old").is_null()).get_column("i_new").drop_nulls()
    new_emails = segment.get_column(EMAIL)[arriving].drop_nulls().str.to_lowercase()
    if callable(managed_emails):
        taken = managed_emails(new_emails.unique())
    else:
        taken = (snapshot.get_column(EMAIL) if managed_emails is None else managed_emails
                 ).drop_nulls().str.to_lowercase()
        taken = taken.filter(taken.is_in(new_emails.implode()))
    managed_emails = taken.implode()
    joined = (keys.lazy().join(new.lazy(), on="i_new", how="left")
              .join(old.lazy(), on="i_old", how="left")
              .with_columns(pl.col("i_new").is_not_null().alias("in_segment"),
                            pl.col("i_old").is_not_null().alias("in_snapshot"),
                            (pl.col(IDENTIFIER).is_in(rejected_ids)
                             | pl.col("old_email").str.to_lowercase().is_in(source_emails)
                             ).alias("reached"),
                            pl.col("new_email").is_in(managed_emails).alias("email_taken")))
    # a changed email is written like a field (never on create): under an external id when
    # the source changes it; keyed by email when Crisp's was edited (found by reconcile)
    joined = joined.with_columns(encode_expr(pl.col("new_email")).alias("new:email"),
                                 encode_expr(pl.col("old_email")).alias("old:email"))

    # Crisp cannot clear a number (it takes no empty integer): a null there is left as Crisp
    # holds it, never planned (it could only be refused, run after run)
    unclearable = {f for f in fields if crisp_fields.kind_of(f) == crisp_fields.INTEGER}
    differs = {f: (pl.col("new:" + f).ne_missing(pl.col("old:" + f))
                   & ~((pl.col("old:" + f).is_null() | pl.lit(f in unclearable))
                       & (pl.col("new:" + f) == JSON_NULL)))
               for f in fields}
    to_create = {f: pl.col("new:" + f) != JSON_NULL for f in fields}
    differs["email"] = (pl.col("old_email").is_not_null()
                        & pl.col("new:email").ne_missing(pl.col("old:email")))
    compared = list(differs)
    no_fields = pl.lit([], pl.List(pl.String))
    known, listed = pl.col("in_snapshot"), pl.col("in_segment")
    unknown_op = pl.lit("skip" if config.mode == Mode.UPDATE_ONLY else "create")
    gone_op = pl.lit("delete" if config.mode == Mode.MIRROR else None, pl.String)
    any_differs = pl.any_horizontal(list(differs.values())) if differs else pl.lit(False)
    # One plan for who does what; then each op's columns, eagerly, only for the ops that
    # have rows: one lazy plan holding every op's expressions for every field costs more to
    # prepare (about 0.6 s at 20 fields) than the work itself when little changed.
    base = joined.with_columns(
        pl.when(listed & ~known & pl.col("email_taken")).then(pl.lit("taken"))
        .when(listed & ~known).then(unknown_op)
        .when(listed & known & any_differs).then(pl.lit("update"))
        .when(~listed & known & ~pl.col("reached")).then(gone_op)
        .otherwise(None).alias("op"),
        pl.coalesce("new_email", "old_email").alias(EMAIL),
    ).filter(pl.col("op").is_not_null()).collect()
    columns = [c for c in CHANGE_SET_SCHEMA if c != "run_id"]
    data_fields = [f for f in fields if crisp_fields.is_data_field(f)]

    def data_values(include: dict[str, pl.Expr], null_as: str) -> pl.Expr:
        """The people-data merge to send: keys without `data.`, a null as the clearing value."""
        wanted = [f for f in data_fields if f in include]
        if not wanted:
            return none
        body = _json_object(wanted, "new:", include, key=crisp_fields.data_key, null_as=null_as)
        return pl.when(body == "{}").then(none).otherwise(body)
    none = pl.lit(None, pl.String)
    clear = encode_value(contract.CLEAR_DATA_VALUE)
    of_op = {op: base.filter(pl.col("op") == op) for op in ("create", "update", "delete",
                                                            "skip", "taken")}
    parts = []
    if of_op["create"].height:
        parts.append(of_op["create"].with_columns(
            none.alias("reason"), none.alias("message"),
            _names_where(fields, to_create).alias("changed"), none.alias("old_values"),
            _json_object(fields, "new:", to_create).alias("new_values"),
            data_values(to_create, JSON_NULL).alias("data_values")))
    if of_op["update"].height:
        parts.append(of_op["update"].with_columns(
            none.alias("reason"), none.alias("message"),
            _names_where(compared, differs).alias("changed"),
            _json_object(compared, "old:", differs).alias("old_values"),
            _json_object(compared, "new:", differs).alias("new_values"),
            data_values(differs, clear).alias("data_values")))
    departed = of_op["delete"]
    decided = absences = None
    if departures is not None and departed.height:
        outcome = decide(departed.select(IDENTIFIER, "people_id", "origin"), config.mirror,
                         departures)
        decided, absences = outcome.decided, outcome.absences
        departed = departed.drop("op").join(decided, on=IDENTIFIER)
    elif departures is not None:
        absences = pl.DataFrame(schema=ABSENCE_SCHEMA)
    if departed.height:
        if decided is None:
            departed = departed.with_columns(none.alias("reason"), none.alias("message"))
        parts.append(departed.with_columns(
            no_fields.alias("changed"),
            _json_object(fields, "old:", {f: pl.lit(True) for f in fields}).alias("old_values"),
            none.alias("new_values"), none.alias("data_values")))
    if of_op["skip"].height:
        parts.append(of_op["skip"].with_columns(
            pl.lit("not_in_crisp").alias("reason"),
            pl.lit("not in Crisp, and update_only never creates people").alias("message"),
            no_fields.alias("changed"), none.alias("old_values"),
            _json_object(fields, "new:", to_create).alias("new_values"),
            none.alias("data_values")))
    if of_op["taken"].height:
        parts.append(of_op["taken"].with_columns(
            pl.lit("skip").alias("op"), pl.lit("email_taken").alias("reason"),
            pl.format("{} is the email of a person this activation manages under another "
                      "identifier still in the source; Crisp holds one person per email, so "
                      "this row waits until that person's email changes", pl.col("new_email"))
            .alias("message"),
            no_fields.alias("changed"), none.alias("old_values"),
            _json_object(fields, "new:", to_create).alias("new_values"),
            none.alias("data_values")))
    if not rejected.is_empty():
        parts.append(rejected.group_by(ROW).agg(
            pl.col(IDENTIFIER).first(),
            pl.col("reason").unique(maintain_order=True).str.join(",").alias("reason"),
            pl.format("row {} ({}): {} ({})", pl.col(ROW),
                      pl.col(IDENTIFIER).fill_null("no identifier"), pl.col("message"),
                      pl.col("field"))
            .str.join("; ").alias("message"),
        ).with_columns(none.alias(EMAIL), none.alias("people_id"), pl.lit("skip").alias("op"),
                       no_fields.alias("changed"), none.alias("old_values"),
                       none.alias("new_values"), none.alias("data_values")))
    schema = {c: CHANGE_SET_SCHEMA[c] for c in columns}
    order = pl.col("op").replace_strict({op: i for i, op in enumerate(OPS)}, return_dtype=pl.Int8)
    change_set = pl.concat([pl.DataFrame(schema=schema),
                            *[part.select(columns).cast(schema) for part in parts]]
                           ).sort(order, IDENTIFIER, nulls_last=True)
    held = 0 if decided is None else decided.filter(pl.col("reason") == HELD).height
    return PlannedChanges(change_set, absences, held)


def counts_by_op(change_set: pl.DataFrame) -> dict[str, int]:
    counts = dict(change_set.group_by("op").len().iter_rows())
    return {op: int(counts.get(op, 0)) for op in OPS}
