"""`GET /metrics` for Prometheus (design.md, "Operating it: console and metrics").

A custom collector reads the database and Redis at scrape time, through the reporting layer
that `status --json` and the console read, so any number of web processes give the same
figures and none of them keeps state. The `_total` figures are counted from the ledger, whose
rows are never removed once Bouncer accepted them: they never go down, whatever the service
prunes. With METRICS_TOKEN set, a scrape wants it as a bearer token (compared in constant
time); a scrape that cannot read the database answers 503, so Prometheus marks the target down.
"""
import calendar
import datetime
import logging

from apiflask import APIBlueprint, abort
from flask import Response, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from bouncer.reading.health import describe_error, runtime_reasons, service_state
from bouncer.reading.overview import TOP_USERS, rq_backlog
from bouncer.web.auth import bearer_token, token_matches
from bouncer.web.context import bouncer_app, started_at

log = logging.getLogger(__name__)

blueprint = APIBlueprint("metrics", __name__, enable_openapi=False)


def register(web):
    web.register_blueprint(blueprint)


@blueprint.before_request
def authenticate():
    expected = bouncer_app().settings.metrics_token
    if not expected:
        return
    if not token_matches(bearer_token(request.headers.get("Authorization")), (expected,)):
        abort(401, "missing or wrong bearer token (METRICS_TOKEN)", headers={"WWW-Authenticate": "Bearer"})


@blueprint.get("/metrics")
def metrics():
    app = bouncer_app()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(app, started_at()))
    encode, content_type = choose_encoder(request.headers.get("Accept"))
    try:
        body = encode(registry)
    except Exception as exc:
        log.warning("/metrics: cannot read the service's figures (%s)", describe_error(exc, app.settings))
        abort(503, "cannot read the service's figures (the web process's log says why)")
    return Response(body, content_type=content_type)


class ServiceCollector:
    """Every figure, read when Prometheus asks."""

    def __init__(self, app, started_at):
        self.app, self.started_at = app, started_at

    def collect(self):
        state = service_state(self.app.settings, self.started_at)
        yield from queue_families(state["overview"])
        yield from job_families(state, state["reasons"] + runtime_reasons(self.app))
        yield from redis_families(self.app.redis)


def gauge(name, documentation, labels=(), samples=()):
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def counter(name, documentation, labels=(), samples=()):
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def queue_families(o):
    types = o["check_types"]
    rate = o["rate_limit"]
    yield gauge("bouncer_emails", "Submitted emails by check type and state: new (not yet admitted), "
                "queued (waiting for a Bouncer batch), sent (in a Bouncer batch in flight)",
                ("check_type", "state"),
                [((t, state), c[key]) for t, c in types.items()
                 for state, key in (("new", "new_emails"), ("queued", "queued_emails"), ("sent", "sent_emails"))])
    yield gauge("bouncer_emails_rechecking", "Queued emails waiting in line for a re-check: Bouncer answered "
                "unknown with a retryAfter (greylisting); among the queued", ("check_type",),
                [((t,), c["rechecking_emails"]) for t, c in types.items()])
    yield gauge("bouncer_batches_in_flight", "Bouncer batches reserved or outstanding, counted against "
                "BOUNCER_MAX_OUTSTANDING", ("check_type",), [((t,), c["in_flight_batches"]) for t, c in types.items()])
    yield gauge("bouncer_batches_outstanding", "Bouncer batches created at Bouncer and not yet ingested",
                ("check_type",), [((t,), c["outstanding_batches"]) for t, c in types.items()])
    yield gauge("bouncer_batches_finishing", "Outstanding Bouncer batches being finished at Bouncer (past "
                "BATCH_TIMEOUT, an operator's, or every row on them cancelled)", ("check_type",),
                [((t,), c["finishing_batches"]) for t, c in types.items()])
    yield gauge("bouncer_max_outstanding", "BOUNCER_MAX_OUTSTANDING: the most Bouncer batches in flight per check type",
                samples=[((), next(iter(types.values()))["max_outstanding"])])
    yield gauge("bouncer_requests_last_minute", "Bouncer requests recorded in the last 60 s, all processes together",
                samples=[((), rate["requests_last_60s"])])
    yield gauge("bouncer_requests_buffer", "RATE_LIMIT_BUFFER: the most Bouncer requests in any rolling 60 s",
                samples=[((), rate["buffer"])])
    yield gauge("bouncer_rate_limit_per_minute", "RATE_LIMIT_PER_MINUTE: Bouncer's own limit",
                samples=[((), rate["bouncer_limit"])])
    yield counter("bouncer_emails_verified", "Addresses of Bouncer batches that completed and were ingested",
                  ("check_type",), [((t,), c["emails_verified_total"]) for t, c in types.items()])
    yield counter("bouncer_credits_spent", "Addresses sent in Bouncer batches that Bouncer accepted (one credit each)",
                  ("check_type",), [((t,), c["credits_spent_total"]) for t, c in types.items()])
    yield counter("bouncer_credits_refunded", "Credits Bouncer gave back for the addresses of finished batches it "
                  "had not verified", ("check_type",), [((t,), c["credits_refunded_total"]) for t, c in types.items()])
    yield counter("bouncer_credits_rechecks", "Credits spent on re-checks of greylisted addresses (among the "
                  "credits spent)", ("check_type",), [((t,), c["credits_rechecks_total"]) for t, c in types.items()])
    yield gauge("bouncer_credits_spent_today", "Credits spent since midnight UTC", ("check_type",),
                [((t,), c["credits_spent_today"]) for t, c in types.items()])
    yield counter("bouncer_possible_orphans", "Bouncer batches whose create call went unanswered: Bouncer may "
                  "have created (and charged for) them", samples=[((), o["possible_orphans"])])
    yield counter("bouncer_batches_ended", "Bouncer batches that ended, by how: completed, failed, rejected "
                  "(Bouncer refused the create), abandoned (possible orphans)", ("check_type", "status"),
                  [((t, status), n) for t, c in types.items() for status, n in c["batches_ended"].items()])
    yield gauge("bouncer_queue_policy", "1 for the policy each check type's line is ordered by (QUEUE_POLICY, "
                "as the last creation cycle applied it)", ("check_type", "policy"),
                [((t, c["queue_policy"]), 1) for t, c in types.items()])
    yield gauge("bouncer_queued_emails_by_user", "Emails waiting for a Bouncer batch, for the users with the most "
                "(at most %d per check type; the others in bouncer_queued_emails_other_users)" % TOP_USERS,
                ("check_type", "user"),
                [((t, u["user_id"]), u["queued_emails"]) for t, c in types.items() for u in c["users"]])
    yield gauge("bouncer_queued_emails_other_users", "Emails waiting for a Bouncer batch, of the users not in "
                "bouncer_queued_emails_by_user", ("check_type",),
                [((t,), c["other_users"]["queued_emails"]) for t, c in types.items()])
    yield gauge("bouncer_user_batches", "User batches by status", ("status",),
                [((status,), n) for status, n in o["user_batch_counts"].items()])
    yield gauge("bouncer_webhook_deliveries", "Webhook deliveries by state", ("state",),
                [((state,), n) for state, n in o["webhook_deliveries"].items()])


def job_families(state, reasons):
    jobs = state["jobs"].items()
    yield gauge("bouncer_job_last_success_timestamp_seconds", "When each repeating job last succeeded (Unix time)",
                ("job",), [((job,), epoch(j["last_success"])) for job, j in jobs if j["last_success"]])
    yield gauge("bouncer_cycle_seconds", "How long each repeating job's last run took", ("cycle",),
                [((job,), j["last_seconds"]) for job, j in jobs if j["last_seconds"] is not None])
    yield gauge("bouncer_job_overdue", "1 when a job has not succeeded for 5 of its intervals and the grace",
                ("job",), [((job,), int(j["overdue"])) for job, j in jobs])
    yield gauge("bouncer_job_failures_in_a_row", "Runs of each job that failed since its last success", ("job",),
                [((job,), j["failures_in_a_row"]) for job, j in jobs])
    yield gauge("bouncer_creation_paused", "1 while batch creation is paused (by an operator, or out of credits)",
                ("check_type",), [((t,), int(t in state["paused"])) for t in state["overview"]["check_types"]])
    yield gauge("bouncer_healthy", "1 when status finds no reason to call the service degraded",
                samples=[((), int(not reasons))])


def redis_families(redis):
    try:
        backlog = rq_backlog(redis)
    except Exception as exc:
        log.warning("/metrics: Redis does not answer (%s)", type(exc).__name__)
        yield gauge("bouncer_redis_up", "1 when Redis answers the scrape", samples=[((), 0)])
        return
    yield gauge("bouncer_redis_up", "1 when Redis answers the scrape", samples=[((), 1)])
    yield gauge("bouncer_rq_jobs_waiting", "Jobs waiting on each RQ queue", ("queue",),
                [((name,), n) for name, n in backlog["queues"].items()])
    yield gauge("bouncer_rq_workers", "RQ workers alive", samples=[((), backlog["workers"])])


def epoch(iso):
    """'2026-12-01T13:58:29.123456Z' -> Unix time."""
    moment = datetime.datetime.fromisoformat(iso.rstrip("Z"))
    return calendar.timegm(moment.timetuple()) + moment.microsecond / 1e6
