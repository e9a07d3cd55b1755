"""The two encoders agree: what the segment's vectorised encoder writes is, after a change set
round trip, exactly the text confirmed into the snapshot, and the same number goes to Crisp."""

from __future__ import annotations

import json

import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from crisp_pipeline.changes.encode import decode_sent, encode_expr, encode_value

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
