"""Secrets out of error text: a connection URI (or key=value connection string) and the
password in it, however a driver echoes them back.

A driver's error may quote the URI whole, or a fragment of it as it failed to parse it (a
host name that swallowed the end of a password with an unencoded `@`, a bad %-escape, a
word after a space). So besides the exact strings, every word of the message that shares
four characters in a row with a password is blanked out: a little too much is hidden
sometimes (a word that happens to share them), never a piece of the password. A password
shorter than four characters cannot be told apart from ordinary words; only a word equal to
it is blanked."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

MASK = "***"
_OVERLAP = 4


def _passwords(uri: str) -> set[str]:
    found: set[str] = set()
    if "://" in uri:
        rest = uri.split("://", 1)[1]
        authority = rest.split("/", 1)[0].split("?", 1)[0]
        userinfo = authority.rpartition("@")[0]  # a password may hold an unencoded `@`
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
        try:
            split = urlsplit(uri)
            if split.password:
                found.add(split.password)
            for value in parse_qs(split.query).get("password", []):
                found.add(value)
        except ValueError:
            pass
        query = uri.split("?", 1)[1] if "?" in uri else ""
        for match in re.finditer(r"(?:^|&)password=([^&]*)", query):
            found.add(match.group(1))
    # key=value connection strings: everything after `password=` (a value may hold spaces)
    for match in re.finditer(r"password\s*=\s*(.*)", uri, flags=re.IGNORECASE):
        found.add(match.group(1))
    found |= {unquote(p) for p in found}
    return {p for p in found if p}


def _shares_a_run(word: str, secret: str) -> bool:
    return any(word[i:i + _OVERLAP] in secret for i in range(len(word) - _OVERLAP + 1))


def redact(message: str, uri: str) -> str:
    """`message` with `uri` and its password(s) blanked out. A value that is no URI and no
    connection string (an environment variable holding something else) is a secret whole."""
    secrets = _passwords(uri)
    if "://" not in uri and "=" not in uri:
        secrets.add(uri)
    message = message.replace(uri, MASK)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _OVERLAP:
            message = message.replace(secret, MASK)
    words = re.split(r"(\s+|[\"'`()\[\]{},;])", message)
    hidden = []
    for word in words:
        if word and any((len(s) >= _OVERLAP and _shares_a_run(word, s)) or word == s
                        for s in secrets):
            hidden.append(MASK)
        else:
            hidden.append(word)
    return "".join(hidden)
