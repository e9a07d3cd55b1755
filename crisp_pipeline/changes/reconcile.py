"""How a reconcile spends its requests (pure arithmetic, no I/O).

Two ways to re-read the people we manage:
- *lookup*: `GET people/profile/{people_id}` per person (one request each);
- *listing*: `GET people/profiles/{page}` over the whole website, 50 people a request, which
  re-reads every managed person's profile at once, but costs as much for the people we do not
  manage as for those we do.
People data have no listing: each person's is one `GET people/data/{people_id}`.

`choose` picks the way that *fully* verifies (profile and data) the most people within the
allowance, and on a tie the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

from crisp_pipeline.crisp import contract

PAGE = contract.PER_PAGE_MAX


def listing_requests(website_people: int) -> int:
    """Pages read until a short one: a last full page needs one more, empty, page."""
    return website_people // PAGE + 1


@dataclass(frozen=True)
class ReconcileChoice:
    method: str  # "none", "lookup" or "listing"
    verified: int  # people whose every managed field will be read, oldest-verified first
    requests: int  # what it costs when every request is answered the first time

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "people": self.verified, "requests": self.requests}


NOTHING = ReconcileChoice("none", 0, 0)


def worth_counting(managed: int, allowance: int | None, wants_data: bool) -> bool:
    """Whether asking Crisp how many people the website holds (one request, to price a
    listing) can pay off: lookups cannot cover everyone, and a listing could fit."""
    per_person = 2 if wants_data else 1
    if managed == 0:
        return False
    if allowance is None:
        return managed > PAGE
    lookups = allowance // per_person
    return lookups < managed and allowance - 1 >= listing_requests(managed)


def choose(managed: int, allowance: int | None, wants_data: bool,
           website_people: int | None = None) -> ReconcileChoice:
    """The cheapest way to fully verify the most managed people. `allowance` None: everyone
    (a full reconcile); `website_people` None: the listing was not priced (not worth it)."""
    per_person = 2 if wants_data else 1
    if managed == 0 or allowance == 0:
        return NOTHING
    budget = managed * per_person if allowance is None else allowance
    looked_up = min(managed, budget // per_person)
    lookup = ReconcileChoice("lookup", looked_up, looked_up * per_person)
    if website_people is None:
        return lookup if looked_up else NOTHING
    pages = listing_requests(website_people)
    if allowance is None:
        listing = ReconcileChoice("listing", managed, pages + (managed if wants_data else 0))
        return listing if listing.requests < lookup.requests else lookup
    if pages > allowance:
        return lookup if looked_up else NOTHING
    read = min(managed, allowance - pages) if wants_data else managed
    listing = ReconcileChoice("listing", read, pages + (read if wants_data else 0))
    if listing.verified > lookup.verified or (listing.verified == lookup.verified
                                              and listing.requests < lookup.requests):
        return listing
    return lookup if looked_up else NOTHING


def allowance_for(budget_share: float, max_requests: int, left_today: int | None) -> int:
    """A rolling reconcile's requests: a share of what the token has left today, capped."""
    if left_today is None:
        return max_requests
    return max(0, min(max_requests, int(left_today * budget_share)))


def full_cost(managed: int, wants_data: bool, website_people: int | None) -> ReconcileChoice:
    """What reconciling everyone would cost now (for the plan, before anyone asks for it)."""
    return choose(managed, None, wants_data, website_people)
