"""The status cycle: ingest completed batches, fail lost or overdue ones, wait on the rest."""
import datetime
import json
import re
import time

import pytest
import requests
from conftest import (
    addresses, on_postgres, postgres_statistics, statuses, submit, wait_for_older_transactions, with_settings,
)

from bouncer.cycles.runner import run_cycle
from bouncer.cycles.triggers import note_called_back
from bouncer.names import CREATION, STATUS
from bouncer.sandbox.simulator import verdict_for
from bouncer.states import SENT, BouncerBatchState, RowState
from bouncer.store.database import database, utcnow
from bouncer.store.models import (
    BouncerBatch, BouncerBatchEmail, CatchallResult, DeliverableResult, EmailGlobal, UserBatch,
    UserBatchEmail,
)
from bouncer.store.schema import ROWS_FILLFACTOR


def send_all(app, user="alice", emails=None, check_type="deliverable"):
    batch = submit(user, emails or addresses(user, 5), check_type)
    run_cycle(app, CREATION, check_type)
    return batch


def test_check_ingests_completed_batch_and_completes_user_batches(app, bouncer):
    alice = send_all(app, "alice", ["Ann.Lee+x@gmail.com", "b@example.com"])
    bob = submit("bob", ["annlee@gmail.com"])   # same mailbox, joins the batch in flight
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    report = run_cycle(app, STATUS, "deliverable")
    assert len(report.ingested) == 1 and report.ingested[0].verified == 3
    assert statuses(alice) == {RowState.DONE: 2} and statuses(bob) == {RowState.DONE: 1}
    assert UserBatch.get_by_id(alice).status == UserBatch.get_by_id(bob).status == "completed"
    result = DeliverableResult.get(DeliverableResult.email_global == EmailGlobal.get(
        EmailGlobal.email == "annlee@gmail.com"))
    assert result.status == verdict_for("Ann.Lee+x@gmail.com")["status"]
    assert json.loads(result.raw)["email"] == "Ann.Lee+x@gmail.com"
    assert BouncerBatch.get().status == BouncerBatchState.COMPLETED
    assert BouncerBatchEmail.select().count() == 0   # no address left in flight


def test_check_leaves_processing_batches_alone(app, bouncer):
    batch = send_all(app)
    report = run_cycle(app, STATUS, "deliverable")
    assert report.waiting == 1 and report.ingested == [] and bouncer.count("download") == 0
    assert statuses(batch) == {SENT: 5}


def verified_long_ago(app, bouncer, address):
    """`address` verified, its verdict then made too old to reuse; returns that verdict."""
    send_all(app, "alice", [address])
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    DeliverableResult.update(checked_at=utcnow() - datetime.timedelta(days=60)).execute()
    return DeliverableResult.get()


def test_check_upserts_results_of_an_address_verified_again(app, bouncer):
    first = verified_long_ago(app, bouncer, "a@example.com")
    send_all(app, "bob", ["A@example.com"])
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert DeliverableResult.select().count() == 1
    assert DeliverableResult.get().checked_at > first.checked_at
    assert DeliverableResult.get().bouncer_batch_id != first.bouncer_batch_id


def test_check_stores_new_verdicts_beside_addresses_verified_again(app, bouncer):
    first = verified_long_ago(app, bouncer, "a@example.com")
    batch = send_all(app, "bob", ["a@example.com", "b@example.com"])
    bouncer.complete_now()
    report = run_cycle(app, STATUS, "deliverable")
    assert report.ingested[0].verified == 2 and statuses(batch) == {RowState.DONE: 2}
    stored = {r.email_global.email: r for r in DeliverableResult.select()}
    assert sorted(stored) == ["a@example.com", "b@example.com"]
    assert stored["a@example.com"].checked_at > first.checked_at
    assert stored["a@example.com"].bouncer_batch_id == stored["b@example.com"].bouncer_batch_id


def test_check_catchall_results_go_to_their_own_table(app, bouncer):
    batch = send_all(app, "alice", ["c@example.com"], check_type="catchall")
    bouncer.complete_now()
    run_cycle(app, STATUS, "catchall")
    assert CatchallResult.select().count() == 1 and DeliverableResult.select().count() == 0
    assert statuses(batch) == {RowState.DONE: 1}


def test_check_fails_an_address_missing_from_the_download_alone(app, bouncer):
    batch = send_all(app, "alice", ["a@example.com", "b@example.com", "c@example.com"])
    bouncer.alter_downloads(lambda records: [r for r in records if r["email"] != "b@example.com"])
    bouncer.complete_now()
    report = run_cycle(app, STATUS, "deliverable")
    assert report.ingested[0].missing == 1
    assert statuses(batch) == {RowState.DONE: 2, RowState.FAILED: 1}
    failed = UserBatchEmail.get(UserBatchEmail.status == RowState.FAILED)
    assert failed.email == "b@example.com" and "not in Bouncer's results" in failed.failure_reason
    assert UserBatch.get_by_id(batch).status == "completed"


def test_check_ignores_extra_and_malformed_records(app, bouncer):
    batch = send_all(app, "alice", ["a@example.com", "b@example.com"])
    bouncer.alter_downloads(lambda records: records + [
        {"email": "stranger@example.com", "status": "deliverable"},
        {"email": 42}, "not a record", {"status": "deliverable"},
        {"email": "b@example.com", "status": "not-a-verdict"},
    ])
    bouncer.complete_now()
    report = run_cycle(app, STATUS, "deliverable")
    assert (report.ingested[0].extra, report.ingested[0].malformed) == (1, 3)
    assert statuses(batch) == {RowState.DONE: 2}


def test_check_matches_a_record_bouncer_respelled_by_its_stripped_address(app, bouncer):
    batch = send_all(app, "alice", ["Jane.Doe+news@gmail.com", "b@example.com"])
    respelled = {"Jane.Doe+news@gmail.com": "JaneDoe@GMail.com"}
    bouncer.alter_downloads(lambda records: [dict(r, email=respelled.get(r["email"], r["email"]))
                                             for r in records])
    bouncer.complete_now()
    report = run_cycle(app, STATUS, "deliverable")
    assert (report.ingested[0].verified, report.ingested[0].missing, report.ingested[0].extra) == (2, 0, 0)
    assert statuses(batch) == {RowState.DONE: 2}


def test_check_keeps_the_record_leniently(app, bouncer):
    batch = send_all(app, "alice", ["a@example.com"])
    bouncer.alter_downloads(lambda records: [{"email": "a@example.com", "status": "risky",
                                              "domain": {"acceptAll": True}, "score": "high",
                                              "brandNew": {"x": 1}}])
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    result = DeliverableResult.get()
    assert (result.status, result.accept_all, result.score, result.reason) == ("risky", "yes", None, None)
    assert json.loads(result.raw)["brandNew"] == {"x": 1}
    assert statuses(batch) == {RowState.DONE: 1}


def test_check_404_fails_the_batch_its_emails_and_its_user_batches(app, bouncer):
    alice = send_all(app, "alice", ["a@example.com"])
    bob = submit("bob", ["A@example.com", "other@example.com"])
    run_cycle(app, CREATION, "deliverable")
    # alice's, sent first (bob's other email rides alone too: his first is alice's address)
    lost = BouncerBatch.select().where(BouncerBatch.quantity == 1).order_by(BouncerBatch.id).first()
    bouncer.forget(lost.bouncer_id)
    report = run_cycle(app, STATUS, "deliverable")
    assert [ledger for ledger, _ in report.failed] == [lost.id]
    assert statuses(alice) == {RowState.FAILED: 1}
    assert statuses(bob) == {RowState.FAILED: 1, SENT: 1}   # its other email is still on its way
    for batch in (alice, bob):
        user_batch = UserBatch.get_by_id(batch)
        assert user_batch.status == "failed" and "404" in user_batch.failure_reason
    assert BouncerBatch.get_by_id(lost.id).status == RowState.FAILED


def test_check_finishes_a_batch_outstanding_longer_than_batch_timeout_and_ingests_what_it_verified(app, bouncer):
    batch = send_all(app)
    [bouncer_id] = bouncer.batches
    bouncer.set_processed(bouncer_id, 2)
    BouncerBatch.update(sent_at=utcnow() - datetime.timedelta(seconds=app.settings.batch_timeout + 5)).execute()
    report = run_cycle(app, STATUS, "deliverable")
    assert report.finishing == [BouncerBatch.get().id] and report.failed == []
    assert statuses(batch) == {SENT: 5}
    report = run_cycle(app, STATUS, "deliverable")
    assert report.ingested[0].verified == 2 and report.ingested[0].missing == 3
    assert report.ingested[0].refunded == 3
    assert statuses(batch) == {RowState.DONE: 2, RowState.FAILED: 3}
    failed = UserBatchEmail.get(UserBatchEmail.status == RowState.FAILED)
    assert failed.failure_reason == ("Bouncer batch %s was finished before verifying it (Bouncer batch did not "
                                     "complete within BATCH_TIMEOUT (86400 s))" % bouncer_id)
    assert UserBatch.get_by_id(batch).status == "completed"
    assert bouncer.count("finish") == 1


def test_check_fails_an_overdue_batch_whose_finish_bouncer_refuses_while_it_is_queued(app, bouncer):
    batch = send_all(app)
    [bouncer_id] = bouncer.batches
    bouncer.set_status(bouncer_id, "queued")
    BouncerBatch.update(sent_at=utcnow() - datetime.timedelta(seconds=app.settings.batch_timeout + 5)).execute()
    bouncer.fail_next(400, kind="finish", body={"status": "400", "error": "Bad Request",
                                                "message": "batch has to be running to finish"})
    report = run_cycle(app, STATUS, "deliverable")
    assert len(report.failed) == 1 and "BATCH_TIMEOUT" in report.failed[0][1]
    assert "Bouncer refused to finish it" in report.failed[0][1]
    assert statuses(batch) == {RowState.FAILED: 5}
    assert UserBatch.get_by_id(batch).status == "failed"


def test_check_undocumented_status_is_logged_and_left_for_later(app, bouncer, caplog):
    batch = send_all(app)
    [bid] = bouncer.batches
    bouncer.set_status(bid, "paused")
    report = run_cycle(app, STATUS, "deliverable")
    assert report.waiting == 1 and "paused" in caplog.text
    assert BouncerBatch.get().status == BouncerBatchState.OUTSTANDING and statuses(batch) == {SENT: 5}


def test_check_405_on_download_waits_for_next_cycle(app, bouncer):
    batch = send_all(app)
    [bid] = bouncer.batches
    bouncer.set_status(bid, "completed")   # says completed, download not ready yet
    report = run_cycle(app, STATUS, "deliverable")
    assert report.waiting == 1 and statuses(batch) == {SENT: 5}
    bouncer.set_status(bid, None)
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {RowState.DONE: 5}


def test_check_405_saying_the_results_were_removed_is_final(app, bouncer):
    batch = send_all(app)
    [bid] = bouncer.batches
    bouncer.complete_now()
    bouncer.remove_results(bid)
    report = run_cycle(app, STATUS, "deliverable")
    assert len(report.failed) == 1 and "removed" in report.failed[0][1]
    assert BouncerBatch.get().status == "failed" and statuses(batch) == {"failed": 5}
    assert UserBatch.get_by_id(batch).status == "failed"
    assert bouncer.count("download") == 1
    run_cycle(app, STATUS, "deliverable")                 # never asked again
    assert bouncer.count("download") == 1


@pytest.mark.parametrize("spelling", ["Completed", " completed ", "COMPLETED"])
def test_check_reads_the_status_leniently(app, bouncer, spelling):
    batch = send_all(app)
    [bid] = bouncer.batches
    bouncer.complete_now()
    bouncer.set_status(bid, spelling)
    run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {RowState.DONE: 5}


@pytest.mark.parametrize("status", [500, 503, requests.exceptions.ConnectTimeout])
def test_check_transient_error_skips_to_the_next_batch(app, bouncer, status):
    send_all(app, "alice", addresses("a", 25))   # three Bouncer batches
    bouncer.complete_now()
    bouncer.fail_next(status, kind="status")
    report = run_cycle(app, STATUS, "deliverable")
    assert report.errors == 1 and len(report.ingested) == 2
    report = run_cycle(app, STATUS, "deliverable")
    assert len(report.ingested) == 1


def test_check_download_body_not_json_leaves_the_batch_for_next_cycle(app, bouncer):
    batch = send_all(app)
    bouncer.complete_now()
    bouncer.fail_next(200, kind="download", body="<html>oops</html>")
    report = run_cycle(app, STATUS, "deliverable")
    assert report.errors == 1 and statuses(batch) == {SENT: 5}
    run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {RowState.DONE: 5}


@pytest.mark.parametrize("status", [429, 401, 402])
def test_check_rate_limit_or_auth_error_ends_the_cycle(app, bouncer, status):
    send_all(app, "alice", addresses("a", 25))
    bouncer.complete_now()
    bouncer.fail_next(status, kind="status")
    report = run_cycle(app, STATUS, "deliverable")
    assert report.stopped and bouncer.count("status") == 1 and report.ingested == []


def test_check_polls_least_recently_checked_first(app, bouncer):
    send_all(app, "alice", addresses("a", 25))
    order = [b.bouncer_id for b in BouncerBatch.select().order_by(BouncerBatch.id)]
    run_cycle(app, STATUS, "deliverable")
    BouncerBatch.update(last_checked_at=utcnow()).where(BouncerBatch.bouncer_id == order[0]).execute()
    seen = len(bouncer.requests)
    run_cycle(app, STATUS, "deliverable")
    assert polled_since(bouncer, seen) == [order[1], order[2], order[0]]


def polled_since(bouncer, seen):
    return [r["path"].split("/batch/")[1] for r in bouncer.requests[seen:] if r["kind"] == "status"]


def test_check_goes_first_to_the_batch_bouncers_callback_named(app, bouncer):
    send_all(app, "alice", addresses("a", 25))
    first, second, third = BouncerBatch.select().order_by(BouncerBatch.id)
    bouncer.complete_now(third.bouncer_id)
    note_called_back(app.redis, "deliverable", third.id)
    note_called_back(app.redis, "deliverable", 999)       # no such batch: no request for it
    seen = len(bouncer.requests)
    report = run_cycle(app, STATUS, "deliverable")
    assert polled_since(bouncer, seen) == [third.bouncer_id, first.bouncer_id, second.bouncer_id]
    assert [r.ledger_id for r in report.ingested] == [third.id] and report.waiting == 2
    # Each named batch is taken once: the next cycle goes least recently checked first.
    seen = len(bouncer.requests)
    run_cycle(app, STATUS, "deliverable")
    assert polled_since(bouncer, seen) == [first.bouncer_id, second.bouncer_id]


def test_check_again_a_batch_named_after_this_cycle_found_it_running(app, bouncer, monkeypatch):
    send_all(app, "alice", addresses("a", 25))
    first, second, third = BouncerBatch.select().order_by(BouncerBatch.id)
    from bouncer.queue import ledger
    real = ledger.note_checked

    def completes_right_after_its_check(ledger_id, status, **kwargs):
        real(ledger_id, status, **kwargs)
        if ledger_id == first.id and status in ("queued", "processing"):
            bouncer.complete_now(first.bouncer_id)    # and Bouncer calls back
            note_called_back(app.redis, "deliverable", first.id)
    monkeypatch.setattr(ledger, "note_checked", completes_right_after_its_check)
    seen = len(bouncer.requests)
    report = run_cycle(app, STATUS, "deliverable")
    assert polled_since(bouncer, seen) == [first.bouncer_id, first.bouncer_id, second.bouncer_id,
                                           third.bouncer_id]
    assert [r.ledger_id for r in report.ingested] == [first.id] and report.waiting == 2
    assert bouncer.count("download") == 1


def test_check_a_crash_mid_ingest_rolls_back_and_the_next_cycle_redoes_it(app, bouncer, monkeypatch):
    batch = send_all(app)
    bouncer.complete_now()
    from bouncer.queue import progress

    def die(*args, **kwargs):
        raise RuntimeError("killed mid-ingest")
    monkeypatch.setattr(progress, "complete_sent_rows", die)
    with pytest.raises(RuntimeError):
        run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {SENT: 5} and DeliverableResult.select().count() == 0
    monkeypatch.undo()
    run_cycle(app, STATUS, "deliverable")
    assert statuses(batch) == {RowState.DONE: 5}


def test_check_respects_the_request_budget(app, bouncer):
    send_all(app, "alice", addresses("a", 25))
    bouncer.complete_now()
    small = with_settings(app, rate_limit_buffer=3 + 2)  # three creates done, two left
    report = run_cycle(small, STATUS, "deliverable")
    assert "budget" in report.stopped
    assert bouncer.count("status") + bouncer.count("download") == 2


def ingests_waiting_for_downloads(monkeypatch, count_downloads, ahead):
    """Ingest stand-in: the first ingest waits until `1 + ahead` downloads were asked for (and a
    little longer, so that one more would show); records the count seen by each ingest."""
    from bouncer.cycles import ingest
    real, seen = ingest.ingest_download, []

    def waiting_ingest(ledger_id, records, now=None, **options):
        if not seen:
            deadline = time.monotonic() + 10
            while count_downloads() < 1 + ahead and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
        seen.append(count_downloads())
        return real(ledger_id, records, now, **options)
    monkeypatch.setattr(ingest, "ingest_download", waiting_ingest)
    return seen


def downloads_read_in(monkeypatch, tmp_path):
    """The pid of each process that read a download (the forked ones write it to a file)."""
    import os

    from bouncer.cycles import downloads
    real, pids = downloads.read_batch_download, tmp_path / "pids"

    def read(client, batch):
        with open(pids, "a") as f:
            f.write("%d\n" % os.getpid())
        return real(client, batch)
    monkeypatch.setattr(downloads, "read_batch_download", read)
    return lambda: [int(pid) for pid in pids.read_text().split()] if pids.exists() else []


def in_each_download_process(monkeypatch, action):
    """`action(batch)` runs in each forked download process before it reads its download;
    returns the real reader."""
    import os

    from bouncer.cycles import downloads
    cycle_pid, real = os.getpid(), downloads.read_batch_download

    def read(client, batch):
        if os.getpid() != cycle_pid:
            action(batch)
        return real(client, batch)
    monkeypatch.setattr(downloads, "read_batch_download", read)
    return real


def test_a_small_download_is_fetched_and_ingested_by_the_cycle_itself(app, bouncer, monkeypatch, tmp_path):
    import os

    from bouncer.queue import ledger
    send_all(app, "alice", addresses("a", 25))   # three Bouncer batches of 10: below APART_FROM
    bouncer.complete_now()
    seen = ingests_waiting_for_downloads(monkeypatch, lambda: bouncer.count("download"), ahead=0)
    readers = downloads_read_in(monkeypatch, tmp_path)
    order = [b.id for b in ledger.batches_to_check("deliverable")]
    report = run_cycle(app, STATUS, "deliverable")
    assert seen == [1, 2, 3] and [r.ledger_id for r in report.ingested] == order
    assert readers() == [os.getpid()] * 3


def test_a_large_download_is_fetched_by_a_process_of_its_own_while_the_batch_before_it_is_ingested(
        sandbox_app, sandbox, monkeypatch, tmp_path):
    """One download ahead, never two, each read by a forked process; ingested in order."""
    import multiprocessing
    import os

    from bouncer.cycles import downloads
    from bouncer.queue import ledger
    monkeypatch.setattr(downloads, "APART_FROM", 10)
    batch = send_all(sandbox_app, "alice", addresses("a", 25))   # batches of 10, 10 and 5
    sandbox.complete_now()
    seen = ingests_waiting_for_downloads(monkeypatch, lambda: sandbox.count("download"), ahead=1)
    readers = downloads_read_in(monkeypatch, tmp_path)
    order = [b.id for b in ledger.batches_to_check("deliverable")]
    # The first is still under way when the next batch is checked.
    in_each_download_process(monkeypatch, lambda b: b.id == order[0] and time.sleep(0.5))
    report = run_cycle(sandbox_app, STATUS, "deliverable")
    assert seen[0] == 2 and [r.ledger_id for r in report.ingested] == order
    pids = readers()
    assert len(pids) == 3 and pids[2] == os.getpid() and os.getpid() not in pids[:2] and pids[0] != pids[1]
    assert statuses(batch) == {RowState.DONE: 25} and sum(r.verified for r in report.ingested) == 25
    assert multiprocessing.active_children() == []


def test_a_download_that_has_arrived_is_ingested_before_the_running_batches_are_checked(
        sandbox_app, sandbox, monkeypatch):
    """The checks of batches still at Bouncer (each a call) do not hold up a completed one."""
    from bouncer.cycles import downloads, ingest
    from bouncer.queue import ledger
    monkeypatch.setattr(downloads, "APART_FROM", 1)
    send_all(sandbox_app, "alice", addresses("a", 25))   # three Bouncer batches
    first = ledger.batches_to_check("deliverable")[0]
    sandbox.complete_now(first.bouncer_id)                # only the first is done
    events, get_batch, real = [], sandbox_app.client.get_batch, ingest.ingest_download

    def slow_status(check_type, bouncer_id):
        if events:
            time.sleep(0.5)   # Bouncer takes its time; the first download arrives meanwhile
        events.append("status")
        return get_batch(check_type, bouncer_id)

    def ingesting(ledger_id, download, now=None, **options):
        events.append("ingest")
        return real(ledger_id, download, now, **options)
    monkeypatch.setattr(sandbox_app.client, "get_batch", slow_status)
    monkeypatch.setattr(ingest, "ingest_download", ingesting)
    report = run_cycle(sandbox_app, STATUS, "deliverable")
    assert [r.ledger_id for r in report.ingested] == [first.id] and report.waiting == 2
    assert events == ["status", "status", "ingest", "status"]


def test_a_failed_download_fetched_ahead_skips_that_batch_alone(sandbox_app, sandbox, monkeypatch):
    from bouncer.cycles import downloads
    monkeypatch.setattr(downloads, "APART_FROM", 1)
    send_all(sandbox_app, "alice", addresses("a", 25))
    sandbox.complete_now()
    sandbox.fail_next(503, kind="download")   # the first download fails; the others go on
    report = run_cycle(sandbox_app, STATUS, "deliverable")
    assert report.errors == 1 and len(report.ingested) == 2
    assert len(run_cycle(sandbox_app, STATUS, "deliverable").ingested) == 1


def test_a_download_process_that_dies_leaves_its_batch_for_the_next_cycle(sandbox_app, sandbox, monkeypatch,
                                                                           caplog):
    import os

    from bouncer.cycles import downloads
    monkeypatch.setattr(downloads, "APART_FROM", 1)
    batch = send_all(sandbox_app, "alice", addresses("a", 25))
    sandbox.complete_now()
    # The last batch's process is killed, as the OOM killer would.
    real = in_each_download_process(monkeypatch, lambda b: b.quantity == 5 and os.kill(os.getpid(), 9))
    report = run_cycle(sandbox_app, STATUS, "deliverable")
    assert report.errors == 1 and len(report.ingested) == 2
    assert "ended without an answer (exit -9)" in caplog.text
    monkeypatch.setattr(downloads, "read_batch_download", real)
    assert len(run_cycle(sandbox_app, STATUS, "deliverable").ingested) == 1
    assert statuses(batch) == {RowState.DONE: 25}


def test_a_cycle_that_ends_early_ends_the_download_process_it_will_not_ingest(sandbox_app, sandbox,
                                                                              monkeypatch):
    import multiprocessing

    from bouncer.cycles import downloads
    monkeypatch.setattr(downloads, "APART_FROM", 1)
    batch = send_all(sandbox_app, "alice", addresses("a", 25))
    sandbox.complete_now()
    from bouncer.queue import ledger
    second = [b.id for b in ledger.batches_to_check("deliverable")][1]
    # The second is still under way when the cycle ends.
    in_each_download_process(monkeypatch, lambda b: b.id == second and time.sleep(30))
    sandbox.fail_next(401, kind="download")   # the first download ends the cycle
    started = time.monotonic()
    report = run_cycle(sandbox_app, STATUS, "deliverable")
    assert report.refused[0] == 401 and report.ingested == []
    assert multiprocessing.active_children() == [] and time.monotonic() - started < 20
    monkeypatch.undo()
    assert len(run_cycle(sandbox_app, STATUS, "deliverable").ingested) == 3
    assert statuses(batch) == {RowState.DONE: 25}


def test_a_cycle_told_to_stop_ingests_what_it_downloaded_and_leaves_the_rest(app, bouncer, monkeypatch):
    batch = send_all(app, "alice", addresses("a", 25))   # three Bouncer batches
    bouncer.complete_now()
    from bouncer.cycles import ingest
    from bouncer.cycles.runner import SHUTDOWN
    real = ingest.ingest_download

    def ingest_then_stop(ledger_id, records, now=None, **options):
        SHUTDOWN.set()
        return real(ledger_id, records, now, **options)
    monkeypatch.setattr(ingest, "ingest_download", ingest_then_stop)
    try:
        report = run_cycle(app, STATUS, "deliverable")
    finally:
        SHUTDOWN.clear()
    assert report.stopped == "shutdown requested" and 1 <= len(report.ingested) < 3
    assert bouncer.count("download") == len(report.ingested)   # no download asked for in vain
    monkeypatch.undo()
    assert len(run_cycle(app, STATUS, "deliverable").ingested) == 3 - len(report.ingested)
    assert statuses(batch) == {RowState.DONE: 25}


@pytest.mark.parametrize("status", [429, 401])
def test_a_status_call_that_ends_the_cycle_still_lets_the_download_before_it_be_ingested(
        app, bouncer, monkeypatch, status):
    send_all(app, "alice", addresses("a", 25))   # three Bouncer batches
    bouncer.complete_now()
    real, calls = app.client.get_batch, []

    def get_batch(check_type, bouncer_id):
        calls.append(bouncer_id)
        if len(calls) == 2:      # the second batch's status call is refused
            bouncer.fail_next(status, kind="status")
        return real(check_type, bouncer_id)
    monkeypatch.setattr(app.client, "get_batch", get_batch)
    report = run_cycle(app, STATUS, "deliverable")
    assert report.stopped and len(calls) == 2
    assert len(report.ingested) == 1 and bouncer.count("download") == 1


def test_a_user_batch_riding_on_two_bouncer_batches_ends_only_when_both_are_ingested(app, bouncer):
    from bouncer.reading.batches import batch_status, recent_batches
    alice = send_all(app, "alice", addresses("a", 15))   # batch size 10: two Bouncer batches
    first, second = [b.bouncer_id for b in BouncerBatch.select().order_by(BouncerBatch.id)]
    bouncer.complete_now(first)
    run_cycle(app, STATUS, "deliverable")
    # Ten rows have their verdicts; five still ride on the second batch, so it has not ended.
    assert batch_status(alice)["status"] == "processing"
    assert batch_status(alice)["counts"]["pending"] == 5
    assert [(b["batch_id"], b["done"]) for b in recent_batches()] == [(alice, 10)]
    bouncer.complete_now(second)
    run_cycle(app, STATUS, "deliverable")
    assert batch_status(alice)["status"] == "completed"
    assert [(b["batch_id"], b["done"]) for b in recent_batches()] == [(alice, 15)]


def indexes_reading(table, column):
    """The definitions of the indexes on `table` that name `column`, from the database's own
    catalogue (SQLite: sqlite_master; PostgreSQL: pg_indexes)."""
    from conftest import on_postgres

    from bouncer.store.database import database
    if on_postgres():
        found = database.execute_sql("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,)).fetchall()
    else:
        found = database.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
                                     " AND sql IS NOT NULL", (table,)).fetchall()
    return [d for (d,) in found if re.search(r"\b%s\b" % column, d)]


def test_no_index_of_the_rows_reads_their_status_so_ending_one_touches_no_index(app):
    # Ending a row changes its status, completed_at and bouncer_batch_id: an index on any of
    # them (or a partial one whose predicate names them) is an entry written per row ended.
    for column in ("status", "completed_at", "bouncer_batch_id"):
        assert indexes_reading("user_batch_emails", column) == []


def test_rows_ended_by_an_ingest_stay_on_their_page_and_leave_it_no_room_for_a_new_row_on_postgres(
        app, bouncer, no_autovacuum):
    if not on_postgres():
        pytest.skip("HOT updates, pages and fillfactor are PostgreSQL's")
    # Rows written, admitted and ended by the service's own cycles, in batches of addresses of
    # 15 to 30 characters. Every row's end is rewritten on its own page with no new index entry
    # (a HOT update; with every page full, or an index reading the status, none would be): no
    # version left its page.
    # Vacuumed, as autovacuum does, no page keeps room for a new row (a host's row with the
    # shortest of these addresses), so rows submitted after a long history are written together
    # at the table's end rather than one or two on each page of ended rows. (A snapshot held
    # meanwhile, an autovacuum's ANALYZE as well as any other long transaction, keeps the
    # earlier versions on their pages: then a fifth of the ended versions move.)
    database.execute_sql("CREATE EXTENSION IF NOT EXISTS pg_freespacemap")
    # From a table made anew, as in a new database: the rows an earlier test deleted (kept in
    # its pages until a vacuum, which the free-space map does not know of) would leave fewer
    # new rows on those pages, and room on them once vacuumed.
    database.execute_sql("TRUNCATE user_batch_emails")
    app = with_settings(app, batch_size=4000)

    def updates():
        return postgres_statistics("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                                   " WHERE relname = 'user_batch_emails'")

    for user, name, count in (("alice", "a%d", 4000), ("bob", "firstlast.%dh", 4000), ("carol", "name+%d", 3000)):
        send_all(app, user, ["%s@example-%d.com" % (name % i, i % 50) for i in range(count)])
        bouncer.complete_now()
        # The admission's versions of the rows can be pruned only once no transaction that
        # began before it is open.
        wait_for_older_transactions()
        before = updates()
        assert run_cycle(app, STATUS, "deliverable").ingested[0].verified == count
        updated, in_place = (after - was for after, was in zip(updates(), before))
        assert updated == in_place == count, (user, updated, in_place)
    wait_for_older_transactions()
    database.execute_sql("VACUUM user_batch_emails")
    new_row = database.execute_sql("SELECT pg_column_size(ROW(1, 1, 1, 'a0@example-0.com'::text, 'new'::text,"
                                   " NULL::int, NULL::text, NULL::int, NULL::int, NULL::text,"
                                   " NULL::timestamp, 0))").fetchone()[0]
    kept = 8192 * (100 - ROWS_FILLFACTOR) // 100
    roomy = database.execute_sql(
        "SELECT count(*) FROM pg_freespace('user_batch_emails') WHERE avail >= %s AND blkno IN"
        " (SELECT DISTINCT (ctid::text::point)[0]::bigint FROM user_batch_emails)", (kept + new_row,)).fetchone()[0]
    # Only the last page each batch's rows were written to, which they did not fill.
    assert roomy <= 3, (roomy, kept, new_row)
