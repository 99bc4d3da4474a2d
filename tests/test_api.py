"""The HTTP door, /api/v1 (design.md, "The HTTP door"): every route and every error code, on
both databases, with a real Redis and Bouncer behind `responses`."""
import json

import pytest
from conftest import with_settings
from openapi_spec_validator import validate

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.reading.batches import iter_results
from bouncer.store.models import IdempotencyKey, UserBatch, UserBatchEmail, WebhookDelivery
from bouncer.web import create_web_app

TOKEN = "tok-host-app-3f9a2c71"
OTHER_TOKEN = "tok-other-app-88d1e0b4"
SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaA=="
EMAILS = ["Jane.Doe+x@gmail.com", "not an address", "bob@example.com", "janedoe@googlemail.com"]


@pytest.fixture
def api_app(app):
    return with_settings(app, api_tokens=(TOKEN, OTHER_TOKEN), webhook_secret=SECRET, api_max_emails=50)


@pytest.fixture
def client(api_app):
    return create_web_app(api_app).test_client()


def auth(token=TOKEN, **headers):
    return {"Authorization": "Bearer %s" % token, **headers}


def post_json(client, body, token=TOKEN, **headers):
    return client.post("/api/v1/batches", data=json.dumps(body) if not isinstance(body, (bytes, str)) else body,
                       headers=auth(token, **headers), content_type="application/json")


def submit(client, emails=EMAILS, user_id="alice", check_type="deliverable", **extra):
    return post_json(client, {"user_id": user_id, "check_type": check_type, "emails": emails, **extra})


def visible_batches():
    return UserBatch.select().where(UserBatch.status != "loading").count()


def nothing_written():
    return UserBatch.select().count() == 0 and UserBatchEmail.select().count() == 0


def verify_all(app, bouncer, rounds=3):
    for _ in range(rounds):
        run_cycle(app, CREATION, "deliverable")
        bouncer.complete_now()
        run_cycle(app, STATUS, "deliverable")


# -- tokens --

@pytest.mark.parametrize("method, path", [
    ("POST", "/api/v1/batches"), ("GET", "/api/v1/batches"), ("GET", "/api/v1/batches/1"),
    ("GET", "/api/v1/batches/999"), ("GET", "/api/v1/batches/1/results"), ("POST", "/api/v1/batches/1/cancel"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-123"},
                                     {"Authorization": TOKEN}, {"Authorization": "Basic %s" % TOKEN}])
def test_no_or_wrong_token_is_the_same_401_everywhere(client, method, path, headers):
    submit(client)                       # batch 1 exists; 999 does not: the answers are the same
    response = client.open(path, method=method, headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {"error": "missing or wrong bearer token"}
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_api_off_without_tokens_is_503(app):
    response = create_web_app(app).test_client().get("/api/v1/batches", headers=auth())
    assert response.status_code == 503
    assert response.get_json() == {"error": "the HTTP API is off: set API_TOKENS to turn it on"}


# -- submit: JSON --

def test_submit_json_creates_an_admitted_batch(client):
    response = submit(client)
    assert response.status_code == 201
    body = response.get_json()
    assert body == {"batch_id": body["batch_id"], "accepted": 3, "invalid": 1, "duplicates": 1,
                    "invalid_lines": [{"line": 2, "email": "not an address",
                                       "error": body["invalid_lines"][0]["error"]}]}
    assert response.headers["Location"].endswith("/api/v1/batches/%d" % body["batch_id"])
    batch = UserBatch.get_by_id(body["batch_id"])
    assert (batch.user_id, batch.status, batch.source, batch.total) == ("alice", "queued", "api", 4)
    assert [r["email"] for r in iter_results(batch.id)] == EMAILS


def test_submit_json_in_any_key_order(client):
    body = '{"emails": %s, "check_type": "catchall", "user_id": "bob"}' % json.dumps(EMAILS)
    response = post_json(client, body)
    assert response.status_code == 201
    assert UserBatch.get_by_id(response.get_json()["batch_id"]).check_type == "catchall"


@pytest.mark.parametrize("body, fragment", [
    (b'{"user_id": "a", "check_type": "deliverable", "emails": ["a@x.com"', "not valid JSON"),
    (b"not json at all", "not valid JSON"),
    (b'["a@x.com"]', "JSON object"),
    (b'{"user_id": "a", "check_type": "deliverable", "emails": "a@x.com"}', "list"),
    (b'{"user_id": "a", "check_type": "deliverable", "emails": [1, 2]}', "not a string"),
    (b'{"user_id": "a", "check_type": "deliverable", "emails": ["a@x.com"], "emails": ["b@x.com"]}',
     "the body has emails twice"),
    (b'{"user_id": "a", "user_id": "b", "check_type": "deliverable", "emails": ["a@x.com"]}',
     "the body has user_id twice"),
    (b'{"user_id": "a", "check_type": "deliverable", "emails": ["a@x.com"], "priority": 1}',
     "unknown field 'priority'"),
    (b'{"user_id": "a", "check_type": "deliverable", "emails": [["a@x.com"]]}', "item 1 is not a string"),
])
def test_submit_malformed_json_is_400_and_writes_nothing(client, body, fragment):
    response = post_json(client, body)
    assert response.status_code == 400 and fragment in response.get_json()["error"]
    assert nothing_written()


@pytest.mark.parametrize("body, fragment", [
    ({"check_type": "deliverable", "emails": ["a@x.com"]}, "user_id is required"),
    ({"user_id": "  ", "check_type": "deliverable", "emails": ["a@x.com"]}, "user_id is required"),
    ({"user_id": "a", "check_type": "bogus", "emails": ["a@x.com"]}, "unknown check type"),
    ({"user_id": "a", "emails": ["a@x.com"]}, "check_type is required"),
    ({"user_id": "a\nforged line", "check_type": "deliverable", "emails": ["a@x.com"]}, "control character"),
    ({"user_id": "a", "check_type": "deliverable", "emails": ["nope", ""]}, "no valid address"),
    ({"user_id": "a", "check_type": "deliverable", "emails": []}, "no addresses"),
    ({"user_id": "a", "check_type": "deliverable", "emails": ["a@x.com"], "callback_url": "ftp://x/y"},
     "callback_url must be an http or https URL"),
    ({"user_id": "a", "check_type": "deliverable", "emails": ["a@x.com"], "callback_url": "https://"},
     "callback_url must be an http or https URL"),
    ({"user_id": {"id": "a"}, "check_type": "deliverable", "emails": ["a@x.com"]}, "user_id must be a string"),
    ({"check_type": "deliverable", "emails": ["a@x.com"], "user_id": ["a"]}, "user_id must be a string"),
    ({"user_id": "a", "emails": ["a@x.com"], "check_type": {"is": "deliverable"}}, "check_type must be a string"),
])
def test_submit_refused_is_422_and_leaves_nothing(client, body, fragment):
    response = post_json(client, body)
    assert response.status_code == 422, response.get_json()
    assert fragment in response.get_json()["error"]
    assert nothing_written()


def test_submit_callback_url_without_webhook_secret_is_422(app):
    client = create_web_app(with_settings(app, api_tokens=(TOKEN,))).test_client()
    response = submit(client, callback_url="https://host.example.com/hook")
    assert response.status_code == 422 and "WEBHOOK_SECRET" in response.get_json()["error"]


def test_submit_too_many_rows_is_413_and_wins(client):
    too_many = ["u%d@example.com" % i for i in range(51)]
    response = submit(client, emails=too_many)
    assert response.status_code == 413
    assert response.get_json() == {"error": "more than API_MAX_EMAILS (50) rows"}
    # Several problems at once: 413 wins over the unknown check type.
    assert submit(client, emails=too_many, check_type="bogus").status_code == 413
    assert nothing_written()
    assert submit(client, emails=too_many[:50]).status_code == 201


# -- submit: text and CSV --

def test_submit_text_plain_with_query_fields(client):
    response = client.post("/api/v1/batches?user_id=carol&check_type=deliverable", headers=auth(),
                           data="a@example.com\n\nnot an address\nb@example.com\n", content_type="text/plain")
    assert response.status_code == 201
    assert response.get_json()["invalid_lines"][0]["line"] == 3   # the body's own line numbers
    assert response.get_json()["accepted"] == 2


def test_submit_csv_with_bom_and_crlf_numbers_lines_from_the_header(client):
    body = b"\xef\xbb\xbfName,EMAIL\r\nA,a@example.com\r\nB,broken\r\nC,c@example.com\r\n"
    response = client.post("/api/v1/batches?user_id=dave&check_type=catchall", headers=auth(), data=body,
                           content_type="text/csv")
    assert response.status_code == 201
    body = response.get_json()
    assert (body["accepted"], body["invalid"]) == (2, 1)
    assert body["invalid_lines"][0]["line"] == 3 and body["invalid_lines"][0]["email"] == "broken"
    assert [r["email"] for r in iter_results(body["batch_id"])] == ["a@example.com", "broken", "c@example.com"]


@pytest.mark.parametrize("content_type", ["text/plain", "text/csv"])
def test_submit_a_line_longer_than_any_address_could_be_is_refused_not_held(client, content_type):
    body = b"email\na@example.com\n" + b"x" * (2 * 1024 * 1024) + b"@example.com\nb@example.com\n"
    response = client.post("/api/v1/batches?user_id=a&check_type=deliverable", headers=auth(), data=body,
                           content_type=content_type)
    assert response.status_code == 422
    assert response.get_json() == {"error": "body: line 3 is longer than 1048576 bytes; no address is"}
    assert nothing_written()


def test_submit_csv_without_email_column_and_unknown_type_are_refused(client):
    response = client.post("/api/v1/batches?user_id=dave&check_type=catchall", headers=auth(),
                           data="name,phone\nA,1\n", content_type="text/csv")
    assert response.status_code == 422 and "email" in response.get_json()["error"]
    response = client.post("/api/v1/batches?user_id=dave&check_type=catchall", headers=auth(),
                           data="a@x.com", content_type="application/xml")
    assert response.status_code == 415
    assert nothing_written()


# -- idempotency --

def test_idempotent_retry_answers_the_same_batch(client):
    first = post_json(client, {"user_id": "a", "check_type": "deliverable", "emails": EMAILS},
                      **{"Idempotency-Key": "k-1"})
    again = post_json(client, {"user_id": "a", "check_type": "deliverable", "emails": EMAILS},
                      **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.get_json() == first.get_json()
    assert visible_batches() == 1 and UserBatch.select().count() == 1   # the retry's slices are gone


def test_same_key_with_another_body_is_409_and_leaves_nothing(client):
    assert post_json(client, {"user_id": "a", "check_type": "deliverable", "emails": EMAILS},
                     **{"Idempotency-Key": "k-2"}).status_code == 201
    conflict = post_json(client, {"user_id": "a", "check_type": "deliverable", "emails": EMAILS[:1]},
                         **{"Idempotency-Key": "k-2"})
    assert conflict.status_code == 409 and "Idempotency-Key" in conflict.get_json()["error"]
    assert UserBatch.select().count() == 1 and IdempotencyKey.select().count() == 1


def test_keys_are_per_token(client):
    body = {"user_id": "a", "check_type": "deliverable", "emails": EMAILS}
    assert post_json(client, body, **{"Idempotency-Key": "shared"}).status_code == 201
    assert post_json(client, body, token=OTHER_TOKEN, **{"Idempotency-Key": "shared"}).status_code == 201
    assert visible_batches() == 2
    assert all(TOKEN not in k.token_digest for k in IdempotencyKey.select())


# -- reading --

def test_status_results_and_list(client, api_app, bouncer):
    batch_id = submit(client).get_json()["batch_id"]
    other = submit(client, user_id="bob").get_json()["batch_id"]
    status = client.get("/api/v1/batches/%d" % batch_id, headers=auth()).get_json()
    assert (status["batch_id"], status["user_id"], status["status"], status["total"]) == (
        batch_id, "alice", "queued", 4)
    assert client.get("/api/v1/batches/999", headers=auth()).status_code == 404

    pending = client.get("/api/v1/batches/%d/results" % batch_id, headers=auth(), buffered=True)
    assert pending.headers["X-Batch-Status"] == "queued"
    assert [r["status"] for r in pending.get_json()] == ["pending", "invalid", "pending", "pending"]
    verify_all(api_app, bouncer)
    done = client.get("/api/v1/batches/%d/results" % batch_id, headers=auth(), buffered=True)
    assert done.headers["X-Batch-Status"] == "completed"
    assert [r["email"] for r in done.get_json()] == EMAILS
    assert done.get_json() == list(iter_results(batch_id))
    as_csv = client.get("/api/v1/batches/%d/results?format=csv" % batch_id, headers=auth(), buffered=True)
    by_accept = client.get("/api/v1/batches/%d/results" % batch_id, headers=auth(Accept="text/csv"), buffered=True)
    assert as_csv.content_type.startswith("text/csv") and as_csv.data == by_accept.data
    assert as_csv.data.decode().splitlines()[0].startswith("email,status,reason")

    listing = client.get("/api/v1/batches?limit=1", headers=auth()).get_json()
    assert [b["batch_id"] for b in listing["batches"]] == [other] and listing["next_before"] == other
    rest = client.get("/api/v1/batches?limit=1&before=%d" % other, headers=auth()).get_json()
    assert [b["batch_id"] for b in rest["batches"]] == [batch_id] and rest["next_before"] is None
    mine = client.get("/api/v1/batches?user_id=bob", headers=auth()).get_json()
    assert [b["user_id"] for b in mine["batches"]] == ["bob"]


# -- cancel --

def test_cancel_before_anything_is_sent_ends_at_once(client, api_app, bouncer):
    batch_id = submit(client).get_json()["batch_id"]
    response = client.post("/api/v1/batches/%d/cancel" % batch_id, headers=auth())
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert response.get_json()["counts"]["cancelled"] == 3
    run_cycle(api_app, CREATION, "deliverable")
    assert bouncer.count("create") == 0
    assert [r["status"] for r in iter_results(batch_id)] == ["cancelled", "invalid", "cancelled", "cancelled"]
    assert client.post("/api/v1/batches/%d/cancel" % batch_id, headers=auth()).status_code == 409
    assert [d.event for d in WebhookDelivery.select()] == ["batch.cancelled"]


def test_cancel_while_in_flight_lets_those_finish(client, api_app, bouncer):
    api = with_settings(api_app, batch_size=2)
    batch_id = submit(client, emails=["a@example.com", "b@example.com", "c@example.com"]).get_json()["batch_id"]
    run_cycle(api, CREATION, "deliverable")           # a and b in flight, c queued (capacity 3 x 2)
    run_cycle(api, CREATION, "deliverable")
    flying = client.get("/api/v1/batches/%d" % batch_id, headers=auth()).get_json()
    assert flying["counts"]["pending"] == 3
    bouncer.fail_next(500, kind="create", count=5)
    response = client.post("/api/v1/batches/%d/cancel" % batch_id, headers=auth())
    assert response.get_json()["status"] == "processing"
    bouncer.complete_now()
    run_cycle(api, STATUS, "deliverable")
    final = client.get("/api/v1/batches/%d" % batch_id, headers=auth()).get_json()
    assert final["status"] == "cancelled" and final["counts"]["pending"] == 0
    assert final["counts"]["cancelled"] == 3 - sum(final["counts"][v] for v in
                                                   ("deliverable", "risky", "undeliverable", "unknown"))
    assert [d.event for d in WebhookDelivery.select()] == ["batch.cancelled"]


@pytest.mark.parametrize("query, message", [
    ("format=xml", "format: must be one of: json, csv"),
    ("format=", "format: must be one of: json, csv"),
])
def test_results_in_a_format_it_has_not_is_refused_naming_it(client, query, message):
    batch_id = submit(client).get_json()["batch_id"]
    response = client.get("/api/v1/batches/%d/results?%s" % (batch_id, query), headers=auth())
    assert response.status_code == 422 and response.get_json() == {"error": message}


def test_a_list_query_refused_by_its_schema_names_the_parameter(client):
    response = client.get("/api/v1/batches?limit=abc", headers=auth())
    assert response.status_code == 422 and response.get_json() == {"error": "limit: not a valid integer"}


def test_cancel_of_a_missing_batch_is_404(client):
    assert client.post("/api/v1/batches/999/cancel", headers=auth()).status_code == 404


# -- the description --

def test_openapi_description_validates_and_lists_every_route(client):
    response = client.get("/api/v1/openapi.json")
    spec = response.get_json()
    validate(spec)
    assert set(spec["paths"]) == {"/api/v1/batches", "/api/v1/batches/{batch_id}",
                                  "/api/v1/batches/{batch_id}/results", "/api/v1/batches/{batch_id}/cancel"}
    assert set(spec["paths"]["/api/v1/batches"]) == {"get", "post"}
    assert set(spec["paths"]["/api/v1/batches"]["post"]["requestBody"]["content"]) == {
        "application/json", "text/plain", "text/csv"}
    for code in ("201", "400", "401", "409", "413", "422", "503"):
        assert code in spec["paths"]["/api/v1/batches"]["post"]["responses"], code


@pytest.mark.parametrize("path, method", [("/api/v1/batches", "get"), ("/api/v1/batches/1", "get"),
                                          ("/api/v1/batches/1/cancel", "post")])
def test_a_database_without_its_schema_is_a_one_line_503_saying_what_to_run(api_app, db, path, method):
    db.execute_sql("ALTER TABLE user_batches RENAME TO user_batches_away")   # as if init-db never ran
    try:
        response = getattr(create_web_app(api_app).test_client(), method)(path, headers=auth())
    finally:
        db.execute_sql("ALTER TABLE user_batches_away RENAME TO user_batches")
    assert response.status_code == 503, response.get_data(as_text=True)
    message = response.get_json()["error"]
    assert message.startswith("the database has no schema yet: run `python -m bouncer init-db`")
    assert "\n" not in message and TOKEN not in message
