"""Reports: the status object of a user batch through its life, its results in submission order,
the queue overview, and spreadsheet-safe cells."""
import pytest
from conftest import addresses, submit

from bouncer.cycles.runner import run_cycle
from bouncer.doors.loading import create_user_batch
from bouncer.errors import NotFound
from bouncer.names import CREATION, STATUS
from bouncer.reading.batches import RESULT_COLUMNS, batch_status, iter_results, recent_batches, spreadsheet_safe
from bouncer.reading.overview import queue_overview
from bouncer.sandbox.simulator import build_record, verdict_for

STATUS_KEYS = {"batch_id", "user_id", "check_type", "status", "total", "done", "counts"}
COUNT_KEYS = {"deliverable", "risky", "undeliverable", "unknown", "invalid", "failed", "cancelled",
              "pending"}
CONTRACT_COLUMNS = ("email", "status", "reason", "score", "accept_all", "disposable", "free", "role")

# Twelve rows: 9 valid (one a repeat of another by case), 3 invalid, sent in one Bouncer batch.
ROWS = ["a1@example.com", "bad address", "a2@example.com", "A1@Example.com", "a3@example.com",
        "no-at-sign", "a4@example.com", "a5@example.com", "a6@example.com", "x@nodot",
        "a7@example.com", "=cmd@example.com"]
VALID = [r for r in ROWS if "@" in r and " " not in r and r != "x@nodot"]
INVALID_ROWS = ["bad address", "no-at-sign", "x@nodot"]


def expected_verdicts(rows):
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for row in rows:
        counts[verdict_for(row)["status"]] += 1
    return counts


def assert_status_shape(answer):
    assert STATUS_KEYS <= set(answer)
    assert set(answer["counts"]) >= COUNT_KEYS
    assert all(isinstance(answer["counts"][k], int) for k in COUNT_KEYS)
    assert answer["total"] == sum(answer["counts"][k] for k in COUNT_KEYS)
    assert answer["done"] == answer["total"] - answer["counts"]["pending"]


def test_batch_status_queued_processing_completed(app, bouncer):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    queued = batch_status(batch_id)
    assert_status_shape(queued)
    assert (queued["batch_id"], queued["user_id"], queued["check_type"], queued["status"],
            queued["total"], queued["done"]) == (batch_id, "alice", "deliverable", "queued", 12, 3)
    assert queued["counts"] == dict(dict.fromkeys(COUNT_KEYS, 0), invalid=3, pending=9)

    run_cycle(app, CREATION, "deliverable")
    processing = batch_status(batch_id)
    assert_status_shape(processing)
    assert (processing["status"], processing["done"]) == ("processing", 3)
    assert processing["counts"]["pending"] == 9

    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    completed = batch_status(batch_id)
    assert_status_shape(completed)
    assert (completed["status"], completed["total"], completed["done"]) == ("completed", 12, 12)
    assert completed["counts"] == dict(expected_verdicts(VALID), invalid=3, pending=0, failed=0)


def test_batch_status_partly_sent_stays_processing(app, bouncer):
    # batch_size 10 x max_outstanding 3: 30 of 35 addresses go out in the first cycle.
    batch_id = submit("alice", addresses("p", 35))
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    answer = batch_status(batch_id)
    assert (answer["status"], answer["total"], answer["done"]) == ("processing", 35, 30)
    assert answer["counts"]["pending"] == 5
    assert answer["counts"] == dict(expected_verdicts(addresses("p", 30)), invalid=0, failed=0,
                                    pending=5)


def test_batch_status_failed_when_bouncer_loses_the_batch(app, bouncer):
    batch_id = submit("alice", ["a@example.com", "b@example.com", "not valid"])
    run_cycle(app, CREATION, "deliverable")
    for bid in list(bouncer.batches):
        bouncer.forget(bid)
    run_cycle(app, STATUS, "deliverable")
    answer = batch_status(batch_id)
    assert_status_shape(answer)
    assert (answer["status"], answer["done"]) == ("failed", 3)
    assert (answer["counts"]["failed"], answer["counts"]["invalid"]) == (2, 1)
    assert "404" in answer["failure_reason"]


def test_batch_status_unknown_id_raises_not_found(db):
    with pytest.raises(NotFound, match="123"):
        batch_status(123)


def test_iter_results_pending_and_invalid_rows_in_submission_order(app):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    rows = list(iter_results(batch_id))
    assert [r["email"] for r in rows] == ROWS
    assert [r["status"] for r in rows] == [
        "invalid" if r in INVALID_ROWS else "pending" for r in ROWS]
    for row in rows:
        assert tuple(row)[:len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
        assert tuple(row) == RESULT_COLUMNS
        if row["status"] == "invalid":
            assert row["reason"]          # why the syntax check failed
        assert row["score"] is None


def test_iter_results_verdict_columns_after_completion(app, bouncer):
    batch_id = create_user_batch("alice", "deliverable", ROWS).batch_id
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    rows = list(iter_results(batch_id))
    assert [r["email"] for r in rows] == ROWS
    for row in rows:
        if row["email"] in INVALID_ROWS:
            assert row["status"] == "invalid"
            continue
        record = build_record({"email": row["email"].lower()})
        assert (row["status"], row["reason"], row["score"]) == (
            record["status"], record["reason"], record["score"])
        assert (row["accept_all"], row["disposable"], row["free"], row["role"]) == (
            record["domain"]["acceptAll"], "no", "no", "no")
        assert row["provider"] == "example.com"


def test_iter_results_spans_export_pages(app, monkeypatch):
    monkeypatch.setattr("bouncer.reading.batches.EXPORT_PAGE", 7)
    rows = addresses("r", 20) + ["bad"] + addresses("s", 4)
    batch_id = create_user_batch("alice", "catchall", rows).batch_id
    assert [r["email"] for r in iter_results(batch_id)] == rows


def test_iter_results_only_this_batch(app):
    submit("bob", ["other@example.com"])
    batch_id = submit("alice", ["mine@example.com", "other@example.com"])
    assert [r["email"] for r in iter_results(batch_id)] == ["mine@example.com", "other@example.com"]


def test_queue_overview_counts_queued_and_outstanding(app, bouncer):
    submit("alice", addresses("q", 35))
    submit("bob", addresses("c", 4), check_type="catchall")
    overview = queue_overview(app.settings)
    assert overview["check_types"]["deliverable"]["queued_emails"] == 35
    assert overview["check_types"]["catchall"]["queued_emails"] == 4
    run_cycle(app, CREATION, "deliverable")
    overview = queue_overview(app.settings)
    deliverable = overview["check_types"]["deliverable"]
    assert (deliverable["queued_emails"], deliverable["outstanding_batches"],
            deliverable["max_outstanding"]) == (5, 3, 3)
    assert len(overview["outstanding"]) == 3
    rate = overview["rate_limit"]
    assert rate["requests_last_60s"] == 3
    assert (rate["buffer"], rate["bouncer_limit"]) == (180, 200)


def test_recent_batches_newest_first_with_progress(app):
    first = submit("alice", ["a@example.com", "bad"])
    second = submit("bob", ["b@example.com"])
    listed = recent_batches()
    assert [b["batch_id"] for b in listed] == [second, first]
    assert (listed[1]["total"], listed[1]["done"]) == (2, 1)


@pytest.mark.parametrize("value, safe", [
    ("=cmd@example.com", "'=cmd@example.com"),
    ("+tag@example.com", "'+tag@example.com"),
    ("-x@example.com", "'-x@example.com"),
    ("@x", "'@x"),
    ("\t=1", "'\t=1"),
    ("plain@example.com", "plain@example.com"),
    ("a=b@example.com", "a=b@example.com"),
    (90, 90),
    (None, None),
    ("", ""),
])
def test_spreadsheet_safe(value, safe):
    assert spreadsheet_safe(value) == safe


def test_ledger_totals_credits_today_from_midnight_utc(db, settings):
    import datetime

    from bouncer.store.models import BouncerBatch
    now = datetime.datetime(2026, 12, 1, 0, 30)
    for status, quantity, sent_hours_ago in (("completed", 10, 1), ("completed", 7, 0.25), ("outstanding", 5, 0.1),
                                             ("failed", 3, 0.2), ("rejected", 9, None), ("abandoned", 4, None)):
        sent = now - datetime.timedelta(hours=sent_hours_ago) if sent_hours_ago is not None else None
        BouncerBatch.create(check_type="deliverable", status=status, quantity=quantity, reserved_at=sent or now,
                            sent_at=sent, finished_at=None if status == "outstanding" else now)
    figures = queue_overview(settings, now=now)["check_types"]["deliverable"]
    # Accepted by Bouncer: completed, outstanding and failed; a rejected or abandoned create is not.
    assert (figures["credits_spent_today"], figures["credits_spent_total"]) == (7 + 5 + 3, 10 + 7 + 5 + 3)
    assert figures["emails_verified_total"] == 17 and figures["possible_orphans"] == 1
    assert figures["batches_ended"] == {"completed": 2, "failed": 1, "rejected": 1, "abandoned": 1}
    assert queue_overview(settings, now=now)["check_types"]["catchall"]["credits_spent_total"] == 0
