"""Is the service working? The one answer behind /health, `status` and the console, with the
reasons when it is not.

Degraded when any of these holds (docs/operating.md states the same thresholds):
- the database does not answer, or does not take a write (read-only, full);
- Redis does not answer (`status` and /metrics also say when no worker runs);
- a job has not succeeded for OVERDUE_INTERVALS of its intervals plus GRACE_SECONDS (a job never
  seen to succeed counts from when this process started);
- a job failed FAILING_RUNS times in a row;
- Bouncer refused a job's last run: 401 (the API key) or 402 (no credits) at once, 429 after
  RATE_LIMITED_RUNS runs in a row;
- batch creation is paused because the account is out of credits.
An operator's pause is shown, and is not a fault.

The database and Redis are asked at once, each in its own thread, so a server that hangs
delays the answer by at most CHECK_TIMEOUT whatever the drivers' own timeouts.
"""

import logging
import threading
import time

from bouncer.config import NO_KEY
from bouncer.masking import mask_secrets, redact_url
from bouncer.names import job_intervals
from bouncer.queue.pauses import current_pauses
from bouncer.reading.overview import queue_overview, rq_backlog
from bouncer.store.database import connection, utcnow, write_transaction
from bouncer.store.models import FifoCounter, JobRun

log = logging.getLogger(__name__)


OVERDUE_INTERVALS = 5      # a job this many intervals late (plus the grace) is overdue
# Room for a slow cycle or a scheduler restart, and for the lock of a killed cycle to expire
# (LOCK_TIMEOUT, 60 s): until then every run of that job is skipped, which is not a fault.
GRACE_SECONDS = 90
FAILING_RUNS = 2           # failures in a row that make a job failing (one can be a blip)


RATE_LIMITED_RUNS = 3      # runs in a row ended by Bouncer's 429
CHECK_TIMEOUT = 5          # seconds the checks wait for the database and Redis, together


REFUSALS = {401: "Bouncer refuses the API key (401): check BOUNCER_API_KEY",
            402: "Bouncer says the account is out of credits (402): buy credits"}


def service_health(app, started_at, now=None):
    """(healthy, answer) for /health: the database (a read and a write), Redis, every job."""
    database = Probe("database", read_state, app.settings, started_at, now)
    redis = Probe("redis", ping, app.redis)
    deadline = time.monotonic() + CHECK_TIMEOUT
    database_status, state = database.outcome(deadline, app.settings)
    redis_status, _ = redis.outcome(deadline, app.settings)
    reasons = list(state["reasons"]) if state else []
    if not database_status["ok"]:
        reasons.insert(0, "database: %s" % database_status["error"])
    if not redis_status["ok"]:
        reasons.insert(0, "redis: %s" % redis_status["error"])
    healthy = not reasons
    return healthy, {
        "status": "ok" if healthy else "degraded",
        "reasons": reasons,
        "database": database_status,
        "redis": redis_status,
        "jobs": state["jobs"] if state else None,
        "paused": state["paused"] if state else None,
        "check_types": state["overview"]["check_types"] if state else None,
        "rate_limit": state["overview"]["rate_limit"] if state else None,
    }


NO_WORKER = "no worker is running: the jobs wait in Redis (start `python -m bouncer worker`)"


def runtime_reasons(app):
    """What `status` and /metrics add to the database's reasons: Redis answering, as /health
    asks, and a worker to run the jobs. (/health leaves workers out: a platform restarts a web
    process whose health check fails, which would not bring a worker back.)"""
    redis_status, workers = Probe("redis", count_workers, app.redis).outcome(
        time.monotonic() + CHECK_TIMEOUT, app.settings)
    if not redis_status["ok"]:
        return ["redis: %s" % redis_status["error"]]
    return [NO_WORKER] if workers == 0 else []


def count_workers(redis):
    return rq_backlog(redis)["workers"]


def read_state(settings, started_at, now=None):
    # Its own connection, closed after: a restarted database costs one failed check, no more.
    with connection():
        check_writable()
        return service_state(settings, started_at, now)


def check_writable():
    """A write the database must take, rolled back: a read-only or broken database is not ok."""
    with write_transaction() as transaction:
        FifoCounter.update(last=FifoCounter.last).execute()
        transaction.rollback()


def service_state(settings, started_at=None, now=None):
    """From the database alone: the overview, each job's health, the pauses, and the reasons
    the service is degraded (empty when it is not)."""
    now = now or utcnow()
    jobs = job_health(job_intervals(settings), job_runs(), now, started_at or now)
    paused = {check_type: {"cause": p.cause, "reason": p.reason, "since": p.since.isoformat() + "Z"}
              for check_type, p in current_pauses().items()}
    reasons = ["%s: %s" % (job_id, problem) for job_id, job in jobs.items() for problem in job["problems"]]
    reasons += ["%s batch creation paused: %s" % (check_type, p["reason"])
                for check_type, p in paused.items() if p["cause"] == "credits"]
    if settings.keyless_for_bouncer:
        reasons.append(NO_KEY)
    return {"overview": queue_overview(settings), "jobs": jobs, "paused": paused, "reasons": reasons}


def ping(redis):
    return redis.ping()


class Probe:
    """One check running in a daemon thread. A check still stuck at the deadline is abandoned:
    it ends on its own once the driver gives up, and never holds the process open. /health is
    for anyone to read, so a failure says `unreachable` there; what the driver said (a host, a
    port, a database's name) goes to the log."""

    def __init__(self, name, check, *args):
        self.name = name
        self.value = self.error = None
        self.thread = threading.Thread(target=self.run, args=(check, *args), daemon=True,
                                       name="health-%s" % name)
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
            log.warning("Health: the %s does not answer: %s", self.name, describe_error(self.error, settings))
            return {"ok": False, "error": "unreachable"}, None
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


def job_health(intervals, runs, now, started_at):
    """{job id: its health} for the jobs of `intervals` ({job id: seconds}), from their recorded runs."""
    return {job_id: one_job_health(interval, runs.get(job_id), now, started_at)
            for job_id, interval in intervals.items()}


def one_job_health(interval, run, now, started_at):
    window = OVERDUE_INTERVALS * interval + GRACE_SECONDS
    last_success = run.last_success_at if run is not None else None
    age = (now - last_success).total_seconds() if last_success else None
    overdue = (age > window) if age is not None else (now - started_at).total_seconds() > window
    problems = []
    if overdue:
        problems.append("no success for %s s (more than %d intervals of %d s and %d s of grace)"
                        % (round(age) if age is not None else "ever", OVERDUE_INTERVALS, interval, GRACE_SECONDS))
    if run is not None and run.failures_in_a_row >= FAILING_RUNS:
        problems.append("failed %d times in a row: %s" % (run.failures_in_a_row, run.last_error))
    refused = run.refused_status if run is not None else None
    if refused in REFUSALS:
        problems.append(REFUSALS[refused])
    elif refused == 429 and run.refusals_in_a_row >= RATE_LIMITED_RUNS:
        problems.append("rate limited by Bouncer (429) %d runs in a row" % run.refusals_in_a_row)
    return {"interval": interval,
            "last_success": last_success.isoformat() + "Z" if last_success else None,
            "age_seconds": round(age, 1) if age is not None else None,
            "overdue": overdue,
            "last_seconds": run.last_seconds if run is not None else None,
            "failures_in_a_row": run.failures_in_a_row if run is not None else 0,
            "last_error": run.last_error if run is not None else None,
            "refused": ({"status": refused, "message": run.refused_message} if refused else None),
            "problems": problems}


def job_runs():
    """{job id: its JobRun} of every job that ever ran."""
    return {run.job_id: run for run in JobRun.select()}

