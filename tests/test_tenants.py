"""Tenants on the HTTP door (design.md): each API token lists, reads and cancels only the batches
it created; another's batch, and one made by the CLI or the SQL door, answers as a batch that does
not exist, on every API route that names a batch; an operator token sees them all."""
import json

import pytest
from conftest import submit as cli_submit
from conftest import with_settings
from operating import host_batch

from bouncer.store.models import UserBatch
from bouncer.web import create_web_app

ALICE_APP = "tok-alice-app-1a2b3c4d"
BOB_APP = "tok-bob-app-5e6f7a8b"
OPERATOR = "tok-operator-9c0d1e2f"
EMAILS = ["a@example.com", "b@example.com"]


@pytest.fixture
def web(app):
    return create_web_app(with_settings(app, api_tokens=(ALICE_APP, BOB_APP), api_operator_tokens=(OPERATOR,)))


@pytest.fixture
def client(web):
    return web.test_client()


def auth(token):
    return {"Authorization": "Bearer %s" % token}


def api_submit(client, token, user_id="alice"):
    response = client.post("/api/v1/batches", headers=auth(token), content_type="application/json",
                           data=json.dumps({"user_id": user_id, "check_type": "deliverable", "emails": EMAILS}))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["batch_id"]


@pytest.fixture
def batches(client):
    """One batch of each origin: {origin: id}."""
    return {"alice": api_submit(client, ALICE_APP), "bob": api_submit(client, BOB_APP, user_id="bob"),
            "cli": cli_submit("carol", EMAILS), "sql": host_batch("dave", EMAILS)}


def routes_naming_a_batch(web):
    """(method, path template) of every API route with a batch id in its path, whatever routes
    the API has (a route added later is covered too)."""
    found = []
    for rule in web.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") and "<int:batch_id>" in rule.rule:
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                found.append((method, rule.rule.replace("<int:batch_id>", "%d")))
    return found


def test_every_api_route_naming_a_batch_is_covered(web):
    assert set(routes_naming_a_batch(web)) >= {
        ("GET", "/api/v1/batches/%d"), ("GET", "/api/v1/batches/%d/results"), ("POST", "/api/v1/batches/%d/cancel")}


@pytest.mark.parametrize("token, others", [(ALICE_APP, ("bob", "cli", "sql")), (BOB_APP, ("alice", "cli", "sql"))])
def test_another_tokens_batch_answers_as_one_that_does_not_exist_on_every_route(web, client, batches, token,
                                                                                 others):
    for method, path in routes_naming_a_batch(web):
        missing = client.open(path % 999_999, method=method, headers=auth(token))
        assert missing.status_code == 404
        for origin in others:
            answer = client.open(path % batches[origin], method=method, headers=auth(token))
            assert (answer.status_code, answer.get_data()) == (404, missing.get_data()), (method, path, origin)
    # Nothing was done to them: none cancelled, none erased.
    assert {b.id: b.status for b in UserBatch.select()} == {i: ("queued" if origin != "sql" else "new")
                                                            for origin, i in batches.items()}


def test_a_token_reads_and_cancels_its_own(client, batches):
    own = batches["alice"]
    assert client.get("/api/v1/batches/%d" % own, headers=auth(ALICE_APP)).get_json()["batch_id"] == own
    results = client.get("/api/v1/batches/%d/results" % own, headers=auth(ALICE_APP), buffered=True)
    assert [r["email"] for r in results.get_json()] == EMAILS
    cancelled = client.post("/api/v1/batches/%d/cancel" % own, headers=auth(ALICE_APP))
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"


def listed(client, token, query=""):
    return [b["batch_id"] for b in client.get("/api/v1/batches%s" % query, headers=auth(token)).get_json()["batches"]]


def test_a_token_lists_only_its_own_batches(client, batches):
    assert listed(client, ALICE_APP) == [batches["alice"]]
    assert listed(client, BOB_APP) == [batches["bob"]]
    assert listed(client, BOB_APP, "?user_id=alice") == []          # a filter never widens the view
    second = api_submit(client, ALICE_APP)
    first_page = client.get("/api/v1/batches?limit=1", headers=auth(ALICE_APP)).get_json()
    assert [b["batch_id"] for b in first_page["batches"]] == [second] and first_page["next_before"] == second
    assert listed(client, ALICE_APP, "?limit=1&before=%d" % second) == [batches["alice"]]


def test_an_operator_token_sees_reads_and_cancels_every_batch(web, client, batches):
    assert sorted(listed(client, OPERATOR)) == sorted(batches.values())
    for origin, batch_id in batches.items():
        for method, path in routes_naming_a_batch(web):
            if method == "GET":
                assert client.get(path % batch_id, headers=auth(OPERATOR)).status_code == 200, (path, origin)
    assert client.post("/api/v1/batches/%d/cancel" % batches["cli"], headers=auth(OPERATOR)).status_code == 200


def test_an_operators_own_submit_is_its_own_and_hidden_from_other_tokens(client):
    batch_id = api_submit(client, OPERATOR)
    assert listed(client, OPERATOR) == [batch_id] and listed(client, ALICE_APP) == []
    assert client.get("/api/v1/batches/%d" % batch_id, headers=auth(ALICE_APP)).status_code == 404


def test_a_batch_keeps_a_digest_of_its_token_never_the_token(client, batches):
    stored = {b.id: b.api_token_digest for b in UserBatch.select()}
    assert stored[batches["cli"]] is None and stored[batches["sql"]] is None
    assert stored[batches["alice"]] != stored[batches["bob"]]
    assert all(len(d) == 64 and ALICE_APP not in d and BOB_APP not in d for d in stored.values() if d)
