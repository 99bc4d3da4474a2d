"""The operator console over WSGI: who may see it, what it refuses, what its actions do and
record, and that no secret ever leaves in a page. (tests/test_console_browser.py drives the same
pages in a real Chromium.)"""
import json
import logging
import re
from dataclasses import replace

import pytest
from clirun import invoke
from conftest import API_KEY, addresses, submit, with_settings
from operating import API_TOKEN, CALLBACK_SECRET, PASSWORD, basic, busy_queue, operator_app, secrets_of

from bouncer.app import App
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue.ledger import fail_bouncer_batch
from bouncer.store.database import database, open_database
from bouncer.store.models import AuditEntry, BouncerBatch, Pause, UserBatch, UserBatchEmail, UserWeight
from bouncer.web import create_web_app

CONSOLE_GETS = ["/", "/?user=alice", "/batches/1", "/batches/1/results.csv", "/console/static/console.js"]
CONSOLE_POSTS = ["/check-types/deliverable/pause", "/check-types/deliverable/resume", "/batches/1/cancel",
                 "/bouncer-batches/1/finish", "/erasure/user", "/erasure/email", "/weights"]


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


def test_erasure_from_the_console_wants_its_token_and_its_tick(client, app):
    from bouncer.store.models import UserBatchEmail
    submit("alice", ["Jane.Doe@gmail.com", "a@example.com"])
    keep = submit("bob", ["bob@example.com", "janedoe@gmail.com"])
    token = csrf_token(page(client))
    assert 'id="forget-user"' in page(client) and 'id="forget-email"' in page(client)
    for fields in ({"user": "alice", "confirm": "yes"}, {"user": "alice", "confirm": "yes", "csrf_token": "x"}):
        response = client.post("/erasure/user", headers=basic(), data=fields)
        assert one_line_error(response, 400).startswith("refused: the csrf token")
    response = post(client, "/erasure/user", token, user="alice")
    assert one_line_error(response, 400) == "tick the box to confirm: an erasure cannot be undone"
    assert UserBatch.select().count() == 2 and AuditEntry.select().count() == 0

    assert post(client, "/erasure/user", token, user=" alice ", confirm="yes").status_code == 303
    html = page(client)
    assert "The user was erased: 1 user batch(es), 2 row(s)" in html and 'data-audit-action="forget user"' in html
    assert UserBatch.select().count() == 1
    post(client, "/erasure/email", token, email="JaneDoe+x@googlemail.com", confirm="yes")
    assert "The address was erased: 1 row(s)" in page(client)
    assert [r.email for r in UserBatchEmail.select().order_by(UserBatchEmail.position)] == ["bob@example.com", ""]
    post(client, "/erasure/user", token, user="nobody", confirm="yes")
    post(client, "/erasure/email", token, email="not an address", confirm="yes")
    html = page(client)
    assert "Nothing erased: no user batch of user &#39;nobody&#39;" in html
    assert "Nothing erased: not an email address: &#39;not an address&#39;" in html
    assert [(a.who, a.action) for a in AuditEntry.select().order_by(AuditEntry.id)] == [
        ("operator", "forget user"), ("operator", "forget address")]
    assert "alice" not in " ".join(a.target + (a.detail or "") for a in AuditEntry.select())
    assert UserBatch.get_by_id(keep).status == "queued"


def test_a_pruned_batch_page_says_so_and_its_csv_is_gone(client, app, bouncer):
    import datetime

    from bouncer.services import erasure
    batch_id = submit("alice", addresses("a", 3))
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    UserBatch.update(completed_at=datetime.datetime(2020, 1, 1)).where(UserBatch.id == batch_id).execute()
    erasure.prune(app, who="test", days=30)
    html = page(client, "/batches/%d" % batch_id)
    assert 'id="pruned"' in html and "removed after the retention period" in html and 'id="download"' not in html
    response = client.get("/batches/%d/results.csv" % batch_id, headers=basic())
    assert "removed after the retention period" in one_line_error(response, 410)


def test_finish_a_stuck_bouncer_batch_with_the_operators_reason(client, app, bouncer):
    batch_id = submit("alice", addresses("a", 5))
    run_cycle(app, CREATION, "deliverable")
    ledger_id = BouncerBatch.get().id
    [bouncer_id] = bouncer.batches
    bouncer.set_processed(bouncer_id, 3)       # Bouncer verified three before it was stopped
    token = csrf_token(page(client))
    assert 'action="/bouncer-batches/%d/finish"' % ledger_id in page(client)
    response = post(client, "/bouncer-batches/%d/finish" % ledger_id, token, reason="stuck at Bouncer for 3 days")
    assert response.status_code == 303
    html = page(client)
    assert "Bouncer batch %d is being finished at Bouncer" % ledger_id in html
    assert 'data-audit-action="finish"' in html and "finishing" in html
    ledger = BouncerBatch.get_by_id(ledger_id)
    assert (ledger.status, ledger.finish_reason) == ("outstanding", "stuck at Bouncer for 3 days")
    assert 'action="/bouncer-batches/%d/finish"' % ledger_id not in html   # asked once
    post(client, "/bouncer-batches/%d/finish" % ledger_id, token, reason="again")
    assert "Bouncer batch %d is not outstanding, or is being finished already: nothing done." % ledger_id \
        in page(client)
    assert [(a.action, a.detail) for a in AuditEntry.select()] == [("finish", "stuck at Bouncer for 3 days")]

    run_cycle(app, STATUS, "deliverable")      # asks Bouncer to finish it
    run_cycle(app, STATUS, "deliverable")      # Bouncer says completed: its verified part is ingested
    assert bouncer.count("finish") == 1
    rows = list(UserBatchEmail.select().where(UserBatchEmail.batch == batch_id).order_by(UserBatchEmail.position))
    assert [r.status for r in rows] == ["done"] * 3 + ["failed"] * 2
    assert rows[-1].failure_reason == ("Bouncer batch %s was finished before verifying it (stuck at Bouncer for 3 "
                                       "days)" % bouncer_id)
    assert UserBatch.get_by_id(batch_id).status == "completed"
    ledger = BouncerBatch.get_by_id(ledger_id)
    assert (ledger.status, ledger.credits, ledger.refunded) == ("completed", 3, 2)
    assert 'data-credits="3"' in page(client)


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
    ("POST", "/bouncer-batches/999/finish", {"reason": "x"}, 404),
    ("POST", "/bouncer-batches/1/finish", {"reason": "   "}, 400),
    ("POST", "/bouncer-batches/1/fail", {"reason": "x"}, 404),
    ("GET", "/check-types/deliverable/pause", {}, 405),
    ("POST", "/weights", {"user_id": "alice", "weight": "0"}, 400),
    ("POST", "/weights", {"user_id": "alice", "weight": "-2"}, 400),
    ("POST", "/weights", {"user_id": "alice", "weight": "lots"}, 400),
    ("POST", "/weights", {"user_id": " ", "weight": "2"}, 400),
    ("GET", "/weights", {}, 405),
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


def test_the_users_weights_and_shares_are_shown_and_a_weight_set_is_audited(client, app, bouncer):
    app = with_settings(app, queue_policy="fair")
    submit("alice", addresses("a", 30))
    submit("bob", addresses("b", 30))
    run_cycle(app, CREATION, "deliverable")               # 3 batches: 15 addresses each
    html = page(client)
    assert 'data-figure="check_types.deliverable.queue_policy" data-value="&#34;fair&#34;"' in html
    rows = re.findall(r'<tr data-user="(\w+)">.*?value="([\d.]+)".*?data-count="queued">(\d+)<.*?'
                      r'data-count="sent">(\d+)<.*?data-count="share">([\d.]+%)<', html, re.S)
    assert sorted(rows) == [("alice", "1", "15", "15", "50.0%"), ("bob", "1", "15", "15", "50.0%")]
    response = post(client, "/weights", csrf_token(html), user_id="bob", weight="3")
    assert response.status_code == 303
    assert "User bob weighs 3 now (was 1)" in page(client)
    assert UserWeight.get_by_id("bob").weight == 3
    assert [(a.who, a.action, a.target, a.detail) for a in AuditEntry.select()] == [
        ("operator", "weight", "user bob", "from 1 to 3")]
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert run_cycle(app, CREATION, "deliverable").reordered == 15      # bob's rows in line
    assert 'value="3"' in page(client)


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
