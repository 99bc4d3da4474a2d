"""The operator console over WSGI: who may see it, what it refuses, what its actions do and
record, and that no secret ever leaves in a page. (tests/test_console_browser.py drives the same
pages in a real Chromium.)"""
import json
import logging
import re
from dataclasses import replace

import pytest
from clirun import invoke
from conftest import API_KEY, addresses, submit
from operating import API_TOKEN, CALLBACK_SECRET, PASSWORD, basic, busy_queue, operator_app, secrets_of

from bouncer.app import App
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION
from bouncer.queue.ledger import fail_bouncer_batch
from bouncer.store.database import database, open_database
from bouncer.store.models import AuditEntry, BouncerBatch, Pause, UserBatch
from bouncer.web import create_web_app

CONSOLE_GETS = ["/", "/?user=alice", "/batches/1", "/batches/1/results.csv", "/console/static/console.js"]
CONSOLE_POSTS = ["/check-types/deliverable/pause", "/check-types/deliverable/resume", "/batches/1/cancel",
                 "/bouncer-batches/1/fail"]


@pytest.fixture
def console_app(app):
    return operator_app(app)


@pytest.fixture
def client(console_app):
    return create_web_app(console_app).test_client()


def page(client, path="/"):
    response = client.get(path, headers=basic())
    assert response.status_code == 200, response.data
    return response.get_data(as_text=True)


def csrf_token(html):
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def post(client, path, token, **fields):
    return client.post(path, headers=basic(), data=dict(fields, csrf_token=token, next="/"))


def one_line_error(response, status):
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_data(as_text=True)
    assert body.count("\n") == 1 and "Traceback" not in body
    return json.loads(body)["error"]


# -- who may see it --

@pytest.mark.parametrize("headers", [{}, basic(password="wrong-password"), basic(user="admin"),
                                     basic(password=PASSWORD + "x"), {"Authorization": "Bearer %s" % PASSWORD},
                                     {"Authorization": "Basic not-base64!"}])
def test_console_wants_the_operator_password(client, app, headers):
    submit("alice", ["alice.secret-lead@example.com"])
    for path in CONSOLE_GETS:
        response = client.get(path, headers=headers)
        assert one_line_error(response, 401) == "Unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert "alice" not in response.get_data(as_text=True)
    for path in CONSOLE_POSTS:
        response = client.post(path, headers=headers, data={"reason": "x"})
        assert response.status_code == 401
    assert Pause.select().count() == 0 and AuditEntry.select().count() == 0


def test_console_off_without_operator_password_is_503(app):
    client = create_web_app(app).test_client()
    for path in CONSOLE_GETS:
        response = client.get(path, headers=basic())
        assert one_line_error(response, 503) == "the console is off: set OPERATOR_PASSWORD to turn it on"
    assert client.post(CONSOLE_POSTS[0], headers=basic()).status_code == 503
    assert client.get("/health").status_code == 200      # the rest of the web process is unaffected


def test_one_session_key_for_every_web_process(console_app):
    """A page from one web process, its form posted to another: the key comes from the password."""
    first, second = create_web_app(console_app).test_client(), create_web_app(console_app).test_client()
    token = csrf_token(page(first))
    second.set_cookie("bouncer_console", first.get_cookie("bouncer_console").value)
    response = post(second, "/check-types/catchall/pause", token, reason="maintenance")
    assert response.status_code == 303
    assert Pause.get_by_id("catchall").reason == "maintenance"


def test_the_console_says_when_redis_or_the_database_does_not_answer(console_app, redis_conn):
    redis_down = App(replace(console_app.settings, redis_url="redis://:redis-pw-7a7a@127.0.0.1:1/0"))
    html = page(create_web_app(redis_down).test_client())
    assert "Redis does not answer" in html and "redis-pw-7a7a" not in html
    broken = "postgresql://postgres:db-pw-8b8b@127.0.0.1:1/bouncer_test"
    original = database.obj
    open_database(broken)
    try:
        client = create_web_app(App(replace(console_app.settings, database_url=broken), redis=redis_conn)).test_client()
        responses = [client.get(path, headers=basic()) for path in ("/", "/batches/1")]
    finally:
        database.initialize(original)
    for response in responses:
        assert one_line_error(response, 503) == "the database does not answer"
        assert "db-pw-8b8b" not in response.get_data(as_text=True)


# -- CSRF --

def test_a_post_without_or_with_a_wrong_csrf_token_is_refused(client):
    page(client)
    for data in ({"reason": "x"}, {"reason": "x", "csrf_token": "forged"}):
        response = client.post("/check-types/deliverable/pause", headers=basic(), data=data)
        assert one_line_error(response, 400).startswith("refused: the csrf token")
    assert Pause.select().count() == 0 and AuditEntry.select().count() == 0


def test_the_api_and_the_callback_want_no_csrf_token(client, redis_conn):
    response = client.post("/api/v1/batches", headers={"Authorization": "Bearer %s" % API_TOKEN},
                           json={"user_id": "alice", "check_type": "deliverable", "emails": ["a@example.com"]})
    assert response.status_code == 201
    assert client.post("/bouncer/callback/%s/deliverable" % CALLBACK_SECRET).status_code == 202


# -- actions --

def test_pause_and_resume_are_audited_and_shown(client, app, bouncer):
    submit("alice", addresses("a", 5))
    token = csrf_token(page(client))
    response = post(client, "/check-types/deliverable/pause", token, reason="Bouncer maintenance tonight")
    assert response.status_code == 303 and response.headers["Location"] == "/"
    html = page(client)
    assert "Batch creation paused for deliverable." in html
    assert "Bouncer maintenance tonight" in html and 'data-audit-action="pause"' in html
    assert run_cycle(app, CREATION, "deliverable").stopped == "paused: Bouncer maintenance tonight"
    assert bouncer.count("create") == 0

    assert post(client, "/check-types/deliverable/resume", token).status_code == 303
    assert 'data-audit-action="resume"' in page(client)
    assert len(run_cycle(app, CREATION, "deliverable").created) == 1
    assert [(a.who, a.action, a.target) for a in AuditEntry.select().order_by(AuditEntry.id)] == [
        ("operator", "pause", "deliverable"), ("operator", "resume", "deliverable")]


@pytest.mark.parametrize("target", [
    "//evil.example", "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "/ /evil.example",
    "/\\evil.example", "https://evil.example/", "/x\r\nSet-Cookie: a=b", "", "batches/1", "/\x00/evil.example"])
def test_the_next_page_of_a_console_action_is_a_path_of_this_site_only(client, target):
    token = csrf_token(page(client))
    response = client.post("/check-types/deliverable/resume", headers=basic(),
                           data={"csrf_token": token, "next": target})
    assert (response.status_code, response.headers["Location"]) == (303, "/")


def test_the_next_page_of_a_console_action_may_be_any_page_of_it(client):
    token = csrf_token(page(client))
    response = client.post("/check-types/deliverable/resume", headers=basic(),
                           data={"csrf_token": token, "next": "/batches/7?user=a%20b"})
    assert (response.status_code, response.headers["Location"]) == (303, "/batches/7?user=a%20b")


def test_cancel_from_the_console(client, app):
    batch_id = submit("alice", addresses("a", 5))
    token = csrf_token(page(client, "/batches/%d" % batch_id))
    response = client.post("/batches/%d/cancel" % batch_id, headers=basic(),
                           data={"csrf_token": token, "next": "/batches/%d" % batch_id})
    assert response.status_code == 303 and response.headers["Location"] == "/batches/%d" % batch_id
    assert UserBatch.get_by_id(batch_id).status == "cancelled"
    html = page(client, "/batches/%d" % batch_id)
    assert "5 email(s) not yet sent cancelled" in html and 'id="cancel"' not in html
    # Cancelling again is refused, said on the page, and not recorded as done.
    post(client, "/batches/%d/cancel" % batch_id, token)
    assert "Not cancelled: user batch %d is cancelled: it has ended." % batch_id in page(client)
    assert [(a.action, a.target) for a in AuditEntry.select()] == [("cancel", "user batch %d" % batch_id)]


def test_fail_a_stuck_bouncer_batch_with_the_operators_reason(client, app, bouncer):
    batch_id = submit("alice", addresses("a", 5))
    run_cycle(app, CREATION, "deliverable")
    ledger_id = BouncerBatch.get().id
    token = csrf_token(page(client))
    assert 'action="/bouncer-batches/%d/fail"' % ledger_id in page(client)
    response = post(client, "/bouncer-batches/%d/fail" % ledger_id, token, reason="stuck at Bouncer for 3 days")
    assert response.status_code == 303
    batch = UserBatch.get_by_id(batch_id)
    assert (batch.status, batch.failure_reason) == ("failed", "stuck at Bouncer for 3 days")
    ledger = BouncerBatch.get_by_id(ledger_id)
    assert (ledger.status, ledger.failure_reason) == ("failed", "stuck at Bouncer for 3 days")
    html = page(client)
    assert "Bouncer batch %d failed: 5 email(s) failed with your reason." % ledger_id in html
    assert 'data-audit-action="fail"' in html
    post(client, "/bouncer-batches/%d/fail" % ledger_id, token, reason="again")
    assert "Bouncer batch %d is not outstanding: nothing failed." % ledger_id in page(client)
    assert AuditEntry.select().count() == 1


@pytest.mark.parametrize("method, path, fields, status", [
    ("GET", "/?status=bogus", {}, 400),
    ("GET", "/?hours=5", {}, 400),
    ("GET", "/?before=12x", {}, 400),
    ("GET", "/?user=" + "u" * 301, {}, 400),
    ("GET", "/batches/999", {}, 404),
    ("GET", "/batches/999/results.csv", {}, 404),
    ("GET", "/batches/abc", {}, 404),
    ("POST", "/check-types/unknown/pause", {}, 404),
    ("POST", "/check-types/deliverable/pause", {"reason": "r" * 301}, 400),
    ("POST", "/batches/999/cancel", {}, 404),
    ("POST", "/bouncer-batches/999/fail", {"reason": "x"}, 404),
    ("POST", "/bouncer-batches/1/fail", {"reason": "   "}, 400),
    ("GET", "/check-types/deliverable/pause", {}, 405),
])
def test_bad_input_is_a_one_line_error(client, app, bouncer, method, path, fields, status):
    submit("alice", addresses("a", 3))
    run_cycle(app, CREATION, "deliverable")
    token = csrf_token(page(client))
    if method == "GET":
        response = client.get(path, headers=basic())
    else:
        response = post(client, path, token, **fields)
    one_line_error(response, status)
    assert AuditEntry.select().count() == 0


def test_results_csv_is_the_clis(client, app, bouncer):
    ids = busy_queue(app, bouncer)
    response = client.get("/batches/%d/results.csv" % ids["alice"], headers=basic())
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert 'filename="batch-%d-results.csv"' % ids["alice"] in response.headers["Content-Disposition"]
    cli_csv = invoke(["results", str(ids["alice"])]).stdout_bytes
    assert response.get_data() == cli_csv
    assert b"'=cmd@example.com" in cli_csv            # spreadsheet-safe, as the CLI's


def test_detail_page_shows_rows_bouncer_batches_and_webhooks(client, app, bouncer):
    ids = busy_queue(app, bouncer)
    html = page(client, "/batches/%d" % ids["alice"])
    assert 'data-row-state="done">30<' in html and 'data-row-state="invalid">1<' in html
    assert 'data-row-state="sent">4<' in html
    assert html.count("data-ledger-id=") == 4          # three completed, one in flight
    cancelled = page(client, "/batches/%d" % ids["dave"])
    assert "batch.cancelled" in cancelled and 'data-row-state="cancelled">5<' in cancelled


# -- secrets --

def test_no_secret_in_any_page_or_log_line(client, console_app, app, bouncer, caplog):
    caplog.set_level(logging.INFO)
    ids = busy_queue(app, bouncer)
    # A reason that echoed a secret (an error message quoting its request) is stored as it came.
    outstanding = BouncerBatch.get(BouncerBatch.status == "outstanding")
    fail_bouncer_batch(outstanding.id, "Bouncer refused x-api-key %s" % API_KEY)
    caplog.clear()                                   # what the web process logs from here on
    bodies = [client.get(path, headers=basic()).get_data(as_text=True) for path in (
        "/", "/?hours=1", "/?hours=24", "/?user=alice&status=processing", "/metrics",
        *("/batches/%d" % i for i in ids.values()), *("/batches/%d/results.csv" % i for i in ids.values()))]
    bodies += [client.get("/", headers=h).get_data(as_text=True) for h in ({}, basic(password="nope"))]
    assert "Bouncer refused x-api-key ***" in bodies[0]
    for text in bodies + [caplog.text]:
        for secret in secrets_of(console_app):
            assert secret not in text
    assert PASSWORD in secrets_of(console_app) and API_KEY in secrets_of(console_app)
