"""The people routes of the emulator: one handler per Crisp route, on top of the store.

Each handler gets a `Call` (website, path parameters, query, parsed body) and returns the
contract's success `Answer` with its `data`; refusals are raised (`InvalidData`,
`PeopleNotFound`, `PeopleExists`) and turned into envelopes by `app`. The table `ROUTES` maps
Crisp's paths (relative to `website/{website_id}/`) to handlers, with the route name used for
tier rules and the request log.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from crisp_pipeline.crisp import contract
from crisp_pipeline.crisp.contract import Answer

from . import validation
from .store import PeopleNotFound, PeopleStore
from .validation import InvalidData


class RouteNotFound(LookupError):
    """A path that names no resource (answered 404 `not_found`)."""


@dataclass
class Call:
    store: PeopleStore
    website_id: str
    params: dict[str, str]
    query: dict[str, str]
    body: Any


Result = tuple[Answer, Any]
Handler = Callable[[Call], Result | Awaitable[Result]]


def _page(call: Call) -> int:
    raw = call.params.get("page", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise RouteNotFound(f"page {raw}")  # §7: page < 1 -> 404 not_found
    return int(raw)


def _paged(items: list[Any], page: int, per_page: int) -> list[Any]:
    return items[(page - 1) * per_page: page * per_page]


def _per_page(call: Call) -> int:
    raw = call.query.get("per_page") or str(contract.PER_PAGE_DEFAULT)
    if not raw.isdigit() or not contract.PER_PAGE_MIN <= int(raw) <= contract.PER_PAGE_MAX:
        raise InvalidData(f"per_page: between {contract.PER_PAGE_MIN} and "
                          f"{contract.PER_PAGE_MAX}, not {raw!r}")
    return int(raw)


def _date(call: Call, name: str) -> datetime | None:
    raw = call.query.get(name)
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidData(f"{name}: not an ISO 8601 date ({raw!r})") from None


def _person(call: Call) -> str:
    return call.store.resolve(call.website_id, call.params["people_id"])


# ---------------------------------------------------------------- profiles


def people_stats(call: Call) -> Result:
    return contract.OK_GET, {"total": call.store.count(call.website_id)}


def list_profiles(call: Call) -> Result:
    page, per_page = _page(call), _per_page(call)
    raw_filter = call.query.get("search_filter")
    filters = []
    if raw_filter:
        try:
            filters = validation.search_filters(json.loads(raw_filter))
        except json.JSONDecodeError:
            raise InvalidData("search_filter: not valid JSON") from None
    operator = call.query.get("search_operator") or "and"
    if operator not in contract.SEARCH_OPERATORS:
        raise InvalidData(f"search_operator: 'and' or 'or', not {operator!r}")
    sort_order = call.query.get("sort_order") or None
    if sort_order not in (None, "ascending", "descending"):
        raise InvalidData(f"sort_order: 'ascending' or 'descending', not {sort_order!r}")
    found = call.store.search(
        call.website_id, filters=filters, operator=operator,
        text=call.query.get("search_text") or None,
        date_start=_date(call, "filter_date_start"), date_end=_date(call, "filter_date_end"),
        sort_field=call.query.get("sort_field") or None, sort_order=sort_order)
    return contract.OK_LIST, _paged(found, page, per_page)


def add_profile(call: Call) -> Result:
    profile = validation.profile_write(call.body, creating=True)
    return contract.OK_CREATED, {"people_id": call.store.create(call.website_id, profile)}


def get_profile(call: Call) -> Result:
    return contract.OK_GET, call.store.profile(call.website_id, _person(call))


def check_profile(call: Call) -> Result:
    _person(call)
    return contract.OK_GET, None


def save_profile(call: Call) -> Result:
    profile = validation.profile_write(call.body, creating=False)
    call.store.save(call.website_id, _person(call), profile)
    return contract.OK_UPDATED, {}


def update_profile(call: Call) -> Result:
    profile = validation.profile_write(call.body, creating=False)
    call.store.update(call.website_id, _person(call), profile)
    return contract.OK_UPDATED, {}


def remove_profile(call: Call) -> Result:
    call.store.remove(call.website_id, _person(call))
    return contract.OK_DELETED, {}


# ---------------------------------------------------------------- people data


def get_data(call: Call) -> Result:
    return contract.OK_GET, {"data": call.store.data(call.website_id, _person(call))}


def save_data(call: Call) -> Result:
    values = validation.people_data_write(call.body)
    call.store.save_data(call.website_id, _person(call), values)
    return contract.OK_UPDATED, {}


def update_data(call: Call) -> Result:
    values = validation.people_data_write(call.body)
    call.store.merge_data(call.website_id, _person(call), values)
    return contract.OK_UPDATED, {}


# ---------------------------------------------------------------- suggestions


def _counts(counter: Any, label: str, call: Call) -> Result:
    items = [{label: key, "count": count} for key, count in sorted(counter.items())]
    return contract.OK_LIST, _paged(items, _page(call), contract.PER_PAGE_DEFAULT)


def list_segments(call: Call) -> Result:
    return _counts(call.store.segment_counts(call.website_id), "segment", call)


def list_data_keys(call: Call) -> Result:
    return _counts(call.store.data_key_counts(call.website_id), "key", call)


def _named(call: Call, name: str) -> str:
    value = call.body.get(name) if isinstance(call.body, dict) else None
    if not isinstance(value, str) or not value:
        raise InvalidData(f"{name}: required")
    return value


def remove_segment(call: Call) -> Result:
    call.store.remove_segment(call.website_id, _named(call, "segment").lower())
    return contract.OK_DELETED, {}


def remove_data_key(call: Call) -> Result:
    call.store.remove_data_key(call.website_id, _named(call, "key"))
    return contract.OK_DELETED, {}


# ---------------------------------------------------------------- batch, import, export


def _batch_targets(call: Call) -> list[str]:
    people = call.body.get("people") if isinstance(call.body, dict) else None
    if isinstance(people, dict) and "search" in people and "profiles" not in people:
        search = people["search"]
        if not isinstance(search, dict):
            raise InvalidData("people.search: an object {filter: [...], operator: 'and'|'or'}")
        found = call.store.search(call.website_id,
                                  filters=validation.search_filters(search.get("filter", [])),
                                  operator=search.get("operator", "and"))
        return [profile["people_id"] for profile in found]
    return call.store.known(call.website_id, validation.batch_profiles(call.body))


def batch_data(call: Call) -> Result:
    targets = _batch_targets(call)
    values = validation.data_object(call.body.get("data"), where="data")
    for people_id in targets:
        call.store.merge_data(call.website_id, people_id, values)
    return contract.OK_ACCEPTED, {}


def batch_segments(call: Call) -> Result:
    targets = _batch_targets(call)
    segments = call.body.get("segments")
    if not isinstance(segments, list) or not all(
            isinstance(s, str) and 0 < len(s) <= contract.MAX_SEGMENT_LENGTH for s in segments):
        raise InvalidData(f"segments: a list of 1-{contract.MAX_SEGMENT_LENGTH} character strings")
    for people_id in targets:
        call.store.add_segments(call.website_id, people_id, [s.lower() for s in segments])
    return contract.OK_ACCEPTED, {}


def batch_remove(call: Call) -> Result:
    for people_id in _batch_targets(call):
        call.store.remove(call.website_id, people_id)
    return contract.OK_ACCEPTED, {}


async def import_profiles(call: Call) -> Result:
    """Fetch the CSV at `url` and add or update a profile per row, as Crisp's importer does."""
    body = call.body if isinstance(call.body, dict) else {}
    url, mapping = body.get("url"), body.get("mapping")
    if not isinstance(url, str) or not isinstance(mapping, list) or not mapping:
        raise InvalidData("url and mapping [{column, field}] are required")
    options = body.get("options") or {}
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(url)).raise_for_status().text
    except httpx.HTTPError as error:
        raise InvalidData(f"url: could not fetch the CSV ({type(error).__name__})") from None
    rows = list(csv.reader(io.StringIO(text), delimiter=options.get("column_separator", ",")))
    if options.get("skip_header"):
        rows = rows[1:]
    for row in rows:
        profile: dict[str, Any] = {}
        for item in mapping:
            value = row[item["column"]] if item["column"] < len(row) else ""
            target = profile
            *parents, leaf = item["field"].split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        try:
            clean = validation.profile_write(profile, creating=True)
            try:
                people_id = call.store.resolve(call.website_id, clean["email"])
                call.store.update(call.website_id, people_id, clean)
            except PeopleNotFound:
                call.store.create(call.website_id, clean)
        except InvalidData:
            continue  # the real importer reports skipped rows over RTM events
    return contract.OK_ACCEPTED, {"import_id": f"import-{len(rows)}"}


def export_profiles(call: Call) -> Result:
    return contract.OK_ACCEPTED, {}


# (path relative to website/{website_id}/, methods -> (route name, handler))
ROUTES: list[tuple[str, dict[str, tuple[str, Handler]]]] = [
    ("people/stats", {"GET": ("people_stats", people_stats)}),
    ("people/profiles", {"GET": ("people_list", list_profiles)}),
    ("people/profiles/{page}", {"GET": ("people_list", list_profiles)}),
    ("people/profile", {"POST": ("people_add", add_profile)}),
    ("people/profile/{people_id}", {
        "HEAD": ("people_check", check_profile), "GET": ("people_get", get_profile),
        "PUT": ("people_save", save_profile), "PATCH": ("people_update", update_profile),
        "DELETE": ("people_remove", remove_profile)}),
    ("people/data/{people_id}", {
        "GET": ("people_data_get", get_data), "PUT": ("people_data_save", save_data),
        "PATCH": ("people_data_update", update_data)}),
    ("people/suggest/segments/{page}", {"GET": ("people_segments", list_segments)}),
    ("people/segments/{page}", {"GET": ("people_segments", list_segments)}),  # legacy alias
    ("people/suggest/segment", {"DELETE": ("people_segment_remove", remove_segment)}),
    ("people/suggest/data/{page}", {"GET": ("people_data_keys", list_data_keys)}),
    ("people/suggest/data", {"DELETE": ("people_data_key_remove", remove_data_key)}),
    ("people/import/profiles", {"POST": ("people_import", import_profiles)}),
    ("people/export/profiles", {"POST": ("people_export", export_profiles)}),
    ("batch/data", {"PATCH": ("batch_data", batch_data)}),
    ("batch/segments", {"PATCH": ("batch_segments", batch_segments)}),
    ("batch/remove", {"PATCH": ("batch_remove", batch_remove)}),
]
