"""Is the service working? The one answer behind /health, `status` and the console.

The database and Redis are asked at once, each in its own thread, so a server that hangs
delays the answer by at most CHECK_TIMEOUT whatever the drivers' own timeouts. A job is overdue
when its last success is older than OVERDUE_INTERVALS intervals plus GRACE_SECONDS.
"""
import datetime
import threading
import time

from .db import connection, utcnow
from .jobs import job_definitions, last_successes
from .masking import mask_secrets, redact_url
from .reports import queue_overview

OVERDUE_INTERVALS = 5      # a job this many intervals late (plus the grace) is overdue
# Room for a slow cycle or a scheduler restart, and for the lock of a killed cycle to expire
# (LOCK_TIMEOUT, 60 s): until then every run of that job is skipped, which is not a fault.
GRACE_SECONDS = 90
CHECK_TIMEOUT = 5          # seconds the checks wait for the database and Redis, together


def service_health(app, started_at, now=None):
    """(healthy, answer): healthy when the database and Redis answer and no job is overdue. A
    section whose source did not answer is null."""
    database, redis, overview, successes = run_checks(app)
    jobs = None
    if successes is not None:
        jobs = job_health(job_definitions(app.settings), successes, now or utcnow(), started_at)
    healthy = database["ok"] and redis["ok"] and not any(job["overdue"] for job in (jobs or {}).values())
    return healthy, {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "redis": redis,
        "jobs": jobs,
        "check_types": overview["check_types"] if overview else None,
        "rate_limit": overview["rate_limit"] if overview else None,
    }


def run_checks(app):
    deadline = time.monotonic() + CHECK_TIMEOUT
    database = Probe(read_overview, app.settings)
    redis = Probe(last_successes, app.redis)
    database_status, overview = database.outcome(deadline, app.settings)
    redis_status, successes = redis.outcome(deadline, app.settings)
    return database_status, redis_status, overview, successes


def read_overview(settings):
    # Its own connection, closed after: a restarted database costs one failed check, no more.
    with connection():
        return queue_overview(settings)


class Probe:
    """One check running in a daemon thread. A check still stuck at the deadline is abandoned:
    it ends on its own once the driver gives up, and never holds the process open."""

    def __init__(self, check, *args):
        self.value = self.error = None
        self.thread = threading.Thread(target=self.run, args=(check, *args), daemon=True,
                                       name="health-%s" % check.__name__)
        self.thread.start()

    def run(self, check, *args):
        try:
            self.value = check(*args)
        except Exception as exc:
            self.error = exc

    def outcome(self, deadline, settings):
        """({"ok": bool, "error"?: str}, value or None)."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            return {"ok": False, "error": "no answer within %ss" % CHECK_TIMEOUT}, None
        if self.error is not None:
            return {"ok": False, "error": describe_error(self.error, settings)}, None
        return {"ok": True}, self.value


def describe_error(exc, settings):
    """One line about `exc`, with every secret the settings hold replaced."""
    lines = str(exc).strip().splitlines()
    text = "%s: %s" % (type(exc).__name__, lines[0]) if lines else type(exc).__name__
    return scrub(text, settings)


def scrub(text, settings):
    for url in (settings.database_url, settings.redis_url):
        text = text.replace(url, redact_url(url))
    return mask_secrets(text, settings.secrets())


def job_health(definitions, successes, now, started_at):
    """{job id: its health} for the jobs of `definitions` (see jobs.job_definitions).

    A job that has never succeeded (a new Redis, a first deploy) is overdue only once this
    process has been up longer than its window, so a fresh deploy is not reported broken before
    the jobs had a chance to run."""
    return {job_id: one_job_health(spec.interval, parse_time(successes.get(job_id)), now, started_at)
            for job_id, spec in definitions.items()}


def one_job_health(interval, last_success, now, started_at):
    window = OVERDUE_INTERVALS * interval + GRACE_SECONDS
    if last_success is None:
        return {"interval": interval, "last_success": None, "age_seconds": None,
                "overdue": (now - started_at).total_seconds() > window}
    age = (now - last_success).total_seconds()
    return {"interval": interval, "last_success": last_success.isoformat() + "Z",
            "age_seconds": round(age, 1), "overdue": age > window}


def parse_time(value):
    """A recorded ISO time as naive UTC; None when absent or unreadable (never succeeded)."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return parsed
