"""Health is the truth: a job whose runs fail, or whose Bouncer calls are refused, is reported
with the reason at once (not two minutes later), an unwritable database is not ok, and running
out of credits pauses creation loudly until Bouncer has credits again."""
import datetime
import sqlite3

import pytest
from conftest import addresses, submit
from rq import Queue, SimpleWorker

from bouncer.app import App, set_current_app
from bouncer.client import BouncerClient
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, CYCLE_QUEUE
from bouncer.queue.pauses import CREDITS_CHECK, pause, resume
from bouncer.reading.health import FAILING_RUNS, RATE_LIMITED_RUNS, service_health, service_state
from bouncer.runtime.jobs import create_batches_job, record_run
from bouncer.store.database import utcnow
from bouncer.store.models import Pause


def run_creation_job(app):
    set_current_app(app)
    queue = Queue(CYCLE_QUEUE, connection=app.redis)
    queue.enqueue(create_batches_job, "deliverable")
    SimpleWorker([queue], connection=app.redis).work(burst=True)


def healthy_now(app):
    for job_id in ("batch_creator_deliverable", "batch_creator_catchall", "status_checker_deliverable",
                   "status_checker_catchall", "webhook_sender"):
        record_run(job_id, utcnow())


def test_a_wrong_api_key_turns_health_red_at_once_with_the_reason(app, bouncer):
    healthy_now(app)
    wrong = App(app.settings, redis=app.redis, client=BouncerClient(app.settings.api_url, "sk-wrong-key-000"))
    submit("alice", addresses("a", 3))
    run_creation_job(wrong)
    healthy, answer = service_health(wrong, utcnow())
    assert not healthy and answer["status"] == "degraded"
    assert answer["reasons"] == ["batch_creator_deliverable: Bouncer refuses the API key (401): "
                                 "check BOUNCER_API_KEY"]
    assert "sk-wrong-key-000" not in str(answer)
    run_creation_job(app)                                    # the right key: green again
    assert service_health(app, utcnow())[0]


def test_a_job_failing_twice_in_a_row_is_reported(app, bouncer, monkeypatch):
    from bouncer.cycles import runner
    healthy_now(app)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(runner, "run_cycle", broken)
    run_creation_job(app)
    assert service_health(app, utcnow())[0]                  # one failure can be a blip
    for _ in range(FAILING_RUNS - 1):
        run_creation_job(app)
    healthy, answer = service_health(app, utcnow())
    assert not healthy
    assert answer["reasons"] == ["batch_creator_deliverable: failed %d times in a row: RuntimeError: "
                                 "disk on fire" % FAILING_RUNS]


def test_a_run_of_429s_is_reported(app, bouncer):
    healthy_now(app)
    submit("alice", addresses("a", 3))
    for run in range(RATE_LIMITED_RUNS):
        bouncer.fail_next(429, kind="create")
        run_creation_job(app)
        assert service_health(app, utcnow())[0] is (run < RATE_LIMITED_RUNS - 1)
    assert "rate limited by Bouncer (429) 3 runs in a row" in service_health(app, utcnow())[1]["reasons"][0]


def test_an_unwritable_database_is_not_ok(app, bouncer, database_url, caplog):
    if not database_url.startswith("sqlite"):
        pytest.skip("made read-only with a SQLite lock here")
    healthy_now(app)
    holder = sqlite3.connect(database_url[len("sqlite:///"):], timeout=0.1)
    holder.execute("BEGIN EXCLUSIVE")       # as a database that takes no write would behave
    from bouncer.store.database import database
    database.close()
    database.init(database_url[len("sqlite:///"):], timeout=0.2)
    try:
        healthy, answer = service_health(app, utcnow())
    finally:
        holder.rollback()
        holder.close()
    assert not healthy and answer["reasons"][0] == "database: unreachable"
    assert "database is locked" in caplog.text        # why: in the log, not in the answer


def test_operator_pause_is_shown_not_a_fault(app, bouncer):
    healthy_now(app)
    submit("alice", addresses("a", 3))
    pause("deliverable", "migrating the host", who="operator")
    report = run_cycle(app, CREATION, "deliverable")
    assert bouncer.count("create") == 0 and report.stopped == "paused: migrating the host"
    healthy, answer = service_health(app, utcnow())
    assert healthy and answer["paused"]["deliverable"]["cause"] == "operator"
    assert service_state(app.settings)["paused"] == answer["paused"]
    resume("deliverable", who="operator")
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.count("create") == 1


def test_out_of_credits_pauses_loudly_and_resumes_by_itself(app, bouncer):
    healthy_now(app)
    submit("alice", addresses("a", 25))
    bouncer.credits = 5                                   # fewer than a batch of 10 needs
    run_cycle(app, CREATION, "deliverable")
    assert set(Pause.select(Pause.check_type).tuples()) == {("deliverable",), ("catchall",)}
    healthy, answer = service_health(app, utcnow())
    assert not healthy and "out of Bouncer credits" in answer["reasons"][0]
    creates = bouncer.count("create")
    for _ in range(5):                                    # no create every 5 s; no balance check yet
        run_cycle(app, CREATION, "deliverable")
    assert bouncer.count("create") == creates and bouncer.count("other") == 0
    later = utcnow() + CREDITS_CHECK + datetime.timedelta(seconds=1)
    run_cycle(app, CREATION, "deliverable", now=later)    # asks once: still 5
    assert bouncer.count("other") == 1 and Pause.select().count() == 2
    bouncer.credits = 1000
    run_cycle(app, CREATION, "deliverable", now=later)    # not due again yet
    assert bouncer.count("other") == 1
    much_later = later + CREDITS_CHECK + datetime.timedelta(seconds=1)
    report = run_cycle(app, CREATION, "deliverable", now=much_later)
    assert Pause.select().count() == 0 and len(report.created) == 3
    assert service_health(app, utcnow())[0]
