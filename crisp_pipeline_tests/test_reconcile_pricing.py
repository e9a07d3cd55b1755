"""How a reconcile spends its requests (pure arithmetic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crisp_pipeline.changes.reconcile import (allowance_for, choose, listing_requests,
                                              worth_counting)


def test_lookups_when_the_website_is_far_larger_than_the_people_we_manage():
    choice = choose(managed=30, allowance=20, wants_data=True, website_people=2000)
    assert (choice.method, choice.verified, choice.requests) == ("lookup", 10, 20)


def test_a_listing_when_it_verifies_more_for_the_same_requests():
    choice = choose(managed=260, allowance=20, wants_data=False, website_people=260)
    assert (choice.method, choice.verified, choice.requests) == ("listing", 260, 6)
    with_data = choose(managed=260, allowance=20, wants_data=True, website_people=260)
    assert (with_data.method, with_data.verified, with_data.requests) == ("listing", 14, 20)


def test_a_full_reconcile_takes_the_cheaper_way_for_everyone():
    assert choose(10_000, None, False, 10_000).requests == 201
    assert choose(10_000, None, False, None).requests == 10_000
    assert choose(10, None, True, 1_000_000).method == "lookup"


def test_nothing_to_spend_or_nobody_to_read_reads_nothing():
    assert choose(0, 100, True).method == "none"
    assert choose(100, 0, True).method == "none"
    assert choose(100, 1, True).method == "none"  # one request cannot read a whole person


def test_the_allowance_is_a_share_of_what_is_left_today_capped():
    assert allowance_for(0.1, 500, 4000) == 400
    assert allowance_for(0.1, 500, 10_000) == 500
    assert allowance_for(0.1, 500, None) == 500
    assert allowance_for(0.1, 500, 5) == 0


def test_the_website_is_counted_only_when_a_listing_could_pay_off():
    assert not worth_counting(10, 100, True)  # lookups cover everyone
    assert worth_counting(1000, 100, False)
    assert not worth_counting(100_000, 100, False)  # a listing cannot fit
    assert worth_counting(51, None, False) and not worth_counting(50, None, False)


@given(st.integers(0, 100_000), st.integers(0, 10_000), st.booleans(),
       st.none() | st.integers(0, 1_000_000))
def test_a_choice_never_costs_more_than_the_allowance_nor_verifies_more_than_managed(
        managed, allowance, wants_data, website):
    if website is not None:
        website = max(website, managed)  # the website holds at least the people we manage
    choice = choose(managed, allowance, wants_data, website)
    assert choice.requests <= allowance and choice.verified <= managed
    if choice.method == "listing":
        assert choice.requests >= listing_requests(website)
