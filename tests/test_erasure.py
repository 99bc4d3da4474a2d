"""Erasure on request (design.md, "Personal data"): `forget --user`, `forget --email` and
`DELETE /api/v1/batches/{id}`, each checked against a dump of every table on both databases:
nothing of theirs left, everything of others intact, one credit per mailbox still right for the
remaining holder; the audit without the erased value; bad input refused with nothing erased;
and on SQLite, nothing left readable in the database's files."""
import json
import os

import pytest
from clirun import invoke
from conftest import assert_clean_failure, current_app_with, on_postgres, statuses, submit, with_settings

from bouncer.cycles.runner import run_cycle
from bouncer.doors.loading import create_user_batch
from bouncer.names import CREATION, STATUS
from bouncer.queue.audit import fingerprint
from bouncer.queue.fairness import set_weight, stored_weight
from bouncer.queue.progress import cancel_batch
from bouncer.reading.batches import batch_status, iter_results
from bouncer.services import erasure as erasure_service
from bouncer.services.idempotency import remember
from bouncer.store.database import database, utcnow
from bouncer.store.models import (
    AuditEntry, BouncerBatchEmail, DeliverableResult, EmailGlobal, UserBatch, UserBatchEmail,
    WebhookDelivery,
)
from bouncer.web import create_web_app
from bouncer.web.tenants import token_digest
from support import invariants

KEY = "erasure-key-0f1e2d3c4b5a6978"
TOKEN = "tok-host-app-3f9a2c71"


@pytest.fixture
def keyed(app):
    """The test's App with ERASURE_AUDIT_KEY set (the CLI's App too)."""
    yield from current_app_with(app, erasure_audit_key=KEY)


def dump():
    """Every row of every table, as text: {table: [row, ...]}."""
    tables = sorted(database.get_tables())
    return {t: sorted(map(repr, database.execute_sql('SELECT * FROM "%s"' % t).fetchall())) for t in tables}


def holding(fragment, tables=None):
    """(table, row) of every row, of every table, whose text holds `fragment` (any case)."""
    tables = tables or dump()
    return [(t, row) for t, rows in tables.items() for row in rows if fragment.lower() in row.lower()]


def rows_of(user_id):
    """A user's batches and rows, as stored."""
    batches = list(UserBatch.select().where(UserBatch.user_id == user_id).order_by(UserBatch.id).dicts())
    rows = list(UserBatchEmail.select().where(UserBatchEmail.batch.in_([b["id"] for b in batches]))
                .order_by(UserBatchEmail.id).dicts())
    return batches, rows


def verdict_of(address):
    gid = EmailGlobal.select(EmailGlobal.id).where(EmailGlobal.email == address).scalar()
    return DeliverableResult.get_or_none(DeliverableResult.email_global == gid)


def create_and_ingest(app, bouncer):
    run_cycle(app, CREATION, "deliverable")
    bouncer.complete_now()
    run_cycle(app, STATUS, "deliverable")


def alice_and_bob(app, bouncer):
    """Alice and Bob share two mailboxes, spelt their own way, Alice's rows first, so her
    spellings are the ones sent: one verified already, one in flight now. Alice also has an
    address of her own in each, a catchall batch still in line and an API idempotency record."""
    ids = {"a1": submit("alice", ["Jane.Doe+alice@gmail.com", "only.alice@example.com"]),
           "b1": submit("bob", ["janedoe@gmail.com", "bob1@example.com"])}
    create_and_ingest(app, bouncer)
    ids["a2"] = submit("alice", ["Flight.Shared+alice@gmail.com", "flight.alice@example.com"])
    ids["b2"] = submit("bob", ["flightshared@gmail.com"])
    run_cycle(app, CREATION, "deliverable")
    ids["a3"] = submit("alice", ["catch.alice@example.com"], check_type="catchall")
    remember("digest-of-a-token", "order-1", "digest-of-a-request", ids["a1"], [], utcnow())
    return ids


def test_forget_user_leaves_nothing_of_theirs_and_everything_of_others(keyed, bouncer):
    ids = alice_and_bob(keyed, bouncer)
    assert bouncer.sent_addresses()[-2:] == ["Flight.Shared+alice@gmail.com", "flight.alice@example.com"]
    assert "Jane.Doe+alice@gmail.com" in verdict_of("janedoe@gmail.com").raw
    assert holding("alice") and WebhookDelivery.select().where(WebhookDelivery.batch_id == ids["a1"]).exists()
    bob_batches, bob_rows = rows_of("bob")
    set_weight("alice", 3)
    set_weight("bob", 2)

    outcome = erasure_service.forget_user(keyed, "alice", who="test")

    erased = outcome.erased
    # Three batches: one ended, one in flight, one in line; a delivery each (the last two's
    # written by their cancel, and gone with it); the API's idempotency record of the first;
    # her weight (Bob's stays).
    assert (erased.batches, erased.rows, erased.cancelled, erased.deliveries, erased.keys, erased.weights) \
        == (3, 5, 3, 3, 1, 1)
    assert stored_weight("alice") is None and stored_weight("bob") == 2
    assert holding("alice") == [] and holding("only.alice") == []
    assert rows_of("bob") == (bob_batches, bob_rows)           # Bob's batches and rows untouched
    # Bob's mailboxes stay, under his spellings: in the verdict already stored and in flight.
    assert json.loads(verdict_of("janedoe@gmail.com").raw)["email"] == "janedoe@gmail.com"
    assert [s for (s,) in BouncerBatchEmail.select(BouncerBatchEmail.email_sent).tuples()] \
        == ["flightshared@gmail.com"]
    assert [r["email"] for r in iter_results(ids["b1"])] == ["janedoe@gmail.com", "bob1@example.com"]

    # The batch in flight comes back holding Alice's spellings: no cycle fails, Bob's row gets
    # its verdict, stored under his spelling, and Alice's own address is not stored again.
    bouncer.complete_now()
    report = run_cycle(keyed, STATUS, "deliverable")
    assert report.ingested[0].verified == 1 and report.ingested[0].extra == 1
    assert batch_status(ids["b2"])["status"] == "completed" and statuses(ids["b2"]) == {"done": 1}
    assert json.loads(verdict_of("flightshared@gmail.com").raw)["email"] == "flightshared@gmail.com"
    assert holding("alice") == [] and verdict_of("flight.alice@example.com") is None
    assert invariants.every_email_finished() == []

    # One credit per mailbox, still: the mailbox Bob holds answers a third user from the cache.
    carol = submit("carol", ["JaneDoe@googlemail.com"])
    run_cycle(keyed, CREATION, "deliverable")
    assert statuses(carol) == {"done": 1} and bouncer.count("create") == 2


def test_forget_user_with_rows_of_every_state(keyed, bouncer):
    """A batch not yet admitted (a host's), one partly sent, one cancelled: all go, the line and
    the riding rows with them, and the cycles carry on with the others."""
    from operating import host_batch
    keep = submit("bob", ["b%d@example.com" % i for i in range(12)])
    sent = submit("alice", ["a%d@example.com" % i for i in range(25)])
    run_cycle(keyed, CREATION, "deliverable")                      # 3 batches of 10 in flight
    host_batch("alice", ["host.alice@example.com", "nope"])
    cancel_batch(submit("alice", ["c.alice@example.com"]))

    erasure_service.forget_user(keyed, "alice", who="test")

    assert holding("alice") == [] and UserBatch.select().where(UserBatch.id == sent).count() == 0
    assert invariants.queue_matches_rows() == []
    for _ in range(4):
        create_and_ingest(keyed, bouncer)
    assert batch_status(keep)["status"] == "completed" and statuses(keep) == {"done": 12}
    assert invariants.every_email_finished() == [] and holding("a1@example.com") == []


def test_forget_email_blanks_every_spelling_and_keeps_positions_and_counts(keyed, bouncer):
    from operating import host_batch
    alice = submit("alice", ["Jane.Doe+x@gmail.com", "keep@example.com", "jane.doe@gmail.com"])
    bob = submit("bob", ["janedoe@googlemail.com", "bob@example.com"])
    create_and_ingest(keyed, bouncer)
    carol = submit("carol", ["JANEDOE@gmail.com"])                 # in line, not yet sent
    host = host_batch("dave", ["jane.doe+host@gmail.com", "dave@example.com"])   # not yet admitted
    before = batch_status(alice)
    others = dump()["email_deliverable_results"]

    outcome = erasure_service.forget_email(keyed, "JaneDoe@GMAIL.com", who="test")

    assert outcome.erased.rows == 5 and outcome.erased.addresses == 1 and outcome.erased.verdicts == 1
    assert holding("jane") == [] and holding("janedoe") == []
    after = batch_status(alice)
    assert after["total"] == before["total"] == 3 and sum(after["counts"].values()) == 3
    assert after["counts"]["failed"] == 2 and after["status"] == "completed"
    results = list(iter_results(alice))
    assert [(r["email"], r["status"], r["reason"]) for r in results][::2] == [
        ("", "failed", "erased on request"), ("", "failed", "erased on request")]
    assert results[1]["email"] == "keep@example.com" and results[1]["status"] != "failed"
    assert batch_status(carol)["status"] == "completed"            # its one row was the address
    assert [r["email"] for r in iter_results(host)] == ["", "dave@example.com"]
    # Everything else is as it was: the other verdicts, the other rows.
    assert len(dump()["email_deliverable_results"]) == len(others) - 1
    assert [r["email"] for r in iter_results(bob)] == ["", "bob@example.com"]
    for _ in range(2):
        create_and_ingest(keyed, bouncer)
    assert statuses(host) == {"failed": 1, "done": 1} and invariants.every_email_finished() == []
    assert holding("jane") == []


def test_erasure_is_audited_without_the_erased_value(keyed, bouncer):
    submit("alice", ["Jane.Doe+x@gmail.com"])
    submit("bob", ["bob@example.com"])
    create_and_ingest(keyed, bouncer)
    erasure_service.forget_user(keyed, "alice", who="cli:ops")
    erasure_service.forget_email(keyed, "bob@example.com", who="operator")

    entries = list(AuditEntry.select().order_by(AuditEntry.id).dicts())
    assert [(e["who"], e["action"]) for e in entries] == [("cli:ops", "forget user"), ("operator", "forget address")]
    assert entries[0]["target"] == fingerprint("user", "alice", KEY)
    assert entries[1]["target"] == fingerprint("address", "bob@example.com", KEY)
    assert "1 user batch(es), 1 row(s)" in entries[0]["detail"]
    for value in ("alice", "jane", "bob@example.com", KEY):
        assert holding(value, {"audit_log": dump()["audit_log"]}) == []
    # A later request for the same person is matched, and said to have been erased before.
    result = invoke(["forget", "--user", "alice"])
    line = assert_clean_failure(result, "no user batch of user 'alice'", "erased before: ")
    assert entries[0]["at"].isoformat(sep=" ", timespec="seconds") in line
    result = invoke(["forget", "--email", "BOB@example.com"])
    assert_clean_failure(result, "nothing holds 'BOB@example.com'", "erased before: ")


def test_without_a_key_the_audit_keeps_no_hash(app, bouncer):
    submit("alice", ["a@example.com"])
    result = invoke(["forget", "--user", "alice"])
    assert result.exit_code == 0, result.output
    assert "audit: kept without a hash (ERASURE_AUDIT_KEY is unset)" in result.stdout
    entry = AuditEntry.get()
    assert entry.target.startswith("(no ERASURE_AUDIT_KEY") and "alice" not in repr(entry.__data__)


@pytest.mark.parametrize("args, fragments", [
    (["--user", "nobody"], ["no user batch of user 'nobody': nothing to erase"]),
    (["--user", "   "], ["a user id is required"]),
    (["--email", "not an address"], ["not an email address: 'not an address'"]),
    (["--email", "jane@"], ["not an email address: 'jane@'"]),
    (["--email", "nobody@example.com"], ["nothing holds 'nobody@example.com' in any spelling"]),
])
def test_bad_input_is_one_line_exit_1_and_nothing_erased(keyed, bouncer, args, fragments):
    submit("alice", ["a@example.com", "b@example.com"])
    create_and_ingest(keyed, bouncer)
    before = dump()
    result = invoke(["forget", *args])
    assert_clean_failure(result, *fragments)
    assert dump() == before


@pytest.mark.parametrize("args", [[], ["--user", "a", "--email", "a@example.com"]])
def test_forget_wants_exactly_one_of_user_and_email(app, args):
    result = invoke(["forget", *args])
    assert result.exit_code == 2 and "give --user USER or --email ADDRESS" in result.stderr


def test_forget_json_and_text_output(keyed, bouncer):
    submit("alice", ["a@example.com", "b@example.com"])
    result = invoke(["forget", "--user", "alice", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["erased"]["rows"] == 2 and answer["erased"]["batches"] == 1
    assert answer["audit"] == fingerprint("user", "alice", KEY) and answer["note"] is None


def test_a_batch_still_being_written_is_refused_and_nothing_erased(keyed):
    from bouncer.doors.loading import Loader
    done = submit("alice", ["a@example.com"])
    loader = Loader("alice", "deliverable", source="cli")
    loader.write([(1, "b@example.com")])
    before = dump()
    with pytest.raises(erasure_service.Conflict, match="still being written"):
        erasure_service.forget_user(keyed, "alice", who="test")
    assert dump() == before
    loader.finish()
    erasure_service.forget_user(keyed, "alice", who="test")
    assert UserBatch.select().where(UserBatch.id.in_([done, loader.batch_id])).count() == 0


# -- the HTTP API --

@pytest.fixture
def client(keyed):
    return create_web_app(with_settings(keyed, api_tokens=(TOKEN,))).test_client()


def auth():
    return {"Authorization": "Bearer %s" % TOKEN}


def tokens_batch(user_id, emails):
    """A user batch made by the test's API token (its tenant's)."""
    return create_user_batch(user_id, "deliverable", emails, api_token_digest=token_digest(TOKEN)).batch_id


def test_delete_erases_one_batch_of_the_caller(client, keyed, bouncer):
    mine = tokens_batch("alice", ["Jane.Doe+a@gmail.com", "a@example.com"])
    other = tokens_batch("alice", ["janedoe@gmail.com"])
    create_and_ingest(keyed, bouncer)
    response = client.delete("/api/v1/batches/%d" % mine, headers=auth())
    assert response.status_code == 204 and response.data == b""
    assert client.get("/api/v1/batches/%d" % mine, headers=auth()).status_code == 404
    assert client.delete("/api/v1/batches/%d" % mine, headers=auth()).get_json() == {"error": "not found"}
    assert holding("Jane.Doe+a") == [] and holding("a@example.com") == []
    assert [r["email"] for r in client.get("/api/v1/batches/%d/results" % other, headers=auth()).get_json()] \
        == ["janedoe@gmail.com"]
    assert json.loads(verdict_of("janedoe@gmail.com").raw)["email"] == "janedoe@gmail.com"
    entry = AuditEntry.get()
    assert (entry.action, entry.target) == ("erase batch", "user batch %d" % mine)
    assert entry.who.startswith("api:token ") and TOKEN not in entry.who


def test_delete_needs_the_token_and_refuses_a_batch_being_written(client, keyed):
    from bouncer.doors.loading import Loader
    loader = Loader("alice", "deliverable", source="api", api_token_digest=token_digest(TOKEN))
    loader.write([(1, "b@example.com")])
    assert client.delete("/api/v1/batches/%d" % loader.batch_id).status_code == 401
    response = client.delete("/api/v1/batches/%d" % loader.batch_id, headers=auth())
    assert response.status_code == 409 and "still being written" in response.get_json()["error"]
    assert UserBatchEmail.select().count() == 1


def test_openapi_describes_the_delete(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    operation = spec["paths"]["/api/v1/batches/{batch_id}"]["delete"]
    assert set(operation["responses"]) >= {"204", "401", "404", "409"}
    assert "410" in spec["paths"]["/api/v1/batches/{batch_id}/results"]["get"]["responses"]


# -- what the files keep --

def test_sqlite_keeps_no_readable_copy_of_an_erased_address(keyed, bouncer, database_url):
    if on_postgres():
        pytest.skip("PostgreSQL keeps dead rows until a vacuum: docs/operating.md says what to do")
    marker = "zq.erasure.marker"
    submit("alice", ["%s.%d@example.com" % (marker, i) for i in range(300)] + ["keep@example.com"])
    submit("bob", ["bob@example.com"])
    create_and_ingest(keyed, bouncer)
    run_cycle(keyed, CREATION, "deliverable")
    path = database_url[len("sqlite:///"):]
    assert any(marker.encode() in read(p) for p in (path, path + "-wal"))
    outcome = erasure_service.forget_user(keyed, "alice", who="test")
    assert outcome.note is None
    for p in (path, path + "-wal"):
        assert marker.encode() not in read(p), p
    assert b"bob@example.com" in read(path) + read(path + "-wal")


def read(path):
    if not os.path.exists(path):
        return b""
    with open(path, "rb") as f:
        return f.read()


# -- erasure while the cycles run --

def references_that_dangle():
    """Rows of the queue's tables pointing at a row or an address that no longer exists."""
    checks = {
        "line rows without their row": "SELECT count(*) FROM queued_emails q WHERE NOT EXISTS"
                                       " (SELECT 1 FROM user_batch_emails e WHERE e.id = q.row_id)",
        "rows naming no address": "SELECT count(*) FROM user_batch_emails e WHERE e.email_global_id IS NOT NULL"
                                  " AND NOT EXISTS (SELECT 1 FROM emails_global g WHERE g.id = e.email_global_id)",
        "addresses in flight unknown": "SELECT count(*) FROM bouncer_batch_emails b WHERE NOT EXISTS"
                                       " (SELECT 1 FROM emails_global g WHERE g.id = b.email_global_id)",
        "rows of no batch": "SELECT count(*) FROM user_batch_emails e WHERE NOT EXISTS"
                            " (SELECT 1 FROM user_batches b WHERE b.id = e.batch_id)",
    }
    for table in ("email_deliverable_results", "email_catchall_results"):
        checks["verdicts of no address (%s)" % table] = (
            "SELECT count(*) FROM %s r WHERE NOT EXISTS (SELECT 1 FROM emails_global g WHERE g.id = r.email_global_id)"
            % table)
    found = {what: database.execute_sql(sql).fetchone()[0] for what, sql in checks.items()}
    riders = [row_id for _, row_id in invariants.riding()]
    existing = {r for (r,) in UserBatchEmail.select(UserBatchEmail.id).tuples()}
    found["riding rows that do not exist"] = len(set(riders) - existing)
    return {what: n for what, n in found.items() if n}


def test_forget_between_a_reservation_and_its_bouncer_call(keyed, bouncer):
    """The creation cycle reserved alice's and bob's rows and is calling Bouncer when alice is
    erased: the call carries her spelling (it left before), the cycle ends well, and what comes
    back is stored under bob's."""
    submit("alice", ["Jane.Doe+alice@gmail.com", "mine.alice@example.com"])
    bob = submit("bob", ["janedoe@gmail.com"])
    create = keyed.client.create_batch

    def create_while_forgetting(*args, **kwargs):
        erasure_service.forget_user(keyed, "alice", who="test")
        return create(*args, **kwargs)

    keyed.client.create_batch = create_while_forgetting
    try:
        report = run_cycle(keyed, CREATION, "deliverable")
    finally:
        keyed.client.create_batch = create
    assert len(report.created) == 1 and report.failed_calls == []
    assert holding("alice") == [] and references_that_dangle() == {}
    bouncer.complete_now()
    assert run_cycle(keyed, STATUS, "deliverable").ingested[0].verified == 1
    assert statuses(bob) == {"done": 1} and holding("alice") == []
    assert json.loads(verdict_of("janedoe@gmail.com").raw)["email"] == "janedoe@gmail.com"


def test_forget_waits_for_an_ingest_under_way_and_ingest_for_it(keyed, bouncer, monkeypatch):
    """An erasure started while an ingest holds its transaction waits for it (SQLite's write
    lock; PostgreSQL: the Bouncer batch's row), then removes what the ingest stored."""
    import threading

    from bouncer.cycles import ingest
    submit("alice", ["Jane.Doe+alice@gmail.com", "mine.alice@example.com"])
    bob = submit("bob", ["janedoe@gmail.com", "bob@example.com"])
    run_cycle(keyed, CREATION, "deliverable")
    bouncer.complete_now()
    upsert, outcomes = ingest.upsert_results, []

    def forget_in_another_thread(*args, **kwargs):
        upsert(*args, **kwargs)
        thread = threading.Thread(target=lambda: outcomes.append(forget_apart(keyed, "alice")))
        thread.start()
        thread.join(0.5)                  # it waits for this transaction, so it cannot end yet
        outcomes.append("ingest still under way" if thread.is_alive() else "the erasure did not wait")
        forget_in_another_thread.thread = thread

    monkeypatch.setattr(ingest, "upsert_results", forget_in_another_thread)
    report = run_cycle(keyed, STATUS, "deliverable")
    forget_in_another_thread.thread.join(30)
    assert outcomes[0] == "ingest still under way" and outcomes[1].erased.rows == 2
    assert report.ingested[0].verified == 4
    assert holding("alice") == [] and references_that_dangle() == {}
    assert statuses(bob) == {"done": 2}
    assert json.loads(verdict_of("janedoe@gmail.com").raw)["email"] == "janedoe@gmail.com"


def forget_apart(app, user_id):
    """forget_user on a connection of this thread's own."""
    from bouncer.store.database import connection
    with connection():
        return erasure_service.forget_user(app, user_id, who="test")


def test_erasures_beside_running_cycles_leave_nothing_half_done(sandbox_app, sandbox):
    """Cycles run non-stop in a thread, Bouncer completing every batch at once, while users are
    erased, one address too: no cycle fails, nothing of theirs is left, nothing dangles, and
    every other row ends with its verdict."""
    import threading

    from bouncer.names import CHECK_TYPES
    from bouncer.store.database import connection
    app = with_settings(sandbox_app, batch_size=15, rate_limit_per_minute=100000, rate_limit_buffer=100000,
                        erasure_audit_key=KEY)
    pool = ["shared%d@example.com" % i for i in range(20)] + ["Jane.Doe+%d@gmail.com" % i for i in range(3)]
    users = ["user%d" % i for i in range(5)]
    for n, user in enumerate(users):
        for check_type in CHECK_TYPES:
            own = ["own.%s.%s%d@example.com" % (user, check_type, i) for i in range(12)]
            submit(user, own[:6] + pool[n::2] + own[6:], check_type=check_type)
    failures, stop = [], threading.Event()

    def run_cycles():
        with connection():
            while not stop.is_set():
                try:
                    for kind in (CREATION, STATUS):
                        for check_type in CHECK_TYPES:
                            run_cycle(app, kind, check_type)
                        sandbox.complete_now()
                except Exception as exc:       # a cycle that fails is what this test looks for
                    failures.append(exc)

    thread = threading.Thread(target=run_cycles)
    thread.start()
    try:
        for user in ("user1", "user3"):
            erasure_service.forget_user(app, user, who="test")
        erasure_service.forget_email(app, "shared4@example.com", who="test")
        submit("late", pool[5:10])
        erasure_service.forget_user(app, "user0", who="test")
    finally:
        stop.set()
        thread.join(120)
    assert failures == [] and not thread.is_alive()
    assert references_that_dangle() == {} and invariants.queue_matches_rows() == []
    for _ in range(10):
        for kind in (CREATION, STATUS):
            for check_type in CHECK_TYPES:
                run_cycle(app, kind, check_type)
            sandbox.complete_now()
    assert invariants.every_email_finished() == [] and invariants.no_address_in_two_in_flight_batches() == []
    assert references_that_dangle() == {}
    for gone in ("user1", "user3", "user0", "own.user1.", "own.user3.", "own.user0.", "shared4@"):
        assert holding(gone) == [], gone
    left = UserBatch.select().where(UserBatch.user_id.in_(["user2", "user4", "late"]))
    assert {b.status for b in left} == {"completed"} and left.count() == 5
    assert {r["status"] for b in left for r in iter_results(b.id)} <= {"deliverable", "risky", "undeliverable",
                                                                       "unknown", "failed"}
