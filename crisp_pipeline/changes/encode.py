"""One canonical text for every value we manage, so that "changed" is a string comparison.

A managed value is kept as its JSON text (`"pro"`, `12.5`, `true`, `["vip"]`, `null`), the
same whether it comes from the warehouse (encoded by Polars, vectorised) or from Crisp
(encoded by `encode_value` when a person is adopted): Polars' JSON encoder and
`json.dumps(..., ensure_ascii=False, separators=(",", ":"))` agree on strings, numbers,
booleans and lists. JSON `null` means "Crisp holds no value"; a SQL NULL in the snapshot means
"never written or read", which is different.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

JSON_NULL = "null"


def encode_expr(expr: pl.Expr) -> pl.Expr:
    """The JSON text of each value of `expr` (`null` for a missing value)."""
    return (pl.struct(expr.alias("v")).struct.json_encode()
            .str.strip_prefix('{"v":').str.strip_suffix("}"))


class SentFloat(float):
    """A float read from a change set's JSON, remembering the exact text it was written as
    (`0.000025`, `1e-7`), so that what is confirmed is what the segment holds, not Python's
    spelling of the same number (`2.5e-05`, `1e-07`)."""

    text: str

    def __new__(cls, text: str) -> SentFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


# one decoder for every text: `json.loads(..., parse_float=...)` made a new one per call,
# 2.5 µs a text against 0.9 (a sync decodes two texts per person before its first request)
_SENT_DECODER = json.JSONDecoder(parse_float=SentFloat)


def decode_sent(text: str) -> Any:
    """A change set's JSON text, with each float keeping its written form (see SentFloat)."""
    return _SENT_DECODER.decode(text)


def encode_value(value: Any) -> str:
    if isinstance(value, SentFloat):
        return value.text
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _as_crisp_holds(value: Any) -> Any:
    """A decoded value as Crisp (JavaScript) holds it: every number a double, so that `1`,
    `1.0` and `1e0` are one value; a boolean stays a boolean (`true` is not `1` in Crisp,
    although Python finds `True == 1.0`)."""
    if isinstance(value, bool):
        return ("boolean", value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_as_crisp_holds(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_crisp_holds(item) for key, item in value.items()}
    return value


def same_value(ours: str | None, held: str | None) -> bool:
    """Whether the JSON text we confirmed and the JSON text of what Crisp holds are the same
    value for Crisp. Reading a person back must not turn `0.000025` into a change because
    Crisp spells it `2.5e-05`, nor `1.0` because Crisp answers `1`."""
    if ours == held:
        return True
    if ours is None or held is None:
        return False
    try:
        return _as_crisp_holds(json.loads(ours)) == _as_crisp_holds(json.loads(held))
    except ValueError:
        return False



def iso_text(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Dates and timestamps as ISO 8601 strings (Crisp people data hold no date type)."""
    if dtype == pl.Date:
        return expr.dt.strftime("%Y-%m-%d")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone:
            return expr.dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ")
        return expr.dt.strftime("%Y-%m-%dT%H:%M:%S%.f")
    if dtype == pl.Time:
        return expr.dt.strftime("%H:%M:%S")
    return expr
