"""Crisp's own Python client (`crisp-api` on PyPI) works against the emulator unchanged:
only the REST host differs. This is the emulator's fidelity check from the other side."""

from __future__ import annotations

import json

import pytest
from crisp_api import Crisp
from crisp_api.errors.route import RouteError

from .conftest import PLUGIN, USER, WEBSITE


def official_client(emulator, token=PLUGIN) -> Crisp:
    client = Crisp()
    client.set_rest_host(emulator.root_url)
    client.authenticate(token.identifier, token.key)
    client.set_tier(token.tier)
    return client


@pytest.fixture
def crisp(emulator):
    client = official_client(emulator)
    yield client
    Crisp.REQUEST_HEADERS.pop("X-Crisp-Tier", None)  # set_tier writes to the class


def test_create_find_update_and_remove_a_profile(crisp):
    website = crisp.website
    created = website.add_new_people_profile(WEBSITE, {"email": "grace+ops@x.io",
                                                       "person": {"nickname": "Grace"}})
    people_id = created["people_id"]
    # the official client puts the email raw in the path, `+` included
    found = website.get_people_profile(WEBSITE, "grace+ops@x.io")
    assert found["people_id"] == people_id and found["person"]["nickname"] == "Grace"
    assert website.check_people_profile_exists(WEBSITE, "grace+ops@x.io") == {}

    website.update_people_profile(WEBSITE, people_id, {"person": {"phone": "+33 1"},
                                                       "company": {"name": "Navy"}})
    profile = website.get_people_profile(WEBSITE, people_id)
    assert profile["person"] == {"nickname": "Grace", "phone": "+33 1"}
    assert profile["company"] == {"name": "Navy"}
    website.save_people_profile(WEBSITE, people_id, {"email": "grace@x.io",
                                                     "person": {"nickname": "G"}})
    assert website.get_people_profile(WEBSITE, "grace@x.io")["person"] == {"nickname": "G"}

    assert website.remove_people_profile(WEBSITE, people_id) == {}
    with pytest.raises(RouteError) as missing:
        website.get_people_profile(WEBSITE, people_id)
    assert missing.value.args[0]["message"] == "people_not_found"
    assert missing.value.args[0]["code"] == 404


def test_head_of_a_missing_profile_is_an_error_for_the_official_client(crisp):
    with pytest.raises(RouteError) as missing:
        crisp.website.check_people_profile_exists(WEBSITE, "nobody@x.io")
    assert missing.value.args[0]["code"] == 404


def test_people_data_save_update_get_and_batch(crisp):
    website = crisp.website
    ids = [website.add_new_people_profile(WEBSITE, {"email": f"d{i}@x.io",
                                                    "person": {"nickname": f"D{i}"}})["people_id"]
           for i in range(3)]
    website.save_people_data(WEBSITE, ids[0], {"data": {"plan": "free", "seats": 2}})
    website.update_people_data(WEBSITE, ids[0], {"data": {"plan": "pro"}})
    assert website.get_people_data(WEBSITE, ids[0]) == {"data": {"plan": "pro", "seats": 2}}

    website.batch_data_items(WEBSITE, {"people": {"profiles": ids}, "data": {"tier": "gold"}})
    assert [website.get_people_data(WEBSITE, i)["data"]["tier"] for i in ids] == ["gold"] * 3
    website.batch_segments_items(WEBSITE, {"people": {"profiles": ids[:1]}, "segments": ["vip"]})
    assert website.list_people_segments(WEBSITE, 1) == [{"segment": "vip", "count": 1}]


def test_list_search_and_stats(crisp):
    website = crisp.website
    for index in range(25):
        website.add_new_people_profile(WEBSITE, {"email": f"l{index:02d}@x.io",
                                                 "person": {"nickname": f"L{index}"}})
    assert website.get_people_statistics(WEBSITE) == {"total": 25}
    assert len(website.list_people_profiles(WEBSITE, 1)) == 20
    assert len(website.list_people_profiles(WEBSITE, 2)) == 5
    assert website.list_people_profiles(WEBSITE, 3) == []
    # search_filter goes raw into the query string
    rule = json.dumps([{"model": "people", "criterion": "email", "operator": "eq",
                        "query": ["l07@x.io"]}])
    found = website.search_people_profiles(WEBSITE, 1, rule)
    assert [p["email"] for p in found] == ["l07@x.io"]


def test_errors_surface_reason_and_message(crisp, emulator):
    website = crisp.website
    with pytest.raises(RouteError) as invalid:
        website.add_new_people_profile(WEBSITE, {"email": "not-an-email",
                                                 "person": {"nickname": "N"}})
    error = invalid.value.args[0]
    assert (error["code"], error["message"]) == (400, "invalid_data")
    assert "not a valid email" in error["data"]["message"]

    website.add_new_people_profile(WEBSITE, {"email": "dup@x.io", "person": {"nickname": "N"}})
    with pytest.raises(RouteError) as exists:
        website.add_new_people_profile(WEBSITE, {"email": "dup@x.io",
                                                 "person": {"nickname": "N"}})
    assert exists.value.args[0]["message"] == "people_exists"

    with pytest.raises(RouteError) as tier:
        website.batch_remove_items(WEBSITE, {"people": {"profiles": []}})
    assert tier.value.args[0]["message"] == "restricted_route_tier"

    wrong = Crisp()
    wrong.set_rest_host(emulator.root_url)
    wrong.authenticate(PLUGIN.identifier, "wrong-key")
    with pytest.raises(RouteError) as unauthorized:
        wrong.website.get_people_statistics(WEBSITE)
    assert (unauthorized.value.args[0]["code"], unauthorized.value.args[0]["message"]) == (
        401, "unauthorized")


def test_user_tier_batch_remove(emulator):
    client = official_client(emulator, USER)
    try:
        website = client.website
        ids = [website.add_new_people_profile(WEBSITE, {"email": f"u{i}@x.io",
                                                        "person": {"nickname": "U"}})["people_id"]
               for i in range(2)]
        website.batch_remove_items(WEBSITE, {"people": {"profiles": ids}})
        assert website.get_people_statistics(WEBSITE) == {"total": 0}
    finally:
        Crisp.REQUEST_HEADERS.pop("X-Crisp-Tier", None)
