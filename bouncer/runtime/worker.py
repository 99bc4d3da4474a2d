"""The worker process: one RQ worker on `bouncer-queue`, each job run in a forked horse.

The worker imports what the cycles use (and builds the Bouncer client) before its first fork, so
every horse starts with it loaded: otherwise each job paid those imports again (70-80 ms of
`requests`, the cycles' modules and their helpers), in front of the first Bouncer call of a
triggered cycle. Nothing opened is shared: the client holds no connection until a horse calls
Bouncer, and the database stays closed (`close_database`)."""

import contextlib
import gc
import logging
import os
import signal
import time

from redis.exceptions import RedisError
from rq import Queue
from rq.worker import SHUTDOWN_SIGNAL, HerokuWorker

from bouncer.config import MAX_BOUNCER_TIMEOUT, NO_KEY
from bouncer.cycles.runner import SHUTDOWN
from bouncer.names import CYCLE_QUEUE, WEBHOOK_QUEUE
from bouncer.store.database import database

log = logging.getLogger(__name__)


# How often this worker cleans the queue's registries: a job left "started" by a worker killed
# with -9 is failed (AbandonedJobError) at the first pass after its heartbeat lapses, 90 s after
# the last one (rq's default pass interval is 600 s). Nothing is re-run: the next cycle is.
MAINTENANCE_INTERVAL = 60
# Heroku and Render send SIGTERM, then SIGKILL 30 s later. The horse ignores SIGTERM; told by the
# worker, its cycle stops at its next step, so a Bouncer call in flight (at most
# MAX_BOUNCER_TIMEOUT) finishes and its answer is stored. Only a cycle still running after this
# many seconds is cut by ShutDownImminentException; the rest of the 30 s is the worker's own
# bookkeeping.
SHUTDOWN_GRACE = MAX_BOUNCER_TIMEOUT + 3
# Seconds between attempts to reach Redis again after losing it in the middle of a job.
REDIS_RETRY_INTERVAL = 2
# The signals that stop a worker or its horse. A horse inherits the worker's handlers and
# process group until its first steps replace them (rq's horse leaves the group, then sets its
# own handlers): these are held back from it until then.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGRTMIN})


class BouncerWorker(HerokuWorker):
    imminent_shutdown_delay = SHUTDOWN_GRACE
    # rq would log "result will never expire, clean up result key manually" after every run:
    # with stable ids and result_ttl -1 that is by design (see bouncer.schedule.RESULT_TTL).
    log_result_lifespan = False
    stop_signal = None

    def request_stop(self, signum, frame):
        # Remembered so a stop nobody asked for (rq quits its loop on a Redis timeout or an
        # unexpected error, returning normally) can exit non-zero.
        if self.stop_signal is None:
            self.stop_signal = signum
        # rq stops an idle worker by raising StopRequested out of this handler, and the code the
        # signal interrupted may swallow it: logging does, when the signal lands while a line is
        # written (a worker then ran on until it was killed). So the stop is also kept where rq's
        # loop looks before taking each job, and a horse forked after it starts with its cycle
        # told to stop: the job taken meanwhile ends at its first step.
        self._stop_requested = True
        SHUTDOWN.set()
        super().request_stop(signum, frame)

    def request_stop_sigrtmin(self, signum, frame):
        # In the horse: the worker was asked to stop. The cycle ends between two steps, long
        # before the cut rq arms here (rq also warns of it: a clean stop is no warning).
        SHUTDOWN.set()
        log.debug("Worker %s: stop requested; the job ends at its next step (cut after %ds)", self.name,
                  self.imminent_shutdown_delay)
        signal.signal(signal.SIGRTMIN, self.request_force_stop_sigrtmin)
        signal.signal(signal.SIGALRM, self.request_force_stop_sigrtmin)
        signal.alarm(self.imminent_shutdown_delay)

    def handle_warm_shutdown_request(self):
        # Between two jobs (nearly always) there is no horse to tell: a clean stop, not the
        # warning rq gives it.
        if self.horse_pid == 0:
            log.debug("Worker %s: stop requested between jobs", self.name)
            return
        super().handle_warm_shutdown_request()

    def fork_work_horse(self, job, queue):
        close_database()
        # Held back across the fork: a stop arriving then waits in the horse until its own
        # handlers are in place (setup_work_horse_signals), instead of killing it (SIGRTMIN's
        # default) or running the worker's handler in it. The worker takes its own at once.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().fork_work_horse(job, queue)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def kill_horse(self, sig=SHUTDOWN_SIGNAL):
        # rq signals the horse's process group. A horse forked a moment ago may not have left
        # the worker's group yet: that group's signal would reach the worker too (which dies of
        # SIGRTMIN), and whatever else shares it. The horse alone is signalled then.
        if not self.horse_pid:
            return      # no horse (pid 0 would name this process's own group)
        try:
            shares_our_group = os.getpgid(self.horse_pid) == os.getpgrp()
        except ProcessLookupError:
            return      # it ended already
        if not shares_our_group:
            super().kill_horse(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.horse_pid, sig)
            log.debug("Worker %s: %s sent to horse %d alone (it had not left the worker's process group yet)",
                      self.name, signal.Signals(sig).name, self.horse_pid)


def close_database():
    """A connection must never be shared by the worker and its horse across fork (two processes
    on one socket, or one SQLite handle). Peewee opens lazily and the worker itself never queries,
    so this is normally a no-op; the horse opens its own connection."""
    if database.obj is not None and not database.is_closed():
        log.warning("Worker: closing a database connection opened before fork")
        database.close()


def preload(app):
    """Load, once in the worker, what every horse would otherwise import at each job, and set it
    aside from the garbage collector (as every command does, `bouncer.cli`): a horse's collector
    never walks it, and never writes to the pages it shares with the worker."""
    import email_validator  # noqa: F401 (admission's syntax check)

    app.client  # noqa: B018 (a requests.Session, no connection yet)
    gc.freeze()


def run_worker(app):
    if app.settings.keyless_for_bouncer:
        log.warning(NO_KEY)
    preload(app)
    close_database()
    while True:
        # The cycles' queue first: a webhook delivery never waits in front of a cycle.
        queues = [Queue(name, connection=app.redis) for name in (CYCLE_QUEUE, WEBHOOK_QUEUE)]
        worker = BouncerWorker(queues, connection=app.redis,
                               maintenance_interval=MAINTENANCE_INTERVAL)
        log.info("Worker %s: listening on %s (pid %d)", worker.name, ", ".join(q.name for q in queues), os.getpid())
        try:
            # No logging_level: rq then leaves logging to the handlers bouncer.logs installed.
            worker.work(with_scheduler=False)
            break
        except RedisError as exc:
            # rq reconnects by itself only while it waits for a job: Redis lost during a job ends
            # its loop, and its last bookkeeping raises here. The interrupted cycle is the next
            # cycle's work; this process carries on with a fresh rq worker once Redis answers.
            if worker.stop_signal is not None:
                break
            log.error("Worker %s: lost Redis (%s); starting again once it answers", worker.name, exc)
            stop_listening(worker)
            let_horse_finish(worker)
            wait_for_redis(app.redis, worker)
            if worker.stop_signal is not None:
                break
    if worker.stop_signal is None:
        log.error("Worker %s: stopped without a stop request (see above); exiting with code 1",
                  worker.name)
        raise SystemExit(1)
    log.info("Worker %s: stopped on %s", worker.name, signal.Signals(worker.stop_signal).name)


def stop_listening(worker):
    """rq's teardown stopped before the thread listening for commands (`rq` CLI); it would retry
    forever beside the next worker's. It stops at its next round."""
    if worker.pubsub_thread is not None:
        worker.pubsub_thread.stop()


def let_horse_finish(worker):
    """The horse of the lost job may still be storing its work; with the cycle lock gone along
    with Redis, a new cycle must not start beside it."""
    if worker.horse_pid:
        try:
            os.waitpid(worker.horse_pid, 0)
        except ChildProcessError:
            pass


def wait_for_redis(redis, worker):
    """Until Redis answers, or a stop is requested (the worker then exits as on any stop)."""
    def note_stop(signum, frame):
        worker.stop_signal = signum
    signal.signal(signal.SIGTERM, note_stop)
    signal.signal(signal.SIGINT, note_stop)
    while worker.stop_signal is None:
        try:
            redis.ping()
            return
        except RedisError:
            time.sleep(REDIS_RETRY_INTERVAL)

