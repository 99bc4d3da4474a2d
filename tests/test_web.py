"""The web process: /health and the Bouncer callback, called as a WSGI application and, once,
as the real `web` command over HTTP."""
import datetime
import http.client
import io
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import replace
from wsgiref.util import setup_testing_defaults

import pytest
from conftest import API_KEY, REDIS_URL, addresses, submit, with_settings
from rq import Queue, SimpleWorker

from bouncer.app import App
from bouncer.names import CYCLE_QUEUE
from bouncer.reading import health as health_module
from bouncer.reading.health import GRACE_SECONDS, OVERDUE_INTERVALS, job_health, job_runs
from bouncer.runtime.jobs import job_definitions, record_run
from bouncer.runtime.schedule import JOB_TIMEOUT
from bouncer.store.database import database, open_database, utcnow
from bouncer.web import create_web_app as make_app
from support.ports import free_port
from support.processes import ROOT, Supervisor, bouncer_command
from support.waiting import wait_until

WINDOW_30S = OVERDUE_INTERVALS * 30 + GRACE_SECONDS   # the overdue window of a 30 s job

SECRET = "cb-secret-5e4d3c2b1a"
PUBLIC_URL = "https://bouncer.example.com"


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.raw = status, headers, body

    @property
    def json(self):
        return json.loads(self.raw)


def call(wsgi, method, path, body=b""):
    """One request straight through the WSGI application."""
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    setup_testing_defaults(environ)
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"], started["headers"] = int(status.split()[0]), dict(headers)

    raw = b"".join(wsgi(environ, start_response)).decode()
    return Response(started["status"], started["headers"], raw)


@pytest.fixture
def callback_app(app):
    return with_settings(app, public_url=PUBLIC_URL, callback_secret=SECRET)


@pytest.fixture
def web(callback_app):
    return make_app(callback_app)


def record_success(job_id, now):
    record_run(job_id, now, summary="ok", now=now)


def record_all_successes(app, now):
    for job_id in job_definitions(app.settings):
        record_success(job_id, now)


def queued_job_ids(redis):
    return Queue(CYCLE_QUEUE, connection=redis).job_ids


# -- /health --

def test_health_ok_with_recent_successes(app, redis_conn, web):
    record_all_successes(app, utcnow() - datetime.timedelta(seconds=3))
    submit("alice", addresses("a", 3))
    response = call(web, "GET", "/health")
    assert response.status == 200
    body = response.json
    assert body["status"] == "ok"
    assert body["database"] == {"ok": True} and body["redis"] == {"ok": True}
    assert set(body["jobs"]) == {"batch_creator_deliverable", "batch_creator_catchall",
                                 "status_checker_deliverable", "status_checker_catchall",
                                 "webhook_sender", "retention_pruner"}
    job = body["jobs"]["status_checker_deliverable"]
    assert job["interval"] == 30 and job["overdue"] is False
    assert job["last_success"].endswith("Z") and 2 <= job["age_seconds"] < 60
    assert body["check_types"]["deliverable"]["queued_emails"] == 3
    assert body["check_types"]["catchall"]["outstanding_batches"] == 0
    assert set(body["rate_limit"]) == {"requests_last_60s", "buffer", "bouncer_limit"}


def test_health_headers(web):
    response = call(web, "GET", "/health")
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    head = call(web, "HEAD", "/health")
    assert head.status == 200 and head.raw == ""


def test_health_fresh_deploy_without_successes_is_ok(web):
    response = call(web, "GET", "/health")
    assert response.status == 200
    assert all(j["last_success"] is None and not j["overdue"] for j in response.json["jobs"].values())


def test_health_503_when_a_job_is_overdue(app, redis_conn, web):
    now = utcnow()
    record_all_successes(app, now)
    # OVERDUE_INTERVALS intervals of 30 s plus the grace; this one is 20 s older than that.
    record_success("status_checker_catchall", now - datetime.timedelta(seconds=WINDOW_30S + 20))
    response = call(web, "GET", "/health")
    assert response.status == 503
    assert response.json["status"] == "degraded"
    assert response.json["jobs"]["status_checker_catchall"]["overdue"] is True
    assert response.json["jobs"]["status_checker_deliverable"]["overdue"] is False


def test_health_503_when_a_job_never_succeeded_long_after_start(callback_app):
    started = utcnow() - datetime.timedelta(hours=1)
    response = call(make_app(callback_app, started_at=started), "GET", "/health")
    assert response.status == 503
    jobs = response.json["jobs"]
    # All but the daily pruner, which has days before it is late.
    assert all(j["overdue"] for job_id, j in jobs.items() if job_id != "retention_pruner")
    assert jobs["retention_pruner"]["overdue"] is False


@pytest.mark.parametrize("last_success, up_for, overdue", [
    (None, 10, False),                   # fresh deploy: the jobs have not had their chance yet
    (None, WINDOW_30S + 1, True),        # up longer than the window and still nothing
    (100, 10_000, False),                # recent enough
    (WINDOW_30S, 10_000, False),         # exactly at the window's edge
    (WINDOW_30S + 1, 10, True),          # an old success is overdue even right after a restart
])
def test_job_health_window(db, last_success, up_for, overdue):
    now = datetime.datetime(2026, 11, 28, 12, 0, 0)
    seconds = datetime.timedelta(seconds=1)
    intervals = {"status_checker_deliverable": 30}
    if last_success is not None:
        record_success("status_checker_deliverable", now - last_success * seconds)
    health = job_health(intervals, job_runs(), now, now - up_for * seconds)
    assert health["status_checker_deliverable"]["overdue"] is overdue


def test_health_503_when_redis_is_down(callback_app, caplog):
    settings = replace(callback_app.settings, redis_url="redis://:redis-pw-7a7a@127.0.0.1:1/0")
    response = call(make_app(App(settings)), "GET", "/health")
    assert response.status == 503
    body = response.json
    assert body["redis"] == {"ok": False, "error": "unreachable"} and body["reasons"][0] == "redis: unreachable"
    assert body["database"] == {"ok": True}
    assert "redis-pw-7a7a" not in response.raw and "127.0.0.1" not in response.raw
    assert "Health: the redis does not answer: ConnectionError" in caplog.text     # the detail: in the log


def test_health_answers_in_time_when_redis_hangs(callback_app, monkeypatch):
    monkeypatch.setattr(health_module, "CHECK_TIMEOUT", 0.5)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = "redis://127.0.0.1:%d/0" % silent.getsockname()[1]
        started = time.monotonic()
        response = call(make_app(App(replace(callback_app.settings, redis_url=url))), "GET", "/health")
        elapsed = time.monotonic() - started
    assert response.status == 503
    assert response.json["redis"] == {"ok": False, "error": "no answer within 0.5s"}
    assert elapsed < 3


def test_health_503_when_the_database_is_down(callback_app, redis_conn, caplog):
    record_all_successes(callback_app, utcnow())
    broken = "postgresql://postgres:db-pw-8b8b@127.0.0.1:1/bouncer_test"
    settings = replace(callback_app.settings, database_url=broken)
    original = database.obj
    open_database(broken)
    try:
        response = call(make_app(App(settings, redis=redis_conn)), "GET", "/health")
    finally:
        database.initialize(original)
    assert response.status == 503
    body = response.json
    assert body["database"] == {"ok": False, "error": "unreachable"}
    assert body["reasons"] == ["database: unreachable"]
    assert body["redis"] == {"ok": True}
    assert body["check_types"] is None and body["rate_limit"] is None
    # Anyone may read /health: no host, port or database name; the log has them.
    for detail in ("db-pw-8b8b", "127.0.0.1", "port 1", "bouncer_test"):
        assert detail not in response.raw
    assert 'the database does not answer: DatabaseUnavailable: cannot open database \'bouncer_test\': connection ' \
           'to server at "127.0.0.1", port 1 failed' in caplog.text


def test_health_wrong_method(web):
    response = call(web, "POST", "/health")
    assert response.status == 405
    assert "GET" in response.headers["Allow"]


# -- callback --

def test_callback_queues_one_status_check(web, redis_conn):
    response = call(web, "POST", "/bouncer/callback/%s/deliverable" % SECRET, b'{"batchId": "x"}')
    assert response.status == 202
    assert response.json == {"queued": ["deliverable"]}
    assert queued_job_ids(redis_conn) == ["status_checker_deliverable_now"]
    job = Queue(CYCLE_QUEUE, connection=redis_conn).fetch_job("status_checker_deliverable_now")
    assert job.func_name == "bouncer.runtime.jobs.check_batches_job" and job.args == ("deliverable",)
    assert job.timeout == JOB_TIMEOUT


def test_callback_names_its_batch_for_the_status_cycle_to_check_first(web, redis_conn):
    path = "/bouncer/callback/%s/deliverable" % SECRET
    assert call(web, "POST", path + "?reservation=42", b'{"batchId": "x"}').status == 202
    assert call(web, "POST", path + "?reservation=7").status == 202
    for odd in ("abc", "%C2%B2", "9" * 40, ""):   # letters, a superscript two, too long, none
        assert call(web, "POST", path + "?reservation=" + odd).status == 202
    assert redis_conn.smembers("bouncer:called:deliverable") == {b"42", b"7"}
    assert redis_conn.ttl("bouncer:called:deliverable") > 0
    assert queued_job_ids(redis_conn) == ["status_checker_deliverable_now"]


def test_callback_while_queued_does_not_queue_again(web, redis_conn):
    path = "/bouncer/callback/%s/deliverable" % SECRET
    assert call(web, "POST", path).status == 202
    second = call(web, "POST", path)
    assert second.status == 202 and second.json == {"queued": ["deliverable"]}
    assert queued_job_ids(redis_conn) == ["status_checker_deliverable_now"]


def test_callback_after_the_check_ran_queues_again(web, redis_conn):
    path = "/bouncer/callback/%s/catchall" % SECRET
    call(web, "POST", path)
    queue = Queue(CYCLE_QUEUE, connection=redis_conn)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)
    assert queued_job_ids(redis_conn) == []
    assert call(web, "POST", path).status == 202
    assert queued_job_ids(redis_conn) == ["status_checker_catchall_now"]


def test_callback_without_check_type_queues_both(web, redis_conn):
    response = call(web, "GET", "/bouncer/callback/%s" % SECRET)
    assert response.status == 202
    assert response.json == {"queued": ["deliverable", "catchall"]}
    assert sorted(queued_job_ids(redis_conn)) == [
        "status_checker_catchall_now", "status_checker_deliverable_now"]


def test_callback_ignores_a_large_body(web, redis_conn):
    response = call(web, "POST", "/bouncer/callback/%s" % SECRET, b"x" * (1 << 20))
    assert response.status == 202


@pytest.mark.parametrize("path", [
    "/bouncer/callback/wrong-secret/deliverable",
    "/bouncer/callback/wrong-secret",
    "/bouncer/callback/%s/unknown" % SECRET,
    "/bouncer/callback/%s/deliverable/extra" % SECRET,
    "/bouncer/callback//deliverable",
    "/bouncer/callback/",
    "/nope",
])
def test_callback_wrong_or_unknown_is_a_plain_404(web, redis_conn, path):
    response = call(web, "POST", path)
    assert response.status == 404
    assert response.json == {"error": "not found"}
    assert queued_job_ids(redis_conn) == []


def test_callback_404_when_no_secret_is_configured(app, redis_conn):
    response = call(make_app(app), "POST", "/bouncer/callback/%s/deliverable" % SECRET)
    assert response.status == 404 and response.json == {"error": "not found"}
    assert queued_job_ids(redis_conn) == []


def test_callback_wrong_method_after_the_right_secret(web):
    response = call(web, "DELETE", "/bouncer/callback/%s" % SECRET)
    assert response.status == 405
    # A wrong secret does not even reveal that the route exists.
    assert call(web, "DELETE", "/bouncer/callback/wrong").status == 404


def test_callback_redis_down_is_503(callback_app):
    settings = replace(callback_app.settings, redis_url="redis://127.0.0.1:1/0")
    response = call(make_app(App(settings)), "POST", "/bouncer/callback/%s" % SECRET)
    assert response.status == 503 and response.json == {"error": "queue unavailable"}


# -- secrets --

def test_no_secret_in_any_answer_or_log_line(callback_app, redis_conn, caplog):
    caplog.set_level(logging.INFO)
    web = make_app(callback_app)
    requests = [
        ("GET", "/health"), ("POST", "/health"),
        ("POST", "/bouncer/callback/%s/deliverable" % SECRET),
        ("POST", "/bouncer/callback/%s/deliverable" % SECRET),
        ("GET", "/bouncer/callback/%s" % SECRET),
        ("PUT", "/bouncer/callback/%s" % SECRET),
        ("POST", "/bouncer/callback/%s/unknown" % SECRET),
        ("POST", "/bouncer/callback/wrong/deliverable"),
        ("GET", "/nope/%s" % SECRET),
    ]
    bodies = [call(web, method, path).raw for method, path in requests]
    redis_down = replace(callback_app.settings, redis_url="redis://127.0.0.1:1/0")
    bodies.append(call(make_app(App(redis_down)), "GET", "/health").raw)
    for text in bodies + [caplog.text]:
        assert SECRET not in text and API_KEY not in text
    # The whole tail of a callback path is masked: a wrong secret may be an old one.
    assert "POST /bouncer/callback/*** 202" in caplog.text
    assert "POST /bouncer/callback/*** 404" in caplog.text
    assert "GET /health 200" in caplog.text


# -- the real process --

def http_request(port, method, path, timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=b'{"batchId": "abc"}' if method == "POST" else None)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def wait_until_serving(process, port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("web exited early: %s" % process.communicate()[1])
        try:
            return http_request(port, "GET", "/health")
        except OSError:
            time.sleep(0.1)
    raise AssertionError("web did not answer on port %s" % port)


@pytest.mark.slow
def test_web_command_over_http_stops_cleanly_on_sigterm(settings, redis_conn, db):
    port = free_port()
    env = dict(os.environ, DATABASE_URL=settings.database_url, REDIS_URL=REDIS_URL,
               BOUNCER_API_KEY=API_KEY, PUBLIC_URL=PUBLIC_URL, CALLBACK_SECRET=SECRET,
               LOG_LEVEL="INFO")
    process = subprocess.Popen(bouncer_command("web", "--port", port), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status, headers, body = wait_until_serving(process, port)
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert headers["Content-Type"] == "application/json"
        status, _, body = http_request(port, "POST", "/bouncer/callback/%s/deliverable" % SECRET)
        assert status == 202 and json.loads(body) == {"queued": ["deliverable"]}
        assert queued_job_ids(redis_conn) == ["status_checker_deliverable_now"]
        assert http_request(port, "POST", "/bouncer/callback/nope/deliverable")[0] == 404
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "Web process stopped" in stderr
    assert "POST /bouncer/callback/*** 202" in stderr
    assert SECRET not in stderr + stdout and API_KEY not in stderr + stdout


def start_web(tmp_path, settings, **env):
    """`python -m bouncer web` as a real process under a Supervisor; its port."""
    port = int(env.setdefault("PORT", str(free_port())))
    supervisor = Supervisor(tmp_path, dict(os.environ, DATABASE_URL=settings.database_url, REDIS_URL=REDIS_URL,
                                           BOUNCER_API_KEY=API_KEY, LOG_LEVEL="INFO", **env))
    return supervisor, supervisor.start("web", "web"), port


@pytest.mark.slow
def test_web_command_listens_on_host_only(settings, redis_conn, db, tmp_path):
    supervisor, web, port = start_web(tmp_path, settings, HOST="127.0.0.2")
    try:
        wait_until(lambda: answers("127.0.0.2", port), "web on 127.0.0.2", 20)
        assert not answers("127.0.0.1", port)        # the same port, another address: nothing
    finally:
        supervisor.stop_all()
    assert "listening on 127.0.0.2:%d" % port in web.log()


@pytest.mark.slow
@pytest.mark.parametrize("answered", [True, False])
def test_a_local_public_url_nothing_answers_on_is_reported_once_loudly(settings, redis_conn, db, tmp_path, answered):
    port = free_port()
    public_url = "http://127.0.0.1:%d" % (port if answered else free_port())
    supervisor, web, _ = start_web(tmp_path, settings, PORT=str(port), PUBLIC_URL=public_url, CALLBACK_SECRET=SECRET)
    try:
        wait_until(lambda: "GET /health" in web.log() or "ERROR" in web.log(), "the PUBLIC_URL check", 20)
    finally:
        supervisor.stop_all()
    errors = [line for line in web.log().splitlines() if " ERROR " in line]
    if answered:
        assert errors == [] and "GET /health 200" in web.log()
    else:
        assert len(errors) == 1 and "PUBLIC_URL=%s does not answer" % public_url in errors[0]
        assert "Bouncer's completion callbacks will go nowhere" in errors[0]


def answers(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
