"""The four repeating jobs. Top-level functions taking a check type, so RQ can import them by
name; each runs the very cycle the CLI runs, logs what it did, and records its last success for
/health. A job is never retried: a failed cycle is simply the next cycle's work."""
import logging
import time

from rq import Queue, get_current_job
from rq.job import JobStatus

from .app import current_app
from .checker import run_status_cycle
from .config import CHECK_TYPES
from .creator import run_creation_cycle
from .db import utcnow
from .locks import lock_name

log = logging.getLogger(__name__)

QUEUE_NAME = "bouncer-queue"
# A cycle holds its lock with a 60 s expiry renewed every 20 s by a thread of the horse. A cycle
# that hangs is stopped by this timeout (rq raises JobTimeoutException in the horse, and the worker
# kills a horse still alive at timeout + 60 s), so a hung cycle holds its lock for at most this
# long; a horse that dies stops renewing, and its lock frees itself within 60 s.
JOB_TIMEOUT = 300
LAST_SUCCESS_KEY = "bouncer:jobs:last_success"
# A job in these states has not run yet: queueing it again would add nothing.
QUEUED_STATES = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)
NOW_FAILURE_TTL = 86400
# Set while a cycle runs by a trigger that came too late for it: the cycle runs once more.
AGAIN_KEY = "bouncer:again:%s:%s"
CYCLE_LOCKS = {"batch_creator": "creator", "status_checker": "checker"}


def create_batches_job(check_type):
    return run_job("batch_creator", run_creation_cycle, check_type)


def check_batches_job(check_type):
    return run_job("status_checker", run_status_cycle_refilling, check_type)


def run_status_cycle_refilling(app, check_type):
    """The status cycle, queueing a creation cycle as soon as a batch ends: a slot that waits
    for the next creation tick (or for the rest of this cycle's ingests) is throughput lost.
    Another worker then fills it while this one ingests the next batch."""
    return run_status_cycle(app, check_type,
                            on_slot_freed=lambda: run_now(app.redis, "batch_creator", check_type))


JOB_FUNCTIONS = {"batch_creator": create_batches_job, "status_checker": check_batches_job}


def job_definitions(settings):
    """{job id: (function, check type, interval in seconds)} of the four repeating jobs."""
    jobs = {}
    for check_type in CHECK_TYPES:
        jobs["batch_creator_%s" % check_type] = (
            create_batches_job, check_type, settings.batch_create_interval)
        jobs["status_checker_%s" % check_type] = (
            check_batches_job, check_type, settings.status_check_interval)
    return jobs


def run_now(redis, kind, check_type):
    """Have a cycle of `kind` (batch_creator or status_checker) run for `check_type` now: queue
    it, unless one queued this way is still waiting (a burst of triggers costs one cycle). When a
    cycle of that kind is running, it is asked to run once more as it ends instead, so a trigger
    arriving mid-cycle (a batch completing while the previous one is ingested) is not lost.
    Returns whether a job was queued."""
    job_id = "%s_%s_now" % (kind, check_type)
    queue = Queue(QUEUE_NAME, connection=redis)
    queued = queue.fetch_job(job_id)
    if queued is not None and queued.get_status(refresh=False) in QUEUED_STATES:
        log.info("Job %s already waiting", job_id)
        return False
    running = queued is not None and queued.get_status(refresh=False) == JobStatus.STARTED
    if running or redis.exists(lock_name(CYCLE_LOCKS[kind], check_type)):
        redis.set(AGAIN_KEY % (kind, check_type), 1, ex=JOB_TIMEOUT)
        log.info("A %s cycle for %s is running: it runs once more when it ends", kind, check_type)
        return False
    # The scheduled runs' timeout: the cycle's lock is sized to it.
    queue.enqueue(JOB_FUNCTIONS[kind], check_type, job_id=job_id, job_timeout=JOB_TIMEOUT,
                  failure_ttl=NOW_FAILURE_TTL)
    log.info("Job %s queued", job_id)
    return True


def run_job(kind, cycle, check_type):
    """Run one cycle (again, as long as a trigger asked for it while it ran); log and record."""
    job_id = "%s_%s" % (kind, check_type)
    app = current_app()
    job = get_current_job()
    while True:
        started = time.monotonic()
        try:
            report = cycle(app, check_type)
        except Exception:
            log.exception("Job %s (%s, rq job %s) failed after %.1fs; the next run takes over",
                          job_id, check_type, job.id if job else "-", time.monotonic() - started)
            raise
        if not report.skipped:
            record_success(app.redis, job_id)
        log.info("Job %s done in %.2fs: %s", job_id, time.monotonic() - started, report.summary())
        if report.skipped or not app.redis.delete(AGAIN_KEY % (kind, check_type)):
            return report.summary()


def record_success(redis, job_id, now=None):
    redis.hset(LAST_SUCCESS_KEY, job_id, (now or utcnow()).isoformat())


def last_successes(redis):
    """{job id: ISO time of its last successful run}."""
    return {k.decode(): v.decode() for k, v in redis.hgetall(LAST_SUCCESS_KEY).items()}
