"""Infrastructure faults against real servers: Redis flushed and restarted under a running worker
and scheduler, PostgreSQL restarted in the middle of a cycle or stopped under the CLI, and an
SQLite database that is read-only or on a full disk.

Each test starts its own throwaway server on a free port (never the shared test Redis or
PostgreSQL, which other tests use at the same time) and takes it down again in `finally`.
"""
import contextlib
import datetime
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib
from rq.job import Job, JobStatus
from conftest import API_KEY, REDIS_URL, addresses, make_settings, statuses, submit
from peewee import OperationalError
from rq_scheduler import Scheduler

from bouncer.app import App, set_current_app
from bouncer.cycles.runner import run_cycle
from bouncer.cycles.triggers import run_now
from bouncer.doors.admission import DEAD_LOADER_AFTER, remove_dead_loads
from bouncer.names import CREATION, NOW_SUFFIX, STATUS, job_id
from bouncer.queue import progress
from bouncer.sandbox import Sandbox
from bouncer.states import SENT, BouncerBatchState
from bouncer.store.database import connection, database, open_database, utcnow
from bouncer.store.migrations import create_schema
from bouncer.store.models import BouncerBatch, DeliverableResult, UserBatch
from support.processes import Supervisor, descendants, run_bouncer, service_env
from support.servers import PostgresCluster, RedisServer, Unavailable
from support.waiting import wait_until

JOB_IDS = ["batch_creator_catchall", "batch_creator_deliverable", "retention_pruner",
           "status_checker_catchall", "status_checker_deliverable", "webhook_sender"]
WAIT = 60                 # seconds: the longest any single wait in this file may take
REDIS_OUTAGE = 4          # seconds Redis stays down: several scheduler rounds and worker polls
SLOW_CALL = 2             # seconds a Bouncer call takes: the job it is part of ends while Redis
                          # is down, so the worker meets the outage with a job on its hands
DB_PASSWORD = "pw-7f3c9e1d-never-shown"
IS_ROOT = os.geteuid() == 0


# -- small tools --

def require_program(name):
    found = shutil.which(name)
    if not found:
        pytest.skip("%s is not installed (scripts/test installs it)" % name)
    return found


def run_cli(env, *args, as_unprivileged=False, stdin=None):
    prefix = obeying_file_modes() if as_unprivileged else ()
    return run_bouncer(*args, env=env, stdin=stdin, prefix=prefix, timeout=WAIT)


def one_line_failure(result):
    """The stderr of a command that must fail the way the CLI promises: exit 1, one line, no
    traceback. Returns that line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def cli_env(database_url, redis_url=REDIS_URL, api_url="http://127.0.0.1:9"):
    return service_env(database_url, redis_url, api_url, API_KEY)


@contextlib.contextmanager
def skipped_when_unavailable():
    """A server this machine cannot run skips the test, saying what is missing."""
    try:
        yield
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def bound_database():
    """Tests here bind the models to databases of their own; the next test gets back whatever
    was bound before."""
    original = database.obj
    yield
    with contextlib.suppress(Exception):
        if not database.is_closed():
            database.close()
    set_current_app(None)
    database.initialize(original)


# == 1. Redis flushed, then restarted empty, under a running worker and scheduler =============

class Service(Supervisor):
    """The Procfile's worker and scheduler for real, on an SQLite file, a Redis of their own and
    the sandbox; output in files, printed when a test fails, every process killed at the end."""

    def __init__(self, directory, redis_server, api_url):
        self.db_path = Path(directory) / "bouncer.db"
        self.redis = redis_server
        super().__init__(directory, cli_env("sqlite:///%s" % self.db_path, redis_server.url, api_url))

    def run_ok(self, *args, stdin=None):
        done = self.run(*args, stdin=stdin, timeout=WAIT)
        assert done.returncode == 0, "%s failed: %s" % (args, done.stderr)
        return done.stdout

    def submit(self, name):
        emails = "%s-one@example.com\n%s-two@example.com\n" % (name, name)
        answer = self.run_ok("submit", "-", "--user", name, "--check-type", "deliverable", "--json",
                             stdin=emails)
        return json.loads(answer)["batch_id"]

    def batch_status(self, batch_id):
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as conn:
            row = conn.execute("SELECT status FROM user_batches WHERE id = ?",
                               (batch_id,)).fetchone()
        return row[0] if row else None

    def scheduled_ids(self):
        """Every id rq-scheduler has scheduled, sorted (None while Redis does not answer)."""
        try:
            ids = self.redis.client.zrange(Scheduler.scheduled_jobs_key, 0, -1)
        except redis_lib.RedisError:
            return None
        return sorted(k.decode() for k in ids)

    def wait_until_completed(self, batch_id, what):
        wait_until(lambda: self.batch_status(batch_id) == "completed",
                   "user batch %s (%s) to complete" % (batch_id, what), WAIT)

    def wait_until_jobs_registered(self, what):
        wait_until(lambda: self.scheduled_ids() == JOB_IDS or self.any_exited(),
                   "the scheduler to register the six jobs %s" % what, WAIT)
        self.assert_all_running()
        self.assert_jobs_registered()

    def assert_jobs_registered(self):
        """The six ids are scheduled, and never any other. Read until all six are there: while
        rq-scheduler moves a due job into the queue, it takes the id out of its schedule and then
        puts it back for its next run, a moment when only five are."""
        seen = []

        def all_six():
            seen.append(self.scheduled_ids())
            return seen[-1] == JOB_IDS

        wait_until(all_six, "the six jobs scheduled", WAIT)
        assert all(set(ids or ()) <= set(JOB_IDS) for ids in seen), seen

    def assert_all_running(self):
        exited = self.exited()
        assert not exited, "\n".join("%s exited with code %s:\n%s" % (name, code, self.running[name].log_tail(3000))
                                      for name, code in exited.items())


@contextlib.contextmanager
def running_service(tmp_path, sandbox, **settings):
    """A worker and a scheduler on a Redis of their own and `sandbox`, one batch already
    completed (`settings`: more environment, by name). Everything started is stopped at the
    end, the processes first."""
    with skipped_when_unavailable():
        redis_server = RedisServer(tmp_path / "redis")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(redis_server.stop)
        redis_server.start()
        cleanup.callback(sandbox.stop)
        sandbox.start()
        service = Service(tmp_path, redis_server, sandbox.url)
        service.env.update(settings)
        cleanup.callback(service.kill_all)
        with service.logs_on_failure():
            service.run_ok("init-db")
            service.start("worker", "worker")
            service.start("scheduler", "scheduler")
            service.wait_until_completed(service.submit("before"), "before any fault")
            service.assert_jobs_registered()
            yield service


def signal_on_request(sandbox, method):
    """An Event set as soon as the sandbox starts answering a `method` request (before any slow
    fault makes it wait): the moment a job is known to be in the middle of a Bouncer call. The
    sandbox records a request only once answered, hence the hook on its answering step."""
    started = threading.Event()
    answer = sandbox.answer

    def answer_and_signal(request_method, *args, **kwargs):
        if request_method == method:
            started.set()
        return answer(request_method, *args, **kwargs)

    sandbox.answer = answer_and_signal
    return started


@pytest.mark.slow
def test_scheduler_registers_the_jobs_again_after_redis_is_flushed(tmp_path):
    with running_service(tmp_path, Sandbox(port=0, processing_time=0.5)) as service:
        service.redis.client.flushall()

        service.wait_until_jobs_registered("again after FLUSHALL")
        service.wait_until_completed(service.submit("after-flush"), "after FLUSHALL")
        # Exactly the six stable ids: registering again never adds a second copy.
        service.assert_jobs_registered()
        service.assert_all_running()


@pytest.mark.slow
def test_worker_and_scheduler_ride_out_a_redis_restart(tmp_path):
    """Redis holds the schedule and the locks, never the work: losing it for a few seconds must
    cost a few cycles, not the processes.

    Decided: both processes stay up and carry on once Redis answers again (empty), the scheduler
    registers the six jobs again, and a SIGTERM still stops them cleanly while Redis is away.
    Exiting non-zero for the platform to restart would also recover, but Heroku restarts a dyno
    that crashes again only after a cool-off of up to 20 minutes, with nothing scheduled
    meanwhile. rq's worker reconnects by itself (backoff 1 s doubling to 60 s) only while it
    waits for a job; here Redis goes away while a job runs (a Bouncer call made slow on purpose)
    and comes back after it ended, the case where rq quits its loop."""
    sandbox = Sandbox(port=0, processing_time=0.5, slow_seconds=SLOW_CALL)
    with running_service(tmp_path, sandbox) as service:
        creating = signal_on_request(sandbox, "POST")
        sandbox.slow_rate = 1.0
        in_flight = service.submit("in-flight")
        assert creating.wait(WAIT), "no creation cycle called Bouncer"

        service.redis.crash()
        time.sleep(REDIS_OUTAGE)
        sandbox.slow_rate = 0.0
        service.redis.start()

        service.wait_until_jobs_registered("again after a Redis restart")
        service.assert_all_running()
        # The batch whose creation was under way is followed to the end, and new work flows.
        service.wait_until_completed(in_flight, "created while Redis went away")
        service.wait_until_completed(service.submit("after-restart"), "after a Redis restart")
        service.assert_jobs_registered()
        service.assert_all_running()

        # A process that waits for Redis must still stop when the platform asks it to.
        service.redis.crash()
        time.sleep(1)
        for name, code in service.stop(list(service.running), grace=15).items():
            assert code == 0, service.running[name].log_tail(3000)


def ledger_rows(service):
    with contextlib.closing(sqlite3.connect(service.db_path, timeout=10)) as conn:
        return conn.execute("SELECT id, status, bouncer_id FROM bouncer_batches ORDER BY id").fetchall()


@pytest.mark.slow
def test_sigterm_never_cuts_a_bouncer_call_in_flight(tmp_path):
    """A deploy sends SIGTERM to every process of the dyno, then SIGKILL 30 s later. A worker
    told to stop while a create is in flight lets the call finish and stores Bouncer's batch id
    (no orphan), starts no further step of its cycle, and exits 0 well inside the 30 s."""
    sandbox = Sandbox(port=0, processing_time=1, slow_seconds=4)
    with running_service(tmp_path, sandbox, BOUNCER_BATCH_SIZE="10") as service:
        before = len(ledger_rows(service))
        creating = signal_on_request(sandbox, "POST")
        sandbox.slow_rate = 1.0
        batch = json.loads(service.run_ok("submit", "-", "--user", "deploy", "--check-type", "deliverable",
                                          "--json", stdin="".join("d%d@example.com\n" % i for i in range(30))))
        assert creating.wait(WAIT), "no creation cycle called Bouncer"
        started = time.monotonic()
        worker = service.running["worker"]
        os.killpg(worker.pid, signal.SIGTERM)        # as the platform does: every process, horse too
        code = worker.wait(timeout=30)
        stopped_after = time.monotonic() - started
        assert code == 0, service.running["worker"].log_tail()
        assert 2 < stopped_after < 25          # the 4 s call finished first
        rows = ledger_rows(service)[before:]
        # The call in flight was answered and stored; the cycle took no next slot after SIGTERM.
        assert [(status, bool(bouncer_id)) for _, status, bouncer_id in rows] == [("outstanding", True)]
        assert "shutdown requested" in service.running["worker"].log()
        sandbox.slow_rate = 0.0
        service.start("worker", "worker")
        service.wait_until_completed(batch["batch_id"], "after the worker came back")
        assert sandbox.stats()["batches_created"] == before + 3   # 30 addresses in batches of 10


# A worker whose horses stay in its process group for `seconds` after each fork: rq's horse
# leaves the group as its first step, here held back so that a stop lands while it has not.
SLOW_TO_LEAVE_THE_GROUP = (
    "import os, runpy, sys, time\n"
    "leave = os.setpgrp\n"
    "os.setpgrp = lambda: (time.sleep(%s), leave())[1]\n"
    "sys.argv = ['bouncer', 'worker']\n"
    "runpy.run_module('bouncer', run_name='__main__')\n")


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_stop_just_after_a_fork_reaches_the_new_horse_alone(database_url, redis_conn, db, tmp_path):
    """A worker told to stop signals its horse's process group. A horse forked a moment before
    may still share the worker's group: the stop must reach the horse alone (the worker, sent
    SIGRTMIN too, died of it), and the horse must take it once its own handlers are in place
    (SIGRTMIN's default would kill it, the worker's own handler would run in it): its cycle ends
    at its first step and the worker exits 0."""
    processes = Supervisor(tmp_path, service_env(database_url, REDIS_URL, "http://127.0.0.1:9", API_KEY))
    worker = processes.launch("worker", [sys.executable, "-c", SLOW_TO_LEAVE_THE_GROUP % 2])
    try:
        with processes.logs_on_failure():
            wait_until(lambda: "listening on" in worker.log(), "the worker listening", 30)
            assert run_now(redis_conn, CREATION, "deliverable")
            horses = wait_until(lambda: descendants(worker.pid), "a horse forked", 10)
            assert os.getpgid(horses[0]) == os.getpgid(worker.pid)     # still in the worker's group
            os.kill(worker.pid, signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
            job = Job.fetch(job_id(CREATION, "deliverable") + NOW_SUFFIX, connection=redis_conn)
            assert job.get_status() == JobStatus.FINISHED
    finally:
        processes.stop_all()


# == 2. PostgreSQL restarted mid-cycle, or stopped under the CLI ==============================

@contextlib.contextmanager
def postgres_cluster():
    with skipped_when_unavailable():
        cluster = PostgresCluster()
    try:
        yield cluster.start()
    finally:
        cluster.destroy()


def after_restarting(cluster, step):
    """`step`, run once the server has restarted under the caller's open transaction."""
    def restart_then_step(*args, **kwargs):
        cluster.restart()
        return step(*args, **kwargs)
    return restart_then_step


def ledger_state(batch_id):
    """What a half-written ingest would show: the ledger row, stored verdicts, row states."""
    return {
        "ledger": [b.status for b in BouncerBatch.select()],
        "verdicts": DeliverableResult.select().count(),
        "rows": statuses(batch_id),
        "user_batch": UserBatch.get_by_id(batch_id).status,
    }


@pytest.mark.slow
def test_postgres_restart_fails_one_cycle_cleanly_and_the_next_recovers(
        bound_database, redis_conn, sandbox, monkeypatch):
    with postgres_cluster() as cluster:
        url = cluster.create_database("bouncer_faults", DB_PASSWORD)
        open_database(url)
        create_schema()
        app = App(make_settings(url, api_url=sandbox.url), redis=redis_conn)
        set_current_app(app)
        with connection():
            batch_id = submit("alice", addresses("alice", 5))
        assert len(run_cycle(app, CREATION, "deliverable").created) == 1

        # A connection opened before a restart is dead; a cycle must not pick it up.
        database.connect(reuse_if_open=True)
        database.execute_sql("SELECT 1")
        cluster.restart()
        assert run_cycle(app, STATUS, "deliverable").waiting == 1

        # The server restarts inside the ingest transaction, after the verdicts were written.
        sandbox.complete_now()
        monkeypatch.setattr(progress, "complete_sent_rows",
                            after_restarting(cluster, progress.complete_sent_rows))
        started = time.monotonic()
        with pytest.raises(OperationalError, match="terminat|closed the connection"):
            run_cycle(app, STATUS, "deliverable")
        assert time.monotonic() - started < 30
        monkeypatch.undo()

        with connection():
            assert ledger_state(batch_id) == {"ledger": [BouncerBatchState.OUTSTANDING], "verdicts": 0,
                                              "rows": {SENT: 5}, "user_batch": "processing"}
        # Same process, next cycle: a fresh connection, and the batch is ingested whole.
        report = run_cycle(app, STATUS, "deliverable")
        assert [r.verified for r in report.ingested] == [5]
        with connection():
            assert ledger_state(batch_id) == {"ledger": [BouncerBatchState.COMPLETED], "verdicts": 5,
                                              "rows": {"done": 5}, "user_batch": "completed"}


@pytest.mark.slow
def test_cli_against_a_stopped_postgres_fails_in_one_line_without_the_password():
    with postgres_cluster() as cluster:
        env = cli_env(cluster.create_database("bouncer_cli", DB_PASSWORD))
        assert run_cli(env, "init-db").returncode == 0
        assert run_cli(env, "status").returncode == 0
        cluster.stop()

        result = run_cli(env, "status")

    line = one_line_failure(result)
    assert "port %d" % cluster.port in line and "refused" in line, line
    assert DB_PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
def test_postgres_that_never_answers_fails_after_connect_timeout(bound_database):
    # Accepts TCP connections (the kernel does it) and never says a word, like a hung host.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        base = "postgresql://postgres:%s@127.0.0.1:%d/bouncer" % (DB_PASSWORD, port)

        started = time.monotonic()
        result = run_cli(cli_env(base + "?connect_timeout=2"), "status")
        elapsed = time.monotonic() - started

    line = one_line_failure(result)
    assert "timeout" in line, line
    assert elapsed < 20
    assert DB_PASSWORD not in result.stdout + result.stderr
    # Without one in the URL, a bounded default; one given in the URL is kept.
    assert open_database(base).connect_params["connect_timeout"] == 10
    assert open_database(base + "?connect_timeout=2").connect_params["connect_timeout"] == 2


# == 3. SQLite read-only, or on a full disk ===================================================

def obeying_file_modes():
    """What a command is run under so that it obeys file modes. Root ignores them; without
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH it obeys them like anyone, while its own files (the
    interpreter under /root) stay readable."""
    if not IS_ROOT:
        return ()
    require_program("setpriv")
    dropped = "-dac_override,-dac_read_search"
    return ("setpriv", "--bounding-set=" + dropped, "--inh-caps=" + dropped, "--")


@pytest.fixture
def scratch_dir():
    """A directory outside pytest's private tmp tree, removed whatever modes a test left."""
    path = Path(tempfile.mkdtemp(prefix="bouncer-faults-", dir="/tmp"))
    yield path
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def table_counts(db_path):
    tables = ("user_batches", "user_batch_emails", "emails_global", "bouncer_batches",
              "rate_limit_tracker")
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        return {t: conn.execute('SELECT count(*) FROM "%s"' % t).fetchone()[0] for t in tables}


def visible_counts(db_path):
    """Rows a host or the queue can see: of user batches that are not loading."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        return conn.execute("SELECT (SELECT count(*) FROM user_batches WHERE status != 'loading'),"
                            " (SELECT count(*) FROM user_batch_results r JOIN user_batches b"
                            "  ON b.id = r.batch_id WHERE b.status != 'loading')").fetchone()


def integrity(db_path):
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def write_addresses(path, count, prefix="person"):
    path.write_text("".join("%s%d@example-%d.com\n" % (prefix, i, i % 97) for i in range(count)))
    return path


def submit_args(path, user="alice"):
    return ("submit", path, "--user", user, "--check-type", "deliverable")


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_read_only(db_path, directory_too):
    for path in glob.glob("%s*" % db_path):      # the database, and any -wal and -shm
        os.chmod(path, 0o444)
    if directory_too:
        os.chmod(db_path.parent, 0o555)          # no -wal or -shm can be created either


@pytest.mark.slow
@pytest.mark.parametrize("directory_too", [False, True], ids=["file", "file-and-directory"])
def test_read_only_sqlite_database_fails_cleanly_and_writes_nothing(
        scratch_dir, directory_too, redis_conn, sandbox):
    db_path = scratch_dir / "bouncer.db"
    env = cli_env("sqlite:///%s" % db_path, REDIS_URL, sandbox.url)
    addresses_file = write_addresses(scratch_dir / "leads.txt", 3)
    assert run_cli(env, "init-db").returncode == 0
    assert run_cli(env, *submit_args(addresses_file)).returncode == 0
    before = table_counts(db_path)
    make_read_only(db_path, directory_too)
    digest = file_digest(db_path)

    submitted = run_cli(env, *submit_args(addresses_file, "bob"), as_unprivileged=True)
    created = run_cli(env, "create-batches", "--check-type", "deliverable", as_unprivileged=True)

    for result in (submitted, created):
        assert "readonly database" in one_line_failure(result)
    assert file_digest(db_path) == digest
    assert table_counts(db_path) == before
    # Nothing reached Bouncer either: a batch it accepted could not have been recorded.
    assert sandbox.stats()["requests"] == 0


@pytest.fixture
def tiny_disk(scratch_dir):
    """A 1 MiB tmpfs, unmounted at the end."""
    disk = scratch_dir / "disk"
    disk.mkdir()
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.strip())
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_full_disk_rejects_the_whole_batch_in_one_line(scratch_dir, tiny_disk, bound_database):
    db_path = tiny_disk / "bouncer.db"
    env = cli_env("sqlite:///%s" % db_path)
    assert run_cli(env, "init-db").returncode == 0
    assert run_cli(env, *submit_args(write_addresses(scratch_dir / "small.txt", 2))).returncode == 0
    before = table_counts(db_path)
    visible_counts_before = visible_counts(db_path)
    too_big = write_addresses(scratch_dir / "big.txt", 30000)   # ~1 MB of text, more in rows

    result = run_cli(env, *submit_args(too_big, "bob"))

    assert "database or disk is full" in one_line_failure(result)
    # The slices committed before the disk filled are invisible (the batch is still loading);
    # removing them needs room on that same disk, so a cycle removes them later.
    assert visible_counts(db_path) == visible_counts_before
    assert integrity(db_path) == "ok"
    # While the disk is still full, the next batch fits only in the room the failed write had
    # taken in the write-ahead log (a page more or less of it decides); else it is refused the
    # same way. Once the disk has room again it is taken, and the dead load is removed as soon
    # as its heartbeat is old.
    next_batch = write_addresses(scratch_dir / "next.txt", 2)
    while_full = run_cli(env, *submit_args(next_batch, "carol"))
    if while_full.returncode != 0:
        assert "database or disk is full" in one_line_failure(while_full)
        assert visible_counts(db_path) == visible_counts_before
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    if while_full.returncode != 0:
        assert run_cli(env, *submit_args(next_batch, "carol")).returncode == 0
    open_database("sqlite:///%s" % db_path)
    with connection():
        removed = remove_dead_loads(now=utcnow() + DEAD_LOADER_AFTER + datetime.timedelta(seconds=1))
    assert len(removed) == 1
    assert table_counts(db_path)["user_batch_emails"] == before["user_batch_emails"] + 2
