"""The emulator answers every people route as CONTRACT.md says Crisp does, over real HTTP."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import pytest

from crisp_pipeline.emulator import EmulatorConfig, FaultPlan, ForcedAnswer, start_in_thread

from .conftest import ADMIN_KEY, OTHER_WEBSITE, PLUGIN, USER, WEBSITE, WEBSITE_TOKEN, TokenSpec


def add(http: httpx.Client, email: str, nickname: str = "N", **fields) -> str:
    response = http.post("people/profile", json={"email": email, "person": {"nickname": nickname},
                                                 **fields})
    assert response.status_code == 201, response.text
    return response.json()["data"]["people_id"]


def assert_error(response: httpx.Response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] is True and body["reason"] == reason, body
    return body


# ---------------------------------------------------------------- envelope and success answers


def test_profile_lifecycle_answers_with_contract_statuses_and_reasons(http):
    created = http.post("people/profile", json={"email": "Ada@Example.com",
                                                "person": {"nickname": "Ada"}})
    assert created.status_code == 201
    assert created.json()["error"] is False and created.json()["reason"] == "added"
    people_id = created.json()["data"]["people_id"]

    got = http.get(f"people/profile/{people_id}")
    assert (got.status_code, got.json()["reason"]) == (200, "resolved")
    profile = got.json()["data"]
    assert profile["email"] == "ada@example.com"  # stored lower-case
    assert profile["person"] == {"nickname": "Ada"}
    assert set(profile) >= {"people_id", "email", "person", "company", "segments", "notepad",
                            "active", "score", "created_at", "updated_at"}

    updated = http.patch(f"people/profile/{people_id}", json={"person": {"phone": "+331"}})
    assert (updated.status_code, updated.json()["reason"]) == (200, "updated")
    listed = http.get("people/profiles/1")
    assert (listed.status_code, listed.json()["reason"]) == (200, "listed")
    stats = http.get("people/stats")
    assert stats.json() == {"error": False, "reason": "resolved", "data": {"total": 1}}

    removed = http.delete(f"people/profile/{people_id}")
    assert (removed.status_code, removed.json()["reason"]) == (200, "deleted")
    assert_error(http.delete(f"people/profile/{people_id}"), 404, "people_not_found")
    assert_error(http.get(f"people/profile/{people_id}"), 404, "people_not_found")


def test_head_answers_status_only(http):
    add(http, "head@x.io")
    found = http.head("people/profile/head@x.io")
    missing = http.head("people/profile/nobody@x.io")
    assert (found.status_code, found.content) == (200, b"")
    assert (missing.status_code, missing.content) == (404, b"")


def test_profile_is_found_by_email_raw_or_percent_encoded_and_plus_is_never_a_space(http):
    people_id = add(http, "a+b@x.io")
    for path in ("people/profile/a+b@x.io", "people/profile/a%2Bb%40x.io",
                 "people/profile/A+B@X.IO"):
        response = http.get(path)
        assert response.status_code == 200, path
        assert response.json()["data"]["people_id"] == people_id
    assert_error(http.get("people/profile/a%20b@x.io"), 404, "people_not_found")


def test_unknown_route_and_wrong_method_answer_json_envelopes(http):
    assert_error(http.get("people/nothing-here"), 404, "not_found")
    assert_error(http.get("people/profile"), 405, "method_not_allowed")


# ---------------------------------------------------------------- credentials, tiers, websites


def test_credentials_are_checked(emulator):
    url = f"{emulator.base_url}website/{WEBSITE}/people/stats"
    plugin = {"X-Crisp-Tier": "plugin"}
    assert_error(httpx.get(url, headers=plugin), 401, "unauthorized")
    assert_error(httpx.get(url, auth=(PLUGIN.identifier, "wrong"), headers=plugin), 401,
                 "unauthorized")
    assert_error(httpx.get(url, auth=("nobody", PLUGIN.key), headers=plugin), 401, "unauthorized")
    # the token pair is right but the tier is not the token's
    assert_error(httpx.get(url, auth=(PLUGIN.identifier, PLUGIN.key),
                           headers={"X-Crisp-Tier": "user"}), 401, "unauthorized")
    # no tier header means `user` (ASSUMPTION): a plugin token is then refused...
    assert_error(httpx.get(url, auth=(PLUGIN.identifier, PLUGIN.key)), 401, "unauthorized")
    # ...and a user token accepted
    assert httpx.get(url, auth=(USER.identifier, USER.key)).status_code == 200
    assert httpx.get(url, auth=(WEBSITE_TOKEN.identifier, WEBSITE_TOKEN.key),
                     headers={"X-Crisp-Tier": "website"}).status_code == 200


def test_unknown_website_is_not_subscribed(emulator):
    url = f"{emulator.base_url}website/not-installed/people/stats"
    assert_error(httpx.get(url, auth=(PLUGIN.identifier, PLUGIN.key),
                           headers={"X-Crisp-Tier": "plugin"}), 404, "not_subscribed")
    other = f"{emulator.base_url}website/{OTHER_WEBSITE}/people/stats"
    assert httpx.get(other, auth=(PLUGIN.identifier, PLUGIN.key),
                     headers={"X-Crisp-Tier": "plugin"}).status_code == 200


@pytest.mark.parametrize("path,body", [
    ("batch/remove", {"people": {"profiles": []}}),
    ("people/export/profiles", {}),
])
def test_user_tier_routes_refuse_plugin_tokens(emulator, http, path, body):
    method = "PATCH" if path.startswith("batch") else "POST"
    assert_error(http.request(method, path, json=body), 401, "restricted_route_tier")
    as_user = httpx.request(method, f"{emulator.base_url}website/{WEBSITE}/{path}", json=body,
                            auth=(USER.identifier, USER.key), headers={"X-Crisp-Tier": "user"})
    assert as_user.status_code == 202, as_user.text


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("body,field", [
    (None, "body is empty"),
    ([{"email": "x@y.io"}], "non-empty JSON object"),
    ({}, "non-empty JSON object"),
    ({"person": {"nickname": "N"}}, "email"),
    ({"email": "not-an-email", "person": {"nickname": "N"}}, "email"),
    ({"email": "a b@x.io", "person": {"nickname": "N"}}, "email"),
    ({"email": "a@x.io"}, "person.nickname"),
    ({"email": "a@x.io", "person": {"nickname": "N" * 256}}, "person.nickname"),
    ({"email": "a@x.io", "person": {"nickname": 12}}, "person.nickname"),
    ({"email": "a@x.io", "person": {"nickname": "N"}, "bogus": 1}, "bogus"),
    ({"email": "a@x.io", "person": {"nickname": "N"}, "notepad": "n" * 10_001}, "notepad"),
    ({"email": "a@x.io", "person": {"nickname": "N"}, "segments": ["s" * 65]}, "segments"),
    ({"email": "a@x.io", "person": {"nickname": "N"}, "data": {"plan": "x"}}, "data"),
])
def test_invalid_profiles_are_refused_with_a_message_naming_the_field(http, body, field):
    if body is None:
        response = http.post("people/profile", content=b"")
    else:
        response = http.post("people/profile", json=body)
    message = assert_error(response, 400, "invalid_data")["data"]["message"]
    assert field in message, message


@pytest.mark.parametrize("values,field", [
    ({"Plan": "pro"}, "data.Plan"),
    ({"has space": 1}, "data.has space"),
    ({"k" * 65: 1}, "data.kkk"),
    ({"tags": ["a"]}, "data.tags"),
    ({"nested": {"a": 1}}, "data.nested"),
    ({"nothing": None}, "data.nothing"),
    ({"long": "x" * 1025}, "data.long"),
])
def test_invalid_people_data_is_refused_with_a_message_naming_the_key(http, values, field):
    add(http, "d@x.io")
    message = assert_error(http.patch("people/data/d@x.io", json={"data": values}), 400,
                           "invalid_data")["data"]["message"]
    assert field in message, message


def test_people_data_needs_its_wrapper_and_a_bounded_number_of_keys(http):
    add(http, "w@x.io")
    assert_error(http.patch("people/data/w@x.io", json={"plan": "pro"}), 400, "invalid_data")
    assert_error(http.put("people/data/w@x.io", json={"data": {f"k{i}": i for i in range(101)}}),
                 400, "invalid_data")
    assert http.put("people/data/w@x.io",
                    json={"data": {f"k{i}": i for i in range(100)}}).status_code == 200


def test_nan_is_not_a_people_data_value(http):
    add(http, "nan@x.io")
    response = http.patch("people/data/nan@x.io", content=b'{"data": {"score": NaN}}',
                          headers={"Content-Type": "application/json"})
    assert "finite" in assert_error(response, 400, "invalid_data")["data"]["message"]


def test_duplicate_email_is_people_exists_on_create_and_on_email_change(http):
    add(http, "one@x.io")
    two = add(http, "two@x.io")
    assert_error(http.post("people/profile", json={"email": "ONE@x.io",
                                                   "person": {"nickname": "N"}}),
                 409, "people_exists")
    assert_error(http.patch(f"people/profile/{two}", json={"email": "one@x.io"}), 409,
                 "people_exists")
    assert http.patch(f"people/profile/{two}", json={"email": "three@x.io"}).status_code == 200
    assert http.head("people/profile/three@x.io").status_code == 200
    assert http.head("people/profile/two@x.io").status_code == 404


# ---------------------------------------------------------------- write semantics


def test_patch_merges_person_and_replaces_segments_while_put_replaces_everything(http):
    people_id = add(http, "m@x.io", "Max", segments=["a", "b"],
                    company={"name": "Acme", "domain": "acme.io"})
    http.patch(f"people/profile/{people_id}", json={"person": {"phone": "1"},
                                                    "segments": ["C"],
                                                    "company": {"name": "Acme 2"}})
    profile = http.get(f"people/profile/{people_id}").json()["data"]
    assert profile["person"] == {"nickname": "Max", "phone": "1"}
    assert profile["segments"] == ["c"]
    assert profile["company"] == {"name": "Acme 2", "domain": "acme.io"}
    http.put(f"people/profile/{people_id}", json={"person": {"nickname": "Maxine"}})
    profile = http.get(f"people/profile/{people_id}").json()["data"]
    assert profile["email"] == "m@x.io"
    assert (profile["person"], profile["company"], profile["segments"]) == (
        {"nickname": "Maxine"}, {}, [])


def test_people_data_put_replaces_patch_merges_and_empty_string_clears(http):
    add(http, "d@x.io")
    http.put("people/data/d@x.io", json={"data": {"plan": "pro", "mrr": 10, "vip": True}})
    http.patch("people/data/d@x.io", json={"data": {"mrr": 12.5, "vip": "", "seats": 3}})
    got = http.get("people/data/d@x.io").json()
    assert got == {"error": False, "reason": "resolved",
                   "data": {"data": {"plan": "pro", "mrr": 12.5, "seats": 3}}}
    http.put("people/data/d@x.io", json={"data": {"only": "this"}})
    assert http.get("people/data/d@x.io").json()["data"]["data"] == {"only": "this"}
    assert http.put("people/data/d@x.io", json={"data": {}}).status_code == 200
    assert http.get("people/data/d@x.io").json()["data"]["data"] == {}


# ---------------------------------------------------------------- listing and search


def test_listing_pages_until_an_empty_page(http):
    for index in range(120):
        add(http, f"p{index:03d}@x.io")
    sizes = [len(http.get(f"people/profiles/{page}", params={"per_page": 50}).json()["data"])
             for page in (1, 2, 3, 4)]
    assert sizes == [50, 50, 20, 0]
    assert len(http.get("people/profiles/1").json()["data"]) == 20  # default per_page
    assert_error(http.get("people/profiles/0"), 404, "not_found")
    assert_error(http.get("people/profiles/1", params={"per_page": 51}), 400, "invalid_data")
    assert_error(http.get("people/profiles/1", params={"per_page": 19}), 400, "invalid_data")
    # GO sends every search key, empty: empty means absent
    go_style = http.get("people/profiles/1?sort_field=&sort_order=&search_operator="
                        "&search_filter=&search_text=")
    assert len(go_style.json()["data"]) == 20


def test_search_filters_text_and_sorting(http):
    add(http, "ann@x.io", "Ann", segments=["vip"])
    add(http, "bob@y.io", "Bob", segments=["trial"])
    add(http, "cid@x.io", "Cid")
    http.patch("people/data/ann@x.io", json={"data": {"plan": "pro", "mrr": 50}})
    http.patch("people/data/bob@y.io", json={"data": {"plan": "free", "mrr": 0}})

    def emails(**params) -> list[str]:
        if "search_filter" in params:
            params["search_filter"] = json.dumps(params["search_filter"])
        response = http.get("people/profiles/1", params=params)
        assert response.status_code == 200, response.text
        return sorted(p["email"] for p in response.json()["data"])

    rule = lambda criterion, operator, *query: {"model": "people", "criterion": criterion,  # noqa: E731
                                                "operator": operator, "query": list(query)}
    assert emails(search_filter=[rule("email", "eq", "BOB@y.io")]) == ["bob@y.io"]
    assert emails(search_filter=[rule("segments", "eq", "vip")]) == ["ann@x.io"]
    assert emails(search_filter=[rule("data.plan", "neq", "pro")]) == ["bob@y.io", "cid@x.io"]
    assert emails(search_filter=[rule("data.mrr", "gte", 10)]) == ["ann@x.io"]
    assert emails(search_filter=[rule("data.mrr", "lte", 10)]) == ["bob@y.io"]
    assert emails(search_filter=[rule("segments", "has")]) == ["ann@x.io", "bob@y.io"]
    assert emails(search_filter=[rule("segments", "hasnt")]) == ["cid@x.io"]
    assert emails(search_filter=[rule("segments", "eq", "vip"), rule("segments", "eq", "trial")],
                  search_operator="or") == ["ann@x.io", "bob@y.io"]
    assert emails(search_filter=[rule("segments", "eq", "vip"), rule("segments", "eq", "trial")]) \
        == []
    assert emails(search_text="BO") == ["bob@y.io"]
    assert emails(search_text="cid") == ["cid@x.io"]
    ordered = http.get("people/profiles/1", params={"sort_field": "person.nickname",
                                                    "sort_order": "descending"}).json()["data"]
    assert [p["person"]["nickname"] for p in ordered] == ["Cid", "Bob", "Ann"]
    # Crisp's search field names (CONTRACT.md §3.1: `sort_field=nickname`), people data,
    # numbers in numeric order; an unknown field is refused, not silently ignored
    def order(sort_field: str, sort_order: str = "ascending") -> list[str]:
        response = http.get("people/profiles/1", params={"sort_field": sort_field,
                                                         "sort_order": sort_order})
        assert response.status_code == 200, response.text
        return [p["email"] for p in response.json()["data"]]
    assert order("nickname", "descending") == ["cid@x.io", "bob@y.io", "ann@x.io"]
    assert order("nickname") == ["ann@x.io", "bob@y.io", "cid@x.io"]
    http.patch("people/data/cid@x.io", json={"data": {"mrr": 9}})
    assert order("data.mrr") == ["bob@y.io", "cid@x.io", "ann@x.io"]  # 0 < 9 < 50
    assert order("email", "descending") == ["cid@x.io", "bob@y.io", "ann@x.io"]
    assert_error(http.get("people/profiles/1", params={"sort_field": "nicknam"}), 400,
                 "invalid_data")
    assert emails(filter_date_start="2000-01-01T00:00:00+00:00") == [
        "ann@x.io", "bob@y.io", "cid@x.io"]
    assert emails(filter_date_end="2000-01-01T00:00:00+00:00") == []
    assert_error(http.get("people/profiles/1", params={"search_filter": "[{"}), 400,
                 "invalid_data")
    assert_error(http.get("people/profiles/1", params={"search_filter": json.dumps(
        [rule("email", "like", "x")])}), 400, "invalid_data")


# ---------------------------------------------------------------- batch and suggestions


def test_batch_data_merges_the_same_values_into_many_people(http):
    ids = [add(http, f"b{i}@x.io") for i in range(3)]
    http.patch("people/data/b0@x.io", json={"data": {"keep": 1, "plan": "free"}})
    response = http.patch("batch/data", json={"people": {"profiles": ids[:2] + ["unknown-id"]},
                                              "data": {"plan": "pro"}})
    assert response.status_code == 202 and response.json()["error"] is False
    assert http.get("people/data/b0@x.io").json()["data"]["data"] == {"keep": 1, "plan": "pro"}
    assert http.get("people/data/b1@x.io").json()["data"]["data"] == {"plan": "pro"}
    assert http.get("people/data/b2@x.io").json()["data"]["data"] == {}
    assert_error(http.patch("batch/data", json={"people": {"profiles": ids},
                                                "data": {"Bad": 1}}), 400, "invalid_data")
    assert_error(http.patch("batch/data", json={"people": {"profiles": ["x"] * 501},
                                                "data": {"a": 1}}), 400, "invalid_data")
    assert_error(http.patch("batch/data", json={"data": {"a": 1}}), 400, "invalid_data")


def test_batch_segments_adds_segments(http):
    ids = [add(http, f"s{i}@x.io", segments=["old"]) for i in range(2)]
    assert http.patch("batch/segments", json={"people": {"profiles": ids},
                                              "segments": ["VIP"]}).status_code == 202
    assert http.get(f"people/profile/{ids[0]}").json()["data"]["segments"] == ["old", "vip"]


def test_batch_remove_by_ids_and_by_search_as_user(emulator, http):
    ids = [add(http, f"r{i}@x.io", segments=["gone"] if i < 2 else []) for i in range(4)]
    with httpx.Client(base_url=f"{emulator.base_url}website/{WEBSITE}/",
                      auth=(USER.identifier, USER.key), headers={"X-Crisp-Tier": "user"}) as user:
        assert user.patch("batch/remove", json={"people": {"profiles": [ids[3]]}}).status_code \
            == 202
        search = {"filter": [{"model": "people", "criterion": "segments", "operator": "eq",
                              "query": ["gone"]}], "operator": "and"}
        assert user.patch("batch/remove", json={"people": {"search": search}}).status_code == 202
    assert [p["email"] for p in emulator.emulator.people(WEBSITE)] == ["r2@x.io"]


def test_suggested_segments_and_data_keys_with_the_legacy_alias(http):
    add(http, "a@x.io", segments=["vip", "paid"])
    add(http, "b@x.io", segments=["vip"])
    http.patch("people/data/a@x.io", json={"data": {"plan": "pro"}})
    expected = [{"segment": "paid", "count": 1}, {"segment": "vip", "count": 2}]
    assert http.get("people/suggest/segments/1").json()["data"] == expected
    assert http.get("people/segments/1").json()["data"] == expected
    assert http.get("people/suggest/data/1").json()["data"] == [{"key": "plan", "count": 1}]
    assert http.request("DELETE", "people/suggest/segment", json={"segment": "vip"}).status_code \
        == 200
    assert http.get("people/suggest/segments/1").json()["data"] == [{"segment": "paid", "count": 1}]
    assert http.request("DELETE", "people/suggest/data", json={"key": "plan"}).status_code == 200
    assert http.get("people/data/a@x.io").json()["data"]["data"] == {}


def test_import_reads_a_csv_by_url(emulator):
    csv_body = b"email;name\nnew@x.io;New\nbad-email;Bad\n"

    class CsvHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(csv_body)))
            self.end_headers()
            self.wfile.write(csv_body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CsvHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        response = httpx.post(
            f"{emulator.base_url}website/{WEBSITE}/people/import/profiles",
            auth=(USER.identifier, USER.key), headers={"X-Crisp-Tier": "user"},
            json={"url": f"http://127.0.0.1:{server.server_port}/people.csv",
                  "mapping": [{"column": 0, "field": "email"},
                              {"column": 1, "field": "person.nickname"}],
                  "options": {"column_separator": ";", "skip_header": True}})
    finally:
        server.shutdown()
    assert response.status_code == 202 and "import_id" in response.json()["data"]
    assert [p["email"] for p in emulator.emulator.people(WEBSITE)] == ["new@x.io"]


# ---------------------------------------------------------------- limits


def test_daily_quota_answers_429_once_spent(emulator, http):
    emulator.emulator.quota.set_spent(PLUGIN.identifier, 4999)  # plugin default: 5000
    assert http.get("people/stats").status_code == 200
    body = assert_error(http.get("people/stats"), 429, "rate_limited")
    assert "quota" in body["data"]["message"]
    # the website token has its own, larger quota
    emulator.emulator.quota.set_spent(WEBSITE_TOKEN.identifier, 9999)
    url = f"{emulator.base_url}website/{WEBSITE}/people/stats"
    auth, tier = (WEBSITE_TOKEN.identifier, WEBSITE_TOKEN.key), {"X-Crisp-Tier": "website"}
    assert httpx.get(url, auth=auth, headers=tier).status_code == 200
    assert httpx.get(url, auth=auth, headers=tier).status_code == 429


def test_quota_is_configurable_and_can_send_retry_after():
    config = EmulatorConfig([WEBSITE], [TokenSpec("t", "k", "plugin", daily_quota=2)],
                            retry_after_header=True, rate_limit_per_second=None)
    with start_in_thread(config) as running:
        url = f"{running.base_url}website/{WEBSITE}/people/stats"
        answers = [httpx.get(url, auth=("t", "k"), headers={"X-Crisp-Tier": "plugin"})
                   for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert 0 < int(answers[2].headers["retry-after"]) <= 86400


@pytest.mark.parametrize("status", [429, 420])
def test_per_second_rate_limit_answers_429_or_420(emulator, http, status):
    emulator.emulator.rate.rate, emulator.emulator.rate.burst = 5.0, 5.0
    emulator.emulator.config.rate_limit_status = status
    statuses = [http.get("people/stats").status_code for _ in range(12)]
    assert statuses[:5] == [200] * 5 and status in statuses[5:]
    time.sleep(0.5)
    assert http.get("people/stats").status_code == 200
    emulator.emulator.rate.reset()
    emulator.emulator.rate.burst = 1.0
    http.get("people/stats")
    assert_error(http.get("people/stats"), status, "rate_limited")


# ---------------------------------------------------------------- faults, log, admin, state


def test_injected_server_errors_change_nothing(emulator, http):
    emulator.emulator.set_faults(FaultPlan(error_rate=1.0))
    response = http.post("people/profile", json={"email": "e@x.io", "person": {"nickname": "E"}})
    assert response.status_code in (500, 503) and response.json()["error"] is True
    emulator.emulator.set_faults(FaultPlan())
    assert emulator.emulator.people(WEBSITE) == []


def test_dropped_connections_before_and_after_processing(emulator, http):
    emulator.emulator.set_faults(FaultPlan(drop_rate=1.0))
    outcomes = []
    for index in range(12):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            http.post("people/profile", json={"email": f"d{index}@x.io",
                                              "person": {"nickname": "D"}})
    emulator.emulator.set_faults(FaultPlan())
    faults = [entry.fault for entry in emulator.emulator.requests()]
    kept = {p["email"] for p in emulator.emulator.people(WEBSITE)}
    for index, fault in enumerate(faults):
        outcomes.append((fault, f"d{index}@x.io" in kept))
    # a drop after processing keeps the write (the answer is what was lost)
    assert all(saved == (fault == "drop_after") for fault, saved in outcomes), outcomes
    assert {"drop_before", "drop_after"} <= set(faults)


def test_latency_slow_bodies_bursts_and_forced_answers(emulator, http):
    emulator.emulator.set_faults(FaultPlan(latency_ms=120, slow_body_ms=100))
    started = time.monotonic()
    assert http.get("people/stats").status_code == 200
    assert time.monotonic() - started >= 0.2
    emulator.emulator.set_faults(FaultPlan(rate_limit_burst=3))
    assert [http.get("people/stats").status_code for _ in range(4)] == [429, 429, 429, 200]
    emulator.emulator.set_faults(FaultPlan(forced=[
        ForcedAnswer(403, "not_allowed", method="POST", times=1)]))
    assert_error(http.post("people/profile", json={"email": "f@x.io",
                                                   "person": {"nickname": "F"}}), 403,
                 "not_allowed")
    assert http.post("people/profile", json={"email": "f@x.io",
                                             "person": {"nickname": "F"}}).status_code == 201


def test_admin_api_reads_the_log_sets_faults_and_resets(emulator, http):
    admin = httpx.Client(base_url=emulator.root_url, headers={"X-Emulator-Admin": ADMIN_KEY})
    add(http, "admin@x.io")
    log = admin.get("/_emulator/requests").json()
    assert [(e["method"], e["status"], e["token"]) for e in log] == [
        ("POST", 201, PLUGIN.identifier)]
    assert PLUGIN.key not in json.dumps(log)
    assert admin.get(f"/_emulator/people/{WEBSITE}").json()[0]["email"] == "admin@x.io"
    assert admin.put("/_emulator/faults", json={"error_rate": 1.0}).json()["error_rate"] == 1.0
    assert http.get("people/stats").status_code in (500, 503)
    assert admin.put(f"/_emulator/quota/{PLUGIN.identifier}", json={"spent": 5000}).json() == {
        "spent": 5000}
    admin.post("/_emulator/reset")
    assert http.get("people/stats").json()["data"] == {"total": 0}
    assert httpx.get(f"{emulator.root_url}/_emulator/requests").status_code == 404  # no key


def test_state_persists_across_restarts_and_ids_are_deterministic(tmp_path):
    state = tmp_path / "crisp.json"

    def config():
        return EmulatorConfig([WEBSITE], [PLUGIN], seed=42, state_file=state,
                              rate_limit_per_second=None)

    def create(running, email):
        return httpx.post(f"{running.base_url}website/{WEBSITE}/people/profile",
                          auth=(PLUGIN.identifier, PLUGIN.key), headers={"X-Crisp-Tier": "plugin"},
                          json={"email": email, "person": {"nickname": "S"}}).json()["data"]

    with start_in_thread(config()) as running:
        first = create(running, "kept@x.io")["people_id"]
    with start_in_thread(config()) as running:
        assert [p["people_id"] for p in running.emulator.people(WEBSITE)] == [first]
        second = create(running, "next@x.io")["people_id"]
    state.unlink()
    with start_in_thread(config()) as running:  # same seed, same ids
        assert create(running, "kept@x.io")["people_id"] == first
        assert create(running, "next@x.io")["people_id"] == second


def test_a_loaded_state_is_started_from_and_never_written(tmp_path):
    """`--load`: a benchmark's million people are read once; writes never rewrite the file."""
    state = tmp_path / "crisp.json"
    with start_in_thread(EmulatorConfig([WEBSITE], [PLUGIN], seed=1, state_file=state,
                                        rate_limit_per_second=None)) as running:
        httpx.post(f"{running.base_url}website/{WEBSITE}/people/profile",
                   auth=(PLUGIN.identifier, PLUGIN.key), headers={"X-Crisp-Tier": "plugin"},
                   json={"email": "seed@x.io", "person": {"nickname": "S"}})
    written = state.read_bytes()
    with start_in_thread(EmulatorConfig([WEBSITE], [PLUGIN], initial_state=state,
                                        rate_limit_per_second=None)) as running:
        assert [p["email"] for p in running.emulator.people(WEBSITE)] == ["seed@x.io"]
        httpx.post(f"{running.base_url}website/{WEBSITE}/people/profile",
                   auth=(PLUGIN.identifier, PLUGIN.key), headers={"X-Crisp-Tier": "plugin"},
                   json={"email": "later@x.io", "person": {"nickname": "L"}})
        time.sleep(1.5)  # longer than the periodic flush of a --state emulator
        assert len(running.emulator.people(WEBSITE)) == 2
    assert state.read_bytes() == written


def test_numbers_are_kept_as_javascript_keeps_them(http):
    """Crisp runs on JavaScript: `1.0` and `1` are one number, an integer beyond 2**53 is
    rounded (contract.JSON_NUMBERS_ARE_DOUBLES)."""
    add(http, "num@x.io", "Num")
    http.patch("people/data/num@x.io", content=b'{"data": {"a": 1.0, "b": 9007199254740993, '
               b'"c": 2.5e-05, "d": 1e21}}', headers={"Content-Type": "application/json"})
    held = http.get("people/data/num@x.io").json()["data"]["data"]
    assert held == {"a": 1, "b": 9007199254740992, "c": 2.5e-05, "d": 1e21}
    raw = http.get("people/data/num@x.io").text
    assert '"a":1,' in raw.replace(" ", "") and '"b":9007199254740992' in raw.replace(" ", "")
