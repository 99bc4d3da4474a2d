"""Triggers: what makes a cycle (or the webhook sender) run now rather than at its next tick.

`run_now` queues a cycle at once (Bouncer's callback, a slot freed by an ingest); a burst of
triggers costs one run, and a trigger that arrives while the cycle runs asks it to run once more
(`ask_to_run_again`, taken by the runner as the cycle ends) instead of being lost. Bouncer's
callback also names the batch (its URL carries the reservation's ledger id): `note_called_back`
keeps that id, and the status cycle checks the batches so named before the others
(`take_called_back`).

Jobs are queued by the name of their function (names.JOB_FUNCTIONS): the worker imports it, and
nothing here depends on the runtime that runs them.
"""
import logging

from redis.exceptions import RedisError
from rq import Queue
from rq.job import JobStatus

from bouncer.logs import ids
from bouncer.names import (
    CALLED_BACK_KEY, CYCLE_QUEUE, JOB_FUNCTIONS, JOB_TIMEOUT, NOW_FAILURE_TTL, NOW_SUFFIX, PRUNER,
    RUN_AGAIN_KEY, WEBHOOK_QUEUE, WEBHOOK_SENDER, job_id, lock_key,
)

log = logging.getLogger(__name__)

AGAIN_TTL = 300             # a request to run again outlives no job (names.JOB_TIMEOUT)
CALLED_TAKE = 100           # ids taken at a time (there are at most BOUNCER_MAX_OUTSTANDING)
WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)


def run_now(redis, kind, check_type):
    """Have a cycle of `kind` run for `check_type` now: queue it, unless one queued this way is
    still waiting (a burst of triggers costs one cycle). When a cycle of that kind is running,
    it is asked to run once more as it ends instead, so a trigger arriving mid-cycle (a batch
    completing while the previous one is ingested) is not lost. Returns whether a job was
    queued."""
    run_id = job_id(kind, check_type) + NOW_SUFFIX
    queue = Queue(CYCLE_QUEUE, connection=redis)
    state = state_of(queue, run_id)
    if state in WAITING:
        log.info("Job %s already waiting", run_id, extra=ids(job_id=run_id))
        return False
    if state == JobStatus.STARTED or redis.exists(lock_key(kind, check_type)):
        ask_to_run_again(redis, kind, check_type)
        log.info("A %s cycle for %s is running: it runs once more when it ends", kind, check_type,
                 extra=ids(cycle=kind, check_type=check_type))
        return False
    # At the front of the queue: a trigger is work known to be waiting, while the routine runs
    # queued before it mostly find nothing to do (the scheduler queues them all in one instant).
    queue.enqueue(JOB_FUNCTIONS[kind], check_type, job_id=run_id, job_timeout=JOB_TIMEOUT,
                  failure_ttl=NOW_FAILURE_TTL, at_front=True)
    log.info("Job %s queued", run_id, extra=ids(job_id=run_id))
    return True


def trigger_webhook_sender(redis):
    """Have the sender run now, unless a run queued this way is still waiting."""
    queue = Queue(WEBHOOK_QUEUE, connection=redis)
    run_id = WEBHOOK_SENDER + NOW_SUFFIX
    if state_of(queue, run_id) in WAITING:
        return False
    queue.enqueue(JOB_FUNCTIONS[WEBHOOK_SENDER], job_id=run_id, job_timeout=JOB_TIMEOUT,
                  failure_ttl=NOW_FAILURE_TTL)
    return True


def trigger_pruner(redis):
    """Have the pruner run again soon (it stopped at its time bound with work left), behind the
    cycles already queued, unless such a run is still waiting."""
    queue = Queue(CYCLE_QUEUE, connection=redis)
    run_id = PRUNER + NOW_SUFFIX
    if state_of(queue, run_id) in WAITING:
        return False
    queue.enqueue(JOB_FUNCTIONS[PRUNER], job_id=run_id, job_timeout=JOB_TIMEOUT, failure_ttl=NOW_FAILURE_TTL)
    return True


def state_of(queue, run_id):
    queued = queue.fetch_job(run_id)
    return queued.get_status(refresh=False) if queued is not None else None


def ask_to_run_again(redis, kind, check_type):
    """The cycle running (or about to) runs once more as it ends."""
    redis.set(RUN_AGAIN_KEY % (kind, check_type), 1, ex=AGAIN_TTL)


def take_run_again(redis, kind, check_type):
    """Whether a cycle was asked to run again since this was last asked (the request is taken)."""
    return bool(redis.delete(RUN_AGAIN_KEY % (kind, check_type)))


def note_called_back(redis, check_type, ledger_id):
    """Bouncer's callback named this batch: the next status cycle of `check_type` (or the one
    running) checks it before the others."""
    key = CALLED_BACK_KEY % check_type
    pipe = redis.pipeline(transaction=False)
    pipe.sadd(key, ledger_id)
    pipe.expire(key, AGAIN_TTL)
    pipe.execute()


def take_called_back(redis, check_type):
    """Ledger ids Bouncer's callback named since the last call, each given once. Only a hint for
    the order of the checks: Redis away, there are none."""
    try:
        taken = redis.spop(CALLED_BACK_KEY % check_type, CALLED_TAKE)
    except RedisError:
        return []
    return [int(ledger_id) for ledger_id in taken or ()]
