"""/metrics, read by prometheus_client's own parsers: the names and help texts of design.md,
values equal to `status --json` at the same moment, counters that never go down whatever the
service (or a host) prunes, METRICS_TOKEN, and the Grafana dashboard charting only what exists."""
import datetime
import json
import os
import re
from dataclasses import replace

from conftest import addresses, submit, with_settings
from operating import METRICS_TOKEN, busy_queue, status_json
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from bouncer.app import App
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION
from bouncer.queue.ledger import fail_bouncer_batch
from bouncer.queue.pauses import pause
from bouncer.queue.ratelimit import forget_old_requests
from bouncer.store.database import database, open_database, utcnow
from bouncer.store.models import (
    BouncerBatch, JobRun, RateLimitTracker, UserBatch, UserBatchEmail, WebhookAttempt, WebhookDelivery,
)
from bouncer.web import create_web_app
from bouncer.web.metrics import epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "bouncer.json")
# design.md, "Operating it": the names others rely on, and their types.
CONTRACT = {"bouncer_emails": "gauge", "bouncer_batches_in_flight": "gauge", "bouncer_requests_last_minute": "gauge",
            "bouncer_emails_verified": "counter", "bouncer_credits_spent": "counter",
            "bouncer_possible_orphans": "counter", "bouncer_user_batches": "gauge",
            "bouncer_job_last_success_timestamp_seconds": "gauge", "bouncer_cycle_seconds": "gauge"}


def scrape(web_app, headers=None):
    response = web_app.test_client().get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.data
    return response


def samples(text):
    """{(sample name, ((label, value), ...)): value} and {family name: (type, help)}."""
    values, families = {}, {}
    for family in text_string_to_metric_families(text):
        families[family.name] = (family.type, family.documentation)
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values, families


def metric(values, name, **labels):
    return values[(name, tuple(sorted(labels.items())))]


def troubled_queue(app, bouncer):
    """busy_queue, plus a pause, a Bouncer batch failed by hand and a possible orphan."""
    ids = busy_queue(app, bouncer)
    pause("deliverable", "quota review", "operator")
    fail_bouncer_batch(BouncerBatch.get((BouncerBatch.status == "outstanding")
                                        & (BouncerBatch.check_type == "deliverable")).id, "stuck")
    submit("grace", addresses("grace", 3), check_type="catchall")
    bouncer.fail_next("timeout", kind="create")
    run_cycle(app, CREATION, "catchall")
    return ids


def test_metrics_equal_status_json(app, bouncer):
    troubled_queue(app, bouncer)
    values, families = samples(scrape(create_web_app(app)).get_data(as_text=True))
    expected = status_json()
    for t, c in expected["check_types"].items():
        for state, key in (("new", "new_emails"), ("queued", "queued_emails"), ("sent", "sent_emails")):
            assert metric(values, "bouncer_emails", check_type=t, state=state) == c[key]
        assert metric(values, "bouncer_batches_in_flight", check_type=t) == c["in_flight_batches"]
        assert metric(values, "bouncer_batches_outstanding", check_type=t) == c["outstanding_batches"]
        assert metric(values, "bouncer_emails_verified_total", check_type=t) == c["emails_verified_total"]
        assert metric(values, "bouncer_credits_spent_total", check_type=t) == c["credits_spent_total"]
        assert metric(values, "bouncer_credits_spent_today", check_type=t) == c["credits_spent_today"]
        assert metric(values, "bouncer_credits_refunded_total", check_type=t) == c["credits_refunded_total"]
        assert metric(values, "bouncer_credits_rechecks_total", check_type=t) == c["credits_rechecks_total"]
        assert metric(values, "bouncer_emails_rechecking", check_type=t) == c["rechecking_emails"]
        assert metric(values, "bouncer_batches_finishing", check_type=t) == c["finishing_batches"]
        assert metric(values, "bouncer_creation_paused", check_type=t) == (t in expected["paused"])
        for status, n in c["batches_ended"].items():
            assert metric(values, "bouncer_batches_ended_total", check_type=t, status=status) == n
    assert metric(values, "bouncer_max_outstanding") == expected["check_types"]["deliverable"]["max_outstanding"]
    assert metric(values, "bouncer_requests_last_minute") == expected["rate_limit"]["requests_last_60s"]
    assert metric(values, "bouncer_requests_buffer") == expected["rate_limit"]["buffer"]
    assert metric(values, "bouncer_possible_orphans_total") == expected["possible_orphans"] == 1
    for status, n in expected["user_batch_counts"].items():
        assert metric(values, "bouncer_user_batches", status=status) == n
    for state, n in expected["webhook_deliveries"].items():
        assert metric(values, "bouncer_webhook_deliveries", state=state) == n
    for job, j in expected["jobs"].items():
        assert metric(values, "bouncer_job_last_success_timestamp_seconds", job=job) == epoch(j["last_success"])
        assert metric(values, "bouncer_cycle_seconds", cycle=job) == j["last_seconds"]
        assert metric(values, "bouncer_job_overdue", job=job) == j["overdue"]
        assert metric(values, "bouncer_job_failures_in_a_row", job=job) == j["failures_in_a_row"]
    assert metric(values, "bouncer_healthy") == (expected["status"] == "ok")
    assert metric(values, "bouncer_redis_up") == 1
    # The figures are not all zero: the comparison means something.
    assert expected["check_types"]["deliverable"]["emails_verified_total"] == 30
    assert expected["check_types"]["deliverable"]["batches_ended"]["failed"] == 1


def test_metric_names_types_and_help_texts(app):
    _, families = samples(scrape(create_web_app(app)).get_data(as_text=True))
    for name, kind in CONTRACT.items():
        assert families[name][0] == kind, name
    for name, (kind, documentation) in families.items():
        assert name.startswith("bouncer_") and len(documentation) > 15, name
        assert kind in ("gauge", "counter"), name


def test_openmetrics_when_prometheus_asks_for_it(app, bouncer):
    busy_queue(app, bouncer)
    response = scrape(create_web_app(app), {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.mimetype == "application/openmetrics-text"
    families = {f.name: f for f in parse_openmetrics(response.get_data(as_text=True))}
    verified = {s.labels["check_type"]: s.value for s in families["bouncer_emails_verified"].samples
                if s.name == "bouncer_emails_verified_total"}
    assert verified == {"deliverable": 30, "catchall": 0}


def test_counters_never_go_down_whatever_is_pruned(app, bouncer):
    troubled_queue(app, bouncer)
    web = create_web_app(app)
    before, _ = samples(scrape(web).get_data(as_text=True))
    # The service forgets request history and may clear deliveries; a host deletes a batch.
    forget_old_requests(utcnow() + datetime.timedelta(days=2))
    WebhookAttempt.delete().execute()
    WebhookDelivery.delete().execute()
    JobRun.delete().execute()
    alice = UserBatch.get(UserBatch.user_id == "alice")
    UserBatchEmail.delete().where(UserBatchEmail.batch == alice.id).execute()
    UserBatch.delete().where(UserBatch.id == alice.id).execute()
    assert RateLimitTracker.select().count() == 0
    after, _ = samples(scrape(web).get_data(as_text=True))
    totals = {key: value for key, value in before.items() if key[0].endswith("_total")}
    assert len(totals) == 2 + 2 + 2 + 2 + 1 + 8
    for key, value in totals.items():
        assert after[key] == value, key


def test_metrics_token_when_set(app):
    web = create_web_app(with_settings(app, metrics_token=METRICS_TOKEN))
    for headers in ({}, {"Authorization": "Bearer wrong-token-1234"}, {"Authorization": METRICS_TOKEN},
                    {"Authorization": "Basic %s" % METRICS_TOKEN}):
        response = web.test_client().get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.get_data(as_text=True) == (
            '{"error":"missing or wrong bearer token (METRICS_TOKEN)"}\n')
        assert response.headers["WWW-Authenticate"] == "Bearer"
    scrape(web, {"Authorization": "Bearer %s" % METRICS_TOKEN})
    scrape(create_web_app(app))                         # unset: open, as design.md says


def test_metrics_503_when_the_database_is_down(app):
    broken = "postgresql://postgres:db-pw-8b8b@127.0.0.1:1/bouncer_test"
    original = database.obj
    open_database(broken)
    try:
        response = create_web_app(App(replace(app.settings, database_url=broken), redis=app.redis)
                                  ).test_client().get("/metrics")
    finally:
        database.initialize(original)
    assert response.status_code == 503
    body = response.get_data(as_text=True)
    assert body.count("\n") == 1 and json.loads(body)["error"] == (
        "cannot read the service's figures (the web process's log says why)")
    assert "db-pw-8b8b" not in body


def test_metrics_when_redis_is_down(app):
    down = App(replace(app.settings, redis_url="redis://127.0.0.1:1/0"))
    values, _ = samples(scrape(create_web_app(down)).get_data(as_text=True))
    assert metric(values, "bouncer_redis_up") == 0
    assert metric(values, "bouncer_emails", check_type="deliverable", state="queued") == 0


def test_the_grafana_dashboard_charts_only_metrics_that_exist(app, bouncer):
    busy_queue(app, bouncer)
    values, _ = samples(scrape(create_web_app(app)).get_data(as_text=True))
    exported = {name for name, _ in values}
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in expressions for name in re.findall(r"\bbouncer_[a-z_]+\b", expr)}
    assert used and used <= exported, used - exported
    assert set(CONTRACT) <= {re.sub("_total$", "", name) for name in used}
    assert dashboard["title"] and dashboard["uid"]


def test_queued_emails_per_user_are_the_top_users_and_the_rest_summed(app, bouncer):
    from bouncer.reading.overview import TOP_USERS
    for n in range(TOP_USERS + 5):
        submit("user%02d" % n, addresses("u%02d-" % n, 30 - n))      # user00 has the most
    values, families = samples(scrape(create_web_app(app)).get_data(as_text=True))
    shown = {labels: v for (name, labels), v in values.items() if name == "bouncer_queued_emails_by_user"}
    assert len(shown) == TOP_USERS
    assert shown[(("check_type", "deliverable"), ("user", "user00"))] == 30
    assert (("check_type", "deliverable"), ("user", "user%02d" % TOP_USERS)) not in shown
    others = metric(values, "bouncer_queued_emails_other_users", check_type="deliverable")
    assert others == sum(30 - n for n in range(TOP_USERS, TOP_USERS + 5))
    assert sum(shown.values()) + others == metric(values, "bouncer_emails", check_type="deliverable", state="queued")
    assert metric(values, "bouncer_queue_policy", check_type="deliverable", policy="fifo") == 1
    answer = status_json()["check_types"]["deliverable"]
    assert [u["user_id"] for u in answer["users"]] == ["user%02d" % n for n in range(TOP_USERS)]
    assert answer["other_users"] == {"users": 5, "queued_emails": others, "sent_last_hour": 0, "share_last_hour": 0.0}
