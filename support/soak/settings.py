"""The service as the soak runs it, and the run's own timings and limits."""
import datetime

CHECK_TYPES = ("deliverable", "catchall")

# The service under test, compressed so a minute exercises every path: batches of 100, four in
# flight per check type, a budget of 50 requests a minute that binds (each batch costs a create,
# a few status checks and a download), calls that time out after 3 s, and reservations
# abandoned after 10 s.
MAX_OUTSTANDING = 4
RATE_LIMIT_BUFFER = 50
SERVICE_SETTINGS = {
    "BATCH_CREATE_INTERVAL": "1",
    "STATUS_CHECK_INTERVAL": "2",
    "BOUNCER_BATCH_SIZE": "100",
    "BOUNCER_MAX_OUTSTANDING": str(MAX_OUTSTANDING),
    "RATE_LIMIT_PER_MINUTE": "60",
    "RATE_LIMIT_BUFFER": str(RATE_LIMIT_BUFFER),
    "BOUNCER_TIMEOUT": "3",
    "RESERVATION_TIMEOUT": "10",
    "LOG_LEVEL": "INFO",
}
# Settings left at their defaults whatever the caller's environment says.
DEFAULTED_SETTINGS = ("BATCH_TIMEOUT", "RESULT_CACHE_DAYS", "BOUNCER_CATCHALL_PATH", "UNKNOWN_RECHECKS",
                      "UNKNOWN_RECHECK_MAX_DELAY", "BOUNCER_DELETE_RESULTS")
PROCESSING_SECONDS = 3
# Longer than BOUNCER_TIMEOUT: a slow answer is a timeout for the client, and the sandbox still
# creates the batch afterwards, as Bouncer would (a batch nobody follows).
SLOW_SECONDS = 4

SUBMIT_SHARE = 0.7          # of the duration, the part during which user batches are submitted
MAX_BACKLOG = 1200          # queued rows above which the submitter waits, so the drain is bounded
CLI_SHARE = 0.2             # of submissions made through `python -m bouncer submit`
USERS = 12
CHECK_EVERY = 1.0
HEALTH_EVERY = 5.0
DRAIN_LIMIT = 180
STARTUP_LIMIT = 30
COMMAND_LIMIT = 60
HTTP_TIMEOUT = 10
# A worker's horse gets 20 s after SIGTERM to finish its cycle (bouncer.runtime.worker.SHUTDOWN_GRACE).
STOP_GRACE = 35   # a horse gets 28 s to end its cycle (bouncer.runtime.worker.SHUTDOWN_GRACE)
KILL_GRACE = 10
KILL_POLL = 0.05            # how often a due kill looks for a creation cycle mid-reservation
# Longer than any creation cycle here (four calls of at most 3 s each, plus database waits):
# within it, a rejected attempt excuses an older row waiting (design.md, invariant 5).
FIFO_SAME_CYCLE = datetime.timedelta(seconds=60)
# The service counts a request when it takes its slot; the sandbox when the request arrives,
# some milliseconds later (more for a create, whose slot precedes the reservation transaction).
# A limiter can only count what it sends, so at the sandbox invariant 4 is judged over windows
# this much shorter than 60 s; the strict 60 s figures are reported beside it.
TRANSIT_TOLERANCE = 0.0
KEPT_EXAMPLES = 1000        # violation messages kept per invariant; beyond, only counted
KEPT_ERRORS = 5             # errors kept word for word (submissions, checks); beyond, only counted

INVARIANTS = {
    1: "no email lost",
    2: "no address twice in flight",
    3: "in flight <= max per type",
    4: "requests in 60 s <= buffer",
    5: "FIFO",
}
SERVICE_NAMES = ("worker", "scheduler", "web")   # whose exit code must be 0
