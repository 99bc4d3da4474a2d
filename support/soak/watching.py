"""What looks at the system while the soak runs: the checker of invariants 2 to 5 (with the
sandbox's request log it reads), the /health sampler, the worker killer; and the last look,
once everything stopped (invariant 1, and 3 and 4 over the whole run)."""
import collections
import datetime
import json
import random
import threading
import time
import urllib.error
import urllib.request

import redis as redis_lib
from peewee import fn
from rq import Worker

from bouncer.states import IN_FLIGHT_STATES, RowState
from bouncer.store.database import database
from bouncer.store.models import BouncerBatch, RateLimitTracker, UserBatch, UserBatchEmail
from support import invariants
from support.soak.records import Errors, iso
from support.soak.settings import (
    CHECK_TYPES, FIFO_SAME_CYCLE, HEALTH_EVERY, HTTP_TIMEOUT, MAX_OUTSTANDING, RATE_LIMIT_BUFFER, STOP_GRACE,
)


class Checker:
    """The invariants checked while the system runs, about once a second."""

    def __init__(self, soak):
        self.soak = soak
        self.requests = RequestLog(soak.dir / "requests.jsonl")
        self.fifo_checked = set()
        self.max_sampled = dict.fromkeys(CHECK_TYPES, 0)
        self.errors = Errors()
        self.crashes = {}

    def check(self):
        for check in (self.check_in_flight, self.check_fifo, self.check_request_budget):
            try:
                with database.connection_context():
                    check()
            except Exception as exc:  # a busy database must not end the run; reported at the end
                self.errors.add(check.__name__, exc)
        self.check_processes()

    def pending(self):
        """Rows still queued or sent; None when the database did not answer."""
        try:
            return pending_rows()
        except Exception as exc:
            self.errors.add("pending", exc)
            return None

    def check_in_flight(self):
        record = self.soak.violations.record
        for message in invariants.no_address_in_two_in_flight_batches():
            record(2, message)
        for message in invariants.at_most_max_outstanding(MAX_OUTSTANDING):
            record(3, message)
        counts = dict(BouncerBatch.select(BouncerBatch.check_type, fn.COUNT(BouncerBatch.id))
                      .where(BouncerBatch.status.in_(IN_FLIGHT_STATES))
                      .group_by(BouncerBatch.check_type).tuples())
        for check_type in CHECK_TYPES:
            self.max_sampled[check_type] = max(self.max_sampled[check_type], counts.get(check_type, 0))

    def check_fifo(self):
        """Each Bouncer batch once, as soon as its id is stored: the check needs nothing that
        happens later (see invariants.fifo_violations_of_sent_batch)."""
        visible_at = {s.batch_id: s.visible_at for s in self.soak.submitter.snapshot()}
        stored = (BouncerBatch.select(BouncerBatch.id)
                  .where(BouncerBatch.bouncer_id.is_null(False)).order_by(BouncerBatch.id))
        for (ledger_id,) in stored.tuples():
            if ledger_id in self.fifo_checked:
                continue
            for message in invariants.fifo_violations_of_sent_batch(ledger_id, visible_at, FIFO_SAME_CYCLE):
                self.soak.violations.record(5, message)
            self.fifo_checked.add(ledger_id)

    def check_request_budget(self):
        self.requests.read_new()
        window = 60.0 - self.soak.options.transit_tolerance
        for moment in invariants.requests_over_budget(self.requests.times(), RATE_LIMIT_BUFFER, window):
            self.soak.violations.record(
                4, "a request arrived at the sandbox at %s with %d or more in the %g s before it"
                % (iso(moment), RATE_LIMIT_BUFFER, window), when=moment)

    def check_processes(self):
        for name, code in self.soak.services.exited().items():
            if name not in self.crashes:
                self.crashes[name] = code
                self.soak.out.say("!! %s exited by itself with code %s at %s; see %s.log"
                                  % (name, code, iso(time.time()), name))


def pending_rows():
    with database.connection_context():
        return UserBatchEmail.select().where(UserBatchEmail.status.in_((RowState.NEW, RowState.QUEUED))).count()


class RequestLog:
    """The sandbox's request log, read as it grows. A slow answer is logged when it is sent, with
    the time it arrived, so lines are not in time order: every check sorts the times."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.entries = []

    def read_new(self):
        if not self.path.exists():
            return
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next read
        self.entries += [json.loads(line) for line in lines if line.strip()]

    def times(self):
        return [entry["time"] for entry in self.entries]


class HealthSampler(threading.Thread):
    """GET /health every few seconds; each answer is kept in health.jsonl, checked for secrets
    at the end."""

    def __init__(self, soak):
        super().__init__(name="health", daemon=True)
        self.soak = soak
        self.url = "http://127.0.0.1:%d/health" % soak.web_port
        self.statuses = collections.Counter()

    def run(self):
        while not self.soak.stopping.wait(HEALTH_EVERY):
            self.sample()

    def sample(self):
        status, body = None, ""
        try:
            with urllib.request.urlopen(self.url, timeout=HTTP_TIMEOUT) as answer:
                status, body = answer.status, answer.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode("utf-8", "replace")
        except OSError as exc:
            body = "no answer: %s" % exc
        self.statuses[status or "no answer"] += 1
        with open(self.soak.dir / "health.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.time(), "status": status, "body": body}) + "\n")


class WorkerKiller:
    """About every `every` seconds a worker is stopped, by turns with SIGTERM (as a deploy
    does; it must exit 0 once its cycle has ended between two steps) and SIGKILL, and a new one
    takes its place.
    Cycles take milliseconds, so a worker picked at random is nearly always idle: the victim is
    the one running a creation cycle while a reservation is in flight (the window invariant 6
    is about), if that moment comes within half an interval; otherwise any worker."""

    def __init__(self, soak):
        self.soak = soak
        self.every = soak.options.kill_every
        self.rng = random.Random(soak.options.seed + 1)
        self.due = time.monotonic() + self.every
        self.redis = redis_lib.Redis.from_url(soak.env["REDIS_URL"], socket_connect_timeout=5)
        self.kills = []            # (signal, when) of each stop
        self.term_exits = []       # the exit code of each worker stopped with SIGTERM

    def is_due(self):
        return bool(self.every) and time.monotonic() >= self.due

    def maybe_kill(self):
        now = time.monotonic()
        if not self.is_due():
            return
        name, moment = self.worker_mid_reservation(), "mid-reservation"
        if name is None:
            if now < self.due + self.every / 2:
                return
            name, moment = self.rng.choice(self.worker_names()), "at random"
        self.due = now + self.every
        if len(self.kills) % 2 == 0:
            code = self.soak.services.stop_and_restart(name, grace=STOP_GRACE)
            self.term_exits.append(code)
            signal_name = "SIGTERM"
        else:
            self.soak.services.restart(name)
            signal_name = "SIGKILL"
        self.kills.append((signal_name, moment))
        self.soak.out.say("stopped %s (%s) with %s at %s and started it again"
                          % (name, moment, signal_name, iso(time.time())))

    def worker_names(self):
        return sorted(n for n in self.soak.services.running if n.startswith("worker"))

    def worker_mid_reservation(self):
        """The worker whose horse runs a creation cycle while a reservation is in flight."""
        with database.connection_context():
            reserving = {t for (t,) in BouncerBatch.select(BouncerBatch.check_type)
                         .where(BouncerBatch.status == "reserved").tuples()}
        jobs = tuple("batch_creator_%s" % check_type for check_type in reserving)
        if not jobs:
            return None
        by_pid = {self.soak.services.running[n].pid: n for n in self.worker_names()}
        for worker in Worker.all(connection=self.redis):
            # The scheduled job, or the one a trigger queued (`..._now`).
            if (worker.get_current_job_id() or "").startswith(jobs) and worker.pid in by_pid:
                return by_pid[worker.pid]
        return None


# -- the last look, once everything stopped --

def rows_accounted_for(submissions):
    """Invariant 1's other half: every row submitted is stored, counted and kept."""
    problems = []
    stored = UserBatchEmail.select().count()
    if stored != sum(s.rows for s in submissions):
        problems.append("%d rows stored, %d submitted" % (stored, sum(s.rows for s in submissions)))
    totals = dict(UserBatch.select(UserBatch.id, UserBatch.total).tuples())
    for s in submissions:
        if not totals.get(s.batch_id) == s.accepted + s.invalid == s.rows:
            problems.append("user batch %s: %d rows submitted, %d counted (accepted + invalid), "
                            "%s stored" % (s.batch_id, s.rows, s.accepted + s.invalid,
                                           totals.get(s.batch_id)))
    return problems


def ledger_history_peaks(violations):
    """Invariant 3 over the ledger's whole history: {check type: most batches ever in flight}."""
    peaks = {t: invariants.max_in_flight_from_ledger(t) for t in CHECK_TYPES}
    for check_type, highest in peaks.items():
        if highest > MAX_OUTSTANDING:
            violations.record(3, "%d %s batches in flight at once (ledger history)" % (highest, check_type))
    return peaks


def recorded_budget_peak(violations):
    """Invariant 4 as the service counts, strictly: the slots its processes took together
    (rate_limit_tracker keeps an hour, longer than any soak run). The most in any 60 s."""
    slots = [stamp.replace(tzinfo=datetime.timezone.utc).timestamp() for (stamp,) in
             RateLimitTracker.select(RateLimitTracker.requested_at).tuples()]
    for moment in invariants.requests_over_budget(slots, RATE_LIMIT_BUFFER):
        violations.record(4, "the service took a request slot at %s with %d or more "
                             "taken in the 60 s before it" % (iso(moment), RATE_LIMIT_BUFFER))
    return invariants.max_requests_in_window(slots)[0]
