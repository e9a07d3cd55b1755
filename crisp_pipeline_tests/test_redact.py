"""Secrets out of error text: whatever fragment of a password a driver echoes, no four
characters of it in a row survive."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crisp_pipeline.redact import redact

PASSWORD_CHARS = st.characters(codec="ascii", categories=["L", "N", "P", "S"],
                               exclude_characters="/?#&=%:@ \"'`()[]{},;")


def leaks(message: str, password: str) -> bool:
    return any(password[i:i + 4] in message for i in range(len(password) - 3))


@settings(max_examples=300, deadline=None)
@given(password=st.text(PASSWORD_CHARS, min_size=4, max_size=24),
       at=st.integers(0, 23), end=st.integers(4, 24), with_at=st.booleans(),
       before=st.sampled_from(['could not translate host name "', "invalid token: ", "",
                               'missing "=" after "']),
       after=st.sampled_from(['@127.0.0.1" to address', '"', " in connection string", ""]))
def test_no_fragment_of_a_password_survives(password, at, end, with_at, before, after):
    secret = password[:len(password) // 2] + "@" + password[len(password) // 2:] \
        if with_at else password
    uri = f"postgresql://reader:{secret}@db.internal:5432/analytics"
    fragment = secret[min(at, len(secret) - 4):][:end]
    message = before + fragment + after
    assert not leaks(redact(message, uri), password.replace("@", ""))
    assert not leaks(redact(message, uri), secret)


def test_the_usual_leaks_are_closed():
    cases = [
        ('could not translate host name "cdSECRET@127.0.0.1" to address',
         "postgresql://crisp:ab@cdSECRET@127.0.0.1:5432/postgres", "cdSECRET"),
        ('invalid percent-encoded token: "Sec%zzRET"',
         "postgresql://crisp@127.0.0.1:5/postgres?password=Sec%zzRET", "Sec%zzRET"),
        ('missing "=" after "defSECRET" in connection info string',
         "host=127.0.0.1 password=abc defSECRET dbname=x", "defSECRET"),
        ("connecting to postgresql://u:p4ss-word@h/db failed", "postgresql://u:p4ss-word@h/db",
         "p4ss-word"),
        ("bad value tok-SECRET-KEY-123", "tok-SECRET-KEY-123", "SECRET"),  # not a URI at all
    ]
    for message, uri, secret in cases:
        assert secret not in redact(message, uri), (message, redact(message, uri))


def test_a_short_password_does_not_scramble_the_message():
    message = 'connection to server at "127.0.0.1", port 5 failed: database "nodb" does not exist'
    assert redact(message, "postgresql://crisp:o@127.0.0.1:5/nodb") == message
