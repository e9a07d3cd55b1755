"""The emulator's people: profiles and their data, per website, strongly consistent.

Bodies reach the store already validated (see `validation`); the store enforces what needs
the state: unique emails, known people, the number of data keys. Ids are deterministic when a
seed is given, so tests and the demo can be replayed. `dump`/`load` give the JSON the
`--state FILE` option persists.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crisp_pipeline.crisp import contract

from .validation import InvalidData


class PeopleNotFound(LookupError):
    pass


class PeopleExists(ValueError):
    pass


def sort_path(sort_field: str) -> str:
    """The profile path a listing's `sort_field` names (Crisp's search field names, see
    `contract.SORT_FIELD_SHORT_NAMES`); an unknown name is refused, never silently ignored."""
    from crisp_pipeline.changes.fields import PROFILE_FIELDS

    if sort_field in contract.SORT_FIELD_SHORT_NAMES:
        return f"person.{sort_field}"
    if (sort_field in contract.SORT_FIELD_TOP_LEVEL or sort_field in PROFILE_FIELDS
            or (sort_field.startswith("data.") and contract.is_valid_data_key(sort_field[5:]))):
        return sort_field
    raise InvalidData(f"sort_field: {sort_field!r} is not a field people can be sorted by")


def now_ms() -> int:
    return int(time.time() * 1000)


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """Nested objects merge key by key; every other value (lists included) replaces."""
    merged = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class Website:
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # creation order
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_email: dict[str, str] = field(default_factory=dict)


class PeopleStore:
    def __init__(self, website_ids: list[str], seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self.websites: dict[str, Website] = {website_id: Website() for website_id in website_ids}

    # ---------------------------------------------------------------- lookups

    def has_website(self, website_id: str) -> bool:
        return website_id in self.websites

    def resolve(self, website_id: str, people_id_or_email: str) -> str:
        """The people_id behind an id or an email (case-insensitive), or PeopleNotFound."""
        site = self.websites[website_id]
        if "@" in people_id_or_email:
            people_id = site.by_email.get(people_id_or_email.lower())
        else:
            people_id = people_id_or_email if people_id_or_email in site.profiles else None
        if people_id is None:
            raise PeopleNotFound(people_id_or_email)
        return people_id

    def has_email(self, website_id: str, email: str) -> bool:
        return email.lower() in self.websites[website_id].by_email

    def profile(self, website_id: str, people_id: str) -> dict[str, Any]:
        return copy.deepcopy(self.websites[website_id].profiles[people_id])

    def data(self, website_id: str, people_id: str) -> dict[str, Any]:
        return dict(self.websites[website_id].data[people_id])

    def count(self, website_id: str) -> int:
        return len(self.websites[website_id].profiles)

    # ---------------------------------------------------------------- profile writes

    def _new_id(self) -> str:
        if self.seed is None:
            return str(uuid.uuid4())
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _claim_email(self, site: Website, email: str, people_id: str) -> None:
        owner = site.by_email.get(email)
        if owner is not None and owner != people_id:
            raise PeopleExists(email)

    def create(self, website_id: str, profile: dict[str, Any]) -> str:
        site = self.websites[website_id]
        email = profile["email"]
        if email in site.by_email:
            raise PeopleExists(email)
        people_id = self._new_id()
        stamp = now_ms()
        site.profiles[people_id] = {
            "people_id": people_id,
            "email": email,
            "person": profile.get("person", {}),
            "company": profile.get("company", {}),
            "segments": profile.get("segments", []),
            "notepad": profile.get("notepad", ""),
            "active": {"now": False, "last": profile.get("active", 0)},
            "score": 0,
            "created_at": stamp,
            "updated_at": stamp,
        }
        site.by_email[email] = people_id
        site.data[people_id] = {}
        return people_id

    def _write(self, website_id: str, people_id: str, profile: dict[str, Any],
               replace: bool) -> None:
        site = self.websites[website_id]
        current = site.profiles[people_id]
        email = profile.get("email", current["email"])
        self._claim_email(site, email, people_id)
        if replace:
            updated = {**current, "person": {}, "company": {}, "segments": [], "notepad": ""}
            updated.update(copy.deepcopy({k: v for k, v in profile.items() if k != "active"}))
        else:
            updated = _merge(current, {k: v for k, v in profile.items() if k != "active"})
        if "active" in profile:
            updated["active"] = {"now": False, "last": profile["active"]}
        updated["email"] = email
        updated["updated_at"] = now_ms()
        del site.by_email[current["email"]]
        site.by_email[email] = people_id
        site.profiles[people_id] = updated

    def save(self, website_id: str, people_id: str, profile: dict[str, Any]) -> None:
        """PUT: every writable field is replaced; the email stays if none is given."""
        self._write(website_id, people_id, profile, replace=True)

    def update(self, website_id: str, people_id: str, profile: dict[str, Any]) -> None:
        """PATCH: given fields change; `person`/`company` merge, `segments` replaces."""
        self._write(website_id, people_id, profile, replace=False)

    def remove(self, website_id: str, people_id: str) -> None:
        site = self.websites[website_id]
        profile = site.profiles.pop(people_id)
        site.data.pop(people_id, None)
        site.by_email.pop(profile["email"], None)

    # ---------------------------------------------------------------- people data

    def _store_data(self, website_id: str, people_id: str, values: dict[str, Any]) -> None:
        if len(values) > contract.MAX_DATA_KEYS:
            raise InvalidData(f"data: at most {contract.MAX_DATA_KEYS} keys per person "
                              f"({len(values)} after this write)")
        site = self.websites[website_id]
        site.data[people_id] = values
        site.profiles[people_id]["updated_at"] = now_ms()

    def save_data(self, website_id: str, people_id: str, values: dict[str, Any]) -> None:
        """PUT people/data: the whole object is replaced."""
        self._store_data(website_id, people_id, dict(values))

    def merge_data(self, website_id: str, people_id: str, values: dict[str, Any]) -> None:
        """PATCH people/data: keys merge; `CLEAR_DATA_VALUE` removes a key."""
        merged = dict(self.websites[website_id].data[people_id])
        for key, value in values.items():
            if value == contract.CLEAR_DATA_VALUE and isinstance(value, str):
                merged.pop(key, None)
            else:
                merged[key] = value
        self._store_data(website_id, people_id, merged)

    def known(self, website_id: str, people_ids: list[str]) -> list[str]:
        """The ids a batch applies to (see `contract.BATCH_SKIPS_UNKNOWN_PROFILES`)."""
        profiles = self.websites[website_id].profiles
        unknown = [people_id for people_id in people_ids if people_id not in profiles]
        if unknown and not contract.BATCH_SKIPS_UNKNOWN_PROFILES:
            raise PeopleNotFound(unknown[0])
        return [people_id for people_id in people_ids if people_id in profiles]

    def add_segments(self, website_id: str, people_id: str, segments: list[str]) -> None:
        profile = self.websites[website_id].profiles[people_id]
        profile["segments"] = sorted(set(profile["segments"]) | set(segments))
        profile["updated_at"] = now_ms()

    # ---------------------------------------------------------------- search

    @staticmethod
    def _field(profile: dict[str, Any], data: dict[str, Any], criterion: str) -> Any:
        if criterion.startswith("data."):
            return data.get(criterion[5:])
        value: Any = profile
        for part in criterion.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    @classmethod
    def _matches(cls, profile: dict[str, Any], data: dict[str, Any], rule: dict[str, Any]) -> bool:
        value = cls._field(profile, data, rule["criterion"])
        query, operator = rule["query"], rule["operator"]
        present = value not in (None, "", [], {})
        if operator == "has":
            return present
        if operator == "hasnt":
            return not present
        values = value if isinstance(value, list) else [value]
        wanted = [str(q).lower() for q in query]
        equal = any(str(v).lower() in wanted for v in values if v is not None)
        if operator == "eq":
            return equal
        if operator == "neq":
            return not equal
        if not present or not query:
            return False
        try:
            left, right = float(value), float(query[0])
        except (TypeError, ValueError):
            left, right = str(value), str(query[0])
        return left >= right if operator == "gte" else left <= right

    def search(self, website_id: str, *, filters: list[dict[str, Any]], operator: str = "and",
               text: str | None = None, date_start: datetime | None = None,
               date_end: datetime | None = None, sort_field: str | None = None,
               sort_order: str | None = None) -> list[dict[str, Any]]:
        site = self.websites[website_id]
        combine = all if operator == "and" else any
        needle = text.lower() if text else None
        start_ms = int(date_start.timestamp() * 1000) if date_start else None
        end_ms = int(date_end.timestamp() * 1000) if date_end else None
        found = []
        for people_id, profile in site.profiles.items():
            data = site.data[people_id]
            if filters and not combine(self._matches(profile, data, rule) for rule in filters):
                continue
            if needle and needle not in profile["email"] and \
                    needle not in str(profile["person"].get("nickname", "")).lower():
                continue
            if start_ms is not None and profile["created_at"] < start_ms:
                continue
            if end_ms is not None and profile["created_at"] > end_ms:
                continue
            found.append(profile)
        if sort_field:
            path = sort_path(sort_field)

            def key(profile: dict[str, Any]) -> tuple[int, Any]:
                value = self._field(profile, site.data[profile["people_id"]], path)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return (1, value)  # numbers in numeric order, after people without one
                return (0, "") if value in (None, "", []) else (2, str(value).lower())
            found.sort(key=key, reverse=sort_order == "descending")
        return found

    def segment_counts(self, website_id: str) -> Counter:
        return Counter(s for p in self.websites[website_id].profiles.values() for s in p["segments"])

    def data_key_counts(self, website_id: str) -> Counter:
        return Counter(key for values in self.websites[website_id].data.values() for key in values)

    def remove_segment(self, website_id: str, segment: str) -> None:
        for profile in self.websites[website_id].profiles.values():
            if segment in profile["segments"]:
                profile["segments"] = [s for s in profile["segments"] if s != segment]

    def remove_data_key(self, website_id: str, key: str) -> None:
        for values in self.websites[website_id].data.values():
            values.pop(key, None)

    # ---------------------------------------------------------------- whole state

    def people(self, website_id: str) -> list[dict[str, Any]]:
        """Every profile with its data under `data` (for tests and the admin route)."""
        site = self.websites[website_id]
        return [{**copy.deepcopy(profile), "data": dict(site.data[people_id])}
                for people_id, profile in site.profiles.items()]

    def reset(self) -> None:
        self._rng = random.Random(self.seed)
        for website_id in self.websites:
            self.websites[website_id] = Website()

    def dump(self) -> dict[str, Any]:
        return {"websites": {website_id: self.people(website_id) for website_id in self.websites},
                "rng": self._rng.getstate() if self.seed is not None else None}

    def load(self, state: dict[str, Any]) -> None:
        for website_id, people in state.get("websites", {}).items():
            site = self.websites.setdefault(website_id, Website())
            for person in people:
                person = dict(person)
                values = person.pop("data", {})
                site.profiles[person["people_id"]] = person
                site.data[person["people_id"]] = values
                site.by_email[person["email"]] = person["people_id"]
        if state.get("rng") is not None and self.seed is not None:
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))
