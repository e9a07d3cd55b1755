"""The Crisp profile fields an activation may map a column onto, and their kinds.

Paths follow CONTRACT.md §4.2 (ProfileWrite). A field's kind says how a segment value is
normalised and checked before it is sent. People data (synchronized attributes) live under
`data.<key>`, the same naming Crisp's search filters use, so a managed field name is never
ambiguous and never collides with the bookkeeping columns.
"""

from __future__ import annotations

from typing import Final

from crisp_pipeline.crisp import contract

STRING, INTEGER, SEGMENTS, TEXT, EMAIL = "string", "integer", "segments", "text", "email"

PROFILE_FIELDS: Final[dict[str, str]] = {
    **{f"person.{name}": STRING for name in (
        "nickname", "avatar", "gender", "phone", "address", "description", "website")},
    "person.timezone": INTEGER,
    **{f"person.employment.{name}": STRING for name in (
        "name", "domain", "title", "role", "seniority")},
    **{f"person.geolocation.{name}": STRING for name in ("country", "region", "city")},
    **{f"company.{name}": STRING for name in (
        "name", "legal_name", "domain", "url", "description")},
    "company.timezone": INTEGER,
    **{f"company.metrics.{name}": INTEGER for name in ("employees", "market_cap", "raised", "arr")},
    **{f"company.geolocation.{name}": STRING for name in ("country", "region", "city")},
    "segments": SEGMENTS,
    "notepad": TEXT,
}

DATA_PREFIX: Final = "data."
MAX_LENGTH: Final[dict[str, int]] = {
    STRING: contract.MAX_STRING_LENGTH,
    TEXT: contract.MAX_NOTEPAD_LENGTH,
    EMAIL: contract.MAX_EMAIL_LENGTH,
}


def data_field(key: str) -> str:
    return DATA_PREFIX + key


def is_data_field(name: str) -> bool:
    return name.startswith(DATA_PREFIX)


def data_key(name: str) -> str:
    return name[len(DATA_PREFIX):]


def kind_of(name: str) -> str:
    """The kind of a managed field: a profile field's, `email`, or people data."""
    if name == "email":
        return EMAIL
    return PROFILE_FIELDS.get(name, "data")
