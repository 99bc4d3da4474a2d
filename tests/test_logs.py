"""LOG_FORMAT=json: one JSON object a line, for log platforms, carrying as fields of their own the
ids the text lines name (ledger id, Bouncer id, user batch id, job id), secrets masked."""
import json
import logging
from dataclasses import replace

from conftest import API_KEY, addresses, submit
from operating import host_batch

from bouncer.logs import setup_logging
from bouncer.runtime.jobs import check_batches_job, create_batches_job


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
    assert first(job_id="batch_creator_deliverable")["message"].startswith("Job batch_creator_deliverable done")
    assert first(job_id="status_checker_deliverable")["level"] == "INFO"

    assert API_KEY not in text
    assert first(logger="bouncer.client", level="ERROR")["message"] == "Bouncer answered 401 to key ***"
