"""The cycle runner: every creation and status cycle goes through `run_cycle`.

Two kinds of cycle, each run for one check type at a time:
- `creation` (creation.py): greedily pack the oldest pending rows into Bouncer batches;
- `status` (status.py): follow the outstanding Bouncer batches, ingest the completed ones.

`run_cycle` holds the (kind, check type) lock, gives the cycle a fresh database connection,
times it and logs what it did. Between its steps a cycle asks `cycle.stop_reason()`: a lock
lost mid-cycle (Redis restarted) or a shutdown request (SIGTERM) ends it there, never in the
middle of a Bouncer call, and the report says why. `run_until_quiet` runs it again as long as a
trigger (triggers.py) asked for it while it ran.
"""
import logging
import threading
import time

from bouncer.cycles import creation, status, triggers
from bouncer.cycles.locks import CycleLock
from bouncer.cycles.reports import REPORTS
from bouncer.logs import ids
from bouncer.names import CREATION, STATUS, job_id
from bouncer.store.database import connection

log = logging.getLogger(__name__)

STEPS = {CREATION: creation.create_batches, STATUS: status.check_batches}
# Set by the worker when the platform asks it to stop (SIGTERM): cycles end at their next step.
SHUTDOWN = threading.Event()


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
            triggers.run_now(self.app.redis, CREATION, self.check_type)

    def called_back(self):
        """Ledger ids Bouncer's callback named since the last time a status cycle asked."""
        return triggers.take_called_back(self.app.redis, self.check_type)

    def run_again(self):
        """Work is left that this cycle stopped short of: have it run again as it ends."""
        if self.lock is not None:
            triggers.ask_to_run_again(self.app.redis, self.kind, self.check_type)


def run_cycle(app, kind, check_type, now=None, refill=False):
    """One cycle of `kind` for `check_type`, unless one is already running anywhere (then a
    logged no-op: `report.skipped`). `refill`: a status cycle queues a creation cycle as soon
    as a batch ends. Returns the report."""
    started = time.monotonic()
    lock = CycleLock(app.redis, kind, check_type)
    cycle = Cycle(app, kind, check_type, lock, refill)
    with connection(), lock as held:
        if not held:
            cycle.report.skipped = True
            log.debug("%s cycle %s skipped: another one holds the lock", kind.capitalize(), check_type,
                      extra=ids(cycle=kind, check_type=check_type))
            return cycle.report
        STEPS[kind](cycle, now)
        if cycle.report.stopped is None:
            cycle.report.stopped = cycle.stop_reason()
    cycle.report.seconds = time.monotonic() - started
    # One line a cycle, at INFO only when it did something: an idle service says nothing.
    log.log(logging.INFO if cycle.report.worth_telling() else logging.DEBUG, "%s cycle %s", kind.capitalize(),
            cycle.report.summary(), extra=ids(cycle=kind, check_type=check_type, job_id=job_id(kind, check_type)))
    return cycle.report


def run_until_quiet(app, kind, check_type, on_report=None):
    """Run the cycle, and again as long as a trigger asked for it while it ran. Status cycles
    refill freed slots at once. `on_report(report)` is called after each run."""
    while True:
        report = run_cycle(app, kind, check_type, refill=kind == STATUS)
        if on_report is not None:
            on_report(report)
        if report.skipped or report.stopped == "shutdown requested" \
                or not triggers.take_run_again(app.redis, kind, check_type):
            return report

