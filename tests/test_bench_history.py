"""The benchmark's long history (scripts/history.py) is a database the service reads and goes on
with as it would after months of use: every row ended and counted in its batch, every done
row's verdict where the results view looks for it, the indexes as `init-db` made them, and new
work numbered after the history. A fill that broke any of this would measure something else.
No timing here: the benchmark measures."""
import json
import re

import pytest
from peewee import fn

from bouncer.cycles.creation import create_batches
from bouncer.cycles.runner import Cycle
from bouncer.doors.loading import create_user_batch
from bouncer.cycles.runner import run_cycle
from bouncer.names import CREATION, STATUS
from bouncer.queue.outcomes import count_outcomes
from bouncer.reading.batches import iter_results
from bouncer.store.database import database
from bouncer.store.models import (
    BouncerBatch, CatchallResult, DeliverableResult, EmailGlobal, FifoCounter, QueuedEmail, RateLimitTracker,
    UserBatch, UserBatchEmail, WebhookDelivery,
)
from scripts import history, workloads

SIZE = history.Size(rows=3000, verdicts=1000, ledger=10)


@pytest.fixture
def filled(database_url):
    """The database with SIZE of history, written by the benchmark's own fill; the definitions
    of the indexes before it."""
    before = index_definitions(database_url)
    database.close()
    history.fill(database_url, SIZE)
    database.connect(reuse_if_open=True)
    yield before
    database.close()


def index_definitions(url):
    connection = workloads.connect(url)
    try:
        cursor = connection.cursor()
        found = set()
        for table in history.BULK_TABLES:
            found |= {definition for _, _, definition in history.definitions(
                history.Fill(url, SIZE, None), cursor, table)}
        return found
    finally:
        connection.close()


def test_history_has_the_sizes_asked_for(filled):
    assert UserBatchEmail.select().count() == SIZE.rows
    assert EmailGlobal.select().count() == SIZE.verdicts
    assert DeliverableResult.select().count() + CatchallResult.select().count() == SIZE.verdicts
    assert BouncerBatch.select().count() == SIZE.ledger
    assert WebhookDelivery.select().count() == UserBatch.select().count()
    assert RateLimitTracker.select().count() == history.REQUESTS
    statuses = {s for (s,) in UserBatchEmail.select(UserBatchEmail.status).distinct().tuples()}
    assert statuses == {"done", "invalid", "failed", "cancelled"}


def test_every_history_batch_has_ended_with_its_rows_counted(filled):
    assert not QueuedEmail.select().exists()
    for batch in UserBatch.select():
        counts = count_outcomes(batch)
        assert batch.status in ("completed", "failed", "cancelled")
        assert counts["pending"] == 0
        assert sum(counts.values()) == batch.total
        assert counts["invalid"] == batch.invalid


def test_every_done_row_reads_its_verdict(filled):
    done = UserBatchEmail.select().where(UserBatchEmail.status == "done").count()
    read = 0
    for batch in UserBatch.select(UserBatch.id):
        rows = list(iter_results(batch.id))
        assert len(rows) == UserBatch.get_by_id(batch.id).total
        read += sum(1 for row in rows if row["status"] in ("deliverable", "risky", "undeliverable", "unknown"))
    assert read == done


def test_verdicts_are_records_as_the_service_stores_them(filled):
    verdict = DeliverableResult.select().first()
    record = json.loads(verdict.raw)
    assert record["email"] == EmailGlobal.get_by_id(verdict.email_global_id).email
    assert record["status"] == verdict.status


def test_history_keeps_the_indexes_init_db_made(filled, database_url):
    assert filled and index_definitions(database_url) == filled


def test_new_work_after_the_history_is_numbered_after_it_and_sent(filled, app):
    last_batch = UserBatch.select(fn.MAX(UserBatch.id)).scalar()
    slots = app.settings.batch_size * app.settings.max_outstanding
    summary = create_user_batch("newcomer", "deliverable", ["fresh%d@example.com" % i for i in range(slots)])
    assert summary.batch_id > last_batch
    batch = UserBatch.get_by_id(summary.batch_id)
    assert batch.fifo_order == FifoCounter.get().last > last_batch
    assert EmailGlobal.select(fn.MIN(EmailGlobal.id)).where(
        EmailGlobal.email.startswith("fresh")).scalar() > SIZE.verdicts
    cycle = Cycle(app, CREATION, "deliverable")
    create_batches(cycle)
    assert sum(n for _, _, n in cycle.report.created) == slots   # the history holds none of the slots
    sent = BouncerBatch.select(fn.MIN(BouncerBatch.id)).where(BouncerBatch.status == "outstanding").scalar()
    assert sent > SIZE.ledger



def full_scans(plans):
    """{statement: [steps]} of the SQLite query plans ({statement: [step]}) with a step that reads
    a whole table or index; rows of a table-valued function, constant rows and a common table
    expression's own rows are not one."""
    found = {}
    for sql, steps in plans.items():
        own = set(re.findall(r"WITH(?: RECURSIVE)? (\w+)", sql))
        scans = [step for step in steps if step.startswith("SCAN ") and "VIRTUAL TABLE" not in step
                 and "CONSTANT ROW" not in step and step.split()[1] not in own]
        if scans:
            found[sql] = scans
    return found


@pytest.mark.parametrize("step", [CREATION, STATUS])
def test_the_cycles_find_their_rows_by_key_on_a_long_history(filled, app, bouncer, monkeypatch, step):
    """SQLite plans a statement without statistics (the service never gathers them), so a plan
    that reads a whole table on this small history reads all of a long one: every statement of a
    cycle finds its rows through a key or an index, or the history's size shows in its time."""
    from conftest import on_postgres
    if on_postgres():
        pytest.skip("SQLite plans: PostgreSQL's follow the statistics autovacuum keeps")
    assert not database.execute_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchall()
    create_user_batch("newcomer", "deliverable", ["fresh%d@example.com" % i for i in range(30)])
    if step == STATUS:
        run_cycle(app, CREATION, "deliverable")
        bouncer.complete_now()
    plans, real = {}, database.obj.execute_sql

    def explained(sql, params=None, *args, **kwargs):
        if sql.lstrip().startswith(("SELECT", "UPDATE", "DELETE", "WITH", "INSERT")):
            plans[sql] = [row[3] for row in real("EXPLAIN QUERY PLAN " + sql, params).fetchall()]
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(database.obj, "execute_sql", explained)
    report = run_cycle(app, step, "deliverable")
    assert (report.created if step == CREATION else report.ingested) and len(plans) > 10
    assert full_scans(plans) == {}
