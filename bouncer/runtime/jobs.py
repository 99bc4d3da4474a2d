"""The repeating jobs, as RQ runs them. Top-level functions taking a check type, so RQ can import
them by name (names.JOB_FUNCTIONS); each runs the very cycle the CLI runs (again while triggers
ask), logs what it did, and records its last run for /health. A job is never retried: a failed
cycle is simply the next cycle's work. `webhook_sender` delivers the webhooks that are due, on
a queue of its own, so that a receiver that hangs never holds up a cycle's job.
`retention_pruner` removes, once a day, what RETENTION_DAYS no longer keeps, in short slices,
for at most PRUNE_BUDGET a run; what it leaves is queued again at once, behind the cycles.
"""
import logging
import time
from collections import namedtuple

from rq import get_current_job

from bouncer.app import current_app
from bouncer.cycles.locks import CycleLock
from bouncer.cycles.runner import run_until_quiet
from bouncer.cycles.triggers import trigger_pruner, trigger_webhook_sender
from bouncer.logs import ids
from bouncer.names import (
    CHECK_TYPES, CREATION, CYCLE_QUEUE, JOB_TIMEOUT, PRUNER, PRUNER_LOCK, SENDER_LOCK, STATUS, WEBHOOK_QUEUE,
    WEBHOOK_SENDER, CycleKind, job_id, job_intervals,
)
from bouncer.news import webhooks
from bouncer.reading.health import describe_error
from bouncer.services import erasure
from bouncer.store.database import connection, utcnow
from bouncer.store.models import JobRun

log = logging.getLogger(__name__)

JobSpec = namedtuple("JobSpec", "func args interval queue")
PRUNE_BUDGET = JOB_TIMEOUT * 0.8   # seconds a pruner run works before it leaves the rest to the next


def create_batches_job(check_type):
    return run_job(CREATION, check_type)


def check_batches_job(check_type):
    return run_job(STATUS, check_type)


def send_webhooks_job():
    """Deliver the webhooks that are due, one sender at a time."""
    app = current_app()
    started = time.monotonic()
    with connection(), CycleLock(app.redis, *SENDER_LOCK) as held:
        if not held:
            return "another sender is running"
        done = webhooks.send_due(app.settings)
        summary = ", ".join("%d %s" % (n, state) for state, n in sorted(done.items())) or "nothing due"
        record_run(WEBHOOK_SENDER, started_at=utcnow(), summary=summary, seconds=time.monotonic() - started)
    log.log(logging.INFO if done else logging.DEBUG, "Job %s done in %.2fs: %s", WEBHOOK_SENDER,
            time.monotonic() - started, summary, extra=ids(job_id=WEBHOOK_SENDER))
    return summary


def prune_job():
    """Remove what the retention period no longer keeps, one pruner at a time."""
    app = current_app()
    started, started_at = time.monotonic(), utcnow()
    with connection(), CycleLock(app.redis, *PRUNER_LOCK) as held:
        if not held:
            return "another pruner is running"
        report = erasure.prune(app, who=PRUNER, seconds=PRUNE_BUDGET)
        record_run(PRUNER, started_at=started_at, summary=report.summary(), seconds=time.monotonic() - started)
    if report.unfinished:
        trigger_pruner(app.redis)
    log.info("Job %s done in %.2fs: %s", PRUNER, time.monotonic() - started, report.summary(),
             extra=ids(job_id=PRUNER))
    return report.summary()


CYCLE_JOBS = {CREATION: create_batches_job, STATUS: check_batches_job}


def job_definitions(settings):
    """{job id: JobSpec} of the repeating jobs: the four cycles, the webhook sender, the pruner."""
    intervals = job_intervals(settings)
    jobs = {job_id(kind, check_type): JobSpec(CYCLE_JOBS[kind], (check_type,), intervals[job_id(kind, check_type)],
                                              CYCLE_QUEUE)
            for check_type in CHECK_TYPES for kind in CycleKind}
    jobs[WEBHOOK_SENDER] = JobSpec(send_webhooks_job, (), intervals[WEBHOOK_SENDER], WEBHOOK_QUEUE)
    jobs[PRUNER] = JobSpec(prune_job, (), intervals[PRUNER], CYCLE_QUEUE)
    return jobs


def run_job(kind, check_type):
    """Run one cycle (again, as long as a trigger asked for it while it ran); log and record."""
    name = job_id(kind, check_type)
    app = current_app()
    job = get_current_job()
    started, started_at = time.monotonic(), utcnow()

    def finished(report):
        if not report.skipped:
            with connection():
                record_run(name, started_at, summary=report.summary(), refused=report.refused,
                           seconds=report.seconds)
                tell_endings(app)
        # The cycle said what it did (runner.py); this line only times the job.
        log.debug("Job %s done in %.2fs: %s", name, time.monotonic() - started, report.summary(),
                  extra=ids(job_id=name))

    try:
        return run_until_quiet(app, kind, check_type, on_report=finished).summary()
    except Exception as exc:
        log.exception("Job %s (%s, rq job %s) failed after %.1fs; the next run takes over",
                      name, check_type, job.id if job else "-", time.monotonic() - started,
                      extra=ids(job_id=name))
        record_failure(app, name, started_at, exc, time.monotonic() - started)
        raise


def tell_endings(app):
    """Batches this cycle ended have their webhooks sent at once, not at the sender's next run."""
    if webhooks.has_due():
        trigger_webhook_sender(app.redis)


def record_run(name, started_at, summary="", refused=None, seconds=None, now=None):
    """A run of job `name` that finished. `refused`: (status, message) when Bouncer's answer
    (401, 402, 429) ended it."""
    now = now or utcnow()
    values = {"last_started_at": started_at, "last_success_at": now, "failures_in_a_row": 0,
              "last_summary": summary[:500], "last_seconds": seconds,
              "refused_status": refused[0] if refused else None,
              "refused_message": refused[1][:300] if refused else None}
    upsert_run(name, values, refusals_in_a_row=1 if refused else 0)


def record_failure(app, name, started_at, exc, seconds, now=None):
    """A run that raised: kept, if the database takes it (it may be what failed)."""
    now = now or utcnow()
    values = {"last_started_at": started_at, "last_failure_at": now, "last_seconds": seconds,
              "last_error": describe_error(exc, app.settings)[:300]}
    try:
        with connection():
            upsert_run(name, values, failures_in_a_row=1)
    except Exception as failure:
        log.warning("Job %s: its failure could not be recorded either (%s)", name, type(failure).__name__)


def upsert_run(name, values, **counters):
    """Insert or update the job's row; each of `counters` (name=1 or 0) counts up from what is
    stored when 1, starts again when 0."""
    update = {getattr(JobRun, k): v for k, v in values.items()}
    for counter, step in counters.items():
        column = getattr(JobRun, counter)
        update[column] = column + 1 if step else 0
    (JobRun.insert(job_id=name, **values, **counters)
     .on_conflict(conflict_target=[JobRun.job_id], update=update).execute())

