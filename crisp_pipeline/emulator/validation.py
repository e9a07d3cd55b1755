"""What the emulator accepts in a request body, and the message it gives when it does not.

Shapes come from CONTRACT.md §4.2 (ProfileWrite) and §3.2/§3.5 (data and batch bodies);
limits and patterns from `crisp_pipeline.crisp.contract`. Every refusal is an `InvalidData`
whose message names the field, so that a client can tell the user what to fix.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from crisp_pipeline.crisp import contract


class InvalidData(ValueError):
    """The body is not what Crisp accepts; the message says which field and why."""


Text = Annotated[str, StringConstraints(max_length=contract.MAX_STRING_LENGTH)]


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid" if contract.REJECT_UNKNOWN_PROFILE_FIELDS else "ignore", strict=True)


class Coordinates(_Strict):
    latitude: float | None = None
    longitude: float | None = None


class Geolocation(_Strict):
    country: Text | None = None
    region: Text | None = None
    city: Text | None = None
    coordinates: Coordinates | None = None


class SocialProfile(_Strict):
    type: Text
    handle: Text
    url: Text | None = None


class Employment(_Strict):
    name: Text | None = None
    domain: Text | None = None
    title: Text | None = None
    role: Text | None = None
    seniority: Text | None = None


class Person(_Strict):
    nickname: Text | None = None
    avatar: Text | None = None
    gender: Text | None = None
    phone: Text | None = None
    address: Text | None = None
    description: Text | None = None
    website: Text | None = None
    timezone: Annotated[int, Field(ge=-32768, le=32767)] | None = None
    profiles: list[SocialProfile] | None = None
    employment: Employment | None = None
    geolocation: Geolocation | None = None
    locales: list[Text] | None = None


class Metrics(_Strict):
    employees: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    market_cap: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    raised: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    arr: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None


class Company(_Strict):
    name: Text | None = None
    legal_name: Text | None = None
    domain: Text | None = None
    url: Text | None = None
    description: Text | None = None
    timezone: Annotated[int, Field(ge=-32768, le=32767)] | None = None
    phones: list[Text] | None = None
    emails: list[Text] | None = None
    geolocation: Geolocation | None = None
    metrics: Metrics | None = None
    tags: list[Text] | None = None


Segment = Annotated[str, StringConstraints(min_length=1, max_length=contract.MAX_SEGMENT_LENGTH)]


class ProfileWrite(_Strict):
    email: str | None = None
    person: Person | None = None
    company: Company | None = None
    segments: list[Segment] | None = None
    notepad: Annotated[str, StringConstraints(max_length=contract.MAX_NOTEPAD_LENGTH)] | None = None
    active: Annotated[int, Field(ge=0)] | None = None


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _require_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict) or not body:
        raise InvalidData(f"the body must be a non-empty JSON object ({what})")
    return body


def profile_write(body: Any, *, creating: bool) -> dict[str, Any]:
    """A ProfileWrite body, checked and normalised (email and segments lower-case)."""
    _require_object(body, "a people profile")
    try:
        profile = ProfileWrite.model_validate(body).model_dump(exclude_none=True)
    except ValidationError as error:
        raise InvalidData(_describe(error)) from None
    if "email" in profile:
        email = profile["email"]
        if not contract.is_valid_email(email):
            raise InvalidData(f"email: {email!r} is not a valid email address")
        profile["email"] = email.lower()
    elif creating:
        raise InvalidData("email: a new people profile needs an email")
    if creating and contract.NICKNAME_REQUIRED_ON_CREATE and not profile.get("person", {}).get("nickname"):
        raise InvalidData("person.nickname: a new people profile needs a nickname")
    if "segments" in profile:
        profile["segments"] = sorted({segment.lower() for segment in profile["segments"]})
    return profile


def data_value(key: str, value: Any) -> None:
    if not contract.is_valid_data_key(key):
        raise InvalidData(f"data.{key}: keys are 1-64 characters of a-z, 0-9, '_' and '-'")
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidData(f"data.{key}: numbers must be finite")
        return
    if isinstance(value, str):
        if len(value) > contract.MAX_DATA_STRING_LENGTH:
            raise InvalidData(f"data.{key}: strings are at most "
                              f"{contract.MAX_DATA_STRING_LENGTH} characters ({len(value)} given)")
        return
    kind = "null" if value is None else type(value).__name__
    raise InvalidData(f"data.{key}: values are strings, numbers or booleans, not {kind}")


def data_object(values: Any, where: str = "data") -> dict[str, Any]:
    if not isinstance(values, dict):
        raise InvalidData(f"{where}: must be an object of key/value pairs")
    for key, value in values.items():
        data_value(key, value)
    return values


def people_data_write(body: Any) -> dict[str, Any]:
    """A `{"data": {...}}` body (the wrapper is mandatory: BLOOM PR #740)."""
    if not isinstance(body, dict) or "data" not in body:
        raise InvalidData('the body must be {"data": {key: value, ...}}')
    extra = set(body) - {"data"}
    if extra:
        raise InvalidData(f"unexpected field(s): {', '.join(sorted(extra))}")
    return data_object(body["data"])


def batch_profiles(body: Any) -> list[str]:
    """The `people.profiles` list of a batch body."""
    _require_object(body, "a batch request")
    people = body.get("people")
    if not isinstance(people, dict):
        raise InvalidData("people: must be an object with `profiles` (or `search`)")
    profiles = people.get("profiles")
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise InvalidData("people.profiles: must be a list of people_id strings")
    if len(profiles) > contract.MAX_BATCH_PROFILES:
        raise InvalidData(f"people.profiles: at most {contract.MAX_BATCH_PROFILES} "
                          f"profiles per batch ({len(profiles)} given)")
    return profiles


def search_filters(raw: Any) -> list[dict[str, Any]]:
    """The `search_filter` query parameter: a JSON array of {model, criterion, operator, query}."""
    if not isinstance(raw, list):
        raise InvalidData("search_filter: must be a JSON array")
    filters = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("criterion"), str):
            raise InvalidData(f"search_filter[{index}]: needs a criterion")
        operator = item.get("operator", "eq")
        if operator not in contract.FILTER_OPERATORS:
            raise InvalidData(f"search_filter[{index}].operator: one of "
                              f"{', '.join(contract.FILTER_OPERATORS)}")
        query = item.get("query", [])
        if not isinstance(query, list):
            query = [query]
        filters.append({"criterion": item["criterion"], "operator": operator, "query": query})
    return filters
