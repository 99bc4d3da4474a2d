"""The scheduler process: registers the six repeating jobs (four cycles, the webhook sender and
the retention pruner) with rq-scheduler, idempotently, then runs its loop. Every line that
knows about rq-scheduler lives here, so moving to `rq cron` later touches this one module."""

import contextlib
import datetime
import logging
import signal
import time

from redis.exceptions import LockError, RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq_scheduler import Scheduler

from bouncer.names import CYCLE_QUEUE, JOB_PREFIXES, JOB_TIMEOUT, PRUNER, WEBHOOK_SENDER
from bouncer.runtime.jobs import job_definitions

log = logging.getLogger(__name__)


# Results are kept forever (-1), never shorter than the interval: a job whose hash expires
# between two runs silently stops repeating. The ids are stable, so this is bounded: one job hash
# and one entry in the finished registry per id, and rq 2.12 keeps a job's results in one stream
# trimmed with XADD MAXLEN ~ 10 (approximate trimming: about 10 to 110 entries per job).
RESULT_TTL = -1
REGISTRATION_LOCK = "bouncer:lock:schedule-registration"


REGISTRATION_LOCK_TIMEOUT = 10   # expiry: a registrant killed mid-way frees it
REGISTRATION_WAIT = 5            # how long a second registrant waits for the first


POLL_INTERVAL = 1  # seconds between scheduler rounds; the shortest job interval is 1 s
REDIS_RETRY_INTERVAL = 2  # seconds between attempts to reach Redis again after losing it


def register_jobs(scheduler, settings, now=None):
    """Make the scheduled jobs exactly those of `job_definitions(settings)`.

    A job scheduled with the same definition is kept as it is (its next run untouched, so a
    restart never fires it early); one whose definition changed is replaced; ids of ours no longer
    wanted are removed. `now` is an aware UTC datetime. Returns {"kept", "added", "replaced",
    "removed"}: lists of job ids."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    wanted = job_definitions(settings)
    done = {"kept": [], "added": [], "replaced": [], "removed": []}
    with registration_lock(scheduler.connection):
        scheduled = scheduled_jobs(scheduler)
        for job_id in sorted(set(scheduled) - set(wanted)):
            remove_job(scheduler, scheduled[job_id][0])
            done["removed"].append(job_id)
        for job_id, spec in sorted(wanted.items()):
            done[place_job(scheduler, job_id, spec, scheduled.get(job_id), now)].append(job_id)
    return done


def registration_lock(redis):
    # Blocking, briefly: two schedulers starting together register one after the other.
    return redis.lock(REGISTRATION_LOCK, timeout=REGISTRATION_LOCK_TIMEOUT,
                      blocking=True, blocking_timeout=REGISTRATION_WAIT)


def expected_definition(spec):
    """What decides whether a scheduled job is still the one wanted."""
    return {"func_name": "%s.%s" % (spec.func.__module__, spec.func.__name__), "args": tuple(spec.args),
            "interval": spec.interval, "origin": spec.queue, "timeout": JOB_TIMEOUT,
            "result_ttl": RESULT_TTL}


def definition_of(job):
    return {"func_name": job.func_name, "args": tuple(job.args), "interval": job.meta.get("interval"),
            "origin": job.origin, "timeout": job.timeout, "result_ttl": job.result_ttl}


def scheduled_jobs(scheduler):
    """{job id: (job, next run as naive UTC)} of our scheduled jobs. rq-scheduler's get_jobs
    also drops entries whose job hash is gone, so those count as missing."""
    return {job.id: (job, when) for job, when in scheduler.get_jobs(with_times=True)
            if job.id.startswith(tuple(p + "_" for p in JOB_PREFIXES.values())) or job.id in (WEBHOOK_SENDER, PRUNER)}


def place_job(scheduler, job_id, spec, current, now):
    """Keep, add or replace one wanted job; returns which it did."""
    definition = expected_definition(spec)
    if current is None:
        if not restore_existing_job(scheduler, job_id, definition, now):
            schedule_job(scheduler, job_id, spec, now)
        log.debug("Scheduled job %s added: every %ss", job_id, definition["interval"])
        return "added"
    job, next_run = current
    if definition_of(job) == definition:
        return "kept"
    # The sooner of the old next run and one new interval from now: a longer interval does not
    # fire early, a shorter one takes effect at once.
    soonest = now + datetime.timedelta(seconds=definition["interval"])
    schedule_job(scheduler, job_id, spec, min(next_run.replace(tzinfo=datetime.timezone.utc), soonest))
    log.info("Scheduled job %s replaced: every %ss (was every %ss)", job_id,
             definition["interval"], job.meta.get("interval"))
    return "replaced"


def restore_existing_job(scheduler, job_id, definition, now):
    """A job hash of the same definition whose schedule entry is missing: cancelled by hand, or
    being moved to the queue by a scheduler at this very moment (it removes the entry, then adds
    the next run). Rewriting the hash could clobber a queued job; putting the entry back only if
    still absent (ZADD NX) cannot, and yields to the scheduler's own next run."""
    try:
        job = Job.fetch(job_id, connection=scheduler.connection)
    except NoSuchJobError:
        return False
    if definition_of(job) != definition:
        return False
    scheduler.connection.zadd(scheduler.scheduled_jobs_key, {job_id: now.timestamp()}, nx=True)
    return True


def schedule_job(scheduler, job_id, spec, when):
    # No retry: a failed cycle is simply the next cycle's work.
    scheduler.schedule(when, spec.func, args=spec.args, interval=spec.interval, id=job_id,
                       queue_name=spec.queue, timeout=JOB_TIMEOUT, result_ttl=RESULT_TTL)


def remove_job(scheduler, job):
    scheduler.cancel(job)
    # Deleting the hash also takes it out of the queue, so a stale run never starts.
    job.delete()
    log.info("Scheduled job %s removed: no longer wanted", job.id)


def missing_job_ids(scheduler, settings):
    """Wanted ids absent from the schedule (Redis flushed, or restored from an old snapshot)."""
    key = scheduler.scheduled_jobs_key
    wanted = sorted(job_definitions(settings))
    with scheduler.connection.pipeline(transaction=False) as pipe:
        for job_id in wanted:
            pipe.zscore(key, job_id)
        scores = pipe.execute()
    return [job_id for job_id, score in zip(wanted, scores) if score is None]


def log_registration(done):
    log.info("Scheduled jobs on %s: kept %s, added %s, replaced %s, removed %s", CYCLE_QUEUE,
             *(", ".join(done[k]) or "-" for k in ("kept", "added", "replaced", "removed")))


class BouncerScheduler(Scheduler):
    """rq-scheduler's loop, which also puts back any of our jobs that went missing. The check
    runs while this scheduler holds rq-scheduler's round lock, so it never sees another
    scheduler halfway through moving a job to the queue."""

    def __init__(self, settings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings

    def enqueue_jobs(self):
        self.restore_missing_jobs()
        return super().enqueue_jobs()

    # rq-scheduler's loop ends by removing its round lock and recording its death. With Redis
    # gone both raise, which would turn a stop (SIGTERM) into a crash; both keys expire anyway.
    def remove_lock(self):
        try:
            super().remove_lock()
        except RedisError:
            self._lock_acquired = False

    def register_death(self):
        with contextlib.suppress(RedisError):
            super().register_death()

    def restore_missing_jobs(self):
        missing = missing_job_ids(self, self.settings)
        if not missing:
            return
        log.warning("Scheduler %s: jobs %s are not scheduled; registering again",
                    self.name, ", ".join(missing))
        try:
            log_registration(register_jobs(self, self.settings))
        except LockError as exc:
            log.warning("Scheduler %s: registration busy (%s); trying again next round", self.name, exc)


def stop_on_signal(signum, frame):
    raise SystemExit(0)


def run_scheduler(app):
    while True:
        # rq-scheduler installs its own SIGTERM/SIGINT handlers (they record its death, free its
        # lock and raise SystemExit) only once its loop starts; these cover registration and the
        # wait for Redis before that.
        signal.signal(signal.SIGTERM, stop_on_signal)
        signal.signal(signal.SIGINT, stop_on_signal)
        scheduler = BouncerScheduler(app.settings, queue=Queue(CYCLE_QUEUE, connection=app.redis),
                                     connection=app.redis, interval=POLL_INTERVAL)
        try:
            log_registration(register_jobs(scheduler, app.settings))
            log.info("Scheduler %s: running, polling every %ss", scheduler.name, POLL_INTERVAL)
            scheduler.run()
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
        except RedisError as exc:
            # Redis restarted or failed over: the schedule lives there, so wait and start over;
            # registration puts the six jobs back if it came back empty.
            log.error("Scheduler %s: Redis unavailable (%s); trying again in %ss",
                      scheduler.name, exc, REDIS_RETRY_INTERVAL)
            time.sleep(REDIS_RETRY_INTERVAL)
            continue
        break
    log.info("Scheduler %s: stopped", scheduler.name)

