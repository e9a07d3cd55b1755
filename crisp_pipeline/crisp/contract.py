"""The Crisp people API contract, as one table of facts and assumptions.

Both halves that talk Crisp read this module: the client (to classify answers and to validate
what it is about to send) and the emulator (to answer like Crisp). Every value that
`shared/crisp-api/CONTRACT.md` marks as an ASSUMPTION lives here and only here, so that when
real Crisp disagrees, this file is the one place to change. Facts backed by a source carry
the source tag of CONTRACT.md in a comment; assumptions say ASSUMPTION.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_BASE_URL: Final = "https://api.crisp.chat/v1/"  # GO, NODE, PY

TIERS: Final = ("plugin", "website", "user")  # D-AUTH
TIER_WHEN_HEADER_MISSING: Final = "user"  # ASSUMPTION (GO/NODE/RUBY default to user)

# Daily request quotas per tier (D-AUTH table). `user` tokens have no documented daily quota.
DEFAULT_DAILY_QUOTA: Final[dict[str, int | None]] = {"plugin": 5000, "website": 10000, "user": None}

# Routes only the `user` tier may call (NODE-OLD README). The website tier has the same access
# as plugin (ASSUMPTION).
USER_TIER_ONLY_ROUTES: Final = frozenset({"people_import", "people_export", "batch_remove"})


class Reason:
    """Machine reasons Crisp puts in the envelope's `reason`."""

    RESOLVED = "resolved"  # BLOOM
    LISTED = "listed"  # ASSUMPTION
    ADDED = "added"  # ASSUMPTION
    UPDATED = "updated"  # ASSUMPTION
    DELETED = "deleted"  # FW
    INVALID_DATA = "invalid_data"  # I-RB1, I-RB7
    UNAUTHORIZED = "unauthorized"  # ASSUMPTION (401 observed, reason not)
    RESTRICTED_ROUTE_TIER = "restricted_route_tier"  # I-N56
    NOT_ALLOWED = "not_allowed"  # ASSUMPTION (MRE saw the 403)
    NOT_SUBSCRIBED = "not_subscribed"  # I-N31
    PEOPLE_NOT_FOUND = "people_not_found"  # FW
    NOT_FOUND = "not_found"  # I-N8
    METHOD_NOT_ALLOWED = "method_not_allowed"  # ASSUMPTION (MRE saw the 405, no body)
    PEOPLE_EXISTS = "people_exists"  # FW
    RATE_LIMITED = "rate_limited"  # ASSUMPTION (D-RATE gives statuses only)
    SERVER_ERROR = "server_error"  # ASSUMPTION


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str


# Success answers per kind of operation (ASSUMPTION except GET and DELETE reasons).
OK_GET: Final = Answer(200, Reason.RESOLVED)
OK_LIST: Final = Answer(200, Reason.LISTED)
OK_CREATED: Final = Answer(201, Reason.ADDED)
OK_UPDATED: Final = Answer(200, Reason.UPDATED)
OK_DELETED: Final = Answer(200, Reason.DELETED)
OK_ACCEPTED: Final = Answer(202, Reason.RESOLVED)  # batch, import, export

# Error answers.
INVALID_DATA: Final = Answer(400, Reason.INVALID_DATA)
UNAUTHORIZED: Final = Answer(401, Reason.UNAUTHORIZED)
RESTRICTED_ROUTE_TIER: Final = Answer(401, Reason.RESTRICTED_ROUTE_TIER)  # 401 per I-N42
NOT_ALLOWED: Final = Answer(403, Reason.NOT_ALLOWED)
NOT_SUBSCRIBED: Final = Answer(404, Reason.NOT_SUBSCRIBED)
PEOPLE_NOT_FOUND: Final = Answer(404, Reason.PEOPLE_NOT_FOUND)
NOT_FOUND: Final = Answer(404, Reason.NOT_FOUND)
METHOD_NOT_ALLOWED: Final = Answer(405, Reason.METHOD_NOT_ALLOWED)
PEOPLE_EXISTS: Final = Answer(409, Reason.PEOPLE_EXISTS)  # status ASSUMPTION (could be 400)
RATE_LIMITED: Final = Answer(429, Reason.RATE_LIMITED)
# Quota exhaustion looks exactly like a rate limit (ASSUMPTION, §7); the emulator adds a
# Retry-After up to the next UTC midnight, which the client may use but never relies on.
QUOTA_EXHAUSTED: Final = Answer(429, Reason.RATE_LIMITED)

# Statuses that mean "try again later" (D-RATE: 429/420; I-RB18: 422; GO retries 5xx).
RETRY_LATER_STATUSES: Final = frozenset({420, 422, 429})
# Statuses and reasons after which no further request of the run can succeed.
STOP_RUN_STATUSES: Final = frozenset({401, 403})
STOP_RUN_REASONS: Final = frozenset({Reason.NOT_SUBSCRIBED, Reason.RESTRICTED_ROUTE_TIER,
                                      Reason.UNAUTHORIZED, Reason.NOT_ALLOWED})

# Validation (§4.3 confirmed, §7 assumed).
DATA_KEY_PATTERN: Final = re.compile(r"^[a-z0-9_-]{1,64}$")  # H-DATA rule; length ASSUMPTION
# ASSUMPTION; no control character either (a NUL cannot even be stored in Postgres text)
EMAIL_PATTERN: Final = re.compile(
    r"^[^@\s\x00-\x1f\x7f]+@[^@\s.\x00-\x1f\x7f]+(\.[^@\s.\x00-\x1f\x7f]+)+$")
MAX_EMAIL_LENGTH: Final = 255  # ASSUMPTION
MAX_STRING_LENGTH: Final = 255  # ASSUMPTION: nickname and other profile strings
MAX_NOTEPAD_LENGTH: Final = 10_000  # ASSUMPTION
MAX_SEGMENT_LENGTH: Final = 64  # ASSUMPTION; segments are stored lower-case
MAX_DATA_KEYS: Final = 100  # ASSUMPTION
MAX_DATA_STRING_LENGTH: Final = 1024  # ASSUMPTION
NICKNAME_REQUIRED_ON_CREATE: Final = True  # ASSUMPTION (every example sends it)
# On a people-data merge (PATCH data, PATCH batch/data) an empty string removes the key
# (ASSUMPTION, mirrors the JS SDK rule in H-DATA). This is how the pipeline clears a value.
CLEAR_DATA_VALUE: Final = ""
# PATCH people/profile: `person` and `company` merge sub-fields, `segments` replaces (ASSUMPTION).
# PATCH batch/segments adds the given segments to each profile (ASSUMPTION).
MAX_BATCH_PROFILES: Final = 500  # ASSUMPTION
# A batch naming a people_id that does not exist skips it and still answers 202 (ASSUMPTION:
# batch routes are asynchronous in Crisp and report nothing per profile).
BATCH_SKIPS_UNKNOWN_PROFILES: Final = True
# A profile body with a field Crisp does not know is refused with invalid_data (ASSUMPTION;
# Crisp may instead ignore it). Refusing is the safer emulation: a typo never passes silently.
REJECT_UNKNOWN_PROFILE_FIELDS: Final = True

# Crisp runs on JavaScript (ASSUMPTION, from its JS stack and SDKs): every JSON number is a
# double. `1` and `1.0` are one value and come back as `1`; an integer beyond 2**53 comes back
# rounded. The pipeline refuses such integers (`unsafe_integer`: cast them to text) and
# compares numbers read back by value.
JSON_NUMBERS_ARE_DOUBLES: Final = True
MAX_SAFE_INTEGER: Final = 2**53 - 1
# `sort_field` of the profile listing takes Crisp's search field names (D-LIST: e.g.
# `nickname`); short names resolve under `person.` (ASSUMPTION), full paths and `data.<key>`
# are taken as they are, and a name that is none of these is refused (ASSUMPTION: refusing
# is safer to emulate than silently ignoring it).
SORT_FIELD_SHORT_NAMES: Final = ("nickname", "gender", "phone", "address", "website",
                                 "timezone")
SORT_FIELD_TOP_LEVEL: Final = ("email", "created_at", "updated_at", "segments")

PER_PAGE_MIN: Final = 20  # D-LIST
PER_PAGE_MAX: Final = 50  # D-LIST
PER_PAGE_DEFAULT: Final = 20  # D-LIST
SEARCH_OPERATORS: Final = ("and", "or")  # D-LIST
FILTER_OPERATORS: Final = ("eq", "neq", "gte", "lte", "has", "hasnt")  # ASSUMPTION (only eq seen)


def is_valid_data_key(key: str) -> bool:
    return bool(DATA_KEY_PATTERN.fullmatch(key))


def is_valid_email(email: str) -> bool:
    return len(email) <= MAX_EMAIL_LENGTH and bool(EMAIL_PATTERN.fullmatch(email))


def suggest_data_key(name: str) -> str:
    """A spelling of `name` that Crisp accepts as a people-data key (for error messages)."""
    key = re.sub(r"[^a-z0-9_-]+", "_", name.strip().lower()).strip("_")
    return (key or "attribute")[:64]
