"""The repeating jobs, as RQ runs them. Top-level functions taking a check type, so RQ can import
them by name; each runs the very cycle the CLI runs (again while triggers ask), logs what it did,
and records its last success for /health. A job is never retried: a failed cycle is simply the
next cycle's work.

Job ids are part of the contract (design.md): `batch_creator_<check type>` runs the creation
cycle, `status_checker_<check type>` the status cycle; `<id>_now` is the run a trigger queued.
`webhook_sender` delivers the webhooks that are due, on a queue of its own, so that a receiver
that hangs never holds up a cycle's job.
"""
import logging
import time
from collections import namedtuple

from .app import current_app
from .config import CHECK_TYPES, CREATION, STATUS
from .db import connection, utcnow
from .logs import ids
from .models import JobRun

log = logging.getLogger(__name__)

QUEUE_NAME = "bouncer-queue"
WEBHOOK_QUEUE = "bouncer-webhooks"
WEBHOOK_SENDER = "webhook_sender"
WEBHOOK_INTERVAL = 5         # seconds between sender runs: the first retry's delay
WEBHOOK_LOCK = "bouncer:lock:webhooks"
JOB_PREFIXES = {CREATION: "batch_creator", STATUS: "status_checker"}
# A cycle holds its lock with a 60 s expiry renewed every 20 s by a thread of the horse. A cycle
# that hangs is stopped by this timeout (rq raises JobTimeoutException in the horse, and the worker
# kills a horse still alive at timeout + 60 s), so a hung cycle holds its lock for at most this
# long; a horse that dies stops renewing, and its lock frees itself within 60 s.
JOB_TIMEOUT = 300
NOW_FAILURE_TTL = 86400


def job_id(kind, check_type):
    return "%s_%s" % (JOB_PREFIXES[kind], check_type)


def create_batches_job(check_type):
    return run_job(CREATION, check_type)


def check_batches_job(check_type):
    return run_job(STATUS, check_type)


def send_webhooks_job():
    """Deliver the webhooks that are due, one sender at a time."""
    from . import webhooks
    from .db import connection
    from .locks import CycleLock
    app = current_app()
    started = time.monotonic()
    with connection(), CycleLock(app.redis, "webhooks", "all") as held:
        if not held:
            return "another sender is running"
        done = webhooks.send_due(app.settings)
        summary = ", ".join("%d %s" % (n, state) for state, n in sorted(done.items())) or "nothing due"
        record_run(WEBHOOK_SENDER, started_at=utcnow(), summary=summary, seconds=time.monotonic() - started)
    log.info("Job %s done in %.2fs: %s", WEBHOOK_SENDER, time.monotonic() - started, summary,
             extra=ids(job_id=WEBHOOK_SENDER))
    return summary


JOB_FUNCTIONS = {CREATION: create_batches_job, STATUS: check_batches_job}
JobSpec = namedtuple("JobSpec", "func args interval queue")


def job_definitions(settings):
    """{job id: JobSpec} of the repeating jobs: the four cycles and the webhook sender."""
    intervals = {CREATION: settings.batch_create_interval, STATUS: settings.status_check_interval}
    jobs = {job_id(kind, check_type): JobSpec(JOB_FUNCTIONS[kind], (check_type,), intervals[kind], QUEUE_NAME)
            for check_type in CHECK_TYPES for kind in (CREATION, STATUS)}
    jobs[WEBHOOK_SENDER] = JobSpec(send_webhooks_job, (), WEBHOOK_INTERVAL, WEBHOOK_QUEUE)
    return jobs


def trigger_webhook_sender(redis):
    """Have the sender run now, unless a run queued this way is still waiting."""
    from rq import Queue
    from rq.job import JobStatus
    queue = Queue(WEBHOOK_QUEUE, connection=redis)
    run_id = WEBHOOK_SENDER + "_now"
    queued = queue.fetch_job(run_id)
    if queued is not None and queued.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.SCHEDULED):
        return False
    queue.enqueue(send_webhooks_job, job_id=run_id, job_timeout=JOB_TIMEOUT, failure_ttl=NOW_FAILURE_TTL)
    return True


def enqueue_cycle(queue, kind, check_type, run_id):
    """Queue one run of a cycle now, with the scheduled runs' timeout (the lock is sized to it).
    It goes to the front of the queue: a trigger (Bouncer's callback, a freed slot) is work
    known to be waiting, while the routine runs queued before it mostly find nothing to do, and
    the scheduler queues them all in the same instant."""
    queue.enqueue(JOB_FUNCTIONS[kind], check_type, job_id=run_id, job_timeout=JOB_TIMEOUT,
                  failure_ttl=NOW_FAILURE_TTL, at_front=True)


def run_job(kind, check_type):
    """Run one cycle (again, as long as a trigger asked for it while it ran); log and record."""
    from rq import get_current_job

    from .cycles import run_until_quiet   # here: status and /health read job_definitions, run no cycle
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
        log.info("Job %s done in %.2fs: %s", name, time.monotonic() - started, report.summary(),
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
    from . import webhooks
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
    from .health import describe_error
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


def job_runs():
    """{job id: its JobRun} of every job that ever ran."""
    return {run.job_id: run for run in JobRun.select()}
