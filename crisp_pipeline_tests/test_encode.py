"""The two encoders agree: what the segment's vectorised encoder writes is, after a change set
round trip, exactly the text confirmed into the snapshot, and the same number goes to Crisp."""

from __future__ import annotations

import json

import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from crisp_pipeline.changes.encode import decode_sent, encode_expr, encode_value, same_value

finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(finite, st.integers(min_value=-(2**63), max_value=2**63 - 1),
                    st.booleans(), st.text(), st.none())


@given(st.lists(finite, min_size=1, max_size=20))
def test_a_float_is_confirmed_exactly_as_the_segment_wrote_it(values):
    texts = pl.DataFrame({"v": values}).select(encode_expr(pl.col("v"))).to_series().to_list()
    for value, text in zip(values, texts, strict=True):
        sent = decode_sent(text)
        assert encode_value(sent) == text  # the snapshot holds what the segment holds
        assert float(sent) == value  # and Crisp receives the very same number
        assert json.loads(json.dumps(sent)) == value


@given(scalars)
def test_every_scalar_encodes_the_same_in_polars_and_in_python(value):
    dtype = pl.Float64 if isinstance(value, float) else None
    text = pl.DataFrame({"v": [value]}, schema={"v": dtype} if dtype else None).select(
        encode_expr(pl.col("v"))).item()
    assert encode_value(decode_sent(text)) == text
    assert decode_sent(text) == value or (value is None and text == "null")


def _as_javascript(text: str) -> str:
    """The JSON text Crisp (JavaScript, as the emulator keeps numbers) answers for `text`."""
    from crisp_pipeline.emulator.app import javascript_number

    return encode_value(json.loads(text, parse_int=javascript_number,
                                   parse_float=javascript_number))


@given(st.lists(st.one_of(finite, st.integers(-(2**53 - 1), 2**53 - 1), st.booleans(),
                          st.text(), st.none()), min_size=1, max_size=10))
def test_what_crisp_answers_back_is_the_same_value_as_what_we_sent(values):
    """Read back from Crisp, a value we sent is never a change: neither reconcile nor
    adoption plans a write for Crisp's spelling of it (`1` for `1.0`, `2.5e-05`)."""
    for value in values:
        dtype = pl.Float64 if isinstance(value, float) else None
        text = pl.DataFrame({"v": [value]}, schema={"v": dtype} if dtype else None).select(
            encode_expr(pl.col("v"))).item()
        assert same_value(text, _as_javascript(text))


@given(finite, finite)
def test_different_numbers_are_never_the_same_value(a, b):
    if a != b:
        assert not same_value(encode_value(a), encode_value(b))


@given(st.integers(-(2**63), 2**63 - 1))
def test_an_integer_crisp_cannot_hold_exactly_is_refused_naming_row_and_field(n):
    from crisp_pipeline.activation import ActivationConfig
    from crisp_pipeline.changes.normalize import normalize_segment

    config = ActivationConfig(name="ints", segment={"table": "t"}, attributes=["n"])
    result = normalize_segment(pl.DataFrame({"email": ["a@x.io"], "n": [n]}), config)
    if abs(n) <= 2**53 - 1:
        assert result.accepted.get_column("data.n").to_list() == [str(n)]
        assert _as_javascript(str(n)) == str(n)  # Crisp holds exactly what was sent
    else:
        assert result.accepted.is_empty()
        assert result.rejected.select("row_number", "field", "reason").row(0) == (
            1, "data.n", "unsafe_integer")


def test_a_boolean_is_never_the_same_value_as_a_number():
    assert not same_value("true", "1") and not same_value("false", "0")
    assert not same_value("[true]", "[1]") and same_value("[1.0]", "[1]")
