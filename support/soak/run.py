"""One soak run, start to finish: start the processes, submit and check, drain, stop them,
look one last time, print the table. `soak(options)` is the whole of it."""
import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path

from bouncer.store.database import database, open_database
from support import invariants
from support.ports import free_port, wait_for_port
from support.processes import ROOT, Supervisor
from support.soak.records import Output, Violations
from support.soak.report import database_counts, leaked_secrets, report
from support.soak.settings import (
    CHECK_EVERY, COMMAND_LIMIT, DEFAULTED_SETTINGS, DRAIN_LIMIT, HTTP_TIMEOUT, KILL_GRACE, KILL_POLL,
    PROCESSING_SECONDS, SERVICE_SETTINGS, SLOW_SECONDS, STARTUP_LIMIT, STOP_GRACE, SUBMIT_SHARE,
)
from support.soak.stores import claimed_redis, fresh_database
from support.soak.traffic import Submitter
from support.soak.watching import (
    Checker, HealthSampler, WorkerKiller, ledger_history_peaks, recorded_budget_peak, rows_accounted_for,
)
from support.waiting import WaitFailed


def soak(options):
    """The run; its exit code: 0 only when every invariant held, no secret leaked and every
    process exited cleanly."""
    signal.signal(signal.SIGTERM, stop_on_signal)
    run = Run(options)
    run.out.say("soak run directory: %s (seed %d)" % (run.dir, options.seed))
    # Long enough for the claim to outlive the run, short enough to lapse if the soak is killed.
    claim_seconds = options.duration + DRAIN_LIMIT + 600
    with fresh_database(options.database_url, run.dir, keep=options.keep_database) as database_url, \
            claimed_redis(options.redis_url, claim_seconds) as redis_url:
        run.env = run.environment(database_url, redis_url)
        open_database(database_url)
        run.services = Supervisor(run.dir, run.env)
        try:
            run.start_services()
            run.exercise()
            run.drain()
            run.stop_services()
            run.final_checks()
        finally:
            run.stopping.set()
            run.services.stop_all(grace=KILL_GRACE)
            if not database.is_closed():
                database.close()
    table, passed = report(run, [])
    leaks = leaked_secrets(run, table)
    if leaks:
        table, passed = report(run, leaks)
    run.out.say(table)
    return 0 if passed else 1


def stop_on_signal(signum, frame):
    # The finally blocks stop every process and drop the run's database.
    raise SystemExit(128 + signum)


class Run:
    """The state of one run, which the submitter, the checker, the sampler and the report read."""

    def __init__(self, options):
        self.options = options
        self.dir = Path(options.run_dir or tempfile.mkdtemp(prefix="bouncer-soak-")).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = Output(self.dir / "soak.log")
        self.violations = Violations(self.dir / "violations.log")
        self.api_key = "sk-soak-%s" % secrets.token_hex(12)
        self.callback_secret = secrets.token_hex(24)
        self.sandbox_port, self.web_port = free_port(), free_port()
        self.stopping = threading.Event()
        self.env = self.services = None                  # once the databases exist
        # The threads and watchers of the run, made by exercise().
        self.submitter = self.health = self.checker = self.killer = None
        self.started = time.monotonic()
        self.drained = None
        # Filled by final_checks, read by the report.
        self.max_history, self.tracker_max, self.counts = {}, 0, {}

    def environment(self, database_url, redis_url):
        env = {name: value for name, value in os.environ.items() if name not in DEFAULTED_SETTINGS}
        env.update(SERVICE_SETTINGS)
        env.update({
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "BOUNCER_API_URL": "http://127.0.0.1:%d" % self.sandbox_port,
            "BOUNCER_API_KEY": self.api_key,
            "PUBLIC_URL": "http://127.0.0.1:%d" % self.web_port,
            "CALLBACK_SECRET": self.callback_secret,
            "PORT": str(self.web_port),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",   # a log read after a crash holds the last lines
        })
        return env

    # -- phases --

    def start_services(self):
        options, services = self.options, self.services
        third = "%.4f" % (options.fault_rate / 3)
        sandbox_env = dict(self.env, SANDBOX_API_KEY=self.api_key)
        sandbox = services.start(
            "sandbox", "sandbox", "--port", str(self.sandbox_port),
            "--processing-time", str(PROCESSING_SECONDS), "--fail-rate", third,
            "--rate-limit-rate", third, "--slow-rate", third, "--slow-seconds", str(SLOW_SECONDS),
            "--seed", str(options.seed), "--request-log", str(self.dir / "requests.jsonl"),
            env=sandbox_env)
        self.wait_until_serving(sandbox, self.sandbox_port, "the sandbox")
        self.init_database()
        web = services.start("web", "web", "--port", str(self.web_port))
        self.wait_until_serving(web, self.web_port, "the web process")
        for number in range(1, options.workers + 1):
            services.start("worker-%d" % number, "worker")
        for number in range(1, options.schedulers + 1):
            services.start("scheduler-%d" % number, "scheduler")

    def wait_until_serving(self, process, port, what):
        try:
            wait_for_port(port, process, timeout=STARTUP_LIMIT)
        except WaitFailed as exc:
            raise SystemExit("%s: %s; see %s" % (what, exc, process.log_path)) from None

    def init_database(self):
        done = self.services.run("init-db", log="init-db", timeout=COMMAND_LIMIT)
        if done.returncode != 0:
            raise SystemExit("`init-db` failed (exit %d); see init-db.log" % done.returncode)

    def exercise(self):
        """Submit during the first part of the run, check all along, until the duration ends."""
        duration = self.options.duration
        begin = time.monotonic()
        self.submitter = Submitter(self, begin + duration * SUBMIT_SHARE)
        self.killer = WorkerKiller(self)
        self.health = HealthSampler(self)
        self.checker = Checker(self)
        self.submitter.start()
        self.health.start()
        self.out.say("submitting for %.0f s, checking for %.0f s" % (duration * SUBMIT_SHARE, duration))
        self.check_until(begin + duration)
        self.submitter.join(timeout=COMMAND_LIMIT + 5)

    def drain(self):
        """Faults stay on: the queue must empty through them, within DRAIN_LIMIT."""
        self.out.say("run over; waiting up to %d s for the queue to drain" % DRAIN_LIMIT)
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            self.checker.check()
            if self.note_drained():
                self.out.say("queue empty %.0f s after the last submission" % self.drained)
                return
            time.sleep(CHECK_EVERY)
        self.out.say("!! the queue did not drain in %d s" % DRAIN_LIMIT)

    def note_drained(self):
        """Whether nothing is pending since the submitter stopped; remembers how long after."""
        if self.drained is None and self.submitter.ended is not None and self.checker.pending() == 0:
            self.drained = time.monotonic() - self.submitter.ended
        return self.drained is not None

    def check_until(self, deadline):
        next_report = time.monotonic() + 15
        while time.monotonic() < deadline:
            tick = time.monotonic()
            self.checker.check()
            self.note_drained()
            if tick >= next_report:
                self.report_progress()
                next_report = tick + 15
            self.kill_until(min(tick + CHECK_EVERY, deadline))

    def kill_until(self, until):
        """Sleep until `until`; while a kill is due, look for its moment every KILL_POLL s (a
        reservation is in flight for milliseconds). Kills happen here, on the main thread:
        a process it starts dies with the thread that started it (support.processes)."""
        while time.monotonic() < until:
            self.killer.maybe_kill()
            pause = KILL_POLL if self.killer.is_due() else until - time.monotonic()
            time.sleep(max(0.0, min(pause, until - time.monotonic())))

    def report_progress(self):
        submissions = self.submitter.snapshot()
        self.out.say("%5.0f s: %d user batches, %d rows submitted; %s pending; %d requests seen"
                     % (time.monotonic() - self.started, len(submissions),
                        sum(s.rows for s in submissions), self.checker.pending(),
                        len(self.checker.requests.entries)))

    def stop_services(self):
        """Schedulers first (no new jobs), then workers and web; the sandbox last, so a cycle
        finishing its call still gets an answer."""
        self.stopping.set()
        names = list(self.services.running)
        self.services.stop([n for n in names if n.startswith("scheduler")], grace=STOP_GRACE)
        self.services.stop([n for n in names if n.startswith(("worker", "web"))], grace=STOP_GRACE)
        self.services.stop(["sandbox"], grace=KILL_GRACE)
        self.health.join(timeout=HTTP_TIMEOUT + 1)
        self.killer.redis.close()

    def final_checks(self):
        """One last look once everything stopped: what the live checks saw, plus invariant 1
        and the whole history of the ledger and the request log."""
        self.checker.check()
        submissions = self.submitter.snapshot()
        with database.connection_context():
            for message in invariants.every_email_finished() + rows_accounted_for(submissions):
                self.violations.record(1, message)
            self.max_history = ledger_history_peaks(self.violations)
            self.tracker_max = recorded_budget_peak(self.violations)
            self.counts = database_counts()
