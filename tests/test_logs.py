"""Logs: LOG_FORMAT=json gives one JSON object a line, for log platforms, carrying as fields of
their own the ids the text lines name (ledger id, Bouncer id, user batch id, job id), secrets
masked; an idle cycle logs at DEBUG, a busy one one INFO line with its counts; an idle service
is quiet, and stops without a warning."""
import json
import logging
import time
from dataclasses import replace

import pytest
from conftest import API_KEY, REDIS_URL, addresses, submit
from operating import host_batch

from bouncer.logs import setup_logging
from bouncer.runtime.jobs import check_batches_job, create_batches_job
from bouncer.store.models import JobRun
from support.processes import Supervisor, service_env
from support.waiting import wait_until


def test_json_lines_carry_the_ids_and_mask_secrets(app, bouncer, capsys):
    setup_logging(replace(app.settings, log_format="json"))
    host_batch("erin", ["nope", "also nope"])          # fails at admission: no valid address
    submit("alice", addresses("a", 3))
    create_batches_job("deliverable")
    bouncer.complete_now()
    check_batches_job("deliverable")
    logging.getLogger("bouncer.client").error("Bouncer answered 401 to key %s", API_KEY)

    text = capsys.readouterr().err
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert all(line["time"].endswith("Z") for line in lines)

    def first(**fields):
        return next(line for line in lines if all(line.get(k) == v for k, v in fields.items()))

    created = first(logger="bouncer.cycles.creation", check_type="deliverable")
    assert created["ledger_id"] == 1 and created["bouncer_id"] in created["message"]
    ingested = first(logger="bouncer.cycles.ingest", ledger_id=1)
    assert ingested["bouncer_id"] == created["bouncer_id"] and "ingested" in ingested["message"]
    failed = first(logger="bouncer.doors.admission", level="WARNING")
    assert failed["user_batch_id"] == 1 and "no valid address" in failed["message"]
    assert first(job_id="batch_creator_deliverable")["message"].startswith(
        "Creation cycle deliverable: 1 Bouncer batch(es) created (3 addresses)")
    assert first(job_id="status_checker_deliverable")["level"] == "INFO"

    assert API_KEY not in text
    assert first(logger="bouncer.client", level="ERROR")["message"] == "Bouncer answered 401 to key ***"


def cycle_lines(caplog, level):
    """Lines of `level` from the cycles and the jobs, and what rq says of each job."""
    return [r.getMessage() for r in caplog.records if r.levelno == level
            and r.name in ("bouncer.cycles.runner", "bouncer.runtime.jobs", "rq.worker")]


def test_an_idle_cycle_logs_at_debug_a_busy_one_one_info_line_with_its_counts(app, bouncer, caplog):
    caplog.set_level(logging.DEBUG)
    for job in (create_batches_job, check_batches_job):
        job("deliverable")
    assert cycle_lines(caplog, logging.INFO) == []
    assert len(cycle_lines(caplog, logging.DEBUG)) == 4         # each cycle's line and the job's
    caplog.clear()
    submit("alice", addresses("a", 3))
    create_batches_job("deliverable")
    assert cycle_lines(caplog, logging.INFO) == [
        "Creation cycle deliverable: 1 Bouncer batch(es) created (3 addresses); 3 free slot(s) at start"]


def test_rq_says_what_each_job_does_only_at_debug(app):
    setup_logging(app.settings)
    assert logging.getLogger("rq.worker").getEffectiveLevel() == logging.WARNING
    setup_logging(replace(app.settings, log_level="DEBUG"))
    assert logging.getLogger("rq.worker").getEffectiveLevel() == logging.DEBUG


@pytest.mark.slow
def test_an_idle_service_says_nothing_per_cycle_and_stops_without_a_warning(database_url, redis_conn, db, tmp_path):
    processes = Supervisor(tmp_path, service_env(database_url, REDIS_URL, "http://127.0.0.1:9", API_KEY,
                                                 LOG_LEVEL="INFO"))
    for name in ("worker", "scheduler"):
        processes.start(name, name)
    try:
        with processes.logs_on_failure():
            wait_until(lambda: JobRun.select().where(JobRun.job_id == "batch_creator_deliverable").exists(),
                       "a creation cycle", 30)
            time.sleep(3)                                       # a few more rounds of every job
            assert processes.stop(["worker", "scheduler"], grace=30) == {"worker": 0, "scheduler": 0}
    finally:
        processes.stop_all()
    for name in ("worker", "scheduler"):
        lines = processes.running[name].log().splitlines()
        assert len(lines) <= 4, lines                   # started, (registered,) stopped
        assert not [line for line in lines if " WARNING " in line or " ERROR " in line], lines
