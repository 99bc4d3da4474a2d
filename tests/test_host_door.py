"""The SQL door: user batches a host application writes with plain SQL (Python's sqlite3 and
psycopg2 directly, no project code), admitted by the queue itself (design.md, "Host
applications"; invariant 9)."""
import contextlib
import datetime
import sqlite3

import psycopg2
import pytest
from conftest import on_postgres, postgres_statistics

from bouncer.cycles.runner import run_cycle
from bouncer.doors.admission import (
    DEAD_ADMITTER_AFTER, SLICE, AdmissionReport, admit, admit_batch, admit_slice, claim_admission,
    finish_admission, release_admission,
)
from bouncer.doors.loading import create_user_batch
from bouncer.names import CREATION, STATUS
from bouncer.queue import progress
from bouncer.reading.batches import batch_status, iter_results
from bouncer.store.database import database, utcnow, write_transaction
from bouncer.store.models import UserBatch

RESULT_VIEW_COLUMNS = ["batch_id", "position", "email", "status", "reason", "score", "accept_all",
                       "disposable", "free", "role", "disabled", "full_mailbox", "provider",
                       "checked_at"]


class Host:
    """A host application's own connection to the shared database: plain driver calls."""

    def __init__(self, database_url):
        self.postgres = database_url.startswith("postgres")
        if self.postgres:
            self.conn = psycopg2.connect(database_url)
        else:
            self.conn = sqlite3.connect(database_url[len("sqlite:///"):], timeout=10)
        self.mark = "%s" if self.postgres else "?"

    def sql(self, statement):
        return statement.replace("?", self.mark)

    def run(self, statement, params=()):
        with contextlib.closing(self.conn.cursor()) as cur:
            cur.execute(self.sql(statement), params)
            rows = cur.fetchall() if cur.description else None
        self.conn.commit()
        return rows

    def write_batch(self, user_id, check_type, rows, status=None):
        """One transaction, as design.md shows: the batch, then its rows (position, email)."""
        with contextlib.closing(self.conn.cursor()) as cur:
            if status:
                cur.execute(self.sql("INSERT INTO user_batches (user_id, check_type, status) VALUES (?, ?, ?)"
                                     " RETURNING id"), (user_id, check_type, status))
            else:
                cur.execute(self.sql("INSERT INTO user_batches (user_id, check_type) VALUES (?, ?) RETURNING id"),
                            (user_id, check_type))
            (batch_id,) = cur.fetchone()
            cur.executemany(self.sql("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, ?, ?)"),
                            [(batch_id, position, email) for position, email in rows])
        self.conn.commit()
        return batch_id

    def refused(self, statement, params=()):
        """The database refuses `statement`: the error's text (nothing was written)."""
        errors = (psycopg2.Error,) if self.postgres else (sqlite3.Error,)
        with pytest.raises(errors) as caught:
            self.run(statement, params)
        self.conn.rollback()
        return str(caught.value)

    def results(self, batch_id):
        with contextlib.closing(self.conn.cursor()) as cur:
            cur.execute(self.sql("SELECT * FROM user_batch_results WHERE batch_id = ? ORDER BY position"),
                        (batch_id,))
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, row)) for row in cur.fetchall()]
        self.conn.commit()
        return names, rows

    def batch(self, batch_id):
        with contextlib.closing(self.conn.cursor()) as cur:
            cur.execute(self.sql("SELECT status, total, invalid, duplicates, completed_at, failure_reason,"
                                 " created_at FROM user_batches WHERE id = ?"), (batch_id,))
            row = cur.fetchone()
        self.conn.commit()
        return dict(zip(("status", "total", "invalid", "duplicates", "completed_at", "failure_reason",
                         "created_at"), row))

    def close(self):
        self.conn.close()


@pytest.fixture
def host(database_url, db):
    h = Host(database_url)
    yield h
    h.close()


def verify_everything(app, bouncer, rounds=5):
    """Creation cycles, Bouncer finishing every batch, status cycles, until nothing is left."""
    for _ in range(rounds):
        for check_type in ("deliverable", "catchall"):
            run_cycle(app, CREATION, check_type)
        bouncer.complete_now()
        for check_type in ("deliverable", "catchall"):
            run_cycle(app, STATUS, check_type)


# Out of position order, a cross-user repeat (bob also has Shared@...), a Gmail spelling of
# the same mailbox as the next row, and an invalid row.
ALICE_ROWS = [(3, "jane.doe+news@gmail.com"), (1, "Shared@Example.com"), (4, "janedoe@googlemail.com"),
              (2, "not-an-address"), (5, "alice.only@example.org")]


def test_host_batch_is_admitted_verified_and_read_from_the_view(app, bouncer, host):
    alice = host.write_batch("alice", "deliverable", ALICE_ROWS)
    bob = host.write_batch("bob", "deliverable", [(1, "shared@example.com")])
    carol = host.write_batch("carol", "catchall", [(1, "shared@example.com"), (2, "c@example.net")])
    assert host.batch(alice)["status"] == "new"
    assert [row["status"] for row in host.results(alice)[1]] == ["pending"] * 5   # not admitted yet

    verify_everything(app, bouncer)

    names, rows = host.results(alice)
    assert names == RESULT_VIEW_COLUMNS
    assert [(r["position"], r["email"]) for r in rows] == sorted(ALICE_ROWS)
    assert rows[1]["status"] == "invalid" and rows[1]["reason"] and rows[1]["checked_at"] is None
    assert all(r["status"] not in ("pending", "invalid") and r["checked_at"] for r in rows if r["position"] != 2)
    # The view is exactly what `results` prints.
    view_columns = [c for c in RESULT_VIEW_COLUMNS if c not in ("batch_id", "position", "checked_at")]
    assert [{c: r[c] for c in view_columns} for r in rows] == list(iter_results(alice))
    assert host.batch(alice)["status"] == host.batch(bob)["status"] == "completed"
    assert (host.batch(alice)["total"], host.batch(alice)["invalid"], host.batch(alice)["duplicates"]) == (5, 1, 1)
    # One credit per stripped address and check type: shared once per check type, Jane once.
    sent = bouncer.sent_addresses()
    assert sorted(sent) == sorted(["Shared@Example.com", "jane.doe+news@gmail.com", "alice.only@example.org",
                                   "shared@example.com", "c@example.net"])
    assert host.batch(carol)["status"] == "completed"


def test_host_batch_is_reported_like_a_submit_of_the_same_lines(app, bouncer, host):
    lines = [email for _, email in sorted(ALICE_ROWS)]
    from_host = host.write_batch("alice", "deliverable", ALICE_ROWS)
    from_submit = create_user_batch("alice", "deliverable", lines).batch_id
    verify_everything(app, bouncer)
    def same(status):
        return {k: v for k, v in status.items() if k not in ("batch_id", "created_at", "completed_at", "webhook")}
    assert same(batch_status(from_host)) == same(batch_status(from_submit))
    assert list(iter_results(from_host)) == list(iter_results(from_submit))


def test_host_batch_created_at_and_status_come_from_database_defaults(host, db):
    batch_id = host.write_batch("alice", "deliverable", [(1, "a@example.com")])
    row = host.batch(batch_id)
    created = row["created_at"]
    if isinstance(created, str):
        created = datetime.datetime.fromisoformat(created)
    assert abs(created - datetime.datetime.utcnow()) < datetime.timedelta(minutes=1)
    assert (row["status"], row["total"], row["invalid"], row["duplicates"]) == ("new", 0, 0, 0)


def test_host_batch_created_at_is_utc_whatever_the_server_time_zone(host, db):
    if not host.postgres:
        pytest.skip("SQLite has no server time zone")
    host.run("SET TIME ZONE 'America/New_York'")
    batch_id = host.write_batch("alice", "deliverable", [(1, "a@example.com")])
    assert host.run("SHOW TIME ZONE") == [("America/New_York",)]
    created = host.batch(batch_id)["created_at"]
    assert abs(created - datetime.datetime.utcnow()) < datetime.timedelta(minutes=1)


@pytest.mark.parametrize("statement, params, fragment", [
    ("INSERT INTO user_batches (user_id, check_type) VALUES (?, ?)", ("alice", "bogus"), "check_type"),
    ("INSERT INTO user_batches (user_id, check_type) VALUES (?, ?)", ("  ", "deliverable"), "user_id"),
    ("INSERT INTO user_batches (user_id, check_type) VALUES (?, ?)", (None, "deliverable"), "user_id"),
    ("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, ?, ?)", (999, 1, "a@x.com"),
     "FOREIGN KEY"),
    ("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, ?, ?)", ("{batch}", 0, "a@x.com"),
     "position"),
    ("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, ?, ?)", ("{batch}", 1, "b@x.com"),
     "UNIQUE"),
    ("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, ?, ?)", ("{batch}", 2, None),
     "email"),
    # The check type of a row is its batch's, copied by admission: a new row that has one would
    # never be found to admit.
    ("INSERT INTO user_batch_emails (batch_id, position, email, check_type) VALUES (?, ?, ?, ?)",
     ("{batch}", 2, "b@x.com", "deliverable"), "user_batch_emails_new_has_no_check_type"),
])
def test_host_rows_that_break_the_contract_are_refused(host, statement, params, fragment):
    batch_id = host.write_batch("alice", "deliverable", [(1, "a@x.com")])
    params = tuple(batch_id if p == "{batch}" else p for p in params)
    message = host.refused(statement, params)
    assert fragment.lower() in message.lower() or (fragment == "UNIQUE" and "duplicate" in message.lower()) \
        or (fragment == "FOREIGN KEY" and "foreign key" in message.lower()), message
    assert host.run("SELECT count(*) FROM user_batch_emails") == [(1,)]
    assert host.run("SELECT count(*) FROM user_batches") == [(1,)]


def test_host_batch_with_no_rows_or_no_valid_row_ends_failed(app, bouncer, host):
    empty = host.write_batch("alice", "deliverable", [])
    invalid = host.write_batch("alice", "deliverable", [(1, "nope"), (2, "")])
    run_cycle(app, CREATION, "deliverable")
    assert host.batch(empty)["status"] == "failed" and "no rows" in host.batch(empty)["failure_reason"]
    assert host.batch(invalid)["status"] == "failed"
    assert host.batch(invalid)["failure_reason"] == "no valid address in 2 row(s)"
    assert [r["status"] for r in host.results(invalid)[1]] == ["invalid", "invalid"]
    assert bouncer.count("create") == 0


def test_host_batch_loading_is_invisible_until_set_new(app, bouncer, host):
    batch_id = host.write_batch("alice", "deliverable", [(1, "a@example.com")], status="loading")
    host.run("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, 2, 'b@example.com')",
             (batch_id,))
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.count("create") == 0 and host.batch(batch_id)["status"] == "loading"
    host.run("UPDATE user_batches SET status = 'new' WHERE id = ?", (batch_id,))
    run_cycle(app, CREATION, "deliverable")
    assert bouncer.sent_addresses() == ["a@example.com", "b@example.com"]
    assert host.batch(batch_id)["status"] == "processing"


def test_host_row_written_after_admission_is_admitted_and_counted(app, bouncer, host):
    batch_id = host.write_batch("alice", "deliverable", [(1, "a@example.com")])
    verify_everything(app, bouncer, rounds=1)
    assert host.batch(batch_id)["status"] == "completed"
    host.run("INSERT INTO user_batch_emails (batch_id, position, email) VALUES (?, 2, 'late@example.com')",
             (batch_id,))
    verify_everything(app, bouncer, rounds=1)
    assert (host.batch(batch_id)["status"], host.batch(batch_id)["total"]) == ("completed", 2)
    assert [r["status"] != "pending" for r in host.results(batch_id)[1]] == [True, True]


def test_host_batches_are_admitted_oldest_first_and_keep_their_place(app, bouncer, host):
    first = host.write_batch("alice", "deliverable", [(p, "a%d@example.com" % p) for p in range(1, 16)])
    second = host.write_batch("bob", "deliverable", [(p, "b%d@example.com" % p) for p in range(1, 6)])
    run_cycle(app, CREATION, "deliverable")            # batch size 10: 10 of alice's first
    assert bouncer.sent_addresses()[:10] == ["a%d@example.com" % p for p in range(1, 11)]
    assert UserBatch.get_by_id(first).fifo_order < UserBatch.get_by_id(second).fifo_order


def test_admission_works_a_slice_at_a_time_oldest_batch_first(host, db):
    batch_id = host.write_batch("alice", "deliverable",
                                [(p, "u%d@example.com" % p) for p in range(1, 2 * SLICE + 2)])
    younger = host.write_batch("bob", "deliverable", [(1, "bob@example.com")])
    report = admit("deliverable", max_rows=SLICE)
    assert (report.admitted, report.unfinished) == (SLICE, True)
    assert (host.batch(batch_id)["total"], host.batch(younger)["total"]) == (SLICE, 0)
    assert claim_of(host, batch_id) is None    # stopped at its bound, it left the batch to the next admitter
    report = admit("deliverable")
    assert (report.admitted, report.unfinished) == (SLICE + 2, False)
    assert (host.batch(batch_id)["total"], host.batch(younger)["total"]) == (2 * SLICE + 1, 1)


def claim_of(host, batch_id):
    return host.run("SELECT admitter_seen_at FROM user_batches WHERE id = ?", (batch_id,))[0][0]


def test_one_admitter_at_a_time_works_on_a_hosts_batch(host, db):
    batch_id = host.write_batch("alice", "deliverable", [(p, "u%d@example.com" % p) for p in range(1, SLICE + 2)])
    younger = host.write_batch("bob", "deliverable", [(1, "bob@example.com")])
    admit("deliverable", max_rows=0)           # both take their places in line
    assert claim_of(host, batch_id) is None
    assert claim_admission(batch_id, utcnow())   # another admitter (a cycle in another process) at work
    assert not claim_admission(batch_id, utcnow())
    report = admit("deliverable")
    # This one leaves the claimed batch alone (it would only check and write the same rows) and
    # admits the next one.
    assert (report.admitted, host.batch(batch_id)["total"], host.batch(younger)["total"]) == (1, 0, 1)
    release_admission(batch_id)
    assert admit("deliverable").admitted == SLICE + 1
    assert (host.batch(batch_id)["total"], claim_of(host, batch_id)) == (SLICE + 1, None)


def test_the_claim_of_an_admitter_that_died_is_taken_over(host, db):
    batch_id = host.write_batch("alice", "deliverable", [(p, "u%d@example.com" % p) for p in range(1, 11)])
    admit("deliverable", max_rows=0)
    assert claim_admission(batch_id, utcnow())   # ... and its process is killed
    assert admit("deliverable", now=utcnow() + DEAD_ADMITTER_AFTER / 2).admitted == 0
    assert admit("deliverable", now=utcnow() + DEAD_ADMITTER_AFTER + datetime.timedelta(seconds=1)).admitted == 10
    assert (host.batch(batch_id)["status"], claim_of(host, batch_id)) == ("queued", None)


def test_a_claim_renewed_with_every_slice_keeps_its_batch(host, db):
    """An admitter's claim is its heartbeat: each slice renews it, so a long admission is never
    taken over while it goes on."""
    batch_id = host.write_batch("alice", "deliverable", [(p, "u%d@example.com" % p) for p in range(1, 2 * SLICE + 1)])
    admit("deliverable", max_rows=0)
    assert claim_admission(batch_id, utcnow())
    host.run("UPDATE user_batches SET admitter_seen_at = ? WHERE id = ?",
             (utcnow() - 2 * DEAD_ADMITTER_AFTER, batch_id))      # an old claim
    admit_slice(batch_id, utcnow(), heartbeat=UserBatch.admitter_seen_at)
    assert not claim_admission(batch_id, utcnow())               # renewed: alive again


def test_admission_gives_each_row_its_own_address_across_gaps_in_its_positions(host, db):
    rows = [(2, "two@example.com"), (5, "Five+tag@Gmail.com"), (6, "not an address"), (40, "forty@example.com"),
            (41, ""), (1000, "thousand@example.com"), (7, "seven@example.com"), (2 ** 31 - 1, "last@example.com")]
    batch_id = host.write_batch("alice", "deliverable", rows)
    assert admit("deliverable").admitted == 6
    found = {position: (status, email, reason) for position, status, email, reason in host.run(
        "SELECT e.position, e.status, g.email, e.failure_reason FROM user_batch_emails e"
        " LEFT JOIN emails_global g ON g.id = e.email_global_id WHERE e.batch_id = ?", (batch_id,))}
    assert {p: (s, e) for p, (s, e, _) in found.items()} == {
        2: ("queued", "two@example.com"), 5: ("queued", "five@gmail.com"), 6: ("invalid", None),
        40: ("queued", "forty@example.com"), 41: ("invalid", None), 1000: ("queued", "thousand@example.com"),
        7: ("queued", "seven@example.com"), 2 ** 31 - 1: ("queued", "last@example.com")}
    assert "@-sign" in found[6][2] and found[41][2] == "the address is empty"
    assert sorted(p for (p,) in host.run("SELECT position FROM queued_emails WHERE batch_id = ?", (batch_id,))) \
        == [2, 5, 7, 40, 1000, 2 ** 31 - 1]


def rows_examined(node):
    """Every row a plan's nodes produced or filtered out, each loop counted (EXPLAIN ANALYZE)."""
    loops = node.get("Actual Loops", 1)
    own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
           + node.get("Rows Removed by Join Filter", 0)) * loops
    return own + sum(rows_examined(child) for child in node.get("Plans", []))


def plan_outline(node, depth=0):
    """A plan's nodes, one a line: type, relation or index, rows produced and filtered out, loops
    (what a failed assertion on rows examined shows)."""
    line = "%s%s %s rows=%s removed=%s loops=%s" % (
        "  " * depth, node.get("Node Type"), node.get("Index Name") or node.get("Relation Name") or "",
        node.get("Actual Rows"), node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Join Filter", 0),
        node.get("Actual Loops"))
    return "\n".join([line] + [plan_outline(child, depth + 1) for child in node.get("Plans", [])])


def plans_of(monkeypatch, prefixes):
    """The plans of the statements the service sends that start with one of `prefixes`, each
    taken by EXPLAIN ANALYZE in a savepoint rolled back before the statement itself runs: a list
    that fills as they run."""
    plans = []
    real = database.obj.execute_sql

    def explained(sql, params=None, *args, **kwargs):
        if sql.startswith(prefixes):
            real("SAVEPOINT plan_of_statement")
            (plan,) = real("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
            real("ROLLBACK TO SAVEPOINT plan_of_statement")
            plans.append(plan[0]["Plan"])
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(database.obj, "execute_sql", explained)
    return plans


def test_admission_reads_only_its_own_rows_whatever_the_statistics_say(host, db, monkeypatch):
    if not on_postgres():
        pytest.skip("the plan of a PostgreSQL statement")
    host.write_batch("alice", "deliverable", [(p, "a%d@example.com" % p) for p in range(1, 3001)])
    admit("deliverable")
    host.run("ANALYZE user_batch_emails")      # statistics of a table where no row is new
    batch_id = host.write_batch("bob", "deliverable", [(p, "b%d@example.com" % p) for p in range(1, 2001)])
    plans = plans_of(monkeypatch, ("UPDATE user_batch_emails", "WITH admitted"))
    assert admit("deliverable").admitted == 2000
    assert plans and host.batch(batch_id)["total"] == 2000
    # A slice's statements look at its own rows a few times over (found, updated, put in line:
    # 6,000). Joined to its values by id, planned from these statistics, the update read the
    # whole table (17,001); on a larger one it looped over every value for each row.
    assert max(map(rows_examined, plans)) <= 4 * 2000, [rows_examined(p) for p in plans]


def test_whether_a_batch_has_a_row_pending_is_a_probe_whatever_waits_and_the_statistics_say(host, db, monkeypatch):
    """Every ingest and the end of every admission ask whether a user batch has a row pending:
    a few index probes, however many rows of another batch wait to be admitted or in line,
    whether the statistics predate them (a host's large write) or count them all."""
    if not on_postgres():
        pytest.skip("the plan of a PostgreSQL statement")
    alice = host.write_batch("alice", "deliverable", [(p, "a%d@example.com" % p) for p in range(1, 4)])
    admit("deliverable")
    host.run("DELETE FROM queued_emails WHERE batch_id = ?", (alice,))    # nothing of alice's is pending
    host.run("ANALYZE user_batch_emails")      # statistics of a table where no row waits
    bob = host.write_batch("bob", "deliverable", [], status="loading")
    host.run("INSERT INTO user_batch_emails (batch_id, position, email)"
             " SELECT ?, n, 'b' || n || '@example.com' FROM generate_series(1, 30000) AS n", (bob,))
    plans = plans_of(monkeypatch, ('UPDATE "user_batches" SET "status" = CASE',))
    examined = []
    for statistics in ("predating the waiting rows", "counting them", "counting them in line"):
        if statistics == "counting them":
            host.run("ANALYZE user_batch_emails")
        if statistics == "counting them in line":
            host.run("UPDATE user_batches SET status = 'new' WHERE id = ?", (bob,))
            while admit("deliverable").admitted:
                pass
            host.run("ANALYZE")
        with write_transaction():
            progress.complete_finished_batches([alice], utcnow())
            database.rollback()
        plan = plans.pop()
        examined.append((statistics, rows_examined(plan), plan_outline(plan)))
    # Hashing the batch of every row waiting, or scanning the table (or the line) for one of
    # alice's, reads the 30,000 rows of bob's.
    assert all(rows <= 10 for _, rows, _ in examined), "\n".join("%s: %d rows\n%s" % e for e in examined)
    assert host.batch(alice)["status"] == "queued"


@pytest.mark.parametrize("admitter", ["cycle", "loader"])
def test_each_slice_of_an_admission_reads_on_from_where_the_last_one_ended(host, db, admitter, no_autovacuum):
    if not on_postgres():
        pytest.skip("entries of admitted rows stay in PostgreSQL's index until a vacuum")

    def pages_read():
        return postgres_statistics("SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes"
                                   " WHERE indexrelname = 'user_batch_emails_unadmitted'")[0]

    slices = 12
    batch_id = host.write_batch("alice", "deliverable",
                                [(p, "u%d@example.com" % p) for p in range(1, slices * SLICE + 1)])
    (pages,) = database.execute_sql("SELECT pg_relation_size('user_batch_emails_unadmitted') / 8192").fetchone()
    before = pages_read()
    if admitter == "cycle":
        assert admit("deliverable").admitted == slices * SLICE
    else:   # as a loader admits the batch it wrote, once the batch took its place in line
        host.run("UPDATE user_batches SET status = 'queued', fifo_order = 1 WHERE id = ?", (batch_id,))
        assert admit_batch(batch_id).admitted == slices * SLICE
    read = pages_read() - before
    # The end of the admission (its duplicates counted, whether a row is still pending asked
    # from the batch's first position) reads what it reads once, whatever the slices did: it is
    # measured apart, by ending the admission once more, and left out.
    before = pages_read()
    finish_admission(batch_id, AdmissionReport(), utcnow())
    read -= pages_read() - before
    # A few passes over the index in all (each slice finds its rows, then updates them). Read
    # from the batch's first position each time, each slice would also step over the entries
    # of every row admitted before it (kept until a vacuum): about slices / 2 passes more, 11
    # in all. (Under a loaded server the count wanders by a pass or two: the bound leaves room.)
    assert read <= 8 * pages, (read, pages)


SLICE_READ = 'SELECT "t1"."id", "t1"."position", "t1"."email" FROM "user_batch_emails"'


@pytest.mark.parametrize("admitter", ["cycle", "loader"])
def test_a_slice_reads_a_window_of_its_batch_whatever_plan_the_database_picks(host, db, admitter, monkeypatch):
    """With statistics taken while a large batch was still loading (an autovacuum's ANALYZE),
    PostgreSQL guessed a dozen rows past the positions it knew and picked a bitmap scan: each
    slice read every row left in the batch, then sorted them for the first SLICE. That plan is
    forced here (no plain index scan), and each slice still reads only a window of positions."""
    if not on_postgres():
        pytest.skip("the plan of a PostgreSQL statement")
    slices = 6
    batch_id = host.write_batch("alice", "deliverable", [(p, "u%d@example.com" % p) for p in range(1, 11)],
                                status="loading")
    host.run("INSERT INTO user_batch_emails (batch_id, position, email)"
             " SELECT ?, n, 'u' || n || '@example.com' FROM generate_series(11, ?) AS n",
             (batch_id, slices * SLICE))
    plans = []
    real = database.obj.execute_sql

    def explained(sql, params=None, *args, **kwargs):
        if sql.startswith(SLICE_READ):
            (plan,) = real("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
            plans.append(plan[0]["Plan"])
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(database.obj, "execute_sql", explained)
    database.execute_sql("SET enable_indexscan = off")
    try:
        if admitter == "cycle":
            host.run("UPDATE user_batches SET status = 'new' WHERE id = ?", (batch_id,))
            assert admit("deliverable").admitted == slices * SLICE
        else:   # as a loader admits the batch it wrote, once the batch took its place in line
            host.run("UPDATE user_batches SET status = 'queued', fifo_order = 1 WHERE id = ?", (batch_id,))
            assert admit_batch(batch_id).admitted == slices * SLICE
    finally:
        database.execute_sql("RESET enable_indexscan")
    assert len(plans) >= slices
    # A window: its rows, sorted, the first SLICE of them (3 x SLICE). All that is left of the
    # batch, at the first slice: its 6 x SLICE rows, and twice SLICE. (The bitmap of index entries
    # is left out: it also holds entries of rows deleted before the test, until a vacuum.)
    examined = max(plans, key=rows_read)
    assert rows_read(examined) <= 3 * SLICE, plan_outline(examined)


def rows_read(node):
    """rows_examined, the nodes reading an index alone left out."""
    if node.get("Node Type") == "Bitmap Index Scan":
        return 0
    return rows_examined(dict(node, Plans=[])) + sum(rows_read(child) for child in node.get("Plans", []))


@pytest.mark.parametrize("admitter", ["cycle", "loader"])
def test_a_batch_with_gaps_in_its_positions_is_admitted_whole_in_full_slices(host, db, admitter):
    """Positions are unique, not necessarily consecutive: a slice that finds a gap goes on past
    it, so each slice but the last is full, and every row is admitted once, in its position."""
    positions = (list(range(1, 11)) + list(range(3 * SLICE + 1, 4 * SLICE + 6)) + [10 * SLICE]
                 + list(range(20 * SLICE, 20 * SLICE + SLICE // 2)))
    batch_id = host.write_batch("alice", "deliverable", [(p, "u%d@example.com" % p) for p in positions])
    if admitter == "cycle":
        slices = []
        while True:
            report = admit("deliverable", max_rows=SLICE)
            slices.append(report.admitted)
            if not report.unfinished:
                break
    else:
        host.run("UPDATE user_batches SET status = 'queued', fifo_order = 1 WHERE id = ?", (batch_id,))
        slices = [admit_batch(batch_id).admitted]
    assert sum(slices) == len(positions)
    if admitter == "cycle":
        assert slices[:-1] == [SLICE] * (len(slices) - 1)
    rows = host.run("SELECT position, status, email_global_id IS NOT NULL FROM user_batch_emails"
                    " WHERE batch_id = ? ORDER BY position", (batch_id,))
    assert rows == [(p, "queued", True) for p in positions]
    assert host.batch(batch_id)["total"] == len(positions)
