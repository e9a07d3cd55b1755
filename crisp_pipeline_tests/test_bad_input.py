"""A corpus of bad input. Each row-level case gets a specific reason naming the row (number and
identifier) and the field, while the good rows sync; each segment-level case stops the run
before any request, with a message naming the column, the query or the file."""

from __future__ import annotations

import math

import polars as pl
import pytest

from crisp_pipeline.activation import ActivationConfig

from .harness import Pipeline, crisp_env

SCHEMA = {"email": pl.String, "full_name": pl.String, "phone": pl.String, "plan": pl.String,
          "mrr": pl.Float64, "tags": pl.String, "notes": pl.String, "tz": pl.Int64}
LONG = "x" * 1025


def row(email, **values):
    base = {"email": email, "full_name": "Name", "phone": None, "plan": "pro", "mrr": 1.0,
            "tags": None, "notes": None, "tz": None}
    return {**base, **values}


# (case, source row, expected): expected is ("ok", email as Crisp holds it) or
# ("rejected", {(field, reason), ...}, a fragment of the message)
CASES = [
    ("null email", row(None), ("rejected", {("email", "missing_identifier")}, "email is empty")),
    ("empty email", row(""), ("rejected", {("email", "missing_identifier")}, "email is empty")),
    ("blank email", row("   "), ("rejected", {("email", "missing_identifier")}, "is empty")),
    ("no at sign", row("john.example.com"), ("rejected", {("email", "invalid_email")}, "john.example.com is not a valid email")),
    ("two at signs", row("a@b@x.io"), ("rejected", {("email", "invalid_email")}, "a@b@x.io")),
    ("space inside", row("jo hn@x.io"), ("rejected", {("email", "invalid_email")}, "jo hn@x.io")),
    ("no domain dot", row("john@localhost"), ("rejected", {("email", "invalid_email")}, "john@localhost")),
    ("trailing dot", row("john@x."), ("rejected", {("email", "invalid_email")}, "john@x.")),
    ("obfuscated at", row("john (at) x.io"), ("rejected", {("email", "invalid_email")}, "(at)")),
    ("too long email", row("a" * 251 + "@x.io"), ("rejected", {("email", "invalid_email")}, "not a valid")),
    ("duplicate 1", row("twin@x.io"), ("rejected", {("email", "duplicate_identifier")}, "twin@x.io appears in rows")),
    ("duplicate 2", row("twin@x.io"), ("rejected", {("email", "duplicate_identifier")}, "twin@x.io appears in rows")),
    ("duplicate by case", row("TWIN@x.io"), ("rejected", {("email", "duplicate_identifier")}, "appears in rows")),
    ("duplicate by spaces", row(" twin@x.io "), ("rejected", {("email", "duplicate_identifier")}, "appears in rows")),
    ("upper case", row("UPPER@X.IO"), ("ok", "upper@x.io")),
    ("padded", row("  pad@x.io  "), ("ok", "pad@x.io")),
    ("unicode", row("josé@exemple.fr"), ("ok", "josé@exemple.fr")),
    ("unicode upper", row("ÉLODIE@X.IO"), ("ok", "élodie@x.io")),
    ("NaN", row("nan@x.io", mrr=math.nan), ("rejected", {("data.mrr", "not_a_finite_number")}, "NaN is not a finite number")),
    ("infinity", row("inf@x.io", mrr=math.inf), ("rejected", {("data.mrr", "not_a_finite_number")}, "inf is not a finite")),
    ("minus infinity", row("minf@x.io", mrr=-math.inf), ("rejected", {("data.mrr", "not_a_finite_number")}, "-inf")),
    ("long attribute", row("longattr@x.io", plan=LONG), ("rejected", {("data.plan", "too_long")}, "1025 characters; Crisp takes at most 1024")),
    ("long nickname", row("longname@x.io", full_name="N" * 256), ("rejected", {("person.nickname", "too_long")}, "256 characters; Crisp takes at most 255")),
    ("long notepad", row("longnote@x.io", notes="n" * 10_001), ("rejected", {("notepad", "too_long")}, "at most 10000")),
    ("long segment", row("longseg@x.io", tags="ok," + "s" * 65), ("rejected", {("segments", "too_long")}, "longer than 64")),
    ("timezone out of range", row("tz@x.io", tz=40_000), ("rejected", {("person.timezone", "out_of_range")}, "40000 is outside")),
    ("two problems", row("two@x.io", mrr=math.nan, full_name="N" * 300), ("rejected", {("data.mrr", "not_a_finite_number"), ("person.nickname", "too_long")}, "finite")),
    ("empty strings", row("empty@x.io", plan="", phone=""), ("ok", "empty@x.io")),
    ("emoji", row("emoji@x.io", full_name="Zoë 🚀"), ("ok", "emoji@x.io")),
    ("quotes and backslashes", row("quote@x.io", plan='a "b" \\c'), ("ok", "quote@x.io")),
    ("all nulls", row("nulls@x.io", full_name=None, plan=None, mrr=None), ("ok", "nulls@x.io")),
    ("good", row("good@x.io", tags="VIP, Beta", notes="likes cats", tz=120), ("ok", "good@x.io")),
]


def corpus_pipeline(emulator, tmp_path, monkeypatch) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(
        name="corpus", segment={"table": "people"},
        fields={"person.nickname": "full_name", "person.phone": "phone", "segments": "tags",
                "notepad": "notes", "person.timezone": "tz"},
        attributes=["plan", "mrr"])
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), config)


def test_every_bad_row_is_rejected_with_row_identifier_and_field_and_the_rest_sync(
        emulator, tmp_path, monkeypatch):
    assert len(CASES) >= 30
    pipeline = corpus_pipeline(emulator, tmp_path, monkeypatch)
    pipeline.load(pl.DataFrame([case[1] for case in CASES], schema=SCHEMA))
    result = pipeline.run()
    rejected = pipeline.store.read("rejected")
    skips = pipeline.store.read("change_set").filter(pl.col("op") == "skip")
    crisp = pipeline.crisp()
    for number, (case, _, expected) in enumerate(CASES, start=1):
        mine = rejected.filter(pl.col("row_number") == number)
        if expected[0] == "ok":
            assert mine.is_empty(), (case, mine.rows())
            assert expected[1] in crisp, case
            continue
        _, problems, fragment = expected
        assert set(mine.select("field", "reason").rows()) == problems, (case, mine.rows())
        assert any(fragment in m for m in mine["message"]), (case, list(mine["message"]))
        skip = skips.filter(pl.col("message").str.starts_with(f"row {number} ("))
        assert skip.height == 1, case  # a skip in the change set, naming row and identifier
        identifier = mine["identifier"][0]
        assert f"row {number} ({identifier or 'no identifier'}):" in skip["message"][0], case
    ok = [case for case in CASES if case[2][0] == "ok"]
    assert len(crisp) == len(ok)
    assert crisp["good@x.io"]["segments"] == ["beta", "vip"]
    assert crisp["good@x.io"]["person"] == {"nickname": "Name", "timezone": 120}
    assert crisp["quote@x.io"]["data"]["plan"] == 'a "b" \\c'
    assert crisp["emoji@x.io"]["person"]["nickname"] == "Zoë 🚀"
    assert crisp["empty@x.io"]["data"] == {"mrr": 1.0}  # "" is no value
    assert pipeline.checks(result)["segment_usable"].severity.value == "WARN"
    pipeline.assert_snapshot_matches_crisp()


def test_a_rejected_row_syncs_once_its_source_row_is_fixed(emulator, tmp_path, monkeypatch):
    pipeline = corpus_pipeline(emulator, tmp_path, monkeypatch)
    pipeline.load(pl.DataFrame([row("fix@x.io", mrr=math.nan), row("ok@x.io")], schema=SCHEMA))
    pipeline.run()
    assert set(pipeline.crisp()) == {"ok@x.io"}
    assert pipeline.store.read("rejected")["reason"].to_list() == ["not_a_finite_number"]
    pipeline.load(pl.DataFrame([row("fix@x.io", mrr=2.0), row("ok@x.io")], schema=SCHEMA))
    pipeline.run()
    assert pipeline.crisp()["fix@x.io"]["data"] == {"plan": "pro", "mrr": 2.0}
    assert pipeline.store.read("rejected").is_empty()


def test_an_attribute_whose_type_changes_between_runs_follows_it(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="drift", segment={"table": "people"}, attributes=["level"]))
    pipeline.load(pl.DataFrame({"email": ["t@x.io"], "level": ["3"]}))
    pipeline.run()
    pipeline.load(pl.DataFrame({"email": ["t@x.io"], "level": [3]}))
    pipeline.run()
    assert pipeline.crisp()["t@x.io"]["data"] == {"level": 3}
    pipeline.load(pl.DataFrame({"email": ["t@x.io"], "level": [True]}))
    pipeline.run()
    assert pipeline.crisp()["t@x.io"]["data"] == {"level": True}
    pipeline.assert_snapshot_matches_crisp()


def test_an_empty_segment_warns_and_sends_nothing_outside_mirror(emulator, tmp_path, monkeypatch):
    pipeline = corpus_pipeline(emulator, tmp_path, monkeypatch)
    pipeline.load(pl.DataFrame(schema=SCHEMA))
    result = pipeline.run()
    check = pipeline.checks(result)["segment_usable"]
    assert not check.passed and check.description == "the segment is empty"
    assert emulator.emulator.requests() == []


@pytest.mark.parametrize("frame,fragment", [
    (pl.DataFrame({"email": ["a@x.io"], "plan": [{"tier": "pro"}]}),
     "column 'plan' (for data.plan) is Struct"),
    (pl.DataFrame({"email": ["a@x.io"], "plan": [b"bytes"]}),
     "column 'plan' (for data.plan) is Binary"),
    (pl.DataFrame({"email": [["a@x.io"]], "plan": ["pro"]}),
     "identifier column 'email' is List(String)"),
])
def test_a_column_crisp_cannot_hold_stops_the_run_before_any_request(
        emulator, tmp_path, monkeypatch, frame, fragment):
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="shape", segment={"table": "people"}, attributes=["plan"]))
    pipeline.load(frame)
    result = pipeline.run(expect_success=False)
    assert fragment in pipeline.failure_text(result)
    assert emulator.emulator.requests() == []


@pytest.mark.parametrize("make,fragment", [
    (lambda path: path.write_bytes(b"this is not a database" * 100), "not a valid DuckDB"),
    (lambda path: path.mkdir(), "Is a directory"),
])
def test_an_unreadable_duckdb_file_fails_at_once_naming_the_file(
        emulator, tmp_path, monkeypatch, make, fragment):
    crisp_env(monkeypatch, emulator)
    path = tmp_path / "broken.duckdb"
    make(path)
    pipeline = Pipeline(emulator, str(path), ActivationConfig(
        name="nodb", segment={"table": "people"}, attributes=["plan"]))
    result = pipeline.run(expect_success=False)
    text = pipeline.failure_text(result)
    assert str(path) in text and "CRISP_PIPELINE_DB" in text and fragment in text
