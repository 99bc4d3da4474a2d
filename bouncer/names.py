"""The names other code, Redis and operators rely on, declared once: check types, cycle kinds,
RQ queues, job ids and the functions they run, Redis keys.

Job ids are part of the contract (design.md): `batch_creator_<check type>` runs the creation
cycle, `status_checker_<check type>` the status cycle, `webhook_sender` delivers webhooks,
`retention_pruner` removes what the retention period no longer keeps; `<id>_now` is a run a
trigger queued. A job's function is named here by its import path, so the
code that queues a job (a trigger, deep in a cycle) never imports the runtime that runs it.
"""
from enum import StrEnum

from bouncer import __version__

CHECK_TYPES = ("deliverable", "catchall")
# QUEUE_POLICY: the line as the original plan has it (oldest user batch first), or weighted fair
# share between users (queue/fairness.py).
FIFO, FAIR = QUEUE_POLICIES = ("fifo", "fair")


class CycleKind(StrEnum):
    CREATION = "creation"   # pack the oldest pending rows into Bouncer batches
    STATUS = "status"       # follow outstanding Bouncer batches, ingest the completed ones


CREATION, STATUS = CycleKind.CREATION, CycleKind.STATUS

# -- RQ queues and jobs --

CYCLE_QUEUE = "bouncer-queue"        # the cycles' jobs
WEBHOOK_QUEUE = "bouncer-webhooks"   # webhook deliveries, apart, so a slow receiver never holds a cycle

JOB_PREFIXES = {CREATION: "batch_creator", STATUS: "status_checker"}
WEBHOOK_SENDER = "webhook_sender"
NOW_SUFFIX = "_now"                  # a run a trigger queued, beside the scheduled one

PRUNER = "retention_pruner"
JOB_FUNCTIONS = {CREATION: "bouncer.runtime.jobs.create_batches_job",
                 STATUS: "bouncer.runtime.jobs.check_batches_job",
                 WEBHOOK_SENDER: "bouncer.runtime.jobs.send_webhooks_job",
                 PRUNER: "bouncer.runtime.jobs.prune_job"}

WEBHOOK_INTERVAL = 5    # seconds between sender runs: the first retry's delay
PRUNER_INTERVAL = 86400  # daily: RETENTION_DAYS counts in days
# A cycle holds its lock with a 60 s expiry renewed every 20 s by a thread of the horse. A cycle
# that hangs is stopped by this timeout (rq raises JobTimeoutException in the horse, and the worker
# kills a horse still alive at timeout + 60 s), so a hung cycle holds its lock for at most this
# long; a horse that dies stops renewing, and its lock frees itself within 60 s.
JOB_TIMEOUT = 300
NOW_FAILURE_TTL = 86400  # a failed triggered run is kept this long, for `rq info`


def job_id(kind, check_type):
    """`batch_creator_deliverable`, `status_checker_catchall`, ..."""
    return "%s_%s" % (JOB_PREFIXES[kind], check_type)


def job_intervals(settings):
    """{job id: seconds between its runs} of every repeating job."""
    every = {CREATION: settings.batch_create_interval, STATUS: settings.status_check_interval}
    intervals = {job_id(kind, check_type): every[kind] for check_type in CHECK_TYPES for kind in CycleKind}
    intervals[WEBHOOK_SENDER] = WEBHOOK_INTERVAL
    intervals[PRUNER] = PRUNER_INTERVAL
    return intervals


# -- Redis keys --

def lock_key(kind, check_type):
    """The lock one cycle of `kind` for `check_type` holds while it runs (and the sender's)."""
    return "bouncer:lock:%s:%s" % (kind, check_type)


SENDER_LOCK = ("webhooks", "all")                       # lock_key(*SENDER_LOCK)
PRUNER_LOCK = ("retention", "all")
REGISTRATION_LOCK_KEY = "bouncer:lock:schedule-registration"
RUN_AGAIN_KEY = "bouncer:again:%s:%s"    # kind, check type: a trigger came while the cycle ran
CALLED_BACK_KEY = "bouncer:called:%s"    # check type: Bouncer batches its callback named


# -- database locks (store.database.serialize_on) --

# Held by a reservation of a check type while it plans and writes; an erasure holds both, so
# that no row it erases is sent, attached or completed from the cache under it.
RESERVATION_LOCK = "reservation:%s"
# Admission holds it shared while it finds or makes addresses and writes the rows that name them;
# whatever removes an address holds it alone, so no row ever names an address removed meanwhile.
ADDRESSES_LOCK = "addresses"
USER_AGENT = "bouncer-queue/%s" % __version__     # on every request to Bouncer and to a webhook receiver
