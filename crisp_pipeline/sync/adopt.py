"""Adoption: people already in Crisp whom we have never written are matched by email, read,
and taken into the snapshot with what Crisp holds, so that the change set updates them
instead of creating a duplicate.

Requests are the scarce resource, so the cheaper way is chosen: one `GET people/profile/{email}`
per unknown person, or listing the whole website (`people/stats` plus one page per 50 people)
when that takes fewer requests — typically on a first run, or in update_only mode where people
absent from Crisp stay unknown from run to run. Either way, people found cost one more
request each when people data are managed (there is no batch read of people data).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from crisp_pipeline.changes import fields as crisp_fields
from crisp_pipeline.crisp import CrispClient, RetryLater, RowRejected, contract

from .profiles import held_values


@dataclass(frozen=True)
class Adopted:
    identifier: str
    people_id: str
    email: str
    held: dict[str, str]
    created_at_ms: float | None = None  # when Crisp created the profile


@dataclass
class AdoptionResult:
    adopted: list[Adopted]
    unanswered: int  # lookups that failed for now; such people are planned as creates
    method: str  # "lookup" or "listing"


async def _listed(client: CrispClient, emails: set[str]) -> dict[str, dict]:
    found = {}
    async for profile in client.iter_profiles(per_page=contract.PER_PAGE_MAX):
        email = str(profile.get("email", "")).lower()
        if email in emails:
            found[email] = profile
    return found


async def adopt_by_email(client: CrispClient, people: list[tuple[str, str]],
                         fields: list[str]) -> AdoptionResult:
    """Find each (identifier, email) in Crisp, by whichever way costs fewer requests."""
    wants_data = any(crisp_fields.is_data_field(field) for field in fields)
    method = "lookup"
    profiles: dict[str, dict | None | RetryLater] = {}
    try:
        if len(people) > 2:
            pages = math.ceil(await client.people_count() / contract.PER_PAGE_MAX) + 1
            if pages < len(people):
                method = "listing"
                listed = await _listed(client, {email for _, email in people})
                profiles = {email: listed.get(email) for _, email in people}
    except RetryLater as error:
        profiles = {email: error for _, email in people}

    async def look_up(email: str) -> dict | None | RetryLater:
        try:
            return await client.get_profile(email)
        except RetryLater as error:
            return error
        except RowRejected:
            # Crisp refused this one lookup (an email it cannot take in a path, e.g. with a
            # `/`): nobody found; the create that follows succeeds or is that row's rejection,
            # and the other rows go on
            return None

    missing = [email for _, email in people if email not in profiles]
    for email, profile in zip(missing, await asyncio.gather(*(look_up(e) for e in missing)),
                              strict=True):
        profiles[email] = profile

    async def adopt(identifier: str, email: str) -> Adopted | None | RetryLater:
        profile = profiles[email]
        if profile is None or isinstance(profile, RetryLater):
            return profile
        try:
            data = await client.get_data(profile["people_id"]) if wants_data else None
        except RetryLater as error:
            return error
        except RowRejected:  # gone between the two reads: nobody to adopt
            return None
        created_at = profile.get("created_at")
        return Adopted(identifier, profile["people_id"], str(profile.get("email", email)),
                       held_values(profile, data, fields),
                       float(created_at) if isinstance(created_at, int | float) else None)

    results = await asyncio.gather(*(adopt(i, e) for i, e in people))
    return AdoptionResult(adopted=[r for r in results if isinstance(r, Adopted)],
                          unanswered=sum(1 for r in results if isinstance(r, RetryLater)),
                          method=method)
