"""The job layer: what a run records and logs, and the refill a freed slot triggers."""
import logging

from conftest import addresses, submit
from rq import Queue, SimpleWorker

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, CYCLE_QUEUE, RUN_AGAIN_KEY
from bouncer.reading.health import job_runs
from bouncer.runtime.jobs import check_batches_job, create_batches_job
from bouncer.store.models import BouncerBatch


def work(app):
    """Run every queued job in-process, including jobs queued by those jobs."""
    queue = Queue(CYCLE_QUEUE, connection=app.redis)
    SimpleWorker([queue], connection=app.redis).work(burst=True)
    return queue


def test_job_status_cycle_that_frees_slots_refills_them_now(app, bouncer):
    submit("alice", addresses("a", 40))            # 4 batches of 10, capacity 3
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    Queue(CYCLE_QUEUE, connection=app.redis).enqueue(check_batches_job, "deliverable")
    queue = work(app)
    assert queue.fetch_job("batch_creator_deliverable_now").get_status() == "finished"
    # The fourth batch went out right after the first three came back, with no creation tick.
    assert BouncerBatch.select().count() == 4 and bouncer.count("create") == 4


def test_job_status_cycle_with_nothing_finished_triggers_nothing(app, bouncer):
    submit("alice", addresses("a", 5))
    run_cycle(app, CREATION, "deliverable")
    Queue(CYCLE_QUEUE, connection=app.redis).enqueue(check_batches_job, "deliverable")
    queue = work(app)
    assert queue.fetch_job("batch_creator_deliverable_now") is None


def test_job_records_success_and_logs_what_the_cycle_did(app, bouncer, caplog):
    caplog.set_level(logging.INFO)
    submit("alice", addresses("a", 5))
    Queue(CYCLE_QUEUE, connection=app.redis).enqueue(create_batches_job, "deliverable")
    work(app)
    assert job_runs()["batch_creator_deliverable"].last_success_at is not None
    assert "Creation cycle deliverable: 1 Bouncer batch(es) created" in caplog.text


def test_job_failure_is_logged_not_retried_and_not_recorded(app, bouncer, caplog, monkeypatch):
    from bouncer.cycles import runner

    def broken(app, kind, check_type, **options):
        raise RuntimeError("database went away")
    monkeypatch.setattr(runner, "run_cycle", broken)
    job = Queue(CYCLE_QUEUE, connection=app.redis).enqueue(check_batches_job, "deliverable")
    work(app)
    assert job.get_status() == "failed" and job.retries_left is None
    run = job_runs()["status_checker_deliverable"]
    assert run.last_success_at is None and run.failures_in_a_row == 1 and "database went away" in run.last_error
    assert "Job status_checker_deliverable" in caplog.text and "database went away" in caplog.text


def test_run_now_while_a_cycle_runs_asks_it_to_run_again(app, bouncer):
    from bouncer.cycles.locks import CycleLock
    from bouncer.cycles.triggers import run_now
    from bouncer.names import RUN_AGAIN_KEY, STATUS
    with CycleLock(app.redis, STATUS, "deliverable") as held:
        assert held
        assert run_now(app.redis, STATUS, "deliverable") is False
    assert Queue(CYCLE_QUEUE, connection=app.redis).fetch_job("status_checker_deliverable_now") is None
    assert app.redis.exists(RUN_AGAIN_KEY % (STATUS, "deliverable"))


def test_run_now_queues_once_for_a_burst_of_triggers(app, bouncer):
    from bouncer.cycles.triggers import run_now
    from bouncer.names import STATUS
    assert run_now(app.redis, STATUS, "deliverable") is True
    assert run_now(app.redis, STATUS, "deliverable") is False
    assert Queue(CYCLE_QUEUE, connection=app.redis).count == 1


def test_run_now_goes_ahead_of_the_routine_runs_already_queued(app, bouncer):
    # The scheduler queues its routine runs all at once; a trigger (a callback, a freed slot)
    # is work known to be waiting and must not wait behind them.
    from bouncer.cycles.triggers import run_now
    from bouncer.names import CREATION, STATUS
    queue = Queue(CYCLE_QUEUE, connection=app.redis)
    for routine in ("batch_creator_catchall", "status_checker_catchall", "status_checker_deliverable"):
        queue.enqueue(check_batches_job, "catchall", job_id=routine)
    assert run_now(app.redis, STATUS, "deliverable") is True
    assert run_now(app.redis, CREATION, "deliverable") is True
    assert queue.job_ids[:2] == ["batch_creator_deliverable_now", "status_checker_deliverable_now"]


def test_job_runs_its_cycle_again_when_triggered_while_running(app, bouncer, monkeypatch):
    from bouncer.cycles import runner
    runs = []
    real = runner.run_cycle

    def cycle_with_a_late_trigger(app, kind, check_type, **options):
        runs.append(check_type)
        if len(runs) == 1:   # a callback arrives while this first run holds the lock
            app.redis.set(RUN_AGAIN_KEY % (kind, check_type), 1)
        return real(app, kind, check_type, **options)
    monkeypatch.setattr(runner, "run_cycle", cycle_with_a_late_trigger)
    Queue(CYCLE_QUEUE, connection=app.redis).enqueue(check_batches_job, "deliverable")
    work(app)
    assert runs == ["deliverable", "deliverable"]
