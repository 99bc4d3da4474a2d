"""Cycles: the one runner every creation and status cycle goes through, their reports, and the
triggers that make a cycle run now.

Two kinds of cycle, each run for one check type at a time:
- `creation` (creation_cycle.py): greedily pack the oldest pending emails into Bouncer batches;
- `status` (status_cycle.py): follow the outstanding Bouncer batches, ingest the completed ones.

`run_cycle` holds the (kind, check type) lock, gives the cycle a fresh database connection,
times it and logs what it did. Between its steps a cycle asks `cycle.stop_reason()`: a lock
lost mid-cycle (Redis restarted) or a shutdown request (SIGTERM) ends it there, never in the
middle of a Bouncer call, and the report says why.

Triggers: `run_now` queues a cycle at once (Bouncer's callback, a slot freed by an ingest); a
burst of triggers costs one run, and a trigger that arrives while the cycle runs makes it run
once more (`run_until_quiet`) instead of being lost. Bouncer's callback also names the batch
(its URL carries the reservation's ledger id): `note_called_back` keeps that id, and the status
cycle checks the batches so named before the others (`Cycle.called_back`).
"""
import logging
import threading
import time
from dataclasses import dataclass, field

from .config import CREATION, STATUS
from .db import connection
from .logs import ids

log = logging.getLogger(__name__)

KINDS = (CREATION, STATUS)
# Set while a cycle runs by a trigger that came too late for it: the cycle runs once more.
AGAIN_KEY = "bouncer:again:%s:%s"
AGAIN_TTL = 300             # a request to run again outlives no job (jobs.JOB_TIMEOUT)
# Ledger ids Bouncer's callback named, per check type, until a status cycle takes them.
CALLED_KEY = "bouncer:called:%s"
CALLED_TAKE = 100           # ids taken at a time (there are at most BOUNCER_MAX_OUTSTANDING)
# Set by the worker when the platform asks it to stop (SIGTERM): cycles end at their next step.
SHUTDOWN = threading.Event()


@dataclass
class CycleReport:
    check_type: str
    skipped: bool = False      # another process held the lock: nothing done
    stopped: str | None = None
    refused: tuple | None = None   # (status, message): Bouncer's 401, 402 or 429 ended the cycle
    seconds: float = 0.0

    def summary(self):
        if self.skipped:
            return "%s: another %s cycle is running; nothing done" % (self.check_type, self.kind)
        parts = [self.done()]
        if self.stopped:
            parts.append("stopped: %s" % self.stopped)
        return "; ".join(parts)


@dataclass
class CreationReport(CycleReport):
    kind = CREATION
    free_slots: int = 0
    created: list = field(default_factory=list)        # (ledger id, bouncer id, addresses)
    failed_calls: list = field(default_factory=list)   # (ledger id, reason)
    cached: int = 0
    attached: int = 0
    requeued: int = 0
    abandoned: list = field(default_factory=list)      # (ledger id, addresses): possible orphans
    released: list = field(default_factory=list)       # (ledger id, addresses): a dead cycle's, never sent
    admission: object = None                           # intake.AdmissionReport

    def done(self):
        parts = ["%s: %d Bouncer batch(es) created (%d addresses)" % (
            self.check_type, len(self.created), sum(n for _, _, n in self.created))]
        if self.admission is not None and (self.admission.admitted or self.admission.invalid
                                           or self.admission.noticed or self.admission.removed):
            parts.append(self.admission.summary())
        if self.failed_calls:
            parts.append("%d call(s) failed, emails queued again" % len(self.failed_calls))
        if self.cached:
            parts.append("%d email(s) completed from cached verdicts" % self.cached)
        if self.attached:
            parts.append("%d email(s) joined batches in flight" % self.attached)
        if self.abandoned:
            parts.append("%d abandoned reservation(s) released (possible orphans)" % len(self.abandoned))
        if self.released:
            parts.append("%d unsent reservation(s) of a dead cycle released" % len(self.released))
        parts.append("%d free slot(s) at start" % self.free_slots)
        return "; ".join(parts)


@dataclass
class StatusReport(CycleReport):
    kind = STATUS
    checked: int = 0
    ingested: list = field(default_factory=list)   # IngestReport per completed batch
    failed: list = field(default_factory=list)     # (ledger id, reason)
    waiting: int = 0
    errors: int = 0

    def done(self):
        parts = ["%s: %d Bouncer batch(es) checked, %d ingested (%d emails verified), %d waiting" % (
            self.check_type, self.checked, len(self.ingested),
            sum(r.verified for r in self.ingested), self.waiting)]
        if self.failed:
            parts.append("%d failed" % len(self.failed))
        if self.errors:
            parts.append("%d call(s) failed, retried next cycle" % self.errors)
        return "; ".join(parts)


REPORTS = {CREATION: CreationReport, STATUS: StatusReport}


class Cycle:
    """What a running cycle's steps see: the app, the check type, the report they fill, and
    whether they must stop."""

    def __init__(self, app, kind, check_type, lock=None, refill=False):
        self.app = app
        self.kind = kind
        self.check_type = check_type
        self.settings = app.settings
        self.report = REPORTS[kind](check_type)
        self.lock = lock
        self.refill = refill

    def stop_reason(self):
        """Why the cycle must end before its next step, or None."""
        if SHUTDOWN.is_set():
            return "shutdown requested"
        if self.lock is not None and self.lock.lost:
            return "lost its lock (%s); another cycle may be running" % self.lock.name
        return None

    def must_stop(self):
        """Whether the cycle must end before its next step; the report says why."""
        self.report.stopped = self.stop_reason()
        return self.report.stopped is not None

    def slot_freed(self):
        """A Bouncer batch ended: have a creation cycle fill its slot now, when asked to."""
        if self.refill:
            run_now(self.app.redis, CREATION, self.check_type)

    def called_back(self):
        """Ledger ids Bouncer's callback named since the last time a status cycle asked, each
        given once. Only a hint for the order of the checks: Redis away, there are none."""
        from redis.exceptions import RedisError
        try:
            taken = self.app.redis.spop(CALLED_KEY % self.check_type, CALLED_TAKE)
        except RedisError:
            return []
        return [int(ledger_id) for ledger_id in taken or ()]

    def run_again(self):
        """Work is left that this cycle stopped short of: have it run again as it ends."""
        if self.lock is not None:
            self.app.redis.set(AGAIN_KEY % (self.kind, self.check_type), 1, ex=AGAIN_TTL)


def run_cycle(app, kind, check_type, now=None, refill=False):
    """One cycle of `kind` for `check_type`, unless one is already running anywhere (then a
    logged no-op: `report.skipped`). `refill`: a status cycle queues a creation cycle as soon
    as a batch ends. Returns the report."""
    from . import creation_cycle, status_cycle
    from .locks import CycleLock
    steps = {CREATION: creation_cycle.create_batches, STATUS: status_cycle.check_batches}[kind]
    started = time.monotonic()
    lock = CycleLock(app.redis, kind, check_type)
    cycle = Cycle(app, kind, check_type, lock, refill)
    with connection(), lock as held:
        if not held:
            cycle.report.skipped = True
            log.info("%s cycle %s skipped: another one holds the lock", kind.capitalize(), check_type,
                     extra=ids(cycle=kind, check_type=check_type))
            return cycle.report
        steps(cycle, now)
        if cycle.report.stopped is None:
            cycle.report.stopped = cycle.stop_reason()
    cycle.report.seconds = time.monotonic() - started
    log.info("%s cycle %s", kind.capitalize(), cycle.report.summary(),
             extra=ids(cycle=kind, check_type=check_type))
    return cycle.report


def run_until_quiet(app, kind, check_type, on_report=None):
    """Run the cycle, and again as long as a trigger asked for it while it ran. Status cycles
    refill freed slots at once. `on_report(report)` is called after each run."""
    while True:
        report = run_cycle(app, kind, check_type, refill=kind == STATUS)
        if on_report is not None:
            on_report(report)
        if report.skipped or report.stopped == "shutdown requested" \
                or not app.redis.delete(AGAIN_KEY % (kind, check_type)):
            return report


def note_called_back(redis, check_type, ledger_id):
    """Bouncer's callback named this batch: the next status cycle of `check_type` (or the one
    running) checks it before the others."""
    key = CALLED_KEY % check_type
    pipe = redis.pipeline(transaction=False)
    pipe.sadd(key, ledger_id)
    pipe.expire(key, AGAIN_TTL)
    pipe.execute()


def run_now(redis, kind, check_type):
    """Have a cycle of `kind` run for `check_type` now: queue it, unless one queued this way is
    still waiting (a burst of triggers costs one cycle). When a cycle of that kind is running,
    it is asked to run once more as it ends instead, so a trigger arriving mid-cycle (a batch
    completing while the previous one is ingested) is not lost. Returns whether a job was
    queued."""
    from rq import Queue
    from rq.job import JobStatus

    from . import jobs
    from .locks import lock_name
    job_id = jobs.job_id(kind, check_type) + "_now"
    queue = Queue(jobs.QUEUE_NAME, connection=redis)
    queued = queue.fetch_job(job_id)
    state = queued.get_status(refresh=False) if queued is not None else None
    if state in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
        log.info("Job %s already waiting", job_id, extra=ids(job_id=job_id))
        return False
    if state == JobStatus.STARTED or redis.exists(lock_name(kind, check_type)):
        redis.set(AGAIN_KEY % (kind, check_type), 1, ex=AGAIN_TTL)
        log.info("A %s cycle for %s is running: it runs once more when it ends", kind, check_type,
                 extra=ids(cycle=kind, check_type=check_type))
        return False
    jobs.enqueue_cycle(queue, kind, check_type, job_id)
    log.info("Job %s queued", job_id, extra=ids(job_id=job_id))
    return True
