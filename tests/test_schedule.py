"""The scheduler's registration of the six repeating jobs, the worker's fork hygiene, and the
real processes end to end (scheduler, worker, sandbox)."""
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import os
import signal
import time

import pytest
import redis as redis_lib
from conftest import API_KEY, REDIS_URL
from rq import Queue, SimpleWorker
from rq.job import Job
from rq_scheduler import Scheduler

from bouncer import names
from bouncer.app import App, set_current_app
from bouncer.cycles import runner
from bouncer.names import CYCLE_QUEUE
from bouncer.runtime import jobs
from bouncer.runtime.schedule import JOB_TIMEOUT, BouncerScheduler, missing_job_ids, register_jobs
from bouncer.runtime.worker import BouncerWorker
from bouncer.sandbox import Sandbox
from bouncer.store.database import database
from support.processes import Supervisor, service_env
from support.waiting import at_once

JOB_IDS = ["batch_creator_catchall", "batch_creator_deliverable", "retention_pruner",
           "status_checker_catchall", "status_checker_deliverable", "webhook_sender"]


def new_scheduler(redis_conn):
    return Scheduler(queue=Queue(CYCLE_QUEUE, connection=redis_conn), connection=redis_conn)


def next_runs(redis_conn):
    """{job id: next run (epoch seconds)} of everything rq-scheduler has scheduled."""
    return {k.decode(): v for k, v in redis_conn.zrange(Scheduler.scheduled_jobs_key, 0, -1,
                                                         withscores=True)}


def changed(settings, **overrides):
    return dataclasses.replace(settings, **overrides)


# -- registration --

def test_register_jobs_twice_keeps_exactly_four(redis_conn, settings):
    scheduler = new_scheduler(redis_conn)
    first = register_jobs(scheduler, settings)
    assert first == {"kept": [], "added": JOB_IDS, "replaced": [], "removed": []}
    before = next_runs(redis_conn)

    second = register_jobs(new_scheduler(redis_conn), settings)

    assert second == {"kept": JOB_IDS, "added": [], "replaced": [], "removed": []}
    assert next_runs(redis_conn) == before
    assert sorted(before) == JOB_IDS


def test_register_jobs_definitions(redis_conn, settings):
    register_jobs(new_scheduler(redis_conn), settings)
    sender = Job.fetch("webhook_sender", connection=redis_conn)
    assert (sender.func_name, tuple(sender.args), sender.meta["interval"], sender.origin) == (
        "bouncer.runtime.jobs.send_webhooks_job", (), names.WEBHOOK_INTERVAL, names.WEBHOOK_QUEUE)
    pruner = Job.fetch("retention_pruner", connection=redis_conn)
    assert (pruner.func_name, tuple(pruner.args), pruner.meta["interval"], pruner.origin) == (
        "bouncer.runtime.jobs.prune_job", (), 86400, CYCLE_QUEUE)
    for job_id in [j for j in JOB_IDS if j.startswith(("batch_creator", "status_checker"))]:
        job = Job.fetch(job_id, connection=redis_conn)
        kind, check_type = job_id.rsplit("_", 1)
        expected = {"batch_creator": (jobs.create_batches_job, settings.batch_create_interval),
                    "status_checker": (jobs.check_batches_job, settings.status_check_interval)}[kind]
        assert job.func_name == "bouncer.runtime.jobs.%s" % expected[0].__name__
        assert tuple(job.args) == (check_type,)
        assert job.meta["interval"] == expected[1]
        assert job.origin == CYCLE_QUEUE
        assert job.timeout == JOB_TIMEOUT
        assert job.result_ttl == -1
        assert job.retries_left is None and not job.retry_intervals


def test_register_jobs_concurrently_leaves_each_once(redis_conn, settings):
    def register():
        with contextlib.closing(redis_lib.Redis.from_url(REDIS_URL)) as conn:
            return register_jobs(new_scheduler(conn), settings)

    results, errors = at_once(register, 8)
    assert errors == []
    assert sorted(next_runs(redis_conn)) == JOB_IDS
    # The lock makes registration one-at-a-time: each id was added exactly once.
    assert sorted(i for r in results for i in r["added"]) == JOB_IDS
    assert all(r["replaced"] == [] and r["removed"] == [] for r in results)


def test_register_jobs_replaces_only_changed_interval(redis_conn, settings):
    register_jobs(new_scheduler(redis_conn), settings)
    before = next_runs(redis_conn)

    done = register_jobs(new_scheduler(redis_conn), changed(settings, status_check_interval=7))

    assert done["replaced"] == ["status_checker_catchall", "status_checker_deliverable"]
    assert done["kept"] == ["batch_creator_catchall", "batch_creator_deliverable", "retention_pruner",
                            "webhook_sender"]
    assert done["added"] == [] and done["removed"] == []
    after = next_runs(redis_conn)
    assert sorted(after) == JOB_IDS
    assert after["batch_creator_deliverable"] == before["batch_creator_deliverable"]
    assert Job.fetch("status_checker_catchall", connection=redis_conn).meta["interval"] == 7
    assert Job.fetch("batch_creator_catchall", connection=redis_conn).meta["interval"] == \
        settings.batch_create_interval


def test_register_jobs_removes_unwanted_ids_only(redis_conn, settings):
    scheduler = new_scheduler(redis_conn)
    register_jobs(scheduler, settings)
    now = datetime.datetime.now(datetime.timezone.utc)
    old = scheduler.schedule(now, jobs.create_batches_job, args=("legacy",), interval=5,
                             id="batch_creator_legacy", queue_name=CYCLE_QUEUE)
    scheduler.schedule(now, jobs.create_batches_job, args=("x",), interval=5,
                       id="someone_elses_job", queue_name=CYCLE_QUEUE)

    done = register_jobs(new_scheduler(redis_conn), settings)

    assert done["removed"] == ["batch_creator_legacy"]
    assert done["kept"] == JOB_IDS
    assert sorted(next_runs(redis_conn)) == sorted(JOB_IDS + ["someone_elses_job"])
    assert not Job.exists(old.id, connection=redis_conn)


def test_register_jobs_after_flushdb(redis_conn, settings):
    register_jobs(new_scheduler(redis_conn), settings)
    redis_conn.flushdb()

    done = register_jobs(new_scheduler(redis_conn), settings)

    assert done["added"] == JOB_IDS
    assert sorted(next_runs(redis_conn)) == JOB_IDS


def test_register_jobs_puts_back_an_entry_without_rewriting_its_job(redis_conn, settings):
    """The scheduler moving a job to the queue removes its entry, then adds the next run: a
    registration in between must not rewrite the queued job."""
    scheduler = new_scheduler(redis_conn)
    register_jobs(scheduler, settings)
    job = Job.fetch("batch_creator_deliverable", connection=redis_conn)
    Queue(CYCLE_QUEUE, connection=redis_conn).enqueue_job(job)
    scheduler.cancel(job)

    done = register_jobs(scheduler, settings)

    assert done["added"] == ["batch_creator_deliverable"]
    assert sorted(next_runs(redis_conn)) == JOB_IDS
    assert job.get_status(refresh=True) == "queued"


def test_scheduler_round_restores_jobs_after_flushdb(redis_conn, settings):
    scheduler = BouncerScheduler(settings, queue=Queue(CYCLE_QUEUE, connection=redis_conn),
                                 connection=redis_conn, interval=1)
    register_jobs(scheduler, settings)
    redis_conn.flushdb()
    assert missing_job_ids(scheduler, settings) == JOB_IDS

    list(scheduler.enqueue_jobs())

    assert missing_job_ids(scheduler, settings) == []
    assert sorted(next_runs(redis_conn)) == JOB_IDS


def test_failed_runs_keep_repeating_and_leave_one_failed_entry(redis_conn, settings, monkeypatch):
    def broken_cycle(app, kind, check_type, **options):
        raise RuntimeError("database down")

    monkeypatch.setattr(runner, "run_cycle", broken_cycle)
    set_current_app(App(settings, redis=redis_conn))
    scheduler = new_scheduler(redis_conn)
    register_jobs(scheduler, settings)
    queue = Queue(CYCLE_QUEUE, connection=redis_conn)
    key = Job.key_for("batch_creator_deliverable")
    try:
        for _ in range(3):
            run_scheduled_job_now(scheduler, queue, "batch_creator_deliverable")
        assert queue.failed_job_registry.get_job_ids() == ["batch_creator_deliverable"]
        assert sorted(next_runs(redis_conn)) == JOB_IDS
        # A failure sets the job hash to expire after failure_ttl (rq's default, one year) ...
        assert redis_conn.ttl(key) > 3600

        monkeypatch.undo()
        run_scheduled_job_now(scheduler, queue, "batch_creator_deliverable")
    finally:
        set_current_app(None)
    # ... and the next run persists it again.
    assert redis_conn.ttl(key) == -1
    assert sorted(next_runs(redis_conn)) == JOB_IDS


def run_scheduled_job_now(scheduler, queue, job_id):
    """What one scheduler round and one worker do with a due job, in this process."""
    scheduler.enqueue_job(Job.fetch(job_id, connection=queue.connection))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    finally:
        # The worker installs its own handlers; pytest's must come back.
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


# -- the worker --

def test_worker_closes_database_before_fork(redis_conn, db, monkeypatch):
    database.execute_sql("SELECT 1")
    assert not database.is_closed()
    monkeypatch.setattr(os, "fork", lambda: 4242)  # the parent's side of a fork
    monkeypatch.setenv("RQ_WORKER_ID", "-")
    monkeypatch.setenv("RQ_JOB_ID", "-")
    worker = BouncerWorker([Queue(CYCLE_QUEUE, connection=redis_conn)], connection=redis_conn)
    job = Queue(CYCLE_QUEUE, connection=redis_conn).enqueue(jobs.create_batches_job, "deliverable")

    worker.fork_work_horse(job, worker.queues[0])

    assert database.is_closed()


def cycle_told_to_stop():
    """A job: what a cycle in this horse would see."""
    return runner.SHUTDOWN.is_set()


def test_worker_stops_when_logging_swallowed_its_stop_request(redis_conn, monkeypatch):
    """rq stops an idle worker by raising StopRequested out of its SIGTERM handler. A signal
    that lands while the worker writes a log line has that exception swallowed by logging's
    error handling; the worker must stop all the same: the job it had just taken runs with its
    cycle told to stop, and no further job is taken."""
    queue = Queue(CYCLE_QUEUE, connection=redis_conn)
    taken = queue.enqueue(cycle_told_to_stop)
    left = queue.enqueue(time.time)
    worker = BouncerWorker([queue], connection=redis_conn)

    class SignalMidLine(logging.StreamHandler):
        def format(self, record):
            if record.getMessage().startswith("Worker %s: %s: " % (worker.name, CYCLE_QUEUE)) \
                    and worker.stop_signal is None:
                worker.request_stop(signal.SIGTERM, None)   # as the worker logs the job it took
            return super().format(record)

    handler = SignalMidLine(io.StringIO())
    monkeypatch.setattr(logging, "raiseExceptions", False)
    level = worker.log.level
    worker.log.setLevel(logging.INFO)   # setLevel: the logger's cached answers are cleared too
    worker.log.addHandler(handler)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.work(burst=True)
    finally:
        worker.log.removeHandler(handler)
        worker.log.setLevel(level)
        for signum, previous in handlers.items():
            signal.signal(signum, previous)
        runner.SHUTDOWN.clear()
    assert worker.stop_signal == signal.SIGTERM
    assert taken.get_status(refresh=True) == "finished" and taken.return_value() is True
    assert left.get_status(refresh=True) == "queued"


HORSE = """
import gc
import sys
from bouncer.config import Settings
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.app import App
from bouncer.runtime.worker import preload
from bouncer.store.database import connection, database, open_database
from bouncer.store.migrations import create_schema
database_url, redis_url, api_url, api_key = sys.argv[1:]
open_database(database_url)
create_schema()
app = App(Settings(database_url=database_url, redis_url=redis_url, api_url=api_url, api_key=api_key,
                   public_url="http://127.0.0.1:9", callback_secret="s" * 32).validate())
preload(app)
assert gc.get_freeze_count() > 10000, gc.get_freeze_count()   # set aside before the first fork
loaded = set(sys.modules)
with connection():
    # A host's rows, so the cycle admits them (the syntax check) before it sends them.
    (batch_id,) = database.execute_sql(
        "INSERT INTO user_batches (user_id, check_type) VALUES ('host', 'deliverable') RETURNING id").fetchone()
    database.execute_sql("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, 1, 'a@example.com'), "
                         "(?, 2, 'B.c+x@gmail.com'), (?, 3, 'not-an-address')", (batch_id,) * 3)
created = run_cycle(app, CREATION, "deliverable")
assert len(created.created) == 1, created.summary()
run_cycle(app, STATUS, "deliverable")
print(" ".join(sorted(set(sys.modules) - loaded)))
"""


def test_worker_preloads_what_a_cycle_imports(tmp_path, redis_conn):
    """A horse forked from the worker finds the cycles' modules loaded (a creation cycle that
    admits and sends, a status cycle that ingests), set aside from the garbage collector: a job
    never pays for those imports, nor for the collector's walks over them."""
    import subprocess
    import sys

    from support.processes import ROOT
    with Sandbox(port=0, processing_time=0) as sandbox:
        done = subprocess.run([sys.executable, "-c", HORSE, "sqlite:///%s" % (tmp_path / "horse.db"),
                               REDIS_URL, sandbox.url, API_KEY],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = done.stdout.split()
    heavy = ("bouncer", "requests", "urllib3", "email_validator", "idna", "charset_normalizer")
    assert [m for m in imported if m.split(".")[0] in heavy] == []


# -- real processes --

def run_ok(processes, *args, stdin=None):
    done = processes.run(*args, stdin=stdin)
    assert done.returncode == 0, "%s failed: %s" % (args, done.stderr)
    return done.stdout


def wait_until_completed(processes, batch_ids, limit=60):
    deadline = time.monotonic() + limit
    states = {}
    while time.monotonic() < deadline:
        states = {b: json.loads(run_ok(processes, "status", str(b), "--json"))["status"] for b in batch_ids}
        if all(s == "completed" for s in states.values()):
            return states
        time.sleep(0.5)
    return states


@pytest.fixture
def processes(tmp_path, redis_conn):
    """Background `python -m bouncer ...` processes against a sandbox that completes batches in
    half a second; all killed at the end."""
    with Sandbox(port=0, processing_time=0.5) as sandbox:
        env = service_env("sqlite:///%s" % (tmp_path / "bouncer.db"), REDIS_URL, sandbox.url, API_KEY)
        supervisor = Supervisor(tmp_path, env)
        yield supervisor
        supervisor.kill_all()


@pytest.mark.slow
def test_processes_end_to_end(processes, redis_conn):
    run_ok(processes, "init-db")
    for number in (1, 2):
        processes.start("scheduler-%d" % number, "scheduler")
    processes.start("worker", "worker")
    with processes.logs_on_failure(4000):
        batch_ids = [
            json.loads(run_ok(processes, "submit", "-", "--user", "u", "--check-type", check_type,
                              "--json", stdin="a@example.com\nb@example.org\nc@example.net\n"))
            ["batch_id"]
            for check_type in ("deliverable", "catchall")]

        states = wait_until_completed(processes, batch_ids)

        assert all(s == "completed" for s in states.values()), states
        assert sorted(next_runs(redis_conn)) == JOB_IDS
        for name in ("worker", "scheduler-1", "scheduler-2"):
            started = time.monotonic()
            assert processes.stop([name], grace=10) == {name: 0}, processes.running[name].log_tail()
            assert time.monotonic() - started < 5, processes.running[name].log_tail()
