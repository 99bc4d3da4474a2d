"""Retention (design.md, "Personal data"): `prune` and the daily `retention_pruner` job remove
the rows of user batches that ended before the retention period, keeping each batch's status and
counts; `results` of a pruned batch is one line and exit 1, the API a 410; old verdicts no row
needs go, and addresses left with nothing; all of it in short slices that a later run finishes."""
import datetime
import json

import pytest
from clirun import invoke
from conftest import assert_clean_failure, current_app_with, statuses, submit, with_settings
from rq import Queue, SimpleWorker

from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, CYCLE_QUEUE, NOW_SUFFIX, PRUNER, STATUS
from bouncer.queue import retention
from bouncer.reading.batches import batch_status, iter_results
from bouncer.reading.health import job_runs
from bouncer.runtime.jobs import job_definitions, prune_job
from bouncer.services import erasure
from bouncer.services.idempotency import remember
from bouncer.store.database import utcnow
from bouncer.store.models import (
    AuditEntry, DeliverableResult, EmailGlobal, IdempotencyKey, UserBatch, UserBatchEmail, WebhookAttempt,
    WebhookDelivery,
)
from bouncer.web import create_web_app

DAYS = 30
TOKEN = "tok-host-app-3f9a2c71"


@pytest.fixture
def kept(app):
    """The test's App with RETENTION_DAYS set (the CLI's and the jobs' App too)."""
    yield from current_app_with(app, retention_days=DAYS)


def ago(days):
    return utcnow() - datetime.timedelta(days=days)


def age(batch_id, days):
    """The batch ended `days` ago, its rows' verdicts checked then, its webhooks sent then."""
    UserBatch.update(completed_at=ago(days)).where(UserBatch.id == batch_id).execute()
    gids = UserBatchEmail.select(UserBatchEmail.email_global).where(UserBatchEmail.batch == batch_id)
    DeliverableResult.update(checked_at=ago(days)).where(DeliverableResult.email_global.in_(gids)).execute()
    (WebhookDelivery.update(created_at=ago(days), state="delivered")
     .where(WebhookDelivery.batch_id == batch_id).execute())


def verify(app, bouncer):
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")


def address_exists(address):
    return EmailGlobal.select().where(EmailGlobal.email == address).exists()


def verdict_exists(address):
    gid = EmailGlobal.select(EmailGlobal.id).where(EmailGlobal.email == address).scalar()
    return DeliverableResult.select().where(DeliverableResult.email_global == gid).exists()


def test_prune_keeps_status_and_counts_and_removes_the_rows(kept, bouncer):
    old = submit("alice", ["old1@example.com", "shared@example.com", "not an address", "old1@example.com"])
    verify(kept, bouncer)
    recent = submit("bob", ["shared@example.com", "bob@example.com"])
    verify(kept, bouncer)
    age(old, DAYS + 1)
    before = batch_status(old)
    assert before["counts"]["invalid"] == 1 and before["total"] == 4

    report = erasure.prune(kept, who="test")

    assert (report.batches, report.rows) == (1, 4)
    after = batch_status(old)
    assert after["pruned_at"] is not None
    assert {k: v for k, v in after.items() if k not in ("pruned_at", "webhook")} \
        == {k: v for k, v in before.items() if k not in ("pruned_at", "webhook")}
    assert UserBatch.get_by_id(old).total == 4
    assert UserBatchEmail.select().where(UserBatchEmail.batch == old).count() == 0
    # The verdict no row needs and its address went; the one Bob's rows still need stayed.
    assert not address_exists("old1@example.com") and not verdict_exists("old1@example.com")
    assert verdict_exists("shared@example.com") and [r["status"] for r in iter_results(recent)][0] != "pending"
    assert WebhookDelivery.select().where(WebhookDelivery.batch_id == old).count() == 0
    assert batch_status(recent)["pruned_at"] is None and statuses(recent) == {"done": 2}
    entry = AuditEntry.get()
    assert (entry.who, entry.action) == ("test", "prune") and "1 user batch(es) pruned, 4 row(s)" in entry.detail


def test_results_of_a_pruned_batch_is_one_line_exit_1_and_a_410(kept, bouncer):
    old = submit("alice", ["a@example.com"])
    verify(kept, bouncer)
    age(old, DAYS + 1)
    invoke(["prune"])
    line = assert_clean_failure(invoke(["results", old]), "the rows of user batch %d were removed after the "
                                "retention period" % old, "its status and counts remain")
    assert utcnow().date().isoformat() in line
    status = invoke(["status", old, "--json"])
    assert status.exit_code == 0 and json.loads(status.stdout)["counts"]["deliverable"] \
        + json.loads(status.stdout)["counts"]["risky"] + json.loads(status.stdout)["counts"]["undeliverable"] \
        + json.loads(status.stdout)["counts"]["unknown"] == 1
    # A batch the CLI made: an operator-level token reads it.
    client = create_web_app(with_settings(kept, api_operator_tokens=(TOKEN,))).test_client()
    response = client.get("/api/v1/batches/%d/results" % old, headers={"Authorization": "Bearer " + TOKEN})
    assert response.status_code == 410 and "retention period" in response.get_json()["error"]
    answer = client.get("/api/v1/batches/%d" % old, headers={"Authorization": "Bearer " + TOKEN}).get_json()
    assert answer["status"] == "completed" and answer["total"] == 1 and answer["pruned_at"]


def test_what_prune_leaves_alone(kept, bouncer):
    """A batch ended within the period, one still pending, a failed one with rows in flight; a
    verdict checked within the period; an address in flight."""
    young = submit("alice", ["young@example.com"])
    verify(kept, bouncer)
    in_flight = submit("bob", ["flying%d@example.com" % i for i in range(3)])
    run_cycle(kept, CREATION, "deliverable")
    UserBatch.update(status="failed", failure_reason="test", completed_at=ago(DAYS + 5)).where(
        UserBatch.id == in_flight).execute()
    waiting = submit("carol", ["waiting@example.com"])
    UserBatch.update(completed_at=ago(DAYS + 5)).where(UserBatch.id == waiting).execute()
    age(young, 2)
    gone = submit("dave", ["young@example.com"])                 # answered from the cache
    run_cycle(kept, CREATION, "deliverable")
    UserBatch.update(completed_at=ago(DAYS + 1)).where(UserBatch.id == gone).execute()

    report = erasure.prune(kept, who="test")

    assert report.batches == 1 and batch_status(gone)["pruned_at"] is not None
    for batch_id in (young, in_flight, waiting):
        assert batch_status(batch_id)["pruned_at"] is None, batch_id
    assert verdict_exists("young@example.com")                   # checked 2 days ago
    assert all(address_exists("flying%d@example.com" % i) for i in range(3))
    bouncer.complete_now()
    run_cycle(kept, STATUS, "deliverable")
    assert statuses(in_flight) == {"done": 3}


def test_prune_stopped_midway_is_consistent_and_the_next_one_finishes(kept, bouncer, monkeypatch):
    monkeypatch.setattr(retention, "SLICE", 5)
    old = submit("alice", ["a%d@example.com" % i for i in range(23)])
    verify(kept, bouncer)
    verify(kept, bouncer)
    verify(kept, bouncer)
    age(old, DAYS + 1)
    counts = batch_status(old)["counts"]
    transactions = []
    slice_rows = retention.remove_rows_slice

    def one_slice(batch_id):
        removed = slice_rows(batch_id)
        transactions.append(removed[0])
        return removed

    monkeypatch.setattr(retention, "remove_rows_slice", one_slice)
    checks = iter([False] * 4)           # the prune's own check, then one before each slice
    monkeypatch.setattr(retention.Deadline, "passed", lambda self: next(checks, True))
    report = retention.prune(ago(DAYS), utcnow())

    assert report.unfinished and report.batches == 0 and transactions == [5, 5, 5]
    assert batch_status(old)["counts"] == counts and batch_status(old)["pruned_at"] is not None
    assert UserBatchEmail.select().where(UserBatchEmail.batch == old).count() == 8
    assert_clean_failure(invoke(["results", old]), "removed after the retention period")

    monkeypatch.setattr(retention.Deadline, "passed", lambda self: False)
    report = retention.prune(ago(DAYS), utcnow())
    assert not report.unfinished and report.batches == 1 and transactions[3:] == [5, 3]
    assert UserBatchEmail.select().where(UserBatchEmail.batch == old).count() == 0
    assert batch_status(old)["counts"] == counts
    assert EmailGlobal.select().count() == 0 and DeliverableResult.select().count() == 0


def test_expired_idempotency_records_and_old_deliveries_go_even_when_rows_are_kept(app, bouncer):
    batch = submit("alice", ["a@example.com"])
    remember("d1", "old-key", "r1", batch, [], ago(2))
    remember("d1", "new-key", "r2", batch, [], utcnow())
    verify(app, bouncer)
    report = erasure.prune(app, who="test")                      # RETENTION_DAYS is 0
    assert report.kept_forever and report.keys == 1
    assert [k.key for k in IdempotencyKey.select()] == ["new-key"]
    assert UserBatchEmail.select().count() == 1 and batch_status(batch)["pruned_at"] is None
    result = invoke(["prune"])
    assert result.exit_code == 0 and "RETENTION_DAYS is 0: rows and verdicts are kept forever" in result.stdout
    WebhookDelivery.update(state="delivered").execute()
    delivery = WebhookDelivery.get()
    WebhookAttempt.create(delivery_id=delivery.id, attempted_at=ago(3), status_code=200, seconds=0.1)
    WebhookDelivery.update(created_at=ago(3)).execute()
    result = invoke(["prune", "--older-than", "2"])
    assert result.exit_code == 0 and "1 webhook delivery(ies)" in result.stdout
    assert WebhookAttempt.select().count() == 0 and WebhookDelivery.select().count() == 0
    assert UserBatchEmail.select().count() == 1                 # its batch ended moments ago
    result = invoke(["prune", "--older-than", "0"])             # everything that has ended
    assert result.exit_code == 0 and "1 user batch(es) pruned, 1 row(s)" in result.stdout
    assert_clean_failure(invoke(["results", batch]), "removed after the retention period")
    assert invoke(["prune", "--older-than", "-1"]).exit_code == 2      # click's usage error


def test_the_daily_job_prunes_records_its_run_and_queues_itself_when_cut_short(kept, bouncer, monkeypatch):
    assert job_definitions(kept.settings)[PRUNER].interval == 86400
    old = submit("alice", ["a%d@example.com" % i for i in range(12)])
    verify(kept, bouncer)
    verify(kept, bouncer)
    age(old, DAYS + 2)
    queue = Queue(CYCLE_QUEUE, connection=kept.redis)
    checks = iter([False, True])          # cut short before its first slice
    monkeypatch.setattr(retention.Deadline, "passed", lambda self: next(checks, False))
    first = queue.enqueue(prune_job)
    SimpleWorker([queue], connection=kept.redis).work(burst=True)
    assert "0 user batch(es) pruned" in first.return_value() and "next run goes on" in first.return_value()
    again = queue.fetch_job(PRUNER + NOW_SUFFIX)
    assert again is not None and again.get_status() == "finished"   # the same burst ran it, behind
    run = job_runs()[PRUNER]
    assert run.last_success_at is not None and "1 user batch(es) pruned, 12 row(s)" in run.last_summary
    assert batch_status(old)["pruned_at"] is not None and UserBatchEmail.select().count() == 0
